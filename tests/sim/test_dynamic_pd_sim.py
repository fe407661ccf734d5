"""Dynamic PD in the simulator: roles follow a prefill-heavy burst and come back.

Hand-made deployment (tests/sim/conftest.py): a step costs 10 ms + 0.1 ms per prefill
token + 1 ms per decoding sequence; 4 instances start as 2 prefill + 2 decode.
"""

from __future__ import annotations

from router.policies import make_policy
from router.sim import SimConfig, simulate
from router.sim.metrics import SLO
from router.sim.workload import RequestSpec, Workload
from tests.sim.conftest import tiny_deployment


def burst_then_calm() -> Workload:
    """20 s of long prompts at 12 req/s (about 2.6 s of prefill per second: more than two
    instances, less than three), then 60 s of a trickle."""
    reqs = [RequestSpec(f"b{k}", k / 12, 2000, 4) for k in range(240)]
    reqs += [RequestSpec(f"c{k}", 20.0 + k * 1.0, 200, 4) for k in range(60)]
    return Workload("burst", reqs)


def run(policy: str):
    dep = tiny_deployment(max_num_batched_tokens=2048, num_kv_blocks=100_000,
                          transfer_bytes_per_s=1e9)
    config = SimConfig(dep, 4, roles=["prefill", "prefill", "decode", "decode"],
                       slo=SLO(ttft_ms=1500.0, tpot_ms=100.0))
    return simulate(burst_then_calm(), make_policy(policy), config)


def test_prefill_burst_moves_decode_instances_to_prefill_and_back():
    static, dynamic = run("static_pd"), run("dynamic_pd")
    switches = dynamic.role_changes
    to_prefill = [s for s in switches if s[3] in ("prefill", "both") and s[4] == "ttft_slo"]
    restores = [s for s in switches if s[4] == "restore"]
    assert to_prefill and all(t < 20.0 for t, *_ in to_prefill)  # during the burst
    assert restores and all(t > 20.0 for t, *_ in restores)  # after it
    # Every instance ends in its home role; at no time was a role left empty.
    assert [v["role"] for v in dynamic.instances.values()] == ["prefill", "prefill", "decode",
                                                                "decode"]
    roles = {"i0": "prefill", "i1": "prefill", "i2": "decode", "i3": "decode"}
    for _, iid, _, new, _ in switches:
        roles[iid] = new
        assert any(r in ("prefill", "both") for r in roles.values())
        assert any(r in ("decode", "both") for r in roles.values())
    # Hysteresis: no instance switches more than out and back.
    assert len(switches) <= 2 * 4
    assert dynamic.summary["ttft_attainment"] > static.summary["ttft_attainment"] + 0.1
    assert dynamic.summary["role_switches"] == len(switches)
