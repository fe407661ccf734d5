"""xTensor on a GPU: decode attention over contiguous views vs a block table; page mapping.

Both sides run the Triton kernel of ``xllm_plugin/kernels/triton_attention.py`` on the
same K/V values: the contiguous side reads each request's view of an ``XTensor`` backed by
the CUDA mapper (``cuMemCreate``/``cuMemMap``, 2 MiB pages); the paged side reads a copy
of the same tokens scattered over shuffled 16-token blocks (vLLM's GPU block size)
through a block table. Sizes: Llama-3-8B-like heads (32 query, 8 KV, head 128, bf16),
several batch sizes and context lengths.

A second part runs a decode loop whose requests grow into new pages, with and without
pre-mapping, to show whether mapping (``cuMemMap`` per page per layer and K/V) lands on
the step's critical path.

Each side is timed at every kernel configuration (key tile ``--block-n`` x one split or
flash-decoding splits) and keeps its fastest, so neither wins on a tile tuned for the
other. Times are GPU times per call: ``--iters`` calls captured in one CUDA graph (no
Python launch cost in the number), replayed ``--reps`` times alternating the sides,
medians. Every configuration's output is checked against the unsplit contiguous one.

Writes ``results/xtensor_gpu.json`` (``decode_attention_ratio_vs_paged`` = paged time /
contiguous time, median over cases; ``device``) and ``results/xtensor_gpu.md``.
Needs a CUDA GPU, ``triton`` and ``cuda-python`` (``pip install -e '.[cuda]'``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "xtensor_gpu"
HEADS, KV_HEADS, HEAD_SIZE, BLOCK = 32, 8, 128, 16
#: A split should still read this many keys, or the merge costs more than it gains.
MIN_KEYS_PER_SPLIT = 512


def auto_splits(context: int, batch: int, num_sms: int) -> int:
    """Flash-decoding splits: enough programs for two waves over the SMs, within the keys."""
    programs = batch * KV_HEADS
    wanted = -(-2 * num_sms // programs)
    return max(1, min(wanted, context // MIN_KEYS_PER_SPLIT))


@dataclass
class Case:
    """One (context, batch) point: the same K/V behind an xTensor and behind a block table."""

    xtensor: Any
    mapper: Any
    slot_k: Any
    slot_v: Any
    slot_ids: Any
    key_pages: Any
    value_pages: Any
    table: Any
    query: Any
    query_start: Any
    lens: Any
    page_tokens: int

    def close(self) -> None:
        self.xtensor.close()
        self.mapper.close()


def page_tokens_of_one_chunk(mapper_cls: Any = None) -> int:
    """Tokens in one allocation chunk (2 MiB on current GPUs): xTensor's page here."""
    from xllm_plugin.memory.cuda_mapper import CudaMapper

    probe = (mapper_cls or CudaMapper)(2 << 20)
    try:
        return probe.granularity // (KV_HEADS * HEAD_SIZE * 2)
    finally:
        probe.close()


