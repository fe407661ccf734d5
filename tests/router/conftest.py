"""Fixtures for the router tests: fake engines, in-process routers, a real etcd, real engines.

Async fixtures and tests here share the session event loop (the project sets
``asyncio_default_fixture_loop_scope = "session"``; each test module sets
``pytestmark = pytest.mark.asyncio(loop_scope="session")`` to match). Real engines and etcd are started once per session.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from router.config import RouterConfig
from router.server.app import Router, listen
from xllm_plugin.launcher.engine import port_is_free
from etcd_server import EtcdServer
from router_fakes import FakeEngine, wait_for  # noqa: F401 (re-exported)

# Ports reserved for the router tests (8100-8199, ZMQ 5600-5649) so parallel work
# on this machine does not collide.
ENGINE_PORTS = (8110, 8111)
KV_EVENT_PORTS = ((5600, 5601), (5602, 5603))
NIXL_SIDE_CHANNEL_PORTS = (5604, 5605)  # P->D KV transfer (NixlConnector kv_both)
ETCD_PORTS = (8190, 8191)
ROUTER_TEST_BLOCK_SIZE = 128


def free_port_in(lo: int, hi: int) -> int:
    for port in range(lo, hi):
        if port_is_free(port):
            return port
    raise RuntimeError(f"no free port in {lo}-{hi}")


RouterFactory = Callable[..., Awaitable[tuple[Router, str]]]


@pytest_asyncio.fixture
async def start_router() -> AsyncIterator[RouterFactory]:
    """Start routers in-process on free ports; ``await start_router(instances=[...], ...)``."""
    runners: list[web.AppRunner] = []

    async def start(**settings: Any) -> tuple[Router, str]:
        values = {"scrape_interval_s": 0.1, "unhealthy_after": 2, **settings}
        instances = values.pop("instances", [])
        config = RouterConfig.from_args({"instances": list(instances), **values})
        router = Router(config)
        runner, url = await listen(router)
        runners.append(runner)
        return router, url

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest_asyncio.fixture
async def fakes() -> AsyncIterator[tuple[FakeEngine, FakeEngine]]:
    a, b = FakeEngine("a"), FakeEngine("b")
    await a.start()
    await b.start()
    yield a, b
    await a.stop()
    await b.stop()


@pytest_asyncio.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


# -- real etcd ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def etcd_endpoint() -> Iterator[str]:
    """A real etcd server (Debian etcd-server) on loopback, for this test session."""
    exe = shutil.which("etcd")
    if exe is None:
        pytest.skip("etcd not installed (apt-get install etcd-server)")
    server = EtcdServer(exe, *etcd_ports())
    server.start()
    yield server.endpoint
    server.remove()


def etcd_ports() -> tuple[int, int]:
    """A free client port and peer port in the range reserved for the router tests' etcd."""
    client_port = free_port_in(ETCD_PORTS[0], 8199)
    return client_port, free_port_in(client_port + 1, 8200)


# -- real engines -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def router_engines() -> Iterator[list[Any]]:
    """Two real tiny-model ``vllm serve`` (plugin scheduler on one, stock vLLM on the other),
    each publishing KV events and able to act as prefill or decode instance (NixlConnector,
    ``kv_both``), per test module: NIXL's progress thread busy-polls a core per engine, and
    kept for the whole session they starved every engine later tests started (pytest's
    "package" scope does not end with a folder that has no ``__init__.py``).

    Run engine tests under ``flock /tmp/xllm-vllm.lock`` (two cores, shared machine).
    """
    from xllm_plugin.launcher.engine import (EngineProcess, EngineSpec, pd_engine_args,
                                             start_engines)
    from xllm_plugin.models import model_path

    model = model_path("tiny")
    specs = []
    for i, (port, (pub, replay)) in enumerate(zip(ENGINE_PORTS, KV_EVENT_PORTS)):
        if not port_is_free(port):
            pytest.skip(f"port {port} busy")
        kv_events = ('{"enable_kv_cache_events":true,"publisher":"zmq",'
                     f'"endpoint":"tcp://*:{pub}","replay_endpoint":"tcp://*:{replay}",'
                     '"topic":"kv"}')
        pd_args, pd_env = pd_engine_args(NIXL_SIDE_CHANNEL_PORTS[i])
        specs.append(EngineSpec(model=model, port=port, served_model_name="tiny",
                                plugin=(i == 0), cpu_bind=str(i),
                                block_size=ROUTER_TEST_BLOCK_SIZE,
                                # float32: a P->D decode must equal the whole request's
                                # greedy output (bf16 rounding differs between the two paths)
                                extra_args=["--enable-prefix-caching", "--kv-events-config",
                                            kv_events, "--dtype", "float32", *pd_args],
                                # The stock engine loads only the general entry point:
                                # it pauses NIXL's progress thread (nixl_progress.py).
                                env=pd_env if i == 0 else {**pd_env, "VLLM_PLUGINS": "xllm"}))
    engines = [EngineProcess(spec, log_path=Path(f"/tmp/xllm-router-test-engine-{spec.port}.log"))
               for spec in specs]
    try:
        start_engines(engines, timeout_s=240)
        yield engines
    finally:
        for engine in engines:
            engine.stop()


def kv_instance_spec(engine: Any, index: int) -> str:
    pub, replay = KV_EVENT_PORTS[index]
    return (f"{engine.url};id=engine-{index};kv=tcp://127.0.0.1:{pub};"
            f"replay=tcp://127.0.0.1:{replay}")


