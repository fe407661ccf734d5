"""Where the status snapshots live, and that they go away with the server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

WRITER = """
from xllm_plugin.status_channel import ensure_status_path
path = ensure_status_path()
path.write_text("{}")
sibling = path.with_name(f"{path.stem}.xtensor{path.suffix}")  # the worker's snapshot
sibling.write_text("{}")
print(path, sibling)
"""


def test_snapshots_live_in_shared_memory_and_are_removed_at_exit() -> None:
    env = {k: v for k, v in os.environ.items() if k != "XLLM_STATUS_FILE"}
    done = subprocess.run([sys.executable, "-c", WRITER], env=env, capture_output=True,
                          text=True, check=True, timeout=120)
    path, sibling = (Path(p) for p in done.stdout.split())
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        assert path.parent == shm  # a RAM-backed rename on the engine's step path
    assert not path.exists() and not sibling.exists()
