"""A process whose start hangs silently is restarted once (xllm_plugin/launcher/engine.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from xllm_plugin.launcher import engine
from xllm_plugin.launcher.engine import EngineStartError, ManagedProcess, free_port

# First start: leave a marker and hang without a word. Second start: serve HTTP at once.
SCRIPT = """
import http.server, pathlib, sys, time
marker = pathlib.Path(sys.argv[1])
if not marker.exists():
    marker.write_text("hung once")
    time.sleep(600)
print("serving", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[2])), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def _process(tmp_path: Path, marker: Path) -> ManagedProcess:
    port = free_port()
    return ManagedProcess("stall-test", [sys.executable, "-c", SCRIPT, str(marker), str(port)],
                          {}, f"http://127.0.0.1:{port}/", tmp_path / "stall.log")


def test_a_silent_hang_at_start_is_restarted_once(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "STALL_S", 1.0)
    marker = tmp_path / "marker"
    with _process(tmp_path, marker) as proc:
        assert marker.read_text() == "hung once"
        assert "serving" in proc.log_tail()


def test_a_second_hang_fails_with_the_timeout(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "STALL_S", 1.0)
    proc = ManagedProcess("stall-test", [sys.executable, "-c", "import time; time.sleep(600)"],
                          {}, f"http://127.0.0.1:{free_port()}/", tmp_path / "stall.log")
    with pytest.raises(EngineStartError, match="not healthy after 4s"):
        proc.start(timeout_s=4)  # hangs, is restarted once, hangs again until the timeout
