"""Migration of a live stream to another instance: the token ledger and the seam.

Pure code (no I/O), used by the relay in ``router/server/app.py``. The router asks the
engine for token ids (vLLM's ``return_token_ids``: the first chunk carries
``prompt_token_ids``, every chunk the ``token_ids`` it adds), records them per
request, and strips them from what the client sees unless the client asked for them.
When the upstream dies mid-stream, ``resume_body`` builds a *completions* request
whose prompt is prompt + generated token ids and whose ``max_tokens`` is what is
left, and ``StreamLedger.resumed_event`` rewrites each of its chunks into the
client's format (chat or completions, the original id and model), so the client sees
one stream with no token twice and none missing. Greedy continuations are therefore
identical to an uninterrupted run.

A client's non-streamed request moves too: the router asks the engine for a stream
in its place (``collect``) and hands the events to ``router/server/assemble.py``,
which builds the one JSON answer the client expects.

A seam inside a character: an engine holds back the text of a token that ends in an
incomplete UTF-8 sequence (a CJK character or an emoji split over byte tokens) until a
later token completes it. When the stream breaks there, the resumed prompt decodes to a
string ending in that incomplete sequence, and tokenizers' ``DecodeStream`` (which vLLM
primes with the prompt) then emits the *whole prompt's text* with its first output
(measured with tokenizers 0.23). The ledger counts the tokens whose text the client has
not received (``unspoken``); after such a seam the first resumed event with text comes
back as a :class:`SeamRepair`, whose text the relay recomputes from token ids with the
engine's ``/detokenize`` (``Router._seam_text`` in app.py).

Limits (documented in router/README.md): one choice (``n`` = 1); a stop *string*
that straddles the seam is not seen by the new instance; presence/frequency
penalties restart counting at the seam (the generated tokens became prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from router.server.requests import ParsedRequest

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
DONE = b"[DONE]"


class MalformedEvent(Exception):
    """An upstream SSE event that is neither ``[DONE]`` nor a JSON object."""


@dataclass(frozen=True, slots=True)
class SeamRepair:
    """A resumed event whose text the engine got wrong (a seam inside a character).

    Its text is ``detokenize(context + tokens)`` minus ``detokenize(context)``: ``context``
    is the last token whose text the client has, ``tokens`` every token after it so far.
    """

    context: list[int]
    tokens: list[int]
    event: dict[str, Any]


def _choice_text(choice: dict[str, Any]) -> str:
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


# Sampling settings carried over to the resumed completions request.
_CARRIED = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
            "ignore_eos", "repetition_penalty", "presence_penalty", "frequency_penalty",
            "logit_bias", "skip_special_tokens", "spaces_between_special_tokens",
            "include_stop_str_in_output", "priority", "vllm_xargs", "stream_options", "user",
            "allowed_token_ids", "bad_words", "min_tokens")


class SSESplitter:
    """Cuts a byte stream into complete server-sent-event ``data:`` payloads."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        *events, self._buffer = self._buffer.replace(b"\r\n", b"\n").split(b"\n\n")
        payloads = []
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    payloads.append(line[5:].strip())
        return payloads


def migratable(parsed: ParsedRequest) -> str | None:
    """Why this request cannot be migrated (None: it can)."""
    body = parsed.body
    if body.get("n", 1) not in (1, None) or body.get("best_of", 1) not in (1, None):
        return "n > 1"
    if body.get("use_beam_search") or body.get("echo") or body.get("logprobs") or body.get(
            "top_logprobs") or body.get("tools"):
        return "beam search, echo, logprobs or tools"
    if _has_media(body):
        return "multimodal content"
    prompt = body.get("prompt")
    if parsed.kind == "completions" and not (
            isinstance(prompt, str) or parsed.prompt_token_ids is not None
            or isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str)):
        return "several prompts"
    return None


def _has_media(body: dict[str, Any]) -> bool:
    """True when a chat message carries a non-text part (image, audio, video).

    A resume sends prompt token ids only; the engine would see the media placeholder
    tokens without the media they stand for, so such requests are retried whole instead.
    """
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
                isinstance(part, dict) and part.get("type", "text") != "text"
                for part in content):
            return True
    return False


