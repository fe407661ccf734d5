"""EP -> D on real vLLM (CPU): two ``tiny-mm`` instances with NixlConnector (``kv_both``);
the router's ``static_pd`` sends an image chat to P, which runs the vision encoder and the
prefill, and D decodes with P's KV (PaliGemma's image tokens open the prompt, so they lie
in the first KV block, which D loads).

Checked here: the answer through P -> D equals the aggregated answer (P alone, greedy,
float32), streamed and not; D reports prompt tokens loaded over NIXL. Two engines for the
module; run under ``flock /tmp/xllm-vllm.lock`` (two cores, shared).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ROUTER_TEST_BLOCK_SIZE, free_port_in
from router_fakes import metric_total, wait_for

from xllm_plugin.models.tiny_mm import sample_image_url

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

MODEL = "tiny-mm"
MAX_TOKENS = 10
# Text after the image long enough that the prompt fills a KV block (what NIXL moves).
TEXT = "Describe the image, then list what you see: " + " ".join(
    f"item {n}" for n in range(80))


@pytest.fixture(scope="module")
def ep_d_engines() -> Iterator[list[Any]]:
    from xllm_plugin.launcher.engine import (EngineProcess, EngineSpec, free_port,
                                             pd_engine_args, start_engines)
    from xllm_plugin.models import build_model

    model = build_model(MODEL)
    engines = []
    for core, side_channel in ((0, free_port_in(5700, 5750)), (1, free_port_in(5750, 5800))):
        args, env = pd_engine_args(side_channel)
        spec = EngineSpec(model=model, port=free_port(), served_model_name=MODEL, plugin=False,
                          cpu_bind=str(core), max_model_len=512,
                          block_size=ROUTER_TEST_BLOCK_SIZE,
                          extra_args=["--dtype", "float32", *args],
                          env={**env, "VLLM_PLUGINS": "xllm"})
        engines.append(EngineProcess(spec, log_path=Path(f"/tmp/xllm-ep-d-test-{core}.log")))
    try:
        start_engines(engines, timeout_s=240)
        yield engines
    finally:
        for engine in engines:
            engine.stop()


def _body(image: str, stream: bool) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": stream, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image}},
                {"type": "text", "text": TEXT}]}]}


async def _answer(client: aiohttp.ClientSession, url: str, body: dict[str, Any]
                  ) -> tuple[str, dict[str, str]]:
    async with client.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        headers = dict(r.headers)
        if not body["stream"]:
            return (await r.json())["choices"][0]["message"]["content"], headers
        pieces = []
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:]).get("choices") or ():
                    pieces.append((choice.get("delta") or {}).get("content") or "")
        return "".join(pieces), headers


async def _external(client: aiohttp.ClientSession, url: str) -> float:
    async with client.get(url + "/metrics") as r:
        return metric_total(await r.text(), "vllm:prompt_tokens_by_source_total",
                            source="external_kv_transfer")


async def test_ep_to_d_equals_aggregated_and_d_loads_the_image_prompt_kv(
        ep_d_engines, start_router, client):
    p, d = ep_d_engines
    router, url = await start_router(
        instances=[f"{p.url};id=p;role=prefill", f"{d.url};id=d;role=decode"],
        policy="static_pd", first_byte_timeout_s=120)
    await wait_for(lambda: all(i.healthy for i in router.load.instances.values()), 30,
                   "both engines healthy")
    for seed, stream in ((1, False), (2, True)):
        image = sample_image_url(seed)
        want, _ = await _answer(client, p.url, _body(image, stream=False))  # P alone
        before = await _external(client, d.url)
        text, headers = await _answer(client, url, _body(image, stream))
        assert headers["x-xllm-pd"] == "handoff"
        assert (headers["x-xllm-prefill-instance"], headers["x-xllm-instance"]) == ("p", "d")
        assert text == want, (seed, stream)
        loaded = await _external(client, d.url) - before
        assert loaded >= ROUTER_TEST_BLOCK_SIZE, f"D loaded {loaded} prompt tokens over NIXL"
