"""The router's E->PD request flow against fake engines (plumbing only; the real encoder
output transfer is covered by test_epd_engines.py): media ids pinned alike for E and PD,
E's ``ec_transfer_params`` relayed whole, E never picked to generate, and fallback to PD
encoding itself when E fails."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from router_fakes import FakeEncoder, FakeEngine, wait_for

from router.server.epd import encode_body, media_uuid, pin_media_uuids, wants_encode
from router.server.requests import parse_request

ASYNC = pytest.mark.asyncio(loop_scope="session")

IMAGE = "data:image/png;base64,iVBORw0KGgo="


def _chat(*parts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": [
        *parts, {"type": "text", "text": "What is in the image?"}]}], **extra}


def _image(url: str = IMAGE, **extra: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}, **extra}


def test_media_uuids_are_pinned_per_model_and_url_and_a_clients_own_is_kept():
    body = _chat(_image(), _image("data:image/png;base64,AAAA", uuid="mine"))
    pinned = pin_media_uuids(body, "tiny")
    first, second = pinned["messages"][0]["content"][:2]
    assert first["uuid"] == hashlib.sha256(f"tiny\0{IMAGE}".encode()).hexdigest()
    assert first["uuid"] == media_uuid("tiny", IMAGE) != media_uuid("other", IMAGE)
    assert second["uuid"] == "mine"
    assert "uuid" not in body["messages"][0]["content"][0]  # the client's body is untouched


def test_only_chat_requests_with_images_want_an_encode_stage():
    def parsed(kind: str, body: dict[str, Any]) -> Any:
        return parse_request(kind, json.dumps(body).encode(), {})  # type: ignore[arg-type]

    assert wants_encode(parsed("chat", _chat(_image())))
    assert wants_encode(parsed("chat", _chat({"image_url": IMAGE})))  # bare, no "type"
    assert not wants_encode(parsed("chat", _chat()))
    assert not wants_encode(parsed("chat", {"model": "tiny", "messages": [
        {"role": "user", "content": "text only"}]}))
    assert not wants_encode(parsed("completions", {"model": "tiny", "prompt": "hi"}))


def test_encode_body_asks_for_one_token_without_streaming():
    body = json.loads(encode_body(pin_media_uuids(_chat(
        _image(), stream=True, stream_options={"include_usage": True}, max_completion_tokens=9,
        n=2, temperature=0), "tiny")))
    assert body["stream"] is False and "stream_options" not in body and "n" not in body
    assert body["max_tokens"] == 1 and body["max_completion_tokens"] == 1
    assert body["temperature"] == 0 and body["messages"][0]["content"][0]["uuid"]


@ASYNC
async def test_ec_transfer_params_go_to_the_pd_instance_whole_with_the_same_media_ids(
        start_router, client):
    e = await FakeEncoder().start()
    pd = await FakeEngine("pd").start()
    try:
        router, url = await start_router(
            instances=[f"{e.url};id=e;role=encode", f"{pd.url};id=pd"], policy="least_load")
        await wait_for(lambda: all(i.healthy for i in router.load.instances.values()), 5,
                       "health")
        for _ in range(3):  # E is never chosen to generate, whatever the load
            async with client.post(url + "/v1/chat/completions",
                                   json=_chat(_image(), max_tokens=4)) as r:
                assert r.status == 200, await r.text()
                assert r.headers["x-xllm-epd"] == "loaded"
                assert r.headers["x-xllm-encode-instance"] == "e"
                assert r.headers["x-xllm-instance"] == "pd"
        to_e, to_pd = e.requests[0], pd.requests[0]
        assert to_e["max_tokens"] == 1 and to_e["stream"] is False
        key = media_uuid("tiny", IMAGE)
        assert to_e["messages"] == to_pd["messages"]  # same pinned uuid on both sides
        assert to_pd["messages"][0]["content"][0]["uuid"] == key
        assert to_pd["ec_transfer_params"] == {key: {"item_indices": [0], "metadata": {}}}
        assert to_pd["max_tokens"] == 4
        # Text-only chat skips E.
        async with client.post(url + "/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 200 and "x-xllm-epd" not in r.headers
        assert len(e.requests) == 3
        metrics = (await (await client.get(url + "/metrics")).read()).decode()
        assert 'xllm_router_epd_encodes_total{instance="e",outcome="loaded"} 3.0' in metrics
        assert "xllm_router_epd_encode_seconds_count 3.0" in metrics
        for load in router.load.instances.values():  # tickets closed
            assert load.inflight == 0
    finally:
        await e.stop()
        await pd.stop()


@ASYNC
async def test_encoder_failure_falls_back_to_the_pd_instance_encoding_itself(
        start_router, client):
    e = await FakeEncoder(status=500).start()
    pd = await FakeEngine("pd").start()
    try:
        router, url = await start_router(
            instances=[f"{e.url};id=e;role=encode", f"{pd.url};id=pd"], policy="least_load")
        await wait_for(lambda: all(i.healthy for i in router.load.instances.values()), 5,
                       "health")
        async with client.post(url + "/v1/chat/completions",
                               json=_chat(_image(), stream=True)) as r:
            assert r.status == 200 and r.headers["x-xllm-epd"] == "fallback_http_500"
            assert (await r.text()).endswith("data: [DONE]\n\n")
        (to_pd,) = pd.requests
        assert "ec_transfer_params" not in to_pd
        assert to_pd["messages"][0]["content"][0]["uuid"] == media_uuid("tiny", IMAGE)
        await e.stop()  # gone: a connect failure, or no encode stage once health saw it
        async with client.post(url + "/v1/chat/completions", json=_chat(_image())) as r:
            assert r.status == 200 and r.headers.get("x-xllm-epd") in ("fallback_connect", None)
        metrics = (await (await client.get(url + "/metrics")).read()).decode()
        assert 'outcome="fallback_http_500"} 1.0' in metrics
    finally:
        await e.stop()
        await pd.stop()
