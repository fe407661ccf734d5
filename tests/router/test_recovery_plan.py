"""Recompute vs move when a request's instance fails (router/policies/recovery.py)."""

from __future__ import annotations

import pytest

from router.policies.recovery import ResumeCandidate, plan_resume

LLAMA8B_KV = 131072.0  # bytes per token, bf16
TEN_GBIT = 10e9 / 8 / 1e3  # bytes per ms


def test_prefill_instance_holding_the_prompt_wins_over_an_idle_one():
    """Under PD the prefill instance kept the prompt's blocks: only generated tokens re-run."""
    plan = plan_resume([ResumeCandidate("idle", 0.5),
                        ResumeCandidate("p", 0.5, queued_tokens=500, local_cached_tokens=2000)],
                       prompt_tokens=2000, generated_tokens=100,
                       kv_bytes_per_token=LLAMA8B_KV, transfer_bytes_per_ms=TEN_GBIT)
    assert (plan.instance_id, plan.mode) == ("p", "move")
    assert plan.estimate_ms == pytest.approx((500 + 100) * 0.5)
    assert plan.recompute_estimate_ms == pytest.approx(2100 * 0.5)
    assert plan.transfer_tokens == 0


def test_busy_kv_holder_loses_to_recomputation_on_an_idle_instance():
    plan = plan_resume([ResumeCandidate("idle", 0.5),
                        ResumeCandidate("p", 0.5, queued_tokens=8000, local_cached_tokens=2000)],
                       prompt_tokens=2000, generated_tokens=100,
                       kv_bytes_per_token=LLAMA8B_KV, transfer_bytes_per_ms=TEN_GBIT)
    assert (plan.instance_id, plan.mode) == ("idle", "recompute")


def test_store_blocks_are_fetched_only_when_the_link_beats_prefill():
    store = ResumeCandidate("a", 0.5, remote_cached_tokens=4000)
    fast = plan_resume([store], prompt_tokens=4000, generated_tokens=0,
                       kv_bytes_per_token=LLAMA8B_KV, transfer_bytes_per_ms=TEN_GBIT)
    # 128 KiB per token over 10 Gbit/s: ~0.105 ms per token, cheaper than 0.5 ms of prefill.
    assert fast.mode == "move" and fast.transfer_tokens == 4000
    assert fast.estimate_ms == pytest.approx(4000 * LLAMA8B_KV / TEN_GBIT)
    slow = plan_resume([store], prompt_tokens=4000, generated_tokens=0,
                       kv_bytes_per_token=LLAMA8B_KV, transfer_bytes_per_ms=TEN_GBIT / 100)
    assert slow.mode == "recompute" and slow.transfer_tokens == 0
    assert slow.estimate_ms == pytest.approx(4000 * 0.5)


def test_cached_counts_are_clipped_to_the_prompt():
    plan = plan_resume([ResumeCandidate("a", 1.0, local_cached_tokens=10_000,
                                        remote_cached_tokens=10_000)],
                       prompt_tokens=100, generated_tokens=20,
                       kv_bytes_per_token=LLAMA8B_KV, transfer_bytes_per_ms=TEN_GBIT)
    assert plan.estimate_ms == pytest.approx(20.0) and plan.transfer_tokens == 0


def test_no_candidate_is_an_error():
    with pytest.raises(ValueError):
        plan_resume([], prompt_tokens=1, generated_tokens=0, kv_bytes_per_token=1.0,
                    transfer_bytes_per_ms=1.0)
