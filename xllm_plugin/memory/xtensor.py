"""XTensor: per-request contiguous KV over a shared physical page pool (paper §4.3).

The paper's design with xTensor choosing the physical pages itself: each request gets
a logically contiguous range of MaxSeqLen tokens; pages are allocated and mapped as the
sequence grows; the next page is pre-mapped in the background when the current one
fills; a finished request's pages stay mapped and are handed, whole, to the next request
of similar length. Attention then reads ``keys(request, layer)``, a plain
``[tokens, kv_heads, head_size]`` tensor, with no block table.

Inside ``vllm serve`` vLLM's own block pool chooses the pages instead (see
:mod:`xllm_plugin.memory.vllm_store`); this class is the standalone form, used by the
mapping tests, the map-latency benchmark and the GPU kernel benchmark.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from xllm_plugin.memory.geometry import K, V, KVGeometry
from xllm_plugin.memory.mapper import Mapper
from xllm_plugin.memory.metrics import XTensorMetrics, wasted_bytes
from xllm_plugin.memory.pool import OutOfPages, PagePool
from xllm_plugin.memory.space import Premapper, VirtualSpace
from xllm_plugin.memory.views import ViewTable


class XTensor:
    """KV memory for up to ``geometry.num_slots`` requests (live plus reusable)."""

    def __init__(self, geometry: KVGeometry, mapper: Mapper, dtype: Any, *,
                 premap: bool = True, vma_budget: int | None = None) -> None:
        self.geometry = geometry
        self.mapper = mapper
        self.dtype = dtype
        self.premap = premap
        self.space = VirtualSpace(geometry, mapper)
        self.pool = PagePool(geometry.num_pages)
        self.views = ViewTable(geometry.num_slots, geometry.max_pages,
                               planes=geometry.num_planes, vma_budget=vma_budget)
        self.metrics = XTensorMetrics()
        self._premapper = Premapper(self.space)
        self._tokens: dict[Hashable, int] = {}
        self._slot_k = [self.space.slot_tensor(layer, K, dtype)
                        for layer in range(geometry.num_layers)]
        self._slot_v = [self.space.slot_tensor(layer, V, dtype)
                        for layer in range(geometry.num_layers)]
        self._paged_k = [self.space.paged_tensor(layer, K, dtype)
                         for layer in range(geometry.num_layers)]
        self._paged_v = [self.space.paged_tensor(layer, V, dtype)
                         for layer in range(geometry.num_layers)]

    # -- request lifecycle ---------------------------------------------------------------

    def add_request(self, request_id: Hashable, num_tokens: int) -> None:
        """Start a request with ``num_tokens`` (its prompt), reusing a finished set if any."""
        if request_id in self._tokens:
            raise ValueError(f"request {request_id!r} already exists")
        self._premapper.drain()
        needed = self._pages_for(num_tokens)
        # Keep a page beyond the prompt only when the prompt fills its last page exactly
        # (the next token needs it): no request holds more than one unused page.
        full = self.premap and num_tokens % self.geometry.page_tokens == 0
        reuse = self.pool.reuse(request_id, needed, keep_extra=1 if full else 0)
        prefer = None
        if reuse is not None:
            prefer = self.views.parked_slot_of(reuse.previous_owner)
        self._tokens[request_id] = 0
        self._grow(request_id, num_tokens, prefer_slot=prefer)

    def extend(self, request_id: Hashable, num_tokens: int) -> None:
        """The request now holds ``num_tokens`` tokens (it grew by decode or a prefill chunk)."""
        if num_tokens < self._tokens[request_id]:
            raise ValueError("a request does not shrink")
        self._premapper.drain()
        self._grow(request_id, num_tokens)

    def finish(self, request_id: Hashable) -> None:
        """Park the request's pages and range on the reuse list (no unmap)."""
        self._premapper.drain()
        self._tokens.pop(request_id)
        self.views.release(request_id)
        self.pool.finish(request_id)

    # -- views -----------------------------------------------------------------------------

    def keys(self, request_id: Hashable, layer: int) -> Any:
        """``[tokens, kv_heads, head_size]``: the request's keys, contiguous in virtual memory."""
        return self._slot_k[layer][self._slot(request_id), :self._tokens[request_id]]

    def values(self, request_id: Hashable, layer: int) -> Any:
        return self._slot_v[layer][self._slot(request_id), :self._tokens[request_id]]

    def slot_tensors(self, layer: int) -> tuple[Any, Any]:
        """All slots of a layer, ``[slots, max_tokens, kv_heads, head_size]`` (for kernels)."""
        return self._slot_k[layer], self._slot_v[layer]

    def paged(self, layer: int) -> tuple[Any, Any]:
        """The physical pages of a layer, ``[pages, page_tokens, kv_heads, head_size]``."""
        return self._paged_k[layer], self._paged_v[layer]

    def page_table(self, request_id: Hashable) -> list[int]:
        return self.pool.pages_of(request_id)

    def slot_of(self, request_id: Hashable) -> int:
        return self._slot(request_id)

    def snapshot(self) -> dict[str, Any]:
        g = self.geometry
        waste = [wasted_bytes(n, len(self.pool.pages_of(r)), g.page_tokens,
                              g.bytes_per_token_all_layers) for r, n in self._tokens.items()]
        self.metrics.record_waste(waste)
        return {"page_bytes": g.page_bytes, "pages": self.pool.counts(),
                "slots": self.views.slot_counts(), "vma_estimate": self.views.vma_estimate,
                **self.mapper.stats.snapshot(), **self.metrics.snapshot()}

    def close(self) -> None:
        self._premapper.close()

    # -- internals -------------------------------------------------------------------------

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.geometry.page_tokens)

    def _slot(self, request_id: Hashable) -> int:
        slot = self.views.slot_of(request_id)
        if slot is None:
            raise KeyError(f"request {request_id!r} has no virtual range")
        return slot

    def _grow(self, request_id: Hashable, num_tokens: int, prefer_slot: int | None = None) -> None:
        g = self.geometry
        needed = self._pages_for(num_tokens)
        if needed > g.max_pages:
            raise ValueError(f"{num_tokens} tokens exceed MaxSeqLen {g.max_tokens}")
        held = len(self.pool.pages_of(request_id))
        if needed > held:
            self._allocate(request_id, needed - held)
        # Pre-map the next page exactly when the last one is full: it is needed by the
        # very next token, and holding it costs at most one page of waste.
        if (self.premap and num_tokens % g.page_tokens == 0 and needed < g.max_pages
                and len(self.pool.pages_of(request_id)) == needed and self.pool.num_free):
            self.pool.allocate(request_id, 1)
        pages = self.pool.pages_of(request_id)
        binding = self.views.bind(request_id, pages, needed=min(needed, len(pages)),
                                  prefer_slot=prefer_slot)
        for slot in binding.drop:  # parked views dropped for room, even if it was not enough
            self.space.unmap_slot(slot)
        for owner in binding.dropped_keys:  # their pages are mapped nowhere now
            if owner in self.pool.reusable_owners:
                self.pool.release(owner)
        if binding.slot is None:
            raise OutOfPages(f"no virtual range for {request_id!r} within the VMA budget")
        self.space.map_runs(binding.runs)
        self._premapper.submit(binding.ahead)
        unmapped = [p for p in pages if self.pool.state(p).name == "ALLOCATED"]
        self.pool.mark_mapped(request_id, unmapped)
        self.metrics.record_binding(binding)
        self._tokens[request_id] = num_tokens

    def _allocate(self, request_id: Hashable, count: int) -> None:
        while self.pool.num_free < count:
            evicted = self.pool.evict_reusable()
            if evicted is None:
                raise OutOfPages(f"{request_id!r} needs {count} pages, {self.pool.num_free} free")
            slot = self.views.parked_slot_of(evicted[0])
            if slot is not None:
                self.views.drop_slot(slot)
                self.space.unmap_slot(slot)
        self.pool.allocate(request_id, count)
