"""N simulated instances behind one routing policy: the simulator's driver.

For every arriving request the cluster builds the same ``ClusterView`` the
live router builds (instance roles, queue lengths, KV usage, in-flight
accounting, prefix hits), calls the policy's ``route`` and acts on the
``RoutingDecision``:

- ``prefill_instance_id`` unset (or equal to ``instance_id``): the request runs
  whole on ``instance_id``;
- set: it prefills on P (stopping after the prompt), its KV crosses the network
  (``transfer_latency_ms + prompt * kv_bytes_per_token / transfer_bytes_per_s``,
  transfers from one P serialised on its NIC; P holds the blocks until the
  transfer ends), then D computes the last prompt token and decodes, as vLLM's
  NixlConnector flow does;
- ``role_changes`` are applied before the request is placed.

Prefix hits in the view come from the router's own ``router.kv.index.PrefixIndex``,
fed with every simulated instance's block stored/removed events exactly as
the live router feeds it from vLLM's KV events (here without delay).

Policies with ``observe(outcome)`` hear every finished request; policies with
``rebalance(view)`` are asked every ``rebalance_interval_s`` for role changes;
policies with ``profile_plan()`` get each instance profiled before the first
arrival (``router.sim.profile``), as the live router profiles a new instance.
Requests without their own SLOs carry the run's default SLOs to the policy,
as the live router fills in its ``--slo-ttft-ms``/``--slo-tpot-ms``.
Every role change is logged with its time and reason.

Online/offline co-location (``router.sim.classes``): ``SimConfig.classes`` makes
every instance follow XLLMScheduler's class rules; ``SimConfig.offline`` adds an
always-waiting offline backlog, kept at ``concurrency`` routed requests, each
routed through the same policy with ``request_class="offline"``. Offline
requests are recorded apart (``SimResult.offline_records``): the summary's SLO
numbers are the online requests', plus ``offline_*`` throughput keys, and a run
with a backlog ends when the last online request is done. Policies with
``migrations(view)`` are asked on the rebalance timer for offline moves.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from router.kv.index import PrefixIndex
from router.policies.types import (
    ClusterView,
    InstanceState,
    Migration,
    NoInstanceAvailable,
    RequestInfo,
    RequestOutcome,
    RoleChange,
    RoutingPolicy,
)
from router.sim.classes import ClassScheduling, OfflineBacklog
from router.sim.events import EventQueue
from router.sim.instance import SimInstance
from router.sim.kv_cache import KVEventListener
from router.sim.metrics import SLO, RequestRecord, summarize
from router.sim.perf_model import Deployment
from router.sim.request import SimRequest
from router.sim.workload import RequestSpec, Workload


@dataclass
class SimConfig:
    """One simulated cluster."""

    deployment: Deployment
    num_instances: int
    roles: Sequence[str] | None = None
    """Role per instance (``both``, ``prefill``, ``decode``); default: ``num_prefill`` or all ``both``."""
    num_prefill: int | None = None
    """Make the first K instances ``prefill`` and the rest ``decode`` (ignored when ``roles`` is set).
    None: the policy's ``default_prefill_fraction`` if it has one, else no PD split."""
    slo: SLO | None = None
    """Default SLOs; None takes the deployment's defaults."""
    rebalance_interval_s: float = 1.0
    """How often a policy with ``rebalance`` is asked for role changes (simulated seconds)."""
    stop_after_s: float | None = None
    """Stop the clock here; requests not finished by then count as failed (sweeps use it)."""
    kv_listener: KVEventListener | None = None
    """Hears every instance's block stored/removed events (e.g. a router-side prefix index)."""
    classes: ClassScheduling | None = None
    """Engines follow XLLMScheduler's online/offline rules; None: offline is treated like online."""
    offline: OfflineBacklog | None = None
    """An always-waiting offline batch job beside the workload's (online) requests."""

    def instance_roles(self, policy: RoutingPolicy) -> list[str]:
        if self.roles is not None:
            if len(self.roles) != self.num_instances:
                raise ValueError("roles must name one role per instance")
            return list(self.roles)
        k = self.num_prefill
        if k is None:
            fraction = getattr(policy, "default_prefill_fraction", None)
            if fraction is None:
                return ["both"] * self.num_instances
            k = round(self.num_instances * fraction)
        k = max(1, min(self.num_instances - 1, k)) if self.num_instances > 1 else 0
        if k == 0:
            return ["both"] * self.num_instances
        return ["prefill"] * k + ["decode"] * (self.num_instances - k)


