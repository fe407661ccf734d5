"""Kill -9 (or freeze) one of two real vLLM engines while 12 greedy requests run through
the router.

Every request (streamed, and every fifth one non-streamed) must complete, and its
token ids and text must equal the uninterrupted run of the same requests. A killed
engine's connections break when its exit ends; a frozen one (SIGSTOP to all its processes)
keeps them open, and the router's liveness probe finds it; a hung engine core (SIGSTOP to
the EngineCore and its worker only) leaves the HTTP server answering /health, and the probe
finds its token counters standing still. Run under ``flock /tmp/xllm-vllm.lock`` (two
cores, shared).
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from router.server.migration import StreamLedger

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

STREAMS = 12
# A round whose fault came too late (nothing left to move) or never (no engine held both kinds
# of long request mid-way) is run again, this often in all.
ROUNDS = 3
MAX_TOKENS = 96
# The requests a fault may strike (every non-streamed one, four streamed ones) run this long:
# an engine that had computed every token before its fault moves nothing, and what the router
# has received can trail the engine by hundreds of tokens (see ROUNDS).
LONG_MAX_TOKENS = 640
KILL_AFTER_TOKENS = 8  # an engine dies once one of its streams has this many tokens


@pytest.fixture(scope="module")
def two_engines() -> Iterator[list[Any]]:
    """Two stock tiny-model engines of their own (one gets killed), float32 so that a
    recomputed prefix gives the same greedy choices as step-by-step decoding."""
    from xllm_plugin.launcher.engine import EngineProcess, EngineSpec, free_port, start_engines
    from xllm_plugin.models import model_path

    engines = []
    for i in range(2):
        spec = EngineSpec(model=model_path("tiny"), port=free_port(), served_model_name="tiny",
                          plugin=False, cpu_bind=str(i), max_model_len=1024,
                          extra_args=["--dtype", "float32", "--enable-prefix-caching"])
        engines.append(EngineProcess(spec, log_path=Path(
            f"/tmp/xllm-migration-test-engine-{spec.port}.log")))
    try:
        start_engines(engines, timeout_s=240)
        yield engines
    finally:
        for engine in engines:
            engine.stop()


def _restarted(engine: Any) -> Any:
    """A new process for the spec of a stopped engine."""
    from xllm_plugin.launcher.engine import EngineProcess

    fresh = EngineProcess(engine.spec, log_path=engine.log_path)
    fresh.start(timeout_s=240)
    return fresh


def _streamed(i: int) -> bool:
    # Every fifth request is non-streamed (the router streams for it): indices 4, 9, 14, 19
    # alternate in parity, so round-robin places some on each engine.
    return i % 5 != 4


def _max_tokens(i: int) -> int:
    return LONG_MAX_TOKENS if not _streamed(i) or i < 4 else MAX_TOKENS


def _body(i: int) -> tuple[str, dict[str, Any]]:
    words = " ".join(f"w{(i * 7 + k) % 50}" for k in range(12 + i))
    common: dict[str, Any] = {"model": "tiny", "max_tokens": _max_tokens(i), "temperature": 0,
                              "ignore_eos": True, "return_token_ids": True}
    if _streamed(i):
        common.update(stream=True, stream_options={"include_usage": True})
    if i % 2:
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": words}],
                                        **common}
    return "/v1/completions", {"prompt": words, **common}


async def _run(client, url: str, i: int) -> dict[str, Any]:
    path, body = _body(i)
    ids: list[int] = []
    text: list[str] = []
    usage = None
    async with client.post(url + path, json=body) as r:
        assert r.status == 200, await r.text()
        served_by = r.headers["x-xllm-instance"]
        if not _streamed(i):
            answer = await r.json()
            choice = answer["choices"][0]
            return {"ids": choice["token_ids"], "usage": answer["usage"],
                    "text": choice.get("text") or choice["message"]["content"],
                    "served_by": served_by, "migrations": int(r.headers["x-xllm-migrations"])}
        async for line in r.content:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            for choice in event.get("choices", ()):
                ids.extend(choice.get("token_ids") or ())
                text.append(choice.get("text") or (choice.get("delta") or {}).get("content")
                            or "")
            usage = event.get("usage") or usage
    return {"ids": ids, "text": "".join(text), "usage": usage, "served_by": served_by}


def _hang_core(engine: Any) -> None:
    """Stop the engine's EngineCore and worker processes; its API server keeps running."""
    import psutil

    for child in psutil.Process(engine.process.pid).children(recursive=True):
        if child.name().startswith(("VLLM::EngineCore", "VLLM::Worker")):
            child.suspend()


