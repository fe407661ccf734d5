"""Turn an OpenAI request into the token ids vLLM will hash, without vLLM or transformers.

vLLM hashes the prompt *after* its own preprocessing, so the router must
reproduce that exactly or its block hashes never match the engine's:

- ``/v1/completions``: ``prompt`` is encoded with special tokens on (whatever
  the model's ``tokenizer.json`` post-processor adds, e.g. a BOS); a prompt
  given as token ids is used as is.
- ``/v1/chat/completions``: the messages go through the model's chat template
  (HF semantics: Jinja2 sandbox, ``trim_blocks``/``lstrip_blocks``, special
  tokens as variables, ``add_generation_prompt`` true by default), then the
  rendered text is encoded with special tokens *off* (vLLM's default
  ``add_special_tokens=False`` for chat). Content given as a list of text
  parts is joined with newlines (vLLM's "string" content format).

Not covered: multimodal parts, tools, and templates that iterate over content
parts ("openai" content format); for those the router simply finds fewer
prefix hits, it never misroutes for correctness.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                       "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or AddedToken dicts."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _compile_chat_template(source: str) -> Any:
    """A Jinja2 template compiled the way transformers' apply_chat_template does."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body (HF marks assistant spans)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _flatten_content(content: Any) -> Any:
    """List-of-parts content -> one string, as vLLM does for "string"-format templates."""
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content
                 if isinstance(p, Mapping) and p.get("type") in ("text", "input_text")]
        return "\n".join(texts)
    return content


class PromptTokenizer:
    """Tokenizes requests the way a vLLM engine serving the same model directory does."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str | None = None,
                 special_tokens: Mapping[str, str] | None = None,
                 add_bos_token: bool | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat_template_source = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.add_bos_token = add_bos_token
        self._template = _compile_chat_template(chat_template) if chat_template else None
        bos = self.special_tokens.get("bos_token")
        self._bos_id = tokenizer.token_to_id(bos) if bos else None

    @classmethod
    def from_dir(cls, path: str | Path) -> PromptTokenizer:
        """Load ``tokenizer.json``, ``tokenizer_config.json`` and the chat template of a model dir."""
        root = Path(path)
        tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        config: dict[str, Any] = {}
        if (root / "tokenizer_config.json").exists():
            config = json.loads((root / "tokenizer_config.json").read_text())
        template: str | None = None
        if (root / "chat_template.jinja").exists():
            template = (root / "chat_template.jinja").read_text()
        elif isinstance(config.get("chat_template"), str):
            template = config["chat_template"]
        elif isinstance(config.get("chat_template"), list):  # named templates
            named = {t.get("name"): t.get("template") for t in config["chat_template"]}
            template = named.get("default")
        special = {k: t for k in _SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k)))}
        add_bos = config.get("add_bos_token")
        return cls(tokenizer, template, special, add_bos if isinstance(add_bos, bool) else None)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
        if (add_special_tokens and self.add_bos_token and self._bos_id is not None
                and (not ids or ids[0] != self._bos_id)):
            ids.insert(0, self._bos_id)  # configs that ask for a BOS the post-processor lacks
        return ids

    def completion_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids vLLM hashes for a ``/v1/completions`` prompt."""
        if isinstance(prompt, str):
            return self._encode(prompt, add_special_tokens=True)
        return [int(t) for t in prompt]

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    **template_kwargs: Any) -> str:
        """The chat template's text for ``messages`` (before tokenization)."""
        if self._template is None:
            raise ValueError("this model directory has no chat template")
        conversation = [{**m, "content": _flatten_content(m.get("content"))} for m in messages]
        # transformers passes tools and documents even when absent (as None).
        variables = {**self.special_tokens, "tools": None, "documents": None, **template_kwargs}
        return self._template.render(messages=conversation,
                                     add_generation_prompt=add_generation_prompt, **variables)

    def chat_ids(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                 **template_kwargs: Any) -> list[int]:
        """Token ids vLLM hashes for a ``/v1/chat/completions`` request's messages."""
        text = self.render_chat(messages, add_generation_prompt, **template_kwargs)
        return self._encode(text, add_special_tokens=False)
