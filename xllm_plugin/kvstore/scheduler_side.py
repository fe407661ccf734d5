"""Scheduler side: find a request's prefix blocks in the tiers and plan every move.

Runs in vLLM's scheduler (engine-core) process and owns the only
``TierDirectory``. Per request it answers vLLM's question "how many more
prompt tokens can be loaded?" by walking the request's block hashes past the
engine's own prefix hit: a block counts if DRAM or SSD holds it, or else the
global store (one batched existence check per lookup). Per step it plans the
loads vLLM accepted and the saves of the blocks the step completes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from xllm_plugin.kvstore.backends import MooncakeStoreClient, block_key
from xllm_plugin.kvstore.settings import KVStoreConfig
from xllm_plugin.kvstore.tiers import StepPlan, StepPlanner, Tier, TierDirectory

log = logging.getLogger("vllm.xllm_plugin.kvstore")  # vLLM configures "vllm.*" handlers


@dataclass
class _Lookup:
    at: float
    start: int            # first block index past the engine's own hit
    tiers: list[Tier]     # source tier of each loadable block from ``start``


@dataclass
class _Req:
    request: Any          # vllm.v1.request.Request
    saved_upto: int = 0   # blocks [0, saved_upto) are saved or known to be in DRAM
    load: list[tuple[bytes, int]] | None = None  # (hash, engine block id) awaiting a plan
    sources: dict[Tier, int] = field(default_factory=dict)


@dataclass
class SchedulerStats:
    lookups: int = 0
    store_lookups: int = 0
    hit_blocks: dict[str, int] = field(default_factory=lambda: {t.value: 0 for t in Tier})
    planned_saves: int = 0


class StoreScheduler:
    """The scheduler-side half of ``XLLMStoreConnector``."""

    def __init__(self, settings: KVStoreConfig, block_size: int, dram_slots: int,
                 ssd_blocks: int, key_prefix: str, store: MooncakeStoreClient | None,
                 clock: Any = time.monotonic) -> None:
        self.settings = settings
        self.block_size = block_size
        self.directory = TierDirectory(dram_slots, ssd_blocks)
        self.key_prefix = key_prefix
        self.store = store
        self.clock = clock
        self.stats = SchedulerStats()
        self._reqs: dict[str, _Req] = {}
        self._lookups: dict[str, _Lookup] = {}
        self._inflight: dict[str, dict[int, bytes]] = {}  # req -> engine block id -> hash
        self._sync_loads: dict[int, bytes] = {}  # this step's synchronous loads, same map
        self._pending_ops: list[tuple] = []

    # --- lookups --------------------------------------------------------------------------------

    def matched_tokens(self, request: Any, num_computed_tokens: int) -> int:
        """Prompt tokens past ``num_computed_tokens`` the tiers and the store can supply."""
        if not self.settings.load:
            return 0
        bs = self.block_size
        hashes: Sequence[bytes] = request.block_hashes
        start = num_computed_tokens // bs
        # At least one prompt token must be computed, and a load must fit in DRAM.
        limit = min((request.num_tokens - 1) // bs, len(hashes)) - start
        limit = min(limit, self.directory.dram_slots)
        if limit <= 0:
            return 0
        cached = self._lookups.get(request.request_id)
        now = self.clock()
        if cached is not None and cached.start == start and now - cached.at <= self.settings.lookup_cache_s:
            return len(cached.tiers) * bs
        self.stats.lookups += 1
        window = list(hashes[start:start + limit])
        local = [self.directory.where(h) for h in window]
        in_store: dict[int, bool] = {}
        missing = [i for i, t in enumerate(local) if t is None]
        if missing and self.store is not None:
            self.stats.store_lookups += 1
            found = self.store.exists([block_key(self.key_prefix, window[i]) for i in missing])
            in_store = dict(zip(missing, found))
        tiers: list[Tier] = []
        for i, tier in enumerate(local):
            if tier is None:
                if not in_store.get(i):
                    break
                tier = Tier.STORE
            tiers.append(tier)
        self._lookups[request.request_id] = _Lookup(now, start, tiers)
        return len(tiers) * bs

    def after_alloc(self, request: Any, block_ids: Sequence[int], num_external_tokens: int) -> None:
        """vLLM allocated the request's blocks; a load of ``num_external_tokens`` was accepted."""
        state = self._reqs.get(request.request_id)
        if state is None:
            state = self._reqs[request.request_id] = _Req(request)
        if num_external_tokens <= 0:
            return
        lookup = self._lookups.pop(request.request_id, None)
        if lookup is None:  # vLLM asks for a count before it accepts one; never expected
            raise RuntimeError(f"xllm kv_store: load accepted for {request.request_id} "
                               "without a lookup")
        n = num_external_tokens // self.block_size
        hashes = request.block_hashes
        first = lookup.start
        state.load = [(hashes[k], block_ids[k]) for k in range(first, first + n)]
        state.sources = {}
        for tier in lookup.tiers[:n]:
            state.sources[tier] = state.sources.get(tier, 0) + 1

    def hit_sources(self, request: Any) -> dict[Tier, int]:
        """Blocks of the accepted load by the tier they come from."""
        state = self._reqs.get(request.request_id)
        return dict(state.sources) if state is not None else {}

    # --- per step -------------------------------------------------------------------------------

    def build_plan(self, scheduled: Sequence[tuple[str, int, int]],
                   block_ids_of: Any) -> StepPlan:
        """Plan this step: accepted loads, then saves of blocks the step completes.

        ``scheduled``: (request id, computed tokens before the step, tokens
        scheduled now) for every request in the step; ``block_ids_of(req_id)``
        gives its engine block ids.
        """
        use_store = self.settings.master is not None and self.settings.save
        planner = StepPlanner(self.directory, use_store)
        planner.plan.ops.extend(self._pending_ops)
        self._pending_ops = []
        for req_id, state in self._reqs.items():
            if state.load is None:
                continue
            sources = planner.load(req_id, state.load, report=self.settings.async_load)
            for tier, n in sources.items():
                self.stats.hit_blocks[tier.value] += n
            targets = {block_id: h for h, block_id in state.load}
            if self.settings.async_load:
                self._inflight[req_id] = targets
            else:
                self._sync_loads.update(targets)
            state.load = None
        planner.end_loads()
        if self.settings.save:
            bs = self.block_size
            for req_id, computed, scheduled_now in scheduled:
                state = self._reqs.get(req_id)
                if state is None:
                    continue
                hashes = state.request.block_hashes
                end = min((computed + scheduled_now) // bs, len(hashes))
                if end <= state.saved_upto:
                    continue
                ids = block_ids_of(req_id)
                if ids is None:
                    continue
                blocks = [(hashes[k], ids[k]) for k in range(state.saved_upto, end)]
                self.stats.planned_saves += planner.save(blocks)
                state.saved_upto = end
        return planner.finish()

    def on_loads_done(self, finished: Sequence[str], invalid_block_ids: set[int]) -> None:
        """Worker outcome: forget DRAM entries whose fill failed."""
        if invalid_block_ids:
            bad = [h for blocks in (*self._inflight.values(), self._sync_loads)
                   for bid, h in blocks.items() if bid in invalid_block_ids]
            self.directory.forget(bad)
            log.info("xllm kv_store: %d block(s) failed to load and will be recomputed", len(bad))
        for req_id in finished:
            self._inflight.pop(req_id, None)
        self._sync_loads = {}  # a synchronous load reports its failures in its own step

    def finished(self, req_id: str) -> bool:
        """The request ended; True while a planned load may still write its blocks
        (vLLM then frees them when the worker reports the load done)."""
        self._reqs.pop(req_id, None)  # a load accepted but not yet planned is dropped
        self._lookups.pop(req_id, None)
        return req_id in self._inflight

    def reset(self) -> None:
        self.directory.reset(self._pending_ops)
        self._lookups.clear()
        for state in self._reqs.values():
            state.saved_upto = 0
