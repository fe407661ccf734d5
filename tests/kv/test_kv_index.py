"""PrefixIndex: leading-prefix hits per instance, checked against a naive model."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.kv.index import PrefixIndex

INSTANCES = ["a", "b", "c"]
hashes = st.integers(min_value=0, max_value=12)
events = st.lists(st.one_of(
    st.tuples(st.just("stored"), st.sampled_from(INSTANCES), st.lists(hashes, max_size=6),
              st.sampled_from(["GPU", "CPU"])),
    st.tuples(st.just("removed"), st.sampled_from(INSTANCES), st.lists(hashes, max_size=6),
              st.sampled_from(["GPU", "CPU"])),
    st.tuples(st.just("cleared"), st.sampled_from(INSTANCES), st.just([]), st.just(None)),
    st.tuples(st.just("gone"), st.sampled_from(INSTANCES), st.just([]), st.just(None)),
), max_size=40)


def _replay(evs):
    """Apply events to a PrefixIndex and to a dict-of-sets model of the same facts."""
    index, model = PrefixIndex(), {i: {} for i in INSTANCES}
    for kind, inst, hs, medium in evs:
        if kind == "stored":
            index.apply_stored(inst, hs, medium)
            for h in hs:
                model[inst].setdefault(h, set()).add(medium)
        elif kind == "removed":
            index.apply_removed(inst, hs, medium)
            for h in hs:
                media = model[inst].get(h)
                if media is None:
                    continue
                if medium in media and len(media) > 1:
                    media.discard(medium)  # still in the other tier
                else:
                    del model[inst][h]  # last tier, or a tier never reported: gone
        elif kind in ("cleared", "gone"):
            (index.apply_cleared if kind == "cleared" else index.remove_instance)(inst)
            model[inst].clear()
    return index, model


def _naive_hits(model, request):
    out = {}
    for inst, held in model.items():
        n = 0
        for h in request:
            if h not in held:
                break
            n += 1
        if n:
            out[inst] = n
    return out


@settings(max_examples=300, deadline=None)
@given(evs=events, request=st.lists(hashes, max_size=8))
def test_prefix_hits_equal_a_naive_per_instance_scan(evs, request):
    index, model = _replay(evs)
    assert index.prefix_hits(request) == _naive_hits(model, request)
    for inst in INSTANCES:
        assert index.block_count(inst) == len(model[inst])


@settings(max_examples=200, deadline=None)
@given(evs=events, bound=st.integers(min_value=1, max_value=5), request=st.lists(hashes, max_size=8))
def test_memory_bound_holds_and_only_under_reports(evs, bound, request):
    bounded = PrefixIndex(max_blocks_per_instance=bound)
    for kind, inst, hs, medium in evs:
        if kind == "stored":
            bounded.apply_stored(inst, hs, medium)
        elif kind == "removed":
            bounded.apply_removed(inst, hs, medium)
        elif kind == "cleared":
            bounded.apply_cleared(inst)
        else:
            bounded.remove_instance(inst)
    unbounded, _ = _replay(evs)
    full = unbounded.prefix_hits(request)
    for inst, n in bounded.prefix_hits(request).items():
        assert n <= full.get(inst, 0)
    assert all(bounded.block_count(i) <= bound for i in INSTANCES)


def test_counting_stops_at_the_first_missing_block():
    index = PrefixIndex()
    index.apply_stored("a", [1, 2, 4])  # block 3 evicted: only 1, 2 are a usable prefix
    index.apply_stored("b", [1, 2, 3, 4])
    assert index.prefix_hits([1, 2, 3, 4]) == {"a": 2, "b": 4}
    assert index.prefix_hits([9, 1, 2]) == {}


def test_a_block_in_two_tiers_survives_eviction_from_one():
    index = PrefixIndex()
    index.apply_stored("a", [1, 2], medium="GPU")
    index.apply_stored("a", [1, 2], medium="CPU")
    index.apply_removed("a", [1, 2], medium="GPU")
    assert index.prefix_hits([1, 2]) == {"a": 2}
    index.apply_removed("a", [1], medium="CPU")
    assert index.prefix_hits([1, 2]) == {}


def test_clear_and_remove_instance_leave_other_instances_alone():
    index = PrefixIndex()
    index.apply_stored("a", [1, 2])
    index.apply_stored("b", [1, 2])
    index.apply_cleared("a")
    assert index.prefix_hits([1, 2]) == {"b": 2}
    index.remove_instance("b")
    assert index.prefix_hits([1, 2]) == {} and len(index) == 0 and index.instances() == ("a",)


def test_lookup_is_fast_at_engine_scale():
    """100k blocks on each of 8 instances; a 64-block lookup stays well under a millisecond."""
    index = PrefixIndex()
    for i in range(8):
        index.apply_stored(f"i{i}", range(i * 50_000, i * 50_000 + 100_000))
    request = list(range(60_000, 60_064))  # held by i0 and i1
    began = time.perf_counter()
    for _ in range(100):
        hits = index.prefix_hits(request)
    per_lookup_ms = (time.perf_counter() - began) * 10
    assert hits == {"i0": 64, "i1": 64}
    assert per_lookup_ms < 1.0, per_lookup_ms


def test_bad_bound_rejected():
    with pytest.raises(ValueError):
        PrefixIndex(max_blocks_per_instance=0)
