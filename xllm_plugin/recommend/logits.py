"""Valid-item filtering inside vLLM: a v1 logits processor for catalog-constrained decoding.

Load it with ``vllm serve ... --logits-processors xllm_plugin.recommend.logits:CatalogMaskProcessor``.
A request opts in through ``vllm_xargs`` (``SamplingParams.extra_args``):

- ``xllm_catalog``: a catalog name from ``xllm.recommend.catalogs`` (or a file under
  ``catalog_dir``);
- ``xllm_prefix`` (optional): item tokens already chosen before this request's
  output, as the beam-search driver passes them; the item prefix is this plus
  the request's own output tokens;
- ``xllm_sink`` (optional, bool): keep the masked-out probability mass on one
  invalid "sink" token. With ``--logprobs-mode processed_logprobs`` the returned
  log-probs of valid tokens then equal the model's unmasked log-probs exactly
  (the softmax normaliser is unchanged), which is what beam scores need; the
  driver drops the sink token because it is not a valid continuation.

Every other token's logit becomes ``-inf``. Once a whole item has been produced
only EOS remains allowed, so plain ``/v1/completions`` requests stop after one
valid item. Requests without ``xllm_catalog`` are untouched.

The catalog lookups (one binary search per token, cached per prefix) happen in
``update_state``, which vLLM calls before the forward pass; ``apply``, on the
sampler's critical path, only scatters the prepared indices.
"""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from xllm_plugin.config import RecommendConfig, XLLMConfigError, additional_config_from_argv
from xllm_plugin.recommend.catalog import Catalog, CatalogError
from xllm_plugin.recommend.registry import recommend_config, resolve_catalog

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger(__name__)

CATALOG_ARG = "xllm_catalog"
PREFIX_ARG = "xllm_prefix"
SINK_ARG = "xllm_sink"
MASK_CACHE_ENTRIES = 1 << 16


@lru_cache(maxsize=1)
def _api_server_config() -> RecommendConfig:
    """The recommend config of this process's ``vllm serve`` command line.

    ``validate_params`` is a classmethod that vLLM calls in the API-server
    process, where no processor instance (and so no VllmConfig) exists.
    """
    try:
        return recommend_config(additional_config_from_argv(sys.argv[1:]))
    except XLLMConfigError:
        return RecommendConfig()


def _check_args(args: dict[str, Any]) -> None:
    prefix = args.get(PREFIX_ARG, [])
    if not isinstance(prefix, list) or not all(isinstance(t, int) and t >= 0 for t in prefix):
        raise ValueError(f"vllm_xargs.{PREFIX_ARG} must be a list of token ids")
    if not isinstance(args.get(SINK_ARG, False), bool):
        raise ValueError(f"vllm_xargs.{SINK_ARG} must be true or false")


@dataclass
class _Row:
    catalog: Catalog
    prefix: tuple[int, ...]
    output: list[int]  # vLLM's live list of this request's output tokens
    sink: bool


@dataclass
class _Plan:
    """Index tensors for one step, prepared before the forward pass."""

    rows: torch.Tensor  # batch rows that are masked
    flat_rows: torch.Tensor  # local row of every allowed (row, token) pair
    flat_cols: torch.Tensor  # token of every allowed pair
    sink_rows: torch.Tensor  # local rows that keep a sink
    sink_cols: torch.Tensor


class CatalogMaskProcessor(LogitsProcessor):
    """Masks each opted-in request's logits to the catalog continuations of its item prefix."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        args = sampling_params.extra_args or {}
        if CATALOG_ARG not in args:
            return
        _check_args(args)
        try:
            resolve_catalog(args[CATALOG_ARG], _api_server_config())
        except CatalogError as error:
            raise ValueError(str(error)) from None

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self._config = recommend_config(vllm_config.additional_config)
        self._device = device
        self._vocab = vllm_config.model_config.get_vocab_size()
        eos = getattr(vllm_config.model_config.hf_text_config, "eos_token_id", None)
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self._eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long)
        self._rows: dict[int, _Row] = {}
        self._masks: OrderedDict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, int]] = OrderedDict()
        self._plan: _Plan | None = None

    def is_argmax_invariant(self) -> bool:
        return False

    def _new_row(self, params: SamplingParams, _prompt: list[int] | None,
                 output: list[int]) -> _Row | None:
        args = params.extra_args or {}
        ref = args.get(CATALOG_ARG)
        if ref is None:
            return None
        try:
            catalog = resolve_catalog(ref, self._config)
        except CatalogError as error:
            # validate_params rejected this already in the API server; never crash the engine.
            logger.warning("xllm-plugin: %s; request left unconstrained", error)
            return None
        return _Row(catalog, tuple(args.get(PREFIX_ARG, ())), output, bool(args.get(SINK_ARG)))

    def _mask(self, catalog: Catalog, prefix: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        """Allowed tokens (int64 tensor) and a sink token outside them, cached per prefix."""
        key = (id(catalog), prefix)
        cached = self._masks.get(key)
        if cached is not None:
            self._masks.move_to_end(key)
            return cached
        if len(prefix) >= catalog.item_len:
            allowed = self._eos
        else:
            allowed = torch.from_numpy(catalog.children(prefix).astype("int64"))
        allowed = allowed[allowed < self._vocab]
        sink = 0
        for token in allowed.tolist():  # smallest token id that is not allowed
            if token != sink:
                break
            sink += 1
        cached = (allowed, sink)
        self._masks[key] = cached
        if len(self._masks) > MASK_CACHE_ENTRIES:
            self._masks.popitem(last=False)
        return cached

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._rows, batch_update, self._new_row)
        if not self._rows:
            self._plan = None
            return
        rows, flat_rows, flat_cols, sink_rows, sink_cols = [], [], [], [], []
        for local, (index, row) in enumerate(sorted(self._rows.items())):
            allowed, sink = self._mask(row.catalog, row.prefix + tuple(row.output))
            rows.append(index)
            flat_rows.append(torch.full((len(allowed),), local, dtype=torch.long))
            flat_cols.append(allowed)
            if row.sink and sink < self._vocab:
                sink_rows.append(local)
                sink_cols.append(sink)
        device = self._device
        self._plan = _Plan(
            rows=torch.tensor(rows, dtype=torch.long, device=device),
            flat_rows=torch.cat(flat_rows).to(device, non_blocking=True),
            flat_cols=torch.cat(flat_cols).to(device, non_blocking=True),
            sink_rows=torch.tensor(sink_rows, dtype=torch.long, device=device),
            sink_cols=torch.tensor(sink_cols, dtype=torch.long, device=device))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        plan = self._plan
        if plan is None:
            return logits
        sub = logits.index_select(0, plan.rows)
        masked = torch.full_like(sub, float("-inf"))
        masked[plan.flat_rows, plan.flat_cols] = sub[plan.flat_rows, plan.flat_cols]
        if plan.sink_rows.numel():
            # Put the masked-out mass on the sink so that log_softmax keeps the
            # unmasked normaliser: logsumexp(masked row) == logsumexp(original row).
            full = torch.logsumexp(sub.index_select(0, plan.sink_rows), dim=-1)
            kept = torch.logsumexp(masked.index_select(0, plan.sink_rows), dim=-1)
            gap = (kept - full).clamp(max=0.0)
            masked[plan.sink_rows, plan.sink_cols] = full + torch.log(-torch.expm1(gap))
        logits.index_copy_(0, plan.rows, masked)
        return logits
