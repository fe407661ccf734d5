"""The prefill stage of a disaggregated request: P computes the KV, D is told where to read it.

Flow for a decision with ``prefill_instance_id = P`` and ``instance_id = D`` (P != D):

1. **Prefill on P** (:meth:`PrefillStage.run`): the client's request, non-streaming,
   with ``max_tokens = 1`` and ``kv_transfer_params = {"do_remote_decode": true,
   "do_remote_prefill": false, ...nulls}``. vLLM's ``NixlConnector`` on P keeps the
   prompt's KV blocks and answers with ``kv_transfer_params`` naming them
   (engine id, block ids, side-channel host/port, ...).
2. **Handoff** (:class:`Handoff`): those ``kv_transfer_params`` are added, *whole and
   unmodified*, to the client's original body (:meth:`Handoff.decode_body`).
3. **Decode on D**: the router's ordinary forwarder sends that body to D and relays
   D's answer (streamed or not) to the client. D's connector pulls the blocks from
   P over NIXL, computes only what it lacks, and decodes.

If P fails (cannot connect, times out, answers an error, or answers without
``kv_transfer_params``), the handoff carries no parameters and D prefills the
prompt itself: the client still gets its answer, only later. With
``kv_load_failure_policy=recompute`` in D's ``--kv-transfer-config``, a transfer
that fails after a good P answer is recomputed by D as well.

This module only runs stage 1 and builds stage 2; retries, streaming and
timeouts of stage 3 stay with the forwarder (``router/server/app.py``), so any
later stage (e.g. migrating a request off a failing D) can wrap the same pieces.
"""

from __future__ import annotations

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

log = logging.getLogger("xllm.router.pd")

# What P is asked to do: keep the blocks for a remote decoder. vLLM fills in the rest.
PREFILL_KV_PARAMS: dict[str, Any] = {
    "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
    "remote_block_ids": None, "remote_host": None, "remote_port": None}
# Request fields a one-token prefill must not carry (they ask for more than one token
# or for streaming, or would make P's single token differ from D's first).
_PREFILL_DROP = ("stream_options", "min_tokens")
# Requests the NIXL handoff does not cover run whole on D (several sequences per
# request, echoing or scoring the prompt).
_UNSUPPORTED = ("n", "best_of", "echo", "prompt_logprobs")

_encoder = msgspec.json.Encoder()


def supports_handoff(parsed: ParsedRequest) -> bool:
    """False for request features the P->D handoff does not carry; those run whole on D."""
    body = parsed.body
    for key in _UNSUPPORTED:
        value = body.get(key)
        if key in ("n", "best_of"):
            if isinstance(value, int) and value > 1:
                return False
        elif value:
            return False
    return True


def prefill_body(parsed: ParsedRequest) -> bytes:
    """The body P gets: the client's request cut to one token, non-streaming, KV kept for D."""
    body = {k: v for k, v in parsed.body.items() if k not in _PREFILL_DROP}
    body["stream"] = False
    body["max_tokens"] = 1
    if parsed.kind == "chat" and "max_completion_tokens" in body:
        body["max_completion_tokens"] = 1
    body["kv_transfer_params"] = dict(PREFILL_KV_PARAMS)
    return _encoder.encode(body)


@dataclass(frozen=True, slots=True)
class Handoff:
    """The result of the prefill stage: what D needs, or why D must prefill itself."""

    prefill_instance_id: str
    kv_transfer_params: Mapping[str, Any] | None
    prefill_ms: float
    failure: str | None = None  # short reason label when kv_transfer_params is None

    @property
    def ok(self) -> bool:
        return self.kv_transfer_params is not None

    def decode_body(self, parsed: ParsedRequest) -> bytes:
        """The client's body plus P's ``kv_transfer_params`` (whole), or unchanged on failure."""
        if self.kv_transfer_params is None:
            return parsed.upstream_body()
        return _encoder.encode({**parsed.body, "kv_transfer_params": self.kv_transfer_params})


class PrefillStage:
    """Runs step 1 against one prefill instance, with the router's accounting and metrics."""

    def __init__(self, load: LoadView, metrics: RouterMetrics,
                 session: Callable[[], aiohttp.ClientSession | None], *,
                 connect_timeout_s: float, timeout_s: float) -> None:
        self.load = load
        self.metrics = metrics
        self._caller = StageCaller(
            load, metrics, session, stage="prefill", params_key="kv_transfer_params",
            config_hint=("--kv-transfer-config "
                         "'{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"kv_both\",...}'"),
            connect_timeout_s=connect_timeout_s, timeout_s=timeout_s)

    async def run(self, parsed: ParsedRequest, prefill_id: str, path: str,
                  headers: Mapping[str, str], prompt_tokens: int) -> Handoff:
        """Prefill ``parsed`` on ``prefill_id``; never raises for an instance failure."""
        params, failure, elapsed_ms = await self._caller.timed_post(
            prefill_id, path, prefill_body(parsed), headers, prompt_tokens)
        outcome = "handoff" if failure is None else f"fallback_{failure}"
        self.metrics.pd_prefills.labels(prefill_id, outcome).inc()
        if failure is None:
            self.metrics.pd_prefill.observe(elapsed_ms / 1000)
            self.load.observe_ttft(prefill_id, elapsed_ms)
        else:
            log.warning("request %s: prefill on %s failed (%s); the decode instance "
                        "prefills it", parsed.request_id, prefill_id, failure)
        return Handoff(prefill_id, params, elapsed_ms, failure)
