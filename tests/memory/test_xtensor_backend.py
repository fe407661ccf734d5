"""The xTensor attention backend and its store, driven like vLLM drives them, without an engine.

Requests arrive, decode, share prefix blocks and get preempted; blocks come from a shuffled
free list as vLLM's would. Every step the backend writes the new K/V through vLLM's slot
mapping and computes attention over the views; it must equal dense attention over a shadow
copy of every request's K/V."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from xllm_plugin.config import XTensorConfig
from xllm_plugin.kernels import native_decode
from xllm_plugin.kernels.cpu_attention import reference_attention
from xllm_plugin.memory.cpu_mapper import count_vmas, max_map_count
from xllm_plugin.memory.vllm_backend import XTensorAttentionImpl, XTensorAttentionMetadata
from xllm_plugin.memory.vllm_store import XTensorKVStore, set_current_store, store_geometry

LAYERS, BLOCKS, BLOCK, KV_HEADS, HEADS, HEAD = 2, 40, 32, 2, 4, 64
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]


class Engine:
    """Just enough of vLLM's block manager and model runner to drive the backend."""

    def __init__(self, options: XTensorConfig, seed: int,
                 dtype: torch.dtype = torch.float32, block: int = BLOCK) -> None:
        size = torch.empty((), dtype=dtype).element_size()
        self.block = block
        geometry = store_geometry(num_layers=LAYERS, num_blocks=BLOCKS, block_size=block,
                                  num_kv_heads=KV_HEADS, head_size=HEAD, dtype_bytes=size,
                                  offset=0,
                                  layer_stride=2 * BLOCKS * block * KV_HEADS * HEAD * size,
                                  max_model_len=512, max_num_seqs=4,
                                  reusable_views=options.reusable_views)
        self.dtype = dtype
        # bf16 rows are rounded on the way out (and bf16 probabilities on AMX); fp32 is exact.
        self.tol = 1e-5 if dtype == torch.float32 else 3e-2
        self.store = XTensorKVStore(geometry, dtype, NAMES, options, 10.0)
        set_current_store(self.store)
        # One implementation per layer, as vLLM builds them.
        self.impls = [XTensorAttentionImpl(HEADS, HEAD, 0.125, KV_HEADS, None, None, "auto")
                      for _ in NAMES]
        self.layers = [SimpleNamespace(layer_name=n) for n in NAMES]
        self.rng = random.Random(seed)
        self.free = list(range(BLOCKS))
        self.rng.shuffle(self.free)
        self.blocks: dict[str, list[int]] = {}
        self.kv: dict[str, list[torch.Tensor]] = {}  # shadow K/V per request, per layer
        self.batch: list[str] = []
        self.table = np.zeros((8, 16), dtype=np.int32)
        self.held = np.zeros(8, dtype=np.int32)
        self.store.set_batch_source(lambda: (self.batch, self.table, self.held))

    def add(self, rid: str, shared_from: str | None = None, shared_blocks: int = 0) -> None:
        self.blocks[rid] = list(self.blocks[shared_from][:shared_blocks]) if shared_from else []
        self.kv[rid] = [torch.empty(0, 2, KV_HEADS, HEAD, dtype=self.dtype)
                        for _ in range(LAYERS)]
        if shared_from:  # a prefix-cache hit: the shared blocks already hold these tokens
            for layer in range(LAYERS):
                self.kv[rid][layer] = self.kv[shared_from][layer][:shared_blocks * self.block].clone()

    def preempt(self, rid: str) -> None:
        self.free.extend(self.blocks.pop(rid))
        tokens = self.kv[rid][0].shape[0]
        self.store.release([rid])
        self.blocks[rid] = []
        self._recompute = getattr(self, "_recompute", {})
        self._recompute[rid] = tokens

    def step(self, work: dict[str, int], lookahead: int) -> None:
        self.batch = list(work)
        qsl = [0]
        new_kv, slots = [], []
        for row, (rid, count) in enumerate(work.items()):
            start = self.kv[rid][0].shape[0]
            recompute = getattr(self, "_recompute", {}).pop(rid, None)
            if recompute is not None:  # resumed after preemption: recompute all tokens
                start, count = 0, recompute
                for layer in range(LAYERS):
                    new_kv.append(None)
                self.kv[rid] = [self.kv[rid][layer][:0] for layer in range(LAYERS)]
            need = -(-(start + count + lookahead) // self.block)
            while len(self.blocks[rid]) < need:
                self.blocks[rid].append(self.free.pop())
            self.table[row, :len(self.blocks[rid])] = self.blocks[rid]
            self.held[row] = len(self.blocks[rid])
            positions = range(start, start + count)
            slots += [self.blocks[rid][p // self.block] * self.block + p % self.block
                      for p in positions]
            qsl.append(qsl[-1] + count)
        tokens = qsl[-1]
        seq_lens = torch.tensor([self.kv[r][0].shape[0] + (qsl[i + 1] - qsl[i])
                                 for i, r in enumerate(work)], dtype=torch.int32)
        rows = self.store.prepare_step(len(work), torch.tensor(qsl, dtype=torch.int32),
                                       seq_lens, torch.from_numpy(self.table))
        meta = XTensorAttentionMetadata(tokens, max(work.values()), rows,
                                        torch.tensor(slots, dtype=torch.int64))
        for layer in range(LAYERS):
            query = torch.randn(tokens, HEADS, HEAD).to(self.dtype)
            key = torch.randn(tokens, KV_HEADS, HEAD).to(self.dtype)
            value = torch.randn(tokens, KV_HEADS, HEAD).to(self.dtype)
            self.impls[layer].do_kv_cache_update(self.layers[layer], key, value, None, meta.slot_mapping)
            out = torch.empty_like(query)
            self.impls[layer].forward(self.layers[layer], query, key, value, None, meta, out)
            for i, rid in enumerate(work):
                a, b = qsl[i], qsl[i + 1]
                pair = torch.stack([key[a:b], value[a:b]], dim=1)
                self.kv[rid][layer] = torch.cat([self.kv[rid][layer], pair])
                shadow = self.kv[rid][layer]
                ref = reference_attention(query[a:b], shadow[:, 0], shadow[:, 1], 0.125)
                torch.testing.assert_close(out[a:b], ref, atol=self.tol, rtol=self.tol)

    def finish(self, rid: str) -> None:
        self.store.release([rid])
        for block in self.blocks.pop(rid):
            if not any(block in blocks for blocks in self.blocks.values()):
                self.free.append(block)


def _fraction_for(vmas: int) -> float:
    """The map_budget_fraction that leaves the store a budget of about ``vmas`` VMAs."""
    return vmas / (max_map_count() - count_vmas())


# 1e-6: no view fits, every row falls back; "partial": a budget of 48 VMAs (6 runs of the
# 4 planes) holds some requests' views and refuses others, which wait for room.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("budget", [0.5, 1e-6, "partial"])
def test_backend_matches_dense_attention_through_a_request_lifecycle(
        native: bool, budget: float | str, dtype: torch.dtype) -> None:
    fraction = _fraction_for(48) if budget == "partial" else budget
    options = XTensorConfig(reusable_views=2, map_budget_fraction=fraction, native_decode=native,
                            native_prefill=native)
    engine = Engine(options, seed=7, dtype=dtype)
    _lifecycle(engine)
    snapshot = engine.store.snapshot()
    assert snapshot["rows"] > 0
    if budget == "partial":
        assert 0 < snapshot["fallback_rows"] < snapshot["rows"]
        assert snapshot["vma"]["estimate"] <= snapshot["vma"]["budget"]
    elif budget < 1e-3:
        assert snapshot["fallback_rows"] == snapshot["rows"]
    else:
        assert snapshot["fallback_rows"] == 0
        assert snapshot["premap_hits"] > 0 and snapshot["reuse_hits"] > 0
    assert snapshot["wasted_bytes_max"] <= snapshot["page_bytes"] * 2 * LAYERS
    assert sum(snapshot["pages"].values()) == BLOCKS
    lib = native_decode.load()
    amx_prefill = native and lib is not None and native_decode.has_prefill(lib, dtype)
    assert snapshot["prefill_kernel"] == ("native-avx512-amx" if amx_prefill else "sdpa")
    # where both kernels are native, V is stored in token pairs (the tile unit's layout)
    assert snapshot["v_layout"] == ("token-pairs" if amx_prefill else "token-major")
    set_current_store(None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pages_of_16_tokens_are_copied_for_rows_without_a_view(dtype: torch.dtype) -> None:
    """The kernel reads a row without a view in its pages only where pages hold a multiple
    of 32 tokens; smaller pages (a --block-size of 16) are copied into a buffer first."""
    options = XTensorConfig(reusable_views=2, map_budget_fraction=1e-6)
    engine = Engine(options, seed=11, dtype=dtype, block=16)
    _lifecycle(engine)
    snapshot = engine.store.snapshot()
    assert snapshot["rows"] > 0 and snapshot["fallback_rows"] == snapshot["rows"]
    set_current_store(None)


def _lifecycle(engine: Engine) -> None:
    """Prefill, decode across block edges, a prefix hit, a preemption, a finish."""
    engine.add("a")
    engine.add("b")
    engine.step({"a": 70, "b": 33}, lookahead=1)  # prefill
    for _ in range(30):
        engine.step({"a": 1, "b": 1}, lookahead=1)  # decode across block boundaries
    engine.add("c", shared_from="a", shared_blocks=2)  # prefix hit on a's first two blocks
    engine.step({"a": 1, "b": 1, "c": 5}, lookahead=1)
    engine.preempt("b")
    engine.step({"a": 1, "c": 1}, lookahead=1)
    engine.step({"a": 1, "b": 1, "c": 1}, lookahead=1)  # b resumes by recomputation
    engine.finish("a")
    engine.add("d")
    for _ in range(3):
        engine.step({"b": 1, "c": 1, "d": 9}, lookahead=0)
