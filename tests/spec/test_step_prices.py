"""Step prices by shape at one host speed (step_log.shape_prices_ms) and spec_interleaved's
table of decode steps by query rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import spec_interleaved as interleaved  # noqa: E402

from xllm_plugin.spec.step_log import shape_prices_ms  # noqa: E402


def step(decode: int, drafts: int, ms: float, prefill: int = 0) -> dict:
    return {"decode": decode, "drafts": drafts, "prefill": prefill, "verified": [], "ms": ms}


def segments() -> dict[tuple, list[dict]]:
    """Two runs of one cell; the second on a host 1.2x slower. Four requests: no drafts
    60 ms, four drafts 72 ms (one tile dearer), eight drafts seen only twice; one prefill."""
    fast = [step(4, 0, 60.0)] * 6 + [step(4, 4, 72.0)] * 6 + [step(4, 8, 90.0)] * 2
    slow = ([step(4, 0, 72.0)] * 6 + [step(4, 4, 86.4)] * 6
            + [step(3, 0, 66.0)] * 5 + [step(4, 0, 200.0, prefill=300)] * 5)
    return {(0, "k4"): fast, (1, "k4"): slow}


def test_prices_take_the_hosts_drift_out_and_count_steps() -> None:
    prices = shape_prices_ms(segments())
    base, base_steps = prices[(4, 0, 0)]
    drafts, drafts_steps = prices[(4, 4, 0)]
    assert (base_steps, drafts_steps) == (12, 12)
    assert drafts / base == pytest.approx(1.2)
    assert 60.0 < base < 72.0  # between the two hosts' speeds


def test_the_table_keeps_decode_steps_of_the_whole_batch_seen_often_enough() -> None:
    table = interleaved.decode_step_prices(segments(), "repetitive", 4)
    assert set(table) == {"step_ms_repetitive_c4_rows4", "step_ms_repetitive_c4_rows8"}
    assert table["step_ms_repetitive_c4_rows8"] / table["step_ms_repetitive_c4_rows4"] == \
        pytest.approx(1.2)
