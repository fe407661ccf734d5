"""NIXL's progress thread on CPU hosts: poll with a pause instead of spinning.

vLLM's NixlConnector (P->D KV transfer) creates its NIXL agent through nixl's Python
API, which starts the agent's progress thread with a poll delay of 0: the thread spins,
and an idle engine burns a whole core. On a GPU host that is one host core of many; on a
CPU engine pinned to one core it takes the engine's own compute. Measured here (tiny
model, two engines pinned to one core each, 64 greedy tokens): idle load 1.0 core per
engine with NIXL's default, 0.03 with a 1 ms pause; P->D decodes equal to the direct
answer in both cases. (The engines' slow decoding measured beside this was another fault:
vLLM's connector moved the compute thread off its core, see ``nixl_affinity.py``.)
Switching the thread off instead (``enable_prog_thread=False``) hung the prefill
instance's worker inside NIXL after its first prefill, in two of three tries.

``XLLM_NIXL_PROGRESS_DELAY_US=N``: the progress thread sleeps N microseconds between
polls. Read by the plugin's general entry point, so it reaches every vLLM process that
loads the plugin; ``xllm_plugin.launcher.engine.pd_engine_args`` sets it for CPU
engines. Unset: NIXL's own behaviour. The patch waits for nixl to be imported
(``xllm_plugin/import_hooks.py``).
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from xllm_plugin.config import XLLMConfigError
from xllm_plugin.import_hooks import patch_on_import

ENV = "XLLM_NIXL_PROGRESS_DELAY_US"
MAX_DELAY_US = 1_000_000
# The module of each nixl build that defines ``nixl_agent`` (it calls
# ``nixlBind.nixlAgent(name, config)`` after setting ``config.pthrDelay = 0``).
NIXL_API_MODULES = ("nixl_cu12._api", "nixl_cu13._api", "nixl_rocm._api")


def delay_from_env(environ: dict[str, str] | os._Environ[str] = os.environ) -> int | None:
    """The configured pause in microseconds, or None when unset; a bad value is an error."""
    raw = environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        delay = int(raw)
    except ValueError:
        delay = -1
    if not 0 <= delay <= MAX_DELAY_US:
        raise XLLMConfigError(f"{ENV}={raw!r}: expected microseconds, an integer in "
                         f"0..{MAX_DELAY_US}")
    return delay


def pause_progress_thread(api: ModuleType, delay_us: int) -> None:
    """Make every agent that ``api`` creates from now on pause ``delay_us`` between polls."""
    bindings = api.nixlBind
    create = bindings.nixlAgent
    if getattr(create, "xllm_delay_us", None) is not None:
        create = create.xllm_original

    def create_with_pause(name: str, config: Any) -> Any:
        config.pthrDelay = delay_us
        return create(name, config)

    create_with_pause.xllm_delay_us = delay_us  # type: ignore[attr-defined]
    create_with_pause.xllm_original = create  # type: ignore[attr-defined]
    bindings.nixlAgent = create_with_pause


def install_from_env() -> int | None:
    """Apply ``XLLM_NIXL_PROGRESS_DELAY_US`` to nixl, now if it is imported, else when it
    is. Idempotent. Returns the delay, or None when unset."""
    delay = delay_from_env()
    if delay is None:
        return None
    patch_on_import(NIXL_API_MODULES, "nixl-progress-delay",
                    lambda api: pause_progress_thread(api, delay))
    return delay
