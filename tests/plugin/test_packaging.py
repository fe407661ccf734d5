"""Packaging promises: the router installs without torch/vllm; models build reproducibly offline."""

from __future__ import annotations

import hashlib
import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_router_installs_and_imports_in_a_venv_without_torch(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", str(REPO)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    probe = ("import sys, importlib.util, router, router.policies, router.bench.load; "
             "assert importlib.util.find_spec('torch') is None, 'torch installed'; "
             "assert importlib.util.find_spec('vllm') is None, 'vllm installed'; "
             "assert 'torch' not in sys.modules and 'vllm' not in sys.modules; print('ok')")
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr
    router_help = subprocess.run([str(env_dir / "bin" / "xllm-bench"), "--help"],
                                 capture_output=True, text=True, timeout=120)
    assert router_help.returncode == 0, router_help.stderr


def _digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_tiny_model_builds_identically_twice(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from xllm_plugin.models import build_model

    first = _digest(build_model("tiny", tmp_path / "a"))
    second = _digest(build_model("tiny", tmp_path / "b"))
    assert first == second


def test_model_build_is_cached_and_rebuilt_on_force(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from xllm_plugin.models import build_model

    path = build_model("tiny", tmp_path)
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_model("tiny", tmp_path) == path
    assert weights.stat().st_mtime_ns == stamp
    build_model("tiny", tmp_path, force=True)
    assert weights.stat().st_mtime_ns != stamp
