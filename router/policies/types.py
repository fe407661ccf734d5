"""The data a routing policy sees and returns: the contract between policies and drivers.

Two drivers call the same policies: the live router (``router/``) and the
trace simulator (``router/sim/``). Both build these immutable views from their
own world and act on the returned decision, so a simulated result is a
statement about the shipped policy code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

Role = Literal["both", "prefill", "decode", "encode"]
RequestClass = Literal["online", "offline"]


@dataclass(frozen=True, slots=True)
class InstanceState:
    """One engine instance as a policy may know it at decision time.

    Engine-reported fields (``running``, ``waiting``, ``kv_usage``) lag by up to
    one scrape; ``inflight`` and ``inflight_prompt_tokens`` are the driver's own
    accounting and are exact, which keeps a burst from landing on one
    instance between scrapes.
    """

    instance_id: str
    role: Role = "both"
    healthy: bool = True
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    inflight: int = 0
    inflight_prompt_tokens: int = 0
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    # Prompt tokens routed here whose prefill has not been computed yet (queued
    # or partially prefilled): the input of a TTFT/queueing predictor.
    queued_prefill_tokens: int = 0
    # Context tokens (prompt + generated) held by the requests running here.
    running_tokens: int = 0
    # The offline share of the above (0 where the driver does not know classes):
    # offline requests running, waiting, and their part of queued_prefill_tokens.
    offline_running: int = 0
    offline_waiting: int = 0
    offline_queued_prefill_tokens: int = 0

    @property
    def load(self) -> int:
        """Requests queued or running, counting the driver's unscraped sends."""
        return max(self.running + self.waiting, self.inflight)

    @property
    def online_load(self) -> int:
        """Online requests queued or running (offline work yields to them)."""
        return self.running + self.waiting - self.offline_running - self.offline_waiting

    @property
    def online_queued_prefill_tokens(self) -> int:
        """Prompt tokens of online requests still to prefill (what a new online prompt waits on)."""
        return self.queued_prefill_tokens - self.offline_queued_prefill_tokens


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a policy may know about the request being routed."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    model: str = ""
    request_class: RequestClass = "online"
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    # vLLM-compatible hashes of the prompt's full KV blocks, in order.
    block_hashes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class TierHits:
    """A request's leading KV blocks an instance can use, by the tier each comes from.

    Blocks are counted along the prompt until the first one the instance can
    get nowhere, each under the fastest tier holding it: its own KV cache
    (``hbm``), its DRAM or SSD tier, or the global store (any instance attached
    to it can load from there).
    """

    hbm: int = 0
    dram: int = 0
    ssd: int = 0
    store: int = 0

    @property
    def total(self) -> int:
        return self.hbm + self.dram + self.ssd + self.store


@dataclass(frozen=True, slots=True)
class ClusterView:
    """The cluster at decision time.

    ``prefix_hits`` maps an instance id to how many of the request's leading
    blocks that instance holds in its prefix cache (absent means zero); the
    driver computes it from its KV index for the request being routed.
    ``tier_hits`` refines it where engines publish cache tiers below their
    KV cache (``TierHits`` per instance); empty when no tier data exists.
    """

    instances: tuple[InstanceState, ...]
    now: float = 0.0
    prefix_hits: Mapping[str, int] = field(default_factory=dict)
    tier_hits: Mapping[str, TierHits] = field(default_factory=dict)

    def healthy(self, *roles: Role) -> tuple[InstanceState, ...]:
        """Healthy instances, optionally only those in ``roles``."""
        return tuple(i for i in self.instances if i.healthy and (not roles or i.role in roles))


