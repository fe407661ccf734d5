"""The dynamic EPLB policy: placement properties, the drift/gain rule, the vLLM policy class."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xllm_plugin.moe.placement import (
    imbalance,
    initial_placement,
    moved_slots,
    place,
    replica_counts_of,
)
from xllm_plugin.moe.policy import plan_rebalance


@st.composite
def layouts(draw):  # type: ignore[no-untyped-def]
    experts = draw(st.integers(2, 16))
    ranks = draw(st.sampled_from([1, 2, 4, 8]))
    per_rank = draw(st.integers(-(-experts // ranks), -(-experts // ranks) + 3))
    load = draw(st.lists(st.integers(0, 1000), min_size=experts, max_size=experts))
    return np.array(load, dtype=float), ranks, ranks * per_rank


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_placement_never_drops_an_expert_and_fills_exactly_the_slot_budget(layout) -> None:
    load, ranks, slots = layout
    placement = place(load, slots, ranks)
    assert placement.shape == (slots,)
    assert set(placement.tolist()) == set(range(len(load)))  # every expert has a slot
    counts = replica_counts_of(placement, len(load))
    assert counts.min() >= 1 and counts.sum() == slots


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_replicas_of_one_expert_sit_on_different_ranks(layout) -> None:
    load, ranks, slots = layout
    per_rank = place(load, slots, ranks).reshape(ranks, -1)
    for row in per_rank:
        # A rank holds an expert twice only when there are more slots than distinct experts.
        duplicates = len(row) - len(set(row.tolist()))
        assert duplicates == 0 or len(set(row.tolist())) == len(load)


LAYOUTS = [(4, 4), (2, 2), (4, 8), (8, 8)]  # (ranks, redundant slots) for 8 experts


def _skewed_load(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    load = rng.zipf(1.6, size=8).astype(float) * rng.integers(1, 50)
    load = np.minimum(load, 1e6)
    if load.max() < 2 * np.median(load):
        load[rng.integers(8)] *= 5  # make sure it is skewed
    return load


def _before_after(load: np.ndarray, layout: tuple[int, int]) -> tuple[float, float]:
    ranks, redundant = layout
    slots = len(load) + redundant
    return (imbalance(load, initial_placement(len(load), slots), ranks),
            imbalance(load, place(load, slots, ranks), ranks))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(LAYOUTS))
def test_placement_is_never_less_even_than_vllms_initial_one(seed: int, layout) -> None:
    before, after = _before_after(_skewed_load(seed), layout)
    assert after <= before + 1e-9


@pytest.mark.parametrize("layout", LAYOUTS)
def test_skewed_loads_get_a_lower_max_over_mean_rank_load(layout) -> None:
    """Strictly better on every visibly skewed load of a fixed set of seeds (fixed, so the
    test cannot draw a load whose initial placement no placement beats)."""
    skewed = improved = 0
    for seed in range(300):
        before, after = _before_after(_skewed_load(seed), layout)
        if before > 1.2:
            skewed += 1
            improved += after < before
    assert skewed >= 50
    assert improved == skewed


def test_the_counts_search_leaves_the_fixed_count_vectors_behind() -> None:
    """One expert at twice the others' load, 8 ranks x 2 slots: greedy, proportional and
    vLLM's counts all pack to max/mean 4/3; giving the hot expert more replicas and the
    cold ones fewer (step 3 of ``placement.py``) reaches 32/27."""
    load = np.full(8, 35.0)
    load[5] = 70.0
    before, after = _before_after(load, (8, 8))
    assert before == pytest.approx(4 / 3)
    assert after == pytest.approx(32 / 27)


def test_issue_counts_balance_to_near_even() -> None:
    load = np.array([9, 9, 48, 6, 48, 29, 26, 11], dtype=float)
    assert imbalance(load, initial_placement(8, 12), 4) > 1.6
    assert imbalance(load, place(load, 12, 4), 4) < 1.1


def test_a_placement_that_is_already_balanced_moves_nothing() -> None:
    load = np.array([9, 9, 48, 6, 48, 29, 26, 11], dtype=float)
    first = place(load, 12, 4)
    again = place(load * 1.01, 12, 4, old_phy2log=first)
    assert moved_slots(first, again) == 0


def test_no_rebalance_while_the_load_has_not_drifted() -> None:
    load = np.array([[9, 9, 48, 6, 48, 29, 26, 11]], dtype=float)
    first = plan_rebalance(load, initial_placement(8, 12)[None], None, 4)
    assert first.rebalanced and first.moved_slots > 0
    noisy = load * np.array([1.05, 0.95, 1.0, 1.1, 0.97, 1.0, 1.02, 0.9])
    second = plan_rebalance(noisy, first.physical_to_logical, first.reference, 4,
                            drift_threshold=0.1)
    assert not second.rebalanced
    np.testing.assert_array_equal(second.physical_to_logical, first.physical_to_logical)


def test_rebalance_when_hot_experts_change_and_only_in_that_layer() -> None:
    layer0 = np.array([9, 9, 48, 6, 48, 29, 26, 11], dtype=float)
    load = np.stack([layer0, layer0])
    first = plan_rebalance(load, np.tile(initial_placement(8, 12), (2, 1)), None, 4)
    shifted = np.stack([layer0, layer0[::-1]])  # layer 1's hot experts move
    second = plan_rebalance(shifted, first.physical_to_logical, first.reference, 4)
    assert second.rebalanced_layers == [1]
    np.testing.assert_array_equal(second.physical_to_logical[0], first.physical_to_logical[0])
    assert second.imbalance_after[1] < second.imbalance_before[1]


def test_drift_without_a_material_gain_moves_nothing() -> None:
    load = np.array([[10, 10, 10, 10, 10, 10, 10, 10]], dtype=float)
    # Far from the reference it was made for, but the initial placement is already even.
    reference = np.array([[0.5, 0.5, 0, 0, 0, 0, 0, 0]])
    decision = plan_rebalance(load, initial_placement(8, 8)[None], reference, 4,
                              drift_threshold=0.1, min_improvement=0.05)
    assert decision.drift[0] > 0.5
    assert not decision.rebalanced


def test_vllm_policy_class_returns_a_valid_map_and_skips_when_nothing_drifted() -> None:
    import torch
    from vllm.distributed.eplb.policy.abstract import AbstractEplbPolicy

    from xllm_plugin.moe.eplb_policy import XLLMEplbPolicy, register_policy

    XLLMEplbPolicy.reset()
    weight = torch.tensor([[9, 9, 48, 6, 48, 29, 26, 11], [30, 1, 1, 1, 1, 1, 1, 30]])
    old = torch.tensor(np.tile(initial_placement(8, 12), (2, 1)))
    new = XLLMEplbPolicy.rebalance_experts(weight, 12, 1, 1, 4, old)
    assert issubclass(XLLMEplbPolicy, AbstractEplbPolicy)
    assert new.shape == (2, 12) and new.dtype == torch.int64
    for row in new.numpy():
        assert set(row.tolist()) == set(range(8))
    again = XLLMEplbPolicy.rebalance_experts(weight, 12, 1, 1, 4, new)
    assert torch.equal(again, new)  # same load: nothing moves
    assert XLLMEplbPolicy.rebalances == 1 and XLLMEplbPolicy.calls == 2
    register_policy()
    from vllm.distributed.eplb.policy import EPLB_POLICIES

    assert EPLB_POLICIES["xllm"] is XLLMEplbPolicy


@pytest.mark.parametrize("ranks,slots", [(4, 12), (2, 10)])
def test_ours_matches_vllm_default_balance_on_the_issue_counts(ranks: int, slots: int) -> None:
    import torch
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    load = np.array([9, 9, 48, 6, 48, 29, 26, 11], dtype=float)
    theirs = DefaultEplbPolicy.rebalance_experts(torch.tensor(load[None]), slots, 1, 1, ranks)
    ours = place(load, slots, ranks)
    assert imbalance(load, ours, ranks) <= imbalance(load, theirs.numpy()[0], ranks) + 1e-9
