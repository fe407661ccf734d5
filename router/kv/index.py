"""Which instance holds which KV block: the router's picture of every prefix cache.

Pure data structure, no I/O: the KV event subscribers (``router/kv/events.py``)
and the simulator feed it the same three events vLLM publishes (block stored,
block removed, all blocks cleared) and policies read leading-prefix hit counts.

Layout: ``where[hash] -> set of instance ids`` answers lookups in
O(blocks in the request x instances holding them); per instance an
insertion-ordered map ``hash -> media`` (a block may sit in several tiers, e.g.
GPU and a CPU offload, and only leaves the instance when the last one drops it)
gives removal, clearing and a memory bound. When an instance holds more than
``max_blocks_per_instance`` blocks, its oldest-stored entries are forgotten
first; forgetting can only under-report a hit, never invent one.

Tiers: an engine with the plugin's KV store connector also publishes the blocks
of its DRAM (medium ``CPU``) and SSD (``STORAGE``) tiers, and the blocks it put
into the global Mooncake Store (``MOONCAKE_STORE``). Store blocks belong to no
instance: they are held by the pseudo-instance ``STORE_HOLDER``, and every
instance that ever published one is a store member that can load them.
``tier_hits`` reads the per-tier prefix; ``prefix_hits`` is unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

# KV-event media -> tier. vLLM's engine publishes "GPU" (None from older engines).
DEVICE_MEDIA = frozenset({None, "GPU"})
MEDIUM_TIER = {None: "hbm", "GPU": "hbm", "CPU": "dram", "STORAGE": "ssd", "DISK": "ssd",
               "MOONCAKE_STORE": "store"}
STORE_MEDIA = frozenset({"MOONCAKE_STORE"})
STORE_HOLDER = "@store"
"""Pseudo-instance id that holds the global store's blocks."""
_TIER_RANK = {"hbm": 0, "dram": 1, "ssd": 2, "store": 3}

DEFAULT_MAX_BLOCKS_PER_INSTANCE = 1 << 20
"""About 10^6 blocks per instance: far above any single engine's block count
(an 80 GB GPU holds ~10^5 blocks of 16 tokens for an 8B model), ~200 MB worst case."""


