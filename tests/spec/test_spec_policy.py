"""The adaptive speculation controller's pure parts: acceptance, cost model, length rule."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest

from xllm_plugin.spec.acceptance import (
    BROKE_FIRST,
    BROKE_LATER,
    MATCHING,
    NO_PROPOSAL,
    AcceptanceEstimator,
    cumulative_gains,
    judge_proposal,
    proposal_context,
)
from xllm_plugin.spec.adaptive import AdaptiveSpeculation
from xllm_plugin.spec.cost import RowResiduals, StepShape, VerifyCostModel
from xllm_plugin.spec.policy import choose_lengths, probe_lengths
from xllm_plugin.spec.rate import OutputRate
from xllm_plugin.spec.step_log import StepLog, priced_ms, read_step_log, split_step_log


def test_judging_a_proposal_stops_at_the_first_wrong_draft() -> None:
    assert judge_proposal([5, 6, 7], [5, 6, 9], complete=False) == (2, 3)
    assert judge_proposal([5, 6, 7], [5, 6, 7, 8], complete=False) == (3, 3)
    assert judge_proposal([5, 6, 7], [5], complete=False) is None  # wait for more tokens
    assert judge_proposal([5, 6, 7], [5], complete=True) == (1, 1)  # request ended


def test_a_request_that_copies_gets_high_gains_and_one_that_does_not_gets_low_gains() -> None:
    estimator = AcceptanceEstimator(max_positions=4, window_steps=16, prior_weight=2.0)
    for _ in range(40):
        estimator.observe("copier", matched=4, judged=4)
        estimator.observe("chatter", matched=0, judged=1)
    copier, chatter = estimator.gains("copier"), estimator.gains("chatter")
    assert copier[3] > 0.9
    assert chatter[0] < 0.15
    assert all(a >= b for a, b in zip(copier, copier[1:]))  # worth falls with position


def test_a_new_request_starts_from_the_engine_wide_estimate() -> None:
    estimator = AcceptanceEstimator(max_positions=2)
    for _ in range(50):
        estimator.observe("old", matched=2, judged=2)
    assert estimator.gains("new")[0] > 0.9


def test_cumulative_gains_are_products_of_hazards() -> None:
    assert cumulative_gains([0.5, 0.5, 1.0]) == [0.5, 0.25, 0.25]


def test_cost_model_separates_request_cost_from_draft_cost() -> None:
    rng = random.Random(0)
    model = VerifyCostModel(window_steps=200)
    for _ in range(400):
        batch, k = rng.choice([1, 4, 16, 32]), rng.choice([0, 2, 4])
        prefill = rng.choice([0, 0, 0, 256])
        drafts = batch * k
        model.observe(StepShape(batch, drafts, prefill),
                      20 + 2 * batch + 0.3 * drafts + 0.5 * prefill + 2 * (k > 0)
                      + rng.gauss(0, 0.5))
    # A draft row is far cheaper than a request: charging drafts the request cost would
    # switch speculation off at large batches where it still pays.
    assert model.per_draft_token_ms == pytest.approx(0.3, abs=0.1)
    assert model.predict_ms(StepShape(4)) == pytest.approx(28.0, rel=0.1)


def test_cost_model_is_optimistic_when_steps_cannot_separate_the_terms() -> None:
    model = VerifyCostModel()
    for _ in range(100):
        model.observe(StepShape(4), 30.0)
    # A constant batch without drafts says nothing about the draft cost: assume it small,
    # so the controller tries speculation and learns.
    assert model.per_draft_token_ms < 1.0
    assert model.predict_ms(StepShape(4)) == pytest.approx(30.0, rel=0.05)


def test_small_batch_with_good_drafts_speculates_long() -> None:
    decision = choose_lengths({"a": [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6]},
                              decoding_requests=1, base_step_ms=25.0, per_draft_token_ms=2.0)
    assert decision.lengths == {"a": 8}
    assert decision.speedup > 2.0


def test_large_batch_turns_speculation_off() -> None:
    gains = {f"r{i}": [0.6, 0.36, 0.2] for i in range(32)}
    # 32 decodes at 2 ms per token: a draft worth 0.6 tokens costs more than it brings.
    decision = choose_lengths(gains, decoding_requests=32, base_step_ms=25.0 + 2.0 * 32,
                              per_draft_token_ms=2.0)
    assert decision.lengths == {}


def test_low_acceptance_turns_speculation_off_even_at_batch_one() -> None:
    decision = choose_lengths({"a": [0.05, 0.01]}, decoding_requests=1, base_step_ms=25.0,
                              per_draft_token_ms=2.0)
    assert decision.lengths == {}


def test_drafts_go_to_the_requests_that_accept_them() -> None:
    gains = {"copier": [0.95, 0.9, 0.85, 0.8], "chatter": [0.1, 0.01, 0.0, 0.0]}
    decision = choose_lengths(gains, decoding_requests=2, base_step_ms=30.0,
                              per_draft_token_ms=2.0)
    assert decision.lengths.get("copier") == 4
    assert "chatter" not in decision.lengths


def test_fixed_speculation_overhead_must_be_paid_for() -> None:
    gains = {"a": [0.3]}
    cheap = choose_lengths(gains, decoding_requests=1, base_step_ms=25.0, per_draft_token_ms=1.0)
    dear = choose_lengths(gains, decoding_requests=1, base_step_ms=25.0, per_draft_token_ms=1.0,
                          spec_step_ms=10.0)
    assert cheap.lengths == {"a": 1}
    assert dear.lengths == {}


def _request(request_id: str, tokens: list[int], drafts: list[int], cap: int | None = None):
    params = SimpleNamespace(extra_args={"spec_max_k": cap} if cap is not None else None)
    return SimpleNamespace(request_id=request_id, all_token_ids=tokens, num_tokens=len(tokens),
                           num_computed_tokens=len(tokens) - 1, spec_token_ids=list(drafts),
                           sampling_params=params, is_finished=lambda: False)


def test_cut_drafts_are_still_judged_against_what_was_generated() -> None:
    controller = AdaptiveSpeculation(max_drafts=4, method="ngram")
    tokens = [1, 2, 3]
    request = _request("r", tokens, [4, 5, 6, 7], cap=0)  # the request forbids speculation
    controller.before_schedule([request])
    assert request.spec_token_ids == []
    output = SimpleNamespace(num_scheduled_tokens={"r": 1}, scheduled_spec_decode_tokens={})
    controller.after_schedule(output)
    for new in (4, 5, 9):  # three decode steps: two drafts right, the third wrong
        tokens.append(new)
        request.num_tokens = len(tokens)
        controller.after_update(output, None, 20.0, {"r": request})
    assert controller.acceptance.observations == 1
    hazards = controller.acceptance.hazards("r")
    global_hazards = controller.acceptance.global_hazards()
    assert global_hazards[0] > 0.5 and global_hazards[2] < 0.5
    assert hazards[3] == pytest.approx(global_hazards[3])  # position 4 never judged


def test_the_previous_proposal_is_judged_by_the_tokens_generated_since() -> None:
    assert proposal_context(None, [1, 2]) == NO_PROPOSAL
    assert proposal_context([5, 6, 7], [5]) == MATCHING  # the rest not generated yet
    assert proposal_context([5, 6, 7], [5, 6, 7]) == MATCHING
    assert proposal_context([5, 6, 7], [4]) == BROKE_FIRST
    assert proposal_context([5, 6, 7], [5, 9]) == BROKE_LATER


def test_acceptance_is_estimated_separately_after_a_match_and_after_a_miss() -> None:
    estimator = AcceptanceEstimator(max_positions=4)
    for step in range(40):
        estimator.observe(f"copying-{step}", 4, 4, MATCHING)
        estimator.observe(f"chatting-{step}", 0, 1, BROKE_FIRST)
    after_match = estimator.gains("new", 4, MATCHING)
    after_miss = estimator.gains("new", 4, BROKE_FIRST)
    assert after_match[3] > 0.8
    assert after_miss[0] < 0.2
    # The all-context estimate sits between them and fills contexts never seen.
    assert after_miss[0] < estimator.global_hazards()[0] < after_match[0]
    assert estimator.gains("new", 4, BROKE_LATER) == cumulative_gains(estimator.global_hazards())


def test_a_proposal_is_filed_under_how_the_one_before_it_fared() -> None:
    controller = AdaptiveSpeculation(max_drafts=2, method="ngram", source_agreement=False)
    tokens = [1, 2, 3]
    request = _request("r", tokens, [4, 5])
    controller.before_schedule([request])  # first proposal: no previous one
    tokens += [4, 5, 6]  # both drafts accepted, plus a bonus token
    request.num_tokens, request.num_computed_tokens = len(tokens), len(tokens) - 1
    request.spec_token_ids = [7, 8]
    controller.before_schedule([request])
    assert [p.context for p in controller._pending["r"]] == [NO_PROPOSAL, MATCHING]
    tokens += [9]  # the second proposal's first draft was wrong
    request.num_tokens, request.num_computed_tokens = len(tokens), len(tokens) - 1
    request.spec_token_ids = [10, 11]
    controller.before_schedule([request])
    assert controller._pending["r"][-1].context == BROKE_FIRST
    off = AdaptiveSpeculation(max_drafts=2, method="ngram", previous_outcome=False,
                              source_agreement=False)
    request.spec_token_ids = [10, 11]
    off.before_schedule([request])
    off.before_schedule([request])
    assert {p.context for p in off._pending["r"]} == {NO_PROPOSAL}


def _priced(controller: AdaptiveSpeculation, coefficients: list[float]) -> None:
    """Give the cost model steps that verified drafts (no cost probes), then fix its fit."""
    for drafts in range(1, 9):
        controller.cost.observe(StepShape(1, drafts), 40.0 + 10.0 * drafts)
    controller.cost.coefficients = np.array(coefficients)


def test_a_prefill_in_the_step_does_not_make_drafts_look_cheap() -> None:
    controller = AdaptiveSpeculation(max_drafts=2, method="ngram")
    # fixed 40 ms, 2 ms per decoding request, 10 ms per draft, 1 ms per prefill token
    _priced(controller, [40.0, 2.0, 10.0, 1.0, 0.0])
    for step in range(20):  # drafts right about one time in six
        controller.acceptance.observe(f"old-{step}", 1 if step % 6 == 0 else 0, 1)
    decoding = _request("d", [1, 2, 3], [4, 5])
    prefilling = SimpleNamespace(request_id="p", num_tokens=2000, num_computed_tokens=0,
                                 spec_token_ids=[], sampling_params=None)
    controller.before_schedule([decoding, prefilling])
    # Worth ~0.2 tokens at 10 ms: below the decode rate of 1 token per 42 ms x 10 ms.
    assert decoding.spec_token_ids == []


def test_a_probe_verifies_every_draft_of_the_likeliest_request() -> None:
    decision = probe_lengths({"a": [0.3, 0.1], "b": [0.6, 0.5, 0.4]}, decoding_requests=4,
                             base_step_ms=40.0, per_draft_token_ms=10.0, spec_step_ms=2.0)
    assert decision.lengths == {"b": 3}
    assert decision.predicted_ms == pytest.approx(72.0)
    assert decision.expected_tokens == pytest.approx(5.5)
    assert probe_lengths({"b": [0.6, 0.5, 0.4]}, decoding_requests=4, base_step_ms=40.0,
                         per_draft_token_ms=10.0, half=True).lengths == {"b": 2}
    assert probe_lengths({}, decoding_requests=2, base_step_ms=40.0,
                         per_draft_token_ms=10.0).lengths == {}


def test_drafts_priced_by_priors_alone_are_probed_until_steps_measure_them() -> None:
    """Without steps that verified drafts, a draft's price is the priors' (tied to the
    prefill token's): probes verify drafts until steps have measured it."""
    controller = AdaptiveSpeculation(max_drafts=4, method="ngram")
    for running in range(3):  # steps that price a prefill token at ~55 ms
        controller.cost.observe(StepShape(running, 0, 20), 1100.0 + 40.0 * running)
    for _ in range(10):
        controller.cost.observe(StepShape(4), 70.0)
    assert controller.cost.per_draft_token_ms > 10.0
    verified = _decode_alone(controller, steps=12, step_ms=lambda drafts: 62.5 + 2.0 * drafts)
    # Probes (all drafts on offer, then half, in turn) until about four timed steps price a
    # draft: the first of them is the engine's warm-up step, untimed, and four decay to
    # under four, so six.
    assert verified[:6] == [4, 2, 2, 2, 3, 1]
    assert controller.status()["cost_probe_steps"] == 6


def test_the_engines_first_step_is_not_learned_as_the_price_of_its_shape() -> None:
    controller = AdaptiveSpeculation(max_drafts=4, method="ngram")
    first = SimpleNamespace(num_scheduled_tokens={"r": 70}, scheduled_spec_decode_tokens={})
    controller.after_schedule(first)
    controller.after_update(first, None, 3000.0, {})  # warm-up: seen at 3.0 s on the EPYC
    assert controller.cost.samples == 0
    _decode_alone(controller, steps=12, step_ms=lambda drafts: 62.5 + 2.0 * drafts)
    assert controller.cost.samples == 12
    assert controller.cost.predict_ms(StepShape(1)) == pytest.approx(62.5, abs=5.0)


def _decode_alone(controller: AdaptiveSpeculation, *, steps: int,
                  step_ms: Callable[[int], float]) -> list[int]:
    """Steps of one decoding request with 4, 3 or 2 drafts on offer (never right)."""
    verified = []
    for step in range(steps):
        request = _request("r", [1, 2, 3, step], [7, 8, 9, 10][:4 - step % 3])
        controller.before_schedule([request])
        verified.append(len(request.spec_token_ids))
        output = SimpleNamespace(num_scheduled_tokens={"r": 1 + verified[-1]},
                                 scheduled_spec_decode_tokens={"r": request.spec_token_ids})
        controller.after_schedule(output)
        controller.after_update(output, None, step_ms(verified[-1]), {"r": request})
    return verified


def test_cost_probes_come_back_once_the_draft_steps_are_forgotten() -> None:
    controller = AdaptiveSpeculation(max_drafts=2, method="ngram", cost_window_steps=8)
    _priced(controller, [40.0, 2.0, 1000.0, 1.0, 0.0])  # drafts priced out
    request = _request("r", [1, 2, 3], [4, 5])
    controller.before_schedule([request])
    assert request.spec_token_ids == []
    for _ in range(20):  # steps without drafts: the draft steps fade from the fit
        controller.cost.observe(StepShape(1), 42.0)
    controller.cost.coefficients = np.array([40.0, 2.0, 1000.0, 1.0, 0.0])
    request.spec_token_ids = [4, 5]
    controller.before_schedule([request])
    assert request.spec_token_ids == [4, 5]


def _fixed(request_id: str, tokens: list[int], drafts: list[int], k: int):
    request = _request(request_id, tokens, drafts)
    request.sampling_params.extra_args = {"spec_k": k}
    return request


def test_a_request_can_fix_its_own_length_past_the_controller() -> None:
    controller = AdaptiveSpeculation(max_drafts=8, method="ngram")
    # Drafts priced far above what they could bring: the controller would verify none.
    for _ in range(8):
        controller.cost.observe(StepShape(1, 8), 100.0)
        controller.cost.observe(StepShape(1), 20.0)
    fixed = _fixed("fixed", [1, 2, 3], [4, 5, 6, 7, 8, 9], k=4)
    free = _request("free", [1, 2, 3], [4, 5, 6, 7, 8, 9])
    decision = controller.before_schedule([fixed, free])
    assert fixed.spec_token_ids == [4, 5, 6, 7]
    assert free.spec_token_ids == [] and "fixed" not in decision.lengths
    assert controller.status()["fixed_length_request_steps"] == 1


def test_a_fixed_length_stays_within_the_engines_k_and_the_requests_cap() -> None:
    controller = AdaptiveSpeculation(max_drafts=4, method="ngram")
    long = _fixed("long", [1, 2, 3], [4, 5, 6, 7], k=8)
    capped = _fixed("capped", [1, 2, 3], [4, 5, 6, 7], k=3)
    capped.sampling_params.extra_args["spec_max_k"] = 1
    controller.before_schedule([long, capped])
    assert long.spec_token_ids == [4, 5, 6, 7]
    assert capped.spec_token_ids == [4]


def test_a_draft_is_judged_against_the_long_run_rate_not_its_steps_own() -> None:
    """One request copying: a step whose drafts all look right yields several times the
    average rate, and its own rate would cut late drafts that the average keeps."""
    gains = {"a": [0.95, 0.9, 0.85, 0.8, 0.7, 0.5, 0.3, 0.15]}
    costs = {"decoding_requests": 1, "base_step_ms": 60.0, "per_draft_token_ms": 2.3,
             "spec_step_ms": 1.0}
    own = choose_lengths(gains, **costs)
    # 36 tok/s over the cell: 0.036 tokens per ms, so a draft must be worth 0.08 tokens.
    long_run = choose_lengths(gains, rate=0.036, **costs)
    assert own.lengths == {"a": 7}  # its own rate: 5.7 tokens in 74.8 ms, a bar of 0.18
    assert long_run.lengths == {"a": 8}


def test_drafts_that_do_not_beat_the_long_run_rate_are_dropped_with_their_fixed_cost() -> None:
    costs = {"decoding_requests": 1, "base_step_ms": 60.0, "per_draft_token_ms": 2.0,
             "spec_step_ms": 10.0}
    # Worth 0.1 tokens against 12 ms at 0.03 tokens per ms (0.36 tokens): not paid for.
    assert choose_lengths({"a": [0.1]}, rate=0.03, **costs).lengths == {}
    assert choose_lengths({"a": [0.9, 0.8]}, rate=0.03, **costs).lengths == {"a": 2}


def test_the_output_rate_is_kept_per_batch_size_once_steps_have_measured_it() -> None:
    rate = OutputRate(window_steps=64, min_steps=3.5)
    for _ in range(3):
        rate.observe(1, 3, 75.0)
    assert rate.tokens_per_ms(1) is None  # too few steps yet
    rate.observe(1, 1, 60.0)
    rate.observe(4, 4, 70.0)
    assert rate.tokens_per_ms(1) == pytest.approx(10 / 285, rel=0.02)
    assert rate.tokens_per_ms(4) is None and rate.tokens_per_ms(2) is None
    rate.observe(0, 1, 300.0)  # a prefill-only step is not a decode rate
    assert rate.as_dict().keys() == {"1", "4"}


def test_the_controller_learns_the_rate_from_the_tokens_its_steps_produce() -> None:
    controller = AdaptiveSpeculation(max_drafts=4, method="ngram")
    for step in range(12):  # one request, two tokens per step (one draft accepted), 80 ms
        request = _request("r", [1, 2, 3] + [7] * 2 * step, [7, 7, 9])
        controller.before_schedule([request])
        output = SimpleNamespace(num_scheduled_tokens={"r": 1 + len(request.spec_token_ids)},
                                 scheduled_spec_decode_tokens={"r": request.spec_token_ids})
        controller.after_schedule(output)
        runner = SimpleNamespace(sampled_token_ids=[[7, 7]], req_id_to_index={"r": 0})
        controller.after_update(output, runner, 80.0, {"r": request})
    assert controller.rate.tokens_per_ms(1) == pytest.approx(2 / 80.0)
    assert controller.rate.tokens_per_ms(2) is None
    assert controller.status()["output_rate_tokens_per_ms"] == {"1": 0.025}


def test_a_step_log_prices_steps_by_shape_with_the_hosts_drift_taken_out(tmp_path) -> None:
    path = tmp_path / "steps.jsonl"
    log = StepLog(path)

    def segment(marker: dict, slowdown: float, drafts: list[int]) -> None:
        with path.open("a") as f:
            f.write(json.dumps(marker) + "\n")
        for _ in range(5):  # decode steps without drafts, which every segment has
            log.write(StepShape(1), [], 60.0 * slowdown)
        log.write(StepShape(1, 0, 50), [], 300.0 * slowdown)  # a prefill step
        for k in drafts:
            log.write(StepShape(1, k), [(k, None)], (62.0 + 2.0 * k) * slowdown)

    segment({"round": 0, "config": "k8"}, 1.0, [8, 8])
    segment({"round": 1, "config": "k8"}, 1.2, [8, 8])  # the host ran 20% slower
    segment({"round": 1, "config": "k4"}, 1.2, [4, 4, 4])
    rows = read_step_log(path)
    assert rows[1] == {"decode": 1, "drafts": 0, "prefill": 0, "verified": [], "ms": 60.0}
    segments = split_step_log(rows)
    assert list(segments) == [(0, "k8"), (1, "k8"), (1, "k4")]
    priced = priced_ms(segments)
    # One speed for all: the drift of the fit is normalised, so prices sit between the two.
    assert priced[(0, "k8")] == pytest.approx(priced[(1, "k8")])
    speed = priced[(0, "k8")] / (5 * 60.0 + 300.0 + 2 * 78.0)
    assert 1.0 < speed < 1.2
    assert priced[(1, "k4")] == pytest.approx(speed * (5 * 60.0 + 300.0 + 3 * 70.0))


def test_with_row_residuals_the_length_rule_takes_the_best_number_of_drafts() -> None:
    """Where a draft's price depends on the step's rows, the best drafts to take are still
    the likeliest ones, and the rule must find the best count of them: brute force over
    every count agrees, on random acceptance curves and random residual tables."""
    rng = random.Random(5)
    for _ in range(200):
        batch = rng.choice([1, 2, 4])
        gains = {}
        for r in range(rng.randint(1, batch)):
            row, g = [], 1.0
            for _ in range(rng.randint(1, 8)):
                g *= rng.uniform(0.2, 0.95)
                row.append(g)
            gains[f"r{r}"] = row
        table = {rows: rng.uniform(-8.0, 8.0) for rows in range(1, 40)}
        costs = {"decoding_requests": batch, "base_step_ms": 50.0, "per_draft_token_ms": 2.0,
                 "spec_step_ms": rng.choice([0.0, 1.0]), "rate": rng.uniform(0.01, 0.1)}
        decision = choose_lengths(gains, rows_residual_ms=table.__getitem__, **costs)
        ordered = sorted((g for row in gains.values() for g in row), reverse=True)

        def value(drafts: int) -> float:
            if drafts == 0:
                return 0.0
            extra = 2.0 * drafts + table[batch + drafts] - table[batch] + costs["spec_step_ms"]
            return sum(ordered[:drafts]) - costs["rate"] * extra
        best = max(range(len(ordered) + 1), key=value)
        chosen = sum(decision.lengths.values())
        assert value(chosen) == pytest.approx(value(best))
        for request_id, length in decision.lengths.items():  # each request's likeliest first
            assert length <= len(gains[request_id])


def test_row_residuals_learn_each_row_counts_distance_from_the_line() -> None:
    """Steps as on the AVX2 EPYC host: one row 52 ms, two 63, three to six 46, seven and
    more about 56 + 3 ms a row. The line cannot draw that; the residuals, read against the
    line as it is now, can: one draft at one request is priced dearer than four."""
    def step_ms(rows: int) -> float:
        return {1: 52.0, 2: 63.0}.get(rows, 46.0 if rows <= 6 else 56.0 + 3.0 * (rows - 7))
    line = VerifyCostModel()
    residuals = RowResiduals(line)
    rng = random.Random(1)
    for _ in range(400):
        shape = StepShape(1, rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8]))
        ms = step_ms(1 + shape.draft_tokens) * rng.uniform(0.98, 1.02)
        residuals.observe(shape, ms)
        line.observe(shape, ms)
    residuals.observe(StepShape(1, 3, prefill_tokens=40), 500.0)  # prefill: not a decode step

    def predicted(rows: int) -> float:
        return line.predict_ms(StepShape(1, rows - 1)) + residuals.residual_ms(rows)
    for rows in range(1, 10):
        assert predicted(rows) == pytest.approx(step_ms(rows), abs=3.0)
    # Never seen: the line plus every decode step's residual (the same for any such row).
    assert residuals.residual_ms(30) == residuals.residual_ms(31)
    assert abs(residuals.residual_ms(30)) < 5.0
    decision = choose_lengths({"a": [0.6, 0.3, 0.2, 0.1]}, decoding_requests=1,
                              base_step_ms=predicted(1),
                              per_draft_token_ms=line.per_draft_token_ms,
                              spec_step_ms=line.spec_step_ms, rate=0.03,
                              rows_residual_ms=residuals.residual_ms)
    assert decision.lengths == {"a": 4}
