"""Measure on a GPU what the EPD simulator otherwise assumes: ViT encode, LLM prefill and decode.

``router.sim.encoder`` prices a Qwen2-VL image encode from a roofline (50% of dense BF16
peak), and ``router.sim.roofline`` prices Qwen2-7B prefill the same way. Whether
disaggregating the encoder pays depends on how the two compare, so both are timed here on
the same GPU, from the models' real shapes with random BF16 weights (no model hub):

- the 675M Qwen2-VL ViT (32 blocks, width 1280, 16 heads, MLP 5120 with QuickGELU, 2D
  rotary, a 2x2 patch merger to width 3584), full attention within each image, eager as
  vLLM runs its encoders, batches of equal images and one batch of mixed sizes;
- Qwen2-7B prefill (28 layers, width 3584, 28/4 heads, MLP 18944, causal attention within
  each sequence, the LM head on each sequence's last token), eager;
- Qwen2-7B decode steps over K/V caches, in CUDA graphs, reported as the HBM-bandwidth share
  the roofline would need (not fed to the simulator: unfused kernels, see the report).

ViT and prefill are fitted to ``ms = intercept + a * tokens + b * attended pairs`` by least
squares (``router.sim.encoder.fit_linear_quadratic``) and also given as the MFU the roofline
would need to match them; the ViT fit and the prefill MFUs become the simulator's
``MeasuredCosts`` (``router/sim/perf_models/measured/qwen2-vl-7b-<gpu>.json``).

The timings go to ``results/epd_gpu_costs_raw.json`` first (this part needs only torch, so
it runs on a GPU machine without the router's dependencies); ``--raw FILE ...`` fits and
writes ``results/epd_gpu_costs.{json,md}`` from such files (one per run, fitted together)
without measuring again. ``--smoke``
shrinks both models to run on a CPU (a check that the script works, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from router.sim.encoder import FittedEncoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "epd_gpu_costs"
PATCH_VALUES = 3 * 2 * 14 * 14  # RGB x 2 temporal frames x 14x14 pixels (Qwen2-VL patch embed)


class Dims:
    """The two models' shapes; ``smoke`` divides widths and depths so a CPU can run them."""

    def __init__(self, smoke: bool) -> None:
        s = 8 if smoke else 1
        self.vit_layers, self.vit_hidden, self.vit_heads = 32 // s, 1280 // s, 16 // s
        self.vit_mlp, self.merge, self.vit_out = 5120 // s, 2, 3584 // s
        self.llm_layers, self.llm_hidden, self.llm_mlp, self.vocab = 28 // s, 3584 // s, 18944 // s, 152064 // s
        self.llm_heads, self.llm_kv_heads = (4, 1) if smoke else (28, 4)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotary(positions: int, head_dim: int, device: torch.device, dtype: torch.dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(positions, device=device, dtype=torch.float32), inv)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def weight(*shape: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(*shape, device=device, dtype=torch.float32) * shape[-1] ** -0.5).to(dtype)


