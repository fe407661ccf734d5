"""Routing policies: pure decision code shared by the live router and the simulator.

Each policy is one module with its decision rule in its docstring. ``make_policy``
is the single place that maps a flag value to a policy object.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from router.policies.colocation import ColocationPolicy, ColocationSettings
from router.policies.dynamic_pd import DynamicPDPolicy, DynamicPDSettings
from router.policies.kv_aware import KVAwarePolicy, KVAwareSettings
from router.policies.least_load import LeastLoadPolicy
from router.policies.round_robin import RoundRobinPolicy
from router.policies.static_pd import StaticPDPolicy
from router.policies.types import (
    ClusterView,
    InstanceState,
    MigratingPolicy,
    Migration,
    NoInstanceAvailable,
    ObservingPolicy,
    ProfileSample,
    ProfilingPolicy,
    RebalancingPolicy,
    RequestInfo,
    RequestOutcome,
    RoleChange,
    RoutingDecision,
    RoutingPolicy,
)

POLICY_FACTORIES: dict[str, Callable[..., RoutingPolicy]] = {
    RoundRobinPolicy.name: RoundRobinPolicy,
    LeastLoadPolicy.name: LeastLoadPolicy,
    StaticPDPolicy.name: StaticPDPolicy,
    KVAwarePolicy.name: KVAwarePolicy,
    DynamicPDPolicy.name: DynamicPDPolicy,
    ColocationPolicy.name: ColocationPolicy,
}


def make_policy(name: str, **settings: Any) -> RoutingPolicy:
    """A fresh policy; ``settings`` go to its constructor (only policies that take them)."""
    try:
        factory = POLICY_FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown policy '{name}'; choose one of {', '.join(POLICY_FACTORIES)}") from None
    return factory(**settings) if settings else factory()


__all__ = [
    "POLICY_FACTORIES", "ClusterView", "ColocationPolicy", "ColocationSettings",
    "DynamicPDPolicy", "DynamicPDSettings", "InstanceState", "KVAwarePolicy", "KVAwareSettings",
    "MigratingPolicy", "Migration", "NoInstanceAvailable", "ObservingPolicy", "ProfileSample",
    "ProfilingPolicy", "RebalancingPolicy", "RequestInfo", "RequestOutcome", "RoleChange",
    "RoutingDecision", "RoutingPolicy", "make_policy",
]
