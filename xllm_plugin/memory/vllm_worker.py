"""The CPU worker that puts vLLM's KV cache into xTensor memory.

Selected with ``--worker-cls xllm_plugin.memory.XTensorCPUWorker``; with
``xllm.xtensor`` off it is vLLM's ``CPUWorker`` unchanged. With it on, the worker

1. registers :class:`~.vllm_backend.XTensorAttentionBackend` over ``CPU_ATTN`` before
   the model is built, so every decoder attention layer reads xTensor views;
2. creates the :class:`~.vllm_store.XTensorKVStore` from vLLM's own KV cache config and
   lets vLLM allocate its KV cache *inside* the store's memfd (an allocation context
   that answers vLLM's ``torch.zeros`` for the KV buffer with the store's paged view),
   so vLLM's tensors, block ids and the store are one memory;
3. tells the store which requests finished or were preempted, so their views go to
   the reuse list.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from vllm.logger import init_logger
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from xllm_plugin.config import XLLMConfig, parse_xllm_config
from xllm_plugin.memory.geometry import XTensorLayoutError
from xllm_plugin.memory.vllm_store import XTensorKVStore, set_current_store, store_geometry

logger = init_logger(__name__)

BACKEND_PATH = "xllm_plugin.memory.vllm_backend.XTensorAttentionBackend"


class _AllocateFromStore(TorchFunctionMode):
    """Answers vLLM's one ``torch.zeros(size, dtype=int8)`` for the KV buffer with the store.

    Used as vLLM's ``kv_cache_allocation_context``: vLLM then cuts its per-layer KV
    views from xTensor's memory with its own code. Every other call passes through.
    """

    def __init__(self, store: XTensorKVStore, size: int) -> None:
        super().__init__()
        self._store = store
        self._size = size
        self.used = False

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if (func is torch.zeros and not self.used and kwargs.get("dtype") is torch.int8
                and len(args) == 1 and args[0] == self._size):
            self.used = True
            return self._store.buffer()[:self._size]
        return func(*args, **kwargs)


def xtensor_geometry_error(kv_cache_config: KVCacheConfig, layout: Any) -> str | None:
    """Why this KV cache cannot live in xTensor memory, or None if it can."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1 or type(groups[0].kv_cache_spec) is not FullAttentionSpec:
        return "xTensor serves models with one full-attention KV cache group only"
    spec = groups[0].kv_cache_spec
    if spec.sliding_window is not None or spec.head_size_v != spec.head_size:
        return "xTensor needs full attention with equal K and V head sizes"
    if spec.page_size_padded is not None or spec.num_head_slots is not None:
        return "xTensor does not support padded KV pages"
    if len(kv_cache_config.kv_cache_tensors) != 1:
        return "xTensor expects one KV cache tensor for all layers"
    tensor = kv_cache_config.kv_cache_tensors[0]
    if not layout.is_layer_compact or tensor.block_stride != spec.page_size_bytes:
        return (f"xTensor needs a layer-compact KV cache layout (got {layout.name}, block "
                f"stride {tensor.block_stride} B for {spec.page_size_bytes} B pages)")
    if tensor.layer_stride < kv_cache_config.num_blocks * spec.page_size_bytes:
        return "xTensor needs each layer's blocks to be one contiguous range"
    return None


