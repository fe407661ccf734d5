"""CUDA mapper: KV memory as ``cuMemCreate`` chunks mapped with ``cuMemMap`` (cuda-python).

CUDA's virtual memory management API is the GPU counterpart of the CPU mapper's
memfd + ``mmap``: ``cuMemAddressReserve`` reserves an address range,
``cuMemCreate`` makes a physical allocation (a handle), ``cuMemMap`` puts a handle at an
address and ``cuMemSetAccess`` makes it readable and writable by the device. One
handle can be mapped at several addresses, which is how the paged view and a
request's contiguous view share memory.

The store is cut into chunks of the allocation granularity (2 MiB on current GPUs),
one handle each; a page must be a whole number of chunks. GPUs have no
``vm.max_map_count``; the cost of many small mappings is driver time, so pages of a
few MiB are the sweet spot (vAttention makes the same choice).

Its tests (``tests/memory/test_xtensor_mapping.py``) skip visibly without CUDA; they and
``benchmarks/xtensor_gpu.py`` ran on an H200 with cuda-bindings 13.3 (``scripts/gpu_check.sh``).
"""

from __future__ import annotations

from typing import Any

from xllm_plugin.memory.mapper import Mapper, MapStats


def _driver() -> Any:
    try:
        from cuda.bindings import driver  # cuda-python >= 12.6
    except ImportError:  # pragma: no cover - older cuda-python
        from cuda import cuda as driver  # type: ignore[no-redef]
    return driver


def cuda_mapper_available() -> tuple[bool, str]:
    """(usable, reason): CUDA device present and cuda-python importable."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        _driver()
    except ImportError:
        return False, "cuda-python is not installed (pip install 'xllm-plugin[cuda]')"
    return True, ""


class CudaError(RuntimeError):
    pass


class _DeviceArray:
    """Minimal ``__cuda_array_interface__`` owner so torch can wrap a raw device range."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (address, False), "version": 3,
                                         "strides": None}


class CudaMapper(Mapper):
    """Physical store of ``store_bytes`` on one GPU; reservations and maps via the driver."""

    def __init__(self, store_bytes: int, device: int = 0) -> None:
        import torch

        self._cu = cu = _driver()
        self.device = torch.device("cuda", device)
        torch.cuda.init()
        torch.cuda.set_device(self.device)
        torch.empty(1, device=self.device)  # make the runtime create the primary context
        self._check(cu.cuInit(0))
        self._dev = self._check(cu.cuDeviceGet(device))
        context = self._check(cu.cuCtxGetCurrent())
        if context is None or not int(context):
            context = self._check(cu.cuDevicePrimaryCtxRetain(self._dev))
            self._check(cu.cuCtxSetCurrent(context))
        self._context = context

        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device
        self._prop = prop
        self.granularity = int(self._check(cu.cuMemGetAllocationGranularity(
            prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM)))
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = device
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = access
        self.stats = MapStats()

        if store_bytes <= 0 or store_bytes % self.granularity:
            raise ValueError(f"store size {store_bytes} must be a positive multiple of the "
                             f"allocation granularity {self.granularity}")
        self._store_bytes = store_bytes
        self._handles = [self._check(cu.cuMemCreate(self.granularity, prop, 0))
                         for _ in range(store_bytes // self.granularity)]
        self._reservations: list[tuple[int, int]] = []
        self._mapped: set[int] = set()  # chunk-aligned addresses currently mapped
        self._paged = self.reserve(store_bytes)
        self.map(self._paged, 0, store_bytes)
        self._closed = False

    def _check(self, result: Any) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self._cu.CUresult.CUDA_SUCCESS:
            _, text = self._cu.cuGetErrorString(err)
            raise CudaError(f"CUDA driver call failed: {err!r} "
                            f"({text.decode() if isinstance(text, bytes) else text})")
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    @property
    def store_bytes(self) -> int:
        return self._store_bytes

    @property
    def paged_address(self) -> int:
        return self._paged

    def reserve(self, nbytes: int) -> int:
        g = self.granularity
        nbytes = -(-nbytes // g) * g
        address = int(self._check(self._cu.cuMemAddressReserve(nbytes, g, 0, 0)))
        self._reservations.append((address, nbytes))
        return address

    def _check_inside(self, address: int, nbytes: int) -> None:
        g = self.granularity
        if address % g or nbytes % g or nbytes <= 0:
            raise ValueError(f"mapping {hex(address)} + {nbytes} is not {g}-aligned")
        if not any(s <= address and address + nbytes <= s + n for s, n in self._reservations):
            raise ValueError(f"{hex(address)} + {nbytes} is outside every reservation")

    def _ensure_context(self) -> None:
        """Driver calls need a current context; the pre-mapping thread starts without one."""
        current = self._check(self._cu.cuCtxGetCurrent())
        if current is None or not int(current):
            self._check(self._cu.cuCtxSetCurrent(self._context))

    def map(self, address: int, offset: int, nbytes: int) -> None:
        self._check_inside(address, nbytes)
        self._ensure_context()
        g = self.granularity
        if offset % g or offset + nbytes > self._store_bytes:
            raise ValueError(f"store range {offset} + {nbytes} is outside the store")
        cu = self._cu
        with self.stats.timing("map", nbytes):
            for i in range(nbytes // g):
                target = address + i * g
                if target in self._mapped:  # a mapped chunk must be unmapped first
                    self._check(cu.cuMemUnmap(target, g))
                self._check(cu.cuMemMap(target, g, 0, self._handles[offset // g + i], 0))
                self._mapped.add(target)
            self._check(cu.cuMemSetAccess(address, nbytes, [self._access], 1))

    def unmap(self, address: int, nbytes: int) -> None:
        """Unmap; the caller must make sure no kernel still reads the range."""
        self._check_inside(address, nbytes)
        self._ensure_context()
        g = self.granularity
        with self.stats.timing("unmap"):
            for i in range(nbytes // g):
                target = address + i * g
                if target in self._mapped:
                    self._check(self._cu.cuMemUnmap(target, g))
                    self._mapped.discard(target)

    def tensor(self, address: int, shape: tuple[int, ...], dtype: Any,
               strides: tuple[int, ...] | None = None) -> Any:
        import torch

        itemsize = torch.empty((), dtype=dtype).element_size()
        if strides is None:
            strides = tuple(torch.empty(shape, dtype=dtype, device="meta").stride())
        extent = (1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))) * itemsize
        flat = torch.as_tensor(_DeviceArray(address, extent), device=self.device)
        return flat.view(dtype).as_strided(shape, strides)

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        import torch

        torch.cuda.synchronize(self.device)
        g = self.granularity
        for target in sorted(self._mapped):
            self._cu.cuMemUnmap(target, g)
        self._mapped.clear()
        for address, nbytes in self._reservations:
            self._cu.cuMemAddressFree(address, nbytes)
        for handle in self._handles:
            self._cu.cuMemRelease(handle)
