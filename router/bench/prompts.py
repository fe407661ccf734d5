"""Prompt sets for live workloads: a built-in handful, or ShareGPT first turns from shared data."""

from __future__ import annotations

import json
import os
from pathlib import Path

BUILTIN_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three uses of a paperclip.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue? Answer briefly.",
    "Give me a short tip for writing clear code.",
    "What is 17 times 23?",
)
SHAREGPT_FILE = "sharegpt/mlenergy_ShareGPT_V3_filtered_1000.json"
PROMPT_SETS = ("builtin", "sharegpt")


def data_dir() -> Path:
    """``$XLLM_DATA_DIR``, else the ``shared/data`` folder beside the repository."""
    env = os.environ.get("XLLM_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def load_prompts(name: str, limit: int, max_chars: int = 2000) -> list[str]:
    """Up to ``limit`` prompts from the named set (ShareGPT prompts are cut to ``max_chars``)."""
    if name == "builtin":
        return list(BUILTIN_PROMPTS)
    if name != "sharegpt":
        raise ValueError(f"unknown prompt set '{name}'; choose one of {', '.join(PROMPT_SETS)}")
    path = data_dir() / SHAREGPT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; set XLLM_DATA_DIR to the shared data folder")
    prompts = []
    for item in json.loads(path.read_text()):
        turns = [t["value"] for t in item.get("conversations", []) if t.get("from") == "human"]
        if turns and turns[0].strip():
            prompts.append(turns[0][:max_chars])
        if len(prompts) >= limit:
            break
    return prompts
