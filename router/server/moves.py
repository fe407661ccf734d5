"""Live requests the router may move between instances: a policy's offline moves, failover.

A co-location policy (``router/policies/colocation.py``) returns ``Migration``
orders on the rebalance timer: take N offline requests off a latency-strict
instance under pressure and give them to an idle latency-relaxed one. The
relay registers each live offline request it serves here; the rebalance loop
picks the ones to move and *breaks their upstream connection* (vLLM aborts the
request and frees its KV). The relay, seeing the break with ``move_to`` set,
resumes the request on the chosen instance with prompt + generated tokens,
exactly as after a failure (``router/server/migration.py``), and does not count
the break against the instance's health.

The same cut serves failover: when an instance's health turns ``failed`` (a
probe, another request's broken stream), every request still streaming from it
is cut at once and migrates, instead of each waiting for its own connection to
break or stall.

Breaking the connection instead of polling a flag keeps the per-token relay
loop free of extra work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from router.server.migration import StreamLedger


@dataclass(eq=False)
class MoveHandle:
    """One live migratable request, as the rebalance loop and failover see it."""

    request_id: str
    instance_id: str
    ledger: StreamLedger
    offline: bool = False  # only offline requests are moved by a policy
    move_to: str | None = None  # set by the rebalance loop; read by the relay
    reason: str = ""
    _break: Callable[[], None] | None = field(default=None, repr=False)

    def attach(self, break_upstream: Callable[[], None]) -> None:
        """The way to cut this request's current upstream connection."""
        self._break = break_upstream

    def cut(self) -> bool:
        """Cut the upstream as a failure would (its instance was declared failed)."""
        if self._break is None or self.ledger.finished:
            return False
        self._break()
        return True

    def order_move(self, target: str, reason: str) -> bool:
        """Cut the upstream so the relay resumes on ``target``; False when it cannot."""
        if self.move_to is not None or self._break is None or self.ledger.finished:
            return False
        self.move_to, self.reason = target, reason
        self._break()
        return True


class LiveRequests:
    """Live migratable requests by instance; the relay registers, moves and failover cut."""

    def __init__(self) -> None:
        self._by_instance: dict[str, dict[str, MoveHandle]] = {}

    def register(self, handle: MoveHandle) -> None:
        self._by_instance.setdefault(handle.instance_id, {})[handle.request_id] = handle

    def unregister(self, handle: MoveHandle) -> None:
        live = self._by_instance.get(handle.instance_id)
        if live is not None and live.get(handle.request_id) is handle:
            del live[handle.request_id]
            if not live:
                del self._by_instance[handle.instance_id]

    def live(self, instance_id: str) -> int:
        return len(self._by_instance.get(instance_id, {}))

    def on(self, instance_id: str) -> list[MoveHandle]:
        """The live requests on one instance (a snapshot)."""
        return list(self._by_instance.get(instance_id, {}).values())

    def cut_all(self, instance_id: str) -> int:
        """Cut every live request on a failed instance; how many were cut."""
        return sum(h.cut() for h in self.on(instance_id))

    def pick(self, instance_id: str, count: int, migration_limit: int) -> list[MoveHandle]:
        """Up to ``count`` requests to move off ``instance_id``: fewest tokens generated first.

        Those are the waiting and preempted ones, and the ones whose move re-prefills the
        least; a request about to finish stays where it is. A request that has used up
        ``--migration-limit`` stays too: a move must never cost it the failover it may need.
        """
        candidates = [h for h in self._by_instance.get(instance_id, {}).values()
                      if h.offline and h.move_to is None and h.ledger.can_resume() is None
                      and h.ledger.migrations < migration_limit]
        candidates.sort(key=lambda h: (len(h.ledger.generated), h.request_id))
        return candidates[:max(0, count)]
