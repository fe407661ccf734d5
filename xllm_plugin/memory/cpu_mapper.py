"""CPU mapper: KV memory in a memfd, mapped with ``mmap(MAP_FIXED | MAP_SHARED)``.

The store is an anonymous in-memory file (``memfd_create``). It is mapped once,
linearly, as the paged view; a request's contiguous view is a ``PROT_NONE``
reservation into which page-sized file ranges are mapped with ``MAP_FIXED``. Both
mappings share the same page-cache pages, so a byte written through one is read
through the other with no copy and no synchronisation beyond the CPU's own coherence.

Every distinct mapping is a VMA, and Linux caps VMAs per process at
``vm.max_map_count`` (65530 by default); exceeding it makes ``mmap`` fail with ENOMEM.
This mapper reports the limit and the live count; :class:`~.views.ViewTable` keeps an
estimate under a budget derived from them (see the package README).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from typing import Any

from xllm_plugin.memory.mapper import Mapper, MapStats

PROT_NONE = 0
PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
MAP_FIXED = 0x10  # Linux value; the mmap module does not export it
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)
MAP_ANONYMOUS = getattr(mmap, "MAP_ANONYMOUS", 0x20)
OS_PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class MapError(OSError):
    """An mmap call failed; ENOMEM here usually means vm.max_map_count was reached."""


def _mmap(address: int | None, nbytes: int, prot: int, flags: int, fd: int, offset: int) -> int:
    result = _libc.mmap(address, nbytes, prot, flags, fd, offset)
    if result is None or result == _MAP_FAILED:
        errno = ctypes.get_errno()
        hint = (f" (vm.max_map_count is {max_map_count()}, this process has {count_vmas()} "
                "mappings)") if errno == 12 else ""
        raise MapError(errno, f"mmap of {nbytes} B at {address and hex(address)} failed: "
                              f"{os.strerror(errno)}{hint}")
    return int(result)


def max_map_count() -> int:
    """The kernel's per-process VMA limit (``vm.max_map_count``)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530


def count_vmas() -> int:
    """VMAs this process holds now (lines of /proc/self/maps).

    Costs the kernel about 0.7 ms per 1,000 VMAs (5-8 ms for a vLLM worker's ~8,000
    on 2026-12-05's EPYC host), so it stays off the step path: see :class:`VmaSampler`.
    """
    try:
        with open("/proc/self/maps", "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return -1


class VmaSampler:
    """``count_vmas`` every ``interval_s`` on a daemon thread; ``latest`` is the last count.

    The count is only shown in the status (the VMA budget works from the views' own
    estimate), so a reading up to one interval old is enough, and taking it in the step
    that publishes the status put a several-ms stall into that step. The thread releases
    the GIL while the kernel formats the maps.
    """

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self.latest: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="xtensor-vma-sampler",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while True:
            self.latest = count_vmas()
            if self._stop.wait(self.interval_s):
                return


class CpuMapper(Mapper):
    """memfd-backed store; reservations and mappings through libc ``mmap``."""

    granularity = OS_PAGE

    def __init__(self, store_bytes: int, name: str = "xllm-xtensor-kv",
                 populate: bool = True) -> None:
        import torch

        if store_bytes <= 0 or store_bytes % OS_PAGE:
            raise ValueError(f"store size {store_bytes} must be a positive multiple of {OS_PAGE}")
        self.device = torch.device("cpu")
        self.stats = MapStats()
        self._store_bytes = store_bytes
        self._populate = MAP_POPULATE if populate else 0
        self._fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self._fd, store_bytes)
        self._reservations: list[tuple[int, int]] = []
        self._paged = _mmap(None, store_bytes, PROT_RW, mmap.MAP_SHARED | self._populate,
                            self._fd, 0)
        self._closed = False

    @property
    def store_bytes(self) -> int:
        return self._store_bytes

    @property
    def paged_address(self) -> int:
        return self._paged

    def reserve(self, nbytes: int) -> int:
        nbytes = -(-nbytes // OS_PAGE) * OS_PAGE
        address = _mmap(None, nbytes, PROT_NONE,
                        mmap.MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        self._reservations.append((address, nbytes))
        return address

    def _check_inside(self, address: int, nbytes: int) -> None:
        if address % OS_PAGE or nbytes % OS_PAGE or nbytes <= 0:
            raise ValueError(f"unaligned mapping {hex(address)} + {nbytes}")
        for start, size in self._reservations:
            if start <= address and address + nbytes <= start + size:
                return
        # MAP_FIXED would silently replace whatever lives there: refuse.
        raise ValueError(f"{hex(address)} + {nbytes} is outside every reservation of this mapper")

    def map(self, address: int, offset: int, nbytes: int) -> None:
        self._check_inside(address, nbytes)
        if offset < 0 or offset % OS_PAGE or offset + nbytes > self._store_bytes:
            raise ValueError(f"store range {offset} + {nbytes} is outside the store")
        with self.stats.timing("map", nbytes):
            _mmap(address, nbytes, PROT_RW, mmap.MAP_SHARED | MAP_FIXED | self._populate,
                  self._fd, offset)

    def unmap(self, address: int, nbytes: int) -> None:
        self._check_inside(address, nbytes)
        with self.stats.timing("unmap"):
            _mmap(address, nbytes, PROT_NONE,
                  mmap.MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0)

    def tensor(self, address: int, shape: tuple[int, ...], dtype: Any,
               strides: tuple[int, ...] | None = None) -> Any:
        import torch

        itemsize = torch.empty((), dtype=dtype).element_size()
        if strides is None:
            strides = tuple(torch.empty(shape, dtype=dtype, device="meta").stride())
        extent = (1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))) * itemsize
        buffer = (ctypes.c_ubyte * extent).from_address(address)
        flat = torch.frombuffer(buffer, dtype=torch.uint8).view(dtype)
        return flat.as_strided(shape, strides)

    def paged_tensor(self) -> Any:
        """The whole store as a flat int8 tensor (the buffer vLLM's KV views are cut from)."""
        import torch

        return self.tensor(self._paged, (self._store_bytes,), torch.int8)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for address, nbytes in self._reservations:
            _libc.munmap(address, nbytes)
        _libc.munmap(self._paged, self._store_bytes)
        os.close(self._fd)