def segment_rotary(cos: torch.Tensor, sin: torch.Tensor, lengths: Sequence[int]):
    """The rotary tables for tokens packed segment after segment (positions restart at 0)."""
    return (torch.cat([cos[:n] for n in lengths]).unsqueeze(1),
            torch.cat([sin[:n] for n in lengths]).unsqueeze(1))


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int],
                      causal: bool) -> torch.Tensor:
    """Attention within each segment of ``[tokens, heads, dim]`` tensors (varlen, as vLLM's
    ViT and prefill run it): one batched call when the segments are equal, else one each."""
    heads, kv_heads = q.shape[1], k.shape[1]
    gqa = heads != kv_heads
    if len(set(lengths)) == 1:
        n, length = len(lengths), lengths[0]
        qb, kb, vb = (t.view(n, length, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=causal, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(q.shape)
    outs, start = [], 0
    for length in lengths:
        qs, ks, vs = (t[start:start + length].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=gqa)
                    .squeeze(0).transpose(0, 1))
        start += length
    return torch.cat(outs)


class VisionEncoder:
    """Qwen2-VL's ViT at its real shape, functional, random weights."""

    def __init__(self, d: Dims, device: torch.device, dtype: torch.dtype) -> None:
        w = lambda *s: weight(*s, device=device, dtype=dtype)  # noqa: E731
        self.d, self.head_dim = d, d.vit_hidden // d.vit_heads
        self.embed = w(d.vit_hidden, PATCH_VALUES)
        self.blocks = [dict(qkv=w(3 * d.vit_hidden, d.vit_hidden), qkv_b=w(3 * d.vit_hidden),
                            proj=w(d.vit_hidden, d.vit_hidden), proj_b=w(d.vit_hidden),
                            fc1=w(d.vit_mlp, d.vit_hidden), fc1_b=w(d.vit_mlp),
                            fc2=w(d.vit_hidden, d.vit_mlp), fc2_b=w(d.vit_hidden))
                       for _ in range(d.vit_layers)]
        merged = d.vit_hidden * d.merge * d.merge
        self.merge1, self.merge2 = w(merged, merged), w(d.vit_out, merged)
        self.cos, self.sin = rotary(65536, self.head_dim, device, dtype)

    def __call__(self, patches: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        d, hd = self.d, self.head_dim
        x = F.linear(patches, self.embed)
        cos, sin = segment_rotary(self.cos, self.sin, lengths)
        for b in self.blocks:
            h = F.layer_norm(x, (d.vit_hidden,))
            q, k, v = F.linear(h, b["qkv"], b["qkv_b"]).view(-1, 3, d.vit_heads, hd).unbind(1)
            attn = segment_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, lengths, causal=False)
            x = x + F.linear(attn.reshape(-1, d.vit_hidden), b["proj"], b["proj_b"])
            h = F.linear(F.layer_norm(x, (d.vit_hidden,)), b["fc1"], b["fc1_b"])
            x = x + F.linear(h * torch.sigmoid(1.702 * h), b["fc2"], b["fc2_b"])
        x = F.layer_norm(x, (d.vit_hidden,)).view(-1, d.vit_hidden * d.merge * d.merge)
        return F.linear(F.gelu(F.linear(x, self.merge1)), self.merge2)


class LanguageModel:
    """Qwen2-7B's decoder at its real shape for prefill, functional, random weights."""

    def __init__(self, d: Dims, device: torch.device, dtype: torch.dtype) -> None:
        w = lambda *s: weight(*s, device=device, dtype=dtype)  # noqa: E731
        self.d, self.head_dim = d, d.llm_hidden // d.llm_heads
        kv = d.llm_kv_heads * self.head_dim
        self.embed = w(d.vocab, d.llm_hidden)
        self.layers = [dict(q=w(d.llm_hidden, d.llm_hidden), q_b=w(d.llm_hidden), kv=w(2 * kv, d.llm_hidden),
                            kv_b=w(2 * kv), o=w(d.llm_hidden, d.llm_hidden),
                            gate_up=w(2 * d.llm_mlp, d.llm_hidden), down=w(d.llm_hidden, d.llm_mlp))
                       for _ in range(d.llm_layers)]
        self.lm_head = w(d.vocab, d.llm_hidden)
        self.cos, self.sin = rotary(32768, self.head_dim, device, dtype)

    def __call__(self, ids: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        d, hd = self.d, self.head_dim
        x = F.embedding(ids, self.embed)
        cos, sin = segment_rotary(self.cos, self.sin, lengths)
        for layer in self.layers:
            h = F.rms_norm(x, (d.llm_hidden,))
            q = F.linear(h, layer["q"], layer["q_b"]).view(-1, d.llm_heads, hd)
            k, v = F.linear(h, layer["kv"], layer["kv_b"]).view(-1, 2, d.llm_kv_heads, hd).unbind(1)
            attn = segment_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, lengths, causal=True)
            x = x + F.linear(attn.reshape(-1, d.llm_hidden), layer["o"])
            gate, up = F.linear(F.rms_norm(x, (d.llm_hidden,)), layer["gate_up"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer["down"])
        last = torch.tensor(lengths, device=x.device).cumsum(0) - 1
        return F.linear(F.rms_norm(x[last], (d.llm_hidden,)), self.lm_head)

    def decode(self, ids: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]],
               position: int) -> torch.Tensor:
        """One decode step for ``len(ids)`` sequences whose K/V caches ``[seqs, kv_heads,
        context, head]`` are full up to ``position``; writes the new K/V there and attends
        over the whole cache. The query heads sharing a KV head go in as that head's queries
        (GQA without repeating K/V, as paged decode kernels read it)."""
        d, hd = self.d, self.head_dim
        seqs, group = ids.shape[0], d.llm_heads // d.llm_kv_heads
        x = F.embedding(ids, self.embed)
        cos, sin = self.cos[position], self.sin[position]
        for layer, (k_cache, v_cache) in zip(self.layers, caches):
            h = F.rms_norm(x, (d.llm_hidden,))
            q = rotate(F.linear(h, layer["q"], layer["q_b"]).view(seqs, d.llm_kv_heads, group, hd), cos, sin)
            k, v = F.linear(h, layer["kv"], layer["kv_b"]).view(seqs, 2, d.llm_kv_heads, 1, hd).unbind(1)
            k_cache[:, :, position:position + 1].copy_(rotate(k, cos, sin))
            v_cache[:, :, position:position + 1].copy_(v)
            attn = F.scaled_dot_product_attention(q, k_cache, v_cache)
            x = x + F.linear(attn.reshape(seqs, d.llm_hidden), layer["o"])
            gate, up = F.linear(F.rms_norm(x, (d.llm_hidden,)), layer["gate_up"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer["down"])
        return F.linear(F.rms_norm(x, (d.llm_hidden,)), self.lm_head)


def time_ms(call: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median wall time of ``call`` (synchronised; CUDA events on a GPU)."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            call()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def measure_vit(vit: VisionEncoder, grid: Sequence[tuple[int, int]], mixed: Sequence[int],
                device: torch.device, dtype: torch.dtype, warmup: int, reps: int) -> tuple[list, float]:
    """(images, tokens per image, ms) per grid point, and the mixed batch's ms."""
    patches_per_token = vit.d.merge * vit.d.merge

    def run(tokens: Sequence[int]) -> float:
        lengths = [t * patches_per_token for t in tokens]
        patches = torch.randn(sum(lengths), PATCH_VALUES, device=device, dtype=dtype)
        return time_ms(lambda: vit(patches, lengths), device, warmup, reps)

    rows = []
    for images, tokens in grid:
        ms = run([tokens] * images)
        rows.append((images, tokens, ms))
        print(f"vit {images} x {tokens} tok: {ms:.2f} ms", flush=True)
    mixed_ms = run(mixed)
    print(f"vit mixed {list(mixed)}: {mixed_ms:.2f} ms", flush=True)
    return rows, mixed_ms


def measure_prefill(llm: LanguageModel, grid: Sequence[tuple[int, int]], device: torch.device,
                    warmup: int, reps: int) -> list:
    rows = []
    for seqs, length in grid:
        ids = torch.randint(0, llm.d.vocab, (seqs * length,), device=device)
        ms = time_ms(lambda: llm(ids, [length] * seqs), device, warmup, reps)
        rows.append((seqs, length, ms))
        print(f"prefill {seqs} x {length} tok: {ms:.2f} ms", flush=True)
    return rows


def measure_decode(llm: LanguageModel, grid: Sequence[tuple[int, int]], device: torch.device,
                   dtype: torch.dtype, reps: int, steps_per_graph: int = 10) -> list:
    """(sequences, context, ms per step): decode steps captured in a CUDA graph, as vLLM runs
    decode (no launch cost in the figure); eager on a CPU."""
    rows = []
    d = llm.d
    for seqs, context in grid:
        caches = [tuple(torch.zeros(seqs, d.llm_kv_heads, context, llm.head_dim, device=device,
                                    dtype=dtype) for _ in range(2)) for _ in llm.layers]
        ids = torch.randint(0, d.vocab, (seqs,), device=device)

        def steps() -> None:
            for _ in range(steps_per_graph):
                llm.decode(ids, caches, context - 1)

        if device.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                steps()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                steps()
            ms = time_ms(graph.replay, device, 1, reps) / steps_per_graph
            del graph
        else:
            ms = time_ms(steps, device, 1, reps) / steps_per_graph
        rows.append((seqs, context, ms))
        print(f"decode {seqs} seqs x {context} ctx: {ms:.3f} ms/step", flush=True)
        caches.clear()  # free this point's K/V before the next point allocates its own
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def measure(smoke: bool, warmup: int, reps: int) -> dict:
    """Time both models over their grids; the raw rows the analysis fits."""
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    dims = Dims(smoke)
    torch.manual_seed(0)
    if smoke:
        vit_grid = [(1, 16), (2, 16), (1, 64), (2, 64)]
        mixed, prefill_grid = [16, 64, 32], [(1, 64), (1, 256), (2, 128)]
        decode_grid = [(1, 64), (4, 256)]
    else:
        vit_grid = [(b, t) for t in (64, 256, 576, 1024, 2048) for b in (1, 2, 4, 8, 16) if b * t <= 16384]
        mixed = [1024, 256, 576, 64, 1600, 400]
        prefill_grid = [(1, 256), (1, 1024), (1, 2048), (1, 4096), (1, 8192), (4, 512), (4, 2048), (8, 1024)]
        decode_grid = [(1, 1024), (1, 8192), (8, 1024), (8, 4096), (32, 1024), (32, 4096),
                       (128, 1024), (128, 4096)]
    with torch.inference_mode():
        vit = VisionEncoder(dims, device, dtype)
        vit_rows, mixed_ms = measure_vit(vit, vit_grid, mixed, device, dtype, warmup, reps)
        del vit
        llm = LanguageModel(dims, device, dtype)
        prefill_rows = measure_prefill(llm, prefill_grid, device, warmup, reps)
        decode_rows = measure_decode(llm, decode_grid, device, dtype, reps)
        del llm
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
        "patches_per_token": dims.merge * dims.merge, "warmup": warmup, "reps": reps,
        "vit_rows": vit_rows, "vit_mixed_tokens": mixed, "vit_mixed_ms": mixed_ms,
        "prefill_rows": prefill_rows, "decode_rows": decode_rows,
    }


