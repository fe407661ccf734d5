"""Rate sweeps: SLO attainment vs request rate per policy, and the max rate at a target.

The workload keeps its shape; only time is scaled (``Workload.at_rate``).
Attainment falls as the rate rises, so the highest rate still at the target
is found by bisection on a log scale: first a bracket (double or halve from
the trace's own rate until one end passes and the other fails), then halving
the bracket until its ends are within ``rel_tol`` of each other. The plot
shows every evaluated point plus an even grid around the found rates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from router.policies import make_policy
from router.sim.cluster import SimConfig, simulate
from router.sim.workload import Workload

OVERLOAD_GRACE = 2.0
"""A swept run stops at ``OVERLOAD_GRACE * trace span + 60 s`` of simulated time;
requests unfinished then count as misses (an overloaded run would otherwise
drain its queue for hours of simulated time and say nothing new)."""


@dataclass
class PolicySweep:
    policy: str
    max_rate: float | None
    points: dict[float, dict[str, Any]] = field(default_factory=dict)

    def curve(self) -> list[tuple[float, float]]:
        return sorted((r, s["slo_attainment"]) for r, s in self.points.items())


def run_at_rate(workload: Workload, policy: str, config: SimConfig, rate: float) -> dict[str, Any]:
    """One simulated run of ``workload`` scaled to ``rate`` req/s under a fresh ``policy``."""
    scaled = workload.at_rate(rate)
    stop = OVERLOAD_GRACE * scaled.duration_s + 60.0
    result = simulate(scaled, make_policy(policy), replace(config, stop_after_s=stop))
    summary = dict(result.summary)
    summary["rate"] = rate
    summary["wall_s"] = result.wall_s
    return summary


def max_rate_at_attainment(evaluate: Callable[[float], float], target: float, start: float,
                           rel_tol: float = 0.03, max_evals: int = 24) -> float | None:
    """Highest rate with ``evaluate(rate) >= target``, assuming attainment falls with rate.

    None when even ``start / 2**10`` misses the target.
    """
    lo = hi = None
    rate = start
    evals = 0
    while evals < max_evals:
        evals += 1
        if evaluate(rate) >= target:
            lo = rate
            if hi is not None:
                break
            rate *= 2.0
        else:
            hi = rate
            if lo is not None:
                break
            if rate < start / 2 ** 10:
                return None
            rate /= 2.0
    if lo is None:
        return None
    if hi is None:
        return lo
    while hi / lo > 1.0 + rel_tol and evals < max_evals:
        evals += 1
        mid = math.sqrt(lo * hi)
        if evaluate(mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo


def sweep(workload: Workload, policies: Sequence[str], config: SimConfig, target: float = 0.9,
          grid_points: int = 8, rel_tol: float = 0.03, start_rate: float | None = None,
          progress: bool = True) -> list[PolicySweep]:
    """Max rate at ``target`` attainment per policy, plus a shared grid of rates for the plot."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    start = start_rate or workload.mean_rate
    results = [PolicySweep(p, None) for p in policies]
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed} runs"),
               TimeElapsedColumn())
    with Progress(*columns, transient=True, disable=not progress) as bar:
        task = bar.add_task("sweep", total=len(policies) * (12 + grid_points))
        for res in results:
            def evaluate(rate: float, res: PolicySweep = res) -> float:
                bar.update(task, description=f"{res.policy} @ {rate:.3g} req/s")
                summary = res.points.get(rate) or run_at_rate(workload, res.policy, config, rate)
                res.points[rate] = summary
                bar.advance(task)
                return summary["slo_attainment"]

            res.max_rate = max_rate_at_attainment(evaluate, target, start, rel_tol)
        found = [r.max_rate for r in results if r.max_rate]
        if found and grid_points > 1:
            lo, hi = 0.5 * min(found), 1.5 * max(found)
            grid = [lo * (hi / lo) ** (k / (grid_points - 1)) for k in range(grid_points)]
            bar.update(task, total=sum(len(r.points) for r in results) + len(results) * grid_points)
            for res in results:
                for rate in grid:
                    bar.update(task, description=f"{res.policy} @ {rate:.3g} req/s (grid)")
                    res.points[rate] = run_at_rate(workload, res.policy, config, rate)
                    bar.advance(task)
    return results


def plot_sweep(results: Sequence[PolicySweep], path: Path, target: float, title: str) -> Path:
    """Attainment vs rate, one line per policy, the target and each max rate marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for res in results:
        xs, ys = zip(*res.curve()) if res.points else ((), ())
        line, = ax.plot(xs, [y * 100 for y in ys], marker="o", markersize=3,
                        label=f"{res.policy} (max {res.max_rate:.3g} req/s)" if res.max_rate
                        else f"{res.policy} (never at target)")
        if res.max_rate:
            ax.axvline(res.max_rate, color=line.get_color(), linestyle=":", linewidth=1)
    ax.axhline(target * 100, color="grey", linestyle="--", linewidth=1, label=f"{target:.0%} target")
    ax.set_xscale("log")
    ax.set_xlabel("request rate (req/s, trace time-scaled)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 102)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
