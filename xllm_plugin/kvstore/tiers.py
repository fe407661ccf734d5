"""Which KV block sits in which local tier, and the ordered I/O plan that keeps it so.

Pure bookkeeping, no I/O and no torch: the scheduler-side connector owns the
only copy of this directory and decides every move; the workers execute the
resulting ``Op`` lists in order. Because one worker thread runs every step's
ops first-in first-out, a DRAM slot or SSD file can be reassigned in a plan
as soon as the ops that read its old content were planned before the ops that
overwrite it, with no locks and no acknowledgements.

Tiers below the engine's KV cache (the paper's HBM > DRAM > SSD):

- **DRAM**: ``dram_slots`` block-sized slots, least recently used first out.
  Inclusion: every block the engine computes or loads is written here too (a
  write-through on the step that fills it), so a block in the engine cache is
  also in DRAM while DRAM is at least as large as the engine cache.
- **SSD**: ``ssd_blocks`` files below DRAM. A block enters SSD when DRAM
  evicts it (LRU demotion); SSD evicts its own least recently used file when
  full. A block read back from SSD is promoted into DRAM and keeps its file,
  so demoting it again costs no write.
- The global store (Mooncake) is not tracked here: it is shared by every
  instance and evicts on its own; the connector asks it directly.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

BlockHash = bytes  # vLLM's block hash (Request.block_hashes entries)


class Tier(str, Enum):
    DRAM = "dram"
    SSD = "ssd"
    STORE = "store"


# KV-event media, as the router's index reads them (vLLM's own are "GPU", "CPU", "STORAGE").
MEDIUM = {Tier.DRAM: "CPU", Tier.SSD: "STORAGE", Tier.STORE: "MOONCAKE_STORE"}


# --- ops: what a worker does, in this order ----------------------------------------------------
# Plain tuples so the per-step metadata pickles cheaply between processes.

SAVE = "save"            # (SAVE, staging_row, slot, hash): this step's gathered block -> DRAM slot
DEMOTE = "demote"        # (DEMOTE, slot, hash): DRAM slot -> SSD file
SSD_DROP = "ssd_drop"    # (SSD_DROP, hash): delete the SSD file
FILL_SSD = "fill_ssd"    # (FILL_SSD, slot, hash): SSD file -> DRAM slot
FILL_STORE = "fill_store"  # (FILL_STORE, slot, hash): global store -> DRAM slot
PUT = "put"              # (PUT, slot, hash): DRAM slot -> global store
SCATTER = "scatter"      # (SCATTER, req_id, ((slot, block_id, hash), ...), report): DRAM -> KV
                         # cache; report: tell vLLM the (asynchronous) load is done
RESET = "reset"          # (RESET,): forget every slot and delete every SSD file

Op = tuple


@dataclass
class TierEvents:
    """Tier changes since the last ``take``, in order: (stored?, medium, hash)."""

    items: list[tuple[bool, str, BlockHash]] = field(default_factory=list)

    def stored(self, tier: Tier, h: BlockHash) -> None:
        self.items.append((True, MEDIUM[tier], h))

    def removed(self, tier: Tier, h: BlockHash) -> None:
        self.items.append((False, MEDIUM[tier], h))

    def take(self) -> list[tuple[bool, str, list[BlockHash]]]:
        """Consecutive changes of one kind and medium grouped into one event each."""
        out: list[tuple[bool, str, list[BlockHash]]] = []
        for stored, medium, h in self.items:
            if out and out[-1][0] == stored and out[-1][1] == medium:
                out[-1][2].append(h)
            else:
                out.append((stored, medium, [h]))
        self.items = []
        return out


class TierDirectory:
    """DRAM slots and SSD files by block hash, with LRU order and inclusion."""

    def __init__(self, dram_slots: int, ssd_blocks: int = 0) -> None:
        if dram_slots <= 0:
            raise ValueError("the DRAM tier needs at least one slot")
        if ssd_blocks < 0:
            raise ValueError("ssd_blocks must be >= 0")
        self.dram_slots = dram_slots
        self.ssd_blocks = ssd_blocks
        self._dram: OrderedDict[BlockHash, int] = OrderedDict()  # least recent first
        self._free: list[int] = list(range(dram_slots - 1, -1, -1))
        self._ssd: OrderedDict[BlockHash, None] = OrderedDict()
        self.events = TierEvents()
        self.demotions = 0
        self.ssd_evictions = 0

    # --- queries --------------------------------------------------------------------------------

    def where(self, h: BlockHash) -> Tier | None:
        """The fastest local tier holding ``h``."""
        if h in self._dram:
            return Tier.DRAM
        if h in self._ssd:
            return Tier.SSD
        return None

    def slot_of(self, h: BlockHash) -> int | None:
        return self._dram.get(h)

    def local_run(self, hashes: Sequence[BlockHash], start: int, limit: int) -> list[Tier]:
        """Tiers of the consecutive blocks ``hashes[start:]`` held locally, at most ``limit``."""
        out: list[Tier] = []
        for h in hashes[start:start + limit]:
            tier = self.where(h)
            if tier is None:
                break
            out.append(tier)
        return out

    def dram_hashes(self) -> list[BlockHash]:
        return list(self._dram)

    def ssd_hashes(self) -> list[BlockHash]:
        return list(self._ssd)

    # --- changes (each appends the ops that make the workers agree) -----------------------------

    def touch(self, h: BlockHash) -> None:
        """``h`` was used: most recently used in every tier holding it."""
        if h in self._dram:
            self._dram.move_to_end(h)
        if h in self._ssd:
            self._ssd.move_to_end(h)

    def admit(self, h: BlockHash, ops: list[Op], protected: set[BlockHash]) -> int | None:
        """A DRAM slot for ``h`` (which the caller then fills), evicting the least
        recently used unprotected block (demoted to SSD) if DRAM is full.

        Returns the slot ``h`` already has if it is in DRAM, or None when every
        slot holds a protected block (this step already relies on all of them).
        """
        slot = self._dram.get(h)
        if slot is not None:
            self._dram.move_to_end(h)
            return slot
        if self._free:
            slot = self._free.pop()
        else:
            victim = next((v for v in self._dram if v not in protected), None)
            if victim is None:
                return None
            slot = self._dram.pop(victim)
            self.events.removed(Tier.DRAM, victim)
            self._demote(victim, slot, ops, protected)
        self._dram[h] = slot
        self.events.stored(Tier.DRAM, h)
        return slot

    def _demote(self, h: BlockHash, slot: int, ops: list[Op], protected: set[BlockHash]) -> None:
        if self.ssd_blocks == 0:
            return
        if h in self._ssd:
            self._ssd.move_to_end(h)  # its file is still valid: no write
            return
        while len(self._ssd) >= self.ssd_blocks:
            old = next((v for v in self._ssd if v not in protected), None)
            if old is None:
                return  # every file is needed by this step: the victim is dropped
            del self._ssd[old]
            ops.append((SSD_DROP, old))
            self.events.removed(Tier.SSD, old)
            self.ssd_evictions += 1
        self._ssd[h] = None
        ops.append((DEMOTE, slot, h))
        self.events.stored(Tier.SSD, h)
        self.demotions += 1

    def forget(self, hashes: Iterable[BlockHash]) -> None:
        """Drop blocks whose content turned out invalid (a failed load into their slot)."""
        for h in hashes:
            slot = self._dram.pop(h, None)
            if slot is not None:
                self._free.append(slot)
                self.events.removed(Tier.DRAM, h)

    def reset(self, ops: list[Op]) -> None:
        """Empty both tiers (vLLM's reset of the external prefix cache)."""
        for h in self._dram:
            self.events.removed(Tier.DRAM, h)
        for h in self._ssd:
            self.events.removed(Tier.SSD, h)
        self._dram.clear()
        self._ssd.clear()
        self._free = list(range(self.dram_slots - 1, -1, -1))
        ops.append((RESET,))


@dataclass
class StepPlan:
    """Everything the workers do for one engine step, in order.

    ``save_block_ids``: engine KV blocks to gather into the step's staging
    buffer after the forward pass (row ``i`` is ``save_block_ids[i]``);
    ``ops``: the ordered I/O that follows, run by the worker's I/O thread;
    ``ops[:load_ops_end]`` are the step's loads (and what must precede them),
    which a synchronous load runs before the forward pass.
    """

    save_block_ids: list[int] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    load_ops_end: int = 0

    def __bool__(self) -> bool:
        return bool(self.ops)


class StepPlanner:
    """Builds one step's plan against the directory; protects what the step uses."""

    def __init__(self, directory: TierDirectory, use_store: bool) -> None:
        self.directory = directory
        self.use_store = use_store
        self.plan = StepPlan()
        self._protected: set[BlockHash] = set()
        self._puts: list[Op] = []

    def load(self, req_id: str, blocks: Sequence[tuple[BlockHash, int]],
             report: bool = True) -> dict[Tier, int]:
        """Plan loading ``(hash, engine block id)`` pairs into the engine cache.

        Each block comes from the fastest tier holding it now (DRAM, else SSD,
        else the store) and lands in DRAM on its way (promotion keeps
        inclusion). A block that gets no DRAM slot is scattered from slot -1,
        which the worker reports as a failed block, so vLLM recomputes it.
        Returns blocks per source tier.
        """
        d = self.directory
        self._protected.update(h for h, _ in blocks)
        sources: dict[Tier, int] = {}
        targets: list[tuple[int, int, BlockHash]] = []
        for h, block_id in blocks:
            tier = d.where(h) or Tier.STORE
            slot = d.admit(h, self.plan.ops, self._protected)
            if slot is None:
                targets.append((-1, block_id, h))
                continue
            if tier is Tier.SSD:
                self.plan.ops.append((FILL_SSD, slot, h))
            elif tier is Tier.STORE:
                self.plan.ops.append((FILL_STORE, slot, h))
            sources[tier] = sources.get(tier, 0) + 1
            targets.append((slot, block_id, h))
        self.plan.ops.append((SCATTER, req_id, tuple(targets), report))
        return sources

    def end_loads(self) -> None:
        """Everything planned so far must run before a synchronous load's forward pass."""
        self.plan.load_ops_end = len(self.plan.ops)

    def save(self, blocks: Sequence[tuple[BlockHash, int]]) -> int:
        """Plan saving freshly computed ``(hash, engine block id)`` pairs; returns how many.

        A block already in DRAM is only touched (inclusion holds, nothing to
        copy). New blocks are gathered after the forward pass, written to DRAM
        and put to the store at the end of the step.
        """
        d = self.directory
        saved = 0
        for h, block_id in blocks:
            self._protected.add(h)
            if d.slot_of(h) is not None:
                d.touch(h)
                continue
            slot = d.admit(h, self.plan.ops, self._protected)
            if slot is None:
                continue
            row = len(self.plan.save_block_ids)
            self.plan.save_block_ids.append(block_id)
            self.plan.ops.append((SAVE, row, slot, h))
            if self.use_store:
                self._puts.append((PUT, slot, h))
            saved += 1
        return saved

    def finish(self) -> StepPlan:
        """The step's plan: puts last, so the store gets them in one batch."""
        self.plan.ops.extend(self._puts)
        for _, _, h in self._puts:
            self.directory.events.stored(Tier.STORE, h)
        self._puts = []
        return self.plan
