"""Host contention: instances sharing a CPU host slow each other's prefills (measured by
benchmarks/sim_profile.py); off for GPU deployments (one device per instance)."""

from __future__ import annotations

from router.policies import make_policy
from router.sim import SimConfig, simulate
from router.sim.workload import RequestSpec, Workload
from tests.sim.conftest import tiny_deployment


def _two_prefills(**dep_fields) -> list[float]:
    """Two 100-token prompts at t=0 on two instances (round-robin): both prefill at once."""
    reqs = [RequestSpec("a", 0.0, 100, 1), RequestSpec("b", 0.0, 100, 1)]
    result = simulate(Workload("hand", reqs), make_policy("round_robin"),
                      SimConfig(tiny_deployment(**dep_fields), 2))
    return sorted(round(r.ttft_ms, 6) for r in result.records)


def test_prefill_beside_a_busy_neighbour_on_the_same_host_takes_longer():
    alone = _two_prefills()
    shared = _two_prefills(host_instances=2, neighbour_prefill_slowdown=0.5)
    assert alone == [20.0, 20.0]  # 10 ms base + 100 x 0.1 ms
    # The second instance starts while the first is stepping: its prefill part (10 ms)
    # is 50% slower; the base cost is not.
    assert shared == [20.0, 25.0]


def test_instances_on_different_hosts_do_not_slow_each_other():
    assert _two_prefills(host_instances=1, neighbour_prefill_slowdown=0.5) == [20.0, 20.0]
