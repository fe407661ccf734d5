"""The speculative-decoding replay: exact token accounting and the policies it compares."""

from __future__ import annotations

import random

from xllm_plugin.spec.adaptive import AdaptiveSpeculation
from xllm_plugin.spec.cost import StepShape
from xllm_plugin.spec.replay import (
    AdaptiveLength,
    BatchSizeTable,
    OracleLength,
    Recorded,
    StaticLength,
    StepCost,
    replay_cell,
)

COST = StepCost(fixed_ms=40.0, per_request_ms=2.0, per_draft_token_ms=1.0,
                per_prefill_token_ms=0.5, spec_step_ms=1.0)


def last_token_lookup(tokens: list[int], k: int) -> list[int]:
    """Drafts: what followed the most recent earlier occurrence of the last token."""
    last = tokens[-1]
    for start in range(len(tokens) - 2, -1, -1):
        if tokens[start] == last:
            return list(tokens[start + 1: start + 1 + k])
    return []


def copying(rng: random.Random, length: int = 60) -> Recorded:
    """An output that copies its prompt (tokens all distinct, so lookups are exact)."""
    text = rng.sample(range(1000, 5000), length)
    return Recorded(tuple(text), tuple(text))


def chatter(rng: random.Random, length: int = 60) -> Recorded:
    """Random tokens from a small vocabulary: lookups find drafts, and nearly all are wrong."""
    return Recorded(tuple(rng.choices(range(1000, 1020), k=30)),
                    tuple(rng.choices(range(1000, 1020), k=length)))


def patchy(rng: random.Random, length: int = 80) -> Recorded:
    """An output that copies short runs of its prompt (1-2 tokens, from random places)
    between fresh tokens: drafts are right at first and soon wrong."""
    prompt = rng.sample(range(1000, 5000), 120)
    output: list[int] = []
    while len(output) < length:
        start = rng.randrange(len(prompt) - 6)
        output += prompt[start: start + rng.randint(1, 2)]
        output.append(rng.randrange(6000, 9000))
    return Recorded(tuple(prompt), tuple(output[:length]))


def test_every_policy_produces_exactly_the_recorded_tokens() -> None:
    rng = random.Random(0)
    requests = [copying(rng) for _ in range(3)] + [chatter(rng) for _ in range(3)]
    expected = sum(len(r.output_ids) for r in requests)
    for policy, k in ((StaticLength(0), 0), (StaticLength(4), 4), (StaticLength(8), 8),
                      (AdaptiveLength(AdaptiveSpeculation(max_drafts=8, method="ngram")), 8)):
        got = replay_cell(requests, 2, policy, last_token_lookup, k, COST)
        assert got.output_tokens == expected
        assert got.drafts_accepted <= got.drafts_verified


def test_copying_requests_finish_in_fewer_steps_with_drafts() -> None:
    rng = random.Random(1)
    requests = [copying(rng) for _ in range(4)]
    none = replay_cell(requests, 1, StaticLength(0), last_token_lookup, 0, COST)
    k8 = replay_cell(requests, 1, StaticLength(8), last_token_lookup, 8, COST)
    assert none.steps == sum(len(r.output_ids) for r in requests) + 0  # one token per step
    assert k8.steps < none.steps / 4
    assert k8.drafts_accepted > 0.9 * k8.drafts_verified
    assert k8.tokens_per_s > 4 * none.tokens_per_s


def test_adaptive_keeps_the_drafts_that_pay_and_drops_those_that_do_not() -> None:
    rng = random.Random(2)
    copy_cell = [copying(rng) for _ in range(6)]
    chat_cell = [chatter(rng) for _ in range(6)]
    copy_adaptive = replay_cell(copy_cell, 1, AdaptiveLength(AdaptiveSpeculation(
        max_drafts=8, method="ngram")), last_token_lookup, 8, COST)
    chat_adaptive = replay_cell(chat_cell, 1, AdaptiveLength(AdaptiveSpeculation(
        max_drafts=8, method="ngram")), last_token_lookup, 8, COST)
    copy_k8 = replay_cell(copy_cell, 1, StaticLength(8), last_token_lookup, 8, COST)
    chat_none = replay_cell(chat_cell, 1, StaticLength(0), last_token_lookup, 0, COST)
    chat_k8 = replay_cell(chat_cell, 1, StaticLength(8), last_token_lookup, 8, COST)
    assert copy_adaptive.tokens_per_s > 0.95 * copy_k8.tokens_per_s
    assert chat_adaptive.tokens_per_s > chat_k8.tokens_per_s
    assert chat_adaptive.tokens_per_s > 0.95 * chat_none.tokens_per_s
    assert chat_adaptive.drafts_verified < 0.2 * chat_k8.drafts_verified


