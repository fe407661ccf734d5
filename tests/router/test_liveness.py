"""Liveness probes of silent streams (issue 7, detection): a dead instance's streams move
after a few TPOTs plus one probe timeout, a merely slow one keeps them.

Fakes stand in for engines here: ``freeze_mid_stream_after`` with a late ``/health`` is a
killed process whose sockets are still open; the real kill is benchmarks/chaos.py.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from aiohttp import web

from router.server.liveness import (MIN_PROBE_AFTER_S, LivenessProber,
                                    LongestPause, ProbeResult, Silence, engine_progress,
                                    probe_after_s, probe_timeout_s, read_or_probe)
from router_fakes import fake_next_token, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPT = "alive?"


async def test_probe_after_is_a_multiple_of_the_median_tpot_with_a_floor() -> None:
    assert probe_after_s([10.0, 30.0, 20.0], 4.0) == pytest.approx(0.08)
    assert probe_after_s([1.0, 2.0], 4.0) == MIN_PROBE_AFTER_S
    assert probe_after_s([], 4.0) is None  # no TPOT yet: nothing to compare a silence with
    assert probe_after_s([20.0], 0.0) is None  # probing off


async def test_probe_timeout_outlasts_the_longest_pause_the_instance_came_back_from() -> None:
    pauses = LongestPause(half_life_s=100.0)
    assert probe_timeout_s(pauses.value(0.0), 0.25) == 0.25  # nothing seen yet: the floor
    pauses.observe(0.01, now=0.0)
    assert probe_timeout_s(pauses.value(0.0), 0.25) == 0.25  # a fast host: the floor
    pauses.observe(0.6, now=10.0)  # a starved host's stall, survived
    pauses.observe(0.2, now=11.0)  # shorter pauses do not lower it
    assert probe_timeout_s(pauses.value(10.0), 0.25) == pytest.approx(1.2)
    assert pauses.value(110.0) == pytest.approx(0.3)  # one half-life later
    assert probe_timeout_s(pauses.value(1e6), 0.25) == 0.25  # long forgotten


def _result(alive: bool) -> ProbeResult:
    return ProbeResult(alive, "answered 200" if alive else "/health did not answer", 0.01,
                       time.monotonic())


async def _never() -> bytes:
    await asyncio.sleep(3600)
    return b""


def _probe_answering(alive: bool, delay_s: float = 0.0, calls: list[float] | None = None):
    async def answer() -> ProbeResult:
        await asyncio.sleep(delay_s)
        return _result(alive)

    def probe() -> asyncio.Task[ProbeResult]:
        if calls is not None:
            calls.append(time.monotonic())
        return asyncio.ensure_future(answer())
    return probe


async def test_a_failed_probe_ends_the_wait_long_before_the_silence_limit() -> None:
    began = time.monotonic()
    with pytest.raises(Silence) as caught:
        await read_or_probe(_never, silence_s=30.0, stall=False, probe_after=0.05,
                            probe=_probe_answering(False, delay_s=0.05))
    assert caught.value.kind == "dead" and "did not answer" in caught.value.detail
    assert time.monotonic() - began < 1.0


async def test_a_live_instance_is_probed_again_and_waited_for_until_the_limit() -> None:
    calls: list[float] = []
    with pytest.raises(Silence) as caught:
        await read_or_probe(_never, silence_s=0.5, stall=True, probe_after=0.1,
                            probe=_probe_answering(True, calls=calls))
    assert caught.value.kind == "stall" and "0.5s" in caught.value.detail
    assert 3 <= len(calls) <= 5  # one probe per 0.1 s of silence


async def test_a_chunk_that_arrives_during_the_probe_wins() -> None:
    async def late_chunk() -> bytes:
        await asyncio.sleep(0.15)
        return b"data: {}\n\n"

    got = await read_or_probe(late_chunk, silence_s=5.0, stall=False, probe_after=0.05,
                              probe=_probe_answering(False, delay_s=1.0))
    assert got == b"data: {}\n\n"


async def test_an_engine_that_answers_but_computes_nothing_is_stuck() -> None:
    answers = iter([5.0, 5.0, 5.0, 5.0, 5.0, 5.0])

    def probe() -> asyncio.Task[ProbeResult]:
        async def answer() -> ProbeResult:
            return ProbeResult(True, "answered 200", 0.01, time.monotonic(), next(answers))
        return asyncio.ensure_future(answer())

    with pytest.raises(Silence) as caught:
        await read_or_probe(_never, silence_s=30.0, stall=False, probe_after=0.05, probe=probe,
                            stuck_after=0.15)
    assert caught.value.kind == "stuck" and "computed no token" in caught.value.detail


async def test_moving_counters_or_none_keep_the_wait_going() -> None:
    counters = iter(range(100))

    def probe_with(progress) -> object:
        def probe() -> asyncio.Task[ProbeResult]:
            async def answer() -> ProbeResult:
                return ProbeResult(True, "answered 200", 0.01, time.monotonic(), progress())
            return asyncio.ensure_future(answer())
        return probe

    for progress in (lambda: float(next(counters)), lambda: None):
        with pytest.raises(Silence) as caught:
            await read_or_probe(_never, silence_s=0.4, stall=True, probe_after=0.05,
                                probe=probe_with(progress), stuck_after=0.1)
        assert caught.value.kind == "stall"  # waited to the limit: not stuck


async def test_engine_progress_sums_vllm_token_counters() -> None:
    text = ('# HELP vllm:prompt_tokens_total x\n'
            'vllm:prompt_tokens_total{model_name="m"} 120.0\n'
            'vllm:generation_tokens_total{model_name="m"} 30.0\n'
            'vllm:generation_tokens_created{model_name="m"} 1.7e9\n'
            'vllm:num_requests_running{model_name="m"} 2.0\n')
    assert engine_progress(text) == 150.0
    assert engine_progress('vllm:num_requests_running{model_name="m"} 2.0\n') is None


async def test_without_probing_a_silence_is_the_plain_timeout() -> None:
    calls: list[float] = []
    with pytest.raises(Silence) as caught:
        await read_or_probe(_never, silence_s=0.2, stall=False, probe_after=None,
                            probe=_probe_answering(False, calls=calls))
    assert caught.value.kind == "idle" and calls == []


async def _health_server(handler) -> tuple[web.AppRunner, str, list[float]]:
    hits: list[float] = []

    async def health(request: web.Request) -> web.StreamResponse:
        hits.append(time.monotonic())
        return await handler(request)

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}", hits


@pytest.mark.parametrize(("case", "alive", "detail"), [
    ("ok", True, "answered 200"),
    ("late", False, "did not answer within 0.20s"),
    ("unhealthy", False, "/health answered 503"),
])
async def test_prober_reads_health_and_shares_one_probe_per_instance(case, alive, detail):
    async def handler(request: web.Request) -> web.Response:
        if case == "late":
            await asyncio.sleep(2)
        return web.Response(status=503 if case == "unhealthy" else 200)

    runner, url, hits = await _health_server(handler)
    seen: list[tuple[str, bool]] = []
    try:
        async with aiohttp.ClientSession() as session:
            prober = LivenessProber(lambda: session, {},
                                    lambda iid, r: seen.append((iid, r.alive)))
            first, second = prober.probe("a", url, 0.2), prober.probe("a", url, 0.2)
            assert first is second  # streams silenced together wait on one request
            result = await first
    finally:
        await runner.cleanup()
    assert result.alive is alive and detail in result.detail
    assert len(hits) == 1 and seen == [("a", alive)]


async def test_prober_reports_a_refused_connection_as_dead() -> None:
    runner, url, _ = await _health_server(lambda request: web.Response())
    await runner.cleanup()  # nothing listens there any more
    async with aiohttp.ClientSession() as session:
        result = await LivenessProber(lambda: session, {}).probe("a", url, 0.5)
    assert not result.alive and "/health failed" in result.detail


# -- through the router ------------------------------------------------------------------------


def _expected(n: int) -> str:
    sequence = [ord(c) for c in PROMPT]
    for _ in range(n):
        sequence.append(fake_next_token(sequence))
    return "".join(f"<{t}>" for t in sequence[len(PROMPT):])


async def _stream(client: aiohttp.ClientSession, url: str, max_tokens: int) -> tuple[str, str]:
    async with asyncio.timeout(20), client.post(url + "/v1/completions", json={
            "model": "tiny", "prompt": PROMPT, "stream": True, "max_tokens": max_tokens}) as r:
        assert r.status == 200
        return r.headers["x-xllm-instance"], await r.text()


def _text(body: str) -> str:
    return "".join(json.loads(line[6:])["choices"][0]["text"] for line in body.splitlines()
                   if line.startswith("data: ") and line != "data: [DONE]"
                   and json.loads(line[6:]).get("choices"))


async def _router_on_a(fakes, start_router, client, **settings):
    """A router over two sequence-model fakes that has seen a's TPOT, with a preferred."""
    a, b = fakes
    for fake in fakes:
        fake.behaviour.sequence_model = True
        fake.behaviour.token_delay_s = 0.01
    router, url = await start_router(instances=[f"{a.url};id=a", f"{b.url};id=b"],
                                     policy="least_load", idle_timeout_s=30,
                                     liveness_probe_timeout_s=0.2, **settings)
    await wait_for(lambda: all(i.healthy for i in router.load.instances.values()), 10,
                   "both fakes healthy")
    b.behaviour.running = 5  # least-load sends the streams to a
    served, _ = await _stream(client, url, 8)  # teaches the router a's TPOT
    assert served == "a" and router.load.instances["a"].tpot_ms
    return router, url


