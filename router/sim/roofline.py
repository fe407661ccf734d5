"""GPU deployments from a roofline: FLOPs and bytes per token of a named model on published peaks.

A step costs ``overhead + max(compute, memory)`` (see ``RooflineStepModel``):
compute is ``2 * params`` FLOPs per processed token plus ``4 * layers * heads *
head_dim`` FLOPs per attended query-key pair; memory is the weights (read once
per step) plus the KV cache read by the batch. Achieved fractions of the peaks
(``mfu``, ``mbu``) and the per-step overhead are named settings, not fitted:
they are typical of vLLM on Hopper (large prefills reach about half of dense
BF16 peak; decode reaches about 80% of HBM bandwidth) and should be refitted
from ``benchmarks/sim_profile.py`` on a real GPU before trusting absolute numbers.

Sources (public figures, checked when this module was written):

- Llama-3-8B: ``meta-llama/Meta-Llama-3-8B`` config.json: 32 layers, hidden 4096,
  32 query heads, 8 KV heads, head_dim 128, 8.03 B parameters (model card).
- Qwen2-7B: ``Qwen/Qwen2-7B`` config.json: 28 layers, hidden 3584, 28 query heads,
  4 KV heads, head_dim 128, 7.62 B parameters (model card).
- NVIDIA H100 SXM5 80 GB datasheet: 989 TFLOPS dense BF16 (1,979 with sparsity),
  3.35 TB/s HBM3.
- NVIDIA H200 SXM 141 GB datasheet: 989 TFLOPS dense BF16, 4.8 TB/s HBM3e.
- KV transfer: one NVIDIA ConnectX-7 400 Gb/s NIC per GPU (DGX H100/H200 reference
  design) = 50 GB/s line rate; ``transfer_efficiency`` of it is achieved.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.sim.perf_model import Deployment, RooflineStepModel


@dataclass(frozen=True)
class ModelSpec:
    """Transformer shape: what FLOPs and bytes per token follow from."""

    name: str
    params: float
    layers: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    bytes_per_param: int = 2  # BF16 weights
    kv_bytes_per_value: int = 2  # BF16 KV cache
    max_model_len: int = 8192

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_bytes_per_value

    @property
    def flops_per_attn_pair(self) -> float:
        return 4.0 * self.layers * self.q_heads * self.head_dim


@dataclass(frozen=True)
class GPUSpec:
    """Published peaks of one accelerator."""

    name: str
    bf16_flops: float
    hbm_bytes_per_s: float
    hbm_bytes: float
    nic_bytes_per_s: float = 50e9


MODELS = {
    "llama3-8b": ModelSpec("Llama-3-8B", 8.03e9, 32, 4096, 32, 8, 128, max_model_len=8192),
    "qwen2-7b": ModelSpec("Qwen2-7B", 7.62e9, 28, 3584, 28, 4, 128, max_model_len=32768),
}
GPUS = {
    "h100": GPUSpec("H100 SXM5 80GB", 989e12, 3.35e12, 80e9),
    "h200": GPUSpec("H200 SXM 141GB", 989e12, 4.8e12, 141e9),
}
PRESETS = {f"{m}-{g}": (m, g) for m in MODELS for g in GPUS}

MFU = 0.5
"""Achieved fraction of dense BF16 peak in compute-bound steps."""
MBU = 0.8
"""Achieved fraction of HBM bandwidth in memory-bound steps."""
STEP_OVERHEAD_MS = 2.0
"""Scheduler, sampling and launch time per step outside the roofline."""
GPU_MEMORY_UTILIZATION = 0.9
"""vLLM's default share of HBM it may use."""
ACTIVATION_RESERVE_BYTES = 4e9
"""HBM kept for activations and CUDA graphs, not available to the KV cache."""
TRANSFER_EFFICIENCY = 0.8
"""Achieved fraction of NIC line rate for KV transfers."""


def roofline_deployment(model_key: str, gpu_key: str, block_size: int = 16,
                        max_num_batched_tokens: int = 8192, max_num_seqs: int = 256,
                        mfu: float = MFU, attn_mfu: float | None = None) -> Deployment:
    """A :class:`Deployment` for one model on one GPU, sized as vLLM would size it.

    ``mfu``/``attn_mfu`` replace the assumed compute efficiency with measured ones
    (``benchmarks/epd_gpu_costs.py``); the description says which was used.
    """
    model, gpu = MODELS[model_key], GPUS[gpu_key]
    weight_bytes = model.params * model.bytes_per_param
    kv_budget = gpu.hbm_bytes * GPU_MEMORY_UTILIZATION - weight_bytes - ACTIVATION_RESERVE_BYTES
    num_blocks = int(kv_budget // (model.kv_bytes_per_token * block_size))
    step = RooflineStepModel(
        params=model.params, weight_bytes=weight_bytes,
        flops_per_attn_pair=model.flops_per_attn_pair,
        kv_bytes_per_token=model.kv_bytes_per_token, peak_flops=gpu.bf16_flops,
        hbm_bytes_per_s=gpu.hbm_bytes_per_s, mfu=mfu, mbu=MBU, overhead_ms=STEP_OVERHEAD_MS,
        attn_mfu=attn_mfu)
    return Deployment(
        name=f"{model_key}-{gpu_key}", step_model=step,
        description=(f"{model.name} on one {gpu.name} (roofline, mfu={mfu:g}"
                     + (f", attention mfu={attn_mfu:g}" if attn_mfu else "") + f", mbu={MBU})"),
        block_size=block_size, num_kv_blocks=num_blocks,
        max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
        max_model_len=model.max_model_len, kv_bytes_per_token=model.kv_bytes_per_token,
        transfer_bytes_per_s=gpu.nic_bytes_per_s * TRANSFER_EFFICIENCY, transfer_latency_ms=1.0,
        ttft_overhead_ms=0.0, default_slo_ttft_ms=1000.0, default_slo_tpot_ms=50.0,
        fit={"source": "roofline", "model": model.name, "gpu": gpu.name})
