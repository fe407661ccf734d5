"""Expert-load statistics inside a real engine: the tiny Qwen3-MoE under ``vllm serve``,
compiled (vLLM's CPU default), so the counts prove the hook was installed before compilation."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xllm_plugin.launcher.engine import EngineProcess, EngineSpec, free_port
from xllm_plugin.models import build_model

pytestmark = pytest.mark.engine

TOP_K = 2
NUM_EXPERTS = 8
WINDOW = 16
MOE_ARGS = ["--load-format", "xllm",
            "--worker-extension-cls", "xllm_plugin.moe.worker.MoEStatsExtension",
            "--dtype", "float32", "--max-num-seqs", "4", "--no-enable-prefix-caching"]


def rpc(url: str, method: str) -> Any:
    """vLLM's /collective_rpc (VLLM_SERVER_DEV_MODE=1): one result per worker."""
    request = urllib.request.Request(url + "/collective_rpc",
                                     data=json.dumps({"method": method}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 (loopback)
        return json.loads(response.read())["results"][0]


def complete(url: str, prompt: str, max_tokens: int) -> dict[str, int]:
    body = {"model": "moe", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310
        return json.loads(response.read())["usage"]


@pytest.fixture(scope="module")
def moe_engine() -> Iterator[EngineProcess]:
    """Compiled mode (no --enforce-eager): the hook must be in the graph vLLM compiles."""
    model: Path = build_model("tiny-moe")
    spec = EngineSpec(model=model, port=free_port(), served_model_name="moe", plugin=True,
                      xllm_config={"moe": {"load_window_steps": WINDOW}}, extra_args=MOE_ARGS,
                      env={"VLLM_SERVER_DEV_MODE": "1"})
    engine = EngineProcess(spec)
    engine.command = [arg for arg in engine.command if arg != "--enforce-eager"]
    with engine:
        yield engine


def test_capture_hook_counts_every_routed_token_per_layer(moe_engine: EngineProcess) -> None:
    assert rpc(moe_engine.url, "xllm_moe_reset") == {"reset": True}  # drop warm-up routings
    prompts = ["The quick brown fox jumps over the lazy dog near the river bank.",
               "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
               "Bonjour, je voudrais réserver une table pour deux personnes ce soir.",
               "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20"]
    computed = 0
    for prompt in prompts:
        usage = complete(moe_engine.url, prompt, max_tokens=12)
        # Prefill computes the prompt; each decode step one token; the last one is never fed.
        computed += usage["prompt_tokens"] + usage["completion_tokens"] - 1
    load = rpc(moe_engine.url, "xllm_moe_load")
    assert load["num_experts"] == NUM_EXPERTS
    assert len(load["layer_ids"]) == 4  # every layer of the tiny model is a MoE layer
    for layer in load["total"]:
        assert sum(layer) == TOP_K * computed  # nothing lost, nothing counted twice
    # Random router weights route real text unevenly: some experts are hot.
    hottest = max(max(layer) / (sum(layer) / NUM_EXPERTS) for layer in load["total"])
    assert hottest > 1.2


def test_sliding_window_keeps_only_the_last_steps(moe_engine: EngineProcess) -> None:
    rpc(moe_engine.url, "xllm_moe_reset")
    complete(moe_engine.url, "Count slowly: one, two, three,", max_tokens=3 * WINDOW)
    load = rpc(moe_engine.url, "xllm_moe_load")
    assert load["steps"] >= 3 * WINDOW
    assert load["window_filled_steps"] == WINDOW
    for window, total in zip(load["window"], load["total"]):
        # The window holds WINDOW single-token decode steps: TOP_K routings each.
        assert sum(window) == TOP_K * WINDOW
        assert sum(total) > sum(window)


def test_eplb_policy_selection_explains_that_cpu_has_no_eplb(moe_engine: EngineProcess) -> None:
    request = urllib.request.Request(moe_engine.url + "/collective_rpc",
                                     data=json.dumps({"method": "xllm_eplb_use_policy"}).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(request, timeout=60)  # noqa: S310
    assert "vLLM EPLB is not enabled" in moe_engine.log_path.read_text()
