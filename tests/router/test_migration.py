"""Mid-stream migration against fake engines (a deterministic fake "greedy model").

The fakes check the router's seam: no token twice or missing, the client's format and
usage, the limits. Real vLLM engines are covered by test_migration_engines.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from router.server.migration import SeamRepair, SSESplitter, StreamLedger, migratable
from router.server.requests import parse_request
from router_fakes import fake_next_token

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPT = "hello world"


def _expected(prompt_ids: list[int], n: int) -> list[int]:
    sequence = list(prompt_ids)
    for _ in range(n):
        sequence.append(fake_next_token(sequence))
    return sequence[len(prompt_ids):]


def _events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def _sequence_fakes(fakes, *, close_after: int | None = 3):
    a, b = fakes
    for fake in fakes:
        fake.behaviour.sequence_model = True
    a.behaviour.close_mid_stream_after = close_after
    return a, b


async def _stream(client, url: str, kind: str, max_tokens: int = 8, **extra):
    path = "/v1/completions" if kind == "completions" else "/v1/chat/completions"
    body = ({"prompt": PROMPT} if kind == "completions"
            else {"messages": [{"role": "user", "content": PROMPT}]})
    body.update(model="tiny", stream=True, max_tokens=max_tokens,
                stream_options={"include_usage": True}, **extra)
    async with client.post(url + path, json=body) as r:
        assert r.status == 200
        return r.headers["x-xllm-instance"], await r.text()


def _text(events: list[dict], kind: str) -> str:
    return "".join((c["delta"].get("content") or "") if kind == "chat" else c["text"]
                   for e in events for c in e.get("choices", ()))


@pytest.mark.parametrize("kind", ["completions", "chat"])
async def test_broken_stream_continues_on_another_instance(fakes, start_router, client, kind):
    a, b = _sequence_fakes(fakes)
    router, url = await start_router(instances=[a.url, b.url])
    expected = _expected([ord(c) for c in PROMPT], 8)
    for _ in range(2):  # round robin: at least one starts on the failing instance
        _, text = await _stream(client, url, kind)
        events = _events(text)
        assert _text(events, kind) == "".join(f"<{t}>" for t in expected)
        assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text
        assert all("token_ids" not in c for e in events for c in e.get("choices", ()))
        assert all("prompt_token_ids" not in e for e in events)
        assert len({e["id"] for e in events}) == 1
        finishes = [c["finish_reason"] for e in events for c in e.get("choices", ())
                    if c["finish_reason"]]
        assert finishes == ["length"]
        usage = events[-1]["usage"]
        assert usage["prompt_tokens"] == len(PROMPT) and usage["completion_tokens"] == 8
    resumed = [r for r in b.requests if isinstance(r.get("prompt"), list)]
    assert len(resumed) == len(a.requests) >= 1
    for body in resumed:
        assert body["prompt"] == [ord(c) for c in PROMPT] + expected[:3]
        assert body["max_tokens"] == 5 and body["return_token_ids"] is True
    metrics = (await (await client.get(url + "/metrics")).read()).decode()
    assert (f'xllm_router_migrations_total{{outcome="resumed",reason="error"}} '
            f'{len(resumed)}.0') in metrics
    # No KV outlived the failed fake (no PD, no prefix index): every resumption recomputes.
    assert f'xllm_router_resume_plans_total{{mode="recompute"}} {len(resumed)}.0' in metrics


async def test_client_asking_for_token_ids_gets_them_across_the_seam(fakes, start_router,
                                                                      client):
    a, b = _sequence_fakes(fakes)
    _, url = await start_router(instances=[a.url, b.url])
    expected = _expected([ord(c) for c in PROMPT], 8)
    for _ in range(2):
        _, text = await _stream(client, url, "completions", return_token_ids=True)
        ids = [t for e in _events(text) for c in e.get("choices", ()) for t in c["token_ids"]]
        assert ids == expected


async def test_silent_instance_is_left_after_idle_timeout(fakes, start_router, client):
    a, b = _sequence_fakes(fakes, close_after=None)
    a.behaviour.token_delay_s = 30.0  # chat: the role chunk comes at once, then silence
    _, url = await start_router(instances=[a.url, b.url], idle_timeout_s=0.5)
    expected = _expected([ord(c) for c in PROMPT], 4)
    for _ in range(2):
        _, text = await _stream(client, url, "chat", max_tokens=4)
        assert _text(_events(text), "chat") == "".join(f"<{t}>" for t in expected)


async def test_migration_off_ends_with_an_error_event(fakes, start_router, client):
    a, b = _sequence_fakes(fakes)
    _, url = await start_router(instances=[a.url, b.url], migration_limit=0)
    texts = [(await _stream(client, url, "completions"))[1] for _ in range(2)]
    assert sum('"error"' in t for t in texts) == 1
    assert all(r.get("prompt") == PROMPT for r in b.requests)  # nothing resubmitted


async def test_limit_reached_when_every_instance_breaks(fakes, start_router, client):
    a, b = _sequence_fakes(fakes)
    b.behaviour.close_mid_stream_after = 2
    router, url = await start_router(instances=[a.url, b.url])
    _, text = await _stream(client, url, "completions")
    assert '"error"' in text
    metrics = (await (await client.get(url + "/metrics")).read()).decode()
    assert "xllm_router_migrations_total" in metrics and 'outcome="failed"' in metrics


async def test_splitter_reassembles_events_cut_anywhere() -> None:
    stream = b'data: {"a": 1}\n\ndata: {"b": 2}\r\n\r\ndata: [DONE]\n\n'
    for cut in range(1, len(stream)):
        splitter = SSESplitter()
        got = splitter.feed(stream[:cut]) + splitter.feed(stream[cut:])
        assert got == [b'{"a": 1}', b'{"b": 2}', b"[DONE]"]


async def test_ledger_resume_body_and_usage() -> None:
    ledger = StreamLedger(kind="completions", max_tokens=10, client_wants_ids=False)
    out = ledger.event(json.dumps({"id": "x", "model": "m", "choices": [
        {"index": 0, "text": "a", "token_ids": [5], "prompt_token_ids": [1, 2, 3],
         "finish_reason": None}]}).encode())
    assert out is not None and b"token_ids" not in out
    body = ledger.resume_body({"model": "m", "prompt": "p", "temperature": 0, "min_tokens": 4,
                               "stop": ["."], "n": 1, "echo": False})
    assert body == {"model": "m", "prompt": [1, 2, 3, 5], "max_tokens": 9, "stream": True,
                    "return_token_ids": True, "temperature": 0, "min_tokens": 3, "stop": ["."]}
    ledger.resumed_event(json.dumps({"id": "y", "choices": [
        {"index": 0, "text": "b", "token_ids": [6, 7], "finish_reason": "stop"}]}).encode())
    usage = ledger.resumed_event(json.dumps({"id": "y", "choices": [], "usage": {
        "prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}).encode())
    assert usage is not None
    assert json.loads(usage[6:])["usage"] == {"prompt_tokens": 3, "completion_tokens": 3,
                                              "total_tokens": 6}
    assert ledger.can_resume() == "already finished"


async def test_requests_with_media_are_not_migrated() -> None:
    """A resume sends token ids only, so image/audio parts would be lost: retry whole."""
    text = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}]}]}
    image = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}
    assert migratable(parse_request("chat", json.dumps(text).encode(), {})) is None
    assert migratable(parse_request("chat", json.dumps(image).encode(), {})) == (
        "multimodal content")


async def _whole(client, url: str, kind: str, max_tokens: int = 8, **extra):
    path = "/v1/completions" if kind == "completions" else "/v1/chat/completions"
    body = ({"prompt": PROMPT} if kind == "completions"
            else {"messages": [{"role": "user", "content": PROMPT}]})
    body.update(model="tiny", max_tokens=max_tokens, **extra)
    async with client.post(url + path, json=body) as r:
        return r.status, dict(r.headers), await r.json()


@pytest.mark.parametrize("kind", ["completions", "chat"])
async def test_non_streamed_request_moves_and_answers_once(fakes, start_router, client, kind):
    """The router streams in the client's place, so a broken instance costs no tokens."""
    a, b = _sequence_fakes(fakes)
    _, url = await start_router(instances=[a.url, b.url])
    expected = _expected([ord(c) for c in PROMPT], 8)
    migrations = []
    for _ in range(2):  # round robin: one starts on the failing instance
        status, headers, answer = await _whole(client, url, kind)
        assert status == 200, answer
        assert headers["Content-Type"].startswith("application/json")
        migrations.append(int(headers["x-xllm-migrations"]))
        assert answer["object"] == ("chat.completion" if kind == "chat" else "text_completion")
        choice = answer["choices"][0]
        text = choice["message"]["content"] if kind == "chat" else choice["text"]
        assert text == "".join(f"<{t}>" for t in expected)
        assert choice["finish_reason"] == "length" and "token_ids" not in choice
        assert answer["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": 8,
                                   "total_tokens": len(PROMPT) + 8}
    assert sum(migrations) == len(a.requests) >= 1  # every start on a moved once to b
    assert all(r["stream"] is True for r in a.requests + b.requests)  # streamed upstream


