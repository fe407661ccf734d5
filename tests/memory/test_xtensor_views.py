"""Per-request virtual ranges: every bind leaves each slot showing exactly its request's pages."""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from xllm_plugin.memory.views import UNMAPPED, Binding, MapRun, ViewTable, count_runs

SLOTS, MAX_PAGES, PLANES = 4, 12, 2


class FakeMemory:
    """What the mapper would do: slot positions -> pages, per the bindings' instructions."""

    def __init__(self) -> None:
        self.shown = np.full((SLOTS, MAX_PAGES), UNMAPPED)
        self.calls = 0

    def apply(self, binding: Binding) -> None:
        for slot in binding.drop:
            self.shown[slot] = UNMAPPED
        for run in [*binding.runs, *binding.ahead]:
            assert run.count >= 1
            self.shown[run.slot, run.position:run.position + run.count] = \
                np.arange(run.page, run.page + run.count)
            self.calls += PLANES


class ViewTableMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = ViewTable(SLOTS, MAX_PAGES, planes=PLANES, vma_budget=PLANES * 2 * 9)
        self.memory = FakeMemory()
        self.pages: dict[int, list[int]] = {}
        self.needed: dict[int, int] = {}
        self.next_key = 0
        self.next_page = 1000

    def _fresh(self, count: int) -> list[int]:
        start = self.next_page
        self.next_page += count + 3
        return list(range(start, start + count))

    def _bind(self, key: int) -> Binding:
        binding = self.table.bind(key, self.pages[key], self.needed[key])
        self.memory.apply(binding)
        if binding.slot is not None:
            shown = self.memory.shown[binding.slot, :len(self.pages[key])]
            assert shown.tolist() == self.pages[key]  # the slot shows the request, in order
            for run in binding.runs:
                assert run.position + run.count <= self.needed[key]
            for run in binding.ahead:
                assert run.position >= self.needed[key]
        return binding

    @rule(data=st.data(), length=st.integers(1, MAX_PAGES), share=st.booleans())
    def new_request(self, data: st.DataObject, length: int, share: bool) -> None:
        self.next_key += 1
        key = self.next_key
        prefix: list[int] = []
        donors = sorted(k for k in self.pages if self.pages[k])
        if share and donors:  # a prefix-cache hit: same first pages as another request
            donor = self.pages[data.draw(st.sampled_from(donors))]
            prefix = donor[:data.draw(st.integers(1, min(len(donor), length)))]
        self.pages[key] = prefix + self._fresh(length - len(prefix))
        self.needed[key] = data.draw(st.integers(0, length))
        self._bind(key)

    @precondition(lambda self: self.pages)
    @rule(data=st.data(), grow=st.integers(0, 3))
    def step(self, data: st.DataObject, grow: int) -> None:
        key = data.draw(st.sampled_from(sorted(self.pages)))
        room = MAX_PAGES - len(self.pages[key])
        self.pages[key] += self._fresh(min(grow, room))
        self.needed[key] = data.draw(st.integers(self.needed[key], len(self.pages[key])))
        self._bind(key)

    @precondition(lambda self: self.pages)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.pages)))
        self.table.release(key)
        del self.pages[key], self.needed[key]

    @precondition(lambda self: self.pages)
    @rule(data=st.data(), keep=st.integers(0, MAX_PAGES))
    def preempt_and_resume(self, data: st.DataObject, keep: int) -> None:
        key = data.draw(st.sampled_from(sorted(self.pages)))
        self.table.release(key)
        kept = self.pages[key][:keep]  # prefix cache kept some blocks, the rest are new
        self.pages[key] = kept + self._fresh(len(self.pages[key]) - len(kept))
        self.needed[key] = len(self.pages[key])
        self._bind(key)

    @invariant()
    def consistent(self) -> None:
        self.table.check()
        active = [self.table.slot_of(k) for k in self.pages]
        bound = [s for s in active if s is not None]
        assert len(bound) == len(set(bound))  # no slot serves two live requests
        for slot in range(SLOTS):  # the table's idea of each slot is what memory shows
            assert (self.table.mapped[slot] == self.memory.shown[slot]).all()
        runs = sum(count_runs(self.memory.shown[s]) for s in range(SLOTS))
        assert self.table.vma_estimate == PLANES * 2 * runs


TestViewTable = ViewTableMachine.TestCase
TestViewTable.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


