"""The SLO-aware work of a step (paper §3.1, latency-constrained batching).

The step time limit is ``headroom * slo`` with ``slo`` the tightest TPOT SLO among
decoding online requests, or more where they have slack to spend (``banked_step_limit``:
a TPOT SLO bounds a request's mean time per output token, so one that ran ahead of it
may take a longer step). While no online request decodes but offline work is
present, it is ``headroom * ttft / 2`` when a TTFT SLO is set: one long offline
prefill step (seconds on a CPU) would otherwise make every online request arriving
during it miss its TTFT, and an arrival waits for at most the running step and its
own first one. Otherwise there is no limit and the step gets the configured token
budget. Under a limit, work joins the step in this order, each part only while the
predicted step time stays within it:

1. every online decode;
2. online prefill, at least ``min(min_prefill, online prefill pending)`` tokens
   even when nothing fits (a new online request would otherwise wait until every
   online decode finished);
3. offline decodes, first fit in running order (each costs a decode token plus
   attention over its context, so long-context ones may sit out while short ones join);
4. running offline prefill chunks, first fit in running order: a chunk deep into a
   long prompt attends over everything before it, so it may not fit where a fresh
   prompt's first chunk does;
5. new offline prefill, with the prefill tokens the SLO leaves.

The floor of step 2 never applies to offline prefill: on a host whose fixed step
cost fills most of the SLO, a floor spent on offline chunks put every step over it.

vLLM spends a step's token budget in ``self.running`` order and then on waiting
requests; the scheduler keeps online requests first in both. What that order cannot
express is returned for the scheduler to enforce: which offline decodes and which
running offline prefill chunks sit this step out. All running offline chunks do while
an online request waits for admission: vLLM serves running chunks before waiting
requests, so they would take its tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from xllm_plugin.scheduler.step_model import StepLatencyModel, StepWork


@dataclass(frozen=True)
class OnlineDecode:
    """What the step limit needs of one decoding online request."""

    slo_ms: float
    tokens: int
    """Output tokens so far (at least the first)."""
    elapsed_ms: float
    """Time since its first token."""


def banked_step_limit(decodes: Sequence[OnlineDecode], headroom: float,
                      cap_ms: float) -> float | None:
    """The longest step that keeps every decoding online request within its TPOT SLO.

    TPOT is a request's mean time between output tokens, (e2e - TTFT) / (tokens - 1),
    the figure clients and vLLM report. After this step a request with ``n`` tokens so
    far has ``n`` gaps behind it, so its mean stays within ``headroom * slo`` while the
    step takes at most ``headroom * slo * n - elapsed``: the time it is ahead of its SLO
    plus one token's worth. It lends nothing against tokens not yet generated, so the mean
    holds whenever the request ends.

    The limit is the running balance of each request, so the steps that ran longer than
    predicted are paid back: a request behind its SLO gets a limit under one token's worth
    (down to 0, a step of online decodes and the online prefill floor only) until it has
    caught up. With a floor of ``headroom * slo`` instead, one EPYC A/B phase (8 offline
    jobs) had 15 of 25 online requests over their TPOT SLO while the step model
    under-predicted a tenth of the sized steps by 17% or more; our reading: once its slack
    was spent, a request had no way back under that floor.
    ``cap_ms`` bounds the result (never below ``headroom * slo``): slack of running
    requests is no reason to keep a new arrival waiting longer than its TTFT allows.
    None when nothing decodes.
    """
    if not decodes:
        return None
    balance = min(headroom * d.slo_ms * d.tokens - d.elapsed_ms for d in decodes)
    cap = max(cap_ms, min(headroom * d.slo_ms for d in decodes))
    return max(0.0, min(balance, cap))


@dataclass(frozen=True)
class BudgetDecision:
    tokens: int
    constrained: bool
    slo_ms: float | None = None
    """The SLO the step was sized for (TPOT, or TTFT when no online request decodes)."""
    planned_ms: float | None = None
    """The model's time for the most work the budget allows; a step with less work to
    schedule (no prefill waiting) runs shorter by design."""
    limit_ms: float | None = None
    """The step time the budget aimed to stay within."""
    held_offline_decodes: tuple[int, ...] = ()
    """Positions (in ``offline_decode_contexts``) of offline decodes that skip this step."""
    held_offline_prefills: tuple[int, ...] = ()
    """Positions (in ``offline_prefills``) of running offline chunks that skip this step."""


def plan_step_budget(model: StepLatencyModel, *, online_decodes: int, online_context_tokens: int,
                     offline_decode_contexts: Sequence[int],
                     offline_prefills: Sequence[tuple[int, int]],
                     tightest_tpot_slo_ms: float | None,
                     ttft_slo_ms: float | None, offline_present: bool, max_budget: int,
                     min_prefill: int, headroom: float, online_prefill_tokens: int,
                     online_waiting: bool, tpot_limit_ms: float | None = None) -> BudgetDecision:
    """``online_context_tokens``: tokens already computed by running online requests;
    ``offline_decode_contexts``: the same per decoding offline request, in running
    order; ``offline_prefills``: (computed, still to prefill) tokens per running offline
    request with an unfinished prompt, in running order; ``offline_present``: any
    offline request is running or waiting;
    ``online_prefill_tokens``: prompt tokens online requests still need (running and
    waiting); ``online_waiting``: some of them belong to a request not admitted yet;
    ``tpot_limit_ms``: the step limit from the online decodes' slack (``banked_step_limit``)
    in place of ``headroom * tightest_tpot_slo_ms``."""
    if online_decodes and tightest_tpot_slo_ms is not None:
        slo = tightest_tpot_slo_ms
        limit = headroom * slo if tpot_limit_ms is None else tpot_limit_ms
    elif not online_decodes and offline_present and ttft_slo_ms is not None:
        slo, limit = ttft_slo_ms, headroom * ttft_slo_ms / 2
    else:
        return BudgetDecision(max_budget, constrained=False)
    fits = model.max_prefill_tokens(online_decodes, online_context_tokens, limit)
    online_prefill = min(online_prefill_tokens, max(fits, min_prefill),
                         max(max_budget - online_decodes, 0))
    decodes, context, held = online_decodes, online_context_tokens, []
    for position, offline_context in enumerate(offline_decode_contexts):
        joined = StepWork(online_prefill, decodes + 1, context + offline_context)
        if decodes + 1 + online_prefill <= max_budget and model.predict_ms(joined) <= limit:
            decodes, context = decodes + 1, context + offline_context
        else:
            held.append(position)
    room = max(max_budget - decodes, 0)
    prefill, held_chunks = online_prefill, []
    if online_waiting or online_prefill_tokens > online_prefill:
        held_chunks = list(range(len(offline_prefills)))  # online prefill claims the tokens
    else:
        for position, (computed, remaining) in enumerate(offline_prefills):
            fits = min(model.max_prefill_tokens(decodes, context + computed, limit), room)
            take = min(remaining, fits - prefill)
            if take > 0:
                prefill, context = prefill + take, context + computed
            else:
                held_chunks.append(position)
    prefill = max(prefill, min(model.max_prefill_tokens(decodes, context, limit), room))
    return BudgetDecision(decodes + prefill, constrained=True, slo_ms=slo, limit_ms=limit,
                          planned_ms=model.predict_ms(StepWork(prefill, decodes, context)),
                          held_offline_decodes=tuple(held),
                          held_offline_prefills=tuple(held_chunks))
