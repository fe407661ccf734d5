"""How many drafts each request verifies this step: the throughput-optimal rule.

A step that decodes ``B`` requests and verifies ``k_r`` drafts of request ``r``
produces ``B + sum_r sum_{i<=k_r} g_r(i)`` tokens in expected value and costs
``T0 + s + b * sum_r k_r`` ms (``T0`` the step without drafts, ``b`` the
marginal cost of a draft token, ``s`` the fixed cost of a speculative step;
see ``cost.py``). Maximising tokens per ms:

1. sort all candidate drafts ``(r, i)`` by their worth ``g_r(i)`` (falling in
   ``i`` for each request, so a request's drafts enter in order);
2. with ``N`` tokens and ``T`` ms so far (start ``N = B``, ``T = T0 + s``),
   take the next draft while ``g_r(i) > margin * b * N / T`` (adding it raises
   ``N / T``), then ``N += g``, ``T += b``; stop at the first that does not;
3. keep the drafts only if ``N / T > B / T0`` (they beat the fixed cost ``s``).

For a linear cost this is exact for one step: the optimum is a prefix of the
sorted list. Over a run of steps the bar is the run's rate, not each step's
(``rate``, see ``rate.py``): with ``λ`` the engine's recent tokens per ms, take
every draft with ``g > margin * b * λ`` and keep them if ``sum g > λ * (s + b * k)``.
Large batches raise the rate and so the bar a draft must clear; low acceptance
lowers ``g``; both turn speculation down.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LengthDecision:
    lengths: dict[str, int]
    expected_tokens: float
    predicted_ms: float
    baseline_tokens: float
    baseline_ms: float

    @property
    def speedup(self) -> float:
        """Predicted tokens/ms over the same step without drafts."""
        if self.predicted_ms <= 0 or self.baseline_ms <= 0 or self.baseline_tokens <= 0:
            return 1.0
        return (self.expected_tokens / self.predicted_ms) / (self.baseline_tokens / self.baseline_ms)


def choose_lengths(gains: Mapping[str, Sequence[float]], *, decoding_requests: int,
                   base_step_ms: float, per_draft_token_ms: float, spec_step_ms: float = 0.0,
                   margin: float = 1.0, rate: float | None = None,
                   rows_residual_ms: Callable[[int], float] | None = None) -> LengthDecision:
    """Drafts to verify per request.

    ``gains[r]`` lists ``g_r(1..D_r)`` for the ``D_r`` drafts available to
    request ``r`` (already cut to its own cap); ``decoding_requests`` is ``B``
    (requests in ``gains`` plus decoding requests without drafts);
    ``base_step_ms`` is ``T0``. ``rate``: the engine's long-run tokens per ms
    (``rate.py``); given, a draft is taken while ``g > margin * b * rate`` and the
    drafts are kept if their tokens beat ``rate`` times their milliseconds
    (``s`` included), instead of comparing with the step's own ``N / T``.

    ``rows_residual_ms(R)``: how far a decode step of ``R`` query rows falls from the
    cost line (``cost.RowResiduals``). With it, ``D`` drafts cost
    ``b * D + res(B + D) - res(B)``, which need not grow with ``D``; whatever the cost,
    the best ``D`` drafts are the ``D`` most likely to be right (the sorted list's
    prefix), so every ``D`` is priced and the best kept.
    """
    batch = max(decoding_requests, len(gains))
    base_ms = max(base_step_ms, 1e-6)
    cost = max(per_draft_token_ms, 0.0)
    fixed = max(spec_step_ms, 0.0)
    candidates = [(g, request_id) for g, request_id in
                  sorted(((g, request_id) for request_id, row in gains.items() for g in row),
                         key=lambda item: -item[0]) if g > 0.0]
    if rows_residual_ms is None:
        def extra_ms(drafts: int) -> float:
            return cost * drafts
        taken = _linear_prefix(candidates, batch, base_ms + fixed, cost, margin, rate)
    else:
        residual_at_base = rows_residual_ms(batch)

        def extra_ms(drafts: int) -> float:
            return cost * drafts + rows_residual_ms(batch + drafts) - residual_at_base
        taken = _best_prefix(candidates, batch, base_ms, fixed, extra_ms, margin, rate)
    lengths: dict[str, int] = {}
    tokens = float(batch)
    for gain, request_id in candidates[:taken]:
        lengths[request_id] = lengths.get(request_id, 0) + 1
        tokens += gain
    ms = base_ms + fixed + extra_ms(taken)
    pays = (tokens - batch > rate * (ms - base_ms) if rate is not None
            else tokens / ms > batch / base_ms)
    if not lengths or not pays:
        return _no_drafts(batch, base_ms)
    return LengthDecision(lengths, tokens, ms, float(batch), base_ms)


def _linear_prefix(candidates: Sequence[tuple[float, str]], batch: int, start_ms: float,
                   cost: float, margin: float, rate: float | None) -> int:
    """How many of the sorted drafts to take at a constant price per draft: while the next
    one's worth beats its price at the rate (the run's, or the step's own so far)."""
    tokens, ms = float(batch), start_ms
    for taken, (gain, _) in enumerate(candidates):
        if gain <= margin * cost * (rate if rate is not None else tokens / ms):
            return taken
        tokens += gain
        ms += cost
    return len(candidates)


def _best_prefix(candidates: Sequence[tuple[float, str]], batch: int, base_ms: float,
                 fixed_ms: float, extra_ms: Callable[[int], float], margin: float,
                 rate: float | None) -> int:
    """How many of the sorted drafts to take when ``D`` drafts cost ``extra_ms(D)``: the
    ``D`` that maximises tokens less their cost at the rate (or, without one, the step's
    tokens per ms)."""
    best, best_value = 0, 0.0 if rate is not None else batch / base_ms
    tokens = float(batch)
    for drafts, (gain, _) in enumerate(candidates, start=1):
        tokens += gain
        ms = base_ms + fixed_ms + extra_ms(drafts)
        value = (tokens - batch - margin * rate * (ms - base_ms) if rate is not None
                 else tokens / max(ms, 1e-6))
        if value > best_value:
            best, best_value = drafts, value
    return best


def _no_drafts(batch: int, base_ms: float) -> LengthDecision:
    return LengthDecision({}, float(batch), base_ms, float(batch), base_ms)


def probe_lengths(gains: Mapping[str, Sequence[float]], *, decoding_requests: int,
                  base_step_ms: float, per_draft_token_ms: float, spec_step_ms: float = 0.0,
                  half: bool = False) -> LengthDecision:
    """The drafts of the request likeliest to be right, whatever the cost model says.

    For when the cost of a draft is not known from steps that verified drafts: the
    step measures it at the price of one request's drafts. Probes should alternate
    all drafts and ``half`` of them (rounded up): with one length only, the price of a
    draft and the fixed price of a speculative step move together and cannot be told
    apart.
    """
    batch = max(decoding_requests, len(gains))
    base_ms = max(base_step_ms, 1e-6)
    best = max((request_id for request_id, row in gains.items() if row),
               key=lambda request_id: gains[request_id][0], default=None)
    if best is None:
        return _no_drafts(batch, base_ms)
    row = gains[best]
    length = (len(row) + 1) // 2 if half else len(row)
    return LengthDecision({best: length}, batch + sum(row[:length]),
                          base_ms + max(spec_step_ms, 0.0) + length * max(per_draft_token_ms, 0.0),
                          float(batch), base_ms)
