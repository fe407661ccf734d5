"""The local tiers' bookkeeping: LRU demotion DRAM -> SSD, inclusion, and plans whose
order alone keeps the workers consistent (pure code, no engine)."""

from __future__ import annotations

import pytest

from xllm_plugin.kvstore.tiers import (
    DEMOTE,
    FILL_SSD,
    FILL_STORE,
    PUT,
    SAVE,
    SCATTER,
    SSD_DROP,
    StepPlanner,
    Tier,
    TierDirectory,
)


def h(i: int) -> bytes:
    return i.to_bytes(32, "big")


def saved(directory: TierDirectory, ids: range, use_store: bool = False):
    """One step that saves blocks ``ids``."""
    planner = StepPlanner(directory, use_store)
    planner.save([(h(i), 100 + i) for i in ids])
    return planner.finish()


def saved_one_per_step(directory: TierDirectory, ids: range):
    """Blocks saved in separate steps; returns every step's ops, concatenated."""
    return [op for i in ids for op in saved(directory, range(i, i + 1)).ops]


def test_dram_evicts_least_recently_used_and_demotes_it_to_ssd():
    d = TierDirectory(dram_slots=3, ssd_blocks=10)
    saved(d, range(3))
    d.touch(h(0))  # 1 is now the least recently used
    plan = saved(d, range(3, 4))
    assert d.where(h(1)) is Tier.SSD
    assert [d.where(h(i)) for i in (0, 2, 3)] == [Tier.DRAM] * 3
    kinds = [op[0] for op in plan.ops]
    # the victim's slot is written to its file before the new block overwrites it
    assert kinds == [DEMOTE, SAVE]
    assert plan.ops[0][1] == plan.ops[1][2]


def test_ssd_evicts_its_own_least_recently_used_file():
    d = TierDirectory(dram_slots=1, ssd_blocks=2)
    ops = saved_one_per_step(d, range(4))  # 0,1,2 demoted in turn; SSD keeps 2 files
    assert d.where(h(3)) is Tier.DRAM
    assert [d.where(h(i)) for i in range(3)] == [None, Tier.SSD, Tier.SSD]
    assert (SSD_DROP, h(0)) in ops
    assert d.ssd_evictions == 1 and d.demotions == 3


def test_without_ssd_dram_victims_are_dropped():
    d = TierDirectory(dram_slots=2, ssd_blocks=0)
    ops = saved_one_per_step(d, range(3))
    assert d.where(h(0)) is None
    assert all(op[0] == SAVE for op in ops)


def test_block_already_in_dram_is_touched_not_copied():
    d = TierDirectory(dram_slots=4)
    saved(d, range(2))
    plan = saved(d, range(3))
    assert plan.save_block_ids == [102]


def test_load_takes_each_block_from_its_fastest_tier_and_promotes_into_dram():
    d = TierDirectory(dram_slots=3, ssd_blocks=4)
    saved_one_per_step(d, range(4))  # 0 demoted to SSD; 1, 2, 3 in DRAM
    planner = StepPlanner(d, use_store=True)
    sources = planner.load("r", [(h(i), 200 + i) for i in range(3)])
    plan = planner.finish()
    assert sources == {Tier.SSD: 1, Tier.DRAM: 2}
    # 3 (not part of the load) made room; 0 was read from its file into DRAM
    assert [op[0] for op in plan.ops] == [DEMOTE, FILL_SSD, SCATTER]
    assert plan.ops[0][2] == h(3) and plan.ops[1][2] == h(0)
    scatter = plan.ops[-1]
    assert [t[1] for t in scatter[2]] == [200, 201, 202] and all(t[0] >= 0 for t in scatter[2])
    assert all(d.where(h(i)) is Tier.DRAM for i in range(3))


def test_blocks_nowhere_local_come_from_the_store():
    d = TierDirectory(dram_slots=4)
    planner = StepPlanner(d, use_store=True)
    assert planner.load("r", [(h(7), 1)]) == {Tier.STORE: 1}
    plan = planner.finish()
    assert [op[0] for op in plan.ops] == [FILL_STORE, SCATTER]
    assert d.where(h(7)) is Tier.DRAM  # inclusion: loaded into the engine -> also in DRAM


def test_a_load_larger_than_dram_marks_the_overflow_failed():
    d = TierDirectory(dram_slots=2)
    planner = StepPlanner(d, use_store=True)
    planner.load("r", [(h(i), i) for i in range(3)])
    targets = planner.finish().ops[-1][2]
    assert [slot >= 0 for slot, _, _ in targets] == [True, True, False]


def test_puts_come_last_and_their_slots_stay_put_within_the_step():
    d = TierDirectory(dram_slots=2, ssd_blocks=0)
    plan = saved(d, range(4), use_store=True)
    # only two blocks fit: the step protects what it wrote, it does not overwrite it
    assert plan.save_block_ids == [100, 101]
    assert [op[0] for op in plan.ops] == [SAVE, SAVE, PUT, PUT]
    assert {op[1] for op in plan.ops if op[0] == PUT} == {op[2] for op in plan.ops if op[0] == SAVE}


def test_events_name_each_tier_change_in_order():
    d = TierDirectory(dram_slots=1, ssd_blocks=1)
    saved(d, range(1), use_store=True)
    saved(d, range(1, 2), use_store=True)
    assert d.events.take() == [
        (True, "CPU", [h(0)]), (True, "MOONCAKE_STORE", [h(0)]),
        (False, "CPU", [h(0)]), (True, "STORAGE", [h(0)]), (True, "CPU", [h(1)]),
        (True, "MOONCAKE_STORE", [h(1)])]
    assert d.events.take() == []


def test_forget_frees_the_slot_of_a_failed_fill():
    d = TierDirectory(dram_slots=1)
    saved(d, range(1))
    d.forget([h(0)])
    assert d.where(h(0)) is None
    saved(d, range(1, 2))
    assert d.where(h(1)) is Tier.DRAM


def test_reset_empties_both_tiers():
    d = TierDirectory(dram_slots=1, ssd_blocks=2)
    saved_one_per_step(d, range(2))
    ops: list = []
    d.reset(ops)
    assert d.where(h(0)) is None and d.where(h(1)) is None and ops == [("reset",)]


def test_a_directory_needs_dram():
    with pytest.raises(ValueError):
        TierDirectory(dram_slots=0)