class XTensorCPUModelRunner(CPUModelRunner):
    """vLLM's CPU model runner with its KV cache in an xTensor store.

    The worker re-classes vLLM's own runner instance to this subclass after vLLM built
    it; the subclass adds no construction state of its own, only the overrides below.
    """

    xllm_config: XLLMConfig
    xtensor_store: XTensorKVStore | None = None

    def initialize_kv_cache(self, kv_cache_config: KVCacheConfig, is_profiling: bool = False,
                            kv_cache_allocation_context: AbstractContextManager | None = None
                            ) -> None:
        if not self.xllm_config.xtensor:
            return super().initialize_kv_cache(kv_cache_config, is_profiling,
                                               kv_cache_allocation_context)
        if kv_cache_allocation_context is not None and \
                not isinstance(kv_cache_allocation_context, nullcontext):
            raise RuntimeError("xllm.xtensor cannot share the KV allocation with another "
                               "memory pool (a KV connector's or sleep mode's)")
        layout = self.cache_config.get_resolved_kv_cache_layout()
        error = xtensor_geometry_error(kv_cache_config, layout)
        if error:
            raise XTensorLayoutError(f"{error}; turn xllm.xtensor off for this model")
        store = self._create_store(kv_cache_config)
        allocation = _AllocateFromStore(store, kv_cache_config.kv_cache_tensors[0].size)
        set_current_store(store)
        super().initialize_kv_cache(kv_cache_config, is_profiling,
                                    kv_cache_allocation_context=allocation)
        if not allocation.used:
            raise RuntimeError("vLLM allocated its KV cache without the xTensor store "
                               "(its allocation code changed); turn xllm.xtensor off")
        self._check_views(kv_cache_config, store)

        def batch() -> tuple[list[str], Any, Any]:
            table = self.input_batch.block_table.block_tables[0]
            return self.input_batch.req_ids, table.block_table.np, table.num_blocks_per_row

        store.set_batch_source(batch)
        self.xtensor_store = store
        g = store.geometry
        paths = store.kernel_paths()
        logger.info(
            "xTensor: %d pages of %d B per plane x %d planes in a memfd; %d views of %d "
            "tokens; VMA budget %d of vm.max_map_count %d; decode %s, prefill %s, V %s",
            g.num_pages, g.page_bytes, g.num_planes, g.num_slots, g.max_tokens,
            store.vma_budget, store.max_map_count, paths["decode_kernel"],
            paths["prefill_kernel"], paths["v_layout"])
        store.publish(force=True)

    def _create_store(self, kv_cache_config: KVCacheConfig) -> XTensorKVStore:
        spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
        tensor = kv_cache_config.kv_cache_tensors[0]
        options = self.xllm_config.xtensor_options
        geometry = store_geometry(
            num_layers=len(tensor.layers), num_blocks=kv_cache_config.num_blocks,
            block_size=spec.block_size, num_kv_heads=spec.num_kv_heads,
            head_size=spec.head_size, dtype_bytes=spec.dtype.itemsize, offset=tensor.offset,
            layer_stride=tensor.layer_stride, max_model_len=self.max_model_len,
            max_num_seqs=self.scheduler_config.max_num_seqs,
            reusable_views=options.reusable_views)
        if geometry.store_bytes > tensor.size:
            raise XTensorLayoutError(f"xTensor: the KV buffer ({tensor.size} B) is smaller "
                                     f"than its layers ({geometry.store_bytes} B)")
        return XTensorKVStore(geometry, spec.dtype, tensor.layers, options,
                              self.xllm_config.status_interval_ms / 1000,
                              store_bytes=tensor.size)

    def _check_views(self, kv_cache_config: KVCacheConfig, store: XTensorKVStore) -> None:
        """Every layer's vLLM KV view starts where the store has that layer's K plane."""
        for name in kv_cache_config.kv_cache_tensors[0].layers:
            layer = self.compilation_config.static_forward_context[name]
            expected = store.paged_k[store.layer_index[name]].data_ptr()
            if layer.kv_cache.data_ptr() != expected:
                raise RuntimeError(f"xTensor: layer {name}'s KV cache is not where the store "
                                   "put it; turn xllm.xtensor off")

    def _update_states(self, scheduler_output: Any) -> Any:
        store = self.xtensor_store
        if store is not None:
            if scheduler_output.kv_cache_block_copies:
                raise NotImplementedError("xllm.xtensor does not support KV block copies")
            done = set(scheduler_output.finished_req_ids)
            done.update(scheduler_output.preempted_req_ids or ())
            if done:
                store.release(done)
                store.publish()
        return super()._update_states(scheduler_output)

    def _zero_block_ids(self, block_ids: list[int]) -> None:
        if self.xtensor_store is not None:
            self.xtensor_store.zero_pages(block_ids)
        else:
            super()._zero_block_ids(block_ids)


class XTensorCPUWorker(CPUWorker):
    """vLLM's CPU worker; with ``xllm.xtensor`` on, its KV cache lives in xTensor memory."""

    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        self.xllm_config = parse_xllm_config(vllm_config.additional_config)
        if self.xllm_config.xtensor:
            # Before the model is built: every decoder attention layer picks this backend.
            register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)
        super().__init__(vllm_config, *args, **kwargs)

    def init_device(self) -> None:
        super().init_device()
        if not self.xllm_config.xtensor:
            return
        if not isinstance(self.model_runner, CPUModelRunner) or \
                type(self.model_runner) is not CPUModelRunner:
            raise RuntimeError("xllm.xtensor needs vLLM's (v1) CPU model runner; unset "
                               "VLLM_USE_V2_MODEL_RUNNER or turn xllm.xtensor off")
        self.model_runner.__class__ = XTensorCPUModelRunner
        self.model_runner.xllm_config = self.xllm_config  # type: ignore[attr-defined]