@dataclass(frozen=True, slots=True)
class RoleChange:
    """A request from a policy to move an instance to another role.

    The driver applies it (the live router relabels the instance, the
    simulator likewise), counts it under ``reason`` and shows the new role in
    the next view. Work already on the instance finishes where it is.
    """

    instance_id: str
    role: Role
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    """Where to send a request.

    ``instance_id`` runs the request (its decode, under disaggregation);
    ``prefill_instance_id`` is set when prefill runs elsewhere first.
    ``reason`` is a short machine-friendly label for logs and metrics.
    ``role_changes`` are applied by the driver before the request is sent.
    """

    instance_id: str
    prefill_instance_id: str | None = None
    reason: str = ""
    role_changes: tuple[RoleChange, ...] = ()


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """What a driver reports to a policy when a request finishes (feedback).

    Times are in milliseconds as the client sees them. ``prefill_ms`` is the
    time the prefill instance spent from starting the request's prefill to
    its end (no queueing); ``queue_ms`` the wait before that start.
    A driver that cannot separate the two reports their sum as ``prefill_ms``
    with ``queue_ms`` 0, and 0 for both when it did not see the prefill end
    (e.g. a non-streaming request served whole by one instance).
    ``tpot_ms`` is None for requests with fewer than two output tokens.
    """

    request_id: str
    instance_id: str
    prefill_instance_id: str | None
    prompt_tokens: int
    cached_prompt_tokens: int
    output_tokens: int
    ttft_ms: float
    tpot_ms: float | None
    queue_ms: float
    prefill_ms: float
    finished_at: float
    ok: bool = True


class NoInstanceAvailable(RuntimeError):
    """No healthy instance can take the request; the front door answers 503."""


@runtime_checkable
class RoutingPolicy(Protocol):
    """A routing policy: pure decision code, no I/O, no clock reads.

    Policies may keep internal state (a round-robin cursor, a fitted
    predictor), but everything time-dependent comes in through the view.
    """

    name: str

    def route(self, request: RequestInfo, view: ClusterView) -> RoutingDecision:
        """Choose the instance(s) for ``request``; raise NoInstanceAvailable if none fits."""
        ...


@runtime_checkable
class ObservingPolicy(Protocol):
    """Optional: a policy that learns from finished requests.

    Drivers call ``observe`` once per finished (or failed) request, after the
    client has its last token, in finishing order.
    """

    def observe(self, outcome: RequestOutcome) -> None: ...


@dataclass(frozen=True, slots=True)
class ProfileSample:
    """One isolated request a driver ran on a new instance for a profiling policy.

    ``ttft_ms`` is arrival to first token with nothing else running there;
    ``tpot_ms`` the mean time per token after the first chunk (None when every token came
    in one chunk: one output token, or an API server far behind its engine).
    """

    prompt_tokens: int
    output_tokens: int
    ttft_ms: float
    tpot_ms: float | None = None


@runtime_checkable
class ProfilingPolicy(Protocol):
    """Optional: a policy that wants each instance measured when it registers.

    The driver runs every ``(prompt_tokens, max_tokens)`` of ``profile_plan()``
    alone on the new instance (prompts longer than the instance accepts are
    skipped) and reports the measurements once through ``observe_profile``.
    """

    def profile_plan(self) -> tuple[tuple[int, int], ...]: ...

    def observe_profile(self, instance_id: str, samples: tuple[ProfileSample, ...]) -> None: ...


@runtime_checkable
class RebalancingPolicy(Protocol):
    """Optional: a policy that changes instance roles between requests.

    Drivers call ``rebalance`` periodically (the simulator every
    ``rebalance_interval_s`` of simulated time, the live router on its timer)
    and apply the returned role changes.
    """

    def rebalance(self, view: ClusterView) -> tuple[RoleChange, ...]: ...


@dataclass(frozen=True, slots=True)
class Migration:
    """A request from a policy to move offline requests between instances.

    The driver takes up to ``count`` offline requests from ``from_instance_id``
    (waiting ones first, then running ones past their prompt) and resubmits each
    to ``to_instance_id`` with its prompt + the tokens generated so far, which the
    target re-prefills (no KV moves). Online requests are never migrated this way.
    """

    from_instance_id: str
    to_instance_id: str
    count: int = 1
    reason: str = ""


@runtime_checkable
class MigratingPolicy(Protocol):
    """Optional: a policy that moves offline work between instances between requests.

    Drivers call ``migrations`` on the same timer as ``rebalance`` and carry out
    the returned moves.
    """

    def migrations(self, view: ClusterView) -> tuple[Migration, ...]: ...