async def test_non_streamed_request_returns_token_ids_when_asked(fakes, start_router, client):
    a, b = _sequence_fakes(fakes)
    _, url = await start_router(instances=[a.url, b.url])
    prompt_ids = [ord(c) for c in PROMPT]
    for _ in range(2):
        status, _, answer = await _whole(client, url, "completions", return_token_ids=True)
        assert status == 200
        assert answer["choices"][0]["token_ids"] == _expected(prompt_ids, 8)
        assert answer["choices"][0]["prompt_token_ids"] == prompt_ids


async def test_non_streamed_request_retries_whole_when_migration_fails(fakes, start_router,
                                                                       client):
    """Every resumption breaks too: the client, who saw nothing, gets a clean 502 JSON error."""
    a, b = _sequence_fakes(fakes)
    b.behaviour.close_mid_stream_after = 2
    _, url = await start_router(instances=[a.url, b.url], migration_limit=1)
    status, _, answer = await _whole(client, url, "chat")
    assert status == 502
    assert answer["error"]["code"] == "upstream_error"
    assert "retried once" in answer["error"]["message"]


async def test_collected_response_builds_the_non_streamed_shape() -> None:
    from router.server.assemble import CollectedResponse

    collected = CollectedResponse("chat", client_wants_ids=True)
    events = [
        {"id": "c1", "created": 7, "model": "m", "prompt_token_ids": [1, 2],
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                      "token_ids": []}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hel"}, "token_ids": [5]}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"content": "lo"}, "token_ids": [6],
                                  "finish_reason": "stop", "stop_reason": None}]},
        {"id": "c1", "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2,
                                              "total_tokens": 4}},
    ]
    wire = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    await collected.write(wire[:17])  # cut anywhere: the splitter reassembles events
    await collected.write(wire[17:] + b"data: [DONE]\n\n")
    body = collected.body()
    assert collected.done and collected.error is None
    assert body["id"] == "c1" and body["object"] == "chat.completion" and body["created"] == 7
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["token_ids"] == [5, 6] and body["prompt_token_ids"] == [1, 2]
    assert body["usage"]["total_tokens"] == 4


