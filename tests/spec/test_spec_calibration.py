"""Calibration of the acceptance estimates: predicted g(i) against what verification found."""

from __future__ import annotations

import random

import pytest

from tests.spec.test_spec_replay import COST, chatter, copying, last_token_lookup
from xllm_plugin.spec.adaptive import AdaptiveSpeculation
from xllm_plugin.spec.calibration import Calibration
from xllm_plugin.spec.replay import AdaptiveLength, replay_cell


def test_a_wrong_draft_settles_every_later_position_and_an_ended_request_does_not() -> None:
    calibration = Calibration()
    calibration.add([0.9, 0.8, 0.7, 0.6], matched=1, judged=2, context="match")
    calibration.add([0.5, 0.4, 0.3, 0.2], matched=2, judged=2, context="match")
    rows = calibration.as_dict()["match"]
    # Positions 1-2 were judged in both proposals; 3-4 only in the first (its draft 2 was
    # wrong), the second ran out after its 2 right drafts.
    assert [n for _, _, n in rows] == [2, 2, 1, 1]
    # Means are decayed (recent proposals count most): about the plain means here.
    assert rows[0][:2] == [pytest.approx(0.7, rel=0.01), 1.0]
    assert rows[1][:2] == [pytest.approx(0.6, rel=0.01), pytest.approx(0.5, rel=0.01)]
    assert rows[2][:2] == [pytest.approx(0.7), 0.0]


def test_the_controller_reports_calibration_for_the_drafts_it_priced() -> None:
    rng = random.Random(3)
    controller = AdaptiveSpeculation(max_drafts=8, method="ngram", source_agreement=False)
    requests = [copying(rng) for _ in range(4)] + [chatter(rng) for _ in range(4)]
    replay_cell(requests, 2, AdaptiveLength(controller), last_token_lookup, 8, COST)
    calibration = controller.status()["calibration"]
    assert calibration, "judged proposals with a predicted g should be counted"
    for rows in calibration.values():
        for predicted, realized, proposals in rows:
            assert 0.0 <= predicted <= 1.0 and 0.0 <= realized <= 1.0 and proposals >= 1
    # After a proposal that matched (copying) the first draft is mostly right, after one
    # that missed (chatter) mostly wrong; the estimates the rule used said so too.
    match, miss = calibration["match"][0], calibration["miss"][0]
    assert match[0] > 0.6 and match[1] > 0.6
    assert miss[0] < 0.2 and miss[1] < 0.2

