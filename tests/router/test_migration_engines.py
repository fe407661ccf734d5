"""Kill -9 one of two real vLLM engines while 20 greedy requests run through the router.

Every request (streamed, and every fourth one non-streamed) must complete, and its
token ids and text must equal the uninterrupted run of the same requests. Run under ``flock /tmp/xllm-vllm.lock`` (two cores, shared).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

STREAMS = 20
MAX_TOKENS = 96
KILL_AFTER_TOKENS = 8  # the victim dies once one of its streams has this many tokens


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


async def _run(client, url: str, i: int,
               progress: dict[tuple[str, int], int]) -> dict[str, Any]:
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
            progress[served_by, i] = len(ids)
    return {"ids": ids, "text": "".join(text), "usage": usage, "served_by": served_by}


async def test_kill_one_engine_mid_stream_every_stream_completes_identically(
        two_engines, start_router, client):
    victim, survivor = two_engines
    router, url = await start_router(instances=[f"{victim.url};id=victim",
                                                f"{survivor.url};id=survivor"],
                                     first_byte_timeout_s=120, idle_timeout_s=30)
    from router_fakes import wait_for

    await wait_for(lambda: all(i.healthy for i in router.load.instances.values()), 30,
                   "both engines healthy")
    progress: dict[tuple[str, int], int] = {}
    reference = await asyncio.gather(*(_run(client, url, i, progress)
                                       for i in range(STREAMS)))
    assert all(len(r["ids"]) == MAX_TOKENS for r in reference)

    progress.clear()

    def collected_midway_on_victim() -> bool:
        """A non-streamed request (the router streams it upstream) has tokens on the victim."""
        return any(h.ledger.collect and h.ledger.generated and not h.ledger.finished
                   for h in router.live_requests.on("victim"))

    async def kill_when_streaming() -> int:
        """Kill once a victim stream has KILL_AFTER_TOKENS and a non-streamed request is
        mid-way there too (bounded wait: the assertions below say which was missing); return
        how many victim streams were unfinished then. (A loaded client may read a buffered
        stream whole without yielding, so one stream's count can jump; other streams are
        still mid-way.)"""
        give_up = asyncio.get_running_loop().time() + 120
        while True:
            on_victim = [n for (who, _), n in progress.items() if who == "victim"]
            if any(n >= KILL_AFTER_TOKENS for n in on_victim) and collected_midway_on_victim():
                break
            if asyncio.get_running_loop().time() > give_up:
                break
            await asyncio.sleep(0.005)
        victim.kill()  # SIGKILL to the engine's whole process group
        return sum(1 for n in on_victim if n < MAX_TOKENS)

    killer = asyncio.ensure_future(kill_when_streaming())
    chaos = await asyncio.gather(*(_run(client, url, i, progress)
                                   for i in range(STREAMS)))
    unfinished_at_kill = await killer
    assert unfinished_at_kill >= 1, "every victim stream finished before the kill"
    on_victim = [r for r in chaos if r["served_by"] == "victim"]
    assert on_victim, "no stream started on the victim"
    whole_on_victim = [r for i, r in enumerate(chaos)
                       if r["served_by"] == "victim" and not _streamed(i)]
    assert whole_on_victim, "no non-streamed request started on the victim"
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
