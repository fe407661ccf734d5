"""A fake OpenAI engine for the router's fast unit tests (fault injection, no vLLM).

Named as a fake on purpose: it checks the router's plumbing (relay, retries,
timeouts, disconnects); behaviour against real engines is covered by the
``engine``-marked tests.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class FakeBehaviour:
    """What the fake engine does with the next requests."""

    model: str = "tiny"
    tokens: int = 4
    token_delay_s: float = 0.0
    fail_status: int | None = None  # answer every generation request with this status
    hang_s: float = 0.0  # sleep before answering (headers included)
    close_mid_stream_after: int | None = None  # drop the connection after N tokens
    # Stop sending after N tokens and hold the connection open, as a process being killed
    # does until its exit closes its sockets (pair it with ``health_delay_s``), or a hung
    # engine core behind a live HTTP server (its token counter stops too).
    freeze_mid_stream_after: int | None = None
    health_status: int = 200
    health_delay_s: float = 0.0  # a starved API server: /health answers this late
    with_xllm_status: bool = True
    running: int = 0
    waiting: int = 0
    offline_waiting: int = 0  # reported by /xllm/status (XLLMScheduler's per-class counts)
    kv_transfer_params: dict[str, Any] | None = None  # returned to a P->D prefill request
    # A deterministic "greedy model" with token ids (for migration tests): the next token is
    # a function of the whole sequence, prompt ids are the characters' code points, and
    # return_token_ids is honoured as vLLM does. ``tokens`` is then the default max_tokens.
    sequence_model: bool = False
    # Malformed answers (chaos tests): "non_json" (200 with a body that is not JSON),
    # "html_error" (an HTML page with status ``malformed_status``), "reset" (TCP reset
    # before any byte), and, with ``sequence_model``, after ``malformed_after`` tokens:
    # "truncated_sse" (half an event, then the connection closes), "garbage_event" (a
    # non-JSON event, then the stream goes on) or "reset_mid" (TCP reset).
    malformed: str | None = None
    malformed_status: int = 503
    malformed_after: int = 2
    # A completions stream of these (token id, text) events after ``scripted_prompt_ids``,
    # then a dropped connection: a real model's tokens up to a chosen seam.
    scripted: list[tuple[int, str]] | None = None
    scripted_prompt_ids: list[int] | None = None


def metric_total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` in Prometheus ``text`` (a router's or a vLLM
    engine's /metrics) whose labels include ``labels``."""
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name
               and all(sample.labels.get(k) == v for k, v in labels.items()))


def reset_connection(request: web.Request) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0), as a crashed peer or a proxy would."""
    transport = request.transport
    assert transport is not None
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                  struct.pack("ii", 1, 0))
    transport.abort()


def fake_next_token(sequence: list[int]) -> int:
    """The fake model's greedy choice after ``sequence``."""
    return 1000 + (sum(sequence) * 31 + len(sequence) * 7) % 997


def fake_prompt_ids(body: dict[str, Any], chat: bool) -> list[int]:
    if chat:
        return [ord(c) for m in body["messages"] for c in str(m.get("content", ""))]
    prompt = body["prompt"]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    return [ord(c) for c in prompt] if isinstance(prompt, str) else list(prompt)


