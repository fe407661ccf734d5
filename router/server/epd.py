"""The encode stage of a multimodal chat request: E runs the vision encoder, PD reuses its output.

Flow when a chat request carries images and an instance of role ``encode`` serves its model
(vLLM instances started with ``--mm-encoder-only`` and an EC connector in role
``ec_producer``; the PD side runs the same connector as ``ec_consumer``):

1. **Pin the media ids** (:func:`pin_media_uuids`): every ``image_url`` part gets a
   ``uuid`` (sha256 of model and URL) unless the client gave one. vLLM keys the encoder
   output of a part with a uuid by that uuid (or, when the request carries processor
   kwargs, by a hash of uuid and kwargs), so E and PD name the output alike, and the name
   is safe as a file name. Without pinning both would hash the decoded pixels; pinning
   makes the key independent of how each instance fetches and decodes the media.
2. **Encode on E** (:meth:`EncodeStage.run`): the pinned request, non-streaming, one
   token. E runs the encoder and stops once the prompt is consumed; its connector stores
   each output under its key and the answer carries ``ec_transfer_params`` keyed by it
   (``{key: {"item_indices": [...], "metadata": {...}}}``).
3. **Prefill/decode** (:meth:`EncodeResult.apply`): the request continues with the pinned
   body plus E's ``ec_transfer_params``, whole. PD's connector finds the stored output
   under the same key and loads it instead of running the encoder. The image still
   travels: PD's processor lays out the placeholder tokens from it.

If E fails (cannot connect, times out, answers an error or no ``ec_transfer_params``),
the request continues pinned but without parameters and PD encodes the image itself:
the client still gets its answer, only later. The stage never raises for an E failure.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from router.server.load_view import LoadView
from router.server.metrics import RouterMetrics
from router.server.requests import ParsedRequest
from router.server.stage_call import StageCaller

log = logging.getLogger("xllm.router.epd")

ENCODE_ROLE = "encode"
# Fields an encode-only request must not carry (they ask for streaming or more tokens).
_ENCODE_DROP = ("stream_options", "min_tokens", "n", "best_of")

_encoder = msgspec.json.Encoder()


def _image_parts(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``image_url`` content parts of a chat body's messages, in order."""
    parts: list[dict[str, Any]] = []
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            parts.extend(p for p in content if isinstance(p, dict) and "image_url" in p
                         and p.get("type", "image_url") == "image_url")
    return parts


def _part_url(part: Mapping[str, Any]) -> str | None:
    value = part.get("image_url")
    if isinstance(value, dict):
        value = value.get("url")
    return value if isinstance(value, str) and value else None


def image_count(parsed: ParsedRequest) -> int:
    """Images given by URL in a chat request."""
    return sum(1 for p in _image_parts(parsed.body) if _part_url(p))


def wants_encode(parsed: ParsedRequest) -> bool:
    """True for a chat request with at least one image given by URL (data: or http)."""
    return parsed.kind == "chat" and image_count(parsed) > 0


def media_uuid(model: str, url: str) -> str:
    """The id E and PD both key an image's encoder output by: model-scoped, file-name safe.

    Exact for data: URLs (they hold the bytes); an http URL is taken as immutable.
    """
    return hashlib.sha256(f"{model}\0{url}".encode()).hexdigest()


def pin_media_uuids(body: Mapping[str, Any], model: str) -> dict[str, Any]:
    """A copy of ``body`` whose image parts all carry a ``uuid`` (a client's own is kept)."""
    pinned = msgspec.json.decode(_encoder.encode(body))  # deep copy, JSON types only
    for part in _image_parts(pinned):
        url = _part_url(part)
        if url is not None and part.get("uuid") is None:
            part["uuid"] = media_uuid(model, url)
    return pinned


def encode_body(pinned: Mapping[str, Any]) -> bytes:
    """What E gets: the pinned request cut to one token, non-streaming."""
    body = {k: v for k, v in pinned.items() if k not in _ENCODE_DROP}
    body["stream"] = False
    body["max_tokens"] = 1
    if "max_completion_tokens" in body:
        body["max_completion_tokens"] = 1
    return _encoder.encode(body)


def encode_instance(load: LoadView, model: str) -> str | None:
    """The healthy encode instance of ``model`` with the fewest requests in flight, if any."""
    encoders = [i for i in load.serving(model) if i.role == ENCODE_ROLE and i.healthy]
    if not encoders:
        return None
    return min(encoders, key=lambda i: (i.inflight, i.instance_id)).instance_id


def encode_instance_ids(load: LoadView, model: str) -> frozenset[str]:
    """Instances of role ``encode``: they cannot generate, so no policy may pick them."""
    return frozenset(i.instance_id for i in load.serving(model) if i.role == ENCODE_ROLE)


@dataclass(frozen=True, slots=True)
class EncodeResult:
    """The outcome of the encode stage: E's parameters for PD, or why PD must encode."""

    encode_instance_id: str
    pinned_body: dict[str, Any]
    ec_transfer_params: Mapping[str, Any] | None
    encode_ms: float
    failure: str | None = None  # short reason label when ec_transfer_params is None

    @property
    def ok(self) -> bool:
        return self.ec_transfer_params is not None

    @property
    def outcome(self) -> str:
        return "loaded" if self.ok else f"fallback_{self.failure}"

    def apply(self, parsed: ParsedRequest) -> None:
        """Make ``parsed`` carry the pinned media ids and, on success, E's parameters.

        Later stages (the P->D prefill stage, the forwarder) read ``parsed.body``, so
        each instance after E gets the same media ids and parameters.
        """
        body = dict(self.pinned_body)
        if self.ec_transfer_params is not None:
            body["ec_transfer_params"] = dict(self.ec_transfer_params)
        parsed.body = body
        parsed.body_changed = True


class EncodeStage:
    """Runs step 2 against one encode instance, with the router's accounting and metrics."""

    def __init__(self, load: LoadView, metrics: RouterMetrics,
                 session: Callable[[], aiohttp.ClientSession | None], *,
                 connect_timeout_s: float, timeout_s: float) -> None:
        self.metrics = metrics
        self._caller = StageCaller(
            load, metrics, session, stage="encode", params_key="ec_transfer_params",
            config_hint=("--mm-encoder-only --ec-transfer-config "
                         "'{\"ec_connector\":...,\"ec_role\":\"ec_producer\"}'"),
            connect_timeout_s=connect_timeout_s, timeout_s=timeout_s)

    async def run(self, parsed: ParsedRequest, encode_id: str, path: str,
                  headers: Mapping[str, str]) -> EncodeResult:
        """Encode ``parsed``'s images on ``encode_id``; never raises for an instance failure."""
        pinned = pin_media_uuids(parsed.body, parsed.model)
        params, failure, elapsed_ms = await self._caller.timed_post(
            encode_id, path, encode_body(pinned), headers, prompt_tokens=0)
        result = EncodeResult(encode_id, pinned, params, elapsed_ms, failure)
        self.metrics.epd_encodes.labels(encode_id, result.outcome).inc()
        if result.ok:
            self.metrics.epd_encode.observe(elapsed_ms / 1000)
        else:
            log.warning("request %s: encode on %s failed (%s); the prefill instance encodes "
                        "the images itself", parsed.request_id, encode_id, failure)
        return result
