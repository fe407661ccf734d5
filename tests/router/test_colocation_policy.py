"""The ``colocation`` policy's rules on hand-made cluster views (pure, no simulator)."""

from __future__ import annotations

import pytest

from router.policies import (
    POLICY_FACTORIES,
    ClusterView,
    ColocationPolicy,
    ColocationSettings,
    InstanceState,
    MigratingPolicy,
    NoInstanceAvailable,
    RequestInfo,
    make_policy,
)

ONLINE = RequestInfo("on", 500, 32)
OFFLINE = RequestInfo("off", 2000, 400, request_class="offline")


def view(*states: InstanceState) -> ClusterView:
    return ClusterView(states)


def test_registered_for_the_router_and_the_simulator():
    policy = make_policy("colocation")
    assert POLICY_FACTORIES["colocation"] is ColocationPolicy
    assert isinstance(policy, MigratingPolicy)
    assert policy.default_prefill_fraction == 0.5


def test_online_prefills_where_least_online_work_waits_and_decodes_in_the_strict_pool():
    cluster = view(
        # r0 has more prompt tokens queued, but all of them offline: they yield to online work.
        InstanceState("r0", "prefill", queued_prefill_tokens=9000, offline_queued_prefill_tokens=9000,
                      running=3, offline_running=3),
        InstanceState("r1", "prefill", queued_prefill_tokens=600),
        InstanceState("s0", "decode", running=40, offline_running=38),  # 2 online
        InstanceState("s1", "decode", running=5),  # 5 online
    )
    decision = make_policy("colocation").route(ONLINE, cluster)
    assert (decision.prefill_instance_id, decision.instance_id) == ("r0", "s0")
    assert decision.reason == "colocation_online"


def test_offline_prefills_in_the_relaxed_pool_and_decodes_where_there_is_room():
    strict_free = InstanceState("s0", "decode", running=2, kv_usage=0.1)
    relaxed_busy = InstanceState("r0", "prefill", running=30, kv_usage=0.5,
                                 queued_prefill_tokens=1000)
    decision = make_policy("colocation").route(OFFLINE, view(relaxed_busy, strict_free))
    assert (decision.prefill_instance_id, decision.instance_id) == ("r0", "s0")
    assert decision.reason == "colocation_offline_strict"


@pytest.mark.parametrize("strict", [
    InstanceState("s0", "decode", running=130, offline_running=128, kv_usage=0.3),  # offline limit
    InstanceState("s0", "decode", running=3, waiting=1, offline_waiting=1),  # under an online peak
    InstanceState("s0", "decode", running=3, kv_usage=0.95),  # KV nearly full
])
def test_offline_decode_stays_on_its_relaxed_instance_when_the_strict_pool_has_no_room(strict):
    relaxed = InstanceState("r0", "prefill", running=30, kv_usage=0.5)
    decision = make_policy("colocation").route(OFFLINE, view(relaxed, strict))
    assert decision.instance_id == "r0" and decision.prefill_instance_id is None
    assert decision.reason == "colocation_offline_relaxed"


def test_offline_overflows_whole_onto_a_strict_instance_when_relaxed_prefill_queues_are_long():
    policy = ColocationPolicy(ColocationSettings(overflow_prefill_tokens=10_000))
    relaxed = InstanceState("r0", "prefill", queued_prefill_tokens=20_000, running=10)
    strict = InstanceState("s0", "decode", running=4)
    decision = policy.route(OFFLINE, view(relaxed, strict))
    assert decision.instance_id == "s0" and decision.prefill_instance_id is None
    assert decision.reason == "colocation_offline_overflow"
    off = ColocationPolicy(ColocationSettings(overflow_prefill_tokens=None))
    assert off.route(OFFLINE, view(relaxed, strict)).prefill_instance_id == "r0"


def test_idle_relaxed_instances_take_offline_work_from_strict_instances_under_pressure():
    cluster = view(
        InstanceState("r0", "prefill", running=2, offline_running=2, kv_usage=0.2),  # idle
        InstanceState("r1", "prefill", running=3, offline_running=2, kv_usage=0.2),  # 1 online
        InstanceState("s0", "decode", running=60, waiting=5, offline_running=50,
                      offline_waiting=5, kv_usage=0.6),
        InstanceState("s1", "decode", running=100, offline_running=90, kv_usage=0.95),
        InstanceState("s2", "decode", running=10, offline_running=9, kv_usage=0.3),  # no pressure
    )
    moves = make_policy("colocation").migrations(cluster)
    assert len(moves) == 1  # one idle relaxed instance
    (move,) = moves
    assert (move.from_instance_id, move.to_instance_id) == ("s1", "r0")  # most to shed
    assert move.count == 16 and move.reason == "strict_kv_pressure"


