"""``tiny-moe``: a random Qwen3-MoE (8 experts, top-2) for expert-load tests and benchmarks.

Small enough to start in seconds on the CPU MoE backend, big enough to show
uneven routing: every layer is a MoE layer, the router's weights are random
from a fixed seed, so some experts are hot for real text and others cold.
Uses SmolLM2's tokenizer and chat template like the ``tiny`` model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_MOE_SHAPE: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,  # vLLM's CPU attention rejects small head sizes
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "max_position_embeddings": 4096,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
}
TINY_MOE_SEED = 4321


def build_tiny_moe(out: Path, tokenizer: Any) -> None:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, dtype="bfloat16",
                            **TINY_MOE_SHAPE)
    torch.manual_seed(TINY_MOE_SEED)
    model = Qwen3MoeForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
