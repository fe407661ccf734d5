"""Carries out :class:`~.views.ViewTable` decisions on a mapper: the I/O half of xTensor.

:class:`VirtualSpace` owns the one reservation that holds every slot of every plane and
turns a :class:`~.views.MapRun` into one map call per plane; :class:`Premapper` runs the
runs that are not needed yet on a background thread, so that mapping overlaps the
current step's compute.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from xllm_plugin.memory.geometry import KVGeometry
from xllm_plugin.memory.mapper import Mapper
from xllm_plugin.memory.views import MapRun


class VirtualSpace:
    """All slots of all planes in one reservation, plus tensors over slots and pages."""

    def __init__(self, geometry: KVGeometry, mapper: Mapper) -> None:
        geometry.validate(mapper.granularity)
        self.geometry = geometry
        self.mapper = mapper
        self.base = mapper.reserve(geometry.virtual_bytes)

    def map_runs(self, runs: Iterable[MapRun]) -> None:
        g = self.geometry
        for run in runs:
            nbytes = run.count * g.page_bytes
            for plane in range(g.num_planes):
                self.mapper.map(self.base + g.virtual_offset(plane, run.slot, run.position),
                                g.store_offset(plane, run.page), nbytes)

    def unmap_slot(self, slot: int) -> None:
        """Make a whole slot inaccessible again (one call per plane)."""
        g = self.geometry
        for plane in range(g.num_planes):
            self.mapper.unmap(self.base + g.virtual_offset(plane, slot, 0), g.slot_bytes)

    def slot_tensor(self, layer: int, kind: int, dtype: Any) -> Any:
        """``[slots, max_tokens, kv_heads, head_size]`` over a plane's slots (no copy).

        Only positions a slot has mapped may be read; the rest fault.
        """
        g = self.geometry
        return self.mapper.tensor(self.base + g.virtual_offset(g.plane(layer, kind), 0, 0),
                                  (g.num_slots, g.max_tokens, g.num_kv_heads, g.head_size),
                                  dtype)

    def paged_tensor(self, layer: int, kind: int, dtype: Any) -> Any:
        """``[pages, page_tokens, kv_heads, head_size]`` over a plane of the physical store."""
        g = self.geometry
        return self.mapper.tensor(self.mapper.paged_address + g.store_offset(g.plane(layer, kind), 0),
                                  (g.num_pages, g.page_tokens, g.num_kv_heads, g.head_size),
                                  dtype)


class Premapper:
    """Maps runs that are not needed yet on one background thread.

    ``drain`` must run before anything reads a position mapped ahead; it returns at
    once when the background work is done (the common case: it had a whole step).
    """

    def __init__(self, space: VirtualSpace) -> None:
        self._space = space
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xtensor-premap")
        self._pending: list[Future[None]] = []

    def submit(self, runs: list[MapRun]) -> None:
        if runs:
            self._pending.append(self._pool.submit(self._space.map_runs, runs))

    @property
    def busy(self) -> bool:
        return any(not f.done() for f in self._pending)

    def drain(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()  # re-raises a failed map in the caller

    def close(self) -> None:
        self.drain()
        self._pool.shutdown(wait=True)