Pooled = dict[tuple[int, int], list[float]]


def pooled(runs: Sequence[dict]) -> tuple[Pooled, Pooled, Pooled]:
    """Each grid point's milliseconds over the runs: (ViT, prefill, decode); runs made before
    decode was measured have no decode rows."""
    tables: tuple[Pooled, Pooled, Pooled] = ({}, {}, {})
    for run in runs:
        for table, key in zip(tables, ("vit_rows", "prefill_rows", "decode_rows")):
            for a, b, ms in run.get(key, ()):
                table.setdefault((a, b), []).append(ms)
    return tables


def analyse(runs: Sequence[dict], gpu: str) -> tuple[dict, FittedEncoder]:
    """Fit both grids over every run's timings; the flat result and the encoder model.

    Several runs are fitted together (each timing one sample) rather than averaged first,
    so a point that moved between runs weighs as much as its spread says.
    """
    from router.sim.encoder import (
        QWEN2_VL_VIT,
        FittedEncoder,
        RooflineEncoder,
        fit_linear_quadratic,
        linear_quadratic_ms,
    )
    from router.sim.roofline import GPUS, MBU, MFU, MODELS

    ppt = runs[0]["patches_per_token"]
    vit_rows = [row for run in runs for row in run["vit_rows"]]
    prefill_rows = [row for run in runs for row in run["prefill_rows"]]
    vit_fit = fit_linear_quadratic([([t * ppt] * b, ms) for b, t, ms in vit_rows])
    llm_fit = fit_linear_quadratic([([n] * s, ms) for s, n, ms in prefill_rows], causal=True)
    encoder = FittedEncoder(QWEN2_VL_VIT, *vit_fit)
    peak = GPUS[gpu].bf16_flops
    vit_spec, llm_spec = QWEN2_VL_VIT, MODELS["qwen2-7b"]

    def mfu(flops: float, ms: float) -> float:
        """The roofline MFU at which ``flops`` would take ``ms`` (0 where the fit has no term)."""
        return flops / (peak * ms * 1e-3) if ms > 0 else 0.0

    def worst_rel_err(rows: list, fit: tuple[float, float, float], per_size: int, causal: bool,
                      min_size: int = 0) -> float:
        worst = 0.0
        for count, size, ms in rows:
            if size < min_size:
                continue
            pred = linear_quadratic_ms(fit, [size * per_size] * count, causal)
            worst = max(worst, abs(pred - ms) / ms)
        return worst

    last = runs[-1]
    result: dict = {key: last[key] for key in ("date", "machine", "device", "reps")}
    result["runs"] = len(runs)
    vit_pooled, prefill_pooled, decode_pooled = pooled(runs)
    result.update({
        "roofline_gpu_peak_tflops": peak / 1e12, "roofline_mfu": MFU,
        "vit_intercept_ms": round(vit_fit[0], 4),
        "vit_ms_per_kilo_patch": round(vit_fit[1] * 1e3, 5),
        "vit_ms_per_mega_pair": round(vit_fit[2] * 1e6, 5),
        "vit_fit_max_rel_err": round(worst_rel_err(vit_rows, vit_fit, ppt, False), 4),
        "vit_fit_max_rel_err_576tok_up": round(worst_rel_err(vit_rows, vit_fit, ppt, False, 576), 4),
        "vit_mfu_equiv": round(mfu(2 * vit_spec.params, vit_fit[1]), 4),
        "vit_attn_mfu_equiv": round(mfu(vit_spec.flops_per_attn_pair, vit_fit[2]), 4),
        "vit_mixed_ms": round(statistics.median(run["vit_mixed_ms"] for run in runs), 3),
        "vit_mixed_predicted_ms": round(encoder.compute_s(last["vit_mixed_tokens"]) * 1e3, 3),
        "vit_1200tok_image_ms": round(encoder.compute_s([1200]) * 1e3, 3),
        "vit_1200tok_image_roofline_ms": round(
            RooflineEncoder(vit_spec, peak).compute_s([1200]) * 1e3, 3),
        "llm_prefill_intercept_ms": round(llm_fit[0], 4),
        "llm_prefill_ms_per_kilo_token": round(llm_fit[1] * 1e3, 5),
        "llm_prefill_ms_per_mega_pair": round(llm_fit[2] * 1e6, 5),
        "llm_prefill_fit_max_rel_err": round(worst_rel_err(prefill_rows, llm_fit, 1, True), 4),
        "llm_prefill_fit_max_rel_err_1024tok_up": round(worst_rel_err(prefill_rows, llm_fit, 1, True, 1024), 4),
        "llm_prefill_mfu_equiv": round(mfu(2 * llm_spec.params, llm_fit[1]), 4),
        "llm_prefill_attn_mfu_equiv": round(mfu(llm_spec.flops_per_attn_pair, llm_fit[2]), 4),
    })
    # Decode is memory-bound: the MBU at which the roofline's bytes (weights once, plus the
    # KV of every sequence's context) would take the measured time, per point.
    bandwidth = GPUS[gpu].hbm_bytes_per_s
    weight_bytes = llm_spec.params * llm_spec.bytes_per_param
    mbu_by_point = {(seqs, ctx): (weight_bytes + llm_spec.kv_bytes_per_token * seqs * ctx)
                    / (bandwidth * statistics.median(ms) * 1e-3)
                    for (seqs, ctx), ms in decode_pooled.items()}
    if mbu_by_point:
        result.update({
            "roofline_hbm_tb_per_s": bandwidth / 1e12, "roofline_mbu": MBU,
            "decode_mbu_equiv": round(statistics.median(mbu_by_point.values()), 4),
            "decode_mbu_equiv_min": round(min(mbu_by_point.values()), 4),
            "decode_mbu_equiv_max": round(max(mbu_by_point.values()), 4),
        })
        result.update({f"decode_ms_s{s}_c{c}": round(statistics.median(ms), 4)
                       for (s, c), ms in decode_pooled.items()})
    result.update({f"vit_ms_b{b}_t{t}": round(statistics.median(ms), 3) for (b, t), ms in vit_pooled.items()})
    result.update({f"prefill_ms_s{s}_n{n}": round(statistics.median(ms), 3)
                   for (s, n), ms in prefill_pooled.items()})
    return result, encoder