class PrefixIndex:
    """Block hashes per instance, with leading-prefix lookups across instances.

    Hashes are the ints KV events carry (see ``router.kv.hashing``). ``medium``
    is the event's ``medium`` field (None when the engine does not say).
    """

    def __init__(self, max_blocks_per_instance: int = DEFAULT_MAX_BLOCKS_PER_INSTANCE) -> None:
        if max_blocks_per_instance <= 0:
            raise ValueError("max_blocks_per_instance must be positive")
        self.max_blocks_per_instance = max_blocks_per_instance
        self._where: dict[int, set[str]] = {}
        self._held: dict[str, OrderedDict[int, tuple[str | None, ...]]] = {}
        self.evicted_by_bound = 0  # entries dropped to respect the memory bound
        self._store_members: set[str] = set()
        self.has_tiers = False  # any block below an engine's KV cache seen yet

    # --- events ---------------------------------------------------------------

    def apply_stored(self, instance_id: str, block_hashes: Iterable[int],
                     medium: str | None = None) -> None:
        """``instance_id`` now holds ``block_hashes`` (a BlockStored event)."""
        if medium not in DEVICE_MEDIA:
            self.has_tiers = True
            if medium in STORE_MEDIA:
                self._store_members.add(instance_id)
                instance_id = STORE_HOLDER
        held = self._held.setdefault(instance_id, OrderedDict())
        for h in block_hashes:
            media = held.get(h)
            if media is None:
                held[h] = (medium,)
                self._where.setdefault(h, set()).add(instance_id)
            elif medium not in media:
                held[h] = (*media, medium)
            held.move_to_end(h)
        while len(held) > self.max_blocks_per_instance:
            old, _ = held.popitem(last=False)
            self._forget(old, instance_id)
            self.evicted_by_bound += 1

    def apply_removed(self, instance_id: str, block_hashes: Iterable[int],
                      medium: str | None = None) -> None:
        """``instance_id`` evicted ``block_hashes`` from ``medium`` (a BlockRemoved event).

        Removing an unknown block is a no-op: events may have been lost, or the
        block forgotten by the memory bound. A block held in several tiers stays
        until the last tier removes it.
        """
        if medium in STORE_MEDIA:
            instance_id = STORE_HOLDER
        held = self._held.get(instance_id)
        if held is None:
            return
        for h in block_hashes:
            media = held.get(h)
            if media is None:
                continue
            rest = tuple(m for m in media if m != medium)
            if rest and len(rest) < len(media):
                held[h] = rest  # still cached in another tier
            else:
                # Last tier gone, or a tier we never saw: drop the block. Under-
                # reporting a hit costs one recompute; over-reporting misroutes.
                del held[h]
                self._forget(h, instance_id)

    def apply_cleared(self, instance_id: str, device_only: bool = False) -> None:
        """``instance_id`` dropped its whole prefix cache (AllBlocksCleared, or a restart).

        ``device_only``: only its engine KV cache was cleared (vLLM's
        AllBlocksCleared event); its DRAM/SSD tier entries stay.
        """
        held = self._held.get(instance_id)
        if held is None:
            return
        if device_only and self.has_tiers:
            for h, media in list(held.items()):
                rest = tuple(m for m in media if m not in DEVICE_MEDIA)
                if rest:
                    held[h] = rest
                else:
                    del held[h]
                    self._forget(h, instance_id)
            return
        for h in held:
            self._forget(h, instance_id)
        held.clear()

    def remove_instance(self, instance_id: str) -> None:
        """Forget an instance entirely (it left the cluster); the store keeps its blocks."""
        self.apply_cleared(instance_id)
        self._held.pop(instance_id, None)
        self._store_members.discard(instance_id)

    def _forget(self, block_hash: int, instance_id: str) -> None:
        holders = self._where.get(block_hash)
        if holders is not None:
            holders.discard(instance_id)
            if not holders:
                del self._where[block_hash]

    # --- queries --------------------------------------------------------------

    def prefix_hits(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """instance id -> how many LEADING blocks of the request it holds.

        Counting stops at an instance's first missing block (vLLM only reuses a
        contiguous prefix). Instances with zero hits are absent.
        """
        hits: dict[str, int] = {}
        alive: set[str] | None = None
        for depth, h in enumerate(block_hashes):
            holders = self._where.get(h)
            if not holders:
                break
            if alive is None:
                alive = set(holders)
            else:
                alive &= holders
                if not alive:
                    break
            for instance_id in alive:
                hits[instance_id] = depth + 1
        return hits

    def tier_hits(self, block_hashes: Sequence[int],
                  instance_ids: Iterable[str]) -> dict[str, tuple[int, int, int, int]]:
        """instance id -> leading blocks by source tier (hbm, dram, ssd, store).

        Along the prompt, each block counts under the fastest tier the instance
        can get it from (its own media, else the global store if it is a store
        member); counting stops at the first block it cannot get. Empty when no
        engine published tier data (then ``prefix_hits`` says everything).
        """
        if not self.has_tiers:
            return {}
        store = self._held.get(STORE_HOLDER, {})
        out: dict[str, tuple[int, int, int, int]] = {}
        for instance_id in instance_ids:
            held = self._held.get(instance_id, {})
            member = instance_id in self._store_members
            counts = [0, 0, 0, 0]
            for h in block_hashes:
                media = held.get(h)
                if media is not None:
                    rank = min(_TIER_RANK[MEDIUM_TIER.get(m, "hbm")] for m in media)
                elif member and h in store:
                    rank = 3
                else:
                    break
                counts[rank] += 1
            if any(counts):
                out[instance_id] = (counts[0], counts[1], counts[2], counts[3])
        return out

    def store_members(self) -> frozenset[str]:
        return frozenset(self._store_members)

    def holds(self, instance_id: str, block_hash: int) -> bool:
        held = self._held.get(instance_id)
        return held is not None and block_hash in held

    def block_count(self, instance_id: str) -> int:
        """Blocks the index believes ``instance_id`` holds."""
        held = self._held.get(instance_id)
        return 0 if held is None else len(held)

    def instances(self) -> tuple[str, ...]:
        return tuple(self._held)

    def __len__(self) -> int:
        """Distinct block hashes held anywhere."""
        return len(self._where)
