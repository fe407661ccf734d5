"""Validate the simulator against a live 2-instance run on the same trace slice.

1. Take a slice of the Azure code trace (``--start-s``, ``--requests``), prompts
   capped at ``--max-prompt`` tokens, time-scaled to ``--rate`` req/s.
2. Live: two ``vllm serve`` SmolLM2 engines (one core each, plugin scheduler),
   requests sent at their trace times, routed by the router's own
   ``round_robin`` policy object (so live and simulated runs place every request
   on the same instance and only the engine model is under test).
3. Simulated: the same slice, 2 instances of the fitted ``smollm2-cpu`` deployment,
   the same policy.
4. Relative errors of TTFT and TPOT p50/p99 (``|sim - live| / live``), plus the
   simulator's speed on the full Azure code trace over 16 instances.

Writes ``benchmarks/results/sim_validation.{json,md}`` and ``sim_validation.png``.
Run (holds the shared engine lock for the live part, about 3-4 minutes)::

    flock /tmp/xllm-vllm.lock python benchmarks/sim_validate.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_live import Timed, random_prompt, timed_completion  # noqa: E402

from router.policies import ClusterView, InstanceState, RequestInfo, make_policy  # noqa: E402
from router.sim import SimConfig, load_deployment, simulate  # noqa: E402
from router.sim.workload import Workload, read_azure  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def trace_slice(start_s: float, requests: int, max_prompt: int, max_output: int,
                rate: float) -> Workload:
    return read_azure().window(start_s, None, requests).clipped(max_prompt, max_output).at_rate(rate)


async def live_run(urls: list[str], trace: Workload, seed: int) -> tuple[list[Timed], list[str]]:
    policy = make_policy("round_robin")
    rng = np.random.default_rng(seed)
    ids = [f"i{k}" for k in range(len(urls))]
    inflight = dict.fromkeys(ids, 0)
    placed: list[str] = []
    async with aiohttp.ClientSession() as session:
        for k, url in enumerate(urls):  # warm-up, then settle
            await asyncio.gather(*[timed_completion(session, url, "smollm2", random_prompt(512, rng), 8)
                                   for _ in range(2)])
        await asyncio.sleep(1.0)
        began = time.perf_counter()

        async def one(spec) -> Timed:
            delay = spec.arrival_s - (time.perf_counter() - began)
            if delay > 0:
                await asyncio.sleep(delay)
            view = ClusterView(tuple(InstanceState(i, inflight=inflight[i]) for i in ids),
                               now=time.perf_counter() - began)
            decision = policy.route(RequestInfo(spec.request_id, spec.prompt_tokens,
                                                spec.output_tokens), view)
            placed.append(decision.instance_id)
            inflight[decision.instance_id] += 1
            try:
                return await timed_completion(session, urls[ids.index(decision.instance_id)],
                                              "smollm2", random_prompt(spec.prompt_tokens, rng),
                                              spec.output_tokens)
            finally:
                inflight[decision.instance_id] -= 1

        results = await asyncio.gather(*[one(s) for s in trace.requests])
    return list(results), placed


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def plot(live: dict[str, list[float]], sim: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for ax, metric in zip(axes, ("ttft_ms", "tpot_ms")):
        for label, data, style in (("live", live, "-"), ("simulated", sim, "--")):
            xs = np.sort(data[metric])
            ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), style, label=label)
        ax.set_xlabel(metric.replace("_ms", " (ms)").upper())
        ax.set_ylabel("CDF")
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sim_speed() -> float:
    """Wall seconds to simulate the full Azure code trace over 16 instances (llama3-8b-h100)."""
    trace = read_azure()
    began = time.perf_counter()
    simulate(trace, make_policy("least_load"), SimConfig(load_deployment("llama3-8b-h100"), 16))
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start-s", type=float, default=600.0, help="where the slice starts in the trace")
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--max-prompt", type=int, default=1536)
    parser.add_argument("--max-output", type=int, default=64)
    parser.add_argument("--rate", type=float, default=1.0, help="mean req/s of the slice")
    parser.add_argument("--ports", default="8201,8202")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--live-json", type=Path, default=None,
                        help="reuse a previous live run's per-request data instead of starting engines")
    args = parser.parse_args()

    trace = trace_slice(args.start_s, args.requests, args.max_prompt, args.max_output, args.rate)
    raw_path = RESULTS / "sim_validation_live_requests.json"
    if args.live_json:
        live_rows = json.loads(args.live_json.read_text())["requests"]
    else:
        from xllm_plugin.launcher.engine import EngineProcess, EngineSpec
        from xllm_plugin.models import model_path

        ports = [int(p) for p in args.ports.split(",")]
        specs = [EngineSpec(model=model_path("smollm2"), port=port, served_model_name="smollm2",
                            cpu_bind=str(k), kv_cache_gib=1) for k, port in enumerate(ports)]
        engines = [EngineProcess(s) for s in specs]
        try:
            for engine in engines:
                engine.start()
            results, placed = asyncio.run(live_run([e.url for e in engines], trace, args.seed))
        finally:
            for engine in engines:
                engine.stop()
        live_rows = [{"request_id": s.request_id, "arrival_s": s.arrival_s, "prompt": s.prompt_tokens,
                      "output": s.output_tokens, "instance": inst, "ttft_ms": r.ttft_ms,
                      "tpot_ms": r.tpot_ms, "output_seen": r.output_tokens, "error": r.error}
                     for s, r, inst in zip(trace.requests, results, placed)]
        raw_path.write_text(json.dumps({"requests": live_rows}, indent=0))
    failed = [r for r in live_rows if r["error"] or r["ttft_ms"] is None]
    live = {"ttft_ms": [r["ttft_ms"] for r in live_rows if r["ttft_ms"] is not None],
            "tpot_ms": [r["tpot_ms"] for r in live_rows if r["tpot_ms"] is not None]}

    dep = load_deployment("smollm2-cpu")
    result = simulate(trace, make_policy("round_robin"), SimConfig(dep, 2))
    sim = {"ttft_ms": [r.ttft_ms for r in result.records if r.ttft_ms is not None],
           "tpot_ms": [r.tpot_ms for r in result.records if r.tpot_ms is not None]}

    out: dict[str, object] = {}
    for metric in ("ttft", "tpot"):
        for q in (50, 99):
            lv, sv = pct(live[f"{metric}_ms"], q), pct(sim[f"{metric}_ms"], q)
            out[f"{metric}_p{q}_live_ms"] = lv
            out[f"{metric}_p{q}_sim_ms"] = sv
            out[f"{metric}_p{q}_rel_err"] = abs(sv - lv) / lv
    out["sim_wall_s_azure_code_16_instances"] = sim_speed()
    out.update({"live_failed": len(failed), "requests": len(trace), "rate_rps": args.rate,
                "slice_start_s": args.start_s, "max_prompt": args.max_prompt,
                "max_output": args.max_output, "sim_utilisation_mean": result.summary.get("utilisation_mean")})
    meta = {"command": "python benchmarks/sim_validate.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sim_validation.json").write_text(json.dumps({**meta, **out}, indent=1) + "\n")
    plot(live, sim, RESULTS / "sim_validation.png",
         f"Azure code slice: {len(trace)} requests at {args.rate:g} req/s, 2 x SmolLM2 (CPU), round-robin")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
