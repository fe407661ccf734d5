"""``tiny-mm``: a random PaliGemma (SigLIP vision tower + Gemma text) for multimodal tests.

Exists so that encoder/prefill/decode disaggregation can be tested with real
vLLM processes on CPU without a hub download. PaliGemma is used because
transformers imports it without torchvision (Qwen2-VL, LLaVA, Gemma3 need it).
What vLLM's PaliGemma path needs beyond random weights, learned by serving it:

- an image processor with ``image_seq_length`` (the PIL SigLIP processor, no
  torchvision) so the HF processor expands one ``<image>`` into the right count;
- a tokenizer with a bos token and a ``"\\n"`` entry in its vocabulary (vLLM
  appends the newline PaliGemma prompts end with); SmolLM2's byte-level BPE
  has no literal ``"\\n"``, so it is added as a token;
- a chat template (SmolLM2's), since PaliGemma ships none;
- vision keys under ``vision_tower.vision_model.*``, where vLLM's SigLIP expects them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Image side 28 with patch 14 gives 4 image tokens: enough to carry an image,
# few enough that encode and prefill stay fast on two cores.
TINY_MM_VISION: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 28,
    "patch_size": 14,
}
TINY_MM_TEXT: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,  # vLLM's CPU attention rejects small head sizes
    "max_position_embeddings": 4096,
    "initializer_range": 0.2,
}
TINY_MM_SEED = 2468


def build_tiny_mm(out: Path, tokenizer: Any) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration,
                              PaliGemmaProcessor, SiglipImageProcessorPil, SiglipVisionConfig)

    tokenizer.add_tokens(["\n"])
    side = TINY_MM_VISION["image_size"]
    image_processor = SiglipImageProcessorPil(size={"height": side, "width": side})
    image_processor.image_seq_length = (side // TINY_MM_VISION["patch_size"]) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   chat_template=tokenizer.chat_template)
    tokenizer = processor.tokenizer  # now also holds <image> and PaliGemma's extra tokens
    vocab = len(tokenizer)
    text = GemmaConfig(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, **TINY_MM_TEXT)
    config = PaliGemmaConfig(vision_config=SiglipVisionConfig(**TINY_MM_VISION).to_dict(),
                             text_config=text.to_dict(), image_token_index=processor.image_token_id,
                             projection_dim=TINY_MM_TEXT["hidden_size"], vocab_size=vocab,
                             bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, dtype="bfloat16")
    torch.manual_seed(TINY_MM_SEED)
    model = PaliGemmaForConditionalGeneration(config)
    model.to(torch.bfloat16).save_pretrained(out)
    processor.save_pretrained(out)
    _nest_vision_keys(out, load_file, save_file)


def _nest_vision_keys(out: Path, load_file: Any, save_file: Any) -> None:
    """Rename ``*vision_tower.X`` to ``*vision_tower.vision_model.X`` in every shard.

    transformers 5 saves the SigLIP tower flat; vLLM's loader maps
    ``model.vision_tower.`` to its ``vision_tower.`` module, whose weights sit
    under ``vision_model``.
    """
    marker = "vision_tower."
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(shard)
        renamed = {}
        for key, value in tensors.items():
            head, sep, tail = key.partition(marker)
            if sep and not tail.startswith("vision_model."):
                key = f"{head}{marker}vision_model.{tail}"
            renamed[key] = value
        save_file(renamed, shard, metadata={"format": "pt"})


def sample_image_url(seed: int, side: int = 32) -> str:
    """A small deterministic RGB pattern as a PNG ``data:`` URL: an image chat request for
    ``tiny-mm`` that needs no file or network (tests, demos). Different seeds give
    different pixels, hence different encoder-cache keys."""
    import base64
    import io

    from PIL import Image

    image = Image.new("RGB", (side, side))
    image.putdata([((x * 8 + seed * 40) % 256, (y * 8 + seed * 16) % 256, (x * y + seed) % 256)
                   for y in range(side) for x in range(side)])
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
