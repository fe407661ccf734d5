"""The router's picture of every instance: discovery record, scraped load, own accounting.

Three sources meet here:

* discovery (``upsert``/``remove``): which instances exist, their URL, role, KV endpoints;
* scraping, every ``scrape_interval_s``: ``/health``, then running/waiting/KV usage from
  the plugin's ``/xllm/status`` when the engine runs the XLLMScheduler, otherwise
  from vLLM's ``/metrics``; served model names from ``/v1/models`` now and then;
* the router's own accounting: requests and prompt tokens in flight (exact,
  updated at dispatch and finish), split by phase (a :class:`LoadTicket` per
  request and instance: prompt tokens still to prefill there, prompt tokens
  decoding there), and recent TTFT/TPOT it measured itself.

Health: each instance incarnation runs the state machine of
``router/server/instance_state.py`` (healthy -> suspect -> failed -> removed).
Scrapes feed it successes and failures, the proxy feeds it failures
(``report_failure``: connection errors, broken, stalled or malformed streams),
discovery feeds it registrations (a new incarnation starts over) and
deregistrations (etcd delete or lease expiry, admin removal). Policies see
``healthy`` only for the ``healthy`` state, except that suspect instances are
offered when no healthy one serves the model (one lost probe must not take the
only instance out). Every transition is logged and passed to ``on_transition``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import aiohttp

from router.discovery.records import InstanceRecord
from router.policies.types import ClusterView, InstanceState, Role
from router.server.instance_state import HealthBook, InstanceHealth, StateRules, Transition
from router.server.liveness import LongestPause
from router.server.vllm_metrics import sum_vllm_metrics

log = logging.getLogger("xllm.router.load")

_METRIC_RUNNING = "vllm:num_requests_running"
_METRIC_WAITING = "vllm:num_requests_waiting"
_METRIC_KV = "vllm:kv_cache_usage_perc"


@dataclass
class InstanceLoad:
    """Mutable per-instance state; ``state()`` freezes it into what a policy sees."""

    record: InstanceRecord
    health: InstanceHealth  # this incarnation's state machine
    last_error: str | None = None
    last_scrape_at: float | None = None
    # When a request on this instance last made progress (a streamed chunk, a stage answer):
    # a scrape that times out while requests still progress means busy, not failed.
    last_progress_at: float | None = None
    busy_scrapes: int = 0  # scrape timeouts forgiven for that reason
    scrapes: int = 0
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    by_class: dict[str, Any] = field(default_factory=dict)
    load_source: str | None = None  # "xllm_status" | "metrics"
    has_xllm_status: bool | None = None
    models: tuple[str, ...] = ()
    inflight: int = 0
    inflight_prompt_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens sent here whose prefill has not ended
    offline_prefill_tokens: int = 0  # the offline requests' share of prefill_tokens
    decode_tokens: int = 0  # prompt tokens of requests decoding here
    ttft_ms: deque[float] = field(default_factory=lambda: deque(maxlen=32))
    tpot_ms: deque[float] = field(default_factory=lambda: deque(maxlen=32))
    # The longest pause it came back from (/health round trips, a scrape forgiven as busy
    # once /health answers again, silences within its streams that no /health answer
    # broke): how long a liveness probe must wait to be conclusive.
    pauses: LongestPause = field(default_factory=LongestPause)
    health_answered_at: float = 0.0  # time.monotonic() of its last 200 to /health
    # Start of a scrape that timed out and was forgiven as busy, until /health answers again.
    unanswered_since: float | None = None
    role_override: Role | None = None  # set by a policy's RoleChange

    @property
    def role(self) -> Role:
        return self.role_override or self.record.role

    @property
    def healthy(self) -> bool:
        """True when the instance gets new requests (state ``healthy``)."""
        return self.health.routable

    @property
    def instance_id(self) -> str:
        return self.record.instance_id

    def health_answered(self, at: float) -> None:
        """/health answered (a scrape or a probe) at ``at``: a pause that a scrape forgiven as
        busy began has ended, and counts now that the instance came back from it. Counted
        when it timed out instead, a frozen engine's own last scrape (its streams had just
        progressed, so "busy") set its probe timeout to 2x the scrape timeout: the next
        freeze of that engine went unnoticed for 3.7 s instead of 0.3 s (chaos_freeze)."""
        if self.unanswered_since is not None:
            self.pauses.observe(at - self.unanswered_since, at)
            self.unanswered_since = None
        self.health_answered_at = at

    def observe_silence(self, began: float, ended: float) -> None:
        """Learn a silence within one of its streams (``time.monotonic()`` bounds) as a pause,
        unless /health answered during it. A probe waits for /health, not for a token: an
        instance that answered meanwhile was computing (a long step), and its probe timeout
        need not cover that (a fake engine with 0.3 s between tokens taught a 0.3 s pause)."""
        if not began < self.health_answered_at <= ended:
            self.pauses.observe(ended - began, ended)

    def serves(self, model: str) -> bool:
        return model in self.models or (not self.models and model == self.record.model)

    def state(self) -> InstanceState:
        return InstanceState(
            instance_id=self.instance_id, role=self.role, healthy=self.healthy,
            running=self.running, waiting=self.waiting, kv_usage=self.kv_usage,
            inflight=self.inflight, inflight_prompt_tokens=self.inflight_prompt_tokens,
            ttft_ms=statistics.median(self.ttft_ms) if self.ttft_ms else None,
            tpot_ms=statistics.median(self.tpot_ms) if self.tpot_ms else None,
            queued_prefill_tokens=self.prefill_tokens, running_tokens=self.decode_tokens,
            offline_running=int(self.by_class.get("running", {}).get("offline", 0)),
            offline_waiting=int(self.by_class.get("waiting", {}).get("offline", 0)),
            offline_queued_prefill_tokens=self.offline_prefill_tokens)

    def describe(self) -> dict[str, Any]:
        """The admin view of this instance (GET /admin/instances)."""
        s = self.state()
        return {
            "instance_id": self.instance_id, "url": self.record.url, "role": self.role,
            "source": self.record.source, "incarnation": self.record.incarnation,
            "models": list(self.models) or ([self.record.model] if self.record.model else []),
            "healthy": self.healthy, "state": self.health.state,
            "state_reason": self.health.last_reason,
            "consecutive_failures": self.health.failures,
            "last_error": self.last_error, "load_source": self.load_source,
            "last_scrape_age_s": (time.monotonic() - self.last_scrape_at
                                  if self.last_scrape_at else None),
            "busy_scrapes": self.busy_scrapes,
            "running": self.running, "waiting": self.waiting, "by_class": self.by_class,
            "kv_usage": self.kv_usage, "inflight": self.inflight,
            "inflight_prompt_tokens": self.inflight_prompt_tokens,
            "prefill_tokens": self.prefill_tokens, "decode_tokens": self.decode_tokens,
            "offline_prefill_tokens": self.offline_prefill_tokens,
            "home_role": self.record.role,
            "ttft_ms": s.ttft_ms, "tpot_ms": s.tpot_ms,
            "kv_events_endpoint": self.record.kv_events_endpoint,
            "kv_events_replay_endpoint": self.record.kv_events_replay_endpoint,
        }


Phase = Literal["waiting", "prefill", "decode"]


class LoadTicket:
    """One request's share of one instance's load, from dispatch to finish.

    ``waiting`` (a decode instance whose prefill runs elsewhere) counts only as
    in flight; ``prefill`` also counts its prompt as queued prefill
    (``InstanceState.queued_prefill_tokens``); ``decode`` counts it as running
    context (``InstanceState.running_tokens``). Phases only move forward;
    ``finish`` (idempotent) removes everything.
    """

    __slots__ = ("load", "tokens", "offline", "phase", "done")

    def __init__(self, load: InstanceLoad | None, tokens: int, phase: Phase,
                 offline: bool = False) -> None:
        self.load = load
        self.tokens = tokens
        self.offline = offline
        self.phase: Phase = "waiting"
        self.done = False
        if load is not None:
            load.inflight += 1
            load.inflight_prompt_tokens += tokens
        self.to(phase)

    def to(self, phase: Phase) -> None:
        if self.done or phase == self.phase:
            return
        load = self.load
        if load is not None:
            self._leave(load)
            if phase == "prefill":
                load.prefill_tokens += self.tokens
                if self.offline:
                    load.offline_prefill_tokens += self.tokens
            elif phase == "decode":
                load.decode_tokens += self.tokens
        self.phase = phase

    def _leave(self, load: InstanceLoad) -> None:
        if self.phase == "prefill":
            load.prefill_tokens = max(0, load.prefill_tokens - self.tokens)
            if self.offline:
                load.offline_prefill_tokens = max(0, load.offline_prefill_tokens - self.tokens)
        elif self.phase == "decode":
            load.decode_tokens = max(0, load.decode_tokens - self.tokens)

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        load = self.load
        if load is not None:
            self._leave(load)
            load.inflight = max(0, load.inflight - 1)
            load.inflight_prompt_tokens = max(0, load.inflight_prompt_tokens - self.tokens)


class LoadView:
    """All instances by id; scrapes them in the background."""

    def __init__(self, *, scrape_interval_s: float = 0.5, scrape_timeout_s: float = 2.0,
                 rules: StateRules | None = None, models_every: int = 10,
                 upstream_headers: dict[str, str] | None = None) -> None:
        self.instances: dict[str, InstanceLoad] = {}
        self.book = HealthBook(rules)
        self.scrape_interval_s = scrape_interval_s
        self.scrape_timeout = aiohttp.ClientTimeout(total=scrape_timeout_s)
        self.models_every = models_every
        self.upstream_headers = upstream_headers or {}
        self.on_added: list[Callable[[InstanceLoad], None]] = []
        self.on_removed: list[Callable[[InstanceLoad], None]] = []
        self.on_scraped: list[Callable[[InstanceLoad], None]] = []
        self.on_transition: list[Callable[[Transition], None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    # -- discovery -------------------------------------------------------------------------

    def upsert(self, record: InstanceRecord) -> InstanceLoad:
        """Add or update an instance. The same URL and incarnation keep their state (a
        re-put of the etcd key, or a re-list after a broken watch, heals nothing); a new
        incarnation or URL starts from a clean state in ``suspect``."""
        current = self.instances.get(record.instance_id)
        if current is not None and (current.record.url, current.record.incarnation) == (
                record.url, record.incarnation):
            current.record = record
            return current
        if current is not None:
            self._detach(current)
            if current.record.url != record.url:
                self.book.forget(record.instance_id)  # another server: nothing carries over
        change = self.book.registered(record.instance_id, record.incarnation)
        health = self.book.get(record.instance_id)
        assert health is not None
        load = InstanceLoad(record, health)
        self.instances[record.instance_id] = load
        log.info("instance %s added (%s, %s)", record.instance_id, record.url, record.source)
        self._note(change)
        for callback in self.on_added:
            callback(load)
        if self._session is not None:  # scrape at once so it becomes routable quickly
            task = asyncio.get_running_loop().create_task(self.scrape(load))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        return load

    def remove(self, instance_id: str, reason: str = "removed") -> InstanceLoad | None:
        """The instance left discovery (etcd delete or lease expiry, admin removal)."""
        load = self.instances.pop(instance_id, None)
        if load is not None:
            change = load.health.deregistered(reason)
            self.book.forget(instance_id)  # a later registration starts afresh
            self._note(change)
            self._detach(load)
        return load

    def _detach(self, load: InstanceLoad) -> None:
        log.info("instance %s (incarnation %s) left", load.instance_id, load.record.incarnation)
        for callback in self.on_removed:
            callback(load)

    def _note(self, change: Transition | None) -> None:
        """Log and announce one state change."""
        if change is None:
            return
        level = (logging.INFO if change.after == "healthy" or change.before == "removed"
                 else logging.WARNING)
        log.log(level, "instance %s (incarnation %s): %s -> %s (%s)", change.instance_id,
                change.incarnation, change.before, change.after, change.reason)
        for callback in self.on_transition:
            callback(change)

    # -- what policies and handlers read ---------------------------------------------------

    def models(self) -> list[str]:
        names: set[str] = set()
        for load in self.instances.values():
            names.update(load.models or ((load.record.model,) if load.record.model else ()))
        return sorted(names)

    def serving(self, model: str) -> list[InstanceLoad]:
        return [load for load in self.instances.values() if load.serves(model)]

    def view(self, model: str, exclude: frozenset[str] = frozenset(),
             prefix_hits: dict[str, int] | None = None,
             tier_hits: dict[str, Any] | None = None) -> ClusterView:
        loads = [load for load in self.serving(model) if load.instance_id not in exclude]
        states = tuple(load.state() for load in loads)
        if not any(state.healthy for state in states):
            # No healthy instance: rather than refuse the request, offer the suspect ones
            # that answered before (one lost probe must not take the only instance out).
            states = tuple(replace(state, healthy=True)
                           if load.health.state == "suspect" and load.scrapes else state
                           for load, state in zip(loads, states, strict=True))
        return ClusterView(instances=states, now=time.monotonic(), prefix_hits=prefix_hits or {},
                           tier_hits=tier_hits or {})

    # -- the router's own accounting -------------------------------------------------------

    def begin(self, instance_id: str, prompt_tokens: int,
              phase: Phase = "prefill", *, offline: bool = False) -> LoadTicket:
        """Count a request dispatched to ``instance_id``; ``finish()`` the ticket when done."""
        return LoadTicket(self.instances.get(instance_id), prompt_tokens, phase, offline)

    def observe_ttft(self, instance_id: str, ttft_ms: float) -> None:
        load = self.instances.get(instance_id)
        if load is not None:
            load.ttft_ms.append(ttft_ms)

    def observe_tpot(self, instance_id: str, tpot_ms: float) -> None:
        load = self.instances.get(instance_id)
        if load is not None:
            load.tpot_ms.append(tpot_ms)

    def busy(self, load: InstanceLoad, now: float) -> bool:
        """Did a request on ``load`` make progress within the last scrape period? On two
        loaded CPU cores an engine's API server can answer /metrics late while its streams
        flow; failing it then would migrate healthy work (and flip dynamic-PD roles)."""
        window = self.scrape_timeout.total or 0.0
        return (load.last_progress_at is not None
                and now - load.last_progress_at <= window + self.scrape_interval_s)

    def report_failure(self, instance_id: str, reason: str) -> None:
        """A failure seen outside scraping (connection error, broken, stalled or malformed
        stream): the instance becomes suspect at once, failed after enough in a row."""
        load = self.instances.get(instance_id)
        if load is not None:
            self._failed(load, reason)

    def _failed(self, load: InstanceLoad, reason: str) -> None:
        load.last_error = reason
        load.unanswered_since = None  # it did not come back from that pause
        self._note(load.health.failure(time.monotonic(), reason))

    # -- scraping ---------------------------------------------------------------------------

    async def _get(self, load: InstanceLoad, path: str) -> tuple[int, str]:
        assert self._session is not None
        async with self._session.get(load.record.url + path, timeout=self.scrape_timeout,
                                     headers=self.upstream_headers) as response:
            return response.status, await response.text()

    async def scrape(self, load: InstanceLoad) -> None:
        """One scrape of one instance; updates health and load in place."""
        if load.health.state == "removed":
            return  # terminal for this incarnation: nothing to learn
        try:
            began = time.monotonic()
            status, _ = await self._get(load, "/health")
            answered = time.monotonic()
            load.pauses.observe(answered - began, answered)
            if status != 200:
                raise RuntimeError(f"/health answered {status}")
            load.health_answered(answered)
            engine = None
            if load.has_xllm_status is not False:
                status, body = await self._get(load, "/xllm/status")
                if status == 200:
                    load.has_xllm_status = True
                    engine = json.loads(body).get("engine")
                elif status == 404:
                    load.has_xllm_status = False
            if engine:
                running, waiting = engine.get("running", {}), engine.get("waiting", {})
                load.running = int(sum(running.values()))
                load.waiting = int(sum(waiting.values()))
                load.kv_usage = float(engine.get("kv_cache_usage") or 0.0)
                load.by_class = {"running": running, "waiting": waiting}
                load.load_source = "xllm_status"
            else:
                status, body = await self._get(load, "/metrics")
                if status != 200:
                    raise RuntimeError(f"/metrics answered {status}")
                totals = sum_vllm_metrics(body, (_METRIC_RUNNING, _METRIC_WAITING,
                                                 _METRIC_KV))
                load.running = int(totals.get(_METRIC_RUNNING, 0))
                load.waiting = int(totals.get(_METRIC_WAITING, 0))
                load.kv_usage = float(totals.get(_METRIC_KV, 0.0))
                load.load_source = "metrics"
            if not load.models or load.scrapes % self.models_every == 0:
                status, body = await self._get(load, "/v1/models")
                if status == 200:
                    load.models = tuple(m["id"] for m in json.loads(body).get("data", []))
        except Exception as exc:  # noqa: BLE001 (any failure counts against health)
            if self.instances.get(load.instance_id) is not load:
                return  # replaced or removed meanwhile
            if isinstance(exc, TimeoutError) and self.busy(load, time.monotonic()):
                load.busy_scrapes += 1  # keep the last numbers; its requests still move
                if load.healthy and load.unanswered_since is None:
                    load.unanswered_since = began  # a pause once it answers (health_answered)
                log.debug("scrape of %s timed out while its requests progress: busy",
                          load.instance_id)
                return
            self._failed(load, f"scrape: {exc!r}"[:300])
        else:
            if self.instances.get(load.instance_id) is not load:
                return
            load.scrapes += 1
            load.last_scrape_at = time.monotonic()
            load.last_error = None
            self._note(load.health.success(load.last_scrape_at))
        for callback in self.on_scraped:
            callback(load)

    async def scrape_all(self) -> None:
        await asyncio.gather(*(self.scrape(load) for load in list(self.instances.values())))

    async def _run(self) -> None:
        while True:
            began = time.monotonic()
            await self.scrape_all()
            for change in self.book.tick(time.monotonic()):  # long-failed -> removed
                self._note(change)
            await asyncio.sleep(max(0.0, self.scrape_interval_s - (time.monotonic() - began)))

    async def start(self, session: aiohttp.ClientSession) -> None:
        """Scrape everything once (so routing can start), then keep scraping."""
        self._session = session
        await self.scrape_all()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="load-scraper")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._pending) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        self._session = None
