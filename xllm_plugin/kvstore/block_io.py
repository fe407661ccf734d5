"""Copy whole KV blocks between vLLM's paged KV cache and flat host rows, on CPU or CUDA.

One stored block is the concatenation, over the layers in name order, of that
layer's slab for the block (K and V, every head and token), as raw bytes. Any
layout works: for each layer the block axis is found by its size (the
engine's block count) and moved to the front, so the same code serves the CPU
backend's head-major blocks and CUDA backends' token-major ones. Instances
exchange blocks only under the same store key prefix (``layout_tag`` in
``connector.py``: model, dtype, block size, KV spec, rank).

The device-specific part is only where the copies run: on CUDA they go on a
side stream, and ``sync`` waits for it, so callers never block the compute
stream; on CPU they are plain memory copies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


class KVBlockIO:
    """Gather blocks from, and scatter blocks into, the registered KV cache tensors."""

    def __init__(self, kv_caches: Mapping[str, torch.Tensor], num_blocks: int) -> None:
        if not kv_caches:
            raise ValueError("no KV cache tensors registered")
        self.names = sorted(kv_caches)
        self.layers: list[torch.Tensor] = []
        self.block_dims: list[int] = []
        self.slab_shapes: list[tuple[int, ...]] = []
        self.slab_bytes: list[int] = []
        for name in self.names:
            t = kv_caches[name]
            dims = [d for d, size in enumerate(t.shape) if size == num_blocks]
            if not dims:
                raise ValueError(f"KV cache of layer {name} has no axis of {num_blocks} blocks: "
                                 f"shape {tuple(t.shape)}")
            # Several candidates only when another axis happens to equal the block
            # count; vLLM layouts put blocks first, or right after the K/V axis.
            dim = dims[0] if dims[0] <= 1 else min(dims)
            shape = tuple(s for d, s in enumerate(t.shape) if d != dim)
            self.layers.append(t)
            self.block_dims.append(dim)
            self.slab_shapes.append(shape)
            self.slab_bytes.append(int(torch.Size(shape).numel()) * t.element_size())
        self.block_bytes = sum(self.slab_bytes)
        self.device = self.layers[0].device
        self.dtype = self.layers[0].dtype
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def gather(self, block_ids: Sequence[int], out: torch.Tensor) -> None:
        """Rows ``out[i]`` (uint8, ``block_bytes`` wide) <- engine block ``block_ids[i]``.

        ``out`` is host memory; on CUDA the copy runs on the side stream after
        the compute stream's pending work, and ``sync`` must follow.
        """
        if not block_ids:
            return
        n = len(block_ids)
        with self._on_side_stream():
            index = torch.tensor(list(block_ids), dtype=torch.long, device=self.device)
            offset = 0
            for t, dim, size in zip(self.layers, self.block_dims, self.slab_bytes):
                slab = t.index_select(dim, index).movedim(dim, 0).contiguous()
                out[:n, offset:offset + size].copy_(slab.view(n, -1).view(torch.uint8),
                                                    non_blocking=self._stream is not None)
                offset += size

    def scatter(self, rows: torch.Tensor, block_ids: Sequence[int]) -> None:
        """Engine block ``block_ids[i]`` <- ``rows[i]`` (uint8 host rows)."""
        if not block_ids:
            return
        n = len(block_ids)
        with self._on_side_stream():
            index = torch.tensor(list(block_ids), dtype=torch.long, device=self.device)
            src = rows[:n].to(self.device, non_blocking=self._stream is not None)
            offset = 0
            for t, dim, shape, size in zip(self.layers, self.block_dims, self.slab_shapes,
                                           self.slab_bytes):
                slab = src[:, offset:offset + size].contiguous().view(t.dtype).view(n, *shape)
                t.index_copy_(dim, index, slab.movedim(0, dim))
                offset += size

    def sync(self) -> None:
        """Wait for this object's copies (a no-op on CPU)."""
        if self._stream is not None:
            self._stream.synchronize()

    def _on_side_stream(self) -> object:
        if self._stream is None:
            import contextlib

            return contextlib.nullcontext()
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self._stream)
