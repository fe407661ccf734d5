"""Decode attention on a GPU: xTensor's contiguous virtual KV vs the same kernel through a block table.

Both sides run the Triton kernel of ``xllm_plugin/kernels/triton_attention.py`` on the
same K/V values: the contiguous side reads each request's view of an ``XTensor`` backed by
the CUDA mapper (``cuMemCreate``/``cuMemMap``, 2 MiB pages); the paged side reads a copy
of the same tokens scattered over shuffled 16-token blocks (vLLM's GPU block size)
through a block table. Sizes: Llama-3-8B-like heads (32 query, 8 KV, head 128, bf16),
several batch sizes and context lengths; CUDA-event timing, alternated, medians.

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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "xtensor_gpu"
HEADS, KV_HEADS, HEAD_SIZE, BLOCK = 32, 8, 128, 16


def _case(context: int, batch: int, reps: int, iters: int) -> dict[str, Any]:
    import torch

    from xllm_plugin.kernels.triton_attention import contiguous_attention, paged_attention
    from xllm_plugin.memory.cuda_mapper import CudaMapper
    from xllm_plugin.memory.geometry import KVGeometry
    from xllm_plugin.memory.xtensor import XTensor

    dev, dtype = torch.device("cuda"), torch.bfloat16
    token_bytes = KV_HEADS * HEAD_SIZE * 2
    probe = CudaMapper(2 << 20)
    page_tokens = probe.granularity // token_bytes  # one 2 MiB chunk per page
    probe.close()
    pages_per_req = -(-context // page_tokens)
    geometry = KVGeometry(num_layers=1, num_pages=batch * pages_per_req + 2,
                          page_tokens=page_tokens, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE,
                          dtype_bytes=2, num_slots=batch + 1, max_pages=pages_per_req)
    mapper = CudaMapper(geometry.store_bytes)
    xt = XTensor(geometry, mapper, dtype, premap=False)
    gen = torch.Generator(device=dev).manual_seed(context + batch)
    for i in range(batch):
        xt.add_request(i, context)
        xt.keys(i, 0).copy_(torch.randn(context, KV_HEADS, HEAD_SIZE, device=dev, dtype=dtype,
                                        generator=gen))
        xt.values(i, 0).copy_(torch.randn(context, KV_HEADS, HEAD_SIZE, device=dev,
                                          dtype=dtype, generator=gen))
    slot_k, slot_v = xt.slot_tensors(0)
    slot_ids = torch.tensor([xt.slot_of(i) for i in range(batch)], device=dev, dtype=torch.int32)

    # The same tokens in shuffled 16-token blocks behind a block table.
    blocks_per_req = -(-context // BLOCK)
    num_blocks = batch * blocks_per_req
    key_pages = torch.zeros(num_blocks, BLOCK, KV_HEADS, HEAD_SIZE, device=dev, dtype=dtype)
    value_pages = torch.zeros_like(key_pages)
    order = torch.randperm(num_blocks, device=dev)
    table = order.view(batch, blocks_per_req).to(torch.int32)
    for i in range(batch):
        padded = blocks_per_req * BLOCK
        k = torch.zeros(padded, KV_HEADS, HEAD_SIZE, device=dev, dtype=dtype)
        v = torch.zeros_like(k)
        k[:context], v[:context] = xt.keys(i, 0), xt.values(i, 0)
        key_pages[table[i].long()] = k.view(blocks_per_req, BLOCK, KV_HEADS, HEAD_SIZE)
        value_pages[table[i].long()] = v.view(blocks_per_req, BLOCK, KV_HEADS, HEAD_SIZE)

    query = torch.randn(batch, HEADS, HEAD_SIZE, device=dev, dtype=dtype, generator=gen)
    qsl = torch.arange(batch + 1, device=dev, dtype=torch.int32)
    lens = torch.full((batch,), context, device=dev, dtype=torch.int32)
    scale = HEAD_SIZE ** -0.5
    out_c, out_p = torch.empty_like(query), torch.empty_like(query)

    def contiguous() -> None:
        contiguous_attention(query, slot_k, slot_v, slot_ids, qsl, lens, 1, scale, out=out_c)

    def paged() -> None:
        paged_attention(query, key_pages, value_pages, table, qsl, lens, 1, scale, out=out_p)

    def timed(fn: Any) -> float:
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters * 1000  # µs

    contiguous()
    paged()
    torch.cuda.synchronize()
    torch.testing.assert_close(out_c, out_p, atol=2e-2, rtol=2e-2)  # same answer both ways
    c_us, p_us = [], []
    for _ in range(reps):
        c_us.append(timed(contiguous))
        p_us.append(timed(paged))
    xt.close()
    mapper.close()
    return {"contiguous_us": c_us, "paged_us": p_us, "page_tokens": page_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("xtensor_gpu.py needs a CUDA GPU")
    result: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "device": torch.cuda.get_device_name(),
        "reps": args.reps,
    }
    ratios, rows = [], []
    for context in args.contexts:
        for batch in args.batches:
            case = _case(context, batch, args.reps, args.iters)
            c, p = statistics.median(case["contiguous_us"]), statistics.median(case["paged_us"])
            tag = f"ctx{context}_bs{batch}"
            result[f"contiguous_us_{tag}"] = round(c, 2)
            result[f"paged_us_{tag}"] = round(p, 2)
            result[f"ratio_{tag}"] = round(p / c, 3)
            result["page_tokens"] = case["page_tokens"]
            ratios.append(p / c)
            rows.append(f"| {tag} | {p:.1f} | {c:.1f} | {p / c:.2f} |")
            print(f"{tag}: paged {p:.1f} us, contiguous {c:.1f} us, ratio {p / c:.2f}", flush=True)
    result["decode_attention_ratio_vs_paged"] = round(statistics.median(ratios), 3)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{NAME}.md").write_text(
        f"# xTensor decode attention on {result['device']}\n\n"
        f"Command: `{result['command']}`; {result['date']}.\n\n"
        f"decode_attention_ratio_vs_paged (paged time / contiguous time, median): "
        f"**{result['decode_attention_ratio_vs_paged']}** (target >= 1.1)\n\n"
        "| case | paged (16-token blocks) µs | contiguous (xTensor view) µs | ratio |\n"
        "|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "Same Triton kernel both ways; only the address of a token differs "
        "(`slot * stride + t` vs a block-table load per 16 tokens).\n")
    print(json.dumps({k: result[k] for k in ("decode_attention_ratio_vs_paged", "device")}))


if __name__ == "__main__":
    main()
