"""KV-cache-aware routing: send a request where its prompt prefix is already cached,
unless that would pile work onto one instance.

Inputs per healthy serving instance i (roles ``both``/``decode``): ``load_i``
(``InstanceState.load``: running + waiting, or the driver's in-flight count if
higher) and ``h_i``, the number of the request's leading KV blocks i holds
(``ClusterView.prefix_hits``, from the KV event index; raised to what this
policy itself sent to i within the last ``predict_ttl_s``, see below). With
``n`` = the request's full blocks (``len(RequestInfo.block_hashes)``):

1. Imbalance guard (two numbers, SGLang style): if
   ``max load - min load > balance_abs_threshold`` and
   ``max load > balance_rel_threshold * min load``,
   choose ``argmin (load_i, inflight_prompt_tokens_i, id)`` (least load),
   reason ``kv_aware_balance``.
2. Otherwise choose ``argmax score_i`` with

       score_i = h_i / n  -  load_weight * load_i / max(1, max_j load_j)

   (``h_i / n`` is 0 when ``n == 0``), ties broken by lower load, then fewer
   in-flight prompt tokens, then id. Reason ``kv_aware_hit`` when the chosen
   instance has ``h_i > 0``, else ``kv_aware_load`` (``kv_aware_tier_hit`` when
   the hit needs a tier below the chosen instance's KV cache, see Tiers).

So a full-prefix hit outweighs any load difference the guard allows when
``load_weight < 1``; with no hits anywhere the rule is least load.

Tiers: when engines publish cache tiers below their KV cache
(``ClusterView.tier_hits``, from the plugin's KV store connector), ``h_i`` is
replaced by the tier-weighted hit

    h_i = hbm_i + dram_hit_weight * dram_i + ssd_hit_weight * ssd_i
              + store_hit_weight * store_i

where each count is the request's leading blocks instance i gets from that
tier (its KV cache, its DRAM or SSD tier, or the global store). A weight is
the share of a block's prefill time a load from that tier saves,
``1 - t_load(tier) / t_prefill(block)``: the estimated latency of a hit. So an
instance that must pull a prefix from the store scores below the one holding
it in its KV cache, but above one that must recompute it, and the load term
decides between them. Without tier data the rule above is unchanged.

Prediction: KV events for a prompt arrive only after the engine prefilled it
(seconds on CPU). A burst of requests sharing a new prefix would otherwise see
no hits and be spread over every instance, each one computing the prefix. So
on every decision the policy records the request's block hashes as held by
the chosen instance, and for ``predict_ttl_s`` (measured on ``ClusterView.now``,
which the driver must advance) counts them as hits there. At most
``predict_max_blocks`` hashes are remembered (oldest dropped first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from router.policies.types import (
    ClusterView,
    InstanceState,
    NoInstanceAvailable,
    RequestInfo,
    RoutingDecision,
    TierHits,
)


@dataclass(frozen=True)
class KVAwareSettings:
    """Every threshold of the rule in one place (see the module docstring)."""

    load_weight: float = 0.5
    """Weight of the normalised load term against the hit fraction (0..1 each).
    Below 1 a complete prefix hit beats any load gap the guard tolerates."""

    balance_abs_threshold: int = 4
    """Guard: fall back to least load when max load - min load exceeds this (requests)..."""

    balance_rel_threshold: float = 1.5
    """...and max load exceeds this multiple of min load."""

    predict_ttl_s: float = 10.0
    """How long a routed request's blocks count as cached on its instance before
    the engine's own KV events confirm them; 0 disables prediction."""

    predict_max_blocks: int = 200_000
    """Bound on remembered predicted block hashes."""

    dram_hit_weight: float = 0.9
    """Value of a block loaded from the instance's DRAM tier, relative to one in its KV
    cache (1 - load time / prefill time of a block; host-to-device copy)."""

    ssd_hit_weight: float = 0.75
    """Value of a block loaded from the instance's SSD tier (a file read first)."""

    store_hit_weight: float = 0.6
    """Value of a block loaded from the global store (a network transfer first)."""

    def __post_init__(self) -> None:
        if self.load_weight < 0:
            raise ValueError("load_weight must be >= 0")
        if self.balance_abs_threshold < 0 or self.balance_rel_threshold < 1:
            raise ValueError("balance_abs_threshold must be >= 0 and balance_rel_threshold >= 1")
        if self.predict_ttl_s < 0 or self.predict_max_blocks <= 0:
            raise ValueError("predict_ttl_s must be >= 0 and predict_max_blocks > 0")
        for name in ("dram_hit_weight", "ssd_hit_weight", "store_hit_weight"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be within [0, 1]")


def is_imbalanced(loads: Sequence[int], settings: KVAwareSettings) -> bool:
    """Step 1 of the rule: the guard that overrides cache affinity."""
    hi, lo = max(loads), min(loads)
    return hi - lo > settings.balance_abs_threshold and hi > settings.balance_rel_threshold * lo


def tier_weighted_hits(tiers: TierHits, settings: KVAwareSettings) -> float:
    """``hbm + w_dram * dram + w_ssd * ssd + w_store * store`` (blocks)."""
    return (tiers.hbm + settings.dram_hit_weight * tiers.dram
            + settings.ssd_hit_weight * tiers.ssd + settings.store_hit_weight * tiers.store)


def kv_score(hits: float, blocks: int, load: int, max_load: int, settings: KVAwareSettings) -> float:
    """Step 2 of the rule: ``h/n - load_weight * load / max(1, max load)``."""
    hit_fraction = min(hits, blocks) / blocks if blocks else 0.0
    return hit_fraction - settings.load_weight * load / max(1, max_load)


class _PredictedBlocks:
    """Block hashes this policy recently sent to an instance, with expiry on view time."""

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self._entries: OrderedDict[tuple[str, int], float] = OrderedDict()  # -> expiry

    def record(self, instance_id: str, block_hashes: Sequence[int], expires_at: float) -> None:
        for h in block_hashes:
            key = (instance_id, h)
            self._entries[key] = expires_at
            self._entries.move_to_end(key)
        while len(self._entries) > self.max_blocks:
            self._entries.popitem(last=False)

    def leading_hits(self, instance_id: str, block_hashes: Sequence[int], now: float) -> int:
        n = 0
        for h in block_hashes:
            expiry = self._entries.get((instance_id, h))
            if expiry is None or expiry < now:
                break
            n += 1
        return n

    def __len__(self) -> int:
        return len(self._entries)


class KVAwarePolicy:
    """Prefix-cache affinity traded against load; the rule is in the module docstring."""

    name = "kv_aware"

    def __init__(self, settings: KVAwareSettings | None = None) -> None:
        self.settings = settings or KVAwareSettings()
        self._predicted = _PredictedBlocks(self.settings.predict_max_blocks)

    def hits(self, request: RequestInfo, view: ClusterView,
             candidates: Sequence[InstanceState]) -> Mapping[str, float]:
        """Leading cached blocks per candidate (tier-weighted where tier data exists),
        raised by predictions (which count as blocks in the instance's KV cache)."""
        blocks = request.block_hashes
        out: dict[str, float] = {}
        for inst in candidates:
            tiers = view.tier_hits.get(inst.instance_id) if view.tier_hits else None
            h: float = (tier_weighted_hits(tiers, self.settings) if tiers is not None
                        else view.prefix_hits.get(inst.instance_id, 0))
            if self.settings.predict_ttl_s > 0 and h < len(blocks):
                h = max(h, self._predicted.leading_hits(inst.instance_id, blocks, view.now))
            out[inst.instance_id] = min(h, len(blocks))
        return out

    def route(self, request: RequestInfo, view: ClusterView) -> RoutingDecision:
        candidates = view.healthy("both", "decode")
        if not candidates:
            raise NoInstanceAvailable("no healthy instance")
        s = self.settings
        loads = [i.load for i in candidates]
        if is_imbalanced(loads, s):
            choice = min(candidates, key=lambda i: (i.load, i.inflight_prompt_tokens, i.instance_id))
            reason = "kv_aware_balance"
        else:
            hits = self.hits(request, view, candidates)
            blocks, max_load = len(request.block_hashes), max(loads)
            choice = min(candidates, key=lambda i: (
                -kv_score(hits[i.instance_id], blocks, i.load, max_load, s),
                i.load, i.inflight_prompt_tokens, i.instance_id))
            reason = "kv_aware_hit" if hits[choice.instance_id] > 0 else "kv_aware_load"
            tiers = view.tier_hits.get(choice.instance_id) if view.tier_hits else None
            if tiers is not None and tiers.hbm < tiers.total and reason == "kv_aware_hit":
                reason = "kv_aware_tier_hit"  # the hit relies on DRAM, SSD or the store
        if s.predict_ttl_s > 0 and request.block_hashes:
            self._predicted.record(choice.instance_id, request.block_hashes, view.now + s.predict_ttl_s)
        return RoutingDecision(choice.instance_id, reason=reason)

