"""The CPU attention backend that reads each request's K/V from its xTensor view.

Registered over vLLM's ``CPU_ATTN`` (``register_backend``) by
:class:`~xllm_plugin.memory.vllm_worker.XTensorCPUWorker` when ``xllm.xtensor`` is on,
so every decoder attention layer of the model uses it. Per step, the metadata builder
asks the store to bind each row's request to a slot (mapping what changed); per layer,
the implementation writes the new K/V through the paged view (vLLM's slot mapping) and
computes attention on the slot tensors: all decode rows in one native kernel call
(:mod:`xllm_plugin.kernels.native_decode`, reading ``slot * stride``), prefill chunks one
native call each on the AMX tile unit where the CPU has one (bf16), else PyTorch SDPA on
slices (:mod:`xllm_plugin.kernels.cpu_attention`). No block table reaches any kernel.

Within a layer's KV bytes the layout is xTensor's (``[K pages][V pages]``, token-major
K; V token-major too, or in token pairs where both native kernels read it, see
``xtensor_options.v_pairs``), not the stock CPU backend's; only this backend reads or writes
them. The new K/V of a step go in with one native call per layer where the kernel is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import (
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
from vllm.v1.kv_cache_interface import AttentionSpec

from xllm_plugin.kernels import native_decode
from xllm_plugin.kernels.cpu_attention import attend_one
from xllm_plugin.memory.vllm_store import StepRows, current_store


@dataclass
class XTensorAttentionMetadata:
    num_actual_tokens: int
    max_query_len: int
    rows: StepRows
    slot_mapping: torch.Tensor
    causal: bool = True


class XTensorMetadataBuilder(AttentionMetadataBuilder[XTensorAttentionMetadata]):
    """Binds the step's requests to their xTensor views (once per step, for all layers)."""

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config,
                 device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> XTensorAttentionMetadata:
        meta = common_attn_metadata
        if not isinstance(meta.causal, bool) or not meta.causal:
            raise NotImplementedError("xTensor attention supports causal decoder attention only")
        rows = current_store().prepare_step(meta.num_reqs, meta.query_start_loc_cpu,
                                            meta.seq_lens.cpu(), meta.block_table_tensor)
        return XTensorAttentionMetadata(num_actual_tokens=meta.num_actual_tokens,
                                        max_query_len=meta.max_query_len, rows=rows,
                                        slot_mapping=meta.slot_mapping)


class XTensorAttentionImpl(AttentionImpl):
    """Decoder attention over contiguous per-request K/V (native decode, SDPA with GQA)."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None,
                 kv_cache_dtype: str, logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None) -> None:
        unsupported = {
            "attention type " + str(attn_type): attn_type != AttentionType.DECODER,
            "ALiBi": alibi_slopes is not None,
            "sliding window": sliding_window not in (None, -1),
            "logits soft cap": bool(logits_soft_cap),
            "attention sinks": sinks is not None,
            "quantized KV cache " + kv_cache_dtype: kv_cache_dtype not in ("auto", "bfloat16",
                                                                          "float16", "float32"),
            "cross-layer KV sharing": kv_sharing_target_layer_name is not None,
        }
        missing = [name for name, present in unsupported.items() if present]
        if missing:
            raise NotImplementedError(
                "xllm.xtensor does not support " + ", ".join(missing) + "; turn it off")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.num_queries_per_kv = num_heads // num_kv_heads
        self.attn_type = attn_type
        self.kv_cache_dtype = kv_cache_dtype
        self.alibi_slopes = None
        self.sliding_window = -1
        self.logits_soft_cap = 0
        self.sinks = None
        self.kv_sharing_target_layer_name = None
        self._layer: int | None = None

    def _layer_index(self, layer: AttentionLayer) -> int:
        if self._layer is None:
            name = getattr(layer, "layer_name", None)
            index = current_store().layer_index.get(name)  # type: ignore[arg-type]
            if index is None:
                raise RuntimeError(f"layer {name!r} has no xTensor KV planes")
            self._layer = index
        return self._layer

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor,
                           value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        """Write the step's K/V through the paged view at vLLM's slots (token indices)."""
        store = current_store()
        index = self._layer_index(layer)  # type: ignore[arg-type]
        writes = store.kv_writes(slot_mapping)
        if writes is not None:  # one native call; V in token pairs where the store keeps them
            writes.run(key, value, store.token_k[index], store.token_v[index])
            return
        count = slot_mapping.shape[0]
        slots = slot_mapping
        key, value = key[:count], value[:count]
        if count and int(slots.min()) < 0:  # padded tokens carry slot -1
            keep = slots >= 0
            slots, key, value = slots[keep], key[keep], value[keep]
        store.token_k[index].index_copy_(0, slots, key)
        store.token_v[index].index_copy_(0, slots, value)

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: XTensorAttentionMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by xTensor")
        if attn_metadata is None:  # profiling / warm-up without KV
            return output
        store = current_store()
        index = self._layer_index(layer)
        rows = attn_metadata.rows
        slot_k, slot_v = store.slot_k[index], store.slot_v[index]
        pairs = store.v_pairs
        if rows.decode is not None:  # all decode rows with a view: one native call
            rows.decode.run(query, output, slot_k, slot_v, self.scale)
        paged_k, paged_v = store.paged_k[index], store.paged_v[index]
        if rows.paged is not None:  # decode rows without a view: read in their pages
            if rows.gathered_pages is None:
                rows.paged.run(query, output, paged_k, paged_v, self.scale)
            else:  # pages the kernel cannot step through: copied first
                gathered_k, gathered_v = store.gather_pages(index, rows.gathered_pages)
                rows.paged.run(query, output, gathered_k, gathered_v, self.scale)
        qsl = rows.query_start_loc
        prefill_lib = store.native_prefill
        for row in (range(len(rows.slots)) if rows.other_rows is None else rows.other_rows):
            slot, length, pages = rows.slots[row], rows.seq_lens[row], rows.fallback_pages[row]
            if slot is not None:
                key, value = slot_k[slot, :length], slot_v[slot, :length]
            else:  # no view within the VMA budget: gather this request's pages
                key = paged_k[pages].flatten(0, 1)[:length]
                value = paged_v[pages].flatten(0, 1)[:length]
            if qsl[row + 1] > qsl[row]:
                rows_q, rows_out = query[qsl[row]:qsl[row + 1]], output[qsl[row]:qsl[row + 1]]
                if prefill_lib is None or not native_decode.prefill(
                        prefill_lib, rows_q, key, value, self.scale, rows_out, pairs):
                    if pairs:  # only if the kernel could not get memory for its repacks
                        value = native_decode.values_from_pairs(
                            slot_v[slot] if slot is not None else paged_v[pages].flatten(0, 1),
                            length)
                    attend_one(rows_q, key, value, self.scale, rows_out)
        return output


class XTensorAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU attention backend with xTensor's metadata builder and implementation.

    Keeps the CPU backend's name, block sizes, head sizes and KV cache spec, so vLLM
    sizes and allocates the KV cache exactly as for stock CPU attention.
    """

    forward_includes_kv_cache_update: bool = False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @staticmethod
    def get_impl_cls() -> type[XTensorAttentionImpl]:
        return XTensorAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[XTensorMetadataBuilder]:
        return XTensorMetadataBuilder
