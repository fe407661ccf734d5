"""Engine scheduling: XLLMScheduler and its policies (request classes, later SLO budget).

``XLLMScheduler`` is imported lazily so that the pure policy modules here can be
used and tested without vLLM installed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["XLLMScheduler"]


def __getattr__(name: str) -> Any:
    if name == "XLLMScheduler":
        from xllm_plugin.scheduler.xllm_scheduler import XLLMScheduler

        return XLLMScheduler
    raise AttributeError(name)
