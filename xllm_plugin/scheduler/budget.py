"""The SLO-aware token budget of a step (paper §3.1, latency-constrained batching).

Rule, per step:

- no online request is decoding -> no latency constraint: the configured budget;
- otherwise, with ``slo`` the tightest TPOT SLO among decoding online requests,
  ``budget = decodes + clamp(P, min_prefill, max_budget - decodes)`` where ``P`` is
  the most prefill tokens for which the predicted step time stays within
  ``headroom * slo``.

vLLM spends a step's budget in ``self.running`` order and then on waiting
requests; the scheduler keeps online requests first in both, so the budget goes
to online decodes, then online prefill chunks, then offline work.
``min_prefill`` keeps prefill moving even when the SLO cannot be met.
"""

from __future__ import annotations

from dataclasses import dataclass

from xllm_plugin.scheduler.step_model import StepLatencyModel, StepWork


@dataclass(frozen=True)
class BudgetDecision:
    tokens: int
    constrained: bool
    slo_ms: float | None = None
    predicted_ms: float | None = None


def plan_step_budget(model: StepLatencyModel, *, online_decodes: int, offline_decodes: int,
                     context_tokens: int, tightest_tpot_slo_ms: float | None, max_budget: int,
                     min_prefill: int, headroom: float) -> BudgetDecision:
    decodes = online_decodes + offline_decodes
    if online_decodes == 0 or tightest_tpot_slo_ms is None:
        return BudgetDecision(max_budget, constrained=False)
    allowed = model.max_prefill_tokens(decodes, context_tokens, headroom * tightest_tpot_slo_ms)
    prefill = min(max(allowed, min_prefill), max(max_budget - decodes, 0))
    tokens = min(decodes + prefill, max_budget)
    predicted = model.predict_ms(StepWork(prefill, decodes, context_tokens))
    return BudgetDecision(tokens, constrained=True, slo_ms=tightest_tpot_slo_ms,
                          predicted_ms=predicted)
