"""The router's P->D request flow against fake engines (plumbing only; the real NIXL
transfer is covered by test_pd_engines.py): what P and D receive, the handoff relayed
whole, streaming from D, accounting back to zero, and requests the handoff cannot carry."""

from __future__ import annotations

import json

import pytest
from router_fakes import FakeBehaviour, FakeEngine, wait_for

from router.server.pd import PREFILL_KV_PARAMS, prefill_body
from router.server.requests import parse_request

ASYNC = pytest.mark.asyncio(loop_scope="session")

# What vLLM's NixlConnector answers, plus a field the router has never heard of: relayed as is.
P_PARAMS = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [[1, 2]],
            "remote_engine_id": "e-1", "remote_request_id": "cmpl-1", "remote_host": "10.0.0.5",
            "remote_port": 5600, "tp_size": 1, "future_field": {"x": [1, 2]}}


def test_prefill_body_asks_for_one_token_without_streaming_and_keeps_the_kv():
    parsed = parse_request("chat", b'{"model": "m", "messages": [{"role": "user",'
                           b' "content": "hi"}], "stream": true, "stream_options": {"include_usage": true},'
                           b' "max_completion_tokens": 50, "min_tokens": 5, "temperature": 0}',
                           {})
    body = json.loads(prefill_body(parsed))
    assert body["stream"] is False and "stream_options" not in body and "min_tokens" not in body
    assert body["max_tokens"] == 1 and body["max_completion_tokens"] == 1
    assert body["kv_transfer_params"] == PREFILL_KV_PARAMS
    assert body["messages"] == parsed.body["messages"] and body["temperature"] == 0
    assert parsed.body["stream"] is True  # the client's body is untouched (D gets it)


@ASYNC
async def test_kv_transfer_params_go_to_the_decode_instance_whole_and_it_streams(
        start_router, client):
    p = await FakeEngine("p", FakeBehaviour(kv_transfer_params=P_PARAMS)).start()
    d = await FakeEngine("d", FakeBehaviour(tokens=5)).start()
    try:
        router, url = await start_router(
            instances=[f"{p.url};id=p;role=prefill", f"{d.url};id=d;role=decode"],
            policy="static_pd")
        await wait_for(lambda: all(i.healthy for i in router.load.instances.values()), 5,
                       "health")
        async with client.post(url + "/v1/completions", json={
                "model": "tiny", "prompt": "hello", "max_tokens": 5, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            assert r.status == 200
            text = await r.text()
            assert r.headers["x-xllm-pd"] == "handoff"
            assert r.headers["x-xllm-prefill-instance"] == "p"
        assert text.count("data: ") == 5 + 2  # 5 tokens, usage, [DONE] relayed from D
        (to_p,), (to_d,) = p.requests, d.requests
        assert to_p["max_tokens"] == 1 and to_p["stream"] is False
        assert to_d["kv_transfer_params"] == P_PARAMS  # whole, never rebuilt
        assert to_d["stream"] is True and to_d["max_tokens"] == 5
        assert to_d["stream_options"] == {"include_usage": True}
        for load in router.load.instances.values():  # tickets closed
            assert (load.inflight, load.prefill_tokens, load.decode_tokens) == (0, 0, 0)
    finally:
        await p.stop()
        await d.stop()


@ASYNC
async def test_prefill_without_kv_params_falls_back_and_several_sequences_skip_the_handoff(
        start_router, client):
    p = await FakeEngine("p").start()  # answers, but without kv_transfer_params
    d = await FakeEngine("d").start()
    try:
        router, url = await start_router(
            instances=[f"{p.url};id=p;role=prefill", f"{d.url};id=d;role=decode"],
            policy="static_pd")
        await wait_for(lambda: all(i.healthy for i in router.load.instances.values()), 5,
                       "health")
        async with client.post(url + "/v1/completions", json={
                "model": "tiny", "prompt": "hello", "max_tokens": 4}) as r:
            assert r.status == 200 and r.headers["x-xllm-pd"] == "fallback_no_kv_params"
        assert "kv_transfer_params" not in d.requests[-1]
        async with client.post(url + "/v1/completions", json={
                "model": "tiny", "prompt": "hello", "max_tokens": 4, "n": 2}) as r:
            assert r.status == 200 and "x-xllm-pd" not in r.headers
        assert len(p.requests) == 1 and len(d.requests) == 2
    finally:
        await p.stop()
        await d.stop()


def test_slo_defaults_come_from_router_flags_and_headers_override_them():
    from router.config import RouterConfig

    config = RouterConfig.from_args({"instances": ["http://127.0.0.1:9"], "policy": "dynamic_pd",
                                     "slo_ttft_ms": 1500.0, "slo_tpot_ms": 90.0,
                                     "pd_role_dwell_s": 3.0, "pd_mixed_max_batch": 8})
    assert config.policy_settings("dynamic_pd")["role_dwell_s"] == 3.0
    assert config.policy_settings("dynamic_pd")["mixed_max_batch"] == 8
    assert config.policy_settings("least_load") == {}
    body = b'{"model": "m", "prompt": "hi"}'
    defaults = {"default_slo_ttft_ms": config.slo_ttft_ms,
                "default_slo_tpot_ms": config.slo_tpot_ms}
    info = parse_request("completions", body, {}).request_info(**defaults)
    assert (info.slo_ttft_ms, info.slo_tpot_ms) == (1500.0, 90.0)
    info = parse_request("completions", body, {"x-slo-ttft-ms": "250"}).request_info(**defaults)
    assert (info.slo_ttft_ms, info.slo_tpot_ms) == (250.0, 90.0)
