"""Least-load: send each request where the least work is queued.

Rule: minimise (load, inflight_prompt_tokens, kv_usage, instance_id) over healthy
serving instances, where load = max(running + waiting, router in-flight).
Prompt tokens in flight break ties so that long prompts spread out.
"""

from __future__ import annotations

from router.policies.types import ClusterView, NoInstanceAvailable, RequestInfo, RoutingDecision


class LeastLoadPolicy:
    name = "least_load"

    def route(self, request: RequestInfo, view: ClusterView) -> RoutingDecision:
        candidates = view.healthy("both", "decode")
        if not candidates:
            raise NoInstanceAvailable("no healthy instance")
        choice = min(candidates, key=lambda i: (i.load, i.inflight_prompt_tokens, i.kv_usage,
                                                i.instance_id))
        return RoutingDecision(choice.instance_id, reason="least_load")
