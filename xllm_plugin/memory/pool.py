"""The physical page pool of xTensor: page states, owners and the reuse list. Pure bookkeeping.

Used where xTensor itself chooses physical pages (:class:`~xllm_plugin.memory.xtensor.XTensor`,
the paper's design). Inside vLLM, vLLM's block pool chooses the pages (so that prefix
caching and preemption keep working) and :mod:`xllm_plugin.memory.views` tracks what
each request's virtual range maps.

Page states (paper §4.3)::

    FREE ──allocate──> ALLOCATED ──mark_mapped──> MAPPED ──finish──> REUSABLE
      ^                    │                        │                    │
      └──── release ───────┴────────────────────────┘     reuse(new owner): MAPPED
      └──────────────────────── evict_reusable (least recently finished) ┘

A finished request's pages stay mapped in its virtual range and go on the reuse list as
one set; a new request of similar length takes the whole set (and the range) over with no
map call at all. Invariants, checked by :meth:`PagePool.check` and the property tests:
every page is in exactly one state, a non-free page has exactly one owner, and the free,
owned and reusable pages together are all pages.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from enum import IntEnum


class PageState(IntEnum):
    FREE = 0  # on the free list, mapped nowhere
    ALLOCATED = 1  # owned by a request, not yet mapped into its virtual range
    MAPPED = 2  # owned and mapped into the owner's virtual range
    REUSABLE = 3  # still mapped in a finished request's range, waiting on the reuse list


class OutOfPages(RuntimeError):
    """Fewer free pages than asked for (after the caller evicted what it could)."""


@dataclass(frozen=True)
class Reuse:
    """A reusable set handed to a new owner.

    ``kept`` are the set's first pages, in order, now MAPPED for the new owner (they
    stay where they are in the old owner's virtual range, which the new owner takes
    over); ``freed`` are surplus pages returned to the free list. Their stale mappings
    in that range are harmless: positions past a request's tokens are never read, and
    are remapped when the request grows into them.
    """

    previous_owner: Hashable
    kept: list[int]
    freed: list[int]


class PagePool:
    """Fixed set of ``num_pages`` physical pages with one owner each."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError("a page pool needs at least one page")
        self.num_pages = num_pages
        self._state = [PageState.FREE] * num_pages
        self._owner: list[Hashable | None] = [None] * num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._owned: dict[Hashable, list[int]] = {}
        self._reuse: OrderedDict[Hashable, None] = OrderedDict()  # least recently finished first

    # -- queries -------------------------------------------------------------------------

    def state(self, page: int) -> PageState:
        return self._state[page]

    def owner(self, page: int) -> Hashable | None:
        return self._owner[page]

    def pages_of(self, owner: Hashable) -> list[int]:
        """The owner's pages in position order (position i of its range maps page i)."""
        return list(self._owned.get(owner, ()))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def reusable_owners(self) -> list[Hashable]:
        """Finished owners on the reuse list, least recently finished first."""
        return list(self._reuse)

    def counts(self) -> dict[str, int]:
        counts = {state.name.lower(): 0 for state in PageState}
        for state in self._state:
            counts[state.name.lower()] += 1
        return counts

    # -- transitions ---------------------------------------------------------------------

    def allocate(self, owner: Hashable, count: int) -> list[int]:
        """Append ``count`` free pages to ``owner``'s pages (FREE -> ALLOCATED)."""
        if count < 0:
            raise ValueError("count must be >= 0")
        if owner in self._reuse:
            raise ValueError(f"owner {owner!r} has finished; its pages are reusable")
        if count > len(self._free):
            raise OutOfPages(f"asked for {count} pages, {len(self._free)} free")
        if count == 0:
            return []
        pages = [self._free.popleft() for _ in range(count)]
        for page in pages:
            self._state[page] = PageState.ALLOCATED
            self._owner[page] = owner
        self._owned.setdefault(owner, []).extend(pages)
        return pages

    def mark_mapped(self, owner: Hashable, pages: Sequence[int]) -> None:
        """ALLOCATED -> MAPPED, once the mapper has put the pages into the owner's range."""
        for page in pages:
            if self._owner[page] != owner or self._state[page] != PageState.ALLOCATED:
                raise ValueError(f"page {page} is {self._state[page].name} of "
                                 f"{self._owner[page]!r}, not ALLOCATED to {owner!r}")
        for page in pages:
            self._state[page] = PageState.MAPPED

    def finish(self, owner: Hashable) -> None:
        """The owner is done: its pages stay mapped, as one set on the reuse list."""
        pages = self._owned.get(owner)
        if not pages:
            self._owned.pop(owner, None)
            return
        if owner in self._reuse:
            return
        for page in pages:
            self._state[page] = PageState.REUSABLE
        self._reuse[owner] = None

    def reuse(self, new_owner: Hashable, count: int, keep_extra: int = 1) -> Reuse | None:
        """Hand the best-fitting reusable set to ``new_owner``, which needs ``count`` pages.

        Best fit: the smallest set with at least ``count`` pages, else the largest set
        (the caller allocates the rest). Up to ``keep_extra`` pages beyond ``count`` stay
        with the new owner, already mapped ahead of its growth; further surplus pages
        are freed so that no request holds more than that many unused pages.
        """
        if not self._reuse:
            return None
        if new_owner in self._owned:
            raise ValueError(f"owner {new_owner!r} already holds pages")
        sizes = {owner: len(self._owned[owner]) for owner in self._reuse}
        fitting = [owner for owner, size in sizes.items() if size >= count]
        chosen = (min(fitting, key=lambda o: sizes[o]) if fitting
                  else max(sizes, key=lambda o: sizes[o]))
        del self._reuse[chosen]
        pages = self._owned.pop(chosen)
        keep = min(len(pages), count + max(0, keep_extra))
        kept, freed = pages[:keep], pages[keep:]
        for page in kept:
            self._state[page] = PageState.MAPPED
            self._owner[page] = new_owner
        if kept:
            self._owned[new_owner] = kept
        self._return_free(freed)
        return Reuse(chosen, kept, freed)

    def evict_reusable(self) -> tuple[Hashable, list[int]] | None:
        """Free the least recently finished set (REUSABLE -> FREE); the caller unmaps it."""
        if not self._reuse:
            return None
        owner, _ = self._reuse.popitem(last=False)
        pages = self._owned.pop(owner)
        self._return_free(pages)
        return owner, pages

    def release(self, owner: Hashable) -> list[int]:
        """Free all of ``owner``'s pages, whatever their state; the caller unmaps them."""
        self._reuse.pop(owner, None)
        pages = self._owned.pop(owner, [])
        self._return_free(pages)
        return pages

    def _return_free(self, pages: Sequence[int]) -> None:
        for page in pages:
            self._state[page] = PageState.FREE
            self._owner[page] = None
        self._free.extend(pages)

    # -- invariants ----------------------------------------------------------------------

    def check(self) -> None:
        """Raise AssertionError if any invariant is broken (used by tests)."""
        seen: set[int] = set()
        for owner, pages in self._owned.items():
            assert pages, f"owner {owner!r} holds an empty page list"
            for page in pages:
                assert page not in seen, f"page {page} owned twice"
                seen.add(page)
                assert self._owner[page] == owner, f"page {page} owner mismatch"
                expected = {PageState.REUSABLE} if owner in self._reuse else \
                    {PageState.ALLOCATED, PageState.MAPPED}
                assert self._state[page] in expected, \
                    f"page {page} of {owner!r} is {self._state[page].name}"
        free = set(self._free)
        assert len(free) == len(self._free), "a page is on the free list twice"
        assert not free & seen, "a page is both free and owned"
        assert free | seen == set(range(self.num_pages)), "a page is lost"
        for page in free:
            assert self._state[page] == PageState.FREE and self._owner[page] is None
        assert all(owner in self._owned for owner in self._reuse)
