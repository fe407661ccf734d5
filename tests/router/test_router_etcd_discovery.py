"""Cluster mode against a real etcd: registration, lease expiry, deregistration, watch resync."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid

import pytest
from router_fakes import FakeEngine, wait_for

from router.discovery.etcd import EtcdClient, prefix_range_end
from router.discovery.records import InstanceRecord
from router.discovery.registrar import Registrar

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _prefix() -> str:
    return f"/xllm-test/{uuid.uuid4().hex[:8]}/"


async def test_prefix_range_end_covers_exactly_the_prefix():
    assert prefix_range_end("/a/") == b"/a0"
    assert prefix_range_end("\u00e9") == b"\xc3\xaa"  # UTF-8 bytes, last one incremented


async def test_etcd_client_put_range_lease_and_watch(etcd_endpoint):
    prefix = _prefix()
    async with EtcdClient(etcd_endpoint) as etcd:
        lease = await etcd.grant(5)
        await etcd.put(prefix + "x", "1", lease=lease)
        kvs, revision = await etcd.get_prefix(prefix)
        assert [(kv.key, kv.value) for kv in kvs] == [(prefix + "x", b"1")]
        assert await etcd.keepalive(lease) == 5
        events = []

        async def watch() -> None:
            async for event in etcd.watch_prefix(prefix, revision + 1):
                events.append((event.kind, event.key))
                if len(events) == 2:
                    return

        task = asyncio.create_task(watch())
        await asyncio.sleep(0.2)
        await etcd.put(prefix + "y", "2")
        await etcd.revoke(lease)  # deletes x
        await asyncio.wait_for(task, 5)
        assert events == [("PUT", prefix + "y"), ("DELETE", prefix + "x")]
        assert await etcd.keepalive(lease) == 0


async def test_registered_instance_is_routed_and_leaves_on_deregistration(
        etcd_endpoint, fakes, start_router, client):
    a, _ = fakes
    prefix = _prefix()
    router, url = await start_router(etcd=etcd_endpoint, etcd_prefix=prefix)
    assert not router.load.instances
    async with EtcdClient(etcd_endpoint) as etcd:
        record = InstanceRecord(instance_id="fake-a", url=a.url, model="tiny",
                                kv_events_endpoint="tcp://127.0.0.1:5649", block_size=128)
        registrar = Registrar(etcd, record, prefix=prefix, ttl_s=3)
        task = asyncio.create_task(registrar.run())
        await wait_for(lambda: "fake-a" in router.load.instances
                       and router.load.instances["fake-a"].healthy, 10, "registration")
        kvs, _ = await etcd.get_prefix(prefix)
        value = json.loads(kvs[0].value)
        assert value["url"] == a.url and value["model"] == "tiny" and value["incarnation"]
        async with client.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x"}) as r:
            assert r.status == 200 and r.headers["x-xllm-instance"] == "fake-a"
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        took = await wait_for(lambda: "fake-a" not in router.load.instances, 3, "removal")
        assert took < 1.0  # deregistration deletes the key: no need to wait for the TTL
        assert not (await etcd.get_prefix(prefix))[0]


async def test_instance_disappears_within_lease_ttl_when_its_registrar_dies(
        etcd_endpoint, fakes, start_router):
    a, _ = fakes
    prefix, ttl = _prefix(), 3
    router, _ = await start_router(etcd=etcd_endpoint, etcd_prefix=prefix)
    process = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "register", "--etcd", etcd_endpoint, "--url", a.url,
         "--model", "tiny", "--id", "doomed", "--etcd-prefix", prefix, "--ttl", str(ttl)])
    try:
        await wait_for(lambda: "doomed" in router.load.instances, 15, "registration")
        killed_at = time.monotonic()
        process.send_signal(signal.SIGKILL)  # no chance to deregister: only the lease can
        await wait_for(lambda: "doomed" not in router.load.instances, ttl + 3, "lease expiry")
        assert time.monotonic() - killed_at <= ttl + 1.5
    finally:
        process.kill()
        process.wait()


async def test_registrar_cli_deregisters_on_sigterm(etcd_endpoint, fakes, start_router):
    a, _ = fakes
    prefix = _prefix()
    router, _ = await start_router(etcd=etcd_endpoint, etcd_prefix=prefix)
    process = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "register", "--etcd", etcd_endpoint, "--url", a.url,
         "--model", "tiny", "--id", "polite", "--etcd-prefix", prefix, "--ttl", "30"])
    try:
        await wait_for(lambda: "polite" in router.load.instances, 15, "registration")
        process.send_signal(signal.SIGTERM)
        await wait_for(lambda: "polite" not in router.load.instances, 3, "deregistration")
        assert process.wait(5) == 0
    finally:
        process.kill()
        process.wait()


async def test_registrar_waits_for_health_and_deregisters_an_unhealthy_engine(
        etcd_endpoint, start_router):
    engine = FakeEngine("late")
    engine.behaviour.health_status = 503
    await engine.start()
    prefix = _prefix()
    router, _ = await start_router(etcd=etcd_endpoint, etcd_prefix=prefix)
    async with EtcdClient(etcd_endpoint) as etcd:
        registrar = Registrar(etcd, InstanceRecord(instance_id="late", url=engine.url,
                                                   model="tiny"),
                              prefix=prefix, ttl_s=3, health_interval_s=0.2, unhealthy_after=2)
        task = asyncio.create_task(registrar.run())
        try:
            await asyncio.sleep(1.0)
            assert "late" not in router.load.instances  # not healthy yet: not registered
            engine.behaviour.health_status = 200
            await wait_for(lambda: "late" in router.load.instances, 5, "registration")
            engine.behaviour.health_status = 500
            await wait_for(lambda: "late" not in router.load.instances, 5, "deregistration")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await engine.stop()


async def test_router_started_before_instances_and_malformed_values_are_ignored(
        etcd_endpoint, fakes, start_router):
    a, b = fakes
    prefix = _prefix()
    async with EtcdClient(etcd_endpoint) as etcd:
        await etcd.put(prefix + "garbage", "not json")
        await etcd.put(prefix + "b", InstanceRecord(instance_id="b", url=b.url,
                                                    model="tiny").to_etcd_value())
        router, _ = await start_router(etcd=etcd_endpoint, etcd_prefix=prefix)
        assert set(router.load.instances) == {"b"}
        await etcd.put(prefix + "a", InstanceRecord(instance_id="a", url=a.url,
                                                    model="tiny").to_etcd_value())
        await wait_for(lambda: set(router.load.instances) == {"a", "b"}, 5, "watch to add a")
        await etcd.delete(prefix + "b")
        await wait_for(lambda: set(router.load.instances) == {"a"}, 5, "watch to drop b")
        await etcd.delete(prefix + "a")
        await etcd.delete(prefix + "garbage")
