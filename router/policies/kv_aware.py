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
   instance has ``h_i > 0``, else ``kv_aware_load``.

So a full-prefix hit outweighs any load difference the guard allows when
``load_weight < 1``; with no hits anywhere the rule is least load.

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

    def __post_init__(self) -> None:
        if self.load_weight < 0:
            raise ValueError("load_weight must be >= 0")
        if self.balance_abs_threshold < 0 or self.balance_rel_threshold < 1:
            raise ValueError("balance_abs_threshold must be >= 0 and balance_rel_threshold >= 1")
        if self.predict_ttl_s < 0 or self.predict_max_blocks <= 0:
            raise ValueError("predict_ttl_s must be >= 0 and predict_max_blocks > 0")


def is_imbalanced(loads: Sequence[int], settings: KVAwareSettings) -> bool:
    """Step 1 of the rule: the guard that overrides cache affinity."""
    hi, lo = max(loads), min(loads)
    return hi - lo > settings.balance_abs_threshold and hi > settings.balance_rel_threshold * lo


def kv_score(hits: int, blocks: int, load: int, max_load: int, settings: KVAwareSettings) -> float:
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
             candidates: Sequence[InstanceState]) -> Mapping[str, int]:
        """Leading cached blocks per candidate: the index's view, raised by predictions."""
        blocks = request.block_hashes
        out = {}
        for inst in candidates:
            h = view.prefix_hits.get(inst.instance_id, 0)
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
        if s.predict_ttl_s > 0 and request.block_hashes:
            self._predicted.record(choice.instance_id, request.block_hashes, view.now + s.predict_ttl_s)
        return RoutingDecision(choice.instance_id, reason=reason)

