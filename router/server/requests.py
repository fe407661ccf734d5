"""Parse and validate one OpenAI request into what routing needs.

Validation is deliberately shallow: the router checks what it must read to
route (model, prompt or messages, stream, class and SLO headers) and leaves
everything else to the engine, whose own 4xx errors are relayed unchanged.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from router.policies.types import RequestClass, RequestInfo
from router.server.errors import RouterError

Kind = Literal["completions", "chat"]

HEADER_CLASS = "x-request-class"
HEADER_SLO_TTFT = "x-slo-ttft-ms"
HEADER_SLO_TPOT = "x-slo-tpot-ms"
HEADER_POLICY = "x-xllm-policy"
HEADER_REQUEST_ID = "x-request-id"
XARGS_CLASS_KEY = "request_class"  # read by xllm_plugin.scheduler.request_class
XARGS_SLO_TPOT_KEY = "slo_tpot_ms"  # read by xllm_plugin.scheduler.xllm_scheduler

DEFAULT_MAX_TOKENS = {"completions": 16, "chat": 256}  # OpenAI's completions default is 16
CHARS_PER_TOKEN = 4  # prompt-length estimate when the router does not tokenize

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


@dataclass(slots=True)
class ParsedRequest:
    """A validated request: the body to forward and the facts routing uses."""

    kind: Kind
    body: dict[str, Any]
    raw: bytes
    body_changed: bool
    model: str
    stream: bool
    request_id: str
    request_class: RequestClass
    max_tokens: int
    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    policy_override: str | None
    prompt_token_ids: list[int] | None  # given as ids in the body (no tokenizer needed)
    prompt_chars: int

    def upstream_body(self) -> bytes:
        return _encoder.encode(self.body) if self.body_changed else self.raw

    def request_info(self, prompt_tokens: int | None = None,
                     block_hashes: tuple[int, ...] = (), *,
                     default_slo_ttft_ms: float | None = None,
                     default_slo_tpot_ms: float | None = None) -> RequestInfo:
        """What the policy sees; SLO headers win over the router's default SLOs."""
        if prompt_tokens is None:
            prompt_tokens = (len(self.prompt_token_ids) if self.prompt_token_ids is not None
                             else max(1, math.ceil(self.prompt_chars / CHARS_PER_TOKEN)))
        return RequestInfo(request_id=self.request_id, prompt_tokens=prompt_tokens,
                           max_tokens=self.max_tokens, model=self.model,
                           request_class=self.request_class,
                           slo_ttft_ms=(self.slo_ttft_ms if self.slo_ttft_ms is not None
                                        else default_slo_ttft_ms),
                           slo_tpot_ms=(self.slo_tpot_ms if self.slo_tpot_ms is not None
                                        else default_slo_tpot_ms),
                           block_hashes=block_hashes)


def _bad(message: str, param: str | None = None) -> RouterError:
    return RouterError(400, message, param=param, code="invalid_request")


def _slo(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise _bad(f"header {name} must be a positive number of milliseconds, got '{raw}'",
                   name) from None
    if not math.isfinite(value) or value <= 0:
        raise _bad(f"header {name} must be a positive number of milliseconds, got '{raw}'", name)
    return value


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                           for t in value)


def _prompt(body: dict[str, Any]) -> tuple[list[int] | None, int]:
    """(token ids if the prompt is a single id list, character count of text prompts)."""
    if "prompt" not in body or body["prompt"] is None:
        raise _bad("'prompt' is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return None, len(prompt)
    if _is_int_list(prompt) and prompt:
        return prompt, 0
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return None, sum(len(p) for p in prompt)
    if isinstance(prompt, list) and prompt and all(_is_int_list(p) and p for p in prompt):
        return None, sum(len(p) for p in prompt) * CHARS_PER_TOKEN
    raise _bad("'prompt' must be a string, a list of strings, a list of token ids or a list "
               "of token-id lists", "prompt")


def _messages_chars(body: dict[str, Any]) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    chars = 0
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad("each message must be an object with a 'role'", "messages")
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(part.get("text", "")) for part in content
                         if isinstance(part, dict) and isinstance(part.get("text"), str))
    return chars


def parse_request(kind: Kind, raw: bytes, headers: Mapping[str, str], *,
                  offline_min_priority: int = 1, known_policies: Mapping[str, Any] | None = None,
                  ) -> ParsedRequest:
    """Validate ``raw`` (the body) and ``headers``; raise RouterError(400) with the reason."""
    if not raw:
        raise _bad("request body is empty; send a JSON object")
    try:
        body = _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise _bad(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required and must be a string", "model")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")

    if kind == "completions":
        token_ids, chars = _prompt(body)
    else:
        token_ids, chars = None, _messages_chars(body)

    max_tokens = body.get("max_completion_tokens") if kind == "chat" else None
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS[kind]
    elif not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise _bad("'max_tokens' must be a non-negative integer", "max_tokens")

    priority = body.get("priority", 0)
    if priority is None:
        priority = 0
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise _bad("'priority' must be an integer", "priority")

    changed = False
    named = headers.get(HEADER_CLASS)
    request_class: RequestClass
    if named is not None:
        named = named.strip().lower()
        if named not in ("online", "offline"):
            raise _bad(f"header {HEADER_CLASS} must be 'online' or 'offline', got '{named}'",
                       HEADER_CLASS)
        request_class = named  # type: ignore[assignment]
        xargs = body.get("vllm_xargs")
        if xargs is None:
            xargs = body["vllm_xargs"] = {}
        if not isinstance(xargs, dict):
            raise _bad("'vllm_xargs' must be an object", "vllm_xargs")
        if xargs.get(XARGS_CLASS_KEY) != request_class:
            xargs[XARGS_CLASS_KEY] = request_class  # tell the engine's XLLMScheduler
            changed = True
    else:
        xargs = body.get("vllm_xargs")
        from_xargs = xargs.get(XARGS_CLASS_KEY) if isinstance(xargs, dict) else None
        if from_xargs in ("online", "offline"):
            request_class = from_xargs
        else:
            request_class = "offline" if priority >= offline_min_priority else "online"

    slo_tpot_ms = _slo(headers, HEADER_SLO_TPOT)
    if slo_tpot_ms is not None:
        xargs = body.setdefault("vllm_xargs", {})
        if not isinstance(xargs, dict):
            raise _bad("'vllm_xargs' must be an object", "vllm_xargs")
        if xargs.get(XARGS_SLO_TPOT_KEY) != slo_tpot_ms:
            xargs[XARGS_SLO_TPOT_KEY] = slo_tpot_ms  # the engine's step budget reads it
            changed = True

    policy = headers.get(HEADER_POLICY)
    if policy is not None:
        policy = policy.strip()
        if known_policies is not None and policy not in known_policies:
            raise _bad(f"header {HEADER_POLICY}: unknown policy '{policy}'; choose one of "
                       f"{', '.join(known_policies)}", HEADER_POLICY)

    request_id = headers.get(HEADER_REQUEST_ID) or uuid.uuid4().hex
    return ParsedRequest(
        kind=kind, body=body, raw=raw, body_changed=changed, model=model, stream=stream,
        request_id=request_id, request_class=request_class, max_tokens=max_tokens,
        slo_ttft_ms=_slo(headers, HEADER_SLO_TTFT), slo_tpot_ms=slo_tpot_ms,
        policy_override=policy, prompt_token_ids=token_ids, prompt_chars=chars)
