"""EPD disaggregation in the simulator (router/sim/epd.py): stages, pools, handoffs, goodput."""

from __future__ import annotations

from router.policies.epd import EPDConfig, EPDProfiler
from router.sim.encoder import MMDeployment, RooflineEncoder, VisionEncoderSpec
from router.sim.epd import max_goodput, simulate_epd, stage_costs, workload_summary
from router.sim.metrics import SLO
from router.sim.workload import RequestSpec, Workload
from tests.sim.conftest import tiny_deployment

# 1 image token = 1 patch, 0.1 ms of encoder compute per token, no attention term, 2 ms overhead
ENCODER = RooflineEncoder(VisionEncoderSpec("toy", 50e3, 0, 1, 1, 10), peak_flops=1e9, mfu=1.0,
                          overhead_ms=2.0)
SLO_LOOSE = SLO(10_000.0, 1_000.0)


def mm(**overrides: float) -> MMDeployment:
    return MMDeployment(tiny_deployment(**overrides), ENCODER)


def burst(n: int, image_tokens: int = 400, text: int = 50, output: int = 10,
          gap_s: float = 0.0, images: int = 1) -> Workload:
    return Workload("burst", [RequestSpec(f"r{k}", k * gap_s, text + image_tokens, output,
                                          image_tokens=image_tokens,
                                          image_count=images if image_tokens else 0)
                              for k in range(n)])


def test_encoder_roofline_numbers() -> None:
    assert ENCODER.compute_s([400]) == 0.04
    assert ENCODER.batch_s(3, 100) == ENCODER.compute_s([100, 100, 100])
    assert ENCODER.output_bytes(400) == 400 * 10 * 2


def test_stages_run_in_order_on_their_pools() -> None:
    config = EPDConfig("E-P-D", encode=1, prefill=2, decode=1)
    result = simulate_epd(burst(6, gap_s=0.01), config, mm(), SLO_LOOSE)
    assert len(result.requests) == 6 and all(r.ok for r in result.requests)
    for r in result.requests:
        assert r.spec.arrival_s <= r.encode_start_s < r.encode_end_s <= r.prefill_start_s
        assert r.prefill_start_s < r.prefill_end_s < r.first_token_s <= r.finish_s
        assert (r.encoder_id[0], r.prefill_id[0], r.decode_id[0]) == ("e", "p", "d")
        assert r.generated == r.output
    assert result.summary["slo_attainment"] == 1.0
    assert result.summary["disaggregated"] == 6


def test_aggregated_runs_every_stage_on_one_instance_and_skips_encode_for_text() -> None:
    work = Workload("mix", [RequestSpec("img", 0.0, 450, 5, image_tokens=400, image_count=1),
                            RequestSpec("txt", 0.0, 50, 5)])
    result = simulate_epd(work, EPDConfig("none", encode=1), mm(), SLO_LOOSE)
    by_id = {r.spec.request_id: r for r in result.requests}
    img, txt = by_id["img"], by_id["txt"]
    assert img.encoder_id == img.prefill_id == img.decode_id == "epd0"
    assert txt.encode_start_s is None and txt.first_token_s is not None
    # the prefill step samples the first token when decode is local: TTFT = end of prefill
    assert img.first_token_s == img.prefill_end_s


def test_more_encoder_instances_cut_encode_queueing() -> None:
    work = burst(24, image_tokens=800)
    waits = [simulate_epd(work, EPDConfig("E-P-D", encode=e, prefill=2, decode=1), mm(),
                          SLO_LOOSE).summary["encode_wait_ms_mean"] for e in (1, 2, 4)]
    assert waits[0] > waits[1] > waits[2]


def test_kv_transfer_and_decode_first_token_count_in_ttft() -> None:
    dep = mm(transfer_bytes_per_s=1e5, kv_bytes_per_token=1000.0)  # 450 tokens -> 4.5 s of KV
    one = burst(1)
    apart = simulate_epd(one, EPDConfig("EP-D", encode=1, decode=1), dep, SLO_LOOSE).requests[0]
    together = simulate_epd(one, EPDConfig("none", encode=1), dep, SLO_LOOSE).requests[0]
    assert apart.first_token_s - apart.prefill_end_s > 4.5
    assert together.first_token_s == together.prefill_end_s


def test_encoding_beside_decodes_slows_them() -> None:
    """ED-P encodes on the decode instances, EP-D keeps them clean: the same traffic has a worse
    TPOT with ED-P when images are large."""
    work = burst(30, image_tokens=2000, output=40, gap_s=0.2)  # a 200 ms encode every 200 ms
    dep = mm(max_num_batched_tokens=4096, transfer_bytes_per_s=1e9)
    tpot = {}
    for config in (EPDConfig("EP-D", encode=2, decode=2), EPDConfig("ED-P", prefill=2, decode=2)):
        tpot[config.strategy] = simulate_epd(work, config, dep, SLO_LOOSE).summary["tpot_p50_ms"]
    assert tpot["EP-D"] < 12.0  # 10 ms base + 1 ms per decode sequence
    assert tpot["ED-P"] > 1.5 * tpot["EP-D"]


def test_phase_aware_encoder_batch_is_respected() -> None:
    config = EPDConfig("E-P-D", encode=1, prefill=1, decode=1, encode_batch=3, phase_aware=True)
    result = simulate_epd(burst(10), config, mm(), SLO_LOOSE)
    starts: dict[float, int] = {}
    for r in result.requests:
        starts[r.encode_start_s] = starts.get(r.encode_start_s, 0) + 1
    assert max(starts.values()) == 3


def test_goodput_falls_when_the_slo_tightens_and_the_profiler_runs_on_the_sim() -> None:
    work = burst(200, image_tokens=300, output=20, gap_s=0.05)
    config = EPDConfig("EP-D", encode=2, decode=1)
    loose = max_goodput(work, config, mm(), SLO(2000.0, 200.0))
    tight = max_goodput(work, config, mm(), SLO(600.0, 200.0))
    assert loose > tight > 0
    profiler = EPDProfiler(stage_costs(mm()), slo_ttft_s=2.0, slo_tpot_s=0.2, instances=3,
                           finalists=1)
    choice = profiler.choose(workload_summary(work), lambda c, est: max_goodput(
        work, c, mm(), SLO(2000.0, 200.0), start=max(est, 1.0)))
    assert choice.goodput == max(v for _, v in choice.measured) > 0
