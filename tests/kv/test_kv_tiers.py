"""Tier-aware KV routing: the index's per-tier prefix and the kv_aware rule on hand-made
cases (pure code; the engine side is in tests/kvstore)."""

from __future__ import annotations

import pytest

from router.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, apply_events
from router.kv.index import STORE_HOLDER, PrefixIndex
from router.policies import KVAwarePolicy, KVAwareSettings
from router.policies.kv_aware import tier_weighted_hits
from router.policies.types import ClusterView, InstanceState, RequestInfo, TierHits

BLOCKS = (11, 12, 13, 14)


def test_without_tier_events_there_is_no_tier_data():
    index = PrefixIndex()
    index.apply_stored("a", BLOCKS[:2], "GPU")
    index.apply_stored("b", BLOCKS[:1])  # older engines publish no medium
    assert index.tier_hits(BLOCKS, ["a", "b"]) == {}
    assert index.prefix_hits(BLOCKS) == {"a": 2, "b": 1}


def test_each_leading_block_counts_under_its_fastest_tier():
    index = PrefixIndex()
    index.apply_stored("a", BLOCKS[:1], "GPU")
    index.apply_stored("a", BLOCKS[:2], "CPU")      # DRAM tier includes the GPU block
    index.apply_stored("a", BLOCKS[2:3], "STORAGE")
    index.apply_stored("b", BLOCKS, "MOONCAKE_STORE")  # b put all four into the store
    hits = index.tier_hits(BLOCKS, ["a", "b", "c"])
    # a: 1 in its KV cache, 1 in DRAM, 1 on SSD, then the 4th from the store (a is no store
    # member yet: it published no store block) -> stops after 3
    assert hits["a"] == (1, 1, 1, 0)
    assert hits["b"] == (0, 0, 0, 4)
    assert "c" not in hits  # never attached to the store, holds nothing
    index.apply_stored("a", [99], "MOONCAKE_STORE")  # now a is a member
    assert index.tier_hits(BLOCKS, ["a"])["a"] == (1, 1, 1, 1)
    assert index.store_members() == {"a", "b"}


def test_store_blocks_belong_to_no_instance():
    index = PrefixIndex()
    index.apply_stored("b", BLOCKS, "MOONCAKE_STORE")
    assert index.prefix_hits(BLOCKS) == {STORE_HOLDER: 4}
    index.remove_instance("b")  # b left; what it put into the store stays there
    index.apply_stored("a", [1], "MOONCAKE_STORE")
    assert index.tier_hits(BLOCKS, ["a"]) == {"a": (0, 0, 0, 4)}
    index.apply_removed("a", BLOCKS[2:], "MOONCAKE_STORE")
    assert index.tier_hits(BLOCKS, ["a"]) == {"a": (0, 0, 0, 2)}


def test_engine_cache_reset_keeps_dram_and_ssd_entries():
    """vLLM's AllBlocksCleared empties the engine cache only; the tiers below still hold."""
    index = PrefixIndex()
    apply_events(index, "a", [BlockStored(block_hashes=list(BLOCKS), medium="GPU"),
                              BlockStored(block_hashes=list(BLOCKS[:3]), medium="CPU"),
                              BlockStored(block_hashes=[BLOCKS[3]], medium="STORAGE")])
    assert index.tier_hits(BLOCKS, ["a"]) == {"a": (4, 0, 0, 0)}
    apply_events(index, "a", [AllBlocksCleared()])
    assert index.tier_hits(BLOCKS, ["a"]) == {"a": (0, 3, 1, 0)}
    apply_events(index, "a", [BlockRemoved(block_hashes=[BLOCKS[1]], medium="CPU")])
    assert index.tier_hits(BLOCKS, ["a"]) == {"a": (0, 1, 0, 0)}


def test_engine_cache_reset_without_tiers_clears_everything_as_before():
    index = PrefixIndex()
    apply_events(index, "a", [BlockStored(block_hashes=list(BLOCKS), medium="GPU")])
    apply_events(index, "a", [AllBlocksCleared()])
    assert index.block_count("a") == 0


