"""xTensor inside a vLLM worker: vLLM's KV buffer in a memfd, plus a contiguous view per request.

vLLM's block pool keeps choosing which block holds which tokens (so prefix caching,
preemption and the scheduler's memory accounting are untouched); a block id is a page
id of xTensor's physical store. Each step, :meth:`XTensorKVStore.prepare_step` makes
every scheduled request's slot show that request's blocks in order (mapping only what
changed) and hands the attention backend the slot of each row. Reading K/V is then a
slice of the slot tensor, with no block table.

The store is created by :class:`~xllm_plugin.memory.vllm_worker.XTensorCPUModelRunner`
before vLLM allocates its KV cache, and vLLM's own allocation is pointed at the store's
paged view (an allocation context), so vLLM's KV tensors, its views and the store are
one memory.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from xllm_plugin.config import XTensorConfig
from xllm_plugin.kernels import native_decode
from xllm_plugin.memory.cpu_mapper import (
    OS_PAGE,
    CpuMapper,
    VmaSampler,
    count_vmas,
    max_map_count,
)
from xllm_plugin.memory.geometry import K, V, KVGeometry
from xllm_plugin.memory.metrics import XTensorMetrics, wasted_bytes
from xllm_plugin.memory.space import Premapper, VirtualSpace
from xllm_plugin.memory.status import XTensorStatusWriter
from xllm_plugin.memory.views import ViewTable

#: (request ids in row order, block table rows, blocks held per row) of the live batch.
BatchSource = Callable[[], tuple[Sequence[str | None], np.ndarray, np.ndarray]]

_STORE: XTensorKVStore | None = None


def current_store() -> XTensorKVStore:
    """The store of this worker process (set when the KV cache is allocated)."""
    if _STORE is None:
        raise RuntimeError(
            "xTensor attention runs without an xTensor KV store: start vLLM with "
            "--worker-cls xllm_plugin.memory.XTensorCPUWorker and "
            "--additional-config '{\"xllm\": {\"xtensor\": true}}'")
    return _STORE


def set_current_store(store: XTensorKVStore | None) -> None:
    global _STORE
    _STORE = store


@dataclass
class StepRows:
    """What every layer's attention needs per request row, built once per step.

    Decode rows with a view go to one batched kernel call per layer (``decode``). Decode
    rows without one (the VMA budget refused it) go to a second call (``paged``) that reads
    their pages where they lie, through a page table. Where pages hold a number of tokens
    the kernel cannot step through (not a multiple of 32), their pages are copied into one
    reused buffer first (``gathered_pages``, :meth:`XTensorKVStore.gather_pages`). Both
    calls are packed once here for every layer. Prefill chunks are attended one by one
    (``other_rows``).
    """

    query_start_loc: list[int]
    seq_lens: list[int]
    slots: list[int | None]
    fallback_pages: list[torch.Tensor | None]  # page ids of rows read through the page list
    decode: native_decode.DecodeRows | None = None  # decode rows with a view
    paged: native_decode.DecodeRows | None = None  # decode rows without one
    gathered_pages: torch.Tensor | None = None  # their pages to copy first (odd page sizes)
    other_rows: list[int] | None = None

    def split_decodes(self, lib: ctypes.CDLL, v_pairs: bool, page_tokens: int) -> None:
        """Sort rows into the batched decode calls and the one-by-one rest."""
        qsl = self.query_start_loc
        one_token = [r for r in range(len(self.slots)) if qsl[r + 1] - qsl[r] == 1]
        decode = [r for r in one_token if self.slots[r] is not None]
        gathered = [r for r in one_token if self.slots[r] is None]
        chosen = set(one_token)
        self.other_rows = [r for r in range(len(self.slots)) if r not in chosen]
        if decode:
            q_index, lens = self._query_and_lens(decode)
            slots = torch.from_numpy(np.array([self.slots[r] for r in decode], dtype=np.int64))
            self.decode = native_decode.DecodeRows(lib, q_index, slots, lens, v_pairs)
        if gathered:
            width = max(len(self.fallback_pages[r]) for r in gathered)
            pages = np.empty((len(gathered), width), dtype=np.int64)
            for i, r in enumerate(gathered):
                own = self.fallback_pages[r].numpy()
                pages[i, :own.size] = own
                pages[i, own.size:] = own[0]  # padding past the row's length, never read
            table = torch.from_numpy(pages)
            q_index, lens = self._query_and_lens(gathered)
            if page_tokens % 32 == 0:
                self.paged = native_decode.DecodeRows.paged(lib, q_index, table, lens,
                                                            page_tokens, v_pairs)
            else:
                self.gathered_pages = table
                self.paged = native_decode.DecodeRows(
                    lib, q_index, torch.arange(len(gathered), dtype=torch.int64), lens,
                    v_pairs)

    def _query_and_lens(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """int32 query token and sequence length of each row (through numpy: torch.tensor()
        of a list cost ~3x as much per step)."""
        return (torch.from_numpy(np.array([self.query_start_loc[r] for r in rows], np.int32)),
                torch.from_numpy(np.array([self.seq_lens[r] for r in rows], np.int32)))


class XTensorKVStore:
    """vLLM's KV cache as an xTensor physical store, with per-request contiguous views."""

    def __init__(self, geometry: KVGeometry, dtype: torch.dtype, layer_names: Sequence[str],
                 options: XTensorConfig, status_interval_s: float,
                 store_bytes: int | None = None) -> None:
        self.geometry = geometry
        self.dtype = dtype
        self.options = options
        size = max(geometry.store_bytes, store_bytes or 0)
        self.mapper = CpuMapper(-(-size // OS_PAGE) * OS_PAGE)
        self.max_map_count = max_map_count()
        self.vmas_at_start = count_vmas()
        self.vma_budget = int(options.map_budget_fraction
                              * max(0, self.max_map_count - self.vmas_at_start))
        self.space = VirtualSpace(geometry, self.mapper)
        self.views = ViewTable(geometry.num_slots, geometry.max_pages,
                               planes=geometry.num_planes, vma_budget=self.vma_budget)
        self.premapper = Premapper(self.space) if options.premap else None
        self.native_decode = native_decode.load() \
            if options.native_decode and native_decode.supports(dtype) else None
        lib = native_decode.load() if options.native_prefill else None
        #: The kernel library for prefill rows, where it runs them natively (else SDPA).
        self.native_prefill = lib if lib is not None and native_decode.has_prefill(lib, dtype) \
            else None
        #: V in token pairs (see native_decode.KVWrites): only where both native kernels read
        #: it, as SDPA would need each row unpaired first.
        self.v_pairs = bool(options.v_pairs and self.native_decode is not None
                            and self.native_prefill is not None
                            and native_decode.supports_pairs(self.native_decode, dtype,
                                                             geometry.head_size))
        self._writes: native_decode.KVWrites | None = None
        self.metrics = XTensorMetrics()
        self.layer_index = {name: i for i, name in enumerate(layer_names)}
        layers = range(geometry.num_layers)
        self.slot_k = [self.space.slot_tensor(layer, K, dtype) for layer in layers]
        self.slot_v = [self.space.slot_tensor(layer, V, dtype) for layer in layers]
        self.paged_k = [self.space.paged_tensor(layer, K, dtype) for layer in layers]
        self.paged_v = [self.space.paged_tensor(layer, V, dtype) for layer in layers]
        tokens = geometry.num_pages * geometry.page_tokens
        shape = (tokens, geometry.num_kv_heads, geometry.head_size)
        self.token_k = [p.view(shape) for p in self.paged_k]
        self.token_v = [p.view(shape) for p in self.paged_v]
        self._batch_source: BatchSource | None = None
        # Where decode rows without a view get their pages copied if the kernel cannot read
        # them in place (pages not a multiple of 32 tokens), reused by every layer and step:
        # a fresh buffer per layer was slower than no batching at all (page faults of the
        # new memory, we think; not traced).
        self._gather_k = self._gather_v = torch.empty(0, geometry.page_tokens,
                                                      geometry.num_kv_heads,
                                                      geometry.head_size, dtype=dtype)
        self._writer = XTensorStatusWriter(status_interval_s)
        self._fallback_pages: set[int] = set()
        self._vma_sampler = VmaSampler()

    # -- wiring ----------------------------------------------------------------------------

    def buffer(self) -> torch.Tensor:
        """The whole store as the flat int8 tensor vLLM cuts its KV views from."""
        return self.mapper.paged_tensor()

    def set_batch_source(self, source: BatchSource) -> None:
        self._batch_source = source

    # -- per step ----------------------------------------------------------------------------

    def release(self, request_ids: Iterable[str]) -> None:
        """Finished or preempted requests: park their slots on the reuse list."""
        for request_id in request_ids:
            self.views.release(request_id)

    def prepare_step(self, num_reqs: int, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                     block_table: torch.Tensor) -> StepRows:
        """Bind every row's request to a slot showing its pages; map what changed."""
        if self.premapper is not None:
            self.premapper.drain()  # nothing may be rebound while a pre-map is in flight
        self._writes = None  # a slot mapping may be a buffer vLLM refills in place
        g = self.geometry
        qsl = query_start_loc[:num_reqs + 1].tolist()
        lens = seq_lens[:num_reqs].tolist()
        req_ids, table, held = self._batch(num_reqs)
        slots: list[int | None] = []
        fallback: list[torch.Tensor | None] = []
        ahead = []
        waste = []
        bytes_per_token = g.bytes_per_token_all_layers
        self._fallback_pages.clear()
        for row in range(num_reqs):
            needed = -(-lens[row] // g.page_tokens)
            if req_ids is None:  # a dummy batch (warm-up): no request identity, no slot
                pages = block_table[row, :needed].to(torch.int64)
                slots.append(None)
                fallback.append(pages)
                continue
            count = min(max(needed, int(held[row])), g.max_pages) \
                if self.premapper is not None else needed
            pages_np = table[row, :count]
            binding = self.views.bind(req_ids[row], pages_np, needed=needed,
                                      decode=qsl[row + 1] - qsl[row] == 1)
            for slot in binding.drop:
                self.space.unmap_slot(slot)
            self.space.map_runs(binding.runs)
            ahead.extend(binding.ahead)
            self.metrics.record_binding(binding)
            slots.append(binding.slot)
            if binding.slot is None:
                fallback.append(torch.from_numpy(pages_np[:needed].astype(np.int64)))
                self._fallback_pages.update(pages_np[:needed].tolist())
            else:
                fallback.append(None)
            waste.append(wasted_bytes(lens[row], int(held[row]), g.page_tokens, bytes_per_token))
        if self.premapper is not None:
            self.premapper.submit(ahead)
        if req_ids is not None:
            self.metrics.record_waste(waste)
        self._writer.publish(self.snapshot)
        rows = StepRows(qsl, lens, slots, fallback)
        if self.native_decode is not None:
            rows.split_decodes(self.native_decode, self.v_pairs, g.page_tokens)
        return rows

    def kv_writes(self, slot_mapping: torch.Tensor) -> native_decode.KVWrites | None:
        """The native writer of this step's new K/V (built on the first layer's call, reused
        while vLLM passes the same slot mapping within the step); None without the native
        kernel."""
        if self.native_decode is None:
            return None
        if self._writes is None or self._writes.source is not slot_mapping:
            self._writes = native_decode.KVWrites(self.native_decode, slot_mapping, self.v_pairs)
        return self._writes

    def gather_pages(self, layer: int, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``pages`` (``[rows, width]``) of one layer, copied into the reused
        buffer: ``[rows, width * page_tokens, kv_heads, head_size]`` each, valid until the
        next call."""
        rows, width = pages.shape
        count = rows * width
        if self._gather_k.shape[0] < count:
            shape = (count, *self._gather_k.shape[1:])
            self._gather_k = torch.empty(shape, dtype=self.dtype)
            self._gather_v = torch.empty(shape, dtype=self.dtype)
        return (copy_pages(self.paged_k[layer], pages, self._gather_k),
                copy_pages(self.paged_v[layer], pages, self._gather_v))

    def _batch(self, num_reqs: int) -> tuple[Sequence[str] | None, np.ndarray, np.ndarray]:
        if self._batch_source is None:
            return None, np.empty((0, 0)), np.empty(0)
        req_ids, table, held = self._batch_source()
        if len(req_ids) < num_reqs or any(r is None for r in req_ids[:num_reqs]):
            return None, table, held
        return list(req_ids[:num_reqs]), table, held  # type: ignore[arg-type]

    def zero_pages(self, pages: Sequence[int]) -> None:
        """Zero the given pages in every plane (vLLM's block zeroing, in xTensor's layout)."""
        index = torch.as_tensor(list(pages), dtype=torch.int64)
        for tensor in (*self.paged_k, *self.paged_v):
            tensor.index_fill_(0, index, 0)

    # -- observability -------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        g = self.geometry
        self._vma_sampler.start()
        return {
            "page_bytes": g.page_bytes, "page_tokens": g.page_tokens,
            "pages_total": g.num_pages, "planes": g.num_planes,
            "pages": self.views.census(g.num_pages, self._fallback_pages),
            "slots": self.views.slot_counts(), "num_slots": g.num_slots,
            "max_pages_per_slot": g.max_pages,
            "vma": {"estimate": self.views.vma_estimate, "budget": self.vma_budget,
                    "max_map_count": self.max_map_count, "process": self._vma_sampler.latest,
                    "process_at_start": self.vmas_at_start},
            "premap": self.premapper is not None, **self.kernel_paths(),
            **self.mapper.stats.snapshot(), **self.metrics.snapshot(),
        }

    def kernel_paths(self) -> dict[str, str]:
        """Which kernels attention runs and how V is laid out (status and startup log)."""
        return {
            "decode_kernel": ("native-" + native_decode.isa(self.native_decode)
                              if self.native_decode is not None else "sdpa"),
            "prefill_kernel": ("native-" + native_decode.isa(self.native_prefill)
                               if self.native_prefill is not None else "sdpa"),
            "v_layout": "token-pairs" if self.v_pairs else "token-major",
        }

    def publish(self, force: bool = False) -> None:
        self._writer.publish(self.snapshot, force=force)

    def close(self) -> None:
        """Stop the background threads and release the memory (the engine's worker just
        exits; benchmarks and tests that build several stores in one process call this)."""
        self._vma_sampler.stop()
        if self.premapper is not None:
            self.premapper.close()
        self.mapper.close()


def copy_pages(paged: torch.Tensor, pages: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """``paged[pages]`` (``pages``: ``[rows, width]`` ids into ``paged``'s first dimension)
    copied into the front of ``buffer`` (no allocation), viewed as
    ``[rows, width * page_tokens, kv_heads, head_size]``."""
    rows, width = pages.shape
    front = buffer[:rows * width]
    torch.index_select(paged, 0, pages.reshape(-1), out=front)
    return front.view(rows, width * paged.shape[1], *paged.shape[2:])


def store_geometry(*, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                   head_size: int, dtype_bytes: int, offset: int, layer_stride: int,
                   max_model_len: int, max_num_seqs: int, reusable_views: int) -> KVGeometry:
    """The xTensor geometry of a vLLM KV cache (one group, layer-compact layout)."""
    return KVGeometry(num_layers=num_layers, num_pages=num_blocks, page_tokens=block_size,
                      num_kv_heads=num_kv_heads, head_size=head_size, dtype_bytes=dtype_bytes,
                      num_slots=max_num_seqs + reusable_views,
                      max_pages=math.ceil(max_model_len / block_size),
                      base_offset=offset, layer_stride=layer_stride)
