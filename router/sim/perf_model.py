"""Step-time models and the deployments that carry them.

A *step* is one forward pass of continuous batching. Its cost is described by
four aggregates of the batch, computed by the instance model:

- ``prefill_tokens``: prompt tokens computed in the step (all chunks together);
- ``prefill_attn``:   sum over prefill chunks of ``chunk * (context_before + chunk / 2)``,
                      the number of query-key pairs the chunk attends to (quadratic part);
- ``decode_seqs``:    sequences decoding one token each;
- ``decode_ctx``:     sum of those sequences' context lengths (KV read per decode).

Two models map them to seconds:

- :class:`LinearStepModel`, fitted from a real engine on this machine
  (``benchmarks/sim_profile.py`` writes ``perf_models/<name>.json``):
  ``step_ms = base + a*prefill_tokens + b*prefill_attn/1e3 + c*decode_seqs + d*decode_ctx/1e3``;
- :class:`RooflineStepModel` for GPU deployments (see ``router.sim.roofline``).

A :class:`Deployment` bundles a step model with the engine limits the
scheduler obeys (token budget, max sequences, KV blocks) and the network that
carries KV between instances.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

PERF_MODEL_DIR = Path(__file__).parent / "perf_models"


class StepTimeModel(Protocol):
    """Seconds one engine step takes for a batch described by its aggregates."""

    def step_s(self, prefill_tokens: int, prefill_attn: float, decode_seqs: int,
               decode_ctx: int) -> float: ...


@dataclass(frozen=True)
class LinearStepModel:
    """``step_ms = base_ms + per_prefill_token_ms*P + per_kilo_attn_pair_ms*A/1e3
    + per_decode_seq_ms*S + per_kilo_ctx_token_ms*C/1e3``, fitted by least squares."""

    base_ms: float
    per_prefill_token_ms: float
    per_kilo_attn_pair_ms: float = 0.0
    per_decode_seq_ms: float = 0.0
    per_kilo_ctx_token_ms: float = 0.0

    def step_s(self, prefill_tokens: int, prefill_attn: float, decode_seqs: int,
               decode_ctx: int) -> float:
        return (self.base_ms + self.per_prefill_token_ms * prefill_tokens
                + self.per_kilo_attn_pair_ms * prefill_attn * 1e-3
                + self.per_decode_seq_ms * decode_seqs
                + self.per_kilo_ctx_token_ms * decode_ctx * 1e-3) * 1e-3


@dataclass(frozen=True)
class RooflineStepModel:
    """``step = overhead + max(FLOPs / (peak_flops*mfu), bytes / (hbm_bw*mbu))``.

    FLOPs: ``2 * params`` per token processed plus ``4 * layers * q_dim`` per
    query-key pair (QK^T and AV). Bytes: the weights once per step plus the KV
    read by every decode sequence and prefill chunk. Attention FLOPs run at
    ``attn_mfu`` when it is set (measured attention kernels reach a lower share of
    peak than the dense layers), else at ``mfu``.
    """

    params: float
    weight_bytes: float
    flops_per_attn_pair: float
    kv_bytes_per_token: float
    peak_flops: float
    hbm_bytes_per_s: float
    mfu: float
    mbu: float
    overhead_ms: float
    attn_mfu: float | None = None

    def step_s(self, prefill_tokens: int, prefill_attn: float, decode_seqs: int,
               decode_ctx: int) -> float:
        tokens = prefill_tokens + decode_seqs
        attn_flops = self.flops_per_attn_pair * (prefill_attn + decode_ctx)
        compute = (2.0 * self.params * tokens / self.mfu
                   + attn_flops / (self.attn_mfu or self.mfu)) / self.peak_flops
        kv_read = self.kv_bytes_per_token * (decode_ctx + prefill_attn / max(prefill_tokens, 1))
        memory = self.weight_bytes + kv_read
        return self.overhead_ms * 1e-3 + max(compute, memory / (self.hbm_bytes_per_s * self.mbu))


@dataclass
class Deployment:
    """One engine configuration as the simulator needs it.

    Every field is a setting a real deployment has; the fitted CPU JSON and the
    GPU roofline both produce one.
    """

    name: str
    step_model: StepTimeModel
    description: str = ""
    block_size: int = 16
    """Tokens per KV block (vLLM ``--block-size``)."""
    num_kv_blocks: int = 10_000
    """KV blocks per instance (the engine's reported cache size)."""
    max_num_batched_tokens: int = 8192
    """Token budget of one step (vLLM ``--max-num-batched-tokens``)."""
    max_num_seqs: int = 256
    """Most sequences running at once (vLLM ``--max-num-seqs``)."""
    max_model_len: int = 8192
    """Longest prompt + output accepted; longer requests fail on arrival, as in vLLM."""
    kv_bytes_per_token: float = 131072.0
    """KV cache bytes per token over all layers (K and V)."""
    transfer_bytes_per_s: float = 25e9
    """Effective P->D KV transfer bandwidth per sending instance."""
    transfer_latency_ms: float = 1.0
    """Fixed cost of one KV transfer (handshake, descriptor exchange)."""
    ttft_overhead_ms: float = 0.0
    """Client-visible time outside engine steps added to TTFT (HTTP, tokenize, detokenize)."""
    host_instances: int = 1
    """Instances sharing one host (consecutive instance ids); 1 = independent instances, one
    device each (GPU deployments)."""
    neighbour_prefill_slowdown: float = 0.0
    """Fractional increase of a step's prefill time while the other instances on the same
    host are busy (a CPU host's shared caches and memory bandwidth); measured by
    ``sim_profile.py``, which found decode steps unaffected."""
    default_slo_ttft_ms: float = 1000.0
    default_slo_tpot_ms: float = 50.0
    fit: dict[str, Any] = field(default_factory=dict)
    """How the step model was obtained (data points, residuals, machine); informational."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["step_model"] = {"kind": type(self.step_model).__name__, **asdict(self.step_model)}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Deployment:
        data = dict(data)
        model = dict(data.pop("step_model"))
        kind = model.pop("kind", "LinearStepModel")
        kinds = {"LinearStepModel": LinearStepModel, "RooflineStepModel": RooflineStepModel}
        if kind not in kinds:
            raise ValueError(f"unknown step model kind '{kind}'")
        known = set(cls.__dataclass_fields__)
        return cls(step_model=kinds[kind](**model), **{k: v for k, v in data.items() if k in known})


def available_deployments() -> list[str]:
    """Names accepted by :func:`load_deployment`: fitted JSON files and roofline presets."""
    from router.sim.roofline import PRESETS

    fitted = sorted(p.stem for p in PERF_MODEL_DIR.glob("*.json"))
    return fitted + sorted(PRESETS)


def load_deployment(name_or_path: str | Path) -> Deployment:
    """A deployment by name (``smollm2-cpu``, ``llama3-8b-h100``, ...) or from a JSON path."""
    from router.sim.roofline import PRESETS, roofline_deployment

    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        return Deployment.from_json(json.loads(path.read_text()))
    name = str(name_or_path)
    fitted = PERF_MODEL_DIR / f"{name}.json"
    if fitted.exists():
        return Deployment.from_json(json.loads(fitted.read_text()))
    if name in PRESETS:
        return roofline_deployment(*PRESETS[name])
    raise ValueError(f"unknown deployment '{name}'; choose one of {', '.join(available_deployments())}"
                     " or give a JSON path")
