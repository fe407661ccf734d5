"""``XLLMEplbPolicy``: the drift-triggered placement as a vLLM EPLB policy class.

vLLM's EPLB calls ``policy.rebalance_experts(...)`` every
``eplb_config.step_interval`` steps with the load of the last ``window_size``
steps and moves whatever weights the returned map differs in. This policy
returns the old map for every layer whose load has not drifted far enough or
would not balance materially better (see ``policy.py``), so a short
``step_interval`` becomes a cheap check and weights move only when it pays.

vLLM accepts only its own policy names in ``--eplb-config``, so the class is
selected in code: ``collective_rpc("xllm_eplb_use_policy")`` through the
worker extension (``xllm_plugin.moe.worker.MoEStatsExtension``), and
``register_policy()`` adds it to ``EPLB_POLICIES`` under ``"xllm"`` for code
that builds EPLB state itself. The load-group/node hierarchy is not modelled
(flat placement over ranks).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

import vllm  # noqa: F401  (vllm.distributed.eplb imports need vllm initialised first)
import torch
from vllm.distributed.eplb.policy.abstract import AbstractEplbPolicy

from xllm_plugin.config import MoEConfig
from xllm_plugin.moe.placement import initial_placement
from xllm_plugin.moe.policy import RebalanceDecision, plan_rebalance

POLICY_NAME = "xllm"


class XLLMEplbPolicy(AbstractEplbPolicy):
    settings: ClassVar[MoEConfig] = MoEConfig()
    # Per (layers, experts, slots, ranks): the load distribution each layer's placement
    # was made for. vLLM calls a classmethod, so memory lives on the class.
    _references: ClassVar[dict[tuple[int, int, int, int], np.ndarray]] = {}
    last_decision: ClassVar[RebalanceDecision | None] = None
    calls: ClassVar[int] = 0
    rebalances: ClassVar[int] = 0

    @classmethod
    def configure(cls, settings: MoEConfig) -> None:
        cls.settings = settings

    @classmethod
    def reset(cls) -> None:
        cls._references = {}
        cls.last_decision = None
        cls.calls = cls.rebalances = 0

    @classmethod
    def rebalance_experts(cls, weight: torch.Tensor, num_replicas: int, num_groups: int,
                          num_nodes: int, num_ranks: int,
                          old_global_expert_indices: torch.Tensor | None = None) -> torch.Tensor:
        load = weight.float().cpu().numpy()
        layers, experts = load.shape
        if old_global_expert_indices is None:
            old = np.tile(initial_placement(experts, num_replicas), (layers, 1))
        else:
            old = old_global_expert_indices.cpu().numpy().astype(np.int64)
        key = (layers, experts, num_replicas, num_ranks)
        decision = plan_rebalance(load, old, cls._references.get(key), num_ranks,
                                  cls.settings.drift_threshold, cls.settings.min_improvement)
        cls._references[key] = decision.reference
        cls.last_decision = decision
        cls.calls += 1
        cls.rebalances += decision.rebalanced
        return torch.from_numpy(decision.physical_to_logical)

    @classmethod
    def status(cls) -> dict[str, Any]:
        decision = cls.last_decision
        return {"calls": cls.calls, "rebalances": cls.rebalances,
                "last_rebalanced_layers": decision.rebalanced_layers if decision else [],
                "last_max_drift": max(decision.drift) if decision else None}


def register_policy() -> None:
    """Add the policy to vLLM's registry under ``"xllm"`` (vLLM's config still rejects the name)."""
    from vllm.distributed.eplb.policy import EPLB_POLICIES

    EPLB_POLICIES.setdefault(POLICY_NAME, XLLMEplbPolicy)
