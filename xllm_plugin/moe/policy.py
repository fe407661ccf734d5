"""When to rebalance experts: drift of the load distribution, and a gain worth the copy.

Per MoE layer, with ``p`` the layer's current load distribution (the sliding
window, normalised), ``q`` the distribution the current placement was made
for (uniform for vLLM's initial placement), and ``I(x)`` the max/mean rank
load of placement ``x`` under the current load:

- ``drift = 0.5 * sum_e |p_e - q_e|`` (total variation, 0..1);
- ``candidate = place(load, old)`` (see ``placement.py``);
- rebalance the layer iff ``drift >= drift_threshold`` and
  ``(I(old) - I(candidate)) / I(old) >= min_improvement``; the layer's ``q``
  becomes ``p``. Otherwise the layer keeps its placement (no weights move).

The drift test keeps noise in a short window from triggering copies; the gain
test keeps a drift that does not hurt balance from triggering them. Both
thresholds are settings (``xllm.moe``). Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xllm_plugin.moe.placement import imbalance, initial_placement, moved_slots, place


@dataclass(frozen=True)
class RebalanceDecision:
    physical_to_logical: np.ndarray  # [layers, slots]
    reference: np.ndarray  # [layers, experts]: distribution each layer's placement was made for
    rebalanced_layers: list[int]
    drift: list[float]
    imbalance_before: list[float]
    imbalance_after: list[float]
    moved_slots: int

    @property
    def rebalanced(self) -> bool:
        return bool(self.rebalanced_layers)


def distribution(load: np.ndarray) -> np.ndarray:
    load = np.maximum(np.asarray(load, dtype=float), 0.0)
    total = load.sum()
    return load / total if total > 0 else np.full(len(load), 1.0 / len(load))


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return float(0.5 * np.abs(p - q).sum())


def plan_rebalance(load: np.ndarray, old_phy2log: np.ndarray | None, reference: np.ndarray | None,
                   num_ranks: int, drift_threshold: float = 0.1,
                   min_improvement: float = 0.05) -> RebalanceDecision:
    """Decide per layer whether to move experts, and where (``load``: [layers, experts])."""
    load = np.asarray(load, dtype=float)
    layers, experts = load.shape
    if old_phy2log is None:
        raise ValueError("old_phy2log is required: [layers, slots]")
    old = np.asarray(old_phy2log, dtype=np.int64)
    slots = old.shape[1]
    if old.min() < 0 or old.max() >= experts or slots % num_ranks:
        old = np.tile(initial_placement(experts, slots), (layers, 1))  # unusable: start over
    ref = (np.full((layers, experts), 1.0 / experts) if reference is None
           else np.asarray(reference, dtype=float).copy())
    new = old.copy()
    changed, drifts, before, after = [], [], [], []
    for layer in range(layers):
        p = distribution(load[layer])
        drift = total_variation(p, ref[layer])
        current = imbalance(load[layer], old[layer], num_ranks)
        drifts.append(drift)
        before.append(current)
        if load[layer].sum() <= 0 or drift < drift_threshold:
            after.append(current)
            continue
        candidate = place(load[layer], slots, num_ranks, old[layer])
        proposed = imbalance(load[layer], candidate, num_ranks)
        if current <= 0 or (current - proposed) / current < min_improvement:
            after.append(current)
            continue
        new[layer] = candidate
        ref[layer] = p
        changed.append(layer)
        after.append(proposed)
    return RebalanceDecision(new, ref, changed, drifts, before, after, moved_slots(old, new))
