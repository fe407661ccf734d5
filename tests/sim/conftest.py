"""Shared helpers for simulator tests: a hand-made deployment with round step times."""

from __future__ import annotations

import pytest

from router.sim.perf_model import Deployment, LinearStepModel


def tiny_deployment(**overrides) -> Deployment:
    """Steps cost 10 ms + 0.1 ms per prefill token + 1 ms per decode sequence; nothing else."""
    fields = dict(name="test", step_model=LinearStepModel(10.0, 0.1, 0.0, 1.0, 0.0), block_size=16,
                  num_kv_blocks=1000, max_num_batched_tokens=512, max_num_seqs=64,
                  max_model_len=100_000, kv_bytes_per_token=1000.0, transfer_bytes_per_s=1e6,
                  transfer_latency_ms=5.0, default_slo_ttft_ms=1000.0, default_slo_tpot_ms=100.0)
    fields.update(overrides)
    return Deployment(**fields)


@pytest.fixture
def deployment() -> Deployment:
    return tiny_deployment()