async def test_streams_leave_an_instance_as_soon_as_it_is_declared_failed(fakes, start_router,
                                                                          client):
    """Its health probes fail while the stream is still flowing but slow: the router cuts
    the stream at the transition to failed and resumes it elsewhere, without waiting for
    the connection to break or go silent."""
    a, b = _sequence_fakes(fakes, close_after=None)
    a.behaviour.token_delay_s = 0.5  # 16 tokens: 8 s on a, far past the failover
    router, url = await start_router(instances=[f"{a.url};id=a", f"{b.url};id=b"],
                                     idle_timeout_s=60, policy="least_load")
    from router_fakes import wait_for

    await wait_for(lambda: all(i.healthy for i in router.load.instances.values()), 10,
                   "both fakes healthy")
    b.behaviour.running = 5  # least-load puts the request on a

    async def fail_a_probes() -> None:
        await wait_for(lambda: router.live_requests.live("a") == 1, 10, "stream live on a")
        a.behaviour.health_status = 500

    failing = asyncio.ensure_future(fail_a_probes())
    served, text = await _stream(client, url, "completions", max_tokens=16)
    await failing
    assert served == "a" and '"error"' not in text
    assert _text(_events(text), "completions") == "".join(
        f"<{t}>" for t in _expected([ord(c) for c in PROMPT], 16))
    assert router.load.instances["a"].health.state == "failed"
    resumed = [r for r in b.requests if isinstance(r.get("prompt"), list)]
    assert len(resumed) == 1 and 0 < len(resumed[0]["prompt"]) - len(PROMPT) < 16


