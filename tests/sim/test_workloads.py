"""Workload readers on the real shared data files, synthetic arrivals and rate scaling."""

from __future__ import annotations

import numpy as np
import pytest

from router.sim import workload as wl

needs_data = pytest.mark.skipif(not (wl.data_dir() / wl.AZURE_CODE).exists(),
                                reason="shared data folder not present (set XLLM_DATA_DIR)")


@needs_data
def test_azure_code_trace_matches_its_published_figures():
    trace = wl.read_azure()
    assert len(trace) == 8819
    assert 3400 < trace.duration_s < 3500  # about 58 minutes
    prompts = np.array([r.prompt_tokens for r in trace.requests])
    assert 1900 < prompts.mean() < 2200 and 1400 < np.median(prompts) < 1550
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(trace.requests, trace.requests[1:]))


@needs_data
def test_mooncake_hash_ids_become_shared_prefix_blocks():
    trace = wl.read_mooncake()
    assert len(trace) == 3993 and trace.hash_block_tokens == 512
    first = trace.requests[0]
    assert first.prompt_tokens == 40160 and len(first.prefix_hashes) == -(-40160 // 512)
    seen: set[int] = set()
    repeats = total = 0
    for r in trace.requests:
        for h in r.prefix_hashes:
            repeats += h in seen
            total += 1
            seen.add(h)
    assert 0.55 < repeats / total < 0.75  # README: 64% of prefix blocks repeat


@needs_data
def test_equal_prefixes_map_to_equal_engine_blocks_at_any_block_size():
    from router.sim.cluster import block_hashes_for

    a = wl.RequestSpec("a", 0, 1100, 1, prefix_hashes=(1, 2, 3))
    b = wl.RequestSpec("b", 0, 1100, 1, prefix_hashes=(1, 2, 9))
    for block_size in (16, 128, 256, 1024):
        ha, hb = block_hashes_for(a, 512, block_size), block_hashes_for(b, 512, block_size)
        assert len(ha) == 1100 // block_size
        shared = sum(1 for x, y in zip(ha, hb) if x == y)
        assert shared == min(1024 // block_size, len(ha))  # the first two 512-token blocks


@needs_data
def test_servegen_sampling_follows_the_window_rates_and_is_seeded():
    a = wl.read_servegen(duration_s=600, seed=1)
    b = wl.read_servegen(duration_s=600, seed=1)
    c = wl.read_servegen(duration_s=600, seed=2)
    assert [r.prompt_tokens for r in a.requests] == [r.prompt_tokens for r in b.requests]
    assert len(a) != len(c) or a.requests[0] != c.requests[0]
    assert 2.0 < a.mean_rate < 12.0
    assert all(r.image_tokens > 0 and r.prompt_tokens > r.image_tokens for r in a.requests[:50])


@needs_data
def test_sharegpt_lengths_feed_poisson_and_gamma_generators():
    lengths = wl.read_lengths()
    assert len(lengths) == 30731
    poisson = wl.synthetic(lengths, rate=10, n=5000, cv=1.0, seed=0)
    bursty = wl.synthetic(lengths, rate=10, n=5000, cv=4.0, seed=0)
    gaps_p = np.diff([r.arrival_s for r in poisson.requests])
    gaps_b = np.diff([r.arrival_s for r in bursty.requests])
    assert abs(poisson.mean_rate - 10) < 1.0
    assert 0.9 < gaps_p.std() / gaps_p.mean() < 1.1
    assert gaps_b.std() / gaps_b.mean() > 3.0


def test_rate_scaling_keeps_the_burst_shape():
    trace = wl.synthetic([(100, 10)], rate=5, n=200, cv=3, seed=3)
    fast = trace.at_rate(50)
    assert fast.mean_rate == pytest.approx(50)
    before = np.diff([r.arrival_s for r in trace.requests])
    after = np.diff([r.arrival_s for r in fast.requests])
    assert np.allclose(after, before * trace.mean_rate / 50, atol=1e-9)  # one factor for every gap


def test_window_rebases_times_and_limits():
    trace = wl.synthetic([(100, 10)], rate=10, n=500, seed=0)
    part = trace.window(start_s=10, duration_s=5, limit=20)
    assert 0 < len(part) <= 20 and part.requests[0].arrival_s == 0.0
