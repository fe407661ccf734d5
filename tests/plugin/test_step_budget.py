"""Step-latency model and SLO-aware budget on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from xllm_plugin.scheduler.budget import OnlineDecode, banked_step_limit, plan_step_budget
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


def test_model_fits_short_and_long_steps_in_relative_terms() -> None:
    # Mostly decode-only steps of ~20-30 ms and some prefill steps of up to ~2 s whose
    # per-token cost falls with chunk size (short chunks run less efficient matmuls).
    # A fit ruled by the long steps predicted the short ones 50% too long; the
    # relative-error fit must get both within 10%.
    def truth(work: StepWork) -> float:
        n = work.prefill_tokens
        return (12 + 2.0 * work.decode_tokens + 4 * work.context_tokens / 1000 + 5.5 * n
                + 120 * (1 - np.exp(-n / 64)))

    rng = np.random.default_rng(1)
    model = StepLatencyModel(window=512)
    for _ in range(400):
        prefill = int(rng.integers(16, 400)) if rng.random() < 0.3 else 0
        work = StepWork(prefill, int(rng.integers(1, 8)), int(rng.integers(100, 3000)))
        model.observe(work, truth(work) * rng.lognormal(0.0, 0.05))
    for probe in (StepWork(0, 2, 1000), StepWork(0, 6, 2000), StepWork(300, 4, 2000)):
        assert model.predict_ms(probe) == pytest.approx(truth(probe), rel=0.1)


def test_model_keeps_prior_for_features_that_never_varied() -> None:
    model = StepLatencyModel(prior_ms=(1.0, 0.1, 0.7, 0.3), min_samples=4, refit_every=1)
    for tokens in (10, 20, 30, 40, 50):
        model.observe(StepWork(prefill_tokens=tokens), 2.0 + 0.05 * tokens)
    assert model.coefficients[2] == 0.7 and model.coefficients[3] == 0.3
    assert model.coefficients[1] == pytest.approx(0.05, rel=1e-6)


def test_model_scales_its_prior_before_it_can_fit() -> None:
    # A host 27x slower per prefill token than the prior (float32 on one AVX2 core):
    # one measured step pulls predictions from ~100 ms to near the truth, not 2 s off.
    true = np.array([41.0, 5.5, 8.0, 13.0])
    model = StepLatencyModel(min_samples=16)
    first, probe = StepWork(512, 2, 1000), StepWork(400, 4, 2000)
    naive = model.predict_ms(probe)
    model.observe(first, float(true @ first.features()))
    truth = float(true @ probe.features())
    assert naive < truth / 10
    assert model.predict_ms(probe) == pytest.approx(truth, rel=0.25)
    assert model.samples == 1


def test_max_prefill_fits_the_budget() -> None:
    model = StepLatencyModel(prior_ms=(5.0, 0.25, 1.0, 0.0))
    # 5 + 1*10 = 15 ms fixed; 85 ms left / 0.25 ms per token = 340 tokens.
    assert model.max_prefill_tokens(decode_tokens=10, context_tokens=0, budget_ms=100) == 340
    assert model.max_prefill_tokens(decode_tokens=10, context_tokens=0, budget_ms=10) == 0


def test_no_prefill_fits_once_the_fixed_cost_exceeds_the_budget() -> None:
    # A fit that measured prefill tokens as free must not lift the cap then.
    model = StepLatencyModel(prior_ms=(5.0, 0.0, 1.0, 0.0))
    assert model.max_prefill_tokens(decode_tokens=10, context_tokens=0, budget_ms=10) == 0
    assert model.max_prefill_tokens(decode_tokens=1, context_tokens=0, budget_ms=10) == 1 << 30


def _plan(**overrides):  # type: ignore[no-untyped-def]
    args = dict(online_decodes=4, online_context_tokens=0, offline_decode_contexts=[0] * 4,
                offline_prefills=[], tightest_tpot_slo_ms=50.0, ttft_slo_ms=None,
                offline_present=True, max_budget=2048, min_prefill=16, headroom=1.0,
                online_prefill_tokens=0, online_waiting=False)
    args.update(overrides)
    return plan_step_budget(StepLatencyModel(prior_ms=(2.0, 0.1, 0.5, 0.0)), **args)


def test_no_online_decode_means_full_budget() -> None:
    decision = _plan(online_decodes=0)
    assert decision.tokens == 2048 and not decision.constrained


def test_ttft_slo_bounds_offline_steps_while_no_online_request_decodes() -> None:
    # Limit 1.0 x 100 ms / 2 = 50 ms: 2 + 4 offline decodes x 0.5 = 4 ms; 460 prefill tokens.
    decision = _plan(online_decodes=0, ttft_slo_ms=100.0)
    assert decision.constrained and decision.slo_ms == 100.0 and decision.tokens == 4 + 460
    # Nothing offline to bound: an online-only engine keeps the configured budget.
    assert _plan(online_decodes=0, ttft_slo_ms=100.0, offline_decode_contexts=[],
                 offline_present=False).tokens == 2048


def test_no_slo_means_full_budget() -> None:
    assert _plan(tightest_tpot_slo_ms=None).tokens == 2048


def test_online_decodes_with_slo_cap_the_prefill() -> None:
    # fixed = 2 + 0.5*8 = 6 ms; (50 - 6) / 0.1 = 440 prefill tokens + 8 decodes.
    decision = _plan()
    assert decision.constrained and decision.tokens == 448
    assert decision.planned_ms == pytest.approx(50.0)


def test_tight_slo_still_lets_min_prefill_through_for_online_prefill() -> None:
    decision = _plan(tightest_tpot_slo_ms=1.0, online_prefill_tokens=100, online_waiting=True,
                     offline_prefills=[(0, 100)])
    assert decision.tokens == 4 + 16 and decision.held_offline_prefills == (0,)
    assert decision.held_offline_decodes == (0, 1, 2, 3)


def test_floor_never_exceeds_the_online_prefill_left() -> None:
    assert _plan(tightest_tpot_slo_ms=1.0, online_prefill_tokens=5).tokens == 4 + 5


def test_tight_slo_gives_offline_work_nothing() -> None:
    # No online prefill pending: the floor does not apply; only online decodes run.
    decision = _plan(tightest_tpot_slo_ms=1.0, offline_prefills=[(0, 100)])
    assert decision.tokens == 4 and decision.held_offline_prefills == (0,)
    assert decision.held_offline_decodes == (0, 1, 2, 3)


def test_offline_decodes_join_first_fit_by_their_context_cost() -> None:
    # 2 ms + 4 online decodes x 0.5 ms = 4 ms; each offline decode 0.5 ms + 1 ms per 1k
    # context: with a 6 ms SLO the 3k-context one does not fit, the short ones after it do.
    model = StepLatencyModel(prior_ms=(2.0, 0.1, 0.5, 1.0))
    decision = plan_step_budget(
        model, online_decodes=4, online_context_tokens=0,
        offline_decode_contexts=[500, 3000, 100, 100], offline_prefills=[],
        tightest_tpot_slo_ms=6.0, ttft_slo_ms=None, offline_present=True, max_budget=2048,
        min_prefill=16, headroom=1.0, online_prefill_tokens=0, online_waiting=False)
    assert decision.held_offline_decodes == (1, 3)
    assert decision.planned_ms <= 6.0


def test_offline_prefill_keeps_what_online_prefill_leaves() -> None:
    # 440 prefill tokens fit; 100 online tokens already running take the first of them
    # (running order), the running offline chunk the rest.
    decision = _plan(online_prefill_tokens=100, offline_prefills=[(0, 1000)])
    assert decision.tokens == 448 and decision.held_offline_prefills == ()


def test_offline_prefill_sits_out_while_online_waits() -> None:
    # A waiting online request comes after running offline chunks in vLLM's order.
    waiting = _plan(online_prefill_tokens=100, online_waiting=True, offline_prefills=[(0, 500)])
    assert waiting.held_offline_prefills == (0,)
    # Online prefill that needs every prefill token of the step holds offline chunks too.
    assert _plan(online_prefill_tokens=1000, offline_prefills=[(0, 500)]).held_offline_prefills \
        == (0,)


def test_deep_offline_chunks_sit_out_while_fresh_ones_fit() -> None:
    # 2 + 8 decodes x 0.5 = 6 ms; a chunk 50k tokens into its prompt adds 50 ms of context:
    # over the 50 ms SLO even for one token. The fresh chunk after it takes the 440 tokens.
    model = StepLatencyModel(prior_ms=(2.0, 0.1, 0.5, 1.0))
    decision = plan_step_budget(
        model, online_decodes=4, online_context_tokens=0, offline_decode_contexts=[0] * 4,
        offline_prefills=[(50_000, 1000), (0, 1000)], tightest_tpot_slo_ms=50.0,
        ttft_slo_ms=None, offline_present=True, max_budget=2048, min_prefill=16, headroom=1.0,
        online_prefill_tokens=0, online_waiting=False)
    assert decision.held_offline_prefills == (0,) and decision.tokens == 8 + 440
    assert decision.planned_ms <= 50.0


def test_budget_never_exceeds_the_configured_maximum() -> None:
    assert _plan(tightest_tpot_slo_ms=10_000.0, max_budget=512).tokens == 512


def test_banked_limit_spends_only_slack_already_earned() -> None:
    # SLO 100 ms, headroom 0.9: 10 tokens in 450 ms -> 0.9 * 100 * 10 - 450 = 450 ms step.
    ahead = OnlineDecode(slo_ms=100.0, tokens=10, elapsed_ms=450.0)
    assert banked_step_limit([ahead], 0.9, cap_ms=5000.0) == pytest.approx(450.0)
    # After such a step the mean is (450 + 450) / 10 = 90 ms: exactly headroom * SLO.
    # A fresh request has one token and nothing banked: one SLO's worth.
    fresh = OnlineDecode(slo_ms=100.0, tokens=1, elapsed_ms=0.0)
    assert banked_step_limit([ahead, fresh], 0.9, cap_ms=5000.0) == pytest.approx(90.0)
    # Behind its SLO (steps ran over their prediction): what is left, down to nothing.
    late = OnlineDecode(slo_ms=100.0, tokens=10, elapsed_ms=850.0)
    assert banked_step_limit([late], 0.9, cap_ms=5000.0) == pytest.approx(50.0)
    behind = OnlineDecode(slo_ms=100.0, tokens=10, elapsed_ms=2000.0)
    assert banked_step_limit([behind], 0.9, cap_ms=5000.0) == 0.0
    # The TTFT cap binds, but not below one SLO's worth.
    assert banked_step_limit([ahead], 0.9, cap_ms=200.0) == pytest.approx(200.0)
    assert banked_step_limit([ahead], 0.9, cap_ms=10.0) == pytest.approx(90.0)
    assert banked_step_limit([], 0.9, cap_ms=10.0) is None


def test_a_request_behind_its_slo_gets_a_bare_step() -> None:
    # Limit 0: online decodes and the online prefill floor only; offline work sits out.
    decision = _plan(online_prefill_tokens=100, offline_prefills=[(0, 500)], tpot_limit_ms=0.0)
    assert decision.tokens == 4 + 16
    assert decision.held_offline_decodes == (0, 1, 2, 3)


def test_banked_limit_lets_online_prefill_take_a_bigger_step() -> None:
    # Per-step limit 50 ms: fixed 2 + 0.5 * 4 = 4 ms leaves 460 prefill tokens.
    assert _plan(online_prefill_tokens=2000, offline_decode_contexts=[]).tokens == 4 + 460
    # 150 ms banked: (150 - 4) / 0.1 = 1460 tokens, and limit/predicted report it.
    decision = _plan(online_prefill_tokens=2000, offline_decode_contexts=[],
                     tpot_limit_ms=150.0)
    assert decision.tokens == 4 + 1460
    assert decision.limit_ms == 150.0 and decision.slo_ms == 50.0
    assert decision.planned_ms is not None and decision.planned_ms <= 150.0 + 1e-6