def build_case(context: int, batch: int) -> Case:
    import torch

    from xllm_plugin.memory.cuda_mapper import CudaMapper
    from xllm_plugin.memory.geometry import KVGeometry
    from xllm_plugin.memory.xtensor import XTensor

    dev, dtype = torch.device("cuda"), torch.bfloat16
    page_tokens = page_tokens_of_one_chunk()
    pages_per_req = -(-context // page_tokens)
    geometry = KVGeometry(num_layers=1, num_pages=batch * pages_per_req + 2,
                          page_tokens=page_tokens, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE,
                          dtype_bytes=2, num_slots=batch + 1, max_pages=pages_per_req)
    mapper = CudaMapper(geometry.store_bytes)
    xt = XTensor(geometry, mapper, dtype, premap=False)
    gen = torch.Generator(device=dev).manual_seed(context + batch)
    for i in range(batch):
        xt.add_request(i, context)
        for view in (xt.keys(i, 0), xt.values(i, 0)):
            view.copy_(torch.randn(context, KV_HEADS, HEAD_SIZE, device=dev, dtype=dtype,
                                   generator=gen))
    slot_k, slot_v = xt.slot_tensors(0)
    slot_ids = torch.tensor([xt.slot_of(i) for i in range(batch)], device=dev, dtype=torch.int32)

    # The same tokens in shuffled 16-token blocks behind a block table.
    blocks_per_req = -(-context // BLOCK)
    num_blocks = batch * blocks_per_req
    key_pages = torch.zeros(num_blocks, BLOCK, KV_HEADS, HEAD_SIZE, device=dev, dtype=dtype)
    value_pages = torch.zeros_like(key_pages)
    order = torch.randperm(num_blocks, device=dev, generator=gen)
    table = order.view(batch, blocks_per_req).to(torch.int32)
    padded = blocks_per_req * BLOCK
    for i in range(batch):
        for source, pages in ((xt.keys(i, 0), key_pages), (xt.values(i, 0), value_pages)):
            blocks = torch.zeros(padded, KV_HEADS, HEAD_SIZE, device=dev, dtype=dtype)
            blocks[:context] = source
            pages[table[i].long()] = blocks.view(blocks_per_req, BLOCK, KV_HEADS, HEAD_SIZE)

    query = torch.randn(batch, HEADS, HEAD_SIZE, device=dev, dtype=dtype, generator=gen)
    return Case(xt, mapper, slot_k, slot_v, slot_ids, key_pages, value_pages, table, query,
                torch.arange(batch + 1, device=dev, dtype=torch.int32),
                torch.full((batch,), context, device=dev, dtype=torch.int32),
                page_tokens)


def page_map_latency(samples: int) -> dict[str, float]:
    """µs to map one 2 MiB page into a reservation (cuMemMap + cuMemSetAccess) and unmap it."""
    from xllm_plugin.memory.cuda_mapper import CudaMapper
    from xllm_plugin.memory.mapper import MapStats

    mapper = CudaMapper(2 << 20)
    mapper.stats = MapStats()  # leave out the store's own linear mapping
    try:
        page = mapper.granularity
        address = mapper.reserve(page)
        for _ in range(samples):
            mapper.map(address, 0, page)
            mapper.unmap(address, page)
        stats = mapper.stats.snapshot()
    finally:
        mapper.close()
    return {"map_latency_us_p50": stats["map_latency_us"]["p50"],
            "map_latency_us_p99": stats["map_latency_us"]["p99"],
            "unmap_latency_us_p50": stats["unmap_latency_us"]["p50"]}


def graph_time_us(fn: Callable[[], Any], iters: int) -> Callable[[], float]:
    """Capture ``iters`` calls of ``fn`` in a CUDA graph; return a timer of one replay (µs/call)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compile and warm outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def replay() -> float:
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters * 1000

    replay()
    return replay


def measure(case: Case, block_ns: list[int], splits: list[int], reps: int,
            iters: int) -> dict[str, dict[tuple[int, int], float]]:
    """Median µs per call of each side at each (block_n, splits) configuration."""
    import torch

    from xllm_plugin.kernels.triton_attention import contiguous_attention, paged_attention

    scale = HEAD_SIZE ** -0.5
    reference = contiguous_attention(case.query, case.slot_k, case.slot_v, case.slot_ids,
                                     case.query_start, case.lens, 1, scale)
    times: dict[str, dict[tuple[int, int], float]] = {"contiguous": {}, "paged": {}}
    for block_n in block_ns:
        for num_splits in splits:
            out_c, out_p = torch.empty_like(case.query), torch.empty_like(case.query)

            def contiguous(block_n: int = block_n, num_splits: int = num_splits,
                           out: Any = out_c) -> None:
                contiguous_attention(case.query, case.slot_k, case.slot_v, case.slot_ids,
                                     case.query_start, case.lens, 1, scale, out=out,
                                     block_n=block_n, num_splits=num_splits)

            def paged(block_n: int = block_n, num_splits: int = num_splits,
                      out: Any = out_p) -> None:
                paged_attention(case.query, case.key_pages, case.value_pages, case.table,
                                case.query_start, case.lens, 1, scale, out=out,
                                block_n=block_n, num_splits=num_splits)

            timers = {"contiguous": graph_time_us(contiguous, iters),
                      "paged": graph_time_us(paged, iters)}
            torch.cuda.synchronize()
            for out in (out_c, out_p):  # same answer at every configuration, both ways
                torch.testing.assert_close(out, reference, atol=2e-2, rtol=2e-2)
            samples: dict[str, list[float]] = {"contiguous": [], "paged": []}
            for _ in range(reps):
                for side, timer in timers.items():
                    samples[side].append(timer())
            for side, values in samples.items():
                times[side][(block_n, num_splits)] = statistics.median(values)
    return times


def growth(layers: int, batch: int, steps: int, premap: bool,
           mapper_cls: Any = None) -> dict[str, float]:
    """A decode loop whose requests grow into new 2 MiB pages: is the mapping on the step's path?

    ``batch`` requests with prompts spread over one page decode ``steps`` tokens each, so
    every request crosses one page boundary. A step is what an engine's step does to KV
    memory: grow every request by a token (``XTensor.extend``), upload the lengths, run
    the decode kernel on each of ``layers`` layers, wait for the GPU. A crossing maps a
    page into each of the ``2 x layers`` planes; with ``premap`` that happens on the
    background thread during the step before it is needed. ``mapper_cls`` (default the
    CUDA mapper) lets a test run the loop on the CPU mapper under Triton's interpreter.
    """
    import torch

    from xllm_plugin.kernels.triton_attention import contiguous_attention
    from xllm_plugin.memory.cuda_mapper import CudaMapper
    from xllm_plugin.memory.geometry import KVGeometry
    from xllm_plugin.memory.xtensor import XTensor

    mapper_cls = mapper_cls or CudaMapper
    dtype = torch.bfloat16
    page_tokens = page_tokens_of_one_chunk(mapper_cls)
    prompts = [page_tokens // 2 + i * page_tokens // batch for i in range(batch)]
    max_pages = -(-(max(prompts) + steps) // page_tokens) + 1
    geometry = KVGeometry(num_layers=layers, num_pages=batch * max_pages + 2,
                          page_tokens=page_tokens, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE,
                          dtype_bytes=2, num_slots=batch + 1, max_pages=max_pages)
    mapper = mapper_cls(geometry.store_bytes)
    dev = torch.device(mapper.device)

    def wait_for_device() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    xt = XTensor(geometry, mapper, dtype, premap=premap)
    try:
        for i, tokens in enumerate(prompts):
            xt.add_request(i, tokens)
        planes = [xt.slot_tensors(layer) for layer in range(layers)]
        slot_ids = torch.tensor([xt.slot_of(i) for i in range(batch)], device=dev,
                                dtype=torch.int32)
        query = torch.randn(batch, HEADS, HEAD_SIZE, device=dev, dtype=dtype)
        out = torch.empty_like(query)
        qsl = torch.arange(batch + 1, device=dev, dtype=torch.int32)
        lengths = list(prompts)
        step_us, crossing_step_us = [], []
        wait_for_device()
        for _ in range(steps):
            start = time.perf_counter()
            crossing = False
            for i in range(batch):
                lengths[i] += 1
                crossing |= lengths[i] % page_tokens == 1
                xt.extend(i, lengths[i])
            lens = torch.tensor(lengths, dtype=torch.int32).to(dev, non_blocking=True)
            for slot_k, slot_v in planes:
                contiguous_attention(query, slot_k, slot_v, slot_ids, qsl, lens, 1,
                                     HEAD_SIZE ** -0.5, out=out)
            wait_for_device()
            elapsed = (time.perf_counter() - start) * 1e6
            step_us.append(elapsed)
            if crossing:
                crossing_step_us.append(elapsed)
        snapshot = xt.snapshot()
    finally:
        xt.close()
        mapper.close()
    steady = sorted(step_us)
    return {"step_us_p50": statistics.median(step_us),
            "step_us_p99": steady[int(0.99 * (len(steady) - 1))],
            "step_us_max": steady[-1],
            "crossing_step_us_mean": statistics.fmean(crossing_step_us),
            "crossing_steps": len(crossing_step_us),
            "premap_hit_rate": snapshot["premap_hit_rate"] or 0.0,
            "map_calls": snapshot["map_calls"]}


def growth_reading(result: dict[str, Any]) -> str:
    """What the growth table says, in words (the numbers are the table's)."""
    def get(key: str, mode: str) -> float:
        return result[f"growth_{key}_{mode}"]

    text = (
        "Pre-mapping takes the mapping off the step where a request enters a new page: such "
        f"steps took {get('crossing_step_us_mean', 'premap'):.0f} µs on average with it and "
        f"{get('crossing_step_us_mean', 'on_demand'):.0f} µs without "
        f"({get('crossing_step_us_mean', 'on_demand') / get('step_us_p50', 'on_demand'):.1f}x "
        f"the median step). Median step {get('step_us_p50', 'premap'):.0f} vs "
        f"{get('step_us_p50', 'on_demand'):.0f} µs, 99th percentile "
        f"{get('step_us_p99', 'premap'):.0f} vs {get('step_us_p99', 'on_demand'):.0f} µs.")
    if get("step_us_p99", "premap") > get("step_us_p99", "on_demand"):
        text += (
            " The higher tail with pre-mapping says the steps that the background mapping "
            "overlaps get slower: the work is moved off the crossing step, not hidden. A likely "
            "reason (not measured): this loop is bound by the CPU launching a kernel per layer, "
            "which leaves the mapping thread little idle time; a GPU-bound engine step has more.")
    return text


def plot(tags: list[str], ratios: list[float], same_config: list[float]) -> str:
    """Bars of paged/contiguous time per case, against the 1.1x target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.8))
    x = range(len(tags))
    ax.bar([i - 0.2 for i in x], ratios, width=0.4, label="each side at its fastest config")
    ax.bar([i + 0.2 for i in x], same_config, width=0.4, label="both at paged's fastest config")
    ax.axhline(1.1, color="grey", linestyle="--", linewidth=1, label="target 1.1x")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(x), tags, rotation=30, ha="right")
    ax.set(ylabel="paged time / contiguous time", title="decode attention, xTensor view vs paged")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = f"{NAME}.png"
    fig.savefig(RESULTS / png, dpi=110)
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--block-n", type=int, nargs="+", default=[16, 32, 64, 128],
                        help="key tiles each side is timed at (multiples of 16)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--iters", type=int, default=20, help="calls per CUDA graph replay")
    parser.add_argument("--growth", type=int, nargs=3, default=[32, 32, 1024],
                        metavar=("LAYERS", "BATCH", "STEPS"),
                        help="decode loop growing into new pages, with and without pre-mapping")
    parser.add_argument("--growth-reps", type=int, default=4,
                        help="runs of each growth mode, alternating which goes first; medians")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("xtensor_gpu.py needs a CUDA GPU")
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    result: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "device": torch.cuda.get_device_name(),
        "reps": args.reps,
        "iters": args.iters,
    }
    result.update({k: round(v, 2) for k, v in page_map_latency(200).items()})
    tags, ratios, same_config, rows = [], [], [], []
    for context in args.contexts:
        for batch in args.batches:
            splits = sorted({1, auto_splits(context, batch, num_sms)})
            case = build_case(context, batch)
            try:
                times = measure(case, args.block_n, splits, args.reps, args.iters)
            finally:
                case.close()
            best_c = min(times["contiguous"], key=times["contiguous"].__getitem__)
            best_p = min(times["paged"], key=times["paged"].__getitem__)
            c, p = times["contiguous"][best_c], times["paged"][best_p]
            at_paged_best = times["paged"][best_p] / times["contiguous"][best_p]
            tag = f"ctx{context}_bs{batch}"
            result.update({f"contiguous_us_{tag}": round(c, 2), f"paged_us_{tag}": round(p, 2),
                           f"ratio_{tag}": round(p / c, 3),
                           f"ratio_same_config_{tag}": round(at_paged_best, 3),
                           f"splits_{tag}": max(splits)})
            result["page_tokens"] = case.page_tokens
            tags.append(tag)
            ratios.append(p / c)
            same_config.append(at_paged_best)
            rows.append(f"| {tag} | {p:.1f} ({best_p[0]}, {best_p[1]}) | "
                        f"{c:.1f} ({best_c[0]}, {best_c[1]}) | {p / c:.2f} | "
                        f"{at_paged_best:.2f} |")
            print(f"{tag}: paged {p:.1f} us {best_p}, contiguous {c:.1f} us {best_c}, "
                  f"ratio {p / c:.2f}, same config {at_paged_best:.2f}", flush=True)
    layers, batch, steps = args.growth
    runs: dict[str, list[dict[str, float]]] = {"premap": [], "on_demand": []}
    for rep in range(args.growth_reps):
        # Alternate which mode runs first, so warm-up or clock drift does not favour one.
        for premap in ((True, False) if rep % 2 == 0 else (False, True)):
            mode = "premap" if premap else "on_demand"
            runs[mode].append(growth(layers, batch, steps, premap))
            print(f"growth {mode} run {rep + 1}: {runs[mode][-1]}", flush=True)
    for mode, measured in runs.items():
        result.update({f"growth_{key}_{mode}": round(statistics.median(m[key] for m in measured), 3)
                       for key in measured[0]})
    result["growth_reps"] = args.growth_reps
    result["decode_attention_ratio_vs_paged"] = round(statistics.median(ratios), 3)
    result["decode_attention_ratio_same_config"] = round(statistics.median(same_config), 3)
    result["decode_attention_ratio_min"] = round(min(ratios), 3)
    result["decode_attention_ratio_max"] = round(max(ratios), 3)
    RESULTS.mkdir(exist_ok=True)
    png = plot(tags, ratios, same_config)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{NAME}.md").write_text(
        f"# xTensor decode attention on {result['device']}\n\n"
        f"Command: `{result['command']}`; {result['date']}; {result['machine']}.\n\n"
        f"decode_attention_ratio_vs_paged (paged time / contiguous time, each side at its "
        f"fastest configuration, median over cases): "
        f"**{result['decode_attention_ratio_vs_paged']}** (target >= 1.1); range "
        f"{result['decode_attention_ratio_min']}-{result['decode_attention_ratio_max']}; "
        f"at the paged side's best configuration for both: "
        f"{result['decode_attention_ratio_same_config']}.\n\n"
        f"One decode query per request, 32 query heads, 8 KV heads, head 128, bf16. xTensor "
        f"pages are {result['page_tokens']} tokens (one 2 MiB chunk); the paged side uses "
        f"{BLOCK}-token blocks in shuffled order. Mapping one page into a request's range "
        f"(cuMemMap + cuMemSetAccess): p50 {result['map_latency_us_p50']} µs, p99 "
        f"{result['map_latency_us_p99']} µs; unmapping it: p50 "
        f"{result['unmap_latency_us_p50']} µs.\n\n"
        f"## Growing into new pages ({layers} layers, {batch} requests, {steps} decode steps, "
        f"medians of {args.growth_reps} runs per mode, alternating which runs first)"
        "\n\nEvery request crosses one page boundary; a crossing maps a page into each of "
        f"the {2 * layers} K/V planes. Step = grow every request by a token, run the decode "
        "kernel on every layer, wait for the GPU.\n\n"
        "| mapping | step µs p50 | step µs p99 | step µs max | steps with a crossing, mean µs "
        "| pre-map hit rate |\n|---|---|---|---|---|---|\n" + "\n".join(
            f"| {mode} | {result[f'growth_step_us_p50_{mode}']:.0f} | "
            f"{result[f'growth_step_us_p99_{mode}']:.0f} | "
            f"{result[f'growth_step_us_max_{mode}']:.0f} | "
            f"{result[f'growth_crossing_step_us_mean_{mode}']:.0f} | "
            f"{result[f'growth_premap_hit_rate_{mode}']} |" for mode in ("premap", "on_demand"))
        + "\n\n" + growth_reading(result) + "\n\n## Decode attention, contiguous vs paged\n\n"
        "| case | paged µs (block_n, splits) | contiguous µs (block_n, splits) | ratio | "
        "ratio at paged's config |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"![paged / contiguous per case]({png})\n\n"
        "Same Triton kernel both ways; only the address of a token differs "
        "(`slot * stride + t` vs a block-table load per 16 tokens). Times are GPU time per "
        "call from CUDA-graph replays, medians of alternated repetitions.\n\n"
        "What this does not show: the paged side is this project's kernel with a block "
        "table, not FlashAttention's or FlashInfer's paged decode (vLLM is not installed on "
        "the GPU machine), and `vllm serve` with xTensor runs on CPU only, so there is no "
        "end-to-end GPU figure.\n\n"
        "Rerun on a CUDA machine: `pip install -e '.[cuda]' && python benchmarks/xtensor_gpu.py`\n")
    print(json.dumps({k: result[k] for k in ("decode_attention_ratio_vs_paged", "device")}))


if __name__ == "__main__":
    main()
