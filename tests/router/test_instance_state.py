"""The instance health state machine: transitions, no flapping, new incarnations."""

from __future__ import annotations

import pytest

from router.server.instance_state import HealthBook, InstanceHealth, StateRules

RULES = StateRules(fail_after=3, recover_after=2, base_hold_s=2.0, max_hold_s=16.0,
                   flap_window_s=30.0, remove_after_s=100.0)


def _healthy(now: float = 0.0) -> InstanceHealth:
    health = InstanceHealth("a", "inc-1", RULES)
    change = health.success(now)
    assert change is not None and (change.before, change.after) == ("suspect", "healthy")
    return health


def _fail(health: InstanceHealth, now: float, times: int) -> None:
    for _ in range(times):
        health.failure(now, "connection refused")


def test_new_instance_is_unproven_until_first_success() -> None:
    health = InstanceHealth("a", "inc-1", RULES)
    assert health.state == "suspect" and not health.routable
    _healthy()


def test_one_lost_probe_makes_suspect_not_failed() -> None:
    health = _healthy()
    change = health.failure(1.0, "scrape timeout")
    assert change is not None and change.after == "suspect"
    assert not health.routable and not health.migrate_in_flight
    assert health.success(1.5) is not None and health.routable


def test_consecutive_failures_fail_and_interleaved_success_resets() -> None:
    health = _healthy()
    _fail(health, 1.0, 2)
    health.success(1.1)
    _fail(health, 1.2, 2)
    assert health.state == "suspect"
    change = health.failure(1.3, "connection refused")
    assert change is not None and change.after == "failed"
    assert "3 failures" in change.reason and health.migrate_in_flight


def test_failed_recovers_only_after_successes_and_hold() -> None:
    health = _healthy()
    _fail(health, 10.0, 3)
    assert health.success(10.5) is None
    assert health.success(11.0) is None  # two successes, but still inside the 2 s hold
    assert health.state == "failed"
    change = health.success(12.0)
    assert change is not None and change.after == "healthy"


def test_flapping_instance_hold_doubles_up_to_cap() -> None:
    health = _healthy()
    holds = []
    now = 0.0
    for _ in range(6):
        _fail(health, now, 3)
        assert health.state == "failed"
        holds.append(health.hold_s)
        now += health.hold_s
        health.success(now)
        health.success(now)
        assert health.state == "healthy"
        now += 1.0  # fails again soon after each recovery
    assert holds == [2.0, 4.0, 8.0, 16.0, 16.0, 16.0]
    # A quiet spell longer than the flap window resets the hold.
    now += 60.0
    _fail(health, now, 3)
    assert health.hold_s == 2.0


def test_long_failed_is_removed_and_ignores_later_evidence() -> None:
    health = _healthy()
    _fail(health, 0.0, 3)
    assert health.tick(50.0) is None
    change = health.tick(100.0)
    assert change is not None and change.after == "removed"
    assert health.success(101.0) is None and health.failure(101.0, "x") is None
    assert health.state == "removed"


def test_book_same_incarnation_keeps_state_new_incarnation_starts_over() -> None:
    book = HealthBook(RULES)
    assert book.registered("a", "inc-1") is not None
    book.success("a", 0.0)
    for _ in range(3):
        book.failure("a", 1.0, "EOF mid-stream")
    assert book.state("a") == "failed"
    assert book.registered("a", "inc-1") is None  # a re-put of the key heals nothing
    assert book.state("a") == "failed"
    change = book.registered("a", "inc-2")
    assert change is not None and (change.before, change.after) == ("failed", "suspect")
    book.success("a", 1.1)
    assert book.routable() == ["a"]


def test_book_deregistration_removes_and_unknown_ids_are_ignored() -> None:
    book = HealthBook(RULES)
    book.registered("a", "1")
    book.registered("b", "1")
    book.success("a", 0.0)
    book.success("b", 0.0)
    change = book.deregistered("b", "lease expired")
    assert change is not None and change.after == "removed" and change.reason == "lease expired"
    assert book.routable() == ["a"]
    assert book.state("zzz") == "removed"
    assert book.failure("zzz", 0.0, "x") is None and book.success("zzz", 0.0) is None
    for _ in range(3):
        book.failure("a", 5.0, "x")
    assert [c.after for c in book.tick(200.0)] == ["removed"]


@pytest.mark.parametrize("kwargs", [{"fail_after": 0}, {"recover_after": 0},
                                    {"base_hold_s": 5.0, "max_hold_s": 1.0},
                                    {"remove_after_s": 0.0}])
def test_rules_reject_bad_thresholds(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        StateRules(**kwargs)  # type: ignore[arg-type]
