"""The live router carries out a co-location policy's offline moves (router/server/moves.py).

Fake engines (deterministic "greedy model", tests/router/router_fakes.py): a strict
instance reports offline work waiting, so the ``colocation`` policy orders its offline
requests onto the idle relaxed instance; the router cuts them there and resumes them
with prompt + generated tokens. The client's stream must not notice.
"""

from __future__ import annotations

import json

import pytest

from router_fakes import fake_next_token, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPT = "offline batch line"


def _expected(n: int) -> list[int]:
    sequence = [ord(c) for c in PROMPT]
    for _ in range(n):
        sequence.append(fake_next_token(sequence))
    return sequence[len(PROMPT):]


async def _offline_stream(client, url: str, request_class: str) -> tuple[str, str]:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "stream": True,
            "stream_options": {"include_usage": True}}
    # round_robin for the first placement: it picks among decode-role instances, so the
    # request starts on the strict instance.
    headers = {"x-request-class": request_class, "x-xllm-policy": "round_robin"}
    async with client.post(url + "/v1/completions", json=body, headers=headers) as r:
        assert r.status == 200
        return r.headers["x-xllm-instance"], await r.text()


async def _strict_and_relaxed(fakes, start_router):
    strict, relaxed = fakes
    for fake in fakes:
        fake.behaviour.sequence_model = True
        fake.behaviour.token_delay_s = 0.25  # 12 tokens: 3 s, past a 1 s rebalance tick
    strict.behaviour.offline_waiting = 3  # online work preempted offline requests here
    router, url = await start_router(
        instances=[f"{strict.url};id=strict;role=decode", f"{relaxed.url};id=relaxed;role=prefill"],
        policy="colocation")
    await wait_for(lambda: all(i.healthy for i in router.load.instances.values()), 10,
                   "both fakes healthy")
    return router, url, strict, relaxed


def _text(stream: str) -> str:
    return "".join(c["text"] for line in stream.splitlines()
                   if line.startswith("data: {")
                   for c in json.loads(line[6:]).get("choices", ()))


async def test_offline_request_on_a_strict_instance_moves_to_the_idle_relaxed_one(
        fakes, start_router, client):
    router, url, strict, relaxed = await _strict_and_relaxed(fakes, start_router)
    served, text = await _offline_stream(client, url, "offline")
    assert served == "strict" and '"error"' not in text
    assert _text(text) == "".join(f"<{t}>" for t in _expected(12))
    resumed = [r for r in relaxed.requests if isinstance(r.get("prompt"), list)]
    assert len(resumed) == 1, "the strict instance's request was resumed on the relaxed one"
    moved_after = len(resumed[0]["prompt"]) - len(PROMPT)
    assert 0 < moved_after < 12 and resumed[0]["max_tokens"] == 12 - moved_after
    metrics = (await (await client.get(url + "/metrics")).read()).decode()
    assert ('xllm_router_offline_moves_total{from_instance="strict",reason='
            '"offline_waiting_on_strict",to_instance="relaxed"} 1.0') in metrics
    assert router.load.instances["strict"].healthy, "a move is not a failure"
    assert router.live_requests.live("strict") == 0


async def test_online_requests_are_never_moved(fakes, start_router, client):
    router, url, strict, relaxed = await _strict_and_relaxed(fakes, start_router)
    served, text = await _offline_stream(client, url, "online")
    assert served == "strict"
    assert _text(text) == "".join(f"<{t}>" for t in _expected(12))
    assert not relaxed.requests, "online work stays where it was placed"
