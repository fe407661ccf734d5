"""GPU-measured costs in the simulator: the least-squares fit, the saved cost file, and the
deployment built from it (``benchmarks/epd_gpu_costs.py`` produces the file on a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.sim.encoder import (
    QWEN2_VL_VIT,
    FittedEncoder,
    MeasuredCosts,
    RooflineEncoder,
    attended_pairs,
    fit_linear_quadratic,
    qwen2_vl_deployment,
)
from router.sim.perf_model import RooflineStepModel
from router.sim.roofline import GPUS, roofline_deployment


def test_attended_pairs_full_and_causal() -> None:
    assert attended_pairs([4, 2], causal=False) == 16 + 4
    assert attended_pairs([4, 2], causal=True) == 10 + 3


def test_fit_recovers_known_coefficients() -> None:
    truth = (6.0, 0.003, 5e-7)
    samples = [([p] * n, truth[0] + truth[1] * p * n + truth[2] * attended_pairs([p] * n, False))
               for p in (256, 1024, 4096) for n in (1, 2, 8)]
    fitted = fit_linear_quadratic(samples)
    assert fitted == pytest.approx(truth, rel=1e-6)


def test_fit_drops_a_negative_term_instead_of_predicting_less_for_more_work() -> None:
    # Pure per-token cost plus noise that would push the quadratic term below zero.
    samples = [([64], 10.0), ([128], 19.0), ([256], 41.0), ([512], 75.0)]
    intercept, per_token, per_pair = fit_linear_quadratic(samples, causal=True)
    assert per_pair == 0.0 and per_token > 0 and intercept >= 0


def test_fitted_encoder_prices_images_by_patches_and_pairs() -> None:
    enc = FittedEncoder(QWEN2_VL_VIT, intercept_ms=5.0, ms_per_patch=0.003, ms_per_pair=5e-7)
    patches = 100 * QWEN2_VL_VIT.patches_per_token
    assert enc.compute_s([]) == 0.0
    assert enc.compute_s([100]) == pytest.approx((5.0 + 0.003 * patches + 5e-7 * patches ** 2) / 1e3)
    # Two images cost less than one image of both sizes together (attention is per image).
    assert enc.compute_s([100, 100]) < enc.compute_s([200])
    assert enc.batch_s(3, 100) == enc.compute_s([100, 100, 100])


def test_attention_efficiency_only_changes_the_attention_share() -> None:
    base = roofline_deployment("qwen2-7b", "h200").step_model
    same = roofline_deployment("qwen2-7b", "h200", attn_mfu=base.mfu).step_model
    slow_attn = roofline_deployment("qwen2-7b", "h200", attn_mfu=base.mfu / 2).step_model
    assert isinstance(base, RooflineStepModel)
    no_attn = (4096, 0.0, 0, 0)
    long_prompt = (4096, 4096 * 2048.0, 0, 0)
    assert same.step_s(*long_prompt) == base.step_s(*long_prompt)
    assert slow_attn.step_s(*no_attn) == base.step_s(*no_attn)
    assert slow_attn.step_s(*long_prompt) > base.step_s(*long_prompt)


def test_measured_deployment_uses_the_saved_costs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(MeasuredCosts, "path", staticmethod(lambda gpu: tmp_path / f"{gpu}.json"))
    encoder = FittedEncoder(QWEN2_VL_VIT, 4.0, 0.002, 4e-7)
    MeasuredCosts("h200", encoder, llm_mfu=0.7, llm_attn_mfu=0.45, source="test").save()
    mm = qwen2_vl_deployment("h200", measured=True)
    assert mm.encoder == encoder
    assert mm.llm.step_model.mfu == 0.7 and mm.llm.step_model.attn_mfu == 0.45
    assert "measured" in mm.name
    roofline = qwen2_vl_deployment("h200")
    assert isinstance(roofline.encoder, RooflineEncoder)
    assert roofline.encoder.peak_flops == GPUS["h200"].bf16_flops
    with pytest.raises(FileNotFoundError, match="epd_gpu_costs.py --gpu h100"):
        qwen2_vl_deployment("h100", measured=True)


def test_a_cost_file_for_another_encoder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(MeasuredCosts, "path", staticmethod(lambda gpu: tmp_path / f"{gpu}.json"))
    MeasuredCosts("h200", FittedEncoder(QWEN2_VL_VIT, 1.0, 0.001, 0.0), 0.5, 0.5, "test").save()
    data = json.loads((tmp_path / "h200.json").read_text())
    data["encoder"]["name"] = "SigLIP (400M)"
    (tmp_path / "h200.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="SigLIP"):
        MeasuredCosts.load("h200")


def test_the_committed_h200_costs_load_and_are_plausible() -> None:
    costs = MeasuredCosts.load("h200")
    # Within a factor of two of the roofline's assumed 50% of peak, and below peak.
    assert 0.25 < costs.llm_mfu < 1.0 and 0.1 < costs.llm_attn_mfu < 1.0
    one_image = costs.encoder.compute_s([1200])
    roofline = RooflineEncoder(QWEN2_VL_VIT, GPUS["h200"].bf16_flops).compute_s([1200])
    assert roofline / 2 < one_image < roofline * 3


def test_gpu_cost_benchmark_runs_its_models_and_fit_on_a_cpu() -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "benchmarks/epd_gpu_costs.py", "--smoke"], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert result["runs"] == 1 and result["device"] == "cpu (smoke)"
    assert result["vit_ms_per_kilo_patch"] > 0 and result["llm_prefill_ms_per_kilo_token"] > 0
    assert result["vit_ms_b2_t64"] > result["vit_ms_b1_t16"]


def test_committed_fit_follows_from_the_committed_timings() -> None:
    import sys

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "benchmarks"))
    from epd_gpu_costs import analyse

    results = root / "benchmarks" / "results"
    runs = [json.loads(p.read_text()) for p in sorted(results.glob("epd_gpu_costs_raw*.json"))]
    result, encoder = analyse(runs, "h200")
    committed = json.loads((results / "epd_gpu_costs.json").read_text())
    assert result["runs"] == committed["runs"] == len(runs)
    for key in ("vit_mfu_equiv", "llm_prefill_mfu_equiv", "llm_prefill_attn_mfu_equiv", "vit_1200tok_image_ms"):
        assert result[key] == committed[key]
    saved = MeasuredCosts.load("h200")
    # The fit is a least-squares solve: its last digits follow the host's BLAS (an AMX Xeon
    # and an AMD EPYC differ around the 13th), so the fitted terms agree to 1e-9.
    assert saved.encoder.spec == encoder.spec
    assert saved.encoder.overhead_ms == encoder.overhead_ms
    for term in ("intercept_ms", "ms_per_patch", "ms_per_pair"):
        assert getattr(saved.encoder, term) == pytest.approx(getattr(encoder, term), rel=1e-9)
    assert (saved.llm_mfu, saved.llm_attn_mfu) == (result["llm_prefill_mfu_equiv"],
                                                    result["llm_prefill_attn_mfu_equiv"])
