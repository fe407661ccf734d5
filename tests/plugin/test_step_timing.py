"""StepTiming: planning error and inter-step gaps of SLO-sized steps."""

from __future__ import annotations

from xllm_plugin.scheduler.step_timing import StepTiming


def run_step(timing: StepTiming, start: float, compute_ms: float, gap_ms: float, *,
             predicted_ms: float | None = 50.0, limit_ms: float | None = 100.0,
             constrained: bool = True, busy: bool = True) -> float:
    """One step beginning at ``start`` (s); returns when the next one begins."""
    timing.step_began(start)
    end = start + compute_ms / 1000
    timing.step_finished(end, compute_ms, predicted_ms, limit_ms, constrained)
    timing.outputs_sent(busy=busy)
    return end + gap_ms / 1000


def test_gap_pushes_a_step_inside_its_limit_over_it() -> None:
    timing = StepTiming()
    t = run_step(timing, 0.0, compute_ms=90.0, gap_ms=20.0)
    timing.step_began(t)
    status = timing.status()
    assert status["sized_steps"] == 1
    assert status["sized_steps_compute_over_limit"] == 0
    assert status["sized_steps_over_limit"] == 1  # 90 + 20 > 100
    assert status["compute_over_predicted_p50"] == 1.8
    assert abs(status["gap_ms_p50"] - 20.0) < 1e-6


def test_idle_wait_is_not_a_gap() -> None:
    timing = StepTiming()
    t = run_step(timing, 0.0, compute_ms=90.0, gap_ms=5000.0, busy=False)
    timing.step_began(t)
    status = timing.status()
    assert status["gap_ms_p50"] is None
    assert status["sized_steps_over_limit"] == 0


def test_unsized_steps_count_gaps_but_not_errors() -> None:
    timing = StepTiming()
    t = 0.0
    for _ in range(3):
        t = run_step(timing, t, compute_ms=400.0, gap_ms=10.0, predicted_ms=None,
                     limit_ms=None, constrained=False)
    timing.step_began(t)
    status = timing.status()
    assert status["sized_steps"] == 0
    assert status["compute_over_predicted_p50"] is None
    assert abs(status["gap_ms_p90"] - 10.0) < 1e-6


def test_percentiles_follow_the_window() -> None:
    timing = StepTiming(window=4)
    t = 0.0
    for compute in (10.0, 10.0, 10.0, 10.0, 100.0, 100.0, 100.0, 100.0):
        t = run_step(timing, t, compute_ms=compute, gap_ms=1.0, predicted_ms=50.0)
    assert timing.status()["compute_over_predicted_p50"] == 2.0  # the old steps left
