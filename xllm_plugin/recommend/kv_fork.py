"""Fork a beam's KV inside the engine: a vLLM v1 KV connector that copies blocks.

When beam search keeps a beam's child that shares all but its last token with a
live parent beam, the child's KV is the parent's KV. vLLM's prefix cache shares
only *full* blocks, so without help every child recomputes the parent's partial
last block (the prompt's tail, up to ``block_size - 1`` tokens, plus the item
tokens so far) - for 128 beams that is most of a step's work. This connector
makes the partial block a cache hit: it reports the parent's tokens as
externally available and copies the parent's blocks into the child's freshly
allocated ones before the forward pass (a copy of a few hundred KB per layer set
instead of a prefill).

Enable it with::

    vllm serve ... --kv-transfer-config \\
      '{"kv_connector": "BeamForkConnector", "kv_role": "kv_both",
        "kv_connector_module_path": "xllm_plugin.recommend.kv_fork"}'

A request takes part through ``SamplingParams.extra_args``: ``xllm_beam`` names it
(unique while it lives) and ``xllm_fork_from`` names the live beam whose KV it
may copy. The copy happens only while the parent still holds at least the
shared tokens, and those tokens match; otherwise the child falls back to the
ordinary prefix cache plus recomputation, so a fork is never wrong, only slower.
Requests without these keys are untouched. To combine it with another
connector (P/D transfer), use vLLM's ``MultiConnector``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger
from vllm.v1.core.kv_cache_utils import KVCacheBlockCopy
from vllm.v1.worker.utils import copy_kv_cache_blocks_inplace

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger(__name__)

BEAM_ARG = "xllm_beam"
FORK_FROM_ARG = "xllm_fork_from"


@dataclass
class BeamForkMetadata(KVConnectorMetadata):
    """Block copies (source, destination) the worker runs before this step's forward."""

    copies: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class _PendingFork:
    parent: Request
    fork_tokens: int  # tokens [0, fork_tokens) come from the parent


def _beam_args(request: Request) -> tuple[str | None, str | None]:
    params = request.sampling_params
    args = (params.extra_args if params is not None else None) or {}
    return args.get(BEAM_ARG), args.get(FORK_FROM_ARG)


class BeamForkConnector(KVConnectorBase_V1):
    """Copies a live parent beam's KV blocks into a forked child beam."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._block_size = vllm_config.cache_config.block_size
        self._num_blocks = kv_cache_config.num_blocks
        # One full-attention KV group (dense decoder models); hybrid models fall back.
        self._enabled = len(kv_cache_config.kv_cache_groups) == 1
        if not self._enabled and role == KVConnectorRole.SCHEDULER:
            logger.warning("BeamForkConnector: %d KV cache groups; beam forks disabled",
                           len(kv_cache_config.kv_cache_groups))
        # Scheduler side.
        self._beams: dict[str, Request] = {}
        self._keys: dict[str, str] = {}  # request id -> beam key (params change per chunk)
        self._pending: dict[str, _PendingFork] = {}
        self._copies: list[tuple[int, int]] = []
        self.forks = 0
        self.forked_tokens = 0
        self.fallbacks = 0
        # Worker side.
        self._caches: list[torch.Tensor] = []

    # ---- scheduler side -------------------------------------------------

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        self._kv_cache_manager = kv_cache_manager

    def on_new_request(self, request: Request) -> None:
        beam, _ = _beam_args(request)
        if beam is not None:
            self._beams[beam] = request
            self._keys[request.request_id] = beam

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        beam, parent_key = _beam_args(request)
        if parent_key is None or request.num_computed_tokens or not self._enabled:
            return 0, False
        fork_tokens = request.num_tokens - 1  # the last token is computed to get logits
        parent = self._beams.get(parent_key)
        if (parent is None or parent.is_finished() or fork_tokens <= num_computed_tokens
                or parent.num_computed_tokens < fork_tokens
                or parent.all_token_ids[num_computed_tokens:fork_tokens]
                != request.all_token_ids[num_computed_tokens:fork_tokens]):
            self.fallbacks += parent_key is not None and fork_tokens > num_computed_tokens
            return 0, False
        self._pending[request.request_id] = _PendingFork(parent, fork_tokens)
        return fork_tokens - num_computed_tokens, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        pending = self._pending.pop(request.request_id, None)
        if pending is None or num_external_tokens == 0:
            return
        child_ids = blocks.get_block_ids()[0]
        parent_ids = self._kv_cache_manager.get_block_ids(pending.parent.request_id)[0]
        first = (pending.fork_tokens - num_external_tokens) // self._block_size
        last = -(-pending.fork_tokens // self._block_size)  # blocks holding fork tokens
        for index in range(first, last):
            if parent_ids[index] != child_ids[index]:
                self._copies.append((parent_ids[index], child_ids[index]))
        self.forks += 1
        self.forked_tokens += num_external_tokens

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = BeamForkMetadata(self._copies)
        self._copies = []
        self._pending.clear()
        return meta

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        beam = self._keys.pop(request.request_id, None)
        if beam is not None and self._beams.get(beam) is request:
            del self._beams[beam]
        return False, None

    # ---- worker side ----------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._caches = list(kv_caches.values())

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if isinstance(meta, BeamForkMetadata) and meta.copies:
            copy_kv_cache_blocks_inplace(
                self._caches, self._num_blocks,
                [KVCacheBlockCopy(src, dst) for src, dst in meta.copies])

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None
