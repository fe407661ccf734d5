"""``XLLMStoreConnector``: vLLM's KV connector for the plugin's global multi-tier KV cache.

Load it with::

    --kv-transfer-config '{"kv_connector": "XLLMStoreConnector",
                           "kv_connector_module_path": "xllm_plugin.kvstore.connector",
                           "kv_role": "kv_both"}'
    --additional-config '{"xllm": {"kv_store": {"master": "HOST:PORT", ...}}}'

This class is glue only: the scheduler-side decisions are in
``scheduler_side.py`` (lookups, load and save plans over ``tiers.py``), the
worker-side I/O in ``worker.py`` (DRAM pool, SSD files, Mooncake Store,
``block_io.py`` for the engine's KV tensors). Why vLLM's own Mooncake and
offloading connectors are not used: on CPU they fail (CUDA streams, events and
``torch.cuda`` memory pools are assumed); this one puts the device-specific
part behind ``KVBlockIO`` and runs the same everywhere.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVCacheEvent
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from xllm_plugin.kvstore.settings import KVStoreConfig
from xllm_plugin.kvstore.tiers import StepPlan, Tier

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("vllm.xllm_plugin.kvstore")  # vLLM configures "vllm.*" handlers

HIT_SOURCE = {Tier.DRAM: CacheHitSource.HOST, Tier.SSD: CacheHitSource.DISK,
              Tier.STORE: CacheHitSource.P2P}
STATS_LOG_INTERVAL_S = 10.0


class XLLMStoreMetadata(KVConnectorMetadata):
    """One step's plan, from the scheduler to every worker."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


def store_settings(vllm_config: VllmConfig) -> KVStoreConfig:
    """``xllm.kv_store`` from ``--additional-config`` (validated like every xllm key)."""
    from xllm_plugin.config import parse_xllm_config

    return parse_xllm_config(vllm_config.additional_config or {}).kv_store


def block_bytes_of(kv_cache_config: KVCacheConfig) -> int:
    """Bytes of one block over every layer (one worker's share)."""
    return sum(g.kv_cache_spec.page_size_bytes * len(g.layer_names)
               for g in kv_cache_config.kv_cache_groups)


def layout_tag(settings: KVStoreConfig, vllm_config: VllmConfig,
               kv_cache_config: KVCacheConfig, rank: int) -> str:
    """Store key prefix: instances share a block only if all of this matches."""
    described = repr((vllm_config.model_config.model, str(vllm_config.model_config.dtype),
                      str(vllm_config.cache_config.cache_dtype),
                      [(g.layer_names, repr(g.kv_cache_spec))
                       for g in kv_cache_config.kv_cache_groups],
                      vllm_config.parallel_config.tensor_parallel_size, rank))
    return f"{settings.namespace}/{hashlib.sha256(described.encode()).hexdigest()[:16]}"


