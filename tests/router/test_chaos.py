"""Chaos suite, short forms (issue 7 part 5): etcd stopped while requests flow, malformed
upstream answers, and two router processes against one etcd with one killed by ``kill -9``.

Engines here are the fakes of router_fakes.py (the router's plumbing is what is under
test); killing a real engine mid-stream is test_migration_engines.py. Every client call
runs under a timeout, so a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import pytest

from conftest import etcd_ports, free_port_in
from etcd_server import EtcdServer
from router.discovery.etcd import EtcdClient
from router.discovery.records import InstanceRecord
from router.discovery.registrar import Registrar
from router.server.upstream import STALE_RETRIES
from router_fakes import FakeEngine, fake_next_token, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")

ETCD_OUTAGE_S = 10.0  # as the issue asks
PROMPT = "chaos"


def _prefix() -> str:
    return f"/xllm-chaos/{uuid.uuid4().hex[:8]}/"


def _expected(n: int) -> str:
    sequence = [ord(c) for c in PROMPT]
    for _ in range(n):
        sequence.append(fake_next_token(sequence))
    return "".join(f"<{t}>" for t in sequence[len(PROMPT):])


def _events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


async def _register(etcd: EtcdClient, prefix: str, fake: FakeEngine, instance_id: str,
                    ttl_s: int = 5) -> asyncio.Task[None]:
    registrar = Registrar(etcd, InstanceRecord(instance_id=instance_id, url=fake.url,
                                               model="tiny"),
                          prefix=prefix, ttl_s=ttl_s, health_interval_s=0.5)
    task = asyncio.create_task(registrar.run())
    await asyncio.wait_for(registrar.registered.wait(), 10)
    return task


async def _stop(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- (a) etcd stopped for 10 s --------------------------------------------------------------

async def test_etcd_outage_drops_nothing_and_discovery_recovers(fakes, start_router, client):
    exe = shutil.which("etcd")
    if exe is None:
        pytest.skip("etcd not installed (apt-get install etcd-server)")
    a, b = fakes
    etcd_server = EtcdServer(exe, *etcd_ports())
    etcd_server.start()
    prefix = _prefix()
    late = FakeEngine("late")
    await late.start()
    try:
        async with EtcdClient(etcd_server.endpoint) as etcd:
            registrars = [await _register(etcd, prefix, a, "a"),
                          await _register(etcd, prefix, b, "b")]
            router, url = await start_router(etcd=etcd_server.endpoint, etcd_prefix=prefix)
            await wait_for(lambda: all(router.load.instances[i].healthy for i in "ab"), 10,
                           "both instances discovered and healthy")
            outcomes: list[int | str] = []
            flowing = True

            async def requests_flow(stream: bool) -> None:
                while flowing:
                    try:
                        async with asyncio.timeout(10), client.post(
                                url + "/v1/completions",
                                json={"model": "tiny", "prompt": "x", "stream": stream}) as r:
                            body = await r.text()
                            ok = r.status == 200 and '"error"' not in body
                            outcomes.append(r.status if ok else f"{r.status}: {body[:200]}")
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        outcomes.append(repr(exc))
                    await asyncio.sleep(0.02)

            senders = [asyncio.create_task(requests_flow(stream)) for stream in (False, True)]
            await asyncio.sleep(0.5)
            etcd_server.kill()
            await asyncio.sleep(ETCD_OUTAGE_S)
            # The watch broke long ago; the instances it reported are all still routed to.
            assert sorted(router.load.instances) == ["a", "b"]
            assert all(load.healthy for load in router.load.instances.values())
            etcd_server.start()
            registrars.append(await _register(etcd, prefix, late, "late"))
            took = await wait_for(lambda: "late" in router.load.instances
                                  and router.load.instances["late"].healthy, 15,
                                  "a registration made after etcd returned")
            flowing = False
            await asyncio.gather(*senders)
            failures = [o for o in outcomes if o != 200]
            assert not failures, failures[:5]
            assert len(outcomes) > 50
            assert sorted(router.load.instances) == ["a", "b", "late"]
            assert took < 10
            await _stop(*registrars)
    finally:
        await late.stop()
        etcd_server.remove()


# -- (b) malformed upstream answers ---------------------------------------------------------

BEFORE_ANY_TOKEN = ["non_json", "html_error", "reset"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", BEFORE_ANY_TOKEN)
async def test_malformed_answer_alone_gives_openai_502(fakes, start_router, client, mode,
                                                       stream):
    a, _ = fakes
    a.behaviour.malformed = mode
    _, url = await start_router(instances=[a.url])
    async with asyncio.timeout(10), client.post(
            url + "/v1/completions",
            json={"model": "tiny", "prompt": "x", "stream": stream}) as r:
        assert r.status == 502
        assert r.headers["Content-Type"].startswith("application/json")
        error = (await r.json())["error"]
    assert error["type"] == "upstream_error" and error["code"] == "upstream_error"
    assert "upstream failed" in error["message"]  # the page's text may be quoted in it


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", BEFORE_ANY_TOKEN)
async def test_malformed_answer_is_retried_on_a_sound_instance(fakes, start_router, client,
                                                               mode, stream):
    a, b = fakes
    a.behaviour.malformed = mode
    router, url = await start_router(instances=[f"{a.url};id=a", f"{b.url};id=b"],
                                     scrape_interval_s=60)
    for _ in range(2):  # round robin: one of the two starts on the broken instance
        async with asyncio.timeout(10), client.post(
                url + "/v1/completions",
                json={"model": "tiny", "prompt": "x", "stream": stream}) as r:
            assert r.status == 200 and r.headers["x-xllm-instance"] == "b"
            text = await r.text()
        assert "t0" in text and '"error"' not in text
    if mode != "html_error":  # a 5xx may be overload; garbage or a reset is a broken instance
        assert router.load.instances["a"].health.state == "suspect"
        # Suspect: no new requests while b is healthy. A reset before any answer is first
        # taken for a pooled connection the engine had closed and sent again on another
        # (router/server/upstream.py).
        assert len(a.requests) == (1 + STALE_RETRIES if mode == "reset" else 1)
    else:
        assert router.load.instances["a"].healthy and len(a.requests) >= 1


async def test_html_4xx_page_keeps_its_status_in_openai_shape(fakes, start_router, client):
    a, _ = fakes
    a.behaviour.malformed, a.behaviour.malformed_status = "html_error", 404
    _, url = await start_router(instances=[a.url])
    async with asyncio.timeout(10), client.post(url + "/v1/completions",
                                                json={"model": "tiny", "prompt": "x"}) as r:
        assert r.status == 404
        error = (await r.json())["error"]
    assert error["type"] == "not_found_error" and "Bad Gateway" in error["message"]


MID_STREAM = ["truncated_sse", "garbage_event", "reset_mid"]


@pytest.mark.parametrize("kind", ["completions", "chat"])
@pytest.mark.parametrize("mode", MID_STREAM)
async def test_stream_broken_after_tokens_continues_elsewhere(fakes, start_router, client,
                                                              mode, kind):
    a, b = fakes
    for fake in fakes:
        fake.behaviour.sequence_model = True
    a.behaviour.malformed, a.behaviour.malformed_after = mode, 3
    router, url = await start_router(instances=[f"{a.url};id=a", f"{b.url};id=b"])
    path = "/v1/completions" if kind == "completions" else "/v1/chat/completions"
    body = ({"prompt": PROMPT} if kind == "completions"
            else {"messages": [{"role": "user", "content": PROMPT}]})
    for _ in range(2):  # round robin: one of the two starts on the broken instance
        async with asyncio.timeout(10), client.post(
                url + path, json={**body, "model": "tiny", "stream": True,
                                  "max_tokens": 8}) as r:
            assert r.status == 200
            text = await r.text()
        events = _events(text)
        pieces = [(c["delta"].get("content") or "") if kind == "chat" else c["text"]
                  for e in events for c in e.get("choices", ())]
        assert "".join(pieces) == _expected(8)
        assert "data: <html>" not in text and '"error"' not in text
        assert text.rstrip().endswith("data: [DONE]")
    assert len(a.requests) == 1
    resumed = [r for r in b.requests if isinstance(r.get("prompt"), list)]
    assert len(resumed) == 1 and resumed[0]["max_tokens"] == 5
    # A chunked response cut short is a payload error to the client library, like a reset.
    reason = "malformed" if mode == "garbage_event" else "error"
    assert router.metrics.migrations.labels(reason, "resumed")._value.get() == 1


@pytest.mark.parametrize("mode", MID_STREAM)
async def test_broken_stream_with_nowhere_to_go_ends_with_an_error_event(fakes, start_router,
                                                                         client, mode):
    a, _ = fakes
    a.behaviour.sequence_model = True
    a.behaviour.malformed, a.behaviour.malformed_after = mode, 3
    _, url = await start_router(instances=[a.url])
    async with asyncio.timeout(10), client.post(
            url + "/v1/completions", json={"model": "tiny", "prompt": PROMPT, "stream": True,
                                           "max_tokens": 8}) as r:
        assert r.status == 200  # the stream had started
        text = await r.text()
    events = _events(text)
    assert "".join(c["text"] for e in events[:-1] for c in e["choices"]) == _expected(3)
    assert events[-1]["error"]["code"] == 502 and "data: <html>" not in text


# -- (c) router HA: two router processes, one etcd, kill -9 ---------------------------------

def _router_process(port: int, etcd: str, prefix: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "router.cli", "--port", str(port), "--etcd", etcd,
             "--etcd-prefix", prefix, "--scrape-interval-s", "0.1", "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT)


async def _ready(client: aiohttp.ClientSession, url: str, instances: int) -> None:
    async def check() -> bool:
        try:
            async with client.get(url + "/ready", timeout=aiohttp.ClientTimeout(total=1)) as r:
                return r.status == 200 and (await r.json())["healthy_instances"] == instances
        except (aiohttp.ClientError, TimeoutError):
            return False

    for _ in range(150):
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"router at {url} not ready with {instances} instances")


async def _served_by(client: aiohttp.ClientSession, url: str, n: int = 4) -> set[str]:
    served = set()
    for _ in range(n):
        async with asyncio.timeout(10), client.post(
                url + "/v1/completions", json={"model": "tiny", "prompt": "x"}) as r:
            assert r.status == 200
            served.add(r.headers["x-xllm-instance"])
    return served


async def test_two_routers_one_etcd_survive_kill_9_of_one(etcd_endpoint, fakes, client,
                                                          tmp_path):
    a, b = fakes
    a.behaviour.token_delay_s = b.behaviour.token_delay_s = 0.1
    prefix = _prefix()
    ports = [free_port_in(8150, 8170), free_port_in(8170, 8190)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    processes: list[subprocess.Popen[bytes]] = []
    async with EtcdClient(etcd_endpoint) as etcd:
        registrars = [await _register(etcd, prefix, a, "a"), await _register(etcd, prefix, b, "b")]
        try:
            processes = [_router_process(p, etcd_endpoint, prefix, tmp_path / f"router-{p}.log")
                         for p in ports]
            for url in urls:
                await _ready(client, url, 2)
                assert await _served_by(client, url) == {"a", "b"}
            # A stream through router 0 when it dies: the client retries on router 1.
            request = {"model": "tiny", "prompt": "x", "stream": True}
            with pytest.raises(aiohttp.ClientError):
                async with asyncio.timeout(10), client.post(urls[0] + "/v1/completions",
                                                            json=request) as r:
                    assert r.status == 200
                    await r.content.readany()
                    processes[0].send_signal(signal.SIGKILL)
                    processes[0].wait(5)
                    await r.read()
            async with asyncio.timeout(10), client.post(urls[1] + "/v1/completions",
                                                        json=request) as r:
                assert r.status == 200
                text = await r.text()
            assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text
            # Restarted, router 0 finds the instances in etcd again and serves.
            processes[0] = _router_process(ports[0], etcd_endpoint, prefix,
                                           tmp_path / f"router-{ports[0]}.log")
            await _ready(client, urls[0], 2)
            assert await _served_by(client, urls[0]) == {"a", "b"}
            assert await _served_by(client, urls[1]) == {"a", "b"}
        finally:
            for process in processes:
                process.kill()
                process.wait()
            await _stop(*registrars)