@dataclass
class SimResult:
    """A finished run: per-request records, the summary, per-instance stats, role log."""

    records: list[RequestRecord]
    summary: dict[str, Any]
    instances: dict[str, dict[str, Any]]
    role_changes: list[tuple[float, str, str, str, str]] = field(default_factory=list)
    wall_s: float = 0.0
    sim_end_s: float = 0.0
    offline_records: list[RequestRecord] = field(default_factory=list)
    """Finished or failed offline backlog requests (not in ``records`` or the SLO numbers)."""


class _IndexFeed:
    """Forwards an instance's KV events to the prefix index (and an optional extra listener)."""

    __slots__ = ("index", "extra")

    def __init__(self, index: PrefixIndex, extra: KVEventListener | None) -> None:
        self.index = index
        self.extra = extra

    def stored(self, instance_id: str, block_hash: int) -> None:
        self.index.apply_stored(instance_id, (block_hash,))
        if self.extra is not None:
            self.extra.stored(instance_id, block_hash)

    def removed(self, instance_id: str, block_hash: int) -> None:
        self.index.apply_removed(instance_id, (block_hash,))
        if self.extra is not None:
            self.extra.removed(instance_id, block_hash)


def block_hashes_for(spec: RequestSpec, hash_block_tokens: int, block_size: int) -> tuple[int, ...]:
    """The request's full KV blocks at the engine's block size, identified by prefix.

    Block ``b`` holds tokens ``[b*B, (b+1)*B)``; its content is fixed by the
    workload's chained hash of the hash block holding token ``(b+1)*B - 1`` and
    by ``b`` itself, so equal prefixes give equal blocks at any block size.
    """
    hashes = spec.prefix_hashes
    if not hashes or hash_block_tokens <= 0:
        return ()
    full = min(spec.prompt_tokens // block_size, len(hashes) * hash_block_tokens // block_size)
    return tuple(hash((hashes[((b + 1) * block_size - 1) // hash_block_tokens], b))
                 for b in range(full))


class Cluster:
    def __init__(self, workload: Workload, policy: RoutingPolicy, config: SimConfig) -> None:
        self.workload = workload
        self.policy = policy
        self.config = config
        self.dep = config.deployment
        self.slo = config.slo or SLO(self.dep.default_slo_ttft_ms, self.dep.default_slo_tpot_ms)
        self.events = EventQueue()
        roles = config.instance_roles(policy)
        self.prefix_index = PrefixIndex()
        feed = _IndexFeed(self.prefix_index, config.kv_listener)
        classes = config.classes
        if classes is not None and classes.tpot_slo_ms is None:
            classes = replace(classes, tpot_slo_ms=self.slo.tpot_ms)
        if classes is not None and classes.ttft_slo_ms is None:
            classes = replace(classes, ttft_slo_ms=self.slo.ttft_ms)
        self.instances: dict[str, SimInstance] = {}
        for k, role in enumerate(roles):
            inst = SimInstance(f"i{k}", self.dep, self.events, feed, role=role, classes=classes)
            inst.on_finish = self._on_finish
            inst.on_prefill_done = self._on_prefill_done
            inst.on_fail = self._on_fail
            inst.on_migrate = self._on_migrate
            self.instances[inst.instance_id] = inst
        self._order = list(self.instances.values())
        per_host = self.dep.host_instances
        if per_host > 1 and self.dep.neighbour_prefill_slowdown > 0:
            for start in range(0, len(self._order), per_host):
                host = self._order[start:start + per_host]
                for inst in host:
                    inst.neighbours = [other for other in host if other is not inst]
        self._nic_free_at: dict[str, float] = {i: 0.0 for i in self.instances}
        self._observe = getattr(policy, "observe", None)
        self._rebalance = getattr(policy, "rebalance", None)
        self._migrations = getattr(policy, "migrations", None)
        self.records: list[RequestRecord] = []
        self.offline_records: list[RequestRecord] = []
        self.migration_log: list[tuple[float, Migration]] = []
        self._offline_reqs: list[SimRequest] = []
        self._online_done = 0
        self._offline_marked: tuple[float, int] = (0.0, 0)  # (time, offline tokens by then)
        backlog = config.offline
        if backlog is not None:
            fits = [(p, o) for p, o in backlog.lengths if p + o <= self.dep.max_model_len]
            if not fits or backlog.concurrency < 0:
                raise ValueError("the offline backlog needs lengths that fit max_model_len "
                                 "and a concurrency >= 0")
            self._offline_lengths = fits
            self._offline_rng = np.random.default_rng(backlog.seed)
        self.role_log: list[tuple[float, str, str, str, str]] = []
        self._arrivals_left = len(workload.requests)
        plan = getattr(policy, "profile_plan", None)
        if plan is not None:
            from router.sim.profile import profile_deployment

            samples = profile_deployment(self.dep, plan())
            for inst_id in self.instances:
                policy.observe_profile(inst_id, samples)  # type: ignore[attr-defined]

    # -- views -------------------------------------------------------------------------
    def view(self, block_hashes: tuple[int, ...] = ()) -> ClusterView:
        states = tuple(
            InstanceState(i.instance_id, i.role, i.healthy, len(i.running), i.num_waiting,
                          i.kv.usage(), i.inflight, i.inflight_prompt_tokens,
                          queued_prefill_tokens=i.queued_prefill_tokens,
                          running_tokens=i.running_tokens, offline_running=i.offline_running,
                          offline_waiting=i.num_offline_waiting,
                          offline_queued_prefill_tokens=i.offline_queued_prefill_tokens)
            for i in self._order)
        hits = self.prefix_index.prefix_hits(block_hashes) if block_hashes else {}
        return ClusterView(states, self.events.now, hits)

    # -- arrivals and routing ------------------------------------------------------------
    def _arrive(self, spec: RequestSpec) -> None:
        self._arrivals_left -= 1
        self._route(spec)

    def _dispatch_offline(self, _: object = None) -> None:
        """Route the backlog's next request (it has been waiting since the job began)."""
        prompt, output = self._offline_lengths[int(self._offline_rng.integers(
            len(self._offline_lengths)))]
        spec = RequestSpec(f"offline-{len(self._offline_reqs)}", self.events.now, prompt, output,
                           request_class="offline")
        self._route(spec)

    def _route(self, spec: RequestSpec) -> None:
        hashes = block_hashes_for(spec, self.workload.hash_block_tokens, self.dep.block_size)
        req = SimRequest(spec, hashes)
        if req.offline:
            self._offline_reqs.append(req)
        if spec.prompt_tokens + spec.output_tokens > self.dep.max_model_len:
            self._fail(req, f"longer than max_model_len {self.dep.max_model_len}")
            return
        info = RequestInfo(spec.request_id, spec.prompt_tokens, spec.output_tokens,
                           request_class=spec.request_class,  # type: ignore[arg-type]
                           slo_ttft_ms=spec.slo_ttft_ms if spec.slo_ttft_ms is not None
                           else self.slo.ttft_ms,
                           slo_tpot_ms=spec.slo_tpot_ms if spec.slo_tpot_ms is not None
                           else self.slo.tpot_ms,
                           block_hashes=hashes)
        try:
            decision = self.policy.route(info, self.view(hashes))
        except NoInstanceAvailable as error:
            self._fail(req, f"no instance: {error}")
            return
        self.apply_role_changes(decision.role_changes)
        decode = self.instances[decision.instance_id]
        decode.inflight += 1
        prefill_id = decision.prefill_instance_id
        if prefill_id is not None and prefill_id != decision.instance_id:
            prefill = self.instances[prefill_id]
            req.prefill_only = True
            req.prefill_instance_id = prefill_id
            req.decode_instance_id = decode.instance_id
            prefill.inflight += 1
            prefill.inflight_prompt_tokens += spec.prompt_tokens
            prefill.enqueue(req)
        else:
            req.decode_instance_id = decode.instance_id
            decode.inflight_prompt_tokens += spec.prompt_tokens
            decode.enqueue(req)

    def apply_role_changes(self, changes: Sequence[RoleChange]) -> None:
        for change in changes:
            inst = self.instances[change.instance_id]
            if inst.role != change.role:
                self.role_log.append((self.events.now, inst.instance_id, inst.role, change.role,
                                      change.reason))
                inst.role = change.role

    # -- PD handoff ----------------------------------------------------------------------
    def _on_prefill_done(self, req: SimRequest, now: float) -> None:
        prefill = self.instances[req.prefill_instance_id]  # type: ignore[index]
        prefill.inflight -= 1
        prefill.inflight_prompt_tokens -= req.prompt
        start = max(now, self._nic_free_at[prefill.instance_id])
        end = (start + self.dep.transfer_latency_ms * 1e-3
               + req.prompt * self.dep.kv_bytes_per_token / self.dep.transfer_bytes_per_s)
        self._nic_free_at[prefill.instance_id] = end
        self.events.schedule(end, self._on_transfer_done, req)

    # -- offline migration ------------------------------------------------------------------
    def _on_migrate(self, req: SimRequest, target_id: str) -> None:
        """Resubmit a migrated offline request on ``target_id`` (re-prefill, no KV moves)."""
        source = self.instances[req.decode_instance_id]  # type: ignore[index]
        source.inflight -= 1
        if req.prefill_instance_id is None:
            source.inflight_prompt_tokens -= req.prompt
        target = self.instances[target_id]
        req.prefill_instance_id = None
        req.decode_instance_id = target_id
        target.inflight += 1
        target.inflight_prompt_tokens += req.prompt
        target.enqueue(req)

    def _on_transfer_done(self, req: SimRequest) -> None:
        self.instances[req.prefill_instance_id].release_transferred(req)  # type: ignore[index]
        req.prefill_only = False
        req.computed = req.prompt - 1  # D computes the last prompt token and samples
        self.instances[req.decode_instance_id].enqueue(req)  # type: ignore[index]

    # -- completion --------------------------------------------------------------------------
    def _record(self, req: SimRequest) -> RequestRecord:
        spec = req.spec
        ttft = tpot = None
        if req.ok and req.first_token_s is not None:
            ttft = (req.first_token_s - spec.arrival_s) * 1e3 + self.dep.ttft_overhead_ms
            if req.output > 1 and req.finish_s is not None:
                tpot = (req.finish_s - req.first_token_s) * 1e3 / (req.output - 1)
        record = RequestRecord(spec.request_id, spec.arrival_s, spec.prompt_tokens, spec.output_tokens,
                               req.decode_instance_id, req.prefill_instance_id, req.ok, ttft, tpot,
                               req.finish_s, req.cached_tokens, req.preemptions, spec.slo_ttft_ms,
                               spec.slo_tpot_ms, req.error)
        if req.offline and self.config.offline is not None:
            self.offline_records.append(record)
            # The next one; after a failure not at once (a policy with no instance would spin).
            delay = 0.0 if req.ok else self.config.rebalance_interval_s
            self.events.schedule(self.events.now + delay, self._dispatch_offline)
        else:
            self.records.append(record)
            self._online_done += 1
        return record

    def _on_finish(self, req: SimRequest, now: float) -> None:
        decode = self.instances[req.decode_instance_id]  # type: ignore[index]
        decode.inflight -= 1
        if req.prefill_instance_id is None:
            decode.inflight_prompt_tokens -= req.prompt
        record = self._record(req)
        if self._observe is not None:
            start = req.prefill_start_s if req.prefill_start_s is not None else req.spec.arrival_s
            end = req.prefill_end_s if req.prefill_end_s is not None else start
            self._observe(RequestOutcome(
                req.spec.request_id, record.instance_id or "", req.prefill_instance_id,
                req.prompt, req.cached_tokens, req.output, record.ttft_ms or 0.0, record.tpot_ms,
                (start - req.spec.arrival_s) * 1e3, (end - start) * 1e3, now))

    def _on_fail(self, req: SimRequest, now: float) -> None:
        for inst_id in {req.prefill_instance_id, req.decode_instance_id} - {None}:
            inst = self.instances[inst_id]  # type: ignore[index]
            inst.inflight -= 1
        owner = self.instances.get(req.instance_id or "")
        if owner is not None and (req.prefill_only or req.prefill_instance_id is None):
            owner.inflight_prompt_tokens -= req.prompt
        self._fail(req, req.error or "failed")

    def _fail(self, req: SimRequest, error: str) -> None:
        req.ok = False
        req.error = error
        record = self._record(req)
        if self._observe is not None:
            self._observe(RequestOutcome(req.spec.request_id, record.instance_id or "",
                                         req.prefill_instance_id, req.prompt, 0, req.output, 0.0,
                                         None, 0.0, 0.0, self.events.now, ok=False))

    # -- rebalancing -----------------------------------------------------------------------
    def _tick(self, _: object) -> None:
        if self._rebalance is not None:
            self.apply_role_changes(self._rebalance(self.view()))
        if self._migrations is not None:
            for move in self._migrations(self.view()):
                if move.from_instance_id != move.to_instance_id:
                    self.migration_log.append((self.events.now, move))
                    self.instances[move.from_instance_id].migrate_out(move.count,
                                                                      move.to_instance_id)
        if self._arrivals_left or any(i.busy for i in self._order):
            self.events.schedule(self.events.now + self.config.rebalance_interval_s, self._tick)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> SimResult:
        began = time.perf_counter()
        arrivals = self.workload.requests
        events = self.events
        stop = self.config.stop_after_s if self.config.stop_after_s is not None else float("inf")
        if self._rebalance is not None or self._migrations is not None:
            events.schedule(self.config.rebalance_interval_s, self._tick)
        backlog = self.config.offline
        if backlog is not None:
            for _ in range(backlog.concurrency):
                events.schedule(0.0, self._dispatch_offline)
            if backlog.measure_from_s > 0:
                events.schedule(backlog.measure_from_s, self._offline_mark)
        k, n = 0, len(arrivals)
        while True:
            if backlog is not None and k >= n and self._online_done >= n:
                break  # the offline job never ends; the run is the online workload's
            t_event = events.next_time()
            if k < n and arrivals[k].arrival_s <= t_event:
                if arrivals[k].arrival_s > stop:
                    break
                events.now = arrivals[k].arrival_s
                self._arrive(arrivals[k])
                k += 1
            elif events:
                if t_event > stop:
                    break
                events.pop_and_run()
            else:
                break
        # Requests not finished when the clock stopped are failures.
        seen = {r.request_id for r in self.records}
        for spec in arrivals:
            if spec.request_id not in seen:
                self.records.append(RequestRecord(
                    spec.request_id, spec.arrival_s, spec.prompt_tokens, spec.output_tokens,
                    None, None, False, None, None, None, error="unfinished when the run stopped"))
        end = events.now
        instances = {i.instance_id: i.stats(end) for i in self._order}
        span = self.workload.duration_s or end
        summary = summarize(self.records, self.slo, span, instances, len(self.role_log))
        summary["sim_end_s"] = end
        if backlog is not None:
            summary.update(self._offline_summary(end))
        return SimResult(self.records, summary, instances, self.role_log,
                         time.perf_counter() - began, end, self.offline_records)

    def _offline_generated(self) -> int:
        return sum(r.generated for r in self._offline_reqs if r.ok)

    def _offline_mark(self, _: object) -> None:
        self._offline_marked = (self.events.now, self._offline_generated())

    def _offline_summary(self, end: float) -> dict[str, Any]:
        """Offline throughput: every token generated from ``measure_from_s`` to the end,
        finished request or not."""
        generated = self._offline_generated()
        start, before = self._offline_marked
        span = end - start
        return {
            "offline_dispatched": len(self._offline_reqs),
            "offline_finished": sum(1 for r in self.offline_records if r.ok),
            "offline_output_tokens": generated - before,
            "offline_output_tok_per_s": (generated - before) / span if span > 0 else 0.0,
            "offline_preemptions": sum(r.preemptions for r in self._offline_reqs),
            "offline_preempted_for_online": sum(i.preempted_for_online for i in self._order),
            "offline_migrations": sum(r.migrations for r in self._offline_reqs),
            "migration_moves": len(self.migration_log),
            "budget_constrained_steps": sum(i.budget_constrained_steps for i in self._order),
            "offline_prefill_held": sum(i.offline_prefill_held for i in self._order),
            "offline_decodes_held": sum(i.offline_decodes_held for i in self._order),
        }


def simulate(workload: Workload, policy: RoutingPolicy, config: SimConfig) -> SimResult:
    """Run ``workload`` through a fresh cluster driven by ``policy``."""
    return Cluster(workload, policy, config).run()
