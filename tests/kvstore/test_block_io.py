"""Whole-block copies between a paged KV cache and flat host rows, for the layouts vLLM
uses (blocks first, or after the K/V axis): what goes out comes back bit for bit."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from xllm_plugin.kvstore.block_io import KVBlockIO  # noqa: E402

NUM_BLOCKS = 6


@pytest.mark.parametrize("shape", [(NUM_BLOCKS, 2, 4, 3), (2, NUM_BLOCKS, 3, 4, 5)])
def test_gathered_blocks_scatter_back_into_other_blocks_unchanged(shape):
    torch.manual_seed(0)
    caches = {f"layer.{i}": torch.randn(shape, dtype=torch.bfloat16) for i in range(3)}
    io = KVBlockIO(caches, NUM_BLOCKS)
    rows = torch.empty((2, io.block_bytes), dtype=torch.uint8)
    io.gather([1, 4], rows)
    io.scatter(rows, [0, 5])
    dim = io.block_dims[0]
    for t in caches.values():
        assert torch.equal(t.select(dim, 0), t.select(dim, 1))
        assert torch.equal(t.select(dim, 5), t.select(dim, 4))
        assert not torch.equal(t.select(dim, 2), t.select(dim, 1))
    assert io.block_bytes == 3 * (torch.Size(shape).numel() // NUM_BLOCKS) * 2


def test_a_cache_without_a_block_axis_is_rejected():
    with pytest.raises(ValueError, match="no axis of 6 blocks"):
        KVBlockIO({"l": torch.zeros(2, 3)}, NUM_BLOCKS)
