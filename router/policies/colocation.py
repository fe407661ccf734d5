"""Online/offline co-location over two pools (xLLM §3.3): latency-relaxed and latency-strict.

Pools are roles: ``prefill`` instances form the *latency-relaxed* pool (their
online work only has a TTFT target), ``decode`` instances the *latency-strict*
pool (online decodes with a TPOT target). Engines run XLLMScheduler, so on
every instance online work goes first and preempts offline work (online peaks
preempt offline first); this policy decides where offline work goes.

Rule, per request (``load`` and KV usage as in ``InstanceState``):

1. **online**: prefill on the relaxed instance with the fewest *online* prompt
   tokens queued (offline tokens queued there yield to it), decode on the strict
   instance with the least online load, then KV usage (PD handoff);
2. **offline prefill** always goes to the relaxed pool: the relaxed instance
   with the fewest prompt tokens queued (P);
3. **offline decode** runs in either pool: on P itself, or on a strict instance
   (handoff) that holds fewer than ``strict_offline_limit`` offline requests,
   has none waiting (it is not under an online peak) and uses less than
   ``offline_kv_limit`` of its KV; among these and P, the least loaded, then the
   lowest KV usage, P first on ties.

Periodically (``migrations``, on the driver's rebalance timer): a relaxed
instance is *idle* when no online request is queued or running there and its
KV usage is below ``migrate_kv_limit``. Each idle relaxed instance takes up to
``migrate_batch`` offline requests from the strict instance under the most
pressure, where pressure means offline requests waiting there (preempted by
online work or out of run slots) or KV usage above ``strict_pressure_kv``.
The driver moves them by re-prefill of prompt + generated tokens on the
relaxed instance; the strict pool gets its capacity back for online peaks.

Without both pools (no ``prefill`` or no ``decode`` instance) it routes like
least-load on online load, so a misconfigured cluster still serves.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.policies.types import (
    ClusterView,
    InstanceState,
    Migration,
    NoInstanceAvailable,
    RequestInfo,
    RoutingDecision,
)


@dataclass(frozen=True)
class ColocationSettings:
    """Thresholds of the co-location policy (defaults: not tuned to one trace)."""

    relaxed_fraction: float = 0.5
    """Share of instances a driver should make latency-relaxed (role ``prefill``)."""
    strict_offline_limit: int = 128
    """Most offline requests placed on one strict instance (half of vLLM's 256 run slots)."""
    offline_kv_limit: float = 0.85
    """An offline decode is placed only on instances below this KV usage (besides its P)."""
    migrate_kv_limit: float = 0.7
    """An idle relaxed instance takes migrated offline decodes while below this KV usage."""
    strict_pressure_kv: float = 0.9
    """A strict instance above this KV usage sheds running offline decodes to idle relaxed ones."""
    migrate_batch: int = 16
    """Most offline requests one idle relaxed instance takes per rebalance tick."""
    overflow_prefill_tokens: int | None = 16384
    """When every relaxed instance has more prompt tokens queued than this, an offline
    request runs whole on a strict instance, where the engine's SLO step budget lets its
    prefill use only what online decodes leave of each step. None: never."""


class ColocationPolicy:
    name = "colocation"

    def __init__(self, settings: ColocationSettings | None = None) -> None:
        self.settings = settings or ColocationSettings()
        self.default_prefill_fraction = self.settings.relaxed_fraction

    # -- routing -------------------------------------------------------------------------
    def route(self, request: RequestInfo, view: ClusterView) -> RoutingDecision:
        relaxed = view.healthy("prefill")
        strict = view.healthy("decode")
        if not relaxed or not strict:
            return self._aggregated(request, view)
        if request.request_class == "online":
            prefill = min(relaxed, key=lambda i: (i.online_queued_prefill_tokens, i.online_load,
                                                  i.queued_prefill_tokens, i.instance_id))
            decode = min(strict, key=lambda i: (i.online_load, i.kv_usage, i.instance_id))
            return RoutingDecision(decode.instance_id, prefill_instance_id=prefill.instance_id,
                                   reason="colocation_online")
        prefill = min(relaxed, key=lambda i: (i.queued_prefill_tokens, i.load, i.instance_id))
        limit = self.settings
        room = [i for i in strict if i.offline_running + i.offline_waiting < limit.strict_offline_limit
                and i.offline_waiting == 0 and i.kv_usage < limit.offline_kv_limit]
        overflow = limit.overflow_prefill_tokens
        if room and overflow is not None and prefill.queued_prefill_tokens > overflow:
            spill = min(room, key=lambda i: (i.offline_queued_prefill_tokens, i.load, i.kv_usage,
                                             i.instance_id))
            if spill.offline_queued_prefill_tokens <= overflow:
                return RoutingDecision(spill.instance_id, reason="colocation_offline_overflow")
        decode = min([prefill, *room], key=lambda i: (i.load, i.kv_usage, i is not prefill,
                                                      i.instance_id))
        if decode is prefill:
            return RoutingDecision(prefill.instance_id, reason="colocation_offline_relaxed")
        return RoutingDecision(decode.instance_id, prefill_instance_id=prefill.instance_id,
                               reason="colocation_offline_strict")

    def _aggregated(self, request: RequestInfo, view: ClusterView) -> RoutingDecision:
        candidates = view.healthy("both", "decode", "prefill")
        if not candidates:
            raise NoInstanceAvailable("no healthy instance")
        if request.request_class == "online":
            choice = min(candidates, key=lambda i: (i.online_load, i.load, i.kv_usage, i.instance_id))
        else:
            choice = min(candidates, key=lambda i: (i.load, i.kv_usage, i.instance_id))
        return RoutingDecision(choice.instance_id, reason="colocation_aggregated")

    # -- migration of offline decodes ------------------------------------------------------
    def migrations(self, view: ClusterView) -> tuple[Migration, ...]:
        s = self.settings
        idle = sorted((i for i in view.healthy("prefill")
                       if i.online_load == 0 and i.kv_usage < s.migrate_kv_limit),
                      key=lambda i: (i.load, i.kv_usage, i.instance_id))
        if not idle:
            return ()
        shed: dict[str, int] = {}
        for i in view.healthy("decode"):
            n = i.offline_waiting
            if i.kv_usage > s.strict_pressure_kv:
                n += i.offline_running
            if n > 0:
                shed[i.instance_id] = n
        moves: list[Migration] = []
        by_id = {i.instance_id: i for i in view.instances}
        for target in idle:
            if not shed:
                break
            source = max(shed, key=lambda k: (shed[k], by_id[k].kv_usage, k))
            count = min(shed[source], s.migrate_batch)
            moves.append(Migration(source, target.instance_id, count, reason=_reason(by_id[source])))
            shed[source] -= count
            if shed[source] <= 0:
                del shed[source]
        return tuple(moves)


def _reason(source: InstanceState) -> str:
    return "offline_waiting_on_strict" if source.offline_waiting else "strict_kv_pressure"
