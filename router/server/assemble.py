"""Build a non-streamed OpenAI response from the stream the router read in its place.

Why: a request the client sent with ``stream: false`` can only move to another
instance mid-generation if the router knows the tokens generated so far. So when
migration is on, the router asks the engine for a stream (with usage and token
ids), passes every event through the same :class:`~router.server.migration.StreamLedger`
as a streaming client's, and feeds the client-format events to
:class:`CollectedResponse` instead of a socket. At the end the client gets one
``chat.completion`` / ``text_completion`` object, as if one engine had answered
without streaming. Pure code: no I/O.
"""

from __future__ import annotations

from typing import Any

import msgspec

from router.server.migration import DONE, SSESplitter

_decoder = msgspec.json.Decoder()


class CollectedResponse:
    """Stands in for the client's stream: takes SSE bytes, returns the whole answer.

    It has the three methods the relay calls on an ``aiohttp`` stream response
    (``prepare``, ``write``, ``write_eof``), so the relay and the migration code
    do not care whether a client socket or this object is on the other side.
    """

    def __init__(self, kind: str, *, client_wants_ids: bool) -> None:
        self.kind = kind
        self.client_wants_ids = client_wants_ids
        self._splitter = SSESplitter()
        self._meta: dict[str, Any] = {}
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._token_ids: list[int] = []
        self._prompt_token_ids: list[int] | None = None
        self._finish_reason: str | None = None
        self._stop_reason: Any = None
        self._usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None  # an error event the relay wrote
        self.done = False

    async def prepare(self, request: Any) -> None:  # noqa: ARG002 (same call as a socket's)
        return None

    async def write_eof(self) -> None:
        return None

    async def write(self, data: bytes) -> None:
        for payload in self._splitter.feed(data):
            self.add(payload)

    def add(self, payload: bytes) -> None:
        """One client-format event (the JSON after ``data:``)."""
        if payload == DONE:
            self.done = True
            return
        chunk = _decoder.decode(payload)
        if not isinstance(chunk, dict):
            return
        if "error" in chunk:
            self.error = chunk
            return
        for key in ("id", "created", "model", "system_fingerprint"):
            if chunk.get(key) is not None:
                self._meta.setdefault(key, chunk[key])
        if isinstance(chunk.get("prompt_token_ids"), list):
            self._prompt_token_ids = chunk["prompt_token_ids"]
        if chunk.get("usage") is not None:
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if self.kind == "chat":
                delta = choice.get("delta") or {}
                self._text.append(delta.get("content") or "")
                self._reasoning.append(delta.get("reasoning_content") or "")
            else:
                self._text.append(choice.get("text") or "")
            if isinstance(choice.get("prompt_token_ids"), list):
                self._prompt_token_ids = choice["prompt_token_ids"]
            self._token_ids.extend(choice.get("token_ids") or ())
            if choice.get("finish_reason") is not None:
                self._finish_reason = choice["finish_reason"]
            if choice.get("stop_reason") is not None:
                self._stop_reason = choice["stop_reason"]

    def body(self) -> dict[str, Any]:
        """The non-streamed answer, in the shape vLLM gives for ``stream: false``."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None,
                                  "finish_reason": self._finish_reason,
                                  "stop_reason": self._stop_reason}
        text = "".join(self._text)
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            reasoning = "".join(self._reasoning)
            if reasoning:
                message["reasoning_content"] = reasoning
            choice["message"] = message
        else:
            choice["text"] = text
        out: dict[str, Any] = {
            "id": self._meta.get("id"),
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": self._meta.get("created"), "model": self._meta.get("model"),
            "choices": [choice], "usage": self._usage}
        if self.client_wants_ids:
            choice["token_ids"] = self._token_ids
            if self.kind == "chat":
                out["prompt_token_ids"] = self._prompt_token_ids
            else:
                choice["prompt_token_ids"] = self._prompt_token_ids
        return out
