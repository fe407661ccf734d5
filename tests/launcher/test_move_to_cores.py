"""A running process tree, every thread of it, moves to other cores on request."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from xllm_plugin.launcher.engine import ManagedProcess, free_port

# A server with a thread of its own and a child process, like vLLM's API server, engine
# core and worker with their OpenMP threads. The thread pins itself first, as vLLM binds
# its compute threads one by one.
SERVER = """
import http.server, os, subprocess, sys, threading, time
port, core = int(sys.argv[1]), int(sys.argv[2])
def spin():
    os.sched_setaffinity(0, {core})
    while True:
        time.sleep(0.05)
threading.Thread(target=spin, daemon=True).start()
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
http.server.HTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def _affinities(pid: int) -> list[set[int]]:
    """Every thread's allowed cores, for ``pid`` and its children."""
    import psutil

    root = psutil.Process(pid)
    return [os.sched_getaffinity(thread.id)
            for process in (root, *root.children(recursive=True))
            for thread in process.threads()]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux affinity and two cores")
def test_every_thread_of_the_tree_moves(tmp_path: Path) -> None:
    first, second = sorted(os.sched_getaffinity(0))[:2]
    port = free_port()
    server = ManagedProcess("tree", [sys.executable, "-c", SERVER, str(port), str(first)],
                            dict(os.environ), f"http://127.0.0.1:{port}/", tmp_path / "log")
    with server.start(timeout_s=30):
        before = _affinities(server.process.pid)
        assert len(before) >= 3 and {first} in before  # the self-pinned thread
        moved = server.move_to_cores({second})
        after = _affinities(server.process.pid)
    assert moved == len(after) >= 3
    assert all(cores == {second} for cores in after)
