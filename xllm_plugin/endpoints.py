"""Admin HTTP routes added to ``vllm serve`` (the ``vllm.endpoint_plugins`` entry point).

vLLM loads endpoint plugins only when they are named in ``VLLM_PLUGINS``;
because that variable then filters every plugin group, name the general
plugin too: ``VLLM_PLUGINS=xllm,xllm_status``.
"""

from __future__ import annotations

import asyncio
import time
from argparse import Namespace
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from xllm_plugin import __version__
from xllm_plugin.config import parse_xllm_config
from xllm_plugin.memory.status import read_xtensor_status
from xllm_plugin.status_channel import read_status


class XLLMEndpoints:
    """Serves ``GET /xllm/status``: proof that the plugin runs inside the engine.

    The body carries the plugin version, the active features and, once the
    engine's scheduler is the XLLMScheduler, its live state (running and
    waiting requests by class) with the snapshot's age.
    """

    name = "xllm_status"
    required_tasks = None

    def __init__(self) -> None:
        self._args: dict[str, Any] = {}
        self._registration: asyncio.Task[None] | None = None

    def attach_router(self, app: FastAPI) -> None:
        app.add_api_route("/xllm/status", self.status, methods=["GET"])

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        self._args = {
            "model": getattr(args, "model", None),
            "served_model_name": getattr(args, "served_model_name", None),
            "scheduler_cls": str(getattr(args, "scheduler_cls", None)),
        }
        registration = parse_xllm_config(getattr(args, "additional_config", None)).registration
        if registration.etcd:
            from xllm_plugin.registration import start_registration

            # Runs in the server's loop; the registrar waits for /health before registering.
            self._registration = start_registration(args, registration)

    async def status(self) -> JSONResponse:
        engine = read_status()
        xtensor = read_xtensor_status()  # the worker's KV memory metrics (xllm.xtensor)
        body = {
            "plugin": "xllm-plugin",
            "version": __version__,
            "server": self._args,
            "features": {"xllm_scheduler": engine is not None,
                         "etcd_registration": self._registration is not None
                         and not self._registration.done(),
                         "xtensor": xtensor is not None},
            "engine": engine,
            "xtensor": xtensor,
            "engine_status_age_s": (time.time() - engine["published_at"]) if engine else None,
        }
        return JSONResponse(body)
