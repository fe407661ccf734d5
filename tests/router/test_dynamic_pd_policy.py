"""Dynamic PD: the decision rule of router/policies/dynamic_pd.py on hand-made views.

Every instance is profiled as an engine whose isolated TTFT is ``10 ms + 1 ms/token``
and whose TPOT is 20 ms, so predicted times are easy to compute by hand:
a request of L tokens behind Q queued tokens is predicted at ``10 + L + Q`` ms.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from router.policies import (
    ClusterView,
    DynamicPDPolicy,
    InstanceState,
    ProfileSample,
    RequestInfo,
    RequestOutcome,
    RoleChange,
)

PROFILE = tuple(ProfileSample(p, 8, 10.0 + p, 20.0) for p in (64, 512, 1024, 2048))


def policy(**settings) -> DynamicPDPolicy:
    p = DynamicPDPolicy(**settings)
    for iid in ("p0", "p1", "d0", "d1"):
        p.observe_profile(iid, PROFILE)
    return p


def req(rid: str = "r", prompt: int = 100, out: int = 20, ttft: float | None = 1000.0,
        tpot: float | None = 100.0) -> RequestInfo:
    return RequestInfo(rid, prompt, out, slo_ttft_ms=ttft, slo_tpot_ms=tpot)


def view(*instances: InstanceState, now: float = 100.0) -> ClusterView:
    return ClusterView(instances=instances, now=now)


def P(iid: str, **kw) -> InstanceState:
    return InstanceState(iid, role=kw.pop("role", "prefill"), **kw)


def D(iid: str, **kw) -> InstanceState:
    return InstanceState(iid, role=kw.pop("role", "decode"), **kw)


def test_profile_fits_the_predictor_exactly():
    p = policy()
    assert p.predicted_ttft_ms("p0", 100) == pytest.approx(110.0, abs=0.5)
    assert p.predicted_ttft_ms("p0", 100, queued_tokens=400) == pytest.approx(510.0, abs=1.0)


def test_prefill_goes_to_least_predicted_ttft_and_decode_to_fewest_running_tokens():
    d = policy().route(req(), view(P("p0", queued_prefill_tokens=500),
                                   P("p1", queued_prefill_tokens=100, running=3),
                                   D("d0", running_tokens=5000, running=4),
                                   D("d1", running_tokens=1000, running=6)))
    assert (d.prefill_instance_id, d.instance_id, d.reason) == ("p1", "d1", "dpd")
    assert d.role_changes == ()


def test_ttft_miss_converts_the_lightest_decode_instance_then_uses_it_as_d2p():
    p = policy()
    # 10 + 100 + 5000 ms predicted on p0 > 0.8 x 1000 ms: no prefill instance meets the SLO.
    d = p.route(req("a"), view(P("p0", queued_prefill_tokens=5000), D("d0", running=5),
                               D("d1", running=1), now=100.0))
    assert d.role_changes == (RoleChange("d1", "prefill", "ttft_slo"),)
    assert (d.prefill_instance_id, d.instance_id, d.reason) == ("d1", "d0", "dpd_convert")
    # One second later d1 is still draining its decodes: used only because p0 still misses.
    d = p.route(req("b"), view(P("p0", queued_prefill_tokens=5000),
                               P("d1", queued_prefill_tokens=100), D("d0", running=5), now=101.0))
    assert (d.prefill_instance_id, d.reason, d.role_changes) == ("d1", "dpd_d2p", ())
    # While p0 meets the SLO, the P pool comes first.
    d = p.route(req("c"), view(P("p0"), P("d1"), D("d0", running=5), now=102.0))
    assert d.prefill_instance_id == "p0"


def test_the_last_decode_instance_becomes_both_only_while_it_decodes_little():
    overloaded = P("p0", queued_prefill_tokens=5000)
    d = policy().route(req(), view(overloaded, D("d0", running=2)))
    assert d.role_changes == (RoleChange("d0", "both", "ttft_slo"),)
    assert d.instance_id == "d0" and d.prefill_instance_id is None  # prefill and decode on d0
    d = policy().route(req(), view(overloaded, D("d0", running=10)))
    assert d.role_changes == () and d.reason == "dpd_ttft_at_risk"
    assert (d.prefill_instance_id, d.instance_id) == ("p0", "d0")


def test_no_conversion_when_even_an_idle_instance_would_miss_or_no_slo_is_set():
    p = policy()
    # 10 + 2000 ms on an idle instance > 800 ms: converting cannot help.
    d = p.route(req(prompt=2000), view(P("p0", queued_prefill_tokens=5000), D("d0"), D("d1")))
    assert d.role_changes == () and d.reason == "dpd_ttft_at_risk"
    d = p.route(req(ttft=None, tpot=None), view(P("p0", queued_prefill_tokens=50000), D("d0"),
                                                D("d1")))
    assert d.role_changes == () and d.reason == "dpd"


def test_a_full_decode_pool_takes_a_spare_prefill_instance():
    d = policy().route(req(), view(P("p0"), P("p1", queued_prefill_tokens=50),
                                   D("d0", kv_usage=0.95)))
    assert d.role_changes == (RoleChange("p1", "decode", "kv_full"),)
    assert (d.prefill_instance_id, d.instance_id) == ("p0", "p1")


def test_tpot_learned_online_triggers_p_to_d_when_decodes_get_slow():
    p = policy()
    # The decode instance slows down 3 ms per extra sequence; the policy learns it from outcomes.
    for k in range(60):
        rid = f"warm{k}"
        d = p.route(req(rid, tpot=None), view(P("p0"), P("p1"), D("d0", running=k % 30),
                                              now=float(k)))
        assert d.instance_id == "d0"
        p.observe(RequestOutcome(rid, "d0", "p0", 100, 0, 20, 150.0, 20.0 + 3.0 * (k % 30 + 1),
                                 0.0, 100.0, float(k)))
    d = p.route(req("slow", tpot=100.0), view(P("p0"), P("p1"), D("d0", running=40), now=100.0))
    assert d.role_changes == (RoleChange("p1", "decode", "tpot_slo"),)
    assert d.instance_id == "p1"


def test_role_returns_home_after_a_quiet_period_one_instance_at_a_time():
    p = policy(role_dwell_s=10.0, restore_quiet_s=30.0)
    hot = view(P("p0", queued_prefill_tokens=5000), D("d0", running=5), D("d1"), D("d2"),
               now=100.0)
    d = p.route(req("a"), hot)
    assert d.role_changes[0].instance_id == "d1"
    d = p.route(req("b"), replace(hot, instances=(*hot.instances[:2], P("d1"), D("d2")),
                                  now=100.5))
    assert d.prefill_instance_id == "d1"  # d1 drains; d2 need not convert
    calm = (P("p0"), D("d0"), P("d1"), D("d2"))
    assert p.rebalance(view(*calm, now=105.0)) == ()  # dwell time not over
    assert p.rebalance(view(*calm, now=125.0)) == ()  # pressure 25 s ago: not quiet yet
    assert p.rebalance(view(*calm, now=131.0)) == (RoleChange("d1", "decode", "restore"),)
    assert p.home_role("d1") == "decode"


def test_both_instance_keeps_the_decode_and_a_pure_prefill_instance_never_does_by_default():
    d = policy().route(req(), view(InstanceState("b0", role="both")))
    assert (d.instance_id, d.prefill_instance_id, d.reason) == ("b0", None, "dpd_local")
    d = policy().route(req(), view(P("p0"), D("d0")))
    assert (d.prefill_instance_id, d.instance_id) == ("p0", "d0")
    d = policy(local_decode=True).route(req(), view(P("p0"), D("d0")))
    assert (d.prefill_instance_id, d.instance_id, d.reason) == (None, "p0", "dpd_local")


def test_observed_prefill_times_refine_the_ttft_prediction():
    p = policy()
    before = p.predicted_ttft_ms("p0", 1000)
    for k in range(40):
        rid = f"r{k}"
        p.route(req(rid, prompt=1000), view(P("p0"), D("d0"), now=float(k)))
        p.observe(RequestOutcome(rid, "d0", "p0", 1000, 0, 20, 2100.0, 20.0, 0.0, 2020.0,
                                 float(k)))
    after = p.predicted_ttft_ms("p0", 1000)
    assert before == pytest.approx(1010, abs=5) and after > 1600
