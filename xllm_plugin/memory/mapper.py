"""The one small interface between xTensor's bookkeeping and a device's virtual memory.

A mapper owns a *physical store* (``store_bytes`` of KV memory), keeps it mapped once,
linearly, as the *paged view* (what vLLM's block ids index), and maps byte ranges of
the store into *reservations*: address ranges that are reserved but inaccessible until
mapped. Two implementations: :mod:`.cpu_mapper` (memfd + ``mmap``) and
:mod:`.cuda_mapper` (``cuMemCreate`` + ``cuMemMap``).

:class:`MapStats` times every call so that map/unmap counts and latency can be reported.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np


class MapStats:
    """Counts and latencies (µs) of map and unmap calls, with a bounded sample window."""

    def __init__(self, window: int = 8192) -> None:
        self.map_calls = 0
        self.unmap_calls = 0
        self.mapped_bytes = 0
        self._map_us: deque[float] = deque(maxlen=window)
        self._unmap_us: deque[float] = deque(maxlen=window)
        # Percentiles of the last snapshot and the call counts they cover: most status
        # publishes come between map calls, and sorting the window each time cost ~0.3 ms.
        self._latency_cache: tuple[tuple[int, int], dict[str, Any]] | None = None

    @contextmanager
    def timing(self, kind: str, nbytes: int = 0) -> Iterator[None]:
        start = time.perf_counter()
        yield
        elapsed_us = (time.perf_counter() - start) * 1e6
        if kind == "map":
            self.map_calls += 1
            self.mapped_bytes += nbytes
            self._map_us.append(elapsed_us)
        else:
            self.unmap_calls += 1
            self._unmap_us.append(elapsed_us)

    @staticmethod
    def _percentiles(samples: deque[float]) -> dict[str, float | None]:
        if not samples:
            return {"p50": None, "p99": None}
        values = np.fromiter(samples, dtype=np.float64)
        return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}

    def snapshot(self) -> dict[str, Any]:
        calls = (self.map_calls, self.unmap_calls)
        if self._latency_cache is None or self._latency_cache[0] != calls:
            self._latency_cache = (calls, {"map_latency_us": self._percentiles(self._map_us),
                                           "unmap_latency_us": self._percentiles(self._unmap_us)})
        return {"map_calls": self.map_calls, "unmap_calls": self.unmap_calls,
                "mapped_bytes": self.mapped_bytes, **self._latency_cache[1]}


class Mapper(ABC):
    """Physical store + reservations + map/unmap, for one device."""

    #: Mapping unit in bytes: page sizes and offsets must be multiples of it.
    granularity: int
    #: The torch device tensors over this mapper's memory live on.
    device: Any
    stats: MapStats

    @property
    @abstractmethod
    def store_bytes(self) -> int:
        """Size of the physical store."""

    @property
    @abstractmethod
    def paged_address(self) -> int:
        """Address of the linear mapping of the whole store (the paged view)."""

    @abstractmethod
    def reserve(self, nbytes: int) -> int:
        """Reserve ``nbytes`` of inaccessible address space; returns its start."""

    @abstractmethod
    def map(self, address: int, offset: int, nbytes: int) -> None:
        """Map store bytes ``[offset, offset + nbytes)`` at ``address`` (inside a reservation)."""

    @abstractmethod
    def unmap(self, address: int, nbytes: int) -> None:
        """Make ``[address, address + nbytes)`` inaccessible again (it stays reserved)."""

    @abstractmethod
    def tensor(self, address: int, shape: tuple[int, ...], dtype: Any,
               strides: tuple[int, ...] | None = None) -> Any:
        """A torch tensor over memory at ``address`` (no copy); the mapper must outlive it."""

    @abstractmethod
    def close(self) -> None:
        """Unmap everything and release the store."""

    def __enter__(self) -> Mapper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
