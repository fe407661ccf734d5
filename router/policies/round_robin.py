"""Round-robin: the baseline every other policy must beat.

Rule: cycle through healthy serving instances in id order, skipping unhealthy ones.
"""

from __future__ import annotations

from router.policies.types import ClusterView, NoInstanceAvailable, RequestInfo, RoutingDecision


class RoundRobinPolicy:
    name = "round_robin"

    def __init__(self) -> None:
        self._cursor = 0

    def route(self, request: RequestInfo, view: ClusterView) -> RoutingDecision:
        candidates = sorted(view.healthy("both", "decode"), key=lambda i: i.instance_id)
        if not candidates:
            raise NoInstanceAvailable("no healthy instance")
        choice = candidates[self._cursor % len(candidates)]
        self._cursor += 1
        return RoutingDecision(choice.instance_id, reason="round_robin")
