"""Routing policies: pure decision code shared by the live router and the simulator.

Each policy is one module with its decision rule in its docstring. ``make_policy``
is the single place that maps a flag value to a policy object.
"""

from __future__ import annotations

from collections.abc import Callable

from router.policies.kv_aware import KVAwarePolicy, KVAwareSettings
from router.policies.least_load import LeastLoadPolicy
from router.policies.round_robin import RoundRobinPolicy
from router.policies.static_pd import StaticPDPolicy
from router.policies.types import (
    ClusterView,
    InstanceState,
    NoInstanceAvailable,
    ObservingPolicy,
    RebalancingPolicy,
    RequestInfo,
    RequestOutcome,
    RoleChange,
    RoutingDecision,
    RoutingPolicy,
)

POLICY_FACTORIES: dict[str, Callable[[], RoutingPolicy]] = {
    RoundRobinPolicy.name: RoundRobinPolicy,
    LeastLoadPolicy.name: LeastLoadPolicy,
    StaticPDPolicy.name: StaticPDPolicy,
    KVAwarePolicy.name: KVAwarePolicy,
}


def make_policy(name: str) -> RoutingPolicy:
    try:
        return POLICY_FACTORIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy '{name}'; choose one of {', '.join(POLICY_FACTORIES)}") from None


__all__ = [
    "POLICY_FACTORIES", "ClusterView", "InstanceState", "KVAwarePolicy", "KVAwareSettings",
    "NoInstanceAvailable", "ObservingPolicy", "RebalancingPolicy", "RequestInfo", "RequestOutcome", "RoleChange", "RoutingDecision",
    "RoutingPolicy", "make_policy",
]
