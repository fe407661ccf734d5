"""One POST to an instance that must answer with transfer parameters (PD prefill, EPD encode).

Both disaggregated stages ask an instance to do part of a request and hand back the
connector's parameters (``kv_transfer_params`` from P, ``ec_transfer_params`` from E)
that the next instance needs. They fail the same ways and must never raise for an
instance failure: the caller falls back to doing the work on the next instance, so
each failure is returned as a short reason that becomes a metric label.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import msgspec

from router.server.load_view import LoadView
from router.server.metrics import RouterMetrics
from router.server.upstream import post as upstream_post

log = logging.getLogger("xllm.router.stage")

_decoder = msgspec.json.Decoder()


class StageCaller:
    """Posts a stage body to an instance and returns ``(params, None)`` or ``(None, reason)``.

    ``stage`` names the step in metric labels and logs (``prefill``, ``encode``);
    ``params_key`` is the answer's field holding the parameters; ``config_hint`` is
    logged once per instance that answers without them (it was started without the
    connector), since every request to it will fall back until it is restarted.
    """

    def __init__(self, load: LoadView, metrics: RouterMetrics,
                 session: Callable[[], aiohttp.ClientSession | None], *, stage: str,
                 params_key: str, config_hint: str, connect_timeout_s: float,
                 timeout_s: float) -> None:
        self.load = load
        self.metrics = metrics
        self._session = session
        self.stage = stage
        self.params_key = params_key
        self.config_hint = config_hint
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self._warned_no_params: set[str] = set()

    async def timed_post(self, instance_id: str, path: str, body: bytes,
                         headers: Mapping[str, str], prompt_tokens: int
                         ) -> tuple[dict[str, Any] | None, str | None, float]:
        """``post``, counted as prefill work on the instance while it runs; with its time
        in ms."""
        began = time.perf_counter()
        ticket = self.load.begin(instance_id, prompt_tokens, phase="prefill")
        try:
            params, failure = await self.post(instance_id, path, body, headers)
        finally:
            ticket.finish()
        return params, failure, (time.perf_counter() - began) * 1000

    async def post(self, instance_id: str, path: str, body: bytes,
                   headers: Mapping[str, str]) -> tuple[dict[str, Any] | None, str | None]:
        load = self.load.instances.get(instance_id)
        session = self._session()
        if load is None or session is None:
            return None, "gone"
        stage = self.stage
        timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=self.connect_timeout_s)
        try:
            async with await upstream_post(session, load.record.url + path, data=body,
                                           headers=dict(headers), timeout=timeout) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            self.load.report_failure(instance_id, f"{stage}: cannot connect: {exc}")
            self.metrics.upstream_errors.labels(instance_id, f"{stage}_connect").inc()
            return None, "connect"
        except TimeoutError:
            self.metrics.upstream_errors.labels(instance_id, f"{stage}_timeout").inc()
            return None, "timeout"
        except aiohttp.ClientError as exc:
            self.metrics.upstream_errors.labels(instance_id, f"{stage}_error").inc()
            log.debug("%s on %s broke off: %r", stage, instance_id, exc)
            return None, "error"
        load.last_progress_at = time.monotonic()  # it answered: alive, however busy
        if status != 200:
            self.metrics.upstream_errors.labels(instance_id, f"{stage}_http_{status}").inc()
            return None, f"http_{status}"
        try:
            params = _decoder.decode(raw).get(self.params_key)
        except (msgspec.DecodeError, AttributeError):
            return None, "bad_body"
        if not isinstance(params, dict) or not params:
            if instance_id not in self._warned_no_params:
                self._warned_no_params.add(instance_id)
                log.warning("instance %s answered a %s without %s: start it with %s",
                            instance_id, stage, self.params_key, self.config_hint)
            return None, f"no_{self.params_key.split('_')[0]}_params"
        return params, None
