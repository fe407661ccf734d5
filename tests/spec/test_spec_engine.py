"""Adaptive speculation in a real engine: same greedy tokens as no speculation, and it adapts.

SmolLM2 rather than the tiny random model: random weights rarely repeat themselves, so
n-gram drafts would almost never exist and the test would prove nothing.
"""

from __future__ import annotations

import json
import statistics
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from xllm_plugin.launcher.engine import EngineProcess, EngineSpec, free_port, http_get_json
from xllm_plugin.models import build_model
from xllm_plugin.spec.step_log import read_step_log

pytestmark = pytest.mark.engine

# float32 so that equality compares decisions, not rounding in different batch layouts.
ARGS = ["--max-num-seqs", "4", "--dtype", "float32"]
NGRAM = {"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_max": 4,
         "prompt_lookup_min": 2}
PROMPTS = [  # copy-heavy prompts (drafts accepted) and free text (drafts rejected)
    "Repeat exactly: apples, pears, plums, figs, dates, limes, kiwis, grapes.\nAnswer:",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "The weather today is",
    "Once upon a time, in a small village by the sea,",
]


def _complete(url: str, prompt: str, extra: dict[str, Any] | None = None) -> list[str]:
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": 48, "temperature": 0.0,
            "ignore_eos": True, "logprobs": 0, **(extra or {})}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:  # noqa: S310 (loopback)
        return json.loads(response.read())["choices"][0]["logprobs"]["tokens"]


def _all(url: str) -> list[list[str]]:
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrently: batches of mixed lengths
        return list(pool.map(lambda p: _complete(url, p), PROMPTS))


def _draft_tokens(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:  # noqa: S310
        for line in response.read().decode().splitlines():
            if line.startswith("vllm:spec_decode_num_draft_tokens_total"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def reference_and_adaptive(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Outputs of stock vLLM without speculation, then of the adaptive engine (one at a time)."""
    step_log = tmp_path_factory.mktemp("spec") / "steps.jsonl"
    model = build_model("smollm2")
    stock = EngineSpec(model=model, port=free_port(), served_model_name="smollm2",
                       plugin=False, extra_args=ARGS)
    with EngineProcess(stock) as engine:
        reference = _all(engine.url)
    adaptive = EngineSpec(model=model, port=free_port(), served_model_name="smollm2",
                          plugin=True, xllm_config={"speculative": {
                              "adaptive": True, "step_log": str(step_log)}},
                          extra_args=[*ARGS, "--speculative-config", json.dumps(NGRAM)])
    with EngineProcess(adaptive) as engine:
        outputs = _all(engine.url)
        status = http_get_json(engine.url + "/xllm/status")["engine"]["speculative"]
        steps = read_step_log(step_log)
        before = _draft_tokens(engine.url)
        capped = _complete(engine.url, PROMPTS[0], {"vllm_xargs": {"spec_max_k": 0}})
        after = _draft_tokens(engine.url)
        fixed = _complete(engine.url, PROMPTS[0], {"vllm_xargs": {"spec_k": 8}})
        fixed_after = _draft_tokens(engine.url)
        fixed_status = http_get_json(engine.url + "/xllm/status")["engine"]["speculative"]
    return {"reference": reference, "outputs": outputs, "status": status, "steps": steps,
            "capped": capped, "capped_drafts": after - before,
            "fixed": fixed, "fixed_drafts": fixed_after - after,
            "fixed_steps": fixed_status["fixed_length_request_steps"]}


def test_adaptive_speculation_gives_the_same_greedy_tokens_as_none(
        reference_and_adaptive: dict[str, Any]) -> None:
    assert reference_and_adaptive["outputs"] == reference_and_adaptive["reference"]


def test_adaptive_speculation_verified_drafts_and_chose_varying_lengths(
        reference_and_adaptive: dict[str, Any]) -> None:
    status = reference_and_adaptive["status"]
    assert status["drafts_verified"] >= 20
    assert status["judged_proposals"] > 0
    assert len(status["chosen_lengths"]) >= 2  # not one fixed K
    assert status["cost_model_samples"] > 0
    # Judged proposals were compared with the g(i) the rule saw for them.
    rows = [row for context in status["calibration"].values() for row in context]
    assert rows and all(0.0 <= predicted <= 1.0 and 0.0 <= realized <= 1.0
                        for predicted, realized, _ in rows)
    # n-gram drafts are filed by how far their source agrees with the text (spec/source.py):
    # the copy-heavy prompts' proposals are not all in one agreement bucket.
    buckets = {context.split("/")[1] for context in status["calibration"]}
    assert len(buckets) >= 2, status["calibration"]


def test_the_step_log_holds_every_step_with_its_accepted_drafts(
        reference_and_adaptive: dict[str, Any]) -> None:
    steps, status = reference_and_adaptive["steps"], reference_and_adaptive["status"]
    assert sum(step["drafts"] for step in steps) == status["drafts_verified"]
    pairs = [pair for step in steps for pair in step["verified"]]
    assert pairs and all(0 <= accepted <= verified for verified, accepted in pairs)
    assert any(accepted > 0 for _, accepted in pairs)
    assert all(step["ms"] > 0 for step in steps)
    # The host's work between steps, from the second step on: positive, and (the median)
    # a fraction of a step, since most steps follow the previous one directly.
    gaps = [step["gap"] for step in steps if "gap" in step]
    assert len(gaps) == len(steps) - 1 and all(gap > 0 for gap in gaps)
    assert statistics.median(gaps) < statistics.median(step["ms"] for step in steps)
    assert status["output_rate_tokens_per_ms"]  # learned from the tokens the steps produced


def test_a_request_can_switch_speculation_off_for_itself(
        reference_and_adaptive: dict[str, Any]) -> None:
    assert reference_and_adaptive["capped_drafts"] == 0
    assert reference_and_adaptive["capped"] == reference_and_adaptive["reference"][0]


def test_a_request_can_fix_its_own_speculation_length(
        reference_and_adaptive: dict[str, Any]) -> None:
    assert reference_and_adaptive["fixed_steps"] > 0
    assert reference_and_adaptive["fixed_drafts"] > 0
    assert reference_and_adaptive["fixed"] == reference_and_adaptive["reference"][0]


def test_adaptive_without_speculative_config_fails_fast_with_a_clear_error(
        tiny_model_dir: Path) -> None:
    import subprocess

    spec = EngineSpec(model=tiny_model_dir, port=free_port(), served_model_name="tiny",
                      xllm_config={"speculative": {"adaptive": True}}, extra_args=ARGS)
    result = subprocess.run(spec.command(), env=spec.environment(), capture_output=True,
                            text=True, timeout=240)
    assert result.returncode != 0
    assert "needs vLLM speculative decoding: pass --speculative-config" in \
        result.stdout + result.stderr
