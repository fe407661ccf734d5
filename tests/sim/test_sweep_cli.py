"""Max-rate search, the sweep and the ``xllm-bench simulate`` command end to end."""

from __future__ import annotations

import json

import pytest

from router.bench.cli import build_parser
from router.sim.sweep import max_rate_at_attainment


@pytest.mark.parametrize("start", [0.1, 3.0, 500.0])
def test_bisection_finds_the_knee_from_any_start(start):
    calls = []

    def attainment(rate: float) -> float:  # 100% up to 7 req/s, then falling
        calls.append(rate)
        return 1.0 if rate <= 7.0 else 7.0 / rate

    found = max_rate_at_attainment(attainment, target=0.9, start=start, rel_tol=0.01)
    assert 7.0 / 0.9 / 1.01 <= found <= 7.0 / 0.9
    assert len(calls) <= 24


def test_unreachable_target_gives_none():
    assert max_rate_at_attainment(lambda r: 0.5, target=0.9, start=1.0) is None


def test_simulate_command_single_run_writes_json(tmp_path, capsys):
    out = tmp_path / "run.json"
    args = build_parser().parse_args([
        "simulate", "--trace", "sharegpt-poisson", "--num-requests", "200", "--synthetic-rate", "20",
        "--instances", "4", "--policy", "round_robin,static_pd", "--json", str(out)])
    assert args.func(args) == 0
    data = json.loads(out.read_text())
    assert data["round_robin"]["requests"] == 200 and data["static_pd"]["disaggregated"] > 0
    assert {"command", "date", "machine"} <= set(data)
    assert "slo attainment" in capsys.readouterr().out


def test_simulate_command_sweep_prints_max_rates_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png, out = tmp_path / "sweep.png", tmp_path / "sweep.json"
    args = build_parser().parse_args([
        "simulate", "--trace", "sharegpt-gamma", "--num-requests", "300", "--instances", "2",
        "--policy", "round_robin,least_load", "--sweep", "--points", "3", "--rel-tol", "0.1",
        "--no-progress", "--plot", str(png), "--json", str(out)])
    assert args.func(args) == 0
    data = json.loads(out.read_text())
    assert data["rate_round_robin"] > 0 and data["rate_least_load"] > 0
    assert png.stat().st_size > 10_000
    assert "max request rate at 90% SLO attainment" in capsys.readouterr().out
