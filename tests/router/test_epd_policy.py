"""EPD strategy model and profiler-driven chooser (router/policies/epd.py): pure functions."""

from __future__ import annotations

import pytest

from router.policies.epd import (
    STRATEGY_CODES,
    EPDConfig,
    EPDController,
    EPDProfiler,
    LinearCost,
    StageCosts,
    WorkloadSummary,
    estimate_goodput,
    max_feasible,
    profile_limits,
    splits,
    summarize_requests,
)


def linear_costs(encode_ms_per_token: float = 0.01, prefill_ms_per_token: float = 0.02,
                 decode_ms_per_seq: float = 0.1, base_ms: float = 5.0) -> StageCosts:
    """Round numbers: a step is ``base + prefill*t + decode*seqs`` ms; encode is per image token."""
    return StageCosts(
        encode_s=lambda images, per_image: images * per_image * encode_ms_per_token * 1e-3,
        step_s=lambda t, seqs, ctx: (base_ms + prefill_ms_per_token * t
                                     + decode_ms_per_seq * seqs) * 1e-3,
        encode_overhead_s=base_ms * 1e-3)


def summary(**kw: float) -> WorkloadSummary:
    fields = dict(rate=10.0, image_tokens=1000.0, images=1.0, text_tokens=100.0,
                  output_tokens=100.0)
    fields.update(kw)
    return WorkloadSummary(**fields)


def test_max_feasible_finds_the_boundary_and_reports_infeasible() -> None:
    assert max_feasible(lambda x: x <= 37, 1, 100) == 37
    assert max_feasible(lambda x: x <= 500, 1, 100) == 100
    assert max_feasible(lambda x: False, 1, 100) == 0


def test_limits_keep_the_step_under_the_tpot_slo() -> None:
    costs = linear_costs()
    s = summary()
    lim = profile_limits(costs, s, slo_ttft_s=1.0, slo_tpot_s=0.05, headroom=1.0, decode_seqs=50)
    ctx = int(50 * (s.prompt_tokens + s.output_tokens / 2))
    step = costs.step_s
    assert step(lim.token_budget, 50, ctx) <= 0.05 < step(lim.token_budget + 1, 50, ctx)
    # 5 ms base + 5 ms of decodes leave 40 ms: 4 images of 1000 tokens at 10 us/token
    assert lim.encode_batch_beside_decode == 4
    # a quarter of the 1 s TTFT, minus the 5 ms overhead: 24 images
    assert lim.encode_batch_dedicated == 24


def test_linear_cost_fit_recovers_coefficients() -> None:
    samples = [((t, b), 0.004 + 2e-5 * t + 1e-4 * b) for t in (0, 256, 1024, 4096)
               for b in (1, 8, 64)]
    fit = LinearCost.fit(samples)
    assert fit.coef == pytest.approx((0.004, 2e-5, 1e-4), rel=1e-6)
    assert fit(2048, 16) == pytest.approx(0.004 + 2e-5 * 2048 + 1e-4 * 16)


def test_splits_cover_every_pool_and_configs_are_validated() -> None:
    assert len(splits("none", 4)) == 1
    assert [c.label for c in splits("EP-D", 3)] == ["EP-D EP1:D2", "EP-D EP2:D1"]
    assert all(c.instances == 5 and min(c.encode, c.prefill, c.decode) >= 1
               for c in splits("E-P-D", 5))
    assert len(splits("E-P-D", 5)) == 6
    assert [c.label for c in splits("E-PD", 3)] == ["E-PD E1:PD2", "E-PD E2:PD1"]
    with pytest.raises(ValueError):
        EPDConfig("EP-D", encode=2, prefill=1, decode=1)
    assert STRATEGY_CODES == {"none": 0, "EP-D": 1, "ED-P": 2, "E-P-D": 3, "E-PD": 4}


def test_summary_and_shift() -> None:
    s = summarize_requests([(0.0, 100, 1000, 1, 50), (1.0, 300, 0, 0, 150),
                            (2.0, 200, 500, 2, 100)])
    assert s.rate == pytest.approx(1.0)
    assert (s.text_tokens, s.image_tokens, s.images, s.output_tokens) == (200, 500, 1, 100)
    assert s.shift(s) == 0.0
    assert summary().shift(summary(image_tokens=1500)) == pytest.approx(0.405, abs=0.01)


def choose_by_estimate(profiler: EPDProfiler, s: WorkloadSummary) -> EPDConfig:
    return profiler.choose(s, lambda config, estimate: estimate).config


