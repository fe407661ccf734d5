"""A local cluster: N ``vllm serve`` instances with the plugin and, optionally, the router.

Instances start in parallel, each pinned to its own core, because on a small
machine two engines that share cores are slower than two that do not. Each
instance publishes its KV-cache events on loopback so the router can route by
cached prefix.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from xllm_plugin.launcher.engine import EngineProcess, EngineSpec, ManagedProcess, start_engines

KV_EVENTS_BASE_PORT = 5557  # instance i publishes on base + 2i, replays on base + 2i + 1


def kv_events_args(index: int) -> tuple[list[str], str, str]:
    """``vllm serve`` flags that publish instance ``index``'s KV events, and their endpoints."""
    publish = f"tcp://127.0.0.1:{KV_EVENTS_BASE_PORT + 2 * index}"
    replay = f"tcp://127.0.0.1:{KV_EVENTS_BASE_PORT + 2 * index + 1}"
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": publish,
              "replay_endpoint": replay, "topic": "kv"}
    return ["--enable-prefix-caching", "--kv-events-config", json.dumps(config)], publish, replay


@dataclass(frozen=True)
class RouterSpec:
    """How the launcher runs ``xllm-router`` in front of the instances."""

    port: int
    policy: str
    tokenizer_dir: Path
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self, engines: Sequence[EngineSpec], kv_endpoints: Sequence[tuple[str, str]]) -> list[str]:
        exe = shutil.which("xllm-router") or str(Path(sys.executable).with_name("xllm-router"))
        instances = [f"{spec.url};id=instance-{i};kv={pub};replay={replay};block_size={spec.block_size}"
                     for i, (spec, (pub, replay)) in enumerate(zip(engines, kv_endpoints))]
        return [exe, "--host", self.host, "--port", str(self.port), "--policy", self.policy,
                "--instances", ",".join(instances), "--tokenizer", str(self.tokenizer_dir),
                "--block-size", str(engines[0].block_size)]


@dataclass
class LocalCluster:
    """Owns the processes of one local run; a context manager."""

    specs: list[EngineSpec]
    router: RouterSpec | None = None
    kv_endpoints: list[tuple[str, str]] = field(default_factory=list)
    engines: list[EngineProcess] = field(default_factory=list)
    router_process: ManagedProcess | None = None

    @classmethod
    def of(cls, count: int, base_port: int, make_spec: Callable[[int, int, str], EngineSpec],
           router: RouterSpec | None = None) -> LocalCluster:
        """``count`` instances on consecutive ports; ``make_spec(index, port, cpu_bind)``.

        With a router, every instance also publishes KV events for it.
        """
        cores = os.cpu_count() or 1
        specs, endpoints = [], []
        for i in range(count):
            spec = make_spec(i, base_port + i, str(i % cores))
            if router is not None:
                args, publish, replay = kv_events_args(i)
                spec.extra_args = [*spec.extra_args, *args]
                endpoints.append((publish, replay))
            specs.append(spec)
        return cls(specs, router, endpoints)

    @property
    def urls(self) -> list[str]:
        return [spec.url for spec in self.specs]

    @property
    def front_url(self) -> str:
        """Where clients go: the router if there is one, else the first instance."""
        return self.router.url if self.router else self.urls[0]

    def start(self, timeout_s: float = 300.0) -> LocalCluster:
        self.engines = [EngineProcess(spec) for spec in self.specs]
        try:
            start_engines(self.engines, timeout_s)
            if self.router is not None:
                self.router_process = ManagedProcess(
                    "xllm-router", self.router.command(self.specs, self.kv_endpoints),
                    dict(os.environ), self.router.url + "/health",
                    Path(f"/tmp/xllm-router-{self.router.port}.log"))
                self.router_process.start(timeout_s)
        except BaseException:
            self.stop()  # whatever did start
            raise
        return self

    def stop(self) -> None:
        if self.router_process is not None:
            self.router_process.stop()
        for engine in self.engines:
            engine.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
