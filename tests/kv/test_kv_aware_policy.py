"""KVAwarePolicy follows the rule in its module docstring, on hand-made cluster views."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.policies import POLICY_FACTORIES, make_policy
from router.policies.kv_aware import KVAwarePolicy, KVAwareSettings, is_imbalanced, kv_score
from router.policies.types import ClusterView, InstanceState, NoInstanceAvailable, RequestInfo

BLOCKS = (101, 102, 103, 104)
NO_PREDICT = KVAwareSettings(predict_ttl_s=0)


def req(blocks=BLOCKS, rid="r"):
    return RequestInfo(request_id=rid, prompt_tokens=len(blocks) * 32, max_tokens=16, block_hashes=blocks)


def view(loads, hits=None, now=0.0, **extra):
    instances = tuple(InstanceState(instance_id=name, running=load, **extra.get(name, {}))
                      for name, load in loads.items())
    return ClusterView(instances=instances, now=now, prefix_hits=hits or {})


def test_registered_as_kv_aware():
    assert "kv_aware" in POLICY_FACTORIES and isinstance(make_policy("kv_aware"), KVAwarePolicy)


def test_repeated_prefix_goes_to_the_instance_that_holds_it_despite_slightly_more_load():
    decision = KVAwarePolicy(NO_PREDICT).route(req(), view({"a": 0, "b": 2}, hits={"b": 4}))
    assert decision.instance_id == "b" and decision.reason == "kv_aware_hit"


def test_longer_cached_prefix_wins_at_equal_load():
    decision = KVAwarePolicy(NO_PREDICT).route(req(), view({"a": 1, "b": 1}, hits={"a": 1, "b": 3}))
    assert decision.instance_id == "b"


def test_no_hits_anywhere_is_least_load():
    decision = KVAwarePolicy(NO_PREDICT).route(req(), view({"a": 3, "b": 1, "c": 2}))
    assert decision.instance_id == "b" and decision.reason == "kv_aware_load"


def test_imbalance_guard_stops_a_shared_prompt_piling_onto_one_instance():
    """Everything hits on "a", but a is 5 requests ahead: > abs 4 and > 1.5x -> least load."""
    decision = KVAwarePolicy(NO_PREDICT).route(req(), view({"a": 6, "b": 1}, hits={"a": 4}))
    assert decision.instance_id == "b" and decision.reason == "kv_aware_balance"
    # Same gap but relatively small (26 vs 21): the guard stays off and the hit wins.
    decision = KVAwarePolicy(NO_PREDICT).route(req(), view({"a": 26, "b": 21}, hits={"a": 4}))
    assert decision.instance_id == "a"


def test_partial_hit_loses_to_a_much_lighter_instance():
    """score a = 1/4 - 0.5 * 4/4 = -0.25 ; score b = 0 - 0.5 * 1/4 = -0.125 -> b."""
    decision = KVAwarePolicy(NO_PREDICT).route(req(), view({"a": 4, "b": 1}, hits={"a": 1}))
    assert decision.instance_id == "b"


def test_thresholds_are_settings():
    strict = KVAwareSettings(balance_abs_threshold=1, balance_rel_threshold=1.0, predict_ttl_s=0)
    assert KVAwarePolicy(strict).route(req(), view({"a": 2, "b": 0}, hits={"a": 4})).instance_id == "b"
    load_blind = KVAwareSettings(load_weight=0.0, balance_abs_threshold=100, predict_ttl_s=0)
    assert KVAwarePolicy(load_blind).route(req(), view({"a": 50, "b": 0}, hits={"a": 1})).instance_id == "a"
    with pytest.raises(ValueError):
        KVAwareSettings(balance_rel_threshold=0.5)


def test_unhealthy_and_prefill_only_instances_are_never_chosen():
    instances = (InstanceState("a", healthy=False), InstanceState("p", role="prefill"),
                 InstanceState("b", running=3))
    decision = KVAwarePolicy(NO_PREDICT).route(
        req(), ClusterView(instances=instances, prefix_hits={"a": 4, "p": 4}))
    assert decision.instance_id == "b"
    with pytest.raises(NoInstanceAvailable):
        KVAwarePolicy().route(req(), ClusterView(instances=(InstanceState("a", healthy=False),)))


def test_a_burst_sharing_a_new_prefix_stays_together_before_any_kv_event_arrives():
    policy = KVAwarePolicy()
    first = policy.route(req(rid="1"), view({"a": 0, "b": 0}, now=1.0))
    # The router's in-flight count makes the chosen one busier; the prediction keeps affinity.
    second = policy.route(req(rid="2"), view({"a": 1, "b": 0} if first.instance_id == "a"
                                            else {"a": 0, "b": 1}, now=1.5))
    assert second.instance_id == first.instance_id and second.reason == "kv_aware_hit"
    # After the TTL the prediction is gone and, with no confirmed hit, load decides.
    late = policy.route(req(rid="3"), view({"a": 1, "b": 1}, now=1.0 + 11.0))
    assert late.reason == "kv_aware_load"


@settings(max_examples=300, deadline=None)
@given(loads=st.lists(st.integers(0, 20), min_size=1, max_size=5),
       hit_list=st.lists(st.integers(0, 4), min_size=5, max_size=5))
def test_choice_always_maximises_the_documented_score(loads, hit_list):
    names = [f"i{k}" for k in range(len(loads))]
    hits = {n: h for n, h in zip(names, hit_list) if h}
    s = NO_PREDICT
    v = view(dict(zip(names, loads)), hits=hits)
    choice = KVAwarePolicy(s).route(req(), v).instance_id
    if is_imbalanced(loads, s):
        assert loads[names.index(choice)] == min(loads)
    else:
        scores = {n: kv_score(hits.get(n, 0), len(BLOCKS), ld, max(loads), s) for n, ld in zip(names, loads)}
        assert scores[choice] == max(scores.values())
