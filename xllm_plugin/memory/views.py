"""Per-request virtual ranges (slots): what each maps, which to reuse, what to map next. Pure.

A *slot* is one request's logically contiguous range of ``max_pages`` page positions.
:meth:`ViewTable.bind` is told the physical pages a request's positions must show (its
block-table row in vLLM) and answers with the map calls that make the slot show them:
only positions whose current page differs, coalesced into runs of consecutive positions
holding consecutive pages (one call each, and one VMA each on Linux).

Slots outlive requests. When a request finishes (or is preempted) its slot is *parked*
with its mappings intact, on a reuse list. A new request first looks for a parked slot
that already maps a prefix of its pages: its own (resumed after preemption), or one
whose first pages equal its first pages (in vLLM: a prefix-cache hit on the same
blocks). Those positions need no map call ("reuse hits"). Otherwise it takes a free
slot, else the least recently parked one, whose stale positions are simply overwritten.

Pages known before they are needed (vLLM allocated them ahead; positions ``>= needed``)
come back as ``ahead`` runs that the caller may map asynchronously; a later step that
needs such a position finds it mapped ("pre-map hit").

The VMA estimate bounds what the process's mappings cost against ``vm.max_map_count``:
per plane, a slot costs at most one VMA per run plus one ``PROT_NONE`` gap after it.
When a bind would exceed ``vma_budget``, parked slots are dropped (unmapped whole) first;
if that is not enough the request gets no slot and the caller falls back to reading its
pages through the block table. That is decided before anything is mapped, and the request
is not offered a slot again until room appears (a slot parked or mappings dropped): under
VMA pressure a refused request costs one dictionary lookup per step, not a map and an
unmap of its pages.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

UNMAPPED = -1


class SlotState(IntEnum):
    FREE = 0  # maps nothing
    ACTIVE = 1  # bound to a live request
    PARKED = 2  # its request finished or was preempted; mappings kept for reuse


@dataclass(frozen=True)
class MapRun:
    """Map ``count`` pages starting at ``page`` to positions ``position..`` of ``slot``."""

    slot: int
    position: int
    page: int
    count: int


@dataclass
class Binding:
    """What the caller must do so that ``slot`` shows the request's pages.

    ``slot is None`` means no slot could be given within the VMA budget: read this
    request's KV through its page list instead. ``drop`` lists slots to unmap whole
    (done before ``runs``); ``runs`` must be mapped before the request's attention
    runs; ``ahead`` may be mapped in the background.
    """

    slot: int | None
    runs: list[MapRun] = field(default_factory=list)
    ahead: list[MapRun] = field(default_factory=list)
    drop: list[int] = field(default_factory=list)
    dropped_keys: list[Hashable] = field(default_factory=list)  # last owners of dropped slots
    reuse_hits: int = 0
    premap_hits: int = 0
    premap_misses: int = 0
    fresh: bool = False  # the key was not bound before this call
    steady: bool = False  # nothing changed: same pages shown, or still no room (slot None)

    @property
    def mapped_pages(self) -> int:
        return sum(run.count for run in self.runs) + sum(run.count for run in self.ahead)


def coalesce(slot: int, positions: np.ndarray, pages: np.ndarray) -> list[MapRun]:
    """Group sorted ``positions`` (with their ``pages``) into runs mappable in one call."""
    if positions.size == 0:
        return []
    breaks = np.flatnonzero((np.diff(positions) != 1) | (np.diff(pages) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [positions.size]))
    return [MapRun(slot, int(positions[s]), int(pages[s]), int(e - s))
            for s, e in zip(starts, ends, strict=True)]


def count_runs(mapped: np.ndarray) -> int:
    """Maximal runs of mapped positions whose pages are consecutive (one VMA each)."""
    valid = mapped >= 0
    if not valid.any():
        return 0
    follows = np.zeros_like(valid)
    follows[1:] = valid[1:] & valid[:-1] & (mapped[1:] == mapped[:-1] + 1)
    return int(np.count_nonzero(valid & ~follows))


class ViewTable:
    """Slots, their mappings and the reuse list, for ``num_slots`` ranges of ``max_pages``."""

    def __init__(self, num_slots: int, max_pages: int, *, planes: int = 1,
                 vma_budget: int | None = None) -> None:
        if num_slots < 1 or max_pages < 1:
            raise ValueError("need at least one slot of at least one page")
        self.num_slots = num_slots
        self.max_pages = max_pages
        self.planes = planes
        self.vma_budget = vma_budget
        self.mapped = np.full((num_slots, max_pages), UNMAPPED, dtype=np.int64)
        self.state = [SlotState.FREE] * num_slots
        self.key: list[Hashable | None] = [None] * num_slots  # owner, or last owner if parked
        self.needed = [0] * num_slots  # positions the active owner reads now
        self.length = [0] * num_slots  # positions the active owner holds pages for
        self._ahead: list[set[int]] = [set() for _ in range(num_slots)]
        self._runs = [0] * num_slots
        self._runs_total = 0  # sum(self._runs), kept as it changes
        # Room in the VMA budget appears only when a slot is parked or mappings go away;
        # this counts those events, and a key refused a slot is not offered one again
        # (another bind, and a map and unmap of its pages) until it has moved.
        self._room_epoch = 0
        self._refused: dict[Hashable, int] = {}  # key -> _room_epoch when it was refused
        self._by_key: dict[Hashable, int] = {}  # active keys
        self._parked: OrderedDict[int, None] = OrderedDict()  # least recently parked first
        self._parked_by_key: dict[Hashable, int] = {}
        self._parked_by_first: dict[int, set[int]] = {}

    # -- queries -------------------------------------------------------------------------

    def slot_of(self, key: Hashable) -> int | None:
        return self._by_key.get(key)

    def parked_slot_of(self, key: Hashable) -> int | None:
        return self._parked_by_key.get(key)

    @property
    def active_keys(self) -> list[Hashable]:
        return list(self._by_key)

    def slot_counts(self) -> dict[str, int]:
        active, parked = len(self._by_key), len(self._parked)
        return {"free": self.num_slots - active - parked, "active": active, "parked": parked}

    @property
    def vma_estimate(self) -> int:
        """Upper bound on the VMAs all slots' mappings cost (per plane: a run and a gap)."""
        return self.planes * 2 * self._runs_total

    # -- binding -------------------------------------------------------------------------

    def bind(self, key: Hashable, pages: Sequence[int] | np.ndarray, needed: int | None = None,
             prefer_slot: int | None = None, decode: bool = True) -> Binding:
        """Make ``key``'s slot show ``pages`` at positions 0.. (``needed`` of them now).

        ``pages[needed:]`` are known ahead of need and come back as ``ahead`` runs.
        ``prefer_slot`` (a parked slot) is taken over if given. Pre-map hits and misses
        are counted only when ``decode`` (a prefill chunk's pages cannot be known ahead).
        """
        pages = np.asarray(pages, dtype=np.int64)
        needed = int(pages.size if needed is None else needed)
        if pages.size > self.max_pages or needed > pages.size or needed < 0:
            raise ValueError(f"{pages.size} pages ({needed} needed) do not fit a slot of "
                             f"{self.max_pages}")
        slot = self._by_key.get(key)
        if slot is not None and needed == self.needed[slot] and pages.size == self.length[slot] \
                and (self.mapped[slot, :pages.size] == pages).all():
            # A decode step inside the pages it already shows (most steps): nothing to map,
            # count or check (no mapping changed, so the VMA estimate did not either).
            return Binding(slot=slot, steady=True)
        if slot is None and self._refused.get(key) == self._room_epoch:
            return Binding(slot=None, steady=True)  # still no room: keep the page list
        binding = Binding(slot=None)
        previously_needed = self.needed[slot] if slot is not None else 0
        if slot is None:
            binding.fresh = True
            slot = self._choose_slot(key, pages, prefer_slot, binding)
            if slot is None:
                return binding
            self._activate(slot, key)
        binding.slot = slot
        mapped = self.mapped[slot]
        wanted = mapped[:pages.size]
        differ = np.flatnonzero(wanted != pages)
        demand = differ[differ < needed]
        ahead = differ[differ >= needed]
        after = mapped.copy()
        after[differ] = pages[differ]
        runs = count_runs(after)
        if not self._make_room(self._runs_total - self._runs[slot] + runs, binding):
            # No view within the VMA budget: the caller reads this request's pages through
            # the page list. Decided before mapping anything, so a slot that showed nothing
            # is simply let go; one that showed pages is unmapped whole.
            if self._runs[slot]:
                binding.drop.append(slot)
            self._free(slot)
            self._refused[key] = self._room_epoch
            binding.slot = None
            return binding

        # Accounting, before the table changes.
        if binding.fresh:
            binding.reuse_hits = int(np.count_nonzero(wanted[:needed] == pages[:needed]))
        elif decode:
            ahead_set = self._ahead[slot]
            growth = range(previously_needed, needed)
            demand_set = set(demand.tolist())
            for position in growth:
                if position in ahead_set and position not in demand_set:
                    binding.premap_hits += 1
                else:
                    binding.premap_misses += 1
        self._ahead[slot] = {p for p in self._ahead[slot] if p >= needed}
        self._ahead[slot].update(ahead.tolist())

        binding.runs = coalesce(slot, demand, pages[demand])
        binding.ahead = coalesce(slot, ahead, pages[ahead])
        mapped[differ] = pages[differ]
        self.needed[slot] = needed
        self.length[slot] = int(pages.size)
        self._set_runs(slot, runs)
        return binding

    def release(self, key: Hashable) -> int | None:
        """``key`` finished or was preempted: park its slot (mappings kept) for reuse."""
        self._refused.pop(key, None)
        slot = self._by_key.pop(key, None)
        if slot is None:
            return None
        self._room_epoch += 1  # a parked slot may be dropped to make room
        self.state[slot] = SlotState.PARKED
        self.needed[slot] = 0
        self.length[slot] = 0
        self._ahead[slot].clear()
        self._parked[slot] = None
        old = self._parked_by_key.get(key)
        if old is not None and old != slot:
            self._parked_by_key.pop(key)
        self._parked_by_key[key] = slot
        first = int(self.mapped[slot, 0])
        if first != UNMAPPED:
            self._parked_by_first.setdefault(first, set()).add(slot)
        return slot

    def drop_slot(self, slot: int) -> None:
        """Free one parked slot (its last owner's pages left the reuse list); unmap it whole."""
        if self.state[slot] != SlotState.PARKED:
            raise ValueError(f"slot {slot} is {self.state[slot].name}, not PARKED")
        self._free(slot)

    def drop_parked(self, count: int | None = None) -> list[int]:
        """Free up to ``count`` least recently parked slots (all if None); unmap them whole."""
        dropped = []
        while self._parked and (count is None or len(dropped) < count):
            slot = next(iter(self._parked))
            self._free(slot)
            dropped.append(slot)
        return dropped

    # -- internals -----------------------------------------------------------------------

    def _choose_slot(self, key: Hashable, pages: np.ndarray, prefer_slot: int | None,
                     binding: Binding) -> int | None:
        if prefer_slot is not None and self.state[prefer_slot] == SlotState.PARKED:
            return prefer_slot
        own = self._parked_by_key.get(key)
        if own is not None:
            return own
        if pages.size:
            best, best_len = None, 0
            for slot in self._parked_by_first.get(int(pages[0]), ()):
                common = self._common_prefix(self.mapped[slot], pages)
                if common > best_len:
                    best, best_len = slot, common
            if best is not None:
                return best
        for slot, state in enumerate(self.state):
            if state == SlotState.FREE:
                return slot
        if self._parked:
            return next(iter(self._parked))
        return None

    @staticmethod
    def _common_prefix(mapped: np.ndarray, pages: np.ndarray) -> int:
        n = min(mapped.size, pages.size)
        mismatch = np.flatnonzero(mapped[:n] != pages[:n])
        return int(mismatch[0]) if mismatch.size else n

    def _activate(self, slot: int, key: Hashable) -> None:
        if self.state[slot] == SlotState.PARKED:
            self._unpark(slot)
        self.state[slot] = SlotState.ACTIVE
        self.key[slot] = key
        self._by_key[key] = slot
        self._refused.pop(key, None)
        self._ahead[slot].clear()
        self.needed[slot] = 0
        self.length[slot] = 0

    def _unpark(self, slot: int) -> None:
        self._parked.pop(slot, None)
        last = self.key[slot]
        if self._parked_by_key.get(last) == slot:
            del self._parked_by_key[last]
        first = int(self.mapped[slot, 0])
        slots = self._parked_by_first.get(first)
        if slots is not None:
            slots.discard(slot)
            if not slots:
                del self._parked_by_first[first]

    def _free(self, slot: int) -> None:
        if self.state[slot] == SlotState.PARKED:
            self._unpark(slot)
        elif self.state[slot] == SlotState.ACTIVE:
            self._by_key.pop(self.key[slot], None)
        self.state[slot] = SlotState.FREE
        self.key[slot] = None
        self.needed[slot] = 0
        self.length[slot] = 0
        self._ahead[slot].clear()
        self.mapped[slot] = UNMAPPED
        self._set_runs(slot, 0)

    def _set_runs(self, slot: int, runs: int) -> None:
        if runs < self._runs[slot]:
            self._room_epoch += 1
        self._runs_total += runs - self._runs[slot]
        self._runs[slot] = runs

    def _make_room(self, runs_total: int, binding: Binding) -> bool:
        """Whether ``runs_total`` runs fit the VMA budget, after dropping parked slots
        (least recently parked first) as far as needed; dropped slots go to ``binding``."""
        if self.vma_budget is None:
            return True
        while self.planes * 2 * runs_total > self.vma_budget and self._parked:
            victim = next(iter(self._parked))
            runs_total -= self._runs[victim]
            binding.dropped_keys.append(self.key[victim])
            self._free(victim)
            binding.drop.append(victim)
        return self.planes * 2 * runs_total <= self.vma_budget

    # -- census --------------------------------------------------------------------------

    def census(self, num_pages: int, unmapped_owned: Iterable[int] = ()) -> dict[str, int]:
        """Physical pages by state, as seen from the views.

        ``mapped``: shown by an active slot (needed now or mapped ahead); ``reusable``:
        shown only by parked slots; ``allocated``: held by a live request but shown by no
        slot (``unmapped_owned``, e.g. requests on the fallback path); ``free``: the rest.
        """
        active = list(self._by_key.values())  # the indexes, not a scan of every slot's state
        parked = list(self._parked)

        def pages_in(slots: list[int], held_only: bool) -> set[int]:
            if not slots:
                return set()
            block = self.mapped[slots]
            valid = block >= 0
            if held_only:  # stale positions past a reused slot's new length do not count
                lengths = np.asarray([self.length[s] for s in slots])[:, None]
                valid &= np.arange(self.max_pages)[None, :] < lengths
            return set(np.unique(block[valid]).tolist())

        mapped = pages_in(active, held_only=True)
        reusable = pages_in(parked, held_only=False) - mapped
        allocated = set(unmapped_owned) - mapped
        reusable -= allocated
        used = len(mapped) + len(reusable) + len(allocated)
        return {"free": max(0, num_pages - used), "allocated": len(allocated),
                "mapped": len(mapped), "reusable": len(reusable)}

    def check(self) -> None:
        """Raise AssertionError if the table's indexes disagree (used by tests)."""
        for key, slot in self._by_key.items():
            assert self.state[slot] == SlotState.ACTIVE and self.key[slot] == key
        for slot, state in enumerate(self.state):
            if state == SlotState.FREE:
                assert (self.mapped[slot] == UNMAPPED).all()
            if state == SlotState.PARKED:
                assert slot in self._parked
            assert self._runs[slot] == count_runs(self.mapped[slot])
        assert self._runs_total == sum(self._runs)
        assert not set(self._refused) & set(self._by_key)
        assert self.slot_counts() == {state.name.lower(): self.state.count(state)
                                      for state in SlotState}
        assert set(self._parked) == {s for s, st in enumerate(self.state)
                                     if st == SlotState.PARKED}
        for key, slot in self._parked_by_key.items():
            assert self.state[slot] == SlotState.PARKED and self.key[slot] == key
        if self.vma_budget is not None:
            assert self.vma_estimate <= self.vma_budget or not any(
                st == SlotState.PARKED for st in self.state), "over budget with parked slots"