def test_runs_are_coalesced_for_consecutive_pages() -> None:
    table = ViewTable(2, 8)
    binding = table.bind("a", [5, 6, 7, 20, 21, 9], needed=6)
    assert binding.runs == [MapRun(0, 0, 5, 3), MapRun(0, 3, 20, 2), MapRun(0, 5, 9, 1)]


def test_growth_maps_only_the_new_page() -> None:
    table = ViewTable(2, 8)
    table.bind("a", [3, 4], needed=2)
    binding = table.bind("a", [3, 4, 9], needed=3)
    assert binding.runs == [MapRun(0, 2, 9, 1)] and binding.premap_misses == 1


def test_page_known_ahead_is_premapped_and_then_hit() -> None:
    table = ViewTable(2, 8)
    first = table.bind("a", [3, 4, 9], needed=2)
    assert first.runs == [MapRun(0, 0, 3, 2)] and first.ahead == [MapRun(0, 2, 9, 1)]
    second = table.bind("a", [3, 4, 9], needed=3)
    assert second.runs == [] and second.premap_hits == 1 and second.premap_misses == 0


def test_decode_step_within_shown_pages_is_steady_and_changes_nothing() -> None:
    table = ViewTable(2, 8, planes=2, vma_budget=100)
    table.bind("a", [3, 4, 9], needed=2)
    mapped, vmas = table.mapped.copy(), table.vma_estimate
    again = table.bind("a", [3, 4, 9], needed=2)
    assert again.steady and again.slot == 0 and again.runs == [] and again.ahead == []
    assert (table.mapped == mapped).all() and table.vma_estimate == vmas
    # The next page's growth is still judged against what was mapped ahead.
    grown = table.bind("a", [3, 4, 9], needed=3)
    assert not grown.steady and grown.premap_hits == 1
    # A different page behind an unchanged count is not steady: it is remapped.
    moved = table.bind("a", [3, 5, 9], needed=3)
    assert not moved.steady and moved.runs == [MapRun(0, 1, 5, 1)]
    table.check()


def test_prefix_sharing_request_reuses_a_parked_view() -> None:
    table = ViewTable(2, 8)
    table.bind("a", [3, 4, 5, 6], needed=4)
    table.release("a")
    binding = table.bind("b", [3, 4, 5, 11], needed=4)
    assert binding.slot == 0 and binding.reuse_hits == 3
    assert binding.runs == [MapRun(0, 3, 11, 1)]


def test_preempted_request_resumes_in_its_own_view() -> None:
    table = ViewTable(3, 8)
    table.bind("a", [1, 2, 3], needed=3)
    table.bind("b", [7, 8], needed=2)
    table.release("a")
    binding = table.bind("a", [1, 2, 30], needed=3)
    assert binding.slot == 0 and binding.reuse_hits == 2 and binding.runs == [MapRun(0, 2, 30, 1)]


def test_over_budget_drops_parked_views_then_falls_back() -> None:
    table = ViewTable(3, 8, planes=1, vma_budget=2 * 3)  # three runs in total
    table.bind("a", [1, 5, 9], needed=3)  # three runs
    table.release("a")
    binding = table.bind("b", [20, 40], needed=2)  # needs two runs: the parked view goes
    assert binding.slot is not None and binding.drop == [0]
    fallback = table.bind("c", [60, 80], needed=2)  # two more: over budget, nothing parked
    assert fallback.slot is None and table.slot_of("c") is None
    assert table.vma_estimate == 2 * 2  # only "b" is mapped


def test_refused_request_waits_for_room_without_mapping_anything() -> None:
    table = ViewTable(4, 8, planes=1, vma_budget=2 * 3)  # three runs in total
    table.bind("a", [1, 5, 9], needed=3)  # three runs: the budget is full
    refused = table.bind("b", [20, 40], needed=2)
    # Decided before mapping: a free slot that never showed a page needs no unmap.
    assert refused.slot is None and refused.runs == [] and refused.drop == []
    again = table.bind("b", [20, 40, 60], needed=3)  # grew, but no room appeared
    assert again.slot is None and again.steady and again.runs == []
    table.release("a")  # a parked slot can now be dropped for room
    bound = table.bind("b", [20, 40, 60], needed=3)
    assert bound.slot is not None and bound.drop == [0] and len(bound.runs) == 3
    table.check()
