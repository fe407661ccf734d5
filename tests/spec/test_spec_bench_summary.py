"""spec_adaptive's summary: ratios from per-cell medians, and the host-probe correction that
takes a drift shared by the engine and the probe out of them."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import spec_adaptive as bench  # noqa: E402

# Throughput at nominal host speed, by configuration (the same in every cell, scaled by c).
TRUE_TPS = {"none": 10.0, "k2": 12.0, "k4": 13.0, "k8": 13.5, "table": 13.2, "adaptive": 13.6}


def drifting_rows(elasticity: float = 1.0, with_probe: bool = True) -> list[dict]:
    """Three repetitions; each engine (one per configuration and repetition) runs on a host
    slowed by its own factor, which the probe sees in full and the engine's throughput
    follows to the power ``elasticity``."""
    rng = random.Random(1)
    rows = []
    for rep in range(3):
        for config in bench.CONFIGS:
            slowdown = rng.uniform(0.8, 1.25)
            for prompt_set in bench.PROMPT_SETS:
                for c in bench.CONCURRENCY:
                    row = {"config": config, "rep": rep, "set": prompt_set, "c": c,
                           "tps": TRUE_TPS[config] * c / slowdown ** elasticity}
                    if with_probe:
                        row["probe_ms"] = 90.0 * slowdown
                    rows.append(row)
    return rows


@pytest.mark.parametrize("elasticity", [1.0, 0.6])
def test_probe_correction_recovers_the_ratios_at_one_host_speed(elasticity: float) -> None:
    rows = drifting_rows(elasticity)
    assert bench.probe_elasticity(rows) == pytest.approx(elasticity)
    out: dict = {}
    bench.cell_medians(rows, out)
    bench.probe_corrected(rows, out)
    truth = TRUE_TPS["adaptive"] / TRUE_TPS["k8"]
    for c in bench.CONCURRENCY:
        assert out[f"corrected_ratio_vs_best_static_c{c}"] == pytest.approx(truth)
        assert out[f"corrected_ratio_vs_table_c{c}"] == pytest.approx(
            TRUE_TPS["adaptive"] / TRUE_TPS["table"])
    assert out["corrected_log_sd_within_cells"] == pytest.approx(0.0, abs=1e-9)
    assert out["log_sd_within_cells"] > 0.05
    # The measured ratios still carry the drift: some cell is off by more than 1%.
    assert any(abs(out[f"ratio_vs_best_static_c{c}"] - truth) > 0.01
               for c in bench.CONCURRENCY)
    assert "takes out part of the host's drift" in bench.corrected_section(out)


def test_a_probe_unrelated_to_throughput_corrects_nothing() -> None:
    rows = drifting_rows(elasticity=0.0)  # the engine ignores what the probe sees
    assert bench.probe_elasticity(rows) == pytest.approx(0.0, abs=1e-9)
    out: dict = {}
    bench.cell_medians(rows, out)
    bench.probe_corrected(rows, out)
    assert out["corrected_ratio_vs_best_static_c1"] == pytest.approx(
        out["ratio_vs_best_static_c1"])


def test_rows_without_probes_give_measured_keys_only() -> None:
    out: dict = {}
    rows = drifting_rows(with_probe=False)
    bench.cell_medians(rows, out)
    bench.probe_corrected(rows, out)
    assert "ratio_vs_best_static_c1" in out and "ratio_vs_none_min" in out
    assert not any(key.startswith("corrected_") or key.startswith("probe_") for key in out)
    assert "(This run timed no host probe" in bench.corrected_section(out)


def test_priced_cells_take_out_host_drift_between_engine_runs(tmp_path: Path) -> None:
    """Two configurations, two engine runs each, every run on a host slowed by its own
    factor. Priced, a run costs what its steps' shapes cost at one speed: the policy that
    verified fewer drafts for the same steps is cheaper however its engines drifted, and
    the steps of an engine's start and warm-up (between cells) count for nobody."""
    log = tmp_path / "steps.jsonl"
    base = {0: 50.0, 2: 54.0, 8: 66.0}  # ms of a decode step by drafts verified
    gap = {"k8": 5.0, "adaptive": 6.0}  # ms of host work between steps
    runs = {("k8", 0): (8, 1.3), ("adaptive", 0): (2, 0.8),
            ("k8", 1): (8, 0.9), ("adaptive", 1): (2, 1.25)}
    for (config, rep), (drafts, slowdown) in runs.items():
        bench.mark_step_log(str(log), bench.BETWEEN_CELLS)
        with log.open("a") as out:
            out.write(json.dumps({"decode": 4, "drafts": 0, "prefill": 300, "ms": 900.0}) + "\n")
        bench.mark_step_log(str(log), {"config": config, "rep": rep, "set": "repetitive",
                                       "c": 1})
        with log.open("a") as out:
            for index, shape in enumerate((0, drafts, drafts, 0)):
                # The first step's gap holds the client's wait for the previous answer.
                wait = 400.0 if index == 0 else gap[config]
                out.write(json.dumps({"decode": 1, "drafts": shape, "prefill": 0,
                                      "ms": base[shape] * slowdown,
                                      "gap": wait * slowdown}) + "\n")
    cell = bench.priced_cells([str(log), str(log)])[("repetitive", 1)]
    assert set(cell) == set(runs)
    priced = {run: got.steps_s for run, got in cell.items()}
    for rep in (0, 1):
        assert priced[("k8", rep)] == pytest.approx(priced[("k8", 1 - rep)])
        assert priced[("adaptive", rep)] < priced[("k8", rep)]
    # At one speed the runs differ by their shapes alone (the speed itself cancels).
    assert priced[("k8", 0)] / priced[("adaptive", 1)] == pytest.approx(
        (2 * base[0] + 2 * base[8]) / (2 * base[0] + 2 * base[2]))
    # The work between steps at the same speed, the client's one long wait left out.
    between = {run: got.between_s for run, got in cell.items()}
    for rep in (0, 1):
        assert between[("adaptive", rep)] / between[("k8", 1 - rep)] == pytest.approx(
            gap["adaptive"] / gap["k8"])
