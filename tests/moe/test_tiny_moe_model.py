"""The tiny MoE test model is built offline and reproducibly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from xllm_plugin.models import build_model


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_tiny_moe_builds_byte_identical_with_eight_experts_top_two(tmp_path: Path) -> None:
    cached = build_model("tiny-moe")
    fresh = build_model("tiny-moe", tmp_path)
    assert _digest(fresh) == _digest(cached)
    config = json.loads((fresh / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert config["num_local_experts"] == 8 and config["num_experts_per_tok"] == 2
