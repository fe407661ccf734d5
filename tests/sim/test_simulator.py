"""The simulator on hand-made cases whose answer is known in advance."""

from __future__ import annotations

import pytest

from router.policies import (
    ClusterView,
    RequestInfo,
    RequestOutcome,
    RoleChange,
    RoutingDecision,
    make_policy,
)
from router.sim import SimConfig, simulate
from router.sim.workload import RequestSpec, Workload
from tests.sim.conftest import tiny_deployment


def ms(x: float) -> float:
    return round(x, 6)


def one(prompt: int, output: int, at: float = 0.0, rid: str = "r0", hashes=()) -> RequestSpec:
    return RequestSpec(rid, at, prompt, output, prefix_hashes=tuple(hashes))


def run(requests, policy="round_robin", n=1, **config):
    dep = config.pop("deployment", None) or tiny_deployment()
    wl = Workload("hand", list(requests), hash_block_tokens=config.pop("hash_block_tokens", 0))
    return simulate(wl, make_policy(policy) if isinstance(policy, str) else policy,
                    SimConfig(dep, n, **config))


def test_single_request_ttft_is_its_prefill_step_and_tpot_its_decode_step():
    result = run([one(prompt=100, output=3)])
    (rec,) = result.records
    assert ms(rec.ttft_ms) == ms(10 + 0.1 * 100)  # one prefill step
    assert ms(rec.tpot_ms) == ms(10 + 1.0)  # one decode sequence per step
    assert result.summary["slo_attainment"] == 1.0


def test_long_prompt_is_chunked_by_the_token_budget():
    result = run([one(prompt=1000, output=1)])  # budget 512: two chunks of 512 + 488
    assert ms(result.records[0].ttft_ms) == ms((10 + 51.2) + (10 + 48.8))


def test_second_request_queues_behind_a_full_budget_step():
    dep = tiny_deployment(max_num_batched_tokens=100)
    result = run([one(100, 1, rid="a"), one(100, 1, rid="b")], deployment=dep)
    ttft = {r.request_id: r.ttft_ms for r in result.records}
    assert ms(ttft["a"]) == ms(20.0)
    assert ms(ttft["b"]) == ms(40.0)  # waited for a's step, then its own


def test_decodes_go_first_and_prefill_gets_the_rest_of_the_budget():
    dep = tiny_deployment(max_num_batched_tokens=100)
    # a decodes from t=20 ms; b arrives at 25 ms and prefills 99 tokens beside a's decode.
    result = run([one(100, 5, rid="a"), one(150, 1, at=0.025, rid="b")], deployment=dep)
    ttft = {r.request_id: r.ttft_ms for r in result.records}
    # step 20-31 (a decode), step 31-51.9 (a + 99 of b), step 51.9-.. (a + 51 of b)
    assert ms(ttft["b"]) == ms((0.031 + 0.0209 + 0.0161 - 0.025) * 1e3)


def test_shared_prefix_is_reused_and_evicted_under_pressure():
    # 8 blocks of 16 tokens; a prompt of 64 tokens needs 4 blocks (+1 for decoding).
    dep = tiny_deployment(num_kv_blocks=8)
    reqs = [one(64, 1, at=0.0, rid="a", hashes=[1, 2, 3, 4]),
            one(64, 1, at=1.0, rid="b", hashes=[1, 2, 3, 4]),   # hit: 3 full blocks reused
            one(96, 1, at=2.0, rid="c", hashes=[9, 8, 7, 6, 5, 4]),  # needs 6 blocks: evicts
            one(64, 1, at=3.0, rid="d", hashes=[1, 2, 3, 4])]   # a's prefix partly gone
    result = run(reqs, hash_block_tokens=16, deployment=dep)
    cached = {r.request_id: r.cached_prompt_tokens for r in result.records}
    assert cached["a"] == 0
    assert cached["b"] == 48  # the last prompt token is always recomputed, as in vLLM
    assert cached["c"] == 0
    assert cached["d"] < 48
    assert result.instances["i0"]["evictions"] >= 4


def test_kv_pressure_preempts_and_every_request_still_finishes():
    dep = tiny_deployment(num_kv_blocks=12)  # 4 requests of 40 + 40 tokens need 20 blocks
    reqs = [one(40, 40, rid=f"r{k}") for k in range(4)]
    result = run(reqs, deployment=dep)
    assert result.summary["preemptions"] > 0
    assert result.summary["finished"] == 4


def test_a_request_longer_than_max_model_len_fails_like_vllm():
    result = run([one(90, 20)], deployment=tiny_deployment(max_model_len=100))
    assert result.summary["failed"] == 1 and result.summary["slo_attainment"] == 0.0


class SpyPolicy:
    """Sends everything to i1, asks once to make i0 a prefill instance, records feedback."""

    name = "spy"

    def __init__(self) -> None:
        self.routed: list[str] = []
        self.views: list[ClusterView] = []
        self.outcomes: list[RequestOutcome] = []

    def route(self, request: RequestInfo, view: ClusterView) -> RoutingDecision:
        self.routed.append(request.request_id)
        self.views.append(view)
        changes = (RoleChange("i0", "prefill", "test"),) if len(self.routed) == 1 else ()
        return RoutingDecision("i1", reason="spy", role_changes=changes)

    def observe(self, outcome: RequestOutcome) -> None:
        self.outcomes.append(outcome)