def tier_capacity(settings: KVStoreConfig, kv_cache_config: KVCacheConfig) -> tuple[int, int]:
    """(DRAM slots, SSD blocks): the same numbers on the scheduler and on every worker."""
    per_block = max(1, block_bytes_of(kv_cache_config))
    dram = max(1, (settings.dram_mb << 20) // per_block)
    ssd = (settings.ssd_mb << 20) // per_block
    return dram, ssd


class XLLMStoreConnector(KVConnectorBase_V1):
    """Saves full KV blocks to DRAM / SSD / Mooncake Store and loads prefix hits back."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        if kv_cache_config is None:
            raise ValueError("XLLMStoreConnector needs vLLM's kv_cache_config")
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise ValueError("XLLMStoreConnector supports models with one KV cache group "
                             f"(full attention); this one has {len(groups)}")
        self.settings = store_settings(vllm_config)
        self.block_size = vllm_config.cache_config.block_size
        if not vllm_config.cache_config.enable_prefix_caching:
            raise ValueError("XLLMStoreConnector needs --enable-prefix-caching (blocks are keyed "
                             "by vLLM's prefix-cache hashes)")
        self._kv_cache_config = kv_cache_config
        self.dram_slots, self.ssd_blocks = tier_capacity(self.settings, kv_cache_config)
        self._scheduler: Any = None
        self._worker: Any = None
        self._last_log = time.monotonic()
        if role == KVConnectorRole.SCHEDULER:
            from xllm_plugin.kvstore.backends import MooncakeStoreClient
            from xllm_plugin.kvstore.scheduler_side import StoreScheduler

            s = self.settings
            store = None
            if s.master and s.load:
                store = MooncakeStoreClient(s.master, metadata_server=s.metadata_server,
                                            local_hostname=s.local_hostname, protocol=s.protocol,
                                            device_name=s.device_name, segment_bytes=0)
            self._scheduler = StoreScheduler(
                s, self.block_size, self.dram_slots, self.ssd_blocks,
                layout_tag(s, vllm_config, kv_cache_config, 0), store)
            log.info("xllm kv_store: scheduler side ready (DRAM %d blocks, SSD %d blocks, "
                     "store %s)", self.dram_slots, self.ssd_blocks, s.master or "off")

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a future miss, nothing more

    # ==============================
    # Worker side
    # ==============================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from xllm_plugin.kvstore.backends import MooncakeStoreClient
        from xllm_plugin.kvstore.block_io import KVBlockIO
        from xllm_plugin.kvstore.worker import TierWorker, ssd_root_for

        rank = _tp_rank()
        s = self.settings
        io = KVBlockIO(kv_caches, self._kv_cache_config.num_blocks)
        store = None
        if s.master:
            store = MooncakeStoreClient(s.master, metadata_server=s.metadata_server,
                                        local_hostname=s.local_hostname, protocol=s.protocol,
                                        device_name=s.device_name, segment_bytes=s.segment_mb << 20)
        ssd_root = ssd_root_for(s, rank)
        self._worker = TierWorker(s, io, self.dram_slots, ssd_root, store,
                                  layout_tag(s, self._vllm_config, self._kv_cache_config, rank))
        log.info("xllm kv_store: worker %d ready: %d layers, %d bytes per block, DRAM %d blocks "
                 "(%.0f MiB), SSD %s, store %s", rank, len(io.names), io.block_bytes,
                 self.dram_slots, self.dram_slots * io.block_bytes / 2**20,
                 ssd_root or "off", s.master or "off")

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        # Asynchronous loads are queued with the step's plan in wait_for_save;
        # synchronous ones run now, before the forward pass that reads them.
        if self._worker is None or self.settings.async_load or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, XLLMStoreMetadata)
        self._worker.load_now(meta.plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # whole-request loads: finished before the forward pass that reads them

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return  # whole blocks are gathered once per step, in wait_for_save

    def wait_for_save(self) -> None:
        if self._worker is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, XLLMStoreMetadata)
        self._worker.submit(meta.plan, loads_done=not self.settings.async_load)
        now = time.monotonic()
        if now - self._last_log > STATS_LOG_INTERVAL_S:
            self._last_log = now
            log.info("xllm kv_store worker: %s", self._worker.stats)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        return None, (self._worker.finished_loads() or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.failed_block_ids() if self._worker is not None else set()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None

    # ==============================
    # Scheduler side
    # ==============================

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        tokens = self._scheduler.matched_tokens(request, num_computed_tokens)
        return tokens, tokens > 0 and self.settings.async_load

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        self._scheduler.after_alloc(request, blocks.get_block_ids()[0], num_external_tokens)

    def get_external_cache_hit_sources(self, request: Request,
                                       num_external_tokens: int) -> dict[CacheHitSource, int]:
        if num_external_tokens == 0:
            return {}
        sources = {HIT_SOURCE[t]: n * self.block_size
                   for t, n in self._scheduler.hit_sources(request).items() if n}
        return sources if sum(sources.values()) == num_external_tokens else \
            {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        scheduled: list[tuple[str, int, int]] = []
        counts = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            scheduled.append((new.req_id, new.num_computed_tokens, counts.get(new.req_id, 0)))
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, computed in zip(cached.req_ids, cached.num_computed_tokens):
            scheduled.append((req_id, computed, counts.get(req_id, 0)))
        state = scheduler_output.kv_connector_block_state

        def block_ids_of(req_id: str) -> list[int] | None:
            ids = state.get_block_ids(req_id) if state is not None else None
            return ids[0] if ids else None

        plan = self._scheduler.build_plan(scheduled, block_ids_of)
        now = time.monotonic()
        if now - self._last_log > STATS_LOG_INTERVAL_S:
            self._last_log = now
            log.info("xllm kv_store scheduler: %s", self._scheduler.stats)
        return XLLMStoreMetadata(plan)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._scheduler.on_loads_done(tuple(connector_output.finished_recving or ()),
                                      set(connector_output.invalid_block_ids or ()))

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Saves were gathered on the step that completed each block, so the
        # blocks can be freed now, unless a load into them is still in flight
        # (an aborted request that was waiting for its KV).
        return self._scheduler.finished(request.request_id), None

    def take_events(self) -> Iterable[KVCacheEvent]:
        events: list[KVCacheEvent] = []
        for stored, medium, hashes in self._scheduler.directory.events.take():
            converted = [maybe_convert_block_hash(h) for h in hashes]
            if stored:
                events.append(BlockStored(block_hashes=converted, parent_block_hash=None,
                                          token_ids=[], block_size=self.block_size, lora_id=None,
                                          medium=medium, lora_name=None))
            else:
                events.append(BlockRemoved(block_hashes=converted, medium=medium))
        return events

    def reset_cache(self) -> bool | None:
        self._scheduler.reset()
        return True


def _tp_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # noqa: BLE001 (no parallel state: a single worker)
        return 0
