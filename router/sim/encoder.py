"""Vision-encoder cost from a roofline, for the EPD simulator (``router.sim.epd``).

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
  ``router.sim.roofline`` (no encoder measurement was available here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from router.sim.perf_model import Deployment, load_deployment
from router.sim.roofline import GPUS, MFU, STEP_OVERHEAD_MS


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


@dataclass(frozen=True)
class RooflineEncoder:
    """Seconds to encode a batch of images, and the bytes of its output."""

    spec: VisionEncoderSpec
    peak_flops: float
    mfu: float = MFU
    overhead_ms: float = STEP_OVERHEAD_MS

    def compute_s(self, image_tokens: Sequence[int]) -> float:
        """Encoder compute for images of these token counts, one forward pass (no overhead)."""
        spec = self.spec
        flops = 0.0
        for tokens in image_tokens:
            patches = tokens * spec.patches_per_token
            flops += 2.0 * spec.params * patches + spec.flops_per_attn_pair * patches * patches
        return flops / (self.peak_flops * self.mfu)

    def batch_s(self, images: int, tokens_per_image: int) -> float:
        """``compute_s`` of ``images`` equal images (the profiler's cost model)."""
        return self.compute_s([tokens_per_image] * images) if images > 0 else 0.0

    def output_bytes(self, image_tokens: int) -> float:
        return image_tokens * self.spec.out_hidden * self.spec.bytes_per_value


@dataclass(frozen=True)
class MMDeployment:
    """A multimodal deployment: the language model's deployment plus its vision encoder."""

    llm: Deployment
    encoder: RooflineEncoder

    @property
    def name(self) -> str:
        return f"{self.llm.name}+vit"


def qwen2_vl_deployment(gpu: str = "h100") -> MMDeployment:
    """Qwen2-VL-7B on one GPU per instance: ``qwen2-7b-<gpu>`` plus the 675M ViT."""
    return MMDeployment(load_deployment(f"qwen2-7b-{gpu}"),
                        RooflineEncoder(QWEN2_VL_VIT, GPUS[gpu].bf16_flops))