async def test_stream_on_a_frozen_instance_moves_after_one_failed_probe(fakes, start_router,
                                                                        client):
    a, b = fakes
    router, url = await _router_on_a(fakes, start_router, client)
    a.behaviour.freeze_mid_stream_after, a.behaviour.health_delay_s = 3, 5.0
    began = time.monotonic()
    served, text = await _stream(client, url, 12)
    took = time.monotonic() - began
    assert served == "a" and _text(text) == _expected(12) and '"error"' not in text
    # 30 s of idle timeout, moved within a few TPOTs plus the 0.2 s probe timeout.
    assert took < 2.0, took
    assert router.metrics.migrations.labels("dead", "resumed")._value.get() == 1
    assert router.metrics.liveness_probes.labels("a", "dead")._value.get() >= 1
    resumed = [r for r in b.requests if isinstance(r.get("prompt"), list)]
    assert len(resumed) == 1 and resumed[0]["max_tokens"] == 9


async def test_a_frozen_instance_back_again_is_probed_as_briefly_as_before(
        fakes, start_router, client):
    """The scrapes that timed out while a was frozen are not pauses it came back from: once
    it serves again (a restart), a second freeze is still found within the probe's floor.
    They used to count as 2 s pauses the moment they timed out (its streams had just
    progressed, so "busy"), and the next freeze went unnoticed for 2x that."""
    a, _ = fakes
    router, url = await _router_on_a(fakes, start_router, client)
    a.behaviour.freeze_mid_stream_after, a.behaviour.health_delay_s = 3, 5.0
    served, text = await _stream(client, url, 12)
    assert served == "a" and _text(text) == _expected(12)
    await asyncio.sleep(2.5)  # a's scrapes time out (2 s) with its stream's progress recent
    assert router.load.instances["a"].busy_scrapes >= 1
    a.behaviour.freeze_mid_stream_after, a.behaviour.health_delay_s = None, 0.0
    await wait_for(lambda: router.load.instances["a"].healthy, 10, "a back in rotation")
    assert router.load.instances["a"].pauses.value(time.monotonic()) < 1.0  # was 2.0