def test_the_plugged_in_policy_decides_and_hears_every_outcome():
    spy = SpyPolicy()
    reqs = [one(50, 4, at=k * 0.001, rid=f"r{k}") for k in range(5)]
    result = run(reqs, policy=spy, n=2)
    assert spy.routed == [f"r{k}" for k in range(5)]
    assert {r.instance_id for r in result.records} == {"i1"}
    assert sorted(o.request_id for o in spy.outcomes) == spy.routed
    assert result.summary["role_switches"] == 1 and result.role_changes[0][1:4] == ("i0", "both",
                                                                                    "prefill")
    # The view shows the driver's in-flight accounting: r1 sees r0 on i1.
    second = {s.instance_id: s for s in spy.views[1].instances}
    assert second["i1"].inflight == 1 and second["i1"].inflight_prompt_tokens == 50


def test_static_pd_prefills_on_one_instance_and_pays_the_kv_transfer():
    result = run([one(100, 3)], policy="static_pd", n=2)
    (rec,) = result.records
    assert (rec.prefill_instance_id, rec.instance_id) == ("i0", "i1")
    transfer_ms = 5.0 + 100 * 1000.0 / 1e6 * 1e3
    # P prefills 100 tokens, KV moves, D computes the last prompt token (1 prefill token).
    assert ms(rec.ttft_ms) == ms(20.0 + transfer_ms + 10.1)
    assert result.instances["i0"]["role"] == "prefill"


class FlipOnTick:
    name = "flip"

    def __init__(self) -> None:
        self.ticks = 0

    def route(self, request, view):
        return RoutingDecision("i0")

    def rebalance(self, view):
        self.ticks += 1
        return (RoleChange("i1", "decode" if self.ticks % 2 else "prefill", "tick"),)


def test_rebalance_hook_runs_periodically_and_switches_are_counted():
    policy = FlipOnTick()
    reqs = [one(50, 2, at=k * 0.5, rid=f"r{k}") for k in range(5)]
    result = run(reqs, policy=policy, n=2, rebalance_interval_s=0.5)
    assert policy.ticks >= 4
    assert result.summary["role_switches"] == policy.ticks


@pytest.mark.parametrize("policy", ["round_robin", "least_load", "static_pd"])
def test_same_workload_and_seed_give_identical_results(policy):
    from router.sim.workload import synthetic

    lengths = [(200, 20), (800, 5), (50, 100)]
    a = run(synthetic(lengths, rate=20, n=300, cv=3, seed=7).requests, policy=policy, n=4)
    b = run(synthetic(lengths, rate=20, n=300, cv=3, seed=7).requests, policy=policy, n=4)
    assert a.summary == b.summary
    assert [r.ttft_ms for r in a.records] == [r.ttft_ms for r in b.records]


def test_kv_block_accounting_adds_up_during_a_busy_run(monkeypatch):
    from router.sim.cluster import Cluster
    from router.sim.instance import SimInstance

    dep = tiny_deployment(num_kv_blocks=40)
    reqs = [one(64 + 16 * (k % 3), 10, at=k * 0.003, rid=f"r{k}", hashes=[k % 4, 10 + k % 2, 20 + k,
                                                                            30 + k, 40 + k])
            for k in range(30)]
    cluster = Cluster(Workload("hand", reqs, hash_block_tokens=16), make_policy("round_robin"),
                      SimConfig(dep, 2))
    inst = list(cluster.instances.values())
    original = SimInstance._end_step
    checks = []

    def checked(self, payload):
        original(self, payload)
        for i in inst:
            i.kv.check_invariant([*i.running, *i.waiting])
        checks.append(1)

    monkeypatch.setattr(SimInstance, "_end_step", checked)
    result = cluster.run()
    assert result.summary["finished"] == 30
    assert len(checks) > 30
    assert result.summary["prefix_hit_ratio"] > 0


def test_prefix_hits_in_the_view_come_from_the_routers_prefix_index():
    spy = SpyPolicy()
    reqs = [one(64, 1, at=0.0, rid="a", hashes=[1, 2, 3, 4]),
            one(64, 1, at=1.0, rid="b", hashes=[1, 2, 3, 4])]
    run(reqs, policy=spy, n=2, hash_block_tokens=16)
    assert spy.views[0].prefix_hits == {}
    assert spy.views[1].prefix_hits == {"i1": 4}  # a's four full blocks, as stored events


def test_kv_aware_policy_drops_in_and_finds_the_cached_prefix():
    reqs = [one(640, 1, at=k * 1.0, rid=f"r{k}", hashes=list(range(40))) for k in range(6)]
    result = run(reqs, policy="kv_aware", n=3, hash_block_tokens=16)
    assert len({r.instance_id for r in result.records}) == 1
    assert result.summary["prefix_hit_ratio"] > 0.8
