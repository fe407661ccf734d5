"""Vision-encoder cost for the EPD simulator (``router.sim.epd``): a roofline, or a fit to
GPU timings (:class:`FittedEncoder`, :class:`MeasuredCosts`, from
``benchmarks/epd_gpu_costs.py``), which replaces the roofline's assumed efficiency.

An image of ``t`` language-model image tokens is ``t * merge**2`` ViT patches
(Qwen2-VL merges 2x2 patches of 14x14 pixels into one token). The encoder is
compute-bound (every patch goes through every layer; weights are read once per
batch), so its time is ``FLOPs / (peak * mfu)``:

- ``2 * params`` FLOPs per patch (the dense layers and the patch merger);
- ``4 * layers * hidden`` FLOPs per query-key pair (QK^T and AV), with full
  attention *within* each image (Qwen2-VL's ViT attends over one image's
  patches, ``cu_seqlens`` per image), so the pairs are ``patches**2`` per image.

A step that only encodes also pays ``overhead_ms`` (launch, preprocessing); a
step that encodes beside language-model work shares that step's overhead.
The output sent to a prefill instance is ``t * out_hidden`` BF16 values.

Sources (public figures, checked when this module was written):

- Qwen2-VL-7B-Instruct ``config.json`` ``vision_config``: depth 32, embed_dim
  1280, num_heads 16, mlp_ratio 4, patch_size 14, spatial_merge_size 2,
  hidden_size 3584 (the language model's width, the merger's output).
- Qwen2-VL paper (arXiv 2409.12191, Table 1): a 675 M-parameter ViT for every
  model size; its language model is Qwen2-7B (``roofline.MODELS["qwen2-7b"]``).
- Peaks and ``MFU``/overhead: the same H100/H200 figures and settings as
  ``router.sim.roofline``. Timed on an H200 (``benchmarks/results/epd_gpu_costs.md``), the
  ViT reached about 0.48 of peak in its dense layers and Qwen2-7B prefill about 0.70, so
  the roofline's single 0.5 understates the encoder's share of the work.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from router.sim.perf_model import PERF_MODEL_DIR, Deployment, load_deployment
from router.sim.roofline import GPUS, MFU, STEP_OVERHEAD_MS, roofline_deployment


@dataclass(frozen=True)
class VisionEncoderSpec:
    """ViT shape: FLOPs per patch and per attended patch pair, and the output width."""

    name: str
    params: float
    layers: int
    hidden: int
    merge: int
    out_hidden: int
    bytes_per_value: int = 2

    @property
    def patches_per_token(self) -> int:
        return self.merge * self.merge

    @property
    def flops_per_attn_pair(self) -> float:
        return 4.0 * self.layers * self.hidden


QWEN2_VL_VIT = VisionEncoderSpec("Qwen2-VL ViT (675M)", 675e6, 32, 1280, 2, 3584)


def attended_pairs(lengths: Sequence[int], causal: bool) -> float:
    """Query-key pairs of attention within each segment (an image's patches, a prompt)."""
    return float(sum(n * (n + 1) / 2 if causal else n * n for n in lengths))


def linear_quadratic_ms(coefficients: tuple[float, float, float], lengths: Sequence[int],
                        causal: bool = False) -> float:
    """``intercept + a * sum(lengths) + b * pairs``: the model :func:`fit_linear_quadratic` fits."""
    intercept, per_unit, per_pair = coefficients
    return intercept + per_unit * sum(lengths) + per_pair * attended_pairs(lengths, causal)


class ImageEncoderCost(ABC):
    """What the EPD simulator and profiler ask of an encoder model, given its ``compute_s``."""

    spec: VisionEncoderSpec

    @abstractmethod
    def compute_s(self, image_tokens: Sequence[int]) -> float:
        """Seconds of one forward pass over images of these token counts."""

    def batch_s(self, images: int, tokens_per_image: int) -> float:
        """``compute_s`` of ``images`` equal images (the profiler's cost model)."""
        return self.compute_s([tokens_per_image] * images) if images > 0 else 0.0

    def output_bytes(self, image_tokens: int) -> float:
        return image_tokens * self.spec.out_hidden * self.spec.bytes_per_value


@dataclass(frozen=True)
class RooflineEncoder(ImageEncoderCost):
    """Seconds to encode a batch of images, and the bytes of its output."""

    spec: VisionEncoderSpec
    peak_flops: float
    mfu: float = MFU
    overhead_ms: float = STEP_OVERHEAD_MS

    def compute_s(self, image_tokens: Sequence[int]) -> float:
        """Encoder compute for images of these token counts, one forward pass (no overhead)."""
        spec = self.spec
        patches = [tokens * spec.patches_per_token for tokens in image_tokens]
        flops = (2.0 * spec.params * sum(patches)
                 + spec.flops_per_attn_pair * attended_pairs(patches, causal=False))
        return flops / (self.peak_flops * self.mfu)


def fit_linear_quadratic(samples: Sequence[tuple[Sequence[int], float]],
                         causal: bool = False) -> tuple[float, float, float]:
    """Least-squares ``ms = intercept + a * sum(lengths) + b * pairs`` over measured forwards.

    Each sample is one forward's segment lengths and its milliseconds. Errors are weighted
    relative to the measurement, so the small batches that dominate a serving trace are fitted
    as closely as the large ones; a negative coefficient (noise on a near-zero term) is
    dropped and the rest refitted, so the model never predicts less work costing more.
    """
    rows = np.array([[1.0, float(sum(lengths)), attended_pairs(lengths, causal)]
                     for lengths, _ in samples])
    ms = np.array([m for _, m in samples])
    keep = [0, 1, 2]
    while True:
        weights = 1.0 / ms
        coef, *_ = np.linalg.lstsq(rows[:, keep] * weights[:, None], ms * weights, rcond=None)
        if (coef >= 0).all() or len(keep) == 1:
            break
        keep = [k for k, c in zip(keep, coef) if c >= 0] or [0]
    full = [0.0, 0.0, 0.0]
    for k, c in zip(keep, coef):
        full[k] = max(float(c), 0.0)
    return full[0], full[1], full[2]


@dataclass(frozen=True)
class FittedEncoder(ImageEncoderCost):
    """Encoder cost fitted to GPU measurements (``benchmarks/epd_gpu_costs.py``):
    ``ms = intercept + per_patch * patches + per_pair * patch pairs within each image``.

    Same interface as :class:`RooflineEncoder`; the intercept is the eager ViT's own launch
    time, paid by every forward that encodes, and ``overhead_ms`` the engine step's
    scheduling around it, as for the roofline.
    """

    spec: VisionEncoderSpec
    intercept_ms: float
    ms_per_patch: float
    ms_per_pair: float
    overhead_ms: float = STEP_OVERHEAD_MS

    def compute_s(self, image_tokens: Sequence[int]) -> float:
        if not image_tokens:
            return 0.0
        patches = [t * self.spec.patches_per_token for t in image_tokens]
        coefficients = (self.intercept_ms, self.ms_per_patch, self.ms_per_pair)
        return linear_quadratic_ms(coefficients, patches) * 1e-3


@dataclass(frozen=True)
class MeasuredCosts:
    """What ``benchmarks/epd_gpu_costs.py`` measured on one GPU: the ViT's fitted cost and
    the compute efficiency Qwen2-7B prefill reached (dense layers and attention), which
    replace the roofline's assumed 50% of peak for both sides of the EPD trade-off."""

    gpu: str
    encoder: FittedEncoder
    llm_mfu: float
    llm_attn_mfu: float
    source: str

    @staticmethod
    def path(gpu: str) -> Path:
        return PERF_MODEL_DIR / "measured" / f"qwen2-vl-7b-{gpu}.json"

    def save(self) -> Path:
        path = self.path(self.gpu)
        path.parent.mkdir(exist_ok=True)
        enc = self.encoder
        path.write_text(json.dumps({
            "gpu": self.gpu, "source": self.source,
            "encoder": {"name": enc.spec.name, "intercept_ms": enc.intercept_ms,
                        "ms_per_patch": enc.ms_per_patch, "ms_per_pair": enc.ms_per_pair},
            "llm": {"model": "qwen2-7b", "mfu": self.llm_mfu, "attn_mfu": self.llm_attn_mfu},
        }, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, gpu: str) -> MeasuredCosts:
        path = cls.path(gpu)
        if not path.exists():
            raise FileNotFoundError(f"no measured costs for {gpu} ({path}); run "
                                    f"benchmarks/epd_gpu_costs.py --gpu {gpu} on that GPU")
        data = json.loads(path.read_text())
        enc = data["encoder"]
        if enc["name"] != QWEN2_VL_VIT.name:
            raise ValueError(f"{path} was fitted for {enc['name']!r}, not {QWEN2_VL_VIT.name!r}")
        encoder = FittedEncoder(QWEN2_VL_VIT, enc["intercept_ms"], enc["ms_per_patch"], enc["ms_per_pair"])
        return cls(gpu, encoder, data["llm"]["mfu"], data["llm"]["attn_mfu"], data["source"])


@dataclass(frozen=True)
class MMDeployment:
    """A multimodal deployment: the language model's deployment plus its vision encoder."""

    llm: Deployment
    encoder: RooflineEncoder | FittedEncoder

    @property
    def name(self) -> str:
        measured = isinstance(self.encoder, FittedEncoder)
        return f"{self.llm.name}+vit" + (" (measured costs)" if measured else "")


def qwen2_vl_deployment(gpu: str = "h100", measured: bool = False) -> MMDeployment:
    """Qwen2-VL-7B on one GPU per instance: ``qwen2-7b-<gpu>`` plus the 675M ViT.

    By default both sides are rooflines at the assumed MFU; ``measured`` takes the ViT's
    fitted cost and the LLM's compute efficiency from :class:`MeasuredCosts` for ``gpu``.
    Decode keeps the roofline's memory efficiency: the decode steps timed beside the rest
    (``benchmarks/epd_gpu_costs.py``) run unfused kernels, a pessimistic stand-in for
    vLLM's fused, split-KV decode, and a lower figure would favour disaggregation.
    """
    if not measured:
        return MMDeployment(load_deployment(f"qwen2-7b-{gpu}"),
                            RooflineEncoder(QWEN2_VL_VIT, GPUS[gpu].bf16_flops))
    costs = MeasuredCosts.load(gpu)
    llm = roofline_deployment("qwen2-7b", gpu, mfu=costs.llm_mfu, attn_mfu=costs.llm_attn_mfu)
    return MMDeployment(llm, costs.encoder)