def test_batch_friendly_encoder_moves_off_the_decode_path() -> None:
    """An encoder with a fixed 20 ms per batch (weights read once per batch) and a tight TPOT
    SLO: beside decodes only one image fits a step, a dedicated encoder batches 64, so the
    splits that encode apart from decodes win and most instances encode."""
    base = linear_costs(prefill_ms_per_token=0.001)
    costs = StageCosts(encode_s=lambda images, per_image: 0.02 + images * per_image * 1e-6,
                       step_s=base.step_s, encode_overhead_s=base.encode_overhead_s)
    profiler = EPDProfiler(costs, slo_ttft_s=2.0, slo_tpot_s=0.025, instances=8)
    s = summary(image_tokens=2000, output_tokens=20)
    assert profiler.limits(s).encode_batch_beside_decode == 1
    chosen = choose_by_estimate(profiler, s)
    assert chosen.strategy in ("EP-D", "E-P-D", "E-PD")
    assert chosen.encode_batch == 64


def test_text_only_long_outputs_keep_everything_aggregated_or_decode_heavy() -> None:
    """No images: an encoder pool would idle, so E-P-D is never best; decode dominates."""
    costs = linear_costs()
    profiler = EPDProfiler(costs, slo_ttft_s=2.0, slo_tpot_s=0.05, instances=8)
    s = summary(image_tokens=0, images=0, output_tokens=500)
    chosen = choose_by_estimate(profiler, s)
    assert chosen.strategy != "E-P-D"
    epd = max(estimate_goodput(profiler.configure(c, s, 10.0)[0], costs, s,
                               profiler.configure(c, s, 10.0)[1], 0.05)
              for c in splits("E-P-D", 8))
    best = max(est for _, _, est in profiler.candidates(s))
    assert epd < best


def test_fixed_configs_are_the_only_candidates() -> None:
    """A live deployment keeps its roles: the profiler compares only the configs it can run
    (here 1 encoder beside 3 language-model instances, used or bypassed)."""
    live = (EPDConfig("none", encode=3), EPDConfig("E-PD", encode=1, prefill=3))
    profiler = EPDProfiler(linear_costs(), slo_ttft_s=1.0, slo_tpot_s=0.05, instances=3,
                           configs=live)
    labels = [c.label for c, _, _ in profiler.candidates(summary())]
    assert labels == ["none EPD3", "E-PD E1:PD3"]
    probe = Probe({"none": 5.0, "E-PD": 6.0})
    assert profiler.choose(summary(), probe).config.label == "E-PD E1:PD3"
    assert probe.calls == 2


class Probe:
    """A goodput measurement the test controls: value per strategy, every call counted."""

    def __init__(self, values: dict[str, float]) -> None:
        self.values = values
        self.calls = 0

    def __call__(self, config: EPDConfig, estimate: float) -> float:
        self.calls += 1
        return self.values[config.strategy] + 0.01 * config.encode  # ties broken by split


def test_controller_hysteresis() -> None:
    profiler = EPDProfiler(linear_costs(), slo_ttft_s=1.0, slo_tpot_s=0.05, instances=4)
    controller = EPDController(profiler, shift_threshold=0.25, switch_margin=0.1)
    probe = Probe({"none": 10.0, "EP-D": 8.0, "ED-P": 8.0, "E-P-D": 8.0, "E-PD": 8.0})
    first = controller.update(summary(), probe)
    assert first.config.strategy == "none"
    calls = probe.calls
    # a small shift: no re-profiling at all
    assert controller.update(summary(image_tokens=1100), probe).config == first.config
    assert probe.calls == calls
    # a large shift, but the new best is only 5% better: stay
    probe.values = {"none": 10.0, "EP-D": 10.5, "ED-P": 8.0, "E-P-D": 8.0, "E-PD": 8.0}
    moved = summary(image_tokens=2000)
    stayed = controller.update(moved, probe)
    assert stayed.config.strategy == "none" and probe.calls > calls
    # staying keeps the split but takes the limits profiled for the new traffic
    retuned = profiler.configure(EPDConfig("none", encode=4), moved, profiler.design_rate(moved))
    assert stayed.config == retuned[0] and stayed.summary == moved
    # another large shift with a clearly better strategy: switch
    probe.values = {"none": 10.0, "EP-D": 15.0, "ED-P": 8.0, "E-P-D": 8.0, "E-PD": 8.0}
    switched = controller.update(summary(image_tokens=4000), probe)
    assert switched.config.strategy == "EP-D"
    assert [event for event, _ in controller.history] == ["pick", "keep", "stay", "switch"]