@dataclass
class FakeEngine:
    name: str
    behaviour: FakeBehaviour = field(default_factory=FakeBehaviour)
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    disconnects: int = 0
    completed: int = 0
    generated: int = 0  # tokens streamed, all requests: its vllm:generation_tokens_total
    url: str = ""
    runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/xllm/status", self._status)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        return app

    async def start(self, port: int = 0) -> FakeEngine:
        self.runner = web.AppRunner(self.app(), handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _health(self, request: web.Request) -> web.Response:
        if self.behaviour.health_delay_s:
            await asyncio.sleep(self.behaviour.health_delay_s)
        return web.Response(status=self.behaviour.health_status)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.behaviour.model, "object": "model"}]})

    async def _metrics(self, request: web.Request) -> web.Response:
        b = self.behaviour
        return web.Response(text=(
            f'vllm:num_requests_running{{model_name="{b.model}"}} {b.running}.0\n'
            f'vllm:num_requests_waiting{{model_name="{b.model}"}} {b.waiting}.0\n'
            f'vllm:kv_cache_usage_perc{{model_name="{b.model}"}} 0.25\n'
            f'vllm:generation_tokens_total{{model_name="{b.model}"}} {self.generated}.0\n'))

    async def _status(self, request: web.Request) -> web.Response:
        b = self.behaviour
        if not b.with_xllm_status:
            raise web.HTTPNotFound()
        return web.json_response({"engine": {
            "running": {"online": b.running, "offline": 0},
            "waiting": {"online": b.waiting, "offline": b.offline_waiting},
            "kv_cache_usage": 0.5}})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        b = self.behaviour
        if b.hang_s:
            await asyncio.sleep(b.hang_s)
        if b.malformed == "non_json":
            return web.Response(text="upstream says hello {", content_type="application/json")
        if b.malformed == "html_error":
            return web.Response(text="<html><body><h1>Bad Gateway</h1></body></html>",
                                status=b.malformed_status, content_type="text/html")
        if b.malformed == "reset":
            reset_connection(request)
            return web.Response()
        if b.fail_status is not None:
            return web.json_response({"error": {"message": f"fake failure {b.fail_status}",
                                                "type": "x", "param": None,
                                                "code": b.fail_status}},
                                     status=b.fail_status)
        chat = request.path.endswith("chat/completions")
        if b.scripted is not None:
            return await self._generate_scripted(request)
        if b.sequence_model:
            return await self._generate_sequence(request, body, chat)
        if not body.get("stream"):
            await asyncio.sleep(b.token_delay_s * b.tokens)
            self.completed += 1
            text = " ".join(f"t{i}" for i in range(b.tokens))
            choice = ({"message": {"role": "assistant", "content": text}} if chat
                      else {"text": text})
            answer = {"id": "x", "object": "completion", "model": b.model,
                      "served_by": self.name,
                      "choices": [{"index": 0, **choice, "finish_reason": "length"}],
                      "usage": {"prompt_tokens": 3, "completion_tokens": b.tokens,
                                "total_tokens": 3 + b.tokens}}
            if b.kv_transfer_params is not None and body.get("kv_transfer_params"):
                answer["kv_transfer_params"] = b.kv_transfer_params
            return web.json_response(answer)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(b.tokens):
                if b.close_mid_stream_after is not None and i == b.close_mid_stream_after:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                await asyncio.sleep(b.token_delay_s)
                piece = f" t{i}" if i else "t0"  # the pieces join to the non-streamed text
                delta = {"delta": {"content": piece}} if chat else {"text": piece}
                chunk = {"id": "x", "model": b.model, "served_by": self.name,
                         "choices": [{"index": 0, **delta, "finish_reason":
                                      "length" if i == b.tokens - 1 else None}]}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"id": "x", "choices": [], "usage": {
                    "prompt_tokens": 3, "completion_tokens": b.tokens,
                    "total_tokens": 3 + b.tokens}}
                await response.write(f"data: {json.dumps(usage)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            self.completed += 1
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            raise
        return response

    async def _generate_scripted(self, request: web.Request) -> web.StreamResponse:
        b = self.behaviour
        assert b.scripted is not None
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, (token, text) in enumerate(b.scripted):
            choice: dict[str, Any] = {"index": 0, "text": text, "token_ids": [token],
                                      "finish_reason": None}
            if i == 0:
                choice["prompt_token_ids"] = b.scripted_prompt_ids
            chunk = {"id": "s", "model": b.model, "choices": [choice]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.02)  # the router reads each event before the drop
        assert request.transport is not None
        request.transport.close()
        return response

    async def _generate_sequence(self, request: web.Request, body: dict[str, Any],
                                 chat: bool) -> web.StreamResponse:
        b = self.behaviour
        prompt = fake_prompt_ids(body, chat)
        limit = body.get("max_tokens") or body.get("max_completion_tokens") or b.tokens
        ids = body.get("return_token_ids")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        sequence = list(prompt)
        usage = (body.get("stream_options") or {}).get("include_usage")
        try:
            if chat:
                first = {"id": "c", "object": "chat.completion.chunk", "model": b.model,
                         "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": None}]}
                if ids:
                    first["prompt_token_ids"] = prompt
                await response.write(f"data: {json.dumps(first)}\n\n".encode())
            for i in range(limit):
                if b.close_mid_stream_after is not None and i == b.close_mid_stream_after:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if b.freeze_mid_stream_after is not None and i == b.freeze_mid_stream_after:
                    await asyncio.sleep(3600)
                if b.malformed is not None and i == b.malformed_after:
                    if b.malformed == "truncated_sse":
                        await response.write(b'data: {"id": "c", "choices": [{"ind')
                        assert request.transport is not None
                        request.transport.close()
                        return response
                    if b.malformed == "garbage_event":
                        await response.write(b"data: <html>proxy error</html>\n\n")
                    if b.malformed == "reset_mid":
                        reset_connection(request)
                        return response
                await asyncio.sleep(b.token_delay_s)
                token = fake_next_token(sequence)
                sequence.append(token)
                self.generated += 1
                reason = "length" if i == limit - 1 else None
                choice: dict[str, Any] = ({"index": 0, "delta": {"content": f"<{token}>"}}
                                          if chat else {"index": 0, "text": f"<{token}>"})
                choice["finish_reason"] = reason
                if ids:
                    choice["token_ids"] = [token]
                    if not chat and i == 0:
                        choice["prompt_token_ids"] = prompt
                chunk = {"id": "c", "model": b.model, "served_by": self.name,
                         "choices": [choice]}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if usage:
                n = len(sequence) - len(prompt)
                tail = {"id": "c", "choices": [], "usage": {
                    "prompt_tokens": len(prompt), "completion_tokens": n,
                    "total_tokens": len(prompt) + n}}
                await response.write(f"data: {json.dumps(tail)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            self.completed += 1
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            raise
        return response


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0,
                   what: str = "condition") -> float:
    """Poll ``predicate`` until true; return the seconds it took."""
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > timeout_s:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - began


class FakeEncoder:
    """An encode-only instance: answers a chat request with ``ec_transfer_params`` keyed by
    each image's uuid, as vLLM's ECExampleConnector producer does (or fails as told)."""

    def __init__(self, status: int = 200, delay_s: float = 0.0) -> None:
        self.status = status
        self.delay_s = delay_s  # encoder time per request
        self.requests: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> FakeEncoder:
        app = web.Application()
        app.router.add_get("/health", self._empty)
        app.router.add_get("/metrics", self._empty)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @staticmethod
    async def _empty(request: web.Request) -> web.Response:
        return web.Response(text="")

    @staticmethod
    async def _models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        await asyncio.sleep(self.delay_s)
        if self.status != 200:
            return web.json_response({"error": {"message": "encoder broke"}}, status=self.status)
        uuids = [p["uuid"] for m in body["messages"] for p in m["content"]
                 if isinstance(p, dict) and p.get("type") == "image_url"]
        return web.json_response({
            "id": "e", "object": "chat.completion", "model": "tiny",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
                         "finish_reason": "stop"}],
            "ec_transfer_params": {u: {"item_indices": [i], "metadata": {}}
                                   for i, u in enumerate(uuids)}})
