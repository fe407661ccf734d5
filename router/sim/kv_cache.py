"""An instance's KV cache: fixed-size blocks, a prefix cache, LRU eviction.

It follows vLLM's block manager where it matters to timing:

- a request holds whole blocks for the tokens it has computed (and those the
  current step will compute);
- a full block whose content has a hash joins the prefix cache; later requests
  with the same leading hashes reuse it instead of recomputing it;
- a cached block no request uses stays cached but is *evictable*; new
  allocations take free blocks first, then evict the least recently released
  cached block;
- when no block is left for a running request the instance preempts (see
  ``instance``), freeing that request's blocks.

Invariant: ``free + private blocks of all requests + cached blocks == capacity``.
``listener`` (optional) hears ``stored(hash)`` and ``removed(hash)``, like
vLLM's KV events, so a router-side prefix index can mirror the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol


class KVEventListener(Protocol):
    def stored(self, instance_id: str, block_hash: int) -> None: ...
    def removed(self, instance_id: str, block_hash: int) -> None: ...


class BlockHolder(Protocol):
    """What the cache needs from a request: its blocks and its prefix hashes."""

    pinned: list[int]
    private_blocks: int
    block_hashes: tuple[int, ...]


class KVCache:
    __slots__ = ("instance_id", "block_size", "capacity", "free", "_refs", "_evictable",
                 "listener", "evictions", "hit_blocks", "lookup_blocks")

    def __init__(self, instance_id: str, block_size: int, capacity: int,
                 listener: KVEventListener | None = None) -> None:
        if block_size <= 0 or capacity <= 0:
            raise ValueError("block_size and capacity must be positive")
        self.instance_id = instance_id
        self.block_size = block_size
        self.capacity = capacity
        self.free = capacity
        self._refs: dict[int, int] = {}  # cached block hash -> requests using it
        self._evictable: OrderedDict[int, None] = OrderedDict()  # refs == 0, oldest first
        self.listener = listener
        self.evictions = 0
        self.hit_blocks = 0
        self.lookup_blocks = 0

    # -- queries -----------------------------------------------------------------
    def available(self) -> int:
        """Blocks an allocation could get now (free plus evictable)."""
        return self.free + len(self._evictable)

    def usage(self) -> float:
        """Share of blocks held by requests (vLLM's ``kv_cache_usage``)."""
        return 1.0 - (self.free + len(self._evictable)) / self.capacity

    def cached_blocks(self) -> int:
        return len(self._refs)

    def prefix_hits(self, block_hashes: tuple[int, ...]) -> int:
        """How many leading blocks of ``block_hashes`` are cached here (no side effects)."""
        refs = self._refs
        hits = 0
        for h in block_hashes:
            if h not in refs:
                break
            hits += 1
        return hits

    # -- request lifecycle ---------------------------------------------------------
    def pin_prefix(self, req: BlockHolder, limit_blocks: int) -> int:
        """Take the cached leading blocks of ``req`` (up to ``limit_blocks``); return how many."""
        refs, evictable = self._refs, self._evictable
        hashes = req.block_hashes
        n = 0
        for h in hashes[:limit_blocks]:
            count = refs.get(h)
            if count is None:
                break
            if count == 0:
                del evictable[h]
            refs[h] = count + 1
            req.pinned.append(h)
            n += 1
        self.lookup_blocks += len(hashes)
        self.hit_blocks += n
        return n

    def grow(self, req: BlockHolder, tokens: int) -> bool:
        """Make ``req`` hold blocks for ``tokens`` tokens; False (and no change) if they do not fit."""
        need = -(-tokens // self.block_size) - len(req.pinned) - req.private_blocks
        if need <= 0:
            return True
        if need > self.free + len(self._evictable):
            return False
        take = min(need, self.free)
        self.free -= take
        for _ in range(need - take):
            self._evict_one()
        req.private_blocks += need
        return True

    def commit_full_blocks(self, req: BlockHolder, computed_tokens: int) -> None:
        """Move ``req``'s newly full, hashed blocks into the prefix cache."""
        hashes = req.block_hashes
        upto = min(computed_tokens // self.block_size, len(hashes))
        pinned = req.pinned
        refs = self._refs
        while len(pinned) < upto:
            h = hashes[len(pinned)]
            count = refs.get(h)
            if count is None:
                refs[h] = 1
                if self.listener is not None:
                    self.listener.stored(self.instance_id, h)
            else:  # computed concurrently by another request: share it, drop our copy
                if count == 0:
                    del self._evictable[h]
                refs[h] = count + 1
                self.free += 1
            req.private_blocks -= 1
            pinned.append(h)

    def release(self, req: BlockHolder) -> None:
        """Free all of ``req``'s blocks; its cached blocks stay cached, now evictable."""
        refs, evictable = self._refs, self._evictable
        for h in req.pinned:
            count = refs[h] - 1
            refs[h] = count
            if count == 0:
                evictable[h] = None
        req.pinned.clear()
        self.free += req.private_blocks
        req.private_blocks = 0

    def _evict_one(self) -> None:
        h, _ = self._evictable.popitem(last=False)
        del self._refs[h]
        self.evictions += 1
        if self.listener is not None:
            self.listener.removed(self.instance_id, h)

    def check_invariant(self, holders: list[BlockHolder]) -> None:
        """Assert the block accounting adds up (used by tests)."""
        private = sum(r.private_blocks for r in holders)
        assert self.free + private + len(self._refs) == self.capacity, (
            self.free, private, len(self._refs), self.capacity)
        assert all(self._refs[h] == 0 for h in self._evictable)
