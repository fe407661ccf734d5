"""Source agreement: how far the text before a copying proposal's source matches."""

from __future__ import annotations

import random
from types import SimpleNamespace

from xllm_plugin.spec.adaptive import AdaptiveSpeculation
from xllm_plugin.spec.source import (
    MAX_SOURCES,
    TokenHistory,
    agreement_bucket,
    divergence_bucket,
    source_agreement,
)


def _reference(tokens: list[int], first_draft: int, cap: int) -> int:
    """The definition, position by position."""
    n, best = len(tokens), 0
    for start in range(2, n):
        if tokens[start - 2: start] != tokens[n - 2:] or tokens[start] != first_draft:
            continue
        run = 0
        while run < cap and start - 1 - run >= 0 and tokens[start - 1 - run] == tokens[n - 1 - run]:
            run += 1
        best = max(best, run)
    return best


def test_agreement_matches_its_definition_on_random_text() -> None:
    rng = random.Random(7)
    for _ in range(400):
        tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 60))]
        first = rng.randrange(3)
        assert source_agreement(tokens, first, cap=16) == _reference(tokens, first, 16)


def test_a_growing_history_answers_as_the_definition() -> None:
    """The pair index, fed a few tokens at a time (as steps append them), agrees with the
    definition at every length, and again after the tokens start over."""
    rng = random.Random(13)
    for _ in range(40):
        history, tokens = TokenHistory(), []
        for _ in range(30):
            tokens += [rng.randrange(4) for _ in range(rng.randrange(1, 5))]
            for first in range(4):
                assert history.agreement(tokens, first, cap=8) == _reference(tokens, first, 8)
        tokens = tokens[: rng.randrange(0, 6)]  # started over
        for first in range(4):
            assert history.agreement(tokens, first, cap=8) == _reference(tokens, first, 8)


def test_a_copied_passage_agrees_long_and_a_common_pair_short() -> None:
    passage = list(range(100, 130))
    copying = [1, 2] + passage + [3, 4] + passage[:20]  # writing the passage out again
    assert source_agreement(copying, passage[20]) == 16  # capped
    assert agreement_bucket(source_agreement(copying, passage[20])) == "16+"
    chatter = [5, 7, 8, 9, 6, 7, 8]  # "7 8" seen once before, after something else
    assert source_agreement(chatter, 9) == 2
    assert agreement_bucket(2) == "2"
    assert source_agreement(chatter, 42) == 0  # the draft does not follow that pair


def test_copying_proposals_are_filed_by_outcome_and_source_agreement() -> None:
    passage = list(range(100, 130))
    tokens = [1, 2] + passage + [3, 4] + passage[:20]
    request = SimpleNamespace(request_id="r", all_token_ids=tokens, num_tokens=len(tokens),
                              num_computed_tokens=len(tokens) - 1,
                              spec_token_ids=passage[20:24],
                              sampling_params=SimpleNamespace(extra_args=None),
                              is_finished=lambda: False)
    ngram = AdaptiveSpeculation(max_drafts=4, method="ngram")
    ngram.before_schedule([request])
    assert ngram._pending["r"][-1].context == "none/16+"
    ngram.forget("r")  # a finished request's token array goes with it
    assert not ngram._histories
    # A draft model's drafts have no source in the text: filed by outcome alone.
    request.spec_token_ids = passage[20:24]
    eagle = AdaptiveSpeculation(max_drafts=4, method="eagle")
    eagle.before_schedule([request])
    assert eagle._pending["r"][-1].context == "none"


def test_only_the_newest_occurrences_of_a_pair_are_looked_at() -> None:
    """A pair seen everywhere (a loop the model broke) bounds the work: a long agreement
    older than the newest ``MAX_SOURCES`` occurrences no longer counts."""
    passage = list(range(100, 120))
    loop = [1, 2, 3] * MAX_SOURCES  # the pair (1, 2) followed by 3, over and over
    tokens = passage + [1, 2, 3] + loop + [9] + passage + [1, 2]
    assert source_agreement(tokens, 3) == 2  # the old source after `passage` is too old
    shorter = passage + [1, 2, 3] + loop[: 3 * (MAX_SOURCES - 2)] + [9] + passage + [1, 2]
    assert source_agreement(shorter, 3) == 16


def _reference_divergence(tokens: list[int], drafts: list[int]) -> int | None:
    """The definition: over every earlier start of the last pair followed by the first draft,
    the first draft position where the text went on differently (before its end)."""
    n, first = len(tokens), None
    for start in range(2, n):
        if tokens[start - 2: start] != tokens[n - 2:] or tokens[start] != drafts[0]:
            continue
        run = 1
        while run < len(drafts) and start + run < n and tokens[start + run] == drafts[run]:
            run += 1
        if run < len(drafts) and start + run < n:
            first = run if first is None else min(first, run)
    return first


def test_divergence_matches_its_definition_as_the_text_grows() -> None:
    rng = random.Random(21)
    for _ in range(40):
        history, tokens = TokenHistory(), []
        for _ in range(30):
            tokens += [rng.randrange(3) for _ in range(rng.randrange(1, 5))]
            drafts = [rng.randrange(3) for _ in range(rng.randrange(1, 6))]
            assert history.divergence(tokens, drafts) == _reference_divergence(tokens, drafts)


def test_divergence_marks_where_the_text_went_two_ways_before() -> None:
    # "7 8" was followed by "1 2 3" once and by "1 5" once: drafts "1 2 3" part at position 1.
    tokens = [7, 8, 1, 2, 3, 0, 7, 8, 1, 5, 0, 7, 8]
    history = TokenHistory()
    assert history.divergence(tokens, [1, 2, 3]) == 1
    assert divergence_bucket(1) == "d1-2"
    # Only the copied source exists: nothing parts from it.
    assert TokenHistory().divergence([7, 8, 1, 2, 3, 0, 7, 8], [1, 2, 3]) is None
    assert divergence_bucket(None) == "dN"
    assert divergence_bucket(4) == "d3-5" and divergence_bucket(7) == "d6+"


def test_divergence_is_filed_only_when_switched_on() -> None:
    tokens = [7, 8, 1, 2, 3, 0, 7, 8, 1, 5, 0, 7, 8]
    request = SimpleNamespace(request_id="r", all_token_ids=tokens, num_tokens=len(tokens),
                              num_computed_tokens=len(tokens) - 1, spec_token_ids=[1, 2, 3],
                              sampling_params=SimpleNamespace(extra_args=None),
                              is_finished=lambda: False)
    on = AdaptiveSpeculation(max_drafts=4, method="ngram", source_divergence=True)
    on.before_schedule([request])
    assert on._pending["r"][-1].context == "none/3-7/d1-2"
    request.spec_token_ids = [1, 2, 3]
    off = AdaptiveSpeculation(max_drafts=4, method="ngram")
    off.before_schedule([request])
    assert off._pending["r"][-1].context == "none/3-7"
