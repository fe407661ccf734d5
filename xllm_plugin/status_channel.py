"""Hands the scheduler's live state from the engine-core process to the API server.

The scheduler runs in the engine-core process while ``/xllm/status`` is served
by the API-server process, and vLLM's endpoint-plugin contract forbids opening
new RPC paths into the engine. The scheduler therefore writes a small JSON
snapshot to a file that the API server reads. The file name travels as an
environment variable that the API-server process sets before it starts the
engine, so every child process agrees on it without any configuration.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

ENV_VAR = "XLLM_STATUS_FILE"


def _status_dir() -> Path:
    """``/dev/shm`` where the host has it, else the temp directory.

    Snapshots are rewritten every ``status_interval_ms`` from the engine's step path;
    a write and rename took ~0.14 ms in RAM-backed ``/dev/shm`` against ~0.5 ms in a
    disk-backed ``/tmp`` (2026-12-05, this project's CPU host).
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return Path(tempfile.gettempdir())


def ensure_status_path() -> Path:
    """Return this server's snapshot path, choosing one if no parent process did."""
    existing = os.environ.get(ENV_VAR)
    if existing:
        return Path(existing)
    path = _status_dir() / f"xllm-status-{os.getpid()}.json"
    os.environ[ENV_VAR] = str(path)
    atexit.register(_remove_with_siblings, path)
    return path


def _remove_with_siblings(path: Path) -> None:
    """The snapshot and the files named after it (other processes' snapshots such as
    xTensor's, temporaries of a writer that died mid-write): in /dev/shm they hold RAM."""
    for stale in [path, *path.parent.glob(f"{path.stem}.*")]:
        with contextlib.suppress(OSError):
            stale.unlink()


def read_status() -> dict[str, Any] | None:
    """The latest snapshot, or None before the engine has published one."""
    path = os.environ.get(ENV_VAR)
    if not path:
        return None
    try:
        return msgspec.json.decode(Path(path).read_bytes())
    except (OSError, msgspec.DecodeError):
        return None


class StatusPublisher:
    """Writes snapshots atomically (write then rename), at most once per interval.

    The snapshot is built only when it will be written, since callers publish
    from the scheduler's per-step path. ``force=True`` bypasses the interval;
    callers use it when the engine goes idle so that the state at rest is
    always the one on disk.
    """

    def __init__(self, interval_s: float) -> None:
        self._path = Path(os.environ.get(ENV_VAR) or ensure_status_path())
        self._interval_s = interval_s
        self._last_write = 0.0

    def publish(self, make_snapshot: Callable[[], dict[str, Any]], force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self._last_write < self._interval_s:
            return False
        self._last_write = now
        tmp = self._path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(msgspec.json.encode(make_snapshot()))
        os.replace(tmp, self._path)
        return True
