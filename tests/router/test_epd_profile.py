"""The live EPD profiler (router/server/epd_profile.py) against fake engines: it measures,
picks by probe goodput, routes image requests by its pick, re-picks per traffic window, and
never counts its own probes as traffic. The real-engine path is in test_epd_engines.py."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image
from router_fakes import FakeEncoder, FakeEngine, metric_total, wait_for

from router.policies.epd import (
    EPDController,
    EPDProfiler,
    StageCosts,
    WorkloadSummary,
    feasible_search,
    max_feasible,
)
from router.policies.epd_live import (
    Calibration,
    Measured,
    TrafficWindow,
    deployment_configs,
    fitted_costs,
)
from router.server.epd_profile import (
    PROBE_TARGET,
    EPDAutoStrategy,
    EPDSettings,
    ProbeLevel,
    drive_search,
    probe_ladder,
    probe_png,
)
from router.server.profiler import probe_completion

ASYNC = pytest.mark.asyncio(loop_scope="session")
ADMIN = {"Authorization": "Bearer admin"}
IMAGE = "data:image/png;base64,iVBORw0KGgo="


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": IMAGE}},
        {"type": "text", "text": "What is in the image?"}]}], **extra}


def test_probe_png_is_a_real_png_of_the_asked_size() -> None:
    image = Image.open(io.BytesIO(probe_png(64, seed=3)))
    assert image.size == (64, 64) and image.mode == "RGB"
    assert image.getpixel((32, 16)) == (128, 64, 51)  # (x, y, x + y + seed) scaled as written


def test_a_live_deployment_runs_aggregated_or_through_its_encoders() -> None:
    assert deployment_configs(0, 0) == ()
    assert [c.label for c in deployment_configs(0, 2)] == ["none EPD2"]
    none, apart = deployment_configs(1, 3)
    assert (none.label, apart.label) == ("none EPD3", "E-PD E1:PD3")
    assert apart.encodes_apart and not none.encodes_apart
    # Under a PD policy, 1 of 3 language-model instances only decoding: EP-D or E-P-D.
    kept, apart = deployment_configs(1, 3, decoders=1)
    assert (kept.label, apart.label) == ("EP-D EP2:D1", "E-P-D E1:P2:D1")
    assert apart.encodes_apart and not kept.encodes_apart
    assert [c.label for c in deployment_configs(0, 2, decoders=1)] == ["EP-D EP1:D1"]
    assert [c.label for c in deployment_configs(1, 2, decoders=2)] == [
        "none EPD2", "E-PD E1:PD2"]  # no prefill instance left: one pool


def test_traffic_window_is_due_once_per_window_of_new_requests() -> None:
    window = TrafficWindow(3)
    for k in range(2):
        window.add(float(k), 10, 100, 1, 20)
    assert not window.due
    window.add(2.0, 40, 0, 0, 20)
    assert window.due
    summary = window.take()
    assert summary.rate == pytest.approx(1.0) and summary.text_tokens == 20
    assert not window.due
    with pytest.raises(ValueError):
        TrafficWindow(1)


def test_fitted_costs_recover_the_timings_they_were_fitted_to() -> None:
    """Encode: 30 ms per batch + 12 ms per image of the probe's 5 tokens; a step: 8 ms +
    0.05 ms per prefill token + 1 ms per decode sequence (context is not profiled)."""
    measured = Measured("e", "pd", tokens_per_image=5, text_tokens=7, encode_batch=4,
                        token_budget=512,
                        encode_samples=[(b, 0.030 + 0.012 * b) for b in (1, 2, 4, 8)],
                        step_samples=[(t, 0, 0.008 + 5e-5 * t) for t in (16, 256, 512)]
                        + [(0, n, 0.008 + 0.001 * n) for n in (1, 4)])
    costs = fitted_costs(measured)
    assert costs.encode_overhead_s == pytest.approx(0.030)
    assert costs.encode_s(3, 5) == pytest.approx(0.036)
    assert costs.encode_s(3, 10) == pytest.approx(0.072)  # twice the tokens per image
    assert costs.step_s(100, 2, 9999) == pytest.approx(0.008 + 0.005 + 0.002)
    noisy = Measured("e", "pd", 5, 7, 1, 16, encode_samples=[(1, 0.05), (2, 0.04)],
                     step_samples=measured.step_samples)
    assert fitted_costs(noisy).encode_s(4, 5) == 0.0  # a negative slope clamps to zero


def test_re_picks_keep_what_the_probe_measured() -> None:
    """Encoding dominates the analytic model (50 ms per image), so it favours E-PD; the probe
    measured aggregated well ahead (what a hop and the connector cost is not in the model).
    A re-pick on shifted traffic with the calibrated estimates keeps none; with the raw
    estimates it would switch (what ran live before calibration: auto at 0.51x)."""
    costs = StageCosts(encode_s=lambda images, tokens: 0.05 * images,
                       step_s=lambda prefill, seqs, ctx: 0.005 + 1e-5 * prefill + 1e-3 * seqs)
    configs = deployment_configs(1, 1)

    def controller() -> EPDController:
        return EPDController(EPDProfiler(costs, slo_ttft_s=1.0, slo_tpot_s=0.1, instances=1,
                                         configs=configs))

    probe = WorkloadSummary(rate=8.0, image_tokens=5, images=1, text_tokens=7,
                            output_tokens=16)
    shifted = WorkloadSummary(rate=16.0, image_tokens=5, images=1, text_tokens=7,
                              output_tokens=40)
    measured = {"none EPD1": 10.0, "E-PD E1:PD1": 6.0}
    calibrated, calibration = controller(), Calibration()
    assert calibrated.update(probe, calibration.measured(measured)).config.strategy == "none"
    assert set(calibration.factors) == set(measured)
    raw = controller()
    raw.update(probe, Calibration().measured(measured))
    assert raw.update(shifted, lambda _, estimate: estimate).config.strategy == "E-PD"
    assert calibrated.update(shifted, calibration).config.strategy == "none"
    assert calibrated.history[-1][0] == "stay"


@ASYNC
async def test_the_async_search_asks_the_same_questions_as_the_sync_one() -> None:
    asked: list[int] = []

    async def fits(x: int) -> bool:
        asked.append(x)
        return x <= 37

    assert await drive_search(feasible_search(1, 100), fits) == 37
    again: list[int] = []
    assert max_feasible(lambda x: again.append(x) or x <= 37, 1, 100) == 37
    assert asked == again and len(asked) <= 8
    assert await drive_search(feasible_search(5, 9), fits) == 9


async def _profiled(start_router, client, encoder: FakeEncoder, pd: FakeEngine,
                    window: int = 4) -> tuple[Any, str, dict[str, Any]]:
    router, url = await start_router(
        instances=[f"{encoder.url};id=e;role=encode", f"{pd.url};id=pd"], policy="least_load",
        admin_token="admin", epd_profile=True, slo_ttft_ms=300, slo_tpot_ms=100,
        epd_probe_requests=4, epd_window=window)
    await wait_for(lambda: router.epd.models.get("tiny") is not None
                   and router.epd.models["tiny"].status in ("ready", "failed"), 30, "profile")
    async with client.get(url + "/admin/epd", headers=ADMIN) as r:
        assert r.status == 200
        state = (await r.json())["models"]["tiny"]
    return router, url, state


def test_the_probe_ladder_doubles_from_the_first_level_to_the_cap() -> None:
    assert probe_ladder(2, 16) == [2, 4, 8, 16]
    assert probe_ladder(3, 16) == [3, 6, 12, 16]
    assert probe_ladder(4, 4) == [4]


@pytest.mark.parametrize("levels,expected,asked", [
    # Goodput grows with load until a level misses the target: the best level that met it.
    ({2: (5.0, 1.0), 4: (9.0, 0.95), 8: (12.0, 0.5)}, (4, 9.0, 0.95), [2, 4, 8]),
    # Even the first level misses: its measurement is all there is.
    ({2: (1.0, 0.25)}, (2, 1.0, 0.25), [2]),
    # Every level meets it: the best, not the last.
    ({2: (5.0, 1.0), 4: (8.0, 1.0), 8: (7.5, 1.0), 16: (7.0, PROBE_TARGET)}, (4, 8.0, 1.0),
     [2, 4, 8, 16]),
])
@ASYNC
async def test_probe_goodput_is_the_best_level_of_the_ladder_within_the_slos(
        levels: dict[int, tuple[float, float]], expected: tuple[int, float, float],
        asked: list[int]) -> None:
    """At one concurrency the probe sees one load: on two CPU cores E-P-D won at 2 in flight
    and lost at saturation. The ladder stops at the first level under the target."""
    strategy = EPDAutoStrategy(EPDSettings(enabled=True, slo_ttft_s=1.0, slo_tpot_s=0.1,
                                           probe_requests=8), load=None, metrics=None,
                               session=lambda: None, front_url=lambda: None,
                               upstream_headers={}, client_headers={})
    seen: list[tuple[int, int]] = []

    async def level(model: str, config: Any, concurrency: int, requests: int) -> ProbeLevel:
        seen.append((concurrency, requests))
        return ProbeLevel(concurrency, *levels[concurrency])

    strategy._probe_level = level  # type: ignore[method-assign]
    assert await strategy._probe_workload("tiny", None) == expected
    assert seen == [(c, max(8, 2 * c)) for c in asked]


@ASYNC
async def test_a_slow_encoder_is_bypassed_and_images_stay_with_the_language_model(
        start_router, client):
    """E takes 0.5 s per request against a 300 ms TTFT SLO: on the probe E-PD meets no
    request, aggregated meets all, so the profiler picks none and image requests skip E."""
    encoder = await FakeEncoder(delay_s=0.5).start()
    pd = await FakeEngine("pd").start()
    try:
        router, url, state = await _profiled(start_router, client, encoder, pd)
        assert state["status"] == "ready", state["error"]
        measured = state["measured"]
        assert measured["encoder"] == "e" and measured["generator"] == "pd"
        assert measured["encode_batch"] == 1  # 0.5 s > a quarter of the TTFT SLO
        assert measured["token_budget"] >= 16 and len(measured["step_samples"]) >= 4
        assert measured["probe_attainment"] == {"none EPD1": 1.0, "E-PD E1:PD1": 0.0}
        assert state["strategy"] == "none" and state["history"] == [["pick", "none EPD1"]]
        assert set(state["compared"]) == {"none EPD1", "E-PD E1:PD1"}
        encodes = len(encoder.requests)
        async with client.post(url + "/v1/chat/completions", json=_chat()) as r:
            assert r.status == 200 and "x-xllm-epd" not in r.headers
        assert len(encoder.requests) == encodes  # bypassed
        # A client may still force E, and a strategy the live router cannot run (ED-P: E and D
        # share an instance) is a 400 in OpenAI's shape.
        forced = {"x-xllm-epd-strategy": "E-PD"}
        async with client.post(url + "/v1/chat/completions", json=_chat(), headers=forced) as r:
            assert r.status == 200 and r.headers["x-xllm-epd"] == "loaded"
        async with client.post(url + "/v1/chat/completions", json=_chat(),
                               headers={"x-xllm-epd-strategy": "ED-P"}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["param"] == "x-xllm-epd-strategy"
        metrics = (await (await client.get(url + "/metrics")).read()).decode()
        assert metric_total(metrics, "xllm_router_epd_strategy", model="tiny",
                            strategy="none") == 1
        assert metric_total(metrics, "xllm_router_epd_picks_total", model="tiny",
                            event="pick") == 1
    finally:
        await encoder.stop()
        await pd.stop()


@ASYNC
async def test_client_traffic_windows_trigger_re_picks_and_probes_do_not_count(
        start_router, client):
    encoder = await FakeEncoder().start()
    pd = await FakeEngine("pd").start()
    try:
        router, url, state = await _profiled(start_router, client, encoder, pd, window=3)
        assert state["status"] == "ready", state["error"]
        # Every probe chat (2 strategies x the ladder's levels) went through the front
        # door: none of them counted.
        assert len(state["history"]) == 1
        for k in range(3):
            async with client.post(url + "/v1/chat/completions", json=_chat()) as r:
                assert r.status == 200
            history = router.epd.models["tiny"].controller.history
            assert len(history) == (1 if k < 2 else 2)
        assert history[-1][0] in ("keep", "stay", "switch")
        metrics = (await (await client.get(url + "/metrics")).read()).decode()
        assert metric_total(metrics, "xllm_router_epd_picks_total", model="tiny",
                            event=history[-1][0]) == 1
        # On demand, waiting for the answer: a fresh profile, a fresh history.
        async with client.post(url + "/admin/epd/profile", headers=ADMIN,
                               json={"model": "tiny", "wait": True}) as r:
            assert r.status == 200
            again = await r.json()
        assert again["status"] == "ready" and [e for e, _ in again["history"]] == ["pick"]
        async with client.post(url + "/admin/epd/profile", headers=ADMIN,
                               json={"model": "nope"}) as r:
            assert r.status == 404
    finally:
        await encoder.stop()
        await pd.stop()


@ASYNC
async def test_profile_on_demand_is_refused_when_the_profiler_is_off(start_router, client):
    pd = await FakeEngine("pd").start()
    try:
        router, url = await start_router(instances=[f"{pd.url};id=pd"], admin_token="admin")
        async with client.post(url + "/admin/epd/profile", headers=ADMIN,
                               json={"model": "tiny"}) as r:
            assert r.status == 409 and (await r.json())["error"]["code"] == "epd_profile_disabled"
        async with client.get(url + "/admin/epd", headers=ADMIN) as r:
            assert (await r.json()) == {"enabled": False, "models": {}}
    finally:
        await pd.stop()


@ASYNC
async def test_a_probe_counts_tokens_not_chunks_when_the_server_coalesces_them() -> None:
    """An API server behind its engine sends several tokens in one chunk; TPOT is the time
    after the first chunk over the tokens that came after it, and one chunk times nothing."""
    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        # 1 token, then 0.2 s later 3 tokens in one chunk (the middle one decodes to no
        # text), or, for the 4-token prompt, all 4 tokens in one chunk.
        chunks = [[7, 8, 9, 10]] if len(body["prompt"]) == 4 else [[7], [8, 9, 10]]
        for k, ids in enumerate(chunks):
            if k:
                await asyncio.sleep(0.2)
            event = {"choices": [{"index": 0, "text": "" if k else "a", "token_ids": ids}]}
            await stream.write(f"data: {json.dumps(event)}\n\n".encode())
        await stream.write(b"data: [DONE]\n\n")
        return stream

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        url = str(server.make_url("")).rstrip("/")
        spread = await probe_completion(session, url, "m", [1, 2, 3], 4, {})
        lumped = await probe_completion(session, url, "m", [1, 2, 3, 4], 4, {})
    assert spread is not None and lumped is not None
    assert spread.output_tokens == 4 and spread.tpot_ms is not None
    assert 0.2 * 1000 / 3 <= spread.tpot_ms < 0.4 * 1000 / 3  # 0.2 s over three tokens
    assert lumped.output_tokens == 4 and lumped.tpot_ms is None
