"""Where every KV page lives in the physical store, and where every view lives in virtual space.

Pure arithmetic, shared by the standalone :class:`~xllm_plugin.memory.xtensor.XTensor`
and the vLLM integration, so that both agree byte for byte.

Physical store (one memfd on CPU, a set of ``cuMemCreate`` chunks on CUDA)::

    layer 0: [K plane: page 0 .. page P-1][V plane: page 0 .. page P-1]
    layer 1: [K plane ...][V plane ...]
    ...

A *page* holds ``page_tokens`` tokens of one layer's K (or V): ``[page_tokens, kv_heads,
head_size]``, token-major. Inside a plane, page ``p`` sits right after page ``p-1``, so a
run of consecutive page ids is one contiguous byte range: mapping it is one call and, on
Linux, one VMA. In the vLLM integration a page id *is* vLLM's block id; a layer's
``[K plane][V plane]`` is exactly the byte range vLLM allocated for that layer
(``num_blocks * block_bytes``), only read differently.

Virtual space (one ``PROT_NONE`` reservation)::

    plane (layer 0, K): [slot 0: max_pages pages][slot 1] ... [slot S-1]
    plane (layer 0, V): [slot 0] ...
    ...

A *slot* is one request's logically contiguous range of ``max_pages`` pages (MaxSeqLen)
in every plane. Slots of a plane are evenly spaced, so all of them together are one
strided tensor ``[slots, max_tokens, kv_heads, head_size]``; a request's K for a layer
is a plain slice of it, with no block table.
"""

from __future__ import annotations

from dataclasses import dataclass

K, V = 0, 1


class XTensorLayoutError(ValueError):
    """The model's KV geometry cannot be served by xTensor (a one-line, user-facing reason)."""


@dataclass(frozen=True)
class KVGeometry:
    """Sizes of the physical store and of the per-request virtual ranges."""

    num_layers: int
    num_pages: int  # physical pages per plane (vLLM: num_blocks)
    page_tokens: int  # tokens per page (vLLM: block_size)
    num_kv_heads: int
    head_size: int
    dtype_bytes: int
    num_slots: int  # per-request virtual ranges (running requests + reuse list)
    max_pages: int  # pages per slot: MaxSeqLen / page_tokens
    base_offset: int = 0  # byte offset of layer 0's K plane in the store
    layer_stride: int = 0  # bytes between layers in the store; 0 = packed (2 planes)

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's K (or V) in one layer."""
        return self.num_kv_heads * self.head_size * self.dtype_bytes

    @property
    def page_bytes(self) -> int:
        return self.page_tokens * self.token_bytes

    @property
    def plane_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def num_planes(self) -> int:
        return 2 * self.num_layers

    @property
    def store_layer_stride(self) -> int:
        return self.layer_stride or 2 * self.plane_bytes

    @property
    def store_bytes(self) -> int:
        return self.base_offset + (self.num_layers - 1) * self.store_layer_stride \
            + 2 * self.plane_bytes

    @property
    def max_tokens(self) -> int:
        return self.max_pages * self.page_tokens

    @property
    def slot_bytes(self) -> int:
        return self.max_pages * self.page_bytes

    @property
    def virtual_plane_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    @property
    def virtual_bytes(self) -> int:
        return self.num_planes * self.virtual_plane_bytes

    @property
    def bytes_per_token_all_layers(self) -> int:
        """Physical KV bytes one token occupies across all layers (K and V)."""
        return self.num_planes * self.token_bytes

    def plane(self, layer: int, kind: int) -> int:
        return 2 * layer + kind

    def store_offset(self, plane: int, page: int) -> int:
        """Byte offset of ``page`` of ``plane`` in the physical store."""
        layer, kind = divmod(plane, 2)
        return (self.base_offset + layer * self.store_layer_stride
                + kind * self.plane_bytes + page * self.page_bytes)

    def virtual_offset(self, plane: int, slot: int, position: int) -> int:
        """Byte offset of page ``position`` of ``slot`` in ``plane`` from the reservation start."""
        return plane * self.virtual_plane_bytes + slot * self.slot_bytes \
            + position * self.page_bytes

    def validate(self, granularity: int) -> None:
        """Raise :class:`XTensorLayoutError` unless every page can be mapped on its own.

        ``granularity`` is the mapper's unit: 4 KiB (the OS page) on CPU, the
        ``cuMemGetAllocationGranularity`` (2 MiB) on CUDA.
        """
        for name in ("num_layers", "num_pages", "page_tokens", "num_kv_heads", "head_size",
                     "dtype_bytes", "num_slots", "max_pages"):
            if getattr(self, name) < 1:
                raise XTensorLayoutError(f"xTensor: {name} must be >= 1, got {getattr(self, name)}")
        if self.page_bytes % granularity:
            raise XTensorLayoutError(
                f"xTensor: a page ({self.page_tokens} tokens x {self.num_kv_heads} KV heads x "
                f"{self.head_size} x {self.dtype_bytes} B = {self.page_bytes} B) is not a multiple "
                f"of the mapping granularity ({granularity} B); use a larger --block-size")
        if self.base_offset % granularity or self.store_layer_stride % granularity:
            raise XTensorLayoutError(
                f"xTensor: layer offsets ({self.base_offset}, stride {self.store_layer_stride}) "
                f"are not aligned to {granularity} B")
        if self.store_layer_stride < 2 * self.plane_bytes:
            raise XTensorLayoutError(
                f"xTensor: layer stride {self.store_layer_stride} B is smaller than a layer's K and "
                f"V planes ({2 * self.plane_bytes} B)")
