"""xTensor's live metrics, handed from the worker process to ``/xllm/status``.

The worker owns the KV memory, and on multi-process executors it is neither the
engine-core process (where the scheduler publishes) nor the API server. It writes its
own snapshot next to the scheduler's (``XLLM_STATUS_FILE`` with ``.xtensor`` before the
suffix); the status route reads both. Imports neither torch nor vLLM.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from xllm_plugin.status_channel import ENV_VAR, ensure_status_path


def xtensor_status_path() -> Path | None:
    base = os.environ.get(ENV_VAR)
    if not base:
        return None
    path = Path(base)
    return path.with_name(f"{path.stem}.xtensor{path.suffix}")


def read_xtensor_status() -> dict[str, Any] | None:
    """The worker's latest xTensor snapshot, or None (feature off or not yet published)."""
    path = xtensor_status_path()
    if path is None:
        return None
    try:
        return msgspec.json.decode(path.read_bytes())
    except (OSError, msgspec.DecodeError):
        return None


class XTensorStatusWriter:
    """Atomic snapshot writes, at most once per interval (callers publish per step)."""

    def __init__(self, interval_s: float) -> None:
        ensure_status_path()
        path = xtensor_status_path()
        assert path is not None
        self._path = path
        self._interval_s = interval_s
        self._last = 0.0

    def publish(self, make_snapshot: Callable[[], dict[str, Any]], force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self._last < self._interval_s:
            return False
        self._last = now
        body = make_snapshot()
        body["published_at"] = time.time()
        body["worker_pid"] = os.getpid()
        tmp = self._path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(msgspec.json.encode(body))
        os.replace(tmp, self._path)
        return True
