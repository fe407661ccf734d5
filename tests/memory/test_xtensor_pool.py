"""xTensor's physical page pool: state machine invariants under random operation sequences."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from xllm_plugin.memory.pool import OutOfPages, PagePool, PageState

NUM_PAGES = 24


class PagePoolMachine(RuleBasedStateMachine):
    """Random allocate / map / finish / reuse / evict / release; the pool must stay sound."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = PagePool(NUM_PAGES)
        self.live: set[int] = set()  # owners that hold pages and are not finished
        self.finished: set[int] = set()
        self.next_owner = 0

    def _new_owner(self) -> int:
        self.next_owner += 1
        return self.next_owner

    @rule(count=st.integers(0, 8))
    def start(self, count: int) -> None:
        owner = self._new_owner()
        if count > self.pool.num_free:
            with pytest.raises(OutOfPages):
                self.pool.allocate(owner, count)
            return
        pages = self.pool.allocate(owner, count)
        assert len(pages) == count
        assert all(self.pool.state(p) == PageState.ALLOCATED for p in pages)
        if count:
            self.live.add(owner)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), count=st.integers(1, 4))
    def grow_and_map(self, data: st.DataObject, count: int) -> None:
        owner = data.draw(st.sampled_from(sorted(self.live)))
        if count <= self.pool.num_free:
            before = self.pool.pages_of(owner)
            new = self.pool.allocate(owner, count)
            assert self.pool.pages_of(owner) == before + new  # position order is kept
        unmapped = [p for p in self.pool.pages_of(owner)
                    if self.pool.state(p) == PageState.ALLOCATED]
        self.pool.mark_mapped(owner, unmapped)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        owner = data.draw(st.sampled_from(sorted(self.live)))
        pages = self.pool.pages_of(owner)
        self.pool.finish(owner)
        self.live.discard(owner)
        self.finished.add(owner)
        assert all(self.pool.state(p) == PageState.REUSABLE for p in pages)

    @precondition(lambda self: self.finished)
    @rule(count=st.integers(0, 10), keep_extra=st.integers(0, 2))
    def reuse(self, count: int, keep_extra: int) -> None:
        sizes = {o: len(self.pool.pages_of(o)) for o in self.pool.reusable_owners}
        owner = self._new_owner()
        result = self.pool.reuse(owner, count, keep_extra=keep_extra)
        assert result is not None
        fitting = [s for s in sizes.values() if s >= count]
        # Best fit: the smallest set that fits, else the largest set.
        assert sizes[result.previous_owner] == (min(fitting) if fitting else max(sizes.values()))
        assert len(result.kept) == min(sizes[result.previous_owner], count + keep_extra)
        assert self.pool.pages_of(owner) == result.kept
        assert all(self.pool.state(p) == PageState.FREE for p in result.freed)
        self.finished.discard(result.previous_owner)
        if result.kept:
            self.live.add(owner)

    @precondition(lambda self: self.finished)
    @rule()
    def evict(self) -> None:
        oldest = self.pool.reusable_owners[0]
        owner, pages = self.pool.evict_reusable()
        assert owner == oldest  # least recently finished goes first
        assert all(self.pool.state(p) == PageState.FREE for p in pages)
        self.finished.discard(owner)

    @precondition(lambda self: self.live or self.finished)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        owner = data.draw(st.sampled_from(sorted(self.live | self.finished)))
        pages = self.pool.release(owner)
        assert pages and all(self.pool.state(p) == PageState.FREE for p in pages)
        self.live.discard(owner)
        self.finished.discard(owner)

    @invariant()
    def sound(self) -> None:
        self.pool.check()  # no page owned twice, none lost, states match owners
        counts = self.pool.counts()
        assert sum(counts.values()) == NUM_PAGES
        assert counts["free"] == self.pool.num_free

    def teardown(self) -> None:
        for owner in list(self.live | self.finished):
            self.pool.release(owner)
        self.pool.check()
        assert self.pool.num_free == NUM_PAGES  # every page came back


TestPagePool = PagePoolMachine.TestCase
TestPagePool.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_finished_set_is_handed_over_whole_without_new_pages() -> None:
    pool = PagePool(8)
    pages = pool.allocate("a", 3)
    pool.mark_mapped("a", pages)
    pool.finish("a")
    result = pool.reuse("b", 3, keep_extra=0)
    assert result is not None and result.previous_owner == "a"
    assert pool.pages_of("b") == pages and result.freed == []
    assert all(pool.state(p) == PageState.MAPPED for p in pages)
    assert pool.num_free == 5


def test_surplus_of_a_reused_set_is_freed_beyond_one_page_ahead() -> None:
    pool = PagePool(8)
    pool.mark_mapped("long", pool.allocate("long", 6))
    pool.finish("long")
    result = pool.reuse("short", 2, keep_extra=1)
    assert result is not None
    assert len(result.kept) == 3 and len(result.freed) == 3
    assert pool.num_free == 5


def test_allocating_for_a_finished_owner_is_refused() -> None:
    pool = PagePool(4)
    pool.allocate("a", 1)
    pool.finish("a")
    with pytest.raises(ValueError):
        pool.allocate("a", 1)