def test_no_migration_without_an_idle_relaxed_instance_or_without_pressure():
    busy = view(InstanceState("r0", "prefill", running=1),
                InstanceState("s0", "decode", offline_waiting=3, waiting=3))
    assert make_policy("colocation").migrations(busy) == ()
    calm = view(InstanceState("r0", "prefill"), InstanceState("s0", "decode", running=4,
                                                               offline_running=4))
    assert make_policy("colocation").migrations(calm) == ()


def test_without_both_pools_it_routes_aggregated_and_fails_cleanly_with_none():
    both = view(InstanceState("b0", running=9, offline_running=8),
                InstanceState("b1", running=3))
    policy = make_policy("colocation")
    assert policy.route(ONLINE, both).instance_id == "b0"  # 1 online request vs 3
    assert policy.route(OFFLINE, both).instance_id == "b1"  # least total load
    with pytest.raises(NoInstanceAvailable):
        policy.route(ONLINE, view(InstanceState("b0", healthy=False)))


def test_online_load_and_online_prompt_tokens_leave_out_the_offline_share():
    state = InstanceState("s0", "decode", running=10, waiting=4, offline_running=7,
                          offline_waiting=3, queued_prefill_tokens=5000,
                          offline_queued_prefill_tokens=4200)
    assert state.load == 14
    assert state.online_load == 4
    assert state.online_queued_prefill_tokens == 800


def test_overflow_picks_the_strict_instance_with_least_offline_prefill_and_respects_its_limit():
    policy = ColocationPolicy(ColocationSettings(overflow_prefill_tokens=10_000))
    relaxed = InstanceState("r0", "prefill", queued_prefill_tokens=30_000)
    full = InstanceState("s0", "decode", running=1, queued_prefill_tokens=12_000,
                         offline_queued_prefill_tokens=12_000)
    light = InstanceState("s1", "decode", running=6, queued_prefill_tokens=3_000,
                          offline_queued_prefill_tokens=3_000)
    assert policy.route(OFFLINE, view(relaxed, full, light)).instance_id == "s1"
    # Every strict instance already holds more offline prompt than the limit: back to the pools.
    decision = policy.route(OFFLINE, view(relaxed, full))
    assert (decision.instance_id, decision.reason) == ("r0", "colocation_offline_relaxed")


def test_online_requests_never_overflow_and_ignore_the_offline_limits():
    policy = ColocationPolicy(ColocationSettings(overflow_prefill_tokens=10))
    relaxed = InstanceState("r0", "prefill", queued_prefill_tokens=50_000)
    strict = InstanceState("s0", "decode", running=300, offline_running=290, kv_usage=0.97,
                           offline_waiting=4, waiting=4)
    decision = policy.route(ONLINE, view(relaxed, strict))
    assert (decision.prefill_instance_id, decision.instance_id) == ("r0", "s0")


def test_migrations_spread_over_idle_relaxed_instances_in_batches():
    policy = ColocationPolicy(ColocationSettings(migrate_batch=4))
    cluster = view(
        InstanceState("r0", "prefill", running=1, offline_running=1, kv_usage=0.1),
        InstanceState("r1", "prefill", running=5, offline_running=5, kv_usage=0.3),
        InstanceState("r2", "prefill", offline_running=0, kv_usage=0.8),  # KV too full to take
        InstanceState("r3", "prefill", healthy=False),
        InstanceState("s0", "decode", running=20, waiting=6, offline_running=12,
                      offline_waiting=6, kv_usage=0.5),
    )
    moves = policy.migrations(cluster)
    assert [(m.from_instance_id, m.to_instance_id, m.count) for m in moves] == [
        ("s0", "r0", 4), ("s0", "r1", 2)]  # least loaded relaxed first; 6 waiting in all
    assert {m.reason for m in moves} == {"offline_waiting_on_strict"}


def test_online_work_waiting_on_a_strict_instance_is_not_pressure_to_migrate():
    cluster = view(InstanceState("r0", "prefill"),
                   InstanceState("s0", "decode", running=30, waiting=8, kv_usage=0.5,
                                 offline_running=20))
    assert make_policy("colocation").migrations(cluster) == ()
