"""Sorting requests into the online and offline classes (paper §3.1).

Pure code: the scheduler, the status endpoint and tests share it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from xllm_plugin.config import RequestClassConfig

RequestClass = Literal["online", "offline"]
CLASSES: tuple[RequestClass, ...] = ("online", "offline")
XARG_KEY = "request_class"


def classify(priority: int, extra_args: Mapping[str, Any] | None,
             config: RequestClassConfig) -> RequestClass:
    """An explicit ``vllm_xargs.request_class`` wins; otherwise the priority decides."""
    named = (extra_args or {}).get(XARG_KEY)
    if named in CLASSES:
        return named
    if priority >= config.offline_min_priority:
        return "offline"
    if priority != 0:
        return "online"
    return config.default_class
