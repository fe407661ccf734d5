"""E -> PD on real vLLM (CPU): an encode-only instance and a prefill/decode instance of the
tiny random PaliGemma (``tiny-mm``) share vLLM's ECExampleConnector storage; the router
sends image chat requests to E first and PD then loads E's encoder output.

Checked here: the answer through E -> PD equals the aggregated answer (PD encoding the
same image itself; greedy, float32); PD loaded the encoder output instead of running the
encoder (the connector's own "load" log line on PD, the stored file from E); a killed E
(here: a prompt longer than E's context, a real vLLM 400) and a killed E make the request
fall back to PD encoding it, with the same answer. Two engines for the module (E on core 1,
PD on core 0). Run under ``flock /tmp/xllm-vllm.lock`` (two cores,
shared).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ec_logs import ec_logging_config, encoder_loads
from router_fakes import wait_for

from router.server.epd import media_uuid
from xllm_plugin.models.tiny_mm import sample_image_url

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

MODEL = "tiny-mm"
MAX_TOKENS = 12
ENCODER_MAX_LEN = 128  # E rejects longer prompts (HTTP 400): a failure its health cannot see


@pytest.fixture(scope="module")
def epd_engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """E (``--mm-encoder-only``, ``ec_producer``) and PD (``ec_consumer``) on one storage
    path. Stock vLLM plus only the plugin's general entry point (its Pixtral import alias
    lets vLLM size SigLIP images without torchvision)."""
    from xllm_plugin.launcher.engine import (EngineProcess, EngineSpec, ec_engine_args, free_port,
                                             start_engines)
    from xllm_plugin.models import build_model

    model = build_model(MODEL)
    work = tmp_path_factory.mktemp("epd")
    storage = work / "ec-store"
    storage.mkdir()

    common = ["--dtype", "float32"]  # the same greedy tokens whichever side encodes
    specs = {
        "pd": EngineSpec(model=model, port=free_port(), served_model_name=MODEL, plugin=False,
                         cpu_bind="0", max_model_len=512,
                         extra_args=[*common, *ec_engine_args("ec_consumer", storage)],
                         env={"VLLM_PLUGINS": "xllm",
                              "VLLM_LOGGING_CONFIG_PATH": str(ec_logging_config(
                                  work / "logging.json"))}),
        "e": EngineSpec(model=model, port=free_port(), served_model_name=MODEL, plugin=False,
                        cpu_bind="1", max_model_len=ENCODER_MAX_LEN,
                        extra_args=[*common, "--mm-encoder-only",
                                    *ec_engine_args("ec_producer", storage)],
                        env={"VLLM_PLUGINS": "xllm"}),
    }
    engines = {name: EngineProcess(spec, log_path=Path(f"/tmp/xllm-epd-test-{name}.log"))
               for name, spec in specs.items()}
    try:
        start_engines(list(engines.values()), timeout_s=240)
        yield {**engines, "storage": storage}
    finally:
        for engine in engines.values():
            engine.stop()


def _body(url: str, text: str = "Describe the image.") -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": text}]}]}


async def _chat(client, url: str, body: dict[str, Any]) -> tuple[list[int], str, Any]:
    async with client.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
        choice = answer["choices"][0]
        return choice["token_ids"], choice["message"]["content"], r.headers


async def test_e_to_pd_equals_aggregated_and_pd_loads_the_encoder_output(
        epd_engines, start_router, client):
    e, pd, storage = epd_engines["e"], epd_engines["pd"], epd_engines["storage"]
    image = sample_image_url(1)
    key = media_uuid(MODEL, image)
    # Aggregated: PD alone, no media id, so it hashes the pixels and encodes them itself.
    want_ids, want_text, _ = await _chat(client, pd.url, _body(image))
    assert len(want_ids) == MAX_TOKENS
    assert encoder_loads(pd.log_path, key) == 0

    router, url = await start_router(instances=[f"{e.url};id=e;role=encode",
                                                f"{pd.url};id=pd"],
                                     first_byte_timeout_s=120)
    await wait_for(lambda: all(i.healthy for i in router.load.instances.values()), 30,
                   "both engines healthy")
    ids, text, headers = await _chat(client, url, _body(image))
    assert headers["x-xllm-epd"] == "loaded" and headers["x-xllm-encode-instance"] == "e"
    assert headers["x-xllm-instance"] == "pd"
    assert (ids, text) == (want_ids, want_text)
    # E stored the encoder output under the pinned id; PD loaded it (vLLM's own log line).
    assert (storage / key / "encoder_cache.safetensors").is_file()
    await wait_for(lambda: encoder_loads(pd.log_path, key) == 1, 10, "PD's load log line")
    metrics = (await (await client.get(url + "/metrics")).read()).decode()
    assert 'xllm_router_epd_encodes_total{instance="e",outcome="loaded"} 1.0' in metrics


async def test_an_encoder_error_falls_back_to_pd_encoding_with_the_same_answer(
        epd_engines, start_router, client):
    e, pd = epd_engines["e"], epd_engines["pd"]
    image, text = sample_image_url(2), "Describe the image in detail, please. " * 20
    want_ids, want_text, _ = await _chat(client, pd.url, _body(image, text))
    router, url = await start_router(instances=[f"{e.url};id=e;role=encode",
                                                f"{pd.url};id=pd"],
                                     first_byte_timeout_s=120)
    await wait_for(lambda: all(i.healthy for i in router.load.instances.values()), 30,
                   "both engines healthy")
    ids, text_out, headers = await _chat(client, url, _body(image, text))
    assert headers["x-xllm-epd"] == "fallback_http_400"  # longer than E's context
    assert headers["x-xllm-instance"] == "pd"
    assert (ids, text_out) == (want_ids, want_text)
    assert encoder_loads(pd.log_path, media_uuid(MODEL, image)) == 0  # PD encoded it itself
    assert router.load.instances["e"].healthy  # an answered error is not an outage


async def test_the_live_profiler_measures_both_paths_and_routes_by_its_pick(
        epd_engines, start_router, client):
    """``--epd-profile`` on the real pair: the profiler's binary searches and probe workload
    run against vLLM, it picks the better measured path (ties to aggregated), and image
    requests then follow the pick with the same greedy answer as PD alone."""
    e, pd = epd_engines["e"], epd_engines["pd"]
    image = sample_image_url(4)
    want_ids, want_text, _ = await _chat(client, pd.url, _body(image))
    router, url = await start_router(
        instances=[f"{e.url};id=e;role=encode", f"{pd.url};id=pd"], first_byte_timeout_s=120,
        admin_token="admin", epd_profile=True, slo_ttft_ms=10000, slo_tpot_ms=2000,
        epd_probe_requests=4, epd_probe_max_concurrency=4)
    await wait_for(lambda: router.epd.models.get(MODEL) is not None
                   and router.epd.models[MODEL].status in ("ready", "failed"), 240,
                   "the EPD profile")
    state = router.epd.snapshot()[MODEL]
    assert state["status"] == "ready", state["error"]
    measured = state["measured"]
    # tiny-mm: 4 image tokens (a 28-pixel side in 14-pixel patches), plus what the chat
    # template adds around an image
    assert measured["tokens_per_image"] >= 4
    assert measured["encode_batch"] >= 1 and measured["token_budget"] >= 16
    assert measured["probe_attainment"] == {"none EPD1": 1.0, "E-PD E1:PD1": 1.0}
    assert set(measured["probe_concurrency"].values()) <= {2, 4}  # the ladder's levels
    goodput = measured["probe_goodput"]
    best = max(goodput, key=goodput.get)  # first of equals: "none EPD1"
    assert state["config"] == best and state["history"] == [["pick", best]]
    ids, text, headers = await _chat(client, url, _body(image))
    assert (headers.get("x-xllm-epd") == "loaded") == (state["strategy"] == "E-PD")
    assert (ids, text) == (want_ids, want_text)


async def test_a_killed_encoder_loses_no_request(epd_engines, start_router, client):
    """Last in the module: it kills E. Whether the router's health scrape or the encode
    stage sees it first, PD answers, and as it would alone."""
    e, pd = epd_engines["e"], epd_engines["pd"]
    image = sample_image_url(3)
    want_ids, want_text, _ = await _chat(client, pd.url, _body(image))
    router, url = await start_router(instances=[f"{e.url};id=e;role=encode",
                                                f"{pd.url};id=pd"],
                                     first_byte_timeout_s=120)
    await wait_for(lambda: all(i.healthy for i in router.load.instances.values()), 30,
                   "both engines healthy")
    e.kill()
    ids, text, headers = await _chat(client, url, _body(image))
    outcome = headers.get("x-xllm-epd")  # a reset or refused connection, or no encode stage
    assert outcome is None or outcome.startswith("fallback_"), outcome
    assert headers["x-xllm-instance"] == "pd"
    assert (ids, text) == (want_ids, want_text)
