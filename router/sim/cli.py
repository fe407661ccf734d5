"""``xllm-bench simulate``: run a trace through simulated instances under the router's policies.

Two modes:

- one run per policy at a fixed rate (``--rate`` or ``--time-scale``; default the
  trace's own timing), printing latency percentiles, SLO attainment, goodput
  and per-instance utilisation;
- ``--sweep``: per policy, the highest request rate at ``--target`` SLO
  attainment (bisection on the time-scaled trace), a table of those rates and
  a PNG of attainment vs rate for all policies (``--plot``).

Example (the issue's headline run)::

    xllm-bench simulate --trace azure-code --deployment llama3-8b-h100 --instances 16 \\
        --policy round_robin,least_load,static_pd --sweep --target 0.9 \\
        --plot benchmarks/results/sim_sweep_azure_code.png
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from router.policies import POLICY_FACTORIES, make_policy
from router.sim.cluster import SimConfig, simulate
from router.sim.metrics import SLO
from router.sim.perf_model import available_deployments, load_deployment
from router.sim.workload import TRACES, Workload, load_workload


def build_workload(args: argparse.Namespace) -> Workload:
    trace = load_workload(args.trace, args.trace_path, seed=args.seed, n=args.num_requests,
                          rate=args.synthetic_rate, cv=args.cv, duration_s=args.duration_s or 600.0)
    if args.start_s or args.duration_s or args.limit:
        trace = trace.window(args.start_s, args.duration_s, args.limit)
    if args.max_prompt or args.max_output:
        trace = trace.clipped(args.max_prompt, args.max_output)
    return trace


def build_config(args: argparse.Namespace) -> SimConfig:
    dep = load_deployment(args.deployment)
    slo = SLO(args.slo_ttft_ms or dep.default_slo_ttft_ms, args.slo_tpot_ms or dep.default_slo_tpot_ms,
              args.slo_require)
    return SimConfig(dep, args.instances, num_prefill=args.num_prefill, slo=slo,
                     rebalance_interval_s=args.rebalance_interval_s)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _single(args: argparse.Namespace, trace: Workload, config: SimConfig) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    if args.rate:
        trace = trace.at_rate(args.rate)
    elif args.time_scale != 1.0:
        trace = trace.scaled(args.time_scale)
    columns = ("slo_attainment", "goodput_rps", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms",
               "tpot_p99_ms", "failed", "preemptions", "prefix_hit_ratio", "utilisation_mean",
               "role_switches", "wall_s")
    table = Table(title=f"{trace.name}: {len(trace)} requests at {trace.mean_rate:.3g} req/s on "
                        f"{config.num_instances} x {config.deployment.name}")
    table.add_column("metric")
    out: dict[str, Any] = {}
    for name in args.policies:
        result = simulate(trace, make_policy(name), config)
        out[name] = {**result.summary, "wall_s": result.wall_s, "instances": result.instances,
                     "role_changes": result.role_changes}
        table.add_column(name, justify="right")
    for c in columns:
        table.add_row(c.replace("_", " "), *(_fmt(out[name].get(c)) for name in args.policies))
    Console().print(table)
    return out


def _sweep(args: argparse.Namespace, trace: Workload, config: SimConfig) -> dict[str, Any]:
    from rich.console import Console

    from router.sim.sweep import plot_sweep, sweep

    began = time.perf_counter()
    results = sweep(trace, args.policies, config, target=args.target, grid_points=args.points,
                    rel_tol=args.rel_tol, progress=not args.no_progress)
    console = Console()
    console.print(f"max request rate at {args.target:.0%} SLO attainment "
                  f"(TTFT <= {config.slo.ttft_ms:g} ms, TPOT <= {config.slo.tpot_ms:g} ms, "
                  f"{config.num_instances} x {config.deployment.name}, {trace.name}):")
    for res in results:
        console.print(f"  {res.policy:>14}: " + (f"{res.max_rate:.3g} req/s" if res.max_rate
                                                   else "never reaches the target"))
    out: dict[str, Any] = {f"rate_{r.policy}": r.max_rate for r in results}
    out["curves"] = {r.policy: [{"rate": rate, **{k: v for k, v in s.items() if not isinstance(v, dict)}}
                                for rate, s in sorted(r.points.items())] for r in results}
    out["sweep_wall_s"] = time.perf_counter() - began
    if args.plot:
        title = (f"{trace.name} on {config.num_instances} x {config.deployment.name}: "
                 f"TTFT<={config.slo.ttft_ms:g}ms, TPOT<={config.slo.tpot_ms:g}ms")
        console.print(f"plot: {plot_sweep(results, args.plot, args.target, title)}")
    return out


def run(args: argparse.Namespace) -> int:
    args.policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    for name in args.policies:
        if name not in POLICY_FACTORIES:
            raise SystemExit(f"unknown policy '{name}'; choose from {', '.join(POLICY_FACTORIES)}")
    trace = build_workload(args)
    config = build_config(args)
    out = _sweep(args, trace, config) if args.sweep else _single(args, trace, config)
    if args.json:
        meta = {"command": "xllm-bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
                "trace": trace.name, "requests": len(trace), "deployment": config.deployment.name,
                "instances": config.num_instances, "slo_ttft_ms": config.slo.ttft_ms,
                "slo_tpot_ms": config.slo.tpot_ms, "target": args.target}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**meta, **out}, indent=1, default=str))
    return 0


def add_subcommand(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "simulate", help="trace-driven cluster simulation under the router's own policies",
        description="Simulate N engine instances (continuous batching, chunked prefill, KV cache "
                    "with prefix reuse, P->D KV transfer, role changes) serving a trace, routed by "
                    "the same policy objects the live router runs. Without --sweep: one run per "
                    "policy. With --sweep: the highest request rate at --target SLO attainment per "
                    "policy and a plot of attainment vs rate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    work = parser.add_argument_group("workload")
    work.add_argument("--trace", choices=TRACES, default="azure-code",
                      help="azure-code: Azure 2023 code trace; mooncake: Mooncake JSONL with prefix "
                           "hashes; servegen-mm: sampled ServeGen Qwen-VL image workload; "
                           "sharegpt-poisson / sharegpt-gamma: ShareGPT lengths with synthetic arrivals")
    work.add_argument("--trace-path", default=None,
                      help="file or folder to read instead of the default under $XLLM_DATA_DIR "
                           "(or ../shared/data)")
    work.add_argument("--start-s", type=float, default=0.0, help="skip this many trace seconds")
    work.add_argument("--duration-s", type=float, default=None,
                      help="keep only this many trace seconds (servegen-mm: seconds to sample, "
                           "default 600)")
    work.add_argument("--limit", type=int, default=None, help="keep at most this many requests")
    work.add_argument("--max-prompt", type=int, default=None, help="cap prompt lengths (tokens)")
    work.add_argument("--max-output", type=int, default=None, help="cap output lengths (tokens)")
    work.add_argument("--num-requests", type=int, default=2000,
                      help="synthetic traces: number of requests")
    work.add_argument("--synthetic-rate", type=float, default=2.0,
                      help="synthetic traces: mean arrival rate before any scaling (req/s)")
    work.add_argument("--cv", type=float, default=4.0,
                      help="sharegpt-gamma: coefficient of variation of inter-arrival times")
    work.add_argument("--seed", type=int, default=0, help="seed for sampled and synthetic traces")
    rate = parser.add_argument_group("rate (single runs)")
    rate.add_argument("--rate", type=float, default=None,
                      help="time-scale the trace to this mean request rate (req/s)")
    rate.add_argument("--time-scale", type=float, default=1.0,
                      help="multiply inter-arrival times by this factor (< 1 = faster); "
                           "ignored with --rate")
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--deployment", default="llama3-8b-h100",
                         help="step-time model and engine limits: a fitted JSON under "
                              "router/sim/perf_models, a roofline preset, or a JSON path; one of "
                              + ", ".join(available_deployments()))
    cluster.add_argument("--instances", type=int, default=16, help="number of engine instances")
    cluster.add_argument("--policy", default="round_robin,least_load,static_pd",
                         help="comma-separated routing policies: " + ", ".join(POLICY_FACTORIES))
    cluster.add_argument("--num-prefill", type=int, default=None,
                         help="PD policies: instances in the prefill role (the rest decode); "
                              "default the policy's own split (static_pd: half)")
    cluster.add_argument("--rebalance-interval-s", type=float, default=1.0,
                         help="how often a policy with rebalance() may change roles (simulated s)")
    slo = parser.add_argument_group("SLOs")
    slo.add_argument("--slo-ttft-ms", type=float, default=None,
                     help="TTFT SLO in ms (default: the deployment's)")
    slo.add_argument("--slo-tpot-ms", type=float, default=None,
                     help="TPOT SLO in ms (default: the deployment's)")
    slo.add_argument("--slo-require", choices=("both", "ttft", "tpot"), default="both",
                     help="which SLOs a request must meet to count as attained")
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--sweep", action="store_true",
                       help="find the max rate at --target attainment per policy and plot")
    sweep.add_argument("--target", type=float, default=0.9, help="SLO attainment target (0..1)")
    sweep.add_argument("--points", type=int, default=8,
                       help="extra evenly spaced (log) rates per policy for the plot")
    sweep.add_argument("--rel-tol", type=float, default=0.03,
                       help="bisection stops when the bracket's ends are this close (relative)")
    sweep.add_argument("--plot", type=Path, default=None, help="write the attainment plot (PNG)")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", type=Path, default=None,
                        help="write every number (with command, date, machine) to this file")
    parser.set_defaults(func=run)
