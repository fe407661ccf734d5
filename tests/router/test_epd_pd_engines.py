"""EP -> D and E -> P -> D on real vLLM (CPU): P and D are ``tiny-mm`` instances with
NixlConnector (``kv_both``), E an encode-only instance sharing ECExampleConnector storage
with P (``ec_consumer``). The router's ``static_pd`` sends an image chat to P, which
prefills, and D decodes with P's KV (PaliGemma's image tokens open the prompt, so they lie
in the first KV block, which D loads). Without E in the router P runs the vision encoder
(EP -> D); with E, E encodes first and P loads its output (E -> P -> D).

Checked here: both answers equal the aggregated answer (P alone, greedy, float32), streamed
and not; D reports prompt tokens loaded over NIXL; on E -> P -> D, P logs the encoder output
load. Three engines for the module (E and D share core 0); run under ``flock
/tmp/xllm-vllm.lock`` (two cores, shared).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ROUTER_TEST_BLOCK_SIZE, free_port_in
from ec_logs import ec_logging_config, encoder_loads
from router_fakes import metric_total, wait_for

from router.server.epd import media_uuid
from xllm_plugin.models.tiny_mm import sample_image_url

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

MODEL = "tiny-mm"
MAX_TOKENS = 10
# Text after the image long enough that the prompt fills a KV block (what NIXL moves).
TEXT = "Describe the image, then list what you see: " + " ".join(
    f"item {n}" for n in range(80))


@pytest.fixture(scope="module")
def epd_engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from xllm_plugin.launcher.engine import (EngineProcess, EngineSpec, ec_engine_args,
                                             free_port, pd_engine_args, start_engines)
    from xllm_plugin.models import build_model

    model = build_model(MODEL)
    work = tmp_path_factory.mktemp("e-p-d")
    storage = work / "ec-store"
    storage.mkdir()
    common = dict(model=model, served_model_name=MODEL, plugin=False,
                  block_size=ROUTER_TEST_BLOCK_SIZE)
    p_args, p_env = pd_engine_args(free_port_in(5700, 5750))
    d_args, d_env = pd_engine_args(free_port_in(5750, 5800))
    specs = {
        "e": EngineSpec(**common, port=free_port(), cpu_bind="0", max_model_len=512,
                        extra_args=["--dtype", "float32", "--mm-encoder-only",
                                    *ec_engine_args("ec_producer", storage)],
                        env={"VLLM_PLUGINS": "xllm"}),
        "p": EngineSpec(**common, port=free_port(), cpu_bind="1", max_model_len=512,
                        extra_args=["--dtype", "float32", *p_args,
                                    *ec_engine_args("ec_consumer", storage)],
                        env={**p_env, "VLLM_PLUGINS": "xllm", "VLLM_LOGGING_CONFIG_PATH":
                             str(ec_logging_config(work / "logging.json"))}),
        "d": EngineSpec(**common, port=free_port(), cpu_bind="0", max_model_len=512,
                        extra_args=["--dtype", "float32", *d_args],
                        env={**d_env, "VLLM_PLUGINS": "xllm"}),
    }
    engines = {name: EngineProcess(spec, log_path=Path(f"/tmp/xllm-e-p-d-test-{name}.log"))
               for name, spec in specs.items()}
    try:
        start_engines(list(engines.values()), timeout_s=300)
        yield engines
    finally:
        for engine in engines.values():
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
        epd_engines, start_router, client):
    p, d = epd_engines["p"], epd_engines["d"]
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
        assert "x-xllm-epd" not in headers  # no encode instance: P encoded the image
        assert text == want, (seed, stream)
        loaded = await _external(client, d.url) - before
        assert loaded >= ROUTER_TEST_BLOCK_SIZE, f"D loaded {loaded} prompt tokens over NIXL"


async def test_e_to_p_to_d_equals_aggregated_and_each_stage_loads_the_last_ones_output(
        epd_engines, start_router, client):
    e, p, d = epd_engines["e"], epd_engines["p"], epd_engines["d"]
    router, url = await start_router(
        instances=[f"{e.url};id=e;role=encode", f"{p.url};id=p;role=prefill",
                   f"{d.url};id=d;role=decode"],
        policy="static_pd", first_byte_timeout_s=120)
    await wait_for(lambda: all(i.healthy for i in router.load.instances.values()), 30,
                   "three engines healthy")
    for seed, stream in ((3, False), (4, True)):
        image = sample_image_url(seed)
        key = media_uuid(MODEL, image)
        want, _ = await _answer(client, p.url, _body(image, stream=False))  # P alone
        assert encoder_loads(p.log_path, key) == 0  # no media id: P hashed and encoded
        before = await _external(client, d.url)
        text, headers = await _answer(client, url, _body(image, stream))
        assert (headers["x-xllm-epd"], headers["x-xllm-encode-instance"]) == ("loaded", "e")
        assert headers["x-xllm-pd"] == "handoff"
        assert (headers["x-xllm-prefill-instance"], headers["x-xllm-instance"]) == ("p", "d")
        assert text == want, (seed, stream)
        await wait_for(lambda: encoder_loads(p.log_path, key) == 1, 10, "P's load log line")
        loaded = await _external(client, d.url) - before
        assert loaded >= ROUTER_TEST_BLOCK_SIZE, f"D loaded {loaded} prompt tokens over NIXL"


async def test_the_live_profiler_names_and_measures_the_p_d_paths(
        epd_engines, start_router, client):
    """``--epd-profile`` under ``static_pd`` over P and D: the paths it measures through the
    front door are EP-D and E-P-D, and image requests follow its pick P -> D with the same
    answer as P alone."""
    e, p, d = epd_engines["e"], epd_engines["p"], epd_engines["d"]
    image = sample_image_url(5)
    want, _ = await _answer(client, p.url, _body(image, stream=False))
    router, url = await start_router(
        instances=[f"{e.url};id=e;role=encode", f"{p.url};id=p;role=prefill",
                   f"{d.url};id=d;role=decode"],
        policy="static_pd", first_byte_timeout_s=120, admin_token="admin", epd_profile=True,
        slo_ttft_ms=20000, slo_tpot_ms=2000, epd_probe_requests=4, epd_probe_max_concurrency=4)
    await wait_for(lambda: router.epd.models.get(MODEL) is not None
                   and router.epd.models[MODEL].status in ("ready", "failed"), 300,
                   "the EPD profile")
    state = router.epd.snapshot()[MODEL]
    assert state["status"] == "ready", state["error"]
    assert state["measured"]["probe_attainment"] == {"EP-D EP1:D1": 1.0, "E-P-D E1:P1:D1": 1.0}
    assert set(state["measured"]["probe_concurrency"].values()) <= {2, 4}
    goodput = state["measured"]["probe_goodput"]
    assert state["config"] == max(goodput, key=goodput.get)
    text, headers = await _answer(client, url, _body(image, stream=False))
    assert (headers.get("x-xllm-epd") == "loaded") == (state["strategy"] == "E-P-D")
    assert (headers["x-xllm-prefill-instance"], headers["x-xllm-instance"]) == ("p", "d")
    assert text == want