async def test_stream_on_a_slow_but_live_instance_stays(fakes, start_router, client):
    a, _ = fakes
    router, url = await _router_on_a(fakes, start_router, client)
    a.behaviour.token_delay_s = 0.3  # silences of 30 TPOTs, /health answers at once
    served, text = await _stream(client, url, 6)
    assert served == "a" and _text(text) == _expected(6)
    assert router.metrics.liveness_probes.labels("a", "alive")._value.get() >= 3
    assert router.metrics.liveness_probes.labels("a", "dead")._value.get() == 0
    for reason in ("dead", "idle", "stall"):
        assert router.metrics.migrations.labels(reason, "resumed")._value.get() == 0
    # /health answered within every silence: the engine was computing, which a probe does
    # not wait for, so the probe timeout stays at its floor.
    assert router.load.instances["a"].pauses.seconds < 0.25


def test_pauses_count_unbroken_silences_and_answers_after_a_timeout() -> None:
    from router.discovery.records import InstanceRecord
    from router.server.instance_state import InstanceHealth
    from router.server.load_view import InstanceLoad

    load = InstanceLoad(InstanceRecord("a", "http://127.0.0.1:1"), InstanceHealth("a", None))
    load.health_answered_at = 10.5
    load.observe_silence(10.0, 11.8)  # /health answered at 10.5: a long step, not a stall
    assert load.pauses.seconds == 0.0
    load.observe_silence(12.0, 13.2)  # nothing answered: the host itself may have stalled
    assert load.pauses.seconds == pytest.approx(1.2)
    load.health_answered_at = 14.0  # an answer that came with the first chunk counts
    load.observe_silence(13.2, 14.0)
    assert load.pauses.seconds == pytest.approx(1.2)
    load.unanswered_since = 20.0  # a scrape that timed out, forgiven as busy, began then
    load.health_answered(22.5)  # it came back: a 2.5 s pause
    assert load.pauses.seconds == pytest.approx(2.5) and load.unanswered_since is None


