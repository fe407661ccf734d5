"""Kill -9 (or freeze) one of two real vLLM engines while 20 greedy requests run through
the router.

Every request (streamed, and every fourth one non-streamed) must complete, and its
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

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

STREAMS = 20
MAX_TOKENS = 96
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
    return i % 4 != 3  # every fourth request is non-streamed (the router streams for it)


def _body(i: int) -> tuple[str, dict[str, Any]]:
    words = " ".join(f"w{(i * 7 + k) % 50}" for k in range(12 + i))
    common: dict[str, Any] = {"model": "tiny", "max_tokens": MAX_TOKENS, "temperature": 0,
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


@pytest.mark.parametrize("fault", ["hang_core", "freeze", "kill"])
async def test_kill_one_engine_mid_stream_every_stream_completes_identically(
        two_engines, start_router, client, fault):
    engines = dict(zip(("e0", "e1"), two_engines))
    router, url = await start_router(instances=[f"{e.url};id={name}"
                                                for name, e in engines.items()],
                                     first_byte_timeout_s=120, idle_timeout_s=30)
    from router_fakes import wait_for

    await wait_for(lambda: all(i.healthy for i in router.load.instances.values()), 30,
                   "both engines healthy")
    reference = await asyncio.gather(*(_run(client, url, i) for i in range(STREAMS)))
    assert all(len(r["ids"]) == MAX_TOKENS for r in reference)

    def ready_to_kill(name: str) -> bool:
        """On ``name``: a stream with KILL_AFTER_TOKENS and a non-streamed request (the router
        streams it upstream) both mid-way."""
        live = [h for h in router.live_requests.on(name) if not h.ledger.finished]
        return (any(not h.ledger.collect and len(h.ledger.generated) >= KILL_AFTER_TOKENS
                    for h in live)
                and any(h.ledger.collect and h.ledger.generated for h in live))

    async def kill_when_streaming() -> str:
        """Kill the first engine found with both kinds of request mid-way (which engine gets
        which request is the router's choice); return its name."""
        give_up = asyncio.get_running_loop().time() + 120
        while asyncio.get_running_loop().time() < give_up:
            for name in engines:
                if ready_to_kill(name):
                    if fault == "hang_core":
                        _hang_core(engines[name])
                    else:  # SIGKILL or SIGSTOP to the engine's whole process group
                        engines[name].kill(signal.SIGSTOP if fault == "freeze"
                                           else signal.SIGKILL)
                    return name
            await asyncio.sleep(0.005)
        raise AssertionError("no engine held a stream and a non-streamed request mid-way")

    killer = asyncio.ensure_future(kill_when_streaming())
    chaos = await asyncio.gather(*(_run(client, url, i) for i in range(STREAMS)))
    victim = await killer
    index = list(engines).index(victim)
    two_engines[index].stop(grace_s=0)  # a frozen one dies too; the next case gets a new one
    two_engines[index] = _restarted(two_engines[index])
    on_victim = [r for r in chaos if r["served_by"] == victim]
    whole_on_victim = [r for i, r in enumerate(chaos)
                       if r["served_by"] == victim and not _streamed(i)]
    assert any(r["migrations"] >= 1 for r in whole_on_victim), "no non-streamed request moved"
    for i, (want, got) in enumerate(zip(reference, chaos)):
        assert got["ids"] == want["ids"], f"stream {i} (served by {got['served_by']})"
        assert got["text"] == want["text"], f"stream {i} text"
        assert got["usage"]["completion_tokens"] == MAX_TOKENS
        assert got["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
    metrics = (await (await client.get(url + "/metrics")).read()).decode()
    resumed = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("xllm_router_migrations_total{")
                  and 'outcome="resumed"' in line)
    assert resumed >= 1 and resumed <= len(on_victim)
    if fault == "freeze":  # no connection broke: a probe that went unanswered found it
        dead = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("xllm_router_liveness_probes_total{")
                   and 'outcome="dead"' in line)
        assert dead >= 1
    if fault == "hang_core":  # /health answered: the still token counters found it
        stuck = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith("xllm_router_migrations_total{")
                    and 'reason="stuck"' in line and 'outcome="resumed"' in line)
        assert stuck >= 1
