"""FakeOpenAIBackend (router/bench/fake_backend.py), the benchmark's stand-in engine.

The router-overhead benchmark's max req/s is only meaningful if the fake answers
like an OpenAI server (so routers relay it normally) and stays fast and fixed.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web

from router.bench.fake_backend import FakeOpenAIBackend, FakeSettings

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture
async def backend() -> AsyncIterator[tuple[FakeOpenAIBackend, str]]:
    fake = FakeOpenAIBackend(FakeSettings(model="fake", first_token_ms=20.0, itl_ms=5.0))
    runner = web.AppRunner(fake.build_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_non_streaming_answer_has_openai_shape_and_fixed_delay(backend, client):
    _, url = backend
    began = time.perf_counter()
    async with client.post(url + "/v1/completions",
                           json={"model": "fake", "prompt": "a b c", "max_tokens": 3}) as r:
        body = await r.json()
        assert r.status == 200 and r.headers["x-fake-backend"] == "FakeOpenAIBackend"
    elapsed_ms = (time.perf_counter() - began) * 1e3
    assert body["object"] == "text_completion"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert elapsed_ms >= 20.0 + 2 * 5.0  # first token + two gaps, never faster


async def test_chat_stream_sends_one_chunk_per_token_then_usage_and_done(backend, client):
    _, url = backend
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "stream": True, "stream_options": {"include_usage": True}}
    async with client.post(url + "/v1/chat/completions", json=body) as r:
        text = await r.text()
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    tokens = [c for c in chunks if c["choices"]]
    assert len(tokens) == 4 and tokens[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] == 4


async def test_router_relays_the_fake_like_an_engine(backend, start_router, client):
    _, url = backend
    _, router_url = await start_router(instances=[url])
    async with client.post(router_url + "/v1/completions",
                           json={"model": "fake", "prompt": "x", "max_tokens": 2, "stream": True}) as r:
        assert r.status == 200
        text = await r.text()
    assert text.rstrip().endswith("data: [DONE]")
