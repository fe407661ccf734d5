"""Mapping correctness: bytes written through the paged view are read through the contiguous
view and vice versa, on the CPU mapper (memfd + mmap) and, with a GPU, the CUDA mapper."""

from __future__ import annotations

import random
import time

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from xllm_plugin.memory.cpu_mapper import OS_PAGE, CpuMapper, VmaSampler, count_vmas
from xllm_plugin.memory.cuda_mapper import cuda_mapper_available
from xllm_plugin.memory.geometry import KVGeometry, XTensorLayoutError
from xllm_plugin.memory.xtensor import XTensor

CUDA_OK, CUDA_REASON = cuda_mapper_available()


def _geometry(page_tokens: int = 32, **overrides: int) -> KVGeometry:
    sizes = dict(num_layers=2, num_pages=48, page_tokens=page_tokens, num_kv_heads=2,
                 head_size=32, dtype_bytes=2, num_slots=6, max_pages=10)
    sizes.update(overrides)
    return KVGeometry(**sizes)


def _fill_pattern(xt: XTensor, request: str, layer: int, seed: int) -> torch.Tensor:
    """Write distinct values into every page of the request through the paged view."""
    g = xt.geometry
    paged_k, paged_v = xt.paged(layer)
    written = []
    for i, page in enumerate(xt.page_table(request)):
        block = torch.arange(g.page_tokens * g.num_kv_heads * g.head_size, dtype=torch.float32)
        block = (block + 1000 * i + seed).remainder(251).view(g.page_tokens, g.num_kv_heads,
                                                             g.head_size)
        paged_k[page].copy_(block)
        paged_v[page].copy_(-block)
        written.append(block)
    return torch.cat(written).to(xt.dtype)


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 320), min_size=1, max_size=5),
       shuffle_seed=st.integers(0, 2**16))
@example(lengths=[64, 256, 288, 288, 289], shuffle_seed=1)
def test_paged_writes_are_read_through_contiguous_views(lengths: list[int],
                                                        shuffle_seed: int) -> None:
    # Room for the worst case drawn here: five requests of 10 pages and one warm request
    # still holding 7 (48 pages ran out at lengths [64, 256, 288, 288, 289]).
    g = _geometry(num_pages=64)
    with CpuMapper(g.store_bytes) as mapper:
        xt = XTensor(g, mapper, torch.bfloat16)
        # Finish a few requests first so that pages are handed out out of order.
        rng = random.Random(shuffle_seed)
        for i in range(3):
            xt.add_request(f"warm{i}", rng.randint(1, 200))
        for i in rng.sample(range(3), 2):
            xt.finish(f"warm{i}")
        for i, n in enumerate(lengths):
            xt.add_request(i, n)
        for i, n in enumerate(lengths):
            for layer in range(g.num_layers):
                expected = _fill_pattern(xt, i, layer, seed=i * 7 + layer)[:n]
                assert torch.equal(xt.keys(i, layer), expected)
                assert torch.equal(xt.values(i, layer), -expected)
        xt.close()


def test_contiguous_writes_are_read_through_the_paged_view() -> None:
    g = _geometry()
    with CpuMapper(g.store_bytes) as mapper:
        xt = XTensor(g, mapper, torch.float16)
        xt.add_request("a", 70)
        xt.add_request("b", 100)
        xt.finish("a")
        xt.add_request("c", 40)  # takes over a's pages and range
        keys = xt.keys("c", 1)
        keys.copy_(torch.randn(keys.shape, dtype=keys.dtype))
        paged_k, _ = xt.paged(1)
        gathered = torch.cat([paged_k[p] for p in xt.page_table("c")])[:40]
        assert torch.equal(gathered, keys)
        xt.close()


