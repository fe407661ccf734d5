"""The router in front of two real ``vllm serve`` (tiny model): relay, load view, aborts,
etcd registration, KV-aware routing checked against the engines' own prefix-cache metrics.

Slow (engines start once per session, ~30-60 s): run under
``flock /tmp/xllm-vllm.lock pytest -m engine tests/router``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid

import aiohttp
import pytest
from router_fakes import metric_total, wait_for

from conftest import ROUTER_TEST_BLOCK_SIZE, kv_instance_spec

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]


async def _metric(client: aiohttp.ClientSession, url: str, name: str) -> float:
    async with client.get(url + "/metrics") as r:
        text = await r.text()
    return metric_total(text, name)


def _specs(engines) -> list[str]:
    return [f"{e.url};id=engine-{i}" for i, e in enumerate(engines)]


def _chunk_text(kind: str, event: str) -> str:
    choices = json.loads(event).get("choices") or [{}]
    return (choices[0].get("text") if kind == "completions"
            else (choices[0].get("delta") or {}).get("content")) or ""


async def test_stream_and_non_stream_go_through_the_router(router_engines, start_router, client):
    router, url = await start_router(instances=_specs(router_engines))
    served = set()
    whole: dict[str, str] = {}
    for stream in (False, True):
        for kind, body in (("completions", {"prompt": "Hello, my name is"}),
                           ("chat/completions",
                            {"messages": [{"role": "user", "content": "Say hi"}]})):
            payload = {"model": "tiny", "max_tokens": 8, "temperature": 0, "stream": stream,
                       **body}
            if stream:
                payload["stream_options"] = {"include_usage": True}
            async with client.post(f"{url}/v1/{kind}", json=payload) as r:
                assert r.status == 200, await r.text()
                served.add(r.headers["x-xllm-instance"])
                if not stream:
                    data = await r.json()
                    assert data["usage"]["completion_tokens"] == 8
                    choice = data["choices"][0]
                    whole[kind] = choice["text"] if kind == "completions" else choice["message"]["content"]
                    continue
                events = [line[6:] for line in (await r.text()).splitlines()
                          if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["usage"]["completion_tokens"] == 8
            # Relayed as the engine sent them: several chunks (vLLM merges tokens into one
            # chunk when its API server falls behind, so not necessarily one per token) whose
            # text is the greedy answer the non-streaming request got.
            assert len(events) >= 3
            assert "".join(_chunk_text(kind, e) for e in events[:-1]) == whole[kind]
    assert served == {"engine-0", "engine-1"}
    async with client.get(url + "/v1/models") as r:
        assert [m["id"] for m in (await r.json())["data"]] == ["tiny"]


async def test_load_view_reads_plugin_status_and_stock_metrics(router_engines, start_router):
    router, _ = await start_router(instances=_specs(router_engines))
    await wait_for(lambda: all(i.healthy for i in router.load.instances.values()), 10, "health")
    sources = {i.instance_id: i.load_source for i in router.load.instances.values()}
    assert sources == {"engine-0": "xllm_status", "engine-1": "metrics"}


async def test_running_requests_show_in_the_load_view(router_engines, start_router, client):
    router, url = await start_router(instances=_specs(router_engines), policy="least_load")

    async def long_one() -> None:
        # Long enough to still run when the check below looks (the tiny model is fast).
        async with client.post(url + "/v1/completions", json={
                "model": "tiny", "prompt": "x", "max_tokens": 3000, "ignore_eos": True}) as r:
            assert r.status == 200
            await r.read()

    tasks = [asyncio.create_task(long_one()) for _ in range(4)]
    await wait_for(lambda: sum(i.running + i.waiting for i in router.load.instances.values()) >= 2,
                   20, "the engines to report running requests")
    inflight = sorted(i.inflight for i in router.load.instances.values())
    assert inflight == [2, 2]  # least-load spread the burst using its own accounting
    for task in tasks:  # disconnecting aborts the generations in the engines
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await wait_for(lambda: all(i.inflight == 0 for i in router.load.instances.values()), 10,
                   "the router's in-flight count to return to zero")


async def test_client_disconnect_aborts_generation_in_the_engine(router_engines, start_router,
                                                                 client):
    engine = router_engines[0]
    _, url = await start_router(instances=[f"{engine.url};id=engine-0"])
    before = await _metric(client, engine.url, "vllm:generation_tokens_total")
    r = await client.post(url + "/v1/completions", json={
        "model": "tiny", "prompt": "x", "max_tokens": 3000, "ignore_eos": True, "stream": True})
    assert r.status == 200
    await r.content.readany()
    r.close()
    began = time.monotonic()
    while await _metric(client, engine.url, "vllm:num_requests_running") > 0:
        assert time.monotonic() - began < 5, "engine still generating after the client left"
        await asyncio.sleep(0.1)
    generated = await _metric(client, engine.url, "vllm:generation_tokens_total") - before
    assert generated < 2500


async def test_engine_errors_and_auth_keep_openai_shape(router_engines, start_router, client):
    _, url = await start_router(instances=_specs(router_engines), api_keys=["secret"])
    auth = {"Authorization": "Bearer secret"}
    async with client.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x"}) as r:
        assert r.status == 401
    # The engine rejects this itself (longer than max_model_len): relayed as is.
    async with client.post(url + "/v1/completions", headers=auth, json={
            "model": "tiny", "prompt": "x", "max_tokens": 100_000}) as r:
        assert r.status == 400
        assert set((await r.json())["error"]) >= {"message", "type", "code"}
    async with client.post(url + "/v1/completions", headers=auth, json={
            "model": "gpt-5", "prompt": "x"}) as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"


async def test_engines_registered_in_etcd_are_routed_and_dropped_at_lease_expiry(
        router_engines, etcd_endpoint, start_router, client):
    prefix, ttl = f"/xllm-test/{uuid.uuid4().hex[:8]}/", 3
    router, url = await start_router(etcd=etcd_endpoint, etcd_prefix=prefix)
    registrars = [subprocess.Popen(
        [sys.executable, "-m", "router.cli", "register", "--etcd", etcd_endpoint, "--url",
         engine.url, "--model", "tiny", "--id", f"engine-{i}", "--etcd-prefix", prefix,
         "--ttl", str(ttl), "--block-size", str(ROUTER_TEST_BLOCK_SIZE)])
        for i, engine in enumerate(router_engines)]
    try:
        await wait_for(lambda: len([i for i in router.load.instances.values() if i.healthy]) == 2,
                       20, "both engines registered and healthy")
        served = set()
        for _ in range(4):
            async with client.post(url + "/v1/completions",
                                   json={"model": "tiny", "prompt": "x", "max_tokens": 2}) as r:
                assert r.status == 200
                served.add(r.headers["x-xllm-instance"])
        assert served == {"engine-0", "engine-1"}
        registrars[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await wait_for(lambda: set(router.load.instances) == {"engine-0"}, ttl + 3,
                       "engine-1 to leave when its lease expires")
        assert time.monotonic() - killed <= ttl + 1.5
        for _ in range(3):
            async with client.post(url + "/v1/completions",
                                   json={"model": "tiny", "prompt": "x", "max_tokens": 2}) as r:
                assert r.headers["x-xllm-instance"] == "engine-0"
    finally:
        for process in registrars:
            process.send_signal(signal.SIGTERM)
        for process in registrars:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()


async def test_kv_aware_sends_a_repeated_prefix_to_the_instance_that_holds_it(
        router_engines, start_router, client):
    from xllm_plugin.models import model_path

    pytest.importorskip("router.policies.kv_aware")
    router, url = await start_router(
        instances=[kv_instance_spec(e, i) for i, e in enumerate(router_engines)],
        policy="kv_aware", block_size=ROUTER_TEST_BLOCK_SIZE, tokenizer=str(model_path("tiny")))
    await wait_for(lambda: all(i.healthy for i in router.load.instances.values()), 10, "health")
    urls = {f"engine-{i}": e.url for i, e in enumerate(router_engines)}
    prefix = " ".join(f"shared{n}" for n in range(300))  # several 128-token blocks
    hits_before = {i: await _metric(client, u, "vllm:prefix_cache_hits_total")
                   for i, u in urls.items()}

    async def ask(suffix: str) -> str:
        async with client.post(url + "/v1/completions", json={
                "model": "tiny", "prompt": prefix + suffix, "max_tokens": 2}) as r:
            assert r.status == 200
            return r.headers["x-xllm-instance"]

    first = await ask(" question zero")
    # The engine publishes BlockStored; wait until the router's index has it.
    await wait_for(lambda: router.prefix is not None
                   and router.prefix.index.block_count(first) > 0, 10, "KV events to arrive")
    others = [await ask(f" question {n}") for n in range(1, 5)]
    assert others == [first] * 4
    hits_after = {i: await _metric(client, u, "vllm:prefix_cache_hits_total")
                  for i, u in urls.items()}
    other = next(i for i in urls if i != first)
    assert hits_after[first] - hits_before[first] >= 4 * 2 * ROUTER_TEST_BLOCK_SIZE
    assert hits_after[other] == hits_before[other]
    async with client.get(url + "/metrics") as r:
        assert f'xllm_router_prefix_hit_blocks_total{{instance="{first}"}}' in await r.text()
