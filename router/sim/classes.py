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
- with ``slo_budget`` on, while an online request is decoding, work joins each
  step in XLLMScheduler's order while the step model predicts a step within
  ``headroom * TPOT SLO`` (``plan_class_step``): online decodes; online prefill,
  at least ``min(min_prefill_tokens, online prefill pending)`` tokens; offline
  decodes, first fit in running order; running offline prefill chunks, first fit
  (a chunk deep into a long prompt costs attention over all of it); new offline
  prefill with what is left. Running offline chunks all sit a step out while
  online prefill waits for admission or needs the step's whole prefill allowance.
  While no online request decodes, steps with offline work present are sized the
  same way for ``TTFT SLO / 2``. With ``spend_tpot_slack`` (off by default, as in the engine), a
  step may run longer while every online decode is ahead of its mean-TPOT SLO
  (``xllm_plugin.scheduler.budget.banked_step_limit``, capped by the TTFT bound). The engine learns its step model online; the
  simulator uses the deployment's step model directly (a perfectly learned model).

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
    ttft_slo_ms: float | None = None
    """TTFT SLO bounding offline steps while no online request decodes (engine
    ``slo.ttft_ms``: ``headroom * ttft / 2``); None: the run's default SLO."""
    headroom: float = 0.9
    """Fraction of the SLO a predicted step may use (engine default)."""
    spend_tpot_slack: bool = False
    """Steps may spend the time online decodes are ahead of their mean-TPOT SLO (engine
    ``slo.spend_tpot_slack``, default off); False: every step within headroom * TPOT."""
    min_prefill_tokens: int = 32
    """Prefill tokens a step may always give online prefill, so it never starves (engine
    default); offline prefill gets only what the SLO leaves."""
    preempt_offline_prefill: bool = False
    """Also preempt running offline prefills whose chunks would leave waiting online work
    no step budget. XLLMScheduler does not: under the SLO budget it holds them for the
    step instead (they keep their KV); so this is off by default and runs mirror the engine."""


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


@dataclass(frozen=True)
class StepPlan:
    """A step's budget under an online SLO (``xllm_plugin.scheduler.budget``)."""

    tokens: int
    held_offline_decodes: tuple[int, ...] = ()
    """Positions (in the offline decode list given) of offline decodes that sit out."""
    held_offline_prefills: tuple[int, ...] = ()
    """Positions (in the offline prefill list given) of running chunks that sit out."""


def plan_class_step(step_s: Callable[[int, float, int, int], float], *, online_decodes: int,
                    online_ctx: int, offline_decode_ctx: Sequence[int],
                    offline_prefills: Sequence[tuple[int, int]], slo_ms: float,
                    headroom: float, min_prefill: int, max_budget: int,
                    online_prefill_tokens: int, online_waiting: bool,
                    limit_ms: float | None = None) -> StepPlan:
    """XLLMScheduler's step plan on the simulator's step model (seconds).

    ``offline_prefills``: (computed, still to prefill) per running offline request with
    an unfinished prompt. A chunk of ``n`` tokens after ``c`` computed ones costs
    ``n * (c + n / 2)`` attention pairs (fresh prefill: ``n * n / 2``). ``limit_ms``:
    the step limit from the online decodes' slack, in place of ``headroom * slo_ms``."""
    limit = (headroom * slo_ms if limit_ms is None else limit_ms) * 1e-3
    room = max(max_budget - online_decodes, 0)
    fits = _max_extra(step_s, 0, 0.0, online_decodes, online_ctx, limit, room, 0)
    online_prefill = min(online_prefill_tokens, max(fits, min_prefill), room)
    used, pairs = online_prefill, online_prefill * online_prefill * 0.5
    decodes, ctx = online_decodes, online_ctx
    everyone = decodes + len(offline_decode_ctx)
    held: list[int] = []
    if (everyone + used <= max_budget
            and step_s(used, pairs, everyone, ctx + sum(offline_decode_ctx)) <= limit):
        decodes, ctx = everyone, ctx + sum(offline_decode_ctx)  # the common case: all fit
    else:
        for position, offline_ctx in enumerate(offline_decode_ctx):
            if decodes + 1 + used <= max_budget and step_s(used, pairs, decodes + 1,
                                                            ctx + offline_ctx) <= limit:
                decodes, ctx = decodes + 1, ctx + offline_ctx
            else:
                held.append(position)
    room = max(max_budget - decodes, 0)
    held_chunks: list[int] = []
    if online_waiting or online_prefill_tokens > online_prefill:
        held_chunks = list(range(len(offline_prefills)))  # online prefill claims the tokens
    else:
        whole = sum(r for _, r in offline_prefills)
        whole_pairs = sum(r * (c + r * 0.5) for c, r in offline_prefills)
        if used + whole <= room and step_s(used + whole, pairs + whole_pairs, decodes,
                                           ctx) <= limit:
            used, pairs = used + whole, pairs + whole_pairs  # the common case: all fit
        else:
            for position, (computed, remaining) in enumerate(offline_prefills):
                take = _max_extra(step_s, used, pairs, decodes, ctx, limit,
                                  min(remaining, room - used), computed)
                if take > 0:
                    used, pairs = used + take, pairs + take * (computed + take * 0.5)
                else:
                    held_chunks.append(position)
    used += _max_extra(step_s, used, pairs, decodes, ctx, limit, room - used, 0)
    return StepPlan(decodes + used, tuple(held), tuple(held_chunks))


def _max_extra(step_s: Callable[[int, float, int, int], float], tokens: int, pairs: float,
               decodes: int, ctx: int, limit: float, cap: int, computed: int) -> int:
    """Most prefill tokens ``n <= cap`` a step can add, as one chunk after ``computed``
    tokens, to ``tokens`` prefill tokens with ``pairs`` attention pairs and stay within
    ``limit``; bisection, as the step model is monotone in both."""
    def fits(n: int) -> bool:
        return step_s(tokens + n, pairs + n * (computed + n * 0.5), decodes, ctx) <= limit

    if cap <= 0 or not fits(1):
        return 0
    if fits(cap):
        return cap
    lo, hi = 1, cap
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
