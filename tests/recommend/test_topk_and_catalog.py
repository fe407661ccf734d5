"""Pure parts of generative recommendation: beam selection, the catalog trie, admission."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xllm_plugin.recommend.admission import Admission, AdmissionError
from xllm_plugin.recommend.catalog import Catalog, CatalogError, load_catalog, write_catalog
from xllm_plugin.recommend.synthetic import synthetic_items
from xllm_plugin.recommend.topk import select_top, select_top_full_sort, select_top_numpy

# ---- top-k -------------------------------------------------------------------------

finite = st.floats(min_value=-30, max_value=0, allow_nan=False, width=32)


@st.composite
def beams(draw: st.DrawFn) -> tuple[list[float], list[list[int]], list[list[float]], int]:
    num_beams = draw(st.integers(1, 12))
    width = draw(st.integers(1, 20))
    scores, tokens, logprobs = [], [], []
    for _ in range(num_beams):
        scores.append(draw(finite))
        k = draw(st.integers(0, 12))
        values = sorted(draw(st.lists(st.one_of(finite, st.just(-math.inf)), min_size=k,
                                      max_size=k)), reverse=True)
        logprobs.append(values)
        tokens.append(draw(st.lists(st.integers(0, 50_000), min_size=k, max_size=k, unique=True)))
    return scores, tokens, logprobs, width


@settings(max_examples=400, deadline=None)
@given(beams())
def test_heap_top_k_equals_a_full_sort(case: tuple) -> None:
    scores, tokens, logprobs, width = case
    heap = select_top(scores, tokens, logprobs, width)
    full = select_top_full_sort(scores, tokens, logprobs, width)
    assert [s.score for s in heap] == pytest.approx([s.score for s in full])
    chosen = {(s.beam, s.token) for s in heap}
    assert len(chosen) == len(heap)
    # Every chosen candidate is a real one with the score it claims, and nothing left
    # out beats the weakest chosen one (ties at the cut may pick either).
    everything = {(b, t): scores[b] + lp for b in range(len(scores))
                  for t, lp in zip(tokens[b], logprobs[b]) if lp > -math.inf}
    for pick in heap:
        assert everything[(pick.beam, pick.token)] == pytest.approx(pick.score)
    if heap:
        floor = heap[-1].score
        assert all(score <= floor + 1e-9 for key, score in everything.items() if key not in chosen)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 16), st.integers(1, 16), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_numpy_top_k_equals_a_full_sort(num_beams: int, k: int, width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=num_beams) * 3
    logprobs = -np.sort(rng.exponential(size=(num_beams, k)), axis=1)
    top_scores, top_beams, top_cols = select_top_numpy(scores, logprobs, width)
    full = select_top_full_sort(scores.tolist(), [list(range(k))] * num_beams,
                                logprobs.tolist(), width)
    assert top_scores.tolist() == pytest.approx([s.score for s in full])
    assert np.allclose(scores[top_beams] + logprobs[top_beams, top_cols], top_scores)


def test_early_exit_skips_beams_that_cannot_win() -> None:
    # Beam 0 fills the heap with scores -1..-4; beam 1's best (-10) cannot enter.
    picks = select_top([0.0, -9.0], [[1, 2, 3, 4], [5, 6]],
                       [[-1.0, -2.0, -3.0, -4.0], [-1.0, -2.0]], width=4)
    assert [(p.beam, p.token) for p in picks] == [(0, 1), (0, 2), (0, 3), (0, 4)]


# ---- catalog -----------------------------------------------------------------------

def test_children_are_exactly_the_catalog_continuations() -> None:
    rng = np.random.default_rng(3)
    items = rng.integers(0, 6, size=(300, 3))
    catalog = Catalog.from_items(items)
    unique = {tuple(row) for row in items.tolist()}
    assert catalog.num_items == len(unique)
    for prefix_len in range(3):
        prefixes = {row[:prefix_len] for row in unique}
        for prefix in prefixes:
            expected = sorted({row[prefix_len] for row in unique if row[:prefix_len] == prefix})
            assert catalog.children(prefix).tolist() == expected
    assert catalog.children((99,)).size == 0
    assert all(catalog.contains(row) for row in unique)
    assert not catalog.contains((9, 9, 9)) and not catalog.contains((0, 0))


def test_catalog_files_round_trip_and_bad_files_are_named(tmp_path) -> None:
    items = synthetic_items(2000, 3, vocab_size=49152, codebook_size=64, seed=1)
    assert len({tuple(r) for r in items.tolist()}) == 2000
    for name in ("c.npy", "c.txt"):
        catalog = load_catalog(write_catalog(tmp_path / name, items))
        assert catalog.num_items == 2000 and catalog.item_len == 3
        assert len(catalog.level_tokens[0]) <= 64
    assert load_catalog(tmp_path / "c.npy") is load_catalog(tmp_path / "c.npy")  # cached
    (tmp_path / "bad.txt").write_text("1 2 3\n4 5\n")
    with pytest.raises(CatalogError, match="bad.txt:2"):
        load_catalog(tmp_path / "bad.txt")
    with pytest.raises(CatalogError, match="not found"):
        load_catalog(tmp_path / "missing.npy")


# ---- admission ---------------------------------------------------------------------

async def test_admission_is_fifo_and_all_or_nothing() -> None:
    admission = Admission(beams=8, blocks=100)
    order: list[str] = []

    async def search(name: str, beams: int, hold: float) -> None:
        async with admission.reserve(beams, 10):
            order.append(name)
            await asyncio.sleep(hold)

    first = asyncio.create_task(search("a", 6, 0.05))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(search("b", 4, 0.0)), asyncio.create_task(search("c", 1, 0.0))]
    await asyncio.gather(first, *rest)
    assert order == ["a", "b", "c"]  # c fits beside a but may not overtake b
    assert admission.in_use == (0, 0)
    with pytest.raises(AdmissionError, match="max_num_seqs"):
        async with admission.reserve(9, 1):
            pass