def _chat_event(ids: list[int], content: str, **top: object) -> bytes:
    return json.dumps({"id": "c", "model": "m", **top, "choices": [
        {"index": 0, "delta": {"content": content}, "token_ids": ids,
         "finish_reason": None}]}).encode()


async def test_ledger_counts_tokens_whose_text_the_engine_held_back() -> None:
    ledger = StreamLedger(kind="chat", max_tokens=10, client_wants_ids=False)
    ledger.event(_chat_event([5], "a", prompt_token_ids=[1, 2]))
    ledger.event(_chat_event([6], ""))  # the first byte of a character
    ledger.event(_chat_event([7], ""))
    assert ledger.unspoken == 2
    ledger.event(_chat_event([8], "京"))
    assert ledger.unspoken == 0


async def test_a_seam_inside_a_character_hands_back_the_first_resumed_text_to_repair() -> None:
    """The engine resumed after held-back tokens emits the whole prompt's text with its
    first output (tokenizers' DecodeStream primed mid-character): that event is handed back
    with the token ids its text must be recomputed from."""
    ledger = StreamLedger(kind="chat", max_tokens=10, client_wants_ids=False)
    ledger.event(_chat_event([5], "a", prompt_token_ids=[1, 2]))
    ledger.event(_chat_event([6], ""))
    ledger.resume_body({"model": "m", "messages": []})
    still = ledger.resumed_event(json.dumps({"id": "r", "choices": [
        {"index": 0, "text": "", "token_ids": [7], "finish_reason": None}]}).encode())
    assert isinstance(still, bytes)  # no text yet: passed on as it is
    seam = ledger.resumed_event(json.dumps({"id": "r", "choices": [
        {"index": 0, "text": "<the whole prompt>京", "token_ids": [8],
         "finish_reason": None}]}).encode())
    assert isinstance(seam, SeamRepair)
    assert (seam.context, seam.tokens) == ([5], [6, 7, 8])
    out = json.loads(ledger.repaired(seam, "京")[6:])
    assert out["choices"][0]["delta"]["content"] == "京" and out["id"] == "c"
    assert ledger.generated == [5, 6, 7, 8] and ledger.seam_from is None
    after = ledger.resumed_event(json.dumps({"id": "r", "choices": [
        {"index": 0, "text": "b", "token_ids": [9], "finish_reason": None}]}).encode())
    assert isinstance(after, bytes)


async def test_a_clean_seam_needs_no_repair() -> None:
    ledger = StreamLedger(kind="completions", max_tokens=10, client_wants_ids=False)
    ledger.event(json.dumps({"id": "x", "choices": [
        {"index": 0, "text": "a", "token_ids": [5], "prompt_token_ids": [1],
         "finish_reason": None}]}).encode())
    ledger.resume_body({"model": "m", "prompt": "p"})
    out = ledger.resumed_event(json.dumps({"id": "r", "choices": [
        {"index": 0, "text": "b", "token_ids": [6], "finish_reason": None}]}).encode())
    assert isinstance(out, bytes) and json.loads(out[6:])["choices"][0]["text"] == "b"
