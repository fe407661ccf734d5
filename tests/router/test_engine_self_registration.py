"""A ``vllm serve`` with ``xllm.registration`` registers itself in a real etcd and leaves on exit."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from router.discovery.etcd import EtcdClient
from xllm_plugin.launcher.cluster import kv_events_args
from xllm_plugin.launcher.engine import EngineProcess, EngineSpec, free_port

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

PREFIX = "/xllm-self-registration-test/"
TTL_S = 3


async def _records(endpoint: str) -> dict[str, dict]:
    async with EtcdClient(endpoint) as etcd:
        values, _ = await etcd.get_prefix(PREFIX)
    return {kv.key: json.loads(kv.value) for kv in values}


async def _wait_for(predicate, timeout_s: float):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = await predicate()
        if result:
            return result
        await asyncio.sleep(0.3)
    raise AssertionError("condition not reached")


async def test_engine_registers_itself_with_its_kv_event_endpoints(etcd_endpoint: str,
                                                                   tiny_model_dir: Path) -> None:
    kv_args, publish, replay = kv_events_args(40)
    spec = EngineSpec(model=tiny_model_dir, port=free_port(), served_model_name="tiny",
                      xllm_config={"registration": {"etcd": etcd_endpoint, "prefix": PREFIX,
                                                    "role": "prefill", "ttl_s": TTL_S}},
                      extra_args=kv_args)
    with EngineProcess(spec) as engine:
        records = await _wait_for(lambda: _records(etcd_endpoint), timeout_s=30)
        status = httpx.get(f"{engine.url}/xllm/status").json()
        key = f"{PREFIX}127.0.0.1:{spec.port}"
        assert list(records) == [key]
        record = records[key]
        assert record["url"] == engine.url
        assert record["model"] == "tiny"
        assert record["role"] == "prefill"
        assert record["block_size"] == spec.block_size
        assert (record["kv_events_endpoint"], record["kv_events_replay_endpoint"]) == (publish, replay)
        assert status["features"]["etcd_registration"] is True

    async def gone() -> bool:
        return not await _records(etcd_endpoint)

    assert await _wait_for(gone, timeout_s=TTL_S + 10)