def test_row_costs_find_the_drafts_a_tiled_host_gives_for_free() -> None:
    """On a host where a decode step of 3-6 query rows costs less than one of 1 or 2 (the
    AVX2 EPYC's shape), the controller that learns costs by rows runs requests that copy
    one or two tokens at a time faster than the one that knows only the line: at one
    request, where one draft is the dearest step and two to five cost less than none, by
    far; at four, where only two drafts fit before the price jumps, it is no slower."""
    rows_cost = StepCost.from_dict({
        "fixed_ms": 40.0, "per_request_ms": 2.0, "per_draft_token_ms": 3.0,
        "per_prefill_token_ms": 0.5,
        "rows_ms": {1: 52.0, 2: 63.0, 3: 46.0, 6: 46.0, 7: 56.0, 12: 71.0}})
    assert rows_cost.ms(StepShape(1, 3)) < rows_cost.ms(StepShape(1)) < rows_cost.ms(
        StepShape(1, 1))
    assert rows_cost.ms(StepShape(4, 20)) == 71.0 + 3.0 * 12
    rng = random.Random(4)
    requests = [patchy(rng) for _ in range(8)]
    for concurrency in (1, 4):
        got = {rows: replay_cell(requests, concurrency, AdaptiveLength(AdaptiveSpeculation(
            max_drafts=8, method="ngram", row_costs=rows)), last_token_lookup, 8, rows_cost,
            noise=0.03, seed=concurrency) for rows in (False, True)}
        assert got[True].output_tokens == got[False].output_tokens
        gain = got[True].tokens_per_s / got[False].tokens_per_s
        assert gain > (1.05 if concurrency == 1 else 0.99), (concurrency, got)


def test_tiled_rows_make_a_few_drafts_free() -> None:
    tiled = StepCost(40.0, 2.0, 1.0, 0.5, 0.0, row_tile=16)
    one_row = tiled.ms(StepShape(decode_requests=1))
    assert tiled.ms(StepShape(decode_requests=1, draft_tokens=8)) == one_row
    assert tiled.ms(StepShape(decode_requests=1, draft_tokens=16)) == one_row + 16.0
    assert COST.ms(StepShape(decode_requests=1, draft_tokens=8)) == 40.0 + 2.0 + 8.0 + 1.0


def test_a_batch_size_table_picks_the_next_k_from_the_step_just_scheduled() -> None:
    rng = random.Random(3)
    requests = [copying(rng, length) for length in (20, 40, 120, 160)]
    lookup = [0, 8, 8, 2, 2]  # K=8 for one or two requests, 2 for three or four
    table = replay_cell(requests, 4, BatchSizeTable(lookup, 8), last_token_lookup, 8, COST)
    k2 = replay_cell(requests, 4, StaticLength(2), last_token_lookup, 8, COST)
    k8 = replay_cell(requests, 4, StaticLength(8), last_token_lookup, 8, COST)
    assert table.output_tokens == k2.output_tokens
    # K=2 while three or four requests run, K=8 once two are left.
    assert k2.drafts_verified < table.drafts_verified < k8.drafts_verified


def test_a_draft_can_cost_less_in_a_step_of_few_requests() -> None:
    cost = StepCost.from_dict({"fixed_ms": 40.0, "per_request_ms": 2.0,
                               "per_draft_token_ms": 1.0, "per_prefill_token_ms": 0.5,
                               "draft_ms_by_batch": {"1": 0.25, "4": 0.75}})
    assert cost.ms(StepShape(1, 8)) == 40.0 + 2.0 + 8 * 0.25
    assert cost.ms(StepShape(3, 8)) == 40.0 + 6.0 + 8 * 0.25
    assert cost.ms(StepShape(4, 8)) == 40.0 + 8.0 + 8 * 0.75
    assert cost.ms(StepShape(0, 0, 10)) == 40.0 + 5.0  # no drafts: the prices do not matter
    assert COST.draft_ms(32) == 1.0  # without the table, one price


def test_the_oracle_verifies_only_right_drafts_and_bounds_every_policy() -> None:
    rng = random.Random(4)
    requests = [copying(rng) for _ in range(3)] + [chatter(rng) for _ in range(3)]
    oracle = replay_cell(requests, 2, OracleLength(), last_token_lookup, 8, COST)
    assert oracle.output_tokens == sum(len(r.output_ids) for r in requests)
    assert oracle.drafts_verified == oracle.drafts_accepted > 0
    for policy in (StaticLength(0), StaticLength(4), StaticLength(8),
                   AdaptiveLength(AdaptiveSpeculation(max_drafts=8, method="ngram"))):
        got = replay_cell(requests, 2, policy, last_token_lookup, 8, COST)
        assert got.tokens_per_s <= oracle.tokens_per_s