async def test_a_host_that_answers_health_late_is_not_taken_for_dead(fakes, start_router,
                                                                     client):
    """/health takes 0.4 s on this instance (a starved host), twice the probe's floor: the
    probes wait longer than its scrapes' pauses, so pauses in its stream move nothing."""
    a, _ = fakes
    a.behaviour.health_delay_s = 0.4
    router, url = await _router_on_a(fakes, start_router, client)
    await wait_for(lambda: router.load.instances["a"].pauses.seconds >= 0.4, 10,
                   "scrapes timed a's /health")
    a.behaviour.token_delay_s = 0.6
    served, text = await _stream(client, url, 4)
    assert served == "a" and _text(text) == _expected(4)
    assert router.metrics.liveness_probes.labels("a", "alive")._value.get() >= 1
    assert router.metrics.liveness_probes.labels("a", "dead")._value.get() == 0


async def test_stream_on_a_hung_engine_behind_a_live_server_moves(fakes, start_router, client):
    """The stream stops but /health answers at once (a hung engine core): the token counter
    in /metrics stands still, and after --liveness-stuck-s the stream moves ("stuck")."""
    a, b = fakes
    router, url = await _router_on_a(fakes, start_router, client, liveness_stuck_s=1.0)
    a.behaviour.freeze_mid_stream_after = 3
    began = time.monotonic()
    served, text = await _stream(client, url, 12)
    took = time.monotonic() - began
    assert served == "a" and _text(text) == _expected(12) and '"error"' not in text
    assert 1.0 <= took < 30.0  # 30 s: the idle timeout it would have waited for
    assert router.metrics.migrations.labels("stuck", "resumed")._value.get() == 1
    assert router.metrics.liveness_probes.labels("a", "dead")._value.get() == 0


def test_the_stuck_time_is_a_validated_flag() -> None:
    from router.cli import build_serve_parser
    from router.config import ConfigError, RouterConfig

    args = build_serve_parser().parse_args(["--liveness-stuck-s", "3"])
    assert args.liveness_stuck_s == 3.0
    instances = ["http://127.0.0.1:9"]
    assert RouterConfig.from_args({"instances": instances}).liveness_stuck_s == 10.0
    with pytest.raises(ConfigError, match="--liveness-stuck-s"):
        RouterConfig.from_args({"instances": instances, "liveness_stuck_s": 0})
