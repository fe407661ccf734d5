"""FakeOpenAIBackend: a stand-in OpenAI server with a fixed, small latency, for router scale tests.

It is **not an engine**: it runs no model, computes nothing and answers every
completion with filler tokens after a fixed delay. It exists so that a router's
own ceiling (requests per second it can parse, route and relay) can be measured
without an engine being the bottleneck (``benchmarks/router_overhead.py``).
Every response carries ``x-fake-backend: FakeOpenAIBackend`` so that nobody
mistakes its numbers for an engine's.

Routes, shaped like ``vllm serve``'s so that routers treat it as a vLLM instance:

- ``POST /v1/completions``, ``POST /v1/chat/completions``: non-streaming (one JSON
  body after ``first_token_ms + (n - 1) * itl_ms``) or streaming (SSE: one chunk
  after ``first_token_ms``, then one every ``itl_ms``, a usage chunk when
  ``stream_options.include_usage`` is set, then ``[DONE]``); ``n`` is the request's
  ``max_tokens`` capped at ``max_output_tokens``;
- ``GET /v1/models``, ``GET /health``, ``GET /load`` (vLLM's ``{"server_load": n}``);
- ``GET /metrics``: vLLM's load gauges (``vllm:num_requests_running`` = requests in
  flight, waiting 0, KV usage 0), so load-aware policies see real in-flight counts.

Run: ``python -m router.bench.fake_backend --port 9001 [--first-token-ms 5 --itl-ms 1]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

FAKE_HEADER = {"x-fake-backend": "FakeOpenAIBackend"}


@dataclass(frozen=True)
class FakeSettings:
    """The fixed behaviour of one fake backend."""

    model: str = "fake"
    first_token_ms: float = 5.0
    """Delay before the first token (streaming) or part of the whole delay (non-streaming)."""
    itl_ms: float = 1.0
    """Delay between two streamed tokens."""
    max_output_tokens: int = 16
    """Cap on tokens per response, whatever ``max_tokens`` asks."""


class FakeOpenAIBackend:
    """The aiohttp app and its in-flight counter; see the module docstring."""

    def __init__(self, settings: FakeSettings) -> None:
        self.settings = settings
        self.inflight = 0
        self.served = 0

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.handle_completion)
        app.router.add_post("/v1/chat/completions", self.handle_completion)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/load", self.handle_load)
        app.router.add_get("/metrics", self.handle_metrics)
        return app

    # -- routes ---------------------------------------------------------------------------------

    async def handle_health(self, request: web.Request) -> web.Response:
        return web.Response(text="", headers=FAKE_HEADER)

    async def handle_load(self, request: web.Request) -> web.Response:
        return web.json_response({"server_load": self.inflight}, headers=FAKE_HEADER)

    async def handle_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.settings.model, "object": "model", "created": 0, "owned_by": "fake",
             "root": self.settings.model, "max_model_len": 4096}]}, headers=FAKE_HEADER)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        label = f'{{model_name="{self.settings.model}"}}'
        text = (f"vllm:num_requests_running{label} {self.inflight}\n"
                f"vllm:num_requests_waiting{label} 0\n"
                f"vllm:kv_cache_usage_perc{label} 0.0\n"
                f"fake_backend_requests_served_total {self.served}\n")
        return web.Response(text=text, content_type="text/plain", headers=FAKE_HEADER)

    async def handle_completion(self, request: web.Request) -> web.StreamResponse:
        try:
            body: dict[str, Any] = json.loads(await request.read())
        except ValueError:
            return web.json_response({"error": {"message": "body is not JSON", "type": "BadRequestError",
                                                "param": None, "code": 400}}, status=400)
        chat = request.path.endswith("/chat/completions")
        n = max(1, min(int(body.get("max_tokens") or 1), self.settings.max_output_tokens))
        prompt_tokens = _rough_prompt_tokens(body)
        self.inflight += 1
        try:
            if body.get("stream"):
                return await self._stream(request, body, chat, n, prompt_tokens)
            await asyncio.sleep((self.settings.first_token_ms + (n - 1) * self.settings.itl_ms) / 1e3)
            return web.json_response(self._full_body(chat, n, prompt_tokens), headers=FAKE_HEADER)
        finally:
            self.inflight -= 1
            self.served += 1

    # -- bodies -----------------------------------------------------------------------------------

    def _full_body(self, chat: bool, n: int, prompt_tokens: int) -> dict[str, Any]:
        text = " tok" * n
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                 "total_tokens": prompt_tokens + n}
        if chat:
            return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                    "created": int(time.time()), "model": self.settings.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "length"}], "usage": usage}
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": self.settings.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
                "usage": usage}

    async def _stream(self, request: web.Request, body: dict[str, Any], chat: bool, n: int,
                      prompt_tokens: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache", **FAKE_HEADER})
        await response.prepare(request)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        await asyncio.sleep(self.settings.first_token_ms / 1e3)
        for i in range(n):
            if i:
                await asyncio.sleep(self.settings.itl_ms / 1e3)
            last = i == n - 1
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length" if last else None}
            if chat:
                choice["delta"] = ({"role": "assistant", "content": " tok"} if i == 0
                                   else {"content": " tok"})
            else:
                choice["text"] = " tok"
            chunk = {"id": rid, "object": kind, "created": created, "model": self.settings.model,
                     "choices": [choice]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                     "total_tokens": prompt_tokens + n}
            chunk = {"id": rid, "object": kind, "created": created, "model": self.settings.model,
                     "choices": [], "usage": usage}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _rough_prompt_tokens(body: dict[str, Any]) -> int:
    """Words in the prompt or messages: a usage figure, not a tokenizer."""
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return len(prompt)
    if isinstance(prompt, str):
        return len(prompt.split())
    return sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or [])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="FakeOpenAIBackend: an OpenAI-shaped server that runs no model and answers "
                    "after a fixed delay (router scale tests only).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="fake")
    parser.add_argument("--first-token-ms", type=float, default=5.0)
    parser.add_argument("--itl-ms", type=float, default=1.0)
    parser.add_argument("--max-output-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    backend = FakeOpenAIBackend(FakeSettings(args.model, args.first_token_ms, args.itl_ms,
                                             args.max_output_tokens))
    web.run_app(backend.build_app(), host=args.host, port=args.port, access_log=None,
                print=None)


if __name__ == "__main__":
    main()
