"""Static PD: the decision rule in router/policies/static_pd.py on hand-made views."""

from __future__ import annotations

import pytest

from router.policies import ClusterView, InstanceState, NoInstanceAvailable, RequestInfo, make_policy

REQUEST = RequestInfo("r1", prompt_tokens=1000, max_tokens=20)


def view(*instances: InstanceState) -> ClusterView:
    return ClusterView(instances=instances)


def test_prefill_goes_to_shortest_prefill_queue_and_decode_to_least_loaded():
    policy = make_policy("static_pd")
    decision = policy.route(REQUEST, view(
        InstanceState("p0", role="prefill", queued_prefill_tokens=5000),
        InstanceState("p1", role="prefill", queued_prefill_tokens=100, running=3),
        InstanceState("d0", role="decode", running=4),
        InstanceState("d1", role="decode", running=2),
    ))
    assert (decision.prefill_instance_id, decision.instance_id) == ("p1", "d1")
    assert decision.reason == "static_pd"


def test_unhealthy_prefill_pool_falls_back_to_local_prefill_on_decode():
    decision = make_policy("static_pd").route(REQUEST, view(
        InstanceState("p0", role="prefill", healthy=False),
        InstanceState("d0", role="decode"),
    ))
    assert decision.prefill_instance_id is None and decision.instance_id == "d0"
    assert decision.reason == "static_pd_local"


def test_both_role_instance_winning_both_pools_runs_without_handoff():
    decision = make_policy("static_pd").route(REQUEST, view(InstanceState("b0", role="both")))
    assert decision.prefill_instance_id is None and decision.instance_id == "b0"


def test_no_decode_instance_is_an_error():
    with pytest.raises(NoInstanceAvailable):
        make_policy("static_pd").route(REQUEST, view(InstanceState("p0", role="prefill")))
