"""Step-latency model and SLO-aware budget on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from xllm_plugin.scheduler.budget import plan_step_budget
from xllm_plugin.scheduler.step_model import StepLatencyModel, StepWork

TRUE_MS = np.array([4.0, 0.5, 2.0, 1.5])


def _true_ms(work: StepWork) -> float:
    return float(TRUE_MS @ work.features())


def test_model_learns_coefficients_from_observed_steps() -> None:
    rng = np.random.default_rng(0)
    model = StepLatencyModel(window=256, min_samples=16, refit_every=4)
    for _ in range(200):
        work = StepWork(int(rng.integers(0, 512)), int(rng.integers(0, 32)),
                        int(rng.integers(0, 8000)))
        model.observe(work, _true_ms(work) * rng.normal(1.0, 0.02))
    assert np.allclose(model.coefficients, TRUE_MS, rtol=0.1, atol=0.3)
    probe = StepWork(256, 8, 4000)
    assert model.predict_ms(probe) == pytest.approx(_true_ms(probe), rel=0.05)


def test_model_keeps_prior_for_features_that_never_varied() -> None:
    model = StepLatencyModel(prior_ms=(1.0, 0.1, 0.7, 0.3), min_samples=4, refit_every=1)
    for tokens in (10, 20, 30, 40, 50):
        model.observe(StepWork(prefill_tokens=tokens), 2.0 + 0.05 * tokens)
    assert model.coefficients[2] == 0.7 and model.coefficients[3] == 0.3
    assert model.coefficients[1] == pytest.approx(0.05, rel=1e-6)


def test_max_prefill_fits_the_budget() -> None:
    model = StepLatencyModel(prior_ms=(5.0, 0.25, 1.0, 0.0))
    # 5 + 1*10 = 15 ms fixed; 85 ms left / 0.25 ms per token = 340 tokens.
    assert model.max_prefill_tokens(decode_tokens=10, context_tokens=0, budget_ms=100) == 340
    assert model.max_prefill_tokens(decode_tokens=10, context_tokens=0, budget_ms=10) == 0


def _plan(**overrides):  # type: ignore[no-untyped-def]
    args = dict(online_decodes=4, offline_decodes=4, context_tokens=0,
                tightest_tpot_slo_ms=50.0, max_budget=2048, min_prefill=16, headroom=1.0)
    args.update(overrides)
    return plan_step_budget(StepLatencyModel(prior_ms=(2.0, 0.1, 0.5, 0.0)), **args)


def test_no_online_decode_means_full_budget() -> None:
    decision = _plan(online_decodes=0)
    assert decision.tokens == 2048 and not decision.constrained


def test_no_slo_means_full_budget() -> None:
    assert _plan(tightest_tpot_slo_ms=None).tokens == 2048


def test_online_decodes_with_slo_cap_the_prefill() -> None:
    # fixed = 2 + 0.5*8 = 6 ms; (50 - 6) / 0.1 = 440 prefill tokens + 8 decodes.
    decision = _plan()
    assert decision.constrained and decision.tokens == 448
    assert decision.predicted_ms == pytest.approx(50.0)


def test_tight_slo_still_lets_min_prefill_through() -> None:
    assert _plan(tightest_tpot_slo_ms=1.0).tokens == 8 + 16


def test_budget_never_exceeds_the_configured_maximum() -> None:
    assert _plan(tightest_tpot_slo_ms=10_000.0, max_budget=512).tokens == 512
