"""Per-instance health state machine: healthy -> suspect -> failed -> removed.

Pure decision code (no I/O, no clock of its own: every event carries ``now``), so
that the rules are unit-tested and the load view, the stream relay and etcd
discovery only feed it evidence:

- ``success`` (a probe or a request answered), ``failure`` (a probe failed, a
  connection broke, a stream stalled), ``deregistered`` (etcd key deleted or
  lease expired, or an admin removed it) and ``registered`` (a record arrived;
  a new incarnation id means a new engine process).

States and why they exist:

- ``healthy``: gets new requests.
- ``suspect``: at least one recent failure, fewer than ``fail_after`` in a row.
  Gets no new requests while an alternative exists (the caller decides), but
  its in-flight requests are left alone: one lost probe must not migrate work.
- ``failed``: ``fail_after`` failures in a row. Its in-flight requests should
  move. It comes back only after ``recover_after`` successes in a row *and* a
  hold time since it failed; the hold doubles each time the instance fails
  again soon after recovering (up to ``max_hold_s``), so a flapping instance
  settles out of rotation instead of bouncing in and out.
- ``removed``: deregistered, or failed for longer than ``remove_after_s``.
  Terminal for this incarnation: later evidence about it is ignored. A
  registration with a *new* incarnation id starts a fresh machine in
  ``suspect`` that needs one success to become healthy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

State = Literal["healthy", "suspect", "failed", "removed"]


@dataclass(frozen=True, slots=True)
class StateRules:
    """Thresholds of the state machine (router flags feed these)."""

    fail_after: int = 3  # consecutive failures: suspect -> failed
    recover_after: int = 2  # consecutive successes: failed -> healthy
    base_hold_s: float = 2.0  # least time in failed before recovering
    max_hold_s: float = 60.0  # cap of the doubling hold of a flapping instance
    flap_window_s: float = 30.0  # failing again this soon after recovery doubles the hold
    remove_after_s: float | None = 300.0  # failed this long -> removed (None: never)

    def __post_init__(self) -> None:
        if self.fail_after < 1 or self.recover_after < 1:
            raise ValueError("fail_after and recover_after must be at least 1")
        if self.base_hold_s < 0 or self.max_hold_s < self.base_hold_s:
            raise ValueError("need 0 <= base_hold_s <= max_hold_s")
        if self.remove_after_s is not None and self.remove_after_s <= 0:
            raise ValueError("remove_after_s must be positive (or None)")


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of state, for the caller to log and count."""

    instance_id: str
    incarnation: str | None
    before: State
    after: State
    reason: str


@dataclass(slots=True)
class InstanceHealth:
    """The state of one instance incarnation and the evidence that led there."""

    instance_id: str
    incarnation: str | None
    rules: StateRules = field(default_factory=StateRules)
    state: State = "suspect"  # unproven until the first success
    failures: int = 0  # consecutive
    successes: int = 0  # consecutive
    failed_at: float | None = None
    recovered_at: float | None = None
    hold_s: float = 0.0
    last_reason: str = "registered"

    @property
    def routable(self) -> bool:
        """True when the instance should get new requests."""
        return self.state == "healthy"

    @property
    def migrate_in_flight(self) -> bool:
        """True when requests running on the instance should move elsewhere."""
        return self.state in ("failed", "removed")

    def _to(self, after: State, reason: str) -> Transition | None:
        before = self.state
        self.last_reason = reason
        if before == after:
            return None
        self.state = after
        return Transition(self.instance_id, self.incarnation, before, after, reason)

    def success(self, now: float) -> Transition | None:
        """A probe or request on this instance succeeded."""
        if self.state == "removed":
            return None
        self.failures = 0
        self.successes += 1
        if self.state == "suspect":
            return self._to("healthy", "success")
        if self.state == "failed":
            assert self.failed_at is not None
            if (self.successes >= self.rules.recover_after
                    and now - self.failed_at >= self.hold_s):
                self.recovered_at = now
                return self._to("healthy", f"{self.successes} successes after "
                                f"{now - self.failed_at:.1f}s failed")
        return None

    def failure(self, now: float, reason: str) -> Transition | None:
        """A probe failed, a connection broke or a stream stalled on this instance."""
        if self.state == "removed":
            return None
        self.successes = 0
        self.failures += 1
        if self.state == "failed":
            return self.tick(now)
        if self.failures >= self.rules.fail_after:
            flapping = (self.recovered_at is not None
                        and now - self.recovered_at < self.rules.flap_window_s)
            self.hold_s = (min(self.rules.max_hold_s, max(self.rules.base_hold_s,
                                                          self.hold_s * 2))
                           if flapping else self.rules.base_hold_s)
            self.failed_at = now
            return self._to("failed", f"{self.failures} failures in a row: {reason}")
        return self._to("suspect", reason)

    def tick(self, now: float) -> Transition | None:
        """Time passed: a long-failed instance is removed."""
        if (self.state == "failed" and self.rules.remove_after_s is not None
                and self.failed_at is not None
                and now - self.failed_at >= self.rules.remove_after_s):
            return self._to("removed", f"failed for {now - self.failed_at:.0f}s")
        return None

    def deregistered(self, reason: str = "deregistered") -> Transition | None:
        """Its registration is gone (etcd delete, lease expiry, admin removal)."""
        return self._to("removed", reason)


class HealthBook:
    """The state machines of all instances, keyed by instance id."""

    def __init__(self, rules: StateRules | None = None) -> None:
        self.rules = rules or StateRules()
        self.instances: dict[str, InstanceHealth] = {}

    def registered(self, instance_id: str, incarnation: str | None) -> Transition | None:
        """A record arrived. The same incarnation keeps its state (a re-put of the key
        must not heal a failed instance); a new incarnation starts over in suspect."""
        current = self.instances.get(instance_id)
        if current is not None and current.incarnation == incarnation:
            return None
        reason = "new incarnation" if current is not None else "registered"
        fresh = InstanceHealth(instance_id, incarnation, self.rules, last_reason=reason)
        self.instances[instance_id] = fresh
        before: State = current.state if current is not None else "removed"
        return Transition(instance_id, incarnation, before, "suspect", reason)

    def forget(self, instance_id: str) -> None:
        """Drop an instance that left discovery, so that registering it again (even with
        the same incarnation, e.g. a registrar re-registering after its engine recovered)
        starts a fresh machine."""
        self.instances.pop(instance_id, None)

    def get(self, instance_id: str) -> InstanceHealth | None:
        return self.instances.get(instance_id)

    def state(self, instance_id: str) -> State:
        health = self.instances.get(instance_id)
        return health.state if health is not None else "removed"

    def success(self, instance_id: str, now: float) -> Transition | None:
        health = self.instances.get(instance_id)
        return health.success(now) if health is not None else None

    def failure(self, instance_id: str, now: float, reason: str) -> Transition | None:
        health = self.instances.get(instance_id)
        return health.failure(now, reason) if health is not None else None

    def deregistered(self, instance_id: str, reason: str = "deregistered") -> Transition | None:
        health = self.instances.get(instance_id)
        return health.deregistered(reason) if health is not None else None

    def tick(self, now: float) -> list[Transition]:
        """Advance time for every instance; returns the transitions that happened."""
        changes = [h.tick(now) for h in self.instances.values()]
        return [c for c in changes if c is not None]

    def routable(self) -> list[str]:
        return sorted(i for i, h in self.instances.items() if h.routable)
