"""PromptTokenizer reproduces the token ids vLLM's preprocessing produces (offline check
against transformers, which vLLM uses; the live check is in test_kv_engine.py)."""

from __future__ import annotations

import pytest

from router.kv.tokenize import PromptTokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "ünïcödé — and emoji 🙂\nnew line"}],
]


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def model_dir(request):
    from xllm_plugin.models import model_path
    path = model_path(request.param)
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"model {request.param} not built")
    return path


@pytest.fixture(scope="module")
def hf(model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


def test_completion_prompt_matches_transformers_encoding(model_dir, hf):
    tok = PromptTokenizer.from_dir(model_dir)
    for text in ["Hello world", "  leading spaces", "<|im_start|>special inline", "x" * 500]:
        assert tok.completion_ids(text) == hf(text).input_ids


def test_token_id_prompts_pass_through_unchanged(model_dir):
    assert PromptTokenizer.from_dir(model_dir).completion_ids([5, 6, 7]) == [5, 6, 7]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_ids_match_transformers_chat_template(model_dir, hf, messages, add_generation_prompt):
    tok = PromptTokenizer.from_dir(model_dir)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tok.render_chat(messages, add_generation_prompt) == text
    assert tok.chat_ids(messages, add_generation_prompt) == hf(text, add_special_tokens=False).input_ids


def test_content_parts_are_joined_like_vllm_string_format(model_dir):
    tok = PromptTokenizer.from_dir(model_dir)
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert tok.chat_ids(parts) == tok.chat_ids([{"role": "user", "content": "a\nb"}])