def write_markdown(result: dict, runs: Sequence[dict], path: Path) -> None:
    vit_pooled, prefill_pooled, decode_pooled = pooled(runs)
    raw = runs[-1]

    def each(ms: list[float]) -> str:
        return " / ".join(f"{m:.2f}" for m in ms)

    vit_rows = "\n".join(f"| {b} | {t} | {b * t * raw['patches_per_token']} | {each(ms)} |"
                          for (b, t), ms in vit_pooled.items())
    prefill_rows = "\n".join(f"| {s} | {n} | {each(ms)} |" for (s, n), ms in prefill_pooled.items())
    small = [m for (b, t), ms in vit_pooled.items() if b * t * raw["patches_per_token"] <= 1024 for m in ms]
    floor = (min(small), max(small)) if small else (0.0, 0.0)
    decode = ""
    if decode_pooled:
        decode_rows = "\n".join(f"| {s} | {c} | {each(ms)} |" for (s, c), ms in decode_pooled.items())
        decode = f"""
Qwen2-7B decode steps, captured in CUDA graphs (K/V caches of the given context per sequence):
the roofline's bytes (weights once per step, plus every sequence's KV) moved at
{result['decode_mbu_equiv']} of the {result['roofline_hbm_tb_per_s']:g} TB/s HBM bandwidth (median over points; range
{result['decode_mbu_equiv_min']}-{result['decode_mbu_equiv_max']}); the roofline assumes {result['roofline_mbu']}. These steps run one
unfused kernel per operation (some two dozen per layer) and no split-KV attention, so they are a
pessimistic stand-in for vLLM's fused decode; the simulator keeps the roofline's figure for
decode (a lower one would favour disaggregation) and takes only the ViT and prefill figures.

| decode sequences | context | ms per step (per run) |
|---:|---:|---:|
{decode_rows}
"""
    path.write_text(f"""# ViT encode, LLM prefill and decode cost on {result['device']}

Command: `{result['command']}`; {result['date']}; {result['machine']}. {result['runs']} run(s) of the whole
grid ({', '.join(run['date'] for run in runs)}), each point the median of {result['reps']} timed calls;
the tables give every run's figure, the fits use them all.

Random-weight BF16 models at their real shapes (`benchmarks/epd_gpu_costs.py`): Qwen2-VL's 675M ViT
(full attention within each image, eager) and Qwen2-7B prefill (causal, eager). Fits
`ms = intercept + a * tokens + b * attended pairs` (relative least squares):

| | intercept ms | a | b | worst fit error | MFU the roofline would need (linear / attention) |
|---|---:|---:|---:|---:|---:|
| ViT (per patch) | {result['vit_intercept_ms']} | {result['vit_ms_per_kilo_patch']} ms / 1k patches | {result['vit_ms_per_mega_pair']} ms / 1M pairs | {result['vit_fit_max_rel_err']:.1%} | {result['vit_mfu_equiv']} / {result['vit_attn_mfu_equiv']} |
| Qwen2-7B prefill (per token) | {result['llm_prefill_intercept_ms']} | {result['llm_prefill_ms_per_kilo_token']} ms / 1k tokens | {result['llm_prefill_ms_per_mega_pair']} ms / 1M pairs | {result['llm_prefill_fit_max_rel_err']:.1%} | {result['llm_prefill_mfu_equiv']} / {result['llm_prefill_attn_mfu_equiv']} |

The worst fit errors are where the CPU launching eager kernels, not the GPU, sets the pace
(ViT forwards of up to 1,024 patches took {floor[0]:.1f}-{floor[1]:.1f} ms whatever their size, a floor that
moved between runs with the host); for images of 576 tokens or more
the fit is within {result['vit_fit_max_rel_err_576tok_up']:.1%}, for prompts of 1,024 tokens or more within
{result['llm_prefill_fit_max_rel_err_1024tok_up']:.1%}.

The simulator's roofline assumes MFU {result['roofline_mfu']} for both. One 1,200-token image (4,800 patches):
{result['vit_1200tok_image_ms']} ms fitted vs {result['vit_1200tok_image_roofline_ms']} ms roofline. A mixed batch of
images of {raw['vit_mixed_tokens']} tokens: {result['vit_mixed_ms']} ms measured, {result['vit_mixed_predicted_ms']} ms
predicted by the fit (which saw only batches of equal images).

| ViT images | tokens each | patches | ms (per run) |
|---:|---:|---:|---:|
{vit_rows}

| prefill sequences | tokens each | ms (per run) |
|---:|---:|---:|
{prefill_rows}
{decode}
What this leaves out: vLLM's own kernels (its ViT uses FlashAttention varlen, prefill uses its
attention backend and may capture graphs), image preprocessing on the CPU, and the step's
scheduler time; only the two forwards are timed. The simulator takes the ViT fit whole
(intercept included: vLLM runs its encoders eagerly) but only the prefill fit's slopes, as
MFUs in the roofline, keeping the roofline's 2 ms step overhead in place of the eager
prefill's intercept.

Rerun on a CUDA machine: `python benchmarks/epd_gpu_costs.py`; refit saved timings without a GPU:
`python benchmarks/epd_gpu_costs.py --raw benchmarks/results/epd_gpu_costs_raw*.json`.
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", default="h200",
                        help="roofline GPU key (router.sim.roofline.GPUS) the fits are compared with "
                             "and the encoder model file is named for")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--raw", type=Path, nargs="+", metavar="FILE",
                        help="fit saved timings (one file per run, fitted together) instead of measuring")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models on the CPU; prints the analysis, writes nothing")
    args = parser.parse_args()
    if args.raw:
        runs = [json.loads(path.read_text()) for path in args.raw]
    else:
        if not args.smoke and not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (or --smoke, or --raw)")
        raw = measure(args.smoke, args.warmup, args.reps)
        if not args.smoke:
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / f"{NAME}_raw.json").write_text(json.dumps(raw, indent=1) + "\n")
        runs = [raw]
    result, encoder = analyse(runs, args.gpu)
    result["command"] = shlex.join(["python", "benchmarks/epd_gpu_costs.py", *sys.argv[1:]])
    print(json.dumps(result, indent=1))
    if args.smoke:
        return
    from router.sim.encoder import MeasuredCosts

    (RESULTS / f"{NAME}.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, runs, RESULTS / f"{NAME}.md")
    saved = MeasuredCosts(args.gpu, encoder, result["llm_prefill_mfu_equiv"],
                          result["llm_prefill_attn_mfu_equiv"],
                          f"benchmarks/epd_gpu_costs.py on {result['device']}, "
                          f"{len(runs)} run(s), last {result['date']}").save()
    print(f"wrote {saved}")


if __name__ == "__main__":
    main()
