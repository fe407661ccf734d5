"""Online/offline request classes in the simulator: the engine's rules and the offline backlog.

The simulated instance mirrors ``xllm_plugin.scheduler.XLLMScheduler`` (paper §3.1)
when a run sets :class:`ClassScheduling`:

- online requests wait ahead of offline ones and run ahead of them in every step
  (so the out-of-memory preemption, which takes the last running request, hits
  offline work first);
- waiting online requests that lack a run slot or KV blocks preempt running
  offline requests, newest first, before the step is planned (recompute: the
  victim keeps its generated tokens and re-prefills prompt + generated later);
- optionally (``preempt_offline_prefill``, not in the engine yet) running offline
  prefills are preempted, newest first, when their chunks would leave waiting
  online work no room in the step's budget;
- with ``slo_budget`` on, while an online request is decoding, the step's token
  budget is ``decodes + clamp(P, min_prefill_tokens, budget - decodes)`` with
  ``P`` the most prefill tokens for which the step model predicts a step within
  ``headroom * TPOT SLO`` (``slo_step_budget``); offline work gets what online
  work leaves of it. The engine learns its step model online; the simulator
  uses the deployment's step model directly (a perfectly learned model).

``slo_budget=False`` is the *online-priority* engine: the same class order and
preemption, but offline prefill chunks fill the whole configured budget.
Without ``ClassScheduling`` an instance treats offline requests like online
ones (stock vLLM FCFS), which keeps every existing run unchanged.

:class:`OfflineBacklog` is the offline stream: a batch job that always has more
requests waiting. The cluster keeps ``concurrency`` of them routed at any
time and routes the next one as soon as one finishes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ClassScheduling:
    """The engine's online/offline settings (``xllm`` additional-config ``slo`` section)."""

    slo_budget: bool = True
    """Cap each step so the predicted step time stays within the online TPOT SLO."""
    tpot_slo_ms: float | None = None
    """TPOT SLO of online requests without their own; None: the run's default SLO."""
    headroom: float = 0.9
    """Fraction of the SLO a predicted step may use (engine default)."""
    min_prefill_tokens: int = 32
    """Prefill tokens a step may always take, so prefill never starves (engine default)."""
    preempt_offline_prefill: bool = False
    """Also preempt running offline prefills whose chunks would leave waiting online work
    no step budget. XLLMScheduler does not do this yet (vLLM serves running requests'
    chunks before waiting ones), so it is off by default and runs mirror the engine."""


@dataclass(frozen=True)
class OfflineBacklog:
    """An always-waiting offline batch job: ``concurrency`` requests routed at any time."""

    lengths: Sequence[tuple[int, int]]
    """(prompt, output) pairs to draw from, in a seeded random order."""
    concurrency: int
    """Offline requests kept routed (in flight) across the cluster."""
    seed: int = 0
    measure_from_s: float = 0.0
    """Offline throughput counts tokens generated from this simulated time on (skips the
    start-up burst when the whole backlog is routed at once at time 0)."""


def slo_step_budget(step_s: Callable[[int, float, int, int], float], *, decodes: int,
                    decode_ctx: int, slo_ms: float, headroom: float, min_prefill: int,
                    max_budget: int) -> int:
    """The step's token budget under an online TPOT SLO (``xllm_plugin.scheduler.budget``).

    ``P`` is found by bisection on the step model (monotone in prefill tokens); a
    prefill chunk of ``P`` fresh tokens is costed with ``P * P / 2`` attention pairs.
    """
    limit = headroom * slo_ms * 1e-3
    room = max(max_budget - decodes, 0)
    lo, hi = 0, room
    if step_s(hi, hi * hi * 0.5, decodes, decode_ctx) <= limit:
        lo = hi
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if step_s(mid, mid * mid * 0.5, decodes, decode_ctx) <= limit:
                lo = mid
            else:
                hi = mid
    prefill = min(max(lo, min_prefill), room)
    return min(decodes + prefill, max_budget)
