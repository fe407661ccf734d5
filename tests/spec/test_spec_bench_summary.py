"""spec_adaptive's summary: ratios from per-cell medians, and the host-probe correction that
takes a drift shared by the engine and the probe out of them."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import spec_adaptive as bench  # noqa: E402

# Throughput at nominal host speed, by configuration (the same in every cell, scaled by c).
TRUE_TPS = {"none": 10.0, "k2": 12.0, "k4": 13.0, "k8": 13.5, "table": 13.2, "adaptive": 13.6}


def drifting_rows(with_probe: bool = True) -> list[dict]:
    """Three repetitions; each engine (one per configuration and repetition) runs on a host
    slowed by its own factor, which the probe sees as a longer time."""
    rng = random.Random(1)
    rows = []
    for rep in range(3):
        for config in bench.CONFIGS:
            slowdown = rng.uniform(0.8, 1.25)
            for prompt_set in bench.PROMPT_SETS:
                for c in bench.CONCURRENCY:
                    row = {"config": config, "rep": rep, "set": prompt_set, "c": c,
                           "tps": TRUE_TPS[config] * c / slowdown}
                    if with_probe:
                        row["probe_ms"] = 90.0 * slowdown
                    rows.append(row)
    return rows


def test_probe_correction_recovers_the_ratios_at_one_host_speed() -> None:
    out: dict = {}
    bench.cell_medians(drifting_rows(), out)
    truth = TRUE_TPS["adaptive"] / TRUE_TPS["k8"]
    for c in bench.CONCURRENCY:
        assert out[f"corrected_ratio_vs_best_static_c{c}"] == pytest.approx(truth)
        assert out[f"corrected_ratio_vs_table_c{c}"] == pytest.approx(
            TRUE_TPS["adaptive"] / TRUE_TPS["table"])
    assert out["corrected_spread_median"] == pytest.approx(0.0, abs=1e-12)
    assert out["spread_median"] > 0.1
    # The measured ratios still carry the drift: some cell is off by more than 1%.
    assert any(abs(out[f"ratio_vs_best_static_c{c}"] - truth) > 0.01
               for c in bench.CONCURRENCY)


def test_rows_without_probes_give_measured_keys_only() -> None:
    out: dict = {}
    bench.cell_medians(drifting_rows(with_probe=False), out)
    assert "ratio_vs_best_static_c1" in out and "ratio_vs_none_min" in out
    assert not any(key.startswith("corrected_") or key.startswith("probe_") for key in out)
    assert "(This run timed no host probe" in bench.corrected_section(out)


def test_report_only_recomputes_both_kinds_of_ratio() -> None:
    out: dict = {}
    bench.cell_medians(drifting_rows(), out)
    for key in [k for k in out if "ratio" in k]:
        del out[key]
    bench.derive_ratios(out)
    bench.derive_ratios(out, "corrected_")
    assert out["corrected_ratio_vs_none_min"] == pytest.approx(
        TRUE_TPS["adaptive"] / TRUE_TPS["none"])
    assert "corrected adaptive / best static" in bench.corrected_section(out)
