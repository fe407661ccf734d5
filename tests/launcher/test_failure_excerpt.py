"""A failed start's error keeps the engine core's root cause (xllm_plugin/launcher/engine.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from xllm_plugin.launcher.engine import EngineStartError, ManagedProcess, failure_excerpt, free_port

# Like vllm serve when its engine core fails: the cause first, the API server's traceback last.
SCRIPT = """
print("INFO starting", flush=True)
print("Traceback (most recent call last):", flush=True)
print("RuntimeError: xllm kv_store: Mooncake Store setup failed (-1)", flush=True)
for i in range(80):
    print(f"  frame {i}", flush=True)
print("RuntimeError: Engine core initialization failed. See root cause above.", flush=True)
raise SystemExit(1)
"""


def test_a_short_log_is_returned_whole() -> None:
    text = "a\nTraceback (most recent call last):\nValueError: x"
    assert failure_excerpt(text) == text


def test_the_first_traceback_comes_before_the_tail() -> None:
    lines = ["INFO up", "Traceback (most recent call last):", "OSError: cause",
             *[f"line {i}" for i in range(100)], "RuntimeError: see root cause above"]
    excerpt = failure_excerpt("\n".join(lines), first_lines=3, tail_lines=5).splitlines()
    assert excerpt[:3] == ["Traceback (most recent call last):", "OSError: cause", "line 0"]
    assert excerpt[3] == "... (95 lines) ..."
    assert excerpt[4:] == lines[-5:]


def test_without_a_traceback_only_the_tail_is_kept() -> None:
    lines = [f"line {i}" for i in range(50)]
    assert failure_excerpt("\n".join(lines), tail_lines=4).splitlines() == lines[-4:]


def test_an_exited_process_reports_its_root_cause(tmp_path: Path) -> None:
    proc = ManagedProcess("fail-test", [sys.executable, "-c", SCRIPT], {},
                          f"http://127.0.0.1:{free_port()}/", tmp_path / "fail.log")
    with pytest.raises(EngineStartError) as failure:
        try:
            proc.start(timeout_s=30)
        finally:
            proc.stop()
    message = str(failure.value)
    assert "exited with 1" in message
    assert "Mooncake Store setup failed (-1)" in message
    assert "See root cause above" in message
