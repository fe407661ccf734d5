"""``POST /xllm/v1/recommend`` on ``vllm serve``: the ``xllm_recommend`` endpoint plugin.

Registered under ``vllm.endpoint_plugins``; vLLM loads it only when it is named in
``VLLM_PLUGINS`` (e.g. ``VLLM_PLUGINS=xllm,xllm_status,xllm_recommend``), which is
the feature's off switch. The route drives ordinary ``EngineClient.generate``
requests, the path vLLM's own beam search uses; nothing new reaches the engine.
"""

from __future__ import annotations

import time
import uuid
from argparse import Namespace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from xllm_plugin.config import XLLMConfigError
from xllm_plugin.recommend.admission import AdmissionError
from xllm_plugin.recommend.catalog import CatalogError
from xllm_plugin.recommend.protocol import (
    RecommendedItem,
    RecommendRequest,
    RecommendResponse,
    RecommendTiming,
    RecommendUsage,
)
from xllm_plugin.recommend.registry import recommend_config, resolve_catalog

ROUTE = "/xllm/v1/recommend"


def _error(status: int, message: str, kind: str = "BadRequestError") -> JSONResponse:
    """An error in OpenAI's shape, as vLLM's own routes return them."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                   "code": status}}, status_code=status)


class RecommendEndpoints:
    """Serves fixed-step, optionally catalog-constrained beam search."""

    name = "xllm_recommend"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self._engine: Any = None
        self._driver: Any = None
        self._model = ""
        self._config_error: str | None = None
        self._config: Any = None

    def attach_router(self, app: FastAPI) -> None:
        app.add_api_route(ROUTE, self.recommend, methods=["POST"])

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        if engine_client is None:  # render-only server: no engine to search with
            return
        from xllm_plugin.recommend.driver import BeamSearchDriver

        try:
            config = recommend_config(getattr(args, "additional_config", None))
        except XLLMConfigError as error:
            self._config_error = str(error)
            return
        self._engine = engine_client
        self._driver = BeamSearchDriver(engine_client, config)
        names = getattr(args, "served_model_name", None) or [getattr(args, "model", "")]
        self._model = names[0] if isinstance(names, list) else str(names)
        self._config = config

    async def recommend(self, raw: Request) -> JSONResponse:
        from xllm_plugin.recommend.driver import EngineFailure, RecommendError, SearchSpec

        began = time.perf_counter()
        if self._driver is None:
            return _error(503, self._config_error or "no engine behind this server",
                          "ServiceUnavailableError")
        try:
            body = RecommendRequest.model_validate(await raw.json())
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(map(str, first["loc"])) or "body"
            return _error(400, f"{where}: {first['msg']}")
        except ValueError as error:
            return _error(400, f"request body is not JSON: {error}")
        try:
            catalog = resolve_catalog(body.catalog, self._config) if body.catalog else None
        except CatalogError as error:
            return _error(400, str(error))
        tokenizer = self._engine.renderer.get_tokenizer()
        prompt = (body.prompt_token_ids if body.prompt_token_ids is not None
                  else tokenizer.encode(body.prompt))
        num_tokens = body.num_tokens or (catalog.item_len if catalog else 0)
        spec = SearchSpec(prompt_token_ids=list(prompt), beam_width=body.beam_width,
                          num_tokens=num_tokens, top_k=body.top_k or body.beam_width,
                          catalog=catalog, catalog_ref=body.catalog, sessions=body.sessions,
                          fork=body.fork is not False)
        request_id = f"rec-{uuid.uuid4().hex[:16]}"
        try:
            result = await self._driver.search(spec, request_id)
        except (RecommendError, AdmissionError) as error:
            return _error(400, str(error))
        except EngineFailure as error:
            return _error(503, str(error), "ServiceUnavailableError")
        items = [RecommendedItem(token_ids=tokens, score=score,
                                 text=tokenizer.decode(tokens) if body.return_text else None)
                 for tokens, score in result.items]
        stats = result.stats
        response = RecommendResponse(
            id=request_id, model=self._model, mode=stats.mode, items=items,
            usage=RecommendUsage(prompt_tokens=len(prompt), engine_requests=stats.engine_requests,
                                 continued=stats.continued, forked=stats.forked),
            timing=RecommendTiming(queued_ms=stats.queued_ms, step_ms=stats.step_ms,
                                   total_ms=(time.perf_counter() - began) * 1e3))
        return JSONResponse(response.model_dump(exclude_none=True))