# --- policy -------------------------------------------------------------------------------------

def view(loads: dict[str, int], tiers: dict[str, TierHits] | None = None,
         hits: dict[str, int] | None = None) -> ClusterView:
    return ClusterView(instances=tuple(InstanceState(i, running=n) for i, n in loads.items()),
                       prefix_hits=hits or {}, tier_hits=tiers or {})


def request(n: int = 8) -> RequestInfo:
    return RequestInfo("r", prompt_tokens=n * 32, max_tokens=4, block_hashes=tuple(range(n)))


NO_PREDICTION = KVAwareSettings(predict_ttl_s=0)


def test_weighted_hit_formula():
    s = KVAwareSettings(dram_hit_weight=0.5, ssd_hit_weight=0.25, store_hit_weight=0.125)
    assert tier_weighted_hits(TierHits(hbm=2, dram=2, ssd=4, store=8), s) == 2 + 1 + 1 + 1


def test_prefix_in_the_kv_cache_beats_the_same_prefix_in_the_store():
    policy = KVAwarePolicy(NO_PREDICTION)
    tiers = {"a": TierHits(store=8), "b": TierHits(hbm=8)}
    assert policy.route(request(), view({"a": 0, "b": 0}, tiers)).instance_id == "b"


def test_a_store_hit_beats_recomputing_at_equal_load():
    policy = KVAwarePolicy(NO_PREDICTION)
    tiers = {"a": TierHits(store=8)}
    decision = policy.route(request(), view({"a": 1, "b": 1}, tiers))
    assert (decision.instance_id, decision.reason) == ("a", "kv_aware_tier_hit")


def test_load_moves_a_request_to_an_instance_that_loads_the_prefix_from_the_store():
    """With the store, a busy holder no longer forces a recompute elsewhere: the idle
    instance scores 0.6 (store) - 0 (load) against 1.0 - 0.5 x 3/3 for the busy holder."""
    policy = KVAwarePolicy(NO_PREDICTION)
    tiers = {"a": TierHits(hbm=8), "b": TierHits(store=8)}
    assert policy.route(request(), view({"a": 3, "b": 0}, tiers)).instance_id == "b"
    # the same loads without the store: affinity wins (1.0 - 0.5 vs 0 - 0)
    assert policy.route(request(), view({"a": 3, "b": 0}, hits={"a": 8})).instance_id == "a"


def test_dram_tier_hit_ranks_between_kv_cache_and_store():
    policy = KVAwarePolicy(NO_PREDICTION)
    tiers = {"a": TierHits(store=8), "b": TierHits(dram=8), "c": TierHits(hbm=8)}
    loads = {"a": 0, "b": 0, "c": 0}
    assert policy.route(request(), view(loads, tiers)).instance_id == "c"
    del tiers["c"]
    assert policy.route(request(), view(loads, tiers)).instance_id == "b"


@pytest.mark.parametrize("loads,hits", [({"a": 0, "b": 2}, {"a": 3}), ({"a": 2, "b": 0}, {"a": 8}),
                                        ({"a": 1, "b": 1}, {}), ({"a": 9, "b": 0}, {"a": 8})])
def test_without_tier_data_decisions_are_unchanged(loads, hits):
    """The same decision as the rule before tiers existed (weights do not matter then)."""
    old = KVAwarePolicy(NO_PREDICTION)
    new = KVAwarePolicy(KVAwareSettings(predict_ttl_s=0, dram_hit_weight=0.1,
                                        ssd_hit_weight=0.1, store_hit_weight=0.1))
    assert old.route(request(), view(loads, hits=hits)) == new.route(request(), view(loads, hits=hits))


def test_tier_weights_are_validated():
    with pytest.raises(ValueError):
        KVAwareSettings(store_hit_weight=1.5)