async def _chaos_round(router: Any, url: str, client: Any, engines: dict[str, Any],
                       fault: str, monkeypatch: Any) -> tuple[str | None, list[dict[str, Any]]]:
    """Run every request once more and fault one engine mid-way; (victim or None, answers).

    The fault strikes the first engine found, as an event passes the router, with a long
    stream of KILL_AFTER_TOKENS and a long non-streamed request (which the router streams
    upstream) both mid-way; which engine holds which request is the router's choice. Checked
    per event, not by polling: the tiny model outruns the router's relay, and a poller that
    woke a few ms late found a whole engine's requests already finished.
    """
    def ready_to_kill(name: str) -> bool:
        live = [h for h in router.live_requests.on(name)
                if not h.ledger.finished and h.ledger.max_tokens == LONG_MAX_TOKENS]
        return (any(not h.ledger.collect and len(h.ledger.generated) >= KILL_AFTER_TOKENS
                    for h in live)
                and any(h.ledger.collect and h.ledger.generated for h in live))

    victims: list[str] = []
    relay_event = StreamLedger.event

    def event_then_strike(ledger: StreamLedger, payload: bytes) -> bytes:
        out = relay_event(ledger, payload)
        name = None if victims else next(filter(ready_to_kill, engines), None)
        if name is not None:
            if fault == "hang_core":
                _hang_core(engines[name])
            else:  # SIGKILL or SIGSTOP to the engine's whole process group
                engines[name].kill(signal.SIGSTOP if fault == "freeze" else signal.SIGKILL)
            victims.append(name)
        return out

    monkeypatch.setattr(StreamLedger, "event", event_then_strike)
    try:
        chaos = await asyncio.gather(*(_run(client, url, i) for i in range(STREAMS)))
    finally:
        monkeypatch.undo()
        for victim in victims:  # a frozen or hung one dies too; the next round gets a new one
            engines[victim].stop(grace_s=0)
            engines[victim] = _restarted(engines[victim])
    return (victims[0] if victims else None), chaos


@pytest.mark.parametrize("fault", ["hang_core", "freeze", "kill"])
async def test_kill_one_engine_mid_stream_every_stream_completes_identically(
        two_engines, start_router, client, fault, monkeypatch):
    from router_fakes import metric_total, wait_for

    engines = dict(zip(("e0", "e1"), two_engines))
    for _ in range(ROUNDS):
        # Patient health checks: on two shared cores the HTTP server of the engine that is
        # not faulted once left /health unanswered for 2.6 s (the learnt probe timeout was
        # 1.1 s), once failed two 2 s scrapes in a row, and once (AMD host, full suite, the
        # frozen engine's streams just moved onto it) left a 2.46 s probe unanswered; taken
        # for dead, it left the faulted engine's requests nowhere to go. Detection speed is
        # the chaos benchmark's subject, not this test's.
        router, url = await start_router(instances=[f"{e.url};id={name}"
                                                    for name, e in engines.items()],
                                         first_byte_timeout_s=120, idle_timeout_s=30,
                                         liveness_probe_timeout_s=4.0, scrape_timeout_s=10)
        await wait_for(lambda: all(i.healthy for i in router.load.instances.values()), 30,
                       "both engines healthy")
        # Every round: a new router learns its instances' TPOT from it, and without one it
        # probes no silent stream (router/server/liveness.py).
        reference = await asyncio.gather(*(_run(client, url, i) for i in range(STREAMS)))
        assert [len(r["ids"]) for r in reference] == [_max_tokens(i) for i in range(STREAMS)]
        try:
            victim, chaos = await _chaos_round(router, url, client, engines, fault,
                                               monkeypatch)
        finally:
            two_engines[:] = engines.values()  # the next case gets the restarted ones
        if victim is None:
            # No engine held both kinds mid-way as an event passed: CI (stop 27) once saw
            # this in the full suite, where the router relays far behind the engines. Nothing
            # was faulted, so every answer must equal the reference; run the round again.
            assert [r["ids"] for r in chaos] == [r["ids"] for r in reference]
            continue
        metrics = (await (await client.get(url + "/metrics")).read()).decode()
        if metric_total(metrics, "xllm_router_migrations_total") or any(
                r["ids"] != want["ids"] for r, want in zip(chaos, reference)):
            break
        # Nothing moved and every answer is whole: the victim had computed all its tokens
        # before the fault struck, though the router had received only 3-8 of them (640-token
        # requests, measured). Whether the rest waited in its HTTP server or in socket
        # buffers was not established.
    else:
        pytest.fail(f"in {ROUNDS} rounds the fault never struck an engine mid-way")
    on_victim = [r for r in chaos if r["served_by"] == victim]
    whole_on_victim = [r for i, r in enumerate(chaos)
                       if r["served_by"] == victim and not _streamed(i)]
    assert any(r["migrations"] >= 1 for r in whole_on_victim), "no non-streamed request moved"
    for i, (want, got) in enumerate(zip(reference, chaos)):
        assert got["ids"] == want["ids"], f"stream {i} (served by {got['served_by']})"
        assert got["text"] == want["text"], f"stream {i} text"
        assert got["usage"]["completion_tokens"] == _max_tokens(i)
        assert got["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
    resumed = metric_total(metrics, "xllm_router_migrations_total", outcome="resumed")
    assert resumed >= 1 and resumed <= len(on_victim)
    if fault == "freeze":  # no connection broke: a probe that went unanswered found it
        assert metric_total(metrics, "xllm_router_liveness_probes_total", outcome="dead") >= 1
    if fault == "hang_core":
        # No connection broke, so a detector found it. Which one depends on the host: on a
        # Xeon the API server answered /health and the still token counters found it
        # ("stuck"); on a slower AMD host under the full suite its /health went unanswered
        # for the learnt 2.8 s and the probe found it ("dead"). The stuck rule itself is
        # covered by tests/router/test_liveness.py.
        assert sum(metric_total(metrics, "xllm_router_migrations_total", reason=reason,
                                outcome="resumed") for reason in ("stuck", "dead")) >= 1