def test_growth_reuse_and_premap_keep_views_consistent() -> None:
    g = _geometry()
    with CpuMapper(g.store_bytes) as mapper:
        xt = XTensor(g, mapper, torch.bfloat16)
        xt.add_request("a", 31)
        for tokens in range(32, 150):
            xt.extend("a", tokens)
            if tokens % 17 == 0:
                expected = _fill_pattern(xt, "a", 0, seed=tokens)[:tokens]
                assert torch.equal(xt.keys("a", 0), expected)
        snapshot = xt.snapshot()
        assert snapshot["premap_hits"] >= 3 and snapshot["premap_misses"] == 0
        # At most one page held beyond the tokens, per plane.
        assert snapshot["wasted_bytes_max"] <= g.page_bytes * g.num_planes
        xt.finish("a")
        xt.add_request("b", 100)
        assert xt.snapshot()["reuse_hits"] == 4  # b's 4 pages were already mapped
        xt.close()


def test_consecutive_pages_cost_one_vma() -> None:
    g = _geometry()
    with CpuMapper(g.store_bytes) as mapper:
        xt = XTensor(g, mapper, torch.bfloat16, premap=False)
        before = count_vmas()
        xt.add_request("a", 8 * g.page_tokens)  # pages 0..7: one run per plane
        one_run = count_vmas() - before
        # Per plane, one run splits the reservation: [gap][mapped run][gap], at most +2 VMAs
        # per plane however many pages the run holds; the estimate bounds it.
        assert one_run <= 2 * g.num_planes
        assert xt.views.vma_estimate >= one_run
        xt.close()


def test_vma_sampler_counts_off_the_caller_thread() -> None:
    sampler = VmaSampler(interval_s=0.05)
    assert sampler.latest is None  # nothing read until started: the step path never waits
    sampler.start()
    deadline = time.monotonic() + 5
    while sampler.latest is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with CpuMapper(64 * OS_PAGE) as mapper:
        reserved = mapper.reserve(64 * OS_PAGE)
        first = sampler.latest
        mapper.map(reserved + OS_PAGE, 0, OS_PAGE)  # splits the reservation in three
        deadline = time.monotonic() + 5
        while sampler.latest == first and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first is not None and sampler.latest is not None and sampler.latest > first
    sampler.stop()


def test_mapping_outside_a_reservation_is_refused() -> None:
    with CpuMapper(16 * OS_PAGE) as mapper:
        with pytest.raises(ValueError, match="outside every reservation"):
            mapper.map(mapper.paged_address, 0, OS_PAGE)


def test_pages_must_be_whole_os_pages() -> None:
    with pytest.raises(XTensorLayoutError, match="larger --block-size"):
        _geometry(page_tokens=16).validate(OS_PAGE)


@pytest.mark.skipif(not CUDA_OK, reason=f"CUDA mapper needs a GPU: {CUDA_REASON}")
def test_cuda_mapper_paged_and_contiguous_views_share_memory() -> None:
    from xllm_plugin.memory.cuda_mapper import CudaMapper

    probe = CudaMapper(2 << 20)
    granularity = probe.granularity
    probe.close()
    # A page of exactly one allocation chunk: tokens * heads * head_size * 2 B.
    tokens = granularity // (8 * 128 * 2)
    g = KVGeometry(num_layers=2, num_pages=12, page_tokens=tokens, num_kv_heads=8,
                   head_size=128, dtype_bytes=2, num_slots=3, max_pages=4)
    mapper = CudaMapper(g.store_bytes)
    xt = XTensor(g, mapper, torch.bfloat16)
    xt.add_request("a", tokens + 5)
    xt.add_request("b", 3 * tokens)
    xt.finish("a")
    xt.add_request("c", 2 * tokens)
    for request in ("b", "c"):
        n = xt.keys(request, 1).shape[0]
        values = torch.randn(n, 8, 128, device=mapper.device, dtype=torch.bfloat16)
        xt.keys(request, 1).copy_(values)
        paged_k, _ = xt.paged(1)
        gathered = torch.cat([paged_k[p] for p in xt.page_table(request)])[:n]
        assert torch.equal(gathered, values)
    xt.close()
    mapper.close()
