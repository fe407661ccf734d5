"""BlockHasher must agree bit for bit with vLLM's own prefix-cache hashing."""

from __future__ import annotations

import importlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.kv.hashing import DEFAULT_HASH_SEED, BlockHasher

token_lists = st.lists(st.integers(min_value=0, max_value=200_000), max_size=300)


def _vllm_hashes(token_ids, block_size, seed, algo="sha256", cache_salt=None):
    """Block hashes as vLLM computes them, in the form KV events publish."""
    kvu = pytest.importorskip("vllm.v1.core.kv_cache_utils")
    hashing = importlib.import_module("vllm.utils.hashing")
    fn = hashing.get_hash_fn_by_name(algo)
    with pytest.MonkeyPatch.context() as mp:
        if seed is None:
            mp.delenv("PYTHONHASHSEED", raising=False)
        else:
            mp.setenv("PYTHONHASHSEED", seed)
        kvu.init_none_hash(fn)
    parent, out = None, []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        extra = (("cache_salt", cache_salt),) if cache_salt and start == 0 else None
        parent = kvu.hash_block_tokens(fn, parent, token_ids[start:start + block_size], extra)
        out.append(int.from_bytes(parent, "big") & ((1 << 64) - 1))
    return tuple(out)


@settings(max_examples=60, deadline=None)
@given(tokens=token_lists, block_size=st.sampled_from([1, 16, 32, 128]))
def test_default_seed_matches_vllm_on_random_tokens(tokens, block_size):
    assert BlockHasher(block_size).hashes(tokens) == _vllm_hashes(tokens, block_size, None)


@settings(max_examples=30, deadline=None)
@given(tokens=token_lists, seed=st.sampled_from(["0", "42", "router-test"]))
def test_pythonhashseed_changes_hashes_like_vllm(tokens, seed):
    assert BlockHasher(16, hash_seed=seed).hashes(tokens) == _vllm_hashes(tokens, 16, seed)


def test_cbor_algorithm_and_cache_salt_match_vllm():
    pytest.importorskip("cbor2")
    tokens = list(range(1000, 1100))
    assert (BlockHasher(32, algorithm="sha256_cbor").hashes(tokens)
            == _vllm_hashes(tokens, 32, None, "sha256_cbor"))
    assert (BlockHasher(32).hashes(tokens, cache_salt="tenant-a")
            == _vllm_hashes(tokens, 32, None, cache_salt="tenant-a"))


def test_only_full_blocks_are_hashed_and_hashes_chain_over_the_prefix():
    hasher = BlockHasher(4)
    assert hasher.hashes([1, 2, 3]) == ()
    a = hasher.hashes([1, 2, 3, 4, 5, 6, 7, 8, 9])
    b = hasher.hashes([9, 9, 9, 9, 5, 6, 7, 8])
    assert len(a) == 2 and len(b) == 2
    assert a[1] != b[1], "the same block after a different prefix must hash differently"
    assert all(0 <= h < 2**64 for h in a)
    assert hasher.hash_seed == DEFAULT_HASH_SEED


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="block_size"):
        BlockHasher(0)
    with pytest.raises(ValueError, match="unsupported hash algorithm"):
        BlockHasher(16, algorithm="md5")