def start_ledger(parsed: ParsedRequest) -> StreamLedger:
    """A ledger for ``parsed``; makes its upstream body ask for prompt and output token ids.

    A non-streamed request is sent upstream as a stream with usage (``collect``).
    """
    body = parsed.body
    explicit = any(body.get(k) is not None for k in ("max_tokens", "max_completion_tokens"))
    ledger = StreamLedger(kind=parsed.kind,
                          max_tokens=(parsed.max_tokens if explicit or parsed.kind ==
                                      "completions" else None),
                          client_wants_ids=bool(body.get("return_token_ids")),
                          collect=not parsed.stream)
    if not ledger.client_wants_ids:
        body["return_token_ids"] = True
        parsed.body_changed = True
    if ledger.collect:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        parsed.body_changed = True
    return ledger


@dataclass
class StreamLedger:
    """What one client stream has received so far, in tokens."""

    kind: str
    max_tokens: int | None  # None: the client left it to the engine (chat)
    client_wants_ids: bool
    collect: bool = False  # the client asked for one JSON answer; the router streams for it
    prompt_token_ids: list[int] | None = None
    generated: list[int] = field(default_factory=list)
    finished: bool = False  # a finish_reason reached the client
    done: bool = False  # [DONE] reached the client
    stream_id: str | None = None
    model: str | None = None
    created: int | None = None
    migrations: int = 0
    # Trailing generated tokens whose text the engine held back (an incomplete character).
    # A multi-token event with text counts as fully spoken: close enough, as only an engine
    # streaming several tokens per event (speculative decoding) can end one mid-character.
    unspoken: int = 0
    # After a resume at unspoken tokens, where they start in ``generated``, until repaired.
    seam_from: int | None = None

    def event(self, payload: bytes) -> bytes:
        """Record an event of the original upstream; return the SSE bytes for the client.
        Raises ``MalformedEvent`` for an event that is neither ``[DONE]`` nor a JSON object."""
        if payload == DONE:
            self.done = True
            return b"data: [DONE]\n\n"
        try:
            chunk = _decoder.decode(payload)
        except msgspec.DecodeError:
            chunk = None
        if not isinstance(chunk, dict):  # an upstream, or a proxy in between, gone wrong
            raise MalformedEvent(repr(payload[:80]))
        self.stream_id = self.stream_id or chunk.get("id")
        self.model = self.model or chunk.get("model")
        self.created = self.created or chunk.get("created")
        if self.prompt_token_ids is None and isinstance(chunk.get("prompt_token_ids"), list):
            self.prompt_token_ids = list(chunk["prompt_token_ids"])  # chat: top level
        for choice in chunk.get("choices") or ():
            if self.prompt_token_ids is None and isinstance(choice.get("prompt_token_ids"),
                                                            list):
                self.prompt_token_ids = list(choice["prompt_token_ids"])  # completions
            ids = choice.get("token_ids") or ()
            self.generated.extend(ids)
            self._spoken(len(ids), _choice_text(choice))
            if choice.get("finish_reason") is not None:
                self.finished = True
            if not self.client_wants_ids:
                choice.pop("token_ids", None)
                choice.pop("prompt_token_ids", None)
        if not self.client_wants_ids:
            chunk.pop("prompt_token_ids", None)
        self._fix_usage(chunk)
        return b"data: " + _encoder.encode(chunk) + b"\n\n"

    def _spoken(self, tokens: int, text: str) -> None:
        if tokens:
            self.unspoken = 0 if text else self.unspoken + tokens

    def restart(self) -> None:
        """Forget the answer so far: the whole request is sent again (the client saw none)."""
        self.prompt_token_ids = None
        self.generated.clear()
        self.finished = self.done = False
        self.unspoken = 0
        self.seam_from = None

    def can_resume(self) -> str | None:
        """Why the stream cannot continue elsewhere (None: it can)."""
        if self.done or self.finished:
            return "already finished"
        if self.prompt_token_ids is None:
            return "no prompt token ids seen (engine without return_token_ids?)"
        if self.max_tokens is not None and self.max_tokens - len(self.generated) <= 0:
            return "max_tokens reached"
        return None

    def resume_body(self, original: dict[str, Any]) -> dict[str, Any]:
        """The completions request that continues this stream on another instance."""
        assert self.prompt_token_ids is not None
        body: dict[str, Any] = {k: original[k] for k in _CARRIED if k in original}
        body.update(model=original["model"], prompt=self.prompt_token_ids + self.generated,
                    stream=True, return_token_ids=True)
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens - len(self.generated)
        if "min_tokens" in body and isinstance(body["min_tokens"], int):
            body["min_tokens"] = max(0, body["min_tokens"] - len(self.generated))
        self.migrations += 1
        self.seam_from = len(self.generated) - self.unspoken if self.unspoken else None
        return body

    def resumed_event(self, payload: bytes) -> bytes | SeamRepair | None:
        """Rewrite an event of the resumed completions stream into the client's format.

        After a seam inside a character, the first event with text is returned as a
        :class:`SeamRepair` for the caller to fill in (``repaired``)."""
        if payload == DONE:
            self.done = True
            return b"data: [DONE]\n\n"
        chunk = _decoder.decode(payload)  # a malformed event raises: that attempt failed
        if not isinstance(chunk, dict):
            raise ValueError(f"upstream event is not a JSON object: {payload[:100]!r}")
        choices = []
        seam: tuple[list[int], list[int]] | None = None  # (context, tokens) to repair
        for choice in chunk.get("choices") or ():
            ids = list(choice.get("token_ids") or ())
            self.generated.extend(ids)
            text = _choice_text(choice)
            if self.seam_from is not None and text:
                assert self.prompt_token_ids is not None  # a resume needs them
                start, self.seam_from = self.seam_from, None
                seam = ((self.prompt_token_ids + self.generated[:start])[-1:],
                        self.generated[start:])
            self._spoken(len(ids), text)
            reason = choice.get("finish_reason")
            if reason is not None:
                self.finished = True
            out: dict[str, Any] = {"index": 0}
            if self.kind == "chat":
                out["delta"] = {"content": choice.get("text", "")}
                out["logprobs"] = None
            else:
                out["text"] = choice.get("text", "")
                out["logprobs"] = None
            out["finish_reason"] = reason
            if choice.get("stop_reason") is not None:
                out["stop_reason"] = choice["stop_reason"]
            if self.client_wants_ids:
                out["token_ids"] = ids
            choices.append(out)
        rewritten: dict[str, Any] = {
            "id": self.stream_id or chunk.get("id"),
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created or chunk.get("created"),
            "model": self.model or chunk.get("model"), "choices": choices}
        if chunk.get("usage") is not None:
            rewritten["usage"] = chunk["usage"]
            self._fix_usage(rewritten)
        if seam is not None:
            return SeamRepair(*seam, rewritten)
        if not choices and "usage" not in rewritten:
            return None
        return b"data: " + _encoder.encode(rewritten) + b"\n\n"

    def repaired(self, seam: SeamRepair, text: str) -> bytes:
        """The event of ``seam`` with its text replaced by ``text``."""
        for choice in seam.event["choices"]:
            if self.kind == "chat":
                choice["delta"]["content"] = text
            else:
                choice["text"] = text
        return b"data: " + _encoder.encode(seam.event) + b"\n\n"

    def _fix_usage(self, chunk: dict[str, Any]) -> None:
        """Usage as if one engine had served the request: the original prompt, all output."""
        usage = chunk.get("usage")
        if not isinstance(usage, dict) or self.prompt_token_ids is None or not self.migrations:
            return
        usage["prompt_tokens"] = len(self.prompt_token_ids)
        usage["completion_tokens"] = len(self.generated)
        usage["total_tokens"] = len(self.prompt_token_ids) + len(self.generated)
        usage.pop("prompt_tokens_details", None)
