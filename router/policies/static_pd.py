"""Static prefill/decode disaggregation: fixed pools, least-loaded member of each.

Rule, per request:

1. prefill instance P = argmin over healthy instances with role ``prefill`` or ``both`` of
   (queued_prefill_tokens, load, instance_id): the shortest prefill queue;
2. decode instance D = argmin over healthy instances with role ``decode`` or ``both`` of
   (load, running_tokens, instance_id);
3. if P == D (a ``both`` instance won both) the request runs there without a handoff;
   if no prefill instance is healthy, D prefills locally (reason ``static_pd_local``).

Roles never change: the split is whatever the deployment (or the simulator's
``--num-prefill``) set. Dynamic PD re-balances roles instead.
"""

from __future__ import annotations

from router.policies.types import ClusterView, NoInstanceAvailable, RequestInfo, RoutingDecision


class StaticPDPolicy:
    name = "static_pd"
    splits_prefill = True  # prefill on P, decode on D (the live EPD profiler names paths by it)
    # Share of instances a driver should make prefill instances when the
    # deployment names no roles (the simulator's default split).
    default_prefill_fraction = 0.5

    def route(self, request: RequestInfo, view: ClusterView) -> RoutingDecision:
        decoders = view.healthy("decode", "both")
        if not decoders:
            raise NoInstanceAvailable("no healthy decode instance")
        decode = min(decoders, key=lambda i: (i.load, i.running_tokens, i.instance_id))
        prefillers = view.healthy("prefill", "both")
        if not prefillers:
            return RoutingDecision(decode.instance_id, reason="static_pd_local")
        prefill = min(prefillers, key=lambda i: (i.queued_prefill_tokens, i.load, i.instance_id))
        if prefill.instance_id == decode.instance_id:
            return RoutingDecision(decode.instance_id, reason="static_pd_colocated")
        return RoutingDecision(decode.instance_id, prefill_instance_id=prefill.instance_id,
                               reason="static_pd")
