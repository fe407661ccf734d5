"""Adaptive speculation length: where the pure parts meet vLLM's scheduler state.

``XLLMScheduler`` calls three methods per step when
``xllm.speculative.adaptive`` is on:

- ``before_schedule(running)``: each decoding request holds the drafts its
  proposer made after the last step (``request.spec_token_ids``, up to vLLM's
  ``num_speculative_tokens``). They are remembered whole (to judge them later)
  and cut to the length ``choose_lengths`` picks; vLLM's scheduler then
  schedules exactly what is left, so a cut draft is never verified.
  While the cost model has seen too few steps that verify drafts to price
  one (at start, and again once it has forgotten them), steps that would
  verify none verify one request's drafts instead ("cost probes", all of
  them and half of them in turn).
  A request that fixes its own length (``vllm_xargs.spec_k``) keeps that many
  drafts; the choice for the others prices it as a decoding request without drafts.
- ``after_schedule(output)``: records the step's shape for the cost model and,
  for proposers whose drafting costs model passes, asks for only as many
  drafts next step as are likely to be used.
- ``after_update(output, step_ms, requests, gap_ms)``: feeds the measured step time to
  the cost model and judges remembered proposals against the tokens really
  generated ("shadow" acceptance: a draft that was cut is judged as if it had
  been verified, so acceptance is known even where speculation is off).

Under async scheduling (GPUs) the scheduler sees placeholder drafts only; there
the judged drafts are the verified ones, and every ``probe_interval`` steps each
request verifies at least one draft so its estimate stays fresh. That path
follows vLLM's own async rules but has not run here (no GPU).

Greedy outputs equal those without speculation: the controller only decides
how many drafts are verified, and verification never changes the tokens.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from xllm_plugin.spec.acceptance import (
    NO_PROPOSAL,
    AcceptanceEstimator,
    judge_proposal,
    proposal_context,
)
from xllm_plugin.spec.calibration import Calibration
from xllm_plugin.spec.cost import RowResiduals, StepShape, VerifyCostModel
from xllm_plugin.spec.policy import LengthDecision, choose_lengths, probe_lengths
from xllm_plugin.spec.rate import OutputRate
from xllm_plugin.spec.source import TokenHistory, agreement_bucket, divergence_bucket
from xllm_plugin.spec.step_log import StepLog

# Proposers whose drafting is cheap CPU work (string matching): always ask for
# the full length, since the extra drafts cost nothing and feed the estimates.
CHEAP_PROPOSERS = frozenset({"ngram", "ngram_gpu", "suffix"})
# vllm_xargs key a request may use to cap its own speculation (0 = none).
REQUEST_CAP_KEY = "spec_max_k"
# vllm_xargs key that fixes a request's speculation length, past the controller: the
# request verifies min(K, drafts) every step, as vLLM's static K would. For requests whose
# best K is known, and for A/B runs of static K against the controller inside one engine.
REQUEST_FIXED_KEY = "spec_k"
# Cost probes run until the cost model holds this many (decayed) steps that verified
# drafts, and start again when fewer than PROBE_BELOW remain: with the default
# 256-step window, four probe steps about every 350 steps while speculation is off.
PROBE_UNTIL, PROBE_BELOW = 4.0, 1.0
# An engine's first steps carry one-time work the cost model must not learn as the price
# of their shape: on the EPYC host the first step took 3.0 s for 66-79 prompt tokens
# (about 0.3 s by the fitted costs), and the fit then priced a draft at 40 ms.
WARMUP_STEPS = 1


@dataclass
class _Pending:
    position: int  # index in the request's tokens of the first draft
    drafts: tuple[int, ...]
    context: str = NO_PROPOSAL  # what the request's proposal before this one showed
    predicted: tuple[float, ...] = ()  # g(i) the length rule saw for it (calibration.py)


def _request_count(request: Any, key: str) -> int | None:
    """A non-negative int the request set under ``vllm_xargs[key]``, else None."""
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    value = extra.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _verified_and_accepted(verified: Mapping[str, int],
                           runner_output: Any) -> list[tuple[int, int | None]]:
    """(drafts verified, drafts accepted) per request; accepted is None where the runner
    output does not say (async scheduling)."""
    sampled = getattr(runner_output, "sampled_token_ids", None) or []
    index = getattr(runner_output, "req_id_to_index", None) or {}
    out = []
    for request_id, drafts in verified.items():
        row = index.get(request_id)
        generated = len(sampled[row]) if row is not None and row < len(sampled) else 0
        out.append((drafts, generated - 1 if generated else None))
    return out


def _produced_tokens(runner_output: Any) -> int:
    """Tokens the step produced, as the runner reports them (0 where it does not)."""
    sampled = getattr(runner_output, "sampled_token_ids", None) or []
    return sum(len(row) for row in sampled)


def request_cap(request: Any, default: int) -> int:
    """The request's own cap from ``vllm_xargs.spec_max_k``, else ``default``."""
    value = _request_count(request, REQUEST_CAP_KEY)
    return default if value is None else min(value, default)


def request_fixed_length(request: Any, cap: int) -> int | None:
    """The length ``vllm_xargs.spec_k`` fixes (within ``cap``), or None: the controller's."""
    value = _request_count(request, REQUEST_FIXED_KEY)
    return None if value is None else min(value, cap)


def is_decoding(request: Any) -> bool:
    """True when the request's next step computes only its newest token (plus drafts)."""
    return request.num_computed_tokens + 1 >= request.num_tokens


class AdaptiveSpeculation:
    def __init__(self, *, max_drafts: int, method: str, window_steps: int = 32,
                 prior_weight: float = 4.0, cost_window_steps: int = 256,
                 margin: float = 1.0, probe_interval: int = 16,
                 previous_outcome: bool = True, long_run_rate: bool = True,
                 source_agreement: bool = True, source_divergence: bool = False,
                 row_costs: bool = True, step_log: str | None = None) -> None:
        self.max_drafts = max_drafts
        self.long_run_rate = long_run_rate
        self.previous_outcome = previous_outcome
        self.cheap_proposer = method in CHEAP_PROPOSERS
        # Only a copying proposer's drafts have a source in the text (source.py).
        self.by_source = source_agreement and self.cheap_proposer
        self.by_divergence = source_divergence and self.cheap_proposer
        self.margin = margin
        self.probe_interval = probe_interval
        self.acceptance = AcceptanceEstimator(max_drafts, window_steps, prior_weight)
        self.cost = VerifyCostModel(cost_window_steps)
        self.rows = RowResiduals(self.cost, cost_window_steps) if row_costs else None
        self.rate = OutputRate(cost_window_steps)
        self.calibration = Calibration()
        self._pending: dict[str, deque[_Pending]] = {}
        self._latest: dict[str, _Pending] = {}  # each request's newest real proposal
        self._histories: dict[str, TokenHistory] = {}  # copying proposers' token-pair indexes
        self._shadowed: set[str] = set()
        self._shape: StepShape | None = None
        self._verified_lengths: dict[str, int] = {}  # this step's drafts per request
        self._step_log = StepLog(step_log) if step_log else None
        self._steps = 0
        self._timed_steps = 0
        self._spec_steps = 0
        self._drafts_offered = 0
        self._drafts_verified = 0
        self._cost_probing = True
        self._cost_probes = 0
        self._fixed_steps = 0
        self._fixed_longest = 0  # this step's longest fixed length (sizes the next proposal)
        self._last: LengthDecision | None = None
        self._length_hist: Counter[int] = Counter()

    # -- step hooks -----------------------------------------------------------------

    def before_schedule(self, running: Iterable[Any]) -> LengthDecision:
        """Cut each decoding request's drafts to the chosen length."""
        self._steps += 1
        self._fixed_longest = 0
        gains: dict[str, list[float]] = {}
        drafted: list[Any] = []
        decoding = 0
        for request in running:
            if not is_decoding(request):
                continue
            decoding += 1
            drafts = list(request.spec_token_ids)
            if not drafts:
                self._latest.pop(request.request_id, None)
                continue
            context = self._context_of(request, drafts)
            remembered = None
            if all(t >= 0 for t in drafts):
                remembered = self._remember(request, drafts, context)
            else:  # placeholders (async scheduling): nothing to judge a next proposal by
                self._latest.pop(request.request_id, None)
            cap = request_cap(request, self.max_drafts)
            fixed = request_fixed_length(request, cap)
            if fixed is not None:  # the request's own K; its drafts still teach acceptance
                self._fixed_steps += 1
                self._fixed_longest = max(self._fixed_longest, fixed)
                self._drafts_offered += len(drafts)
                request.spec_token_ids = request.spec_token_ids[:fixed]
                continue
            length = min(len(drafts), cap)
            if length <= 0:
                request.spec_token_ids = []
                continue
            drafted.append(request)
            gains[request.request_id] = self.acceptance.gains(request.request_id, length, context)
            if remembered is not None:
                remembered.predicted = tuple(gains[request.request_id])
        # The bar a draft must clear is a rate of decode work, the recent one (rate.py) or,
        # until that is known, the step's own: prefill chunks are the same fixed work
        # whatever is verified, and counting them would make tokens look dear and drafts
        # cheap in every step that admits a request (replayed at concurrency 32: about 2%
        # of throughput lost to drafts of 15-35% acceptance).
        residual = self.rows.pricer() if self.rows is not None else None
        costs = {"decoding_requests": decoding,
                 "base_step_ms": self.cost.predict_ms(StepShape(decoding))
                 + (residual(decoding) if residual is not None and decoding else 0.0),
                 "per_draft_token_ms": self.cost.per_draft_token_ms,
                 "spec_step_ms": self.cost.spec_step_ms}
        rate = self.rate.tokens_per_ms(decoding) if self.long_run_rate else None
        decision = choose_lengths(gains, margin=self.margin, rate=rate,
                                  rows_residual_ms=residual, **costs)
        if not decision.lengths and gains and self._needs_cost_probe():
            decision = probe_lengths(gains, half=self._cost_probes % 2 == 1, **costs)
            self._cost_probes += 1
        probe = self.probe_interval > 0 and self._steps % self.probe_interval == 0
        for request in drafted:
            keep = decision.lengths.get(request.request_id, 0)
            if keep == 0 and probe and request.request_id not in self._shadowed:
                keep = 1  # keep placeholder-only requests' estimates alive
            self._drafts_offered += len(request.spec_token_ids)
            self._length_hist[keep] += 1
            if keep < len(request.spec_token_ids):
                request.spec_token_ids = request.spec_token_ids[:keep]
        self._last = decision
        return decision

    def _needs_cost_probe(self) -> bool:
        """True while a draft's price rests on the cost model's priors (with hysteresis)."""
        seen = self.cost.speculative_steps
        if seen >= PROBE_UNTIL:
            self._cost_probing = False
        elif seen < PROBE_BELOW:
            self._cost_probing = True
        return self._cost_probing

    def after_schedule(self, output: Any) -> None:
        """Record the step's shape; size the next proposal for costly proposers."""
        spec = output.scheduled_spec_decode_tokens
        decode = prefill = verified = 0
        self._verified_lengths = {}
        for request_id, tokens in output.num_scheduled_tokens.items():
            drafts = len(spec.get(request_id, ()))
            if drafts or tokens == 1:
                decode += 1
                verified += drafts
                if drafts:
                    self._verified_lengths[request_id] = drafts
            else:
                prefill += tokens
        self._drafts_verified += verified
        self._spec_steps += verified > 0
        self._shape = StepShape(decode, verified, prefill)
        if not self.cheap_proposer and self._last is not None:
            longest = max(self._fixed_longest, *self._last.lengths.values())
            output.num_spec_tokens_to_schedule = min(self.max_drafts, longest + 1)

    def after_update(self, scheduler_output: Any, runner_output: Any, step_ms: float | None,
                     requests: Mapping[str, Any], gap_ms: float | None = None) -> None:
        """Learn from the finished step: its cost, and how the drafts fared. ``gap_ms``:
        the host's time between the previous step and this one (step log only)."""
        if self._shape is not None and step_ms is not None:
            self._timed_steps += 1
            if self._timed_steps > WARMUP_STEPS:
                if self.rows is not None:
                    self.rows.observe(self._shape, step_ms)
                self.cost.observe(self._shape, step_ms)
            if not self._shape.prefill_tokens:  # see rate.py: drafts save decode time only
                self.rate.observe(self._shape.decode_requests,
                                  _produced_tokens(runner_output), step_ms)
            if self._step_log is not None:
                self._step_log.write(self._shape, _verified_and_accepted(
                    self._verified_lengths, runner_output), step_ms, gap_ms)
        self._shape = None
        self._observe_verified(scheduler_output, runner_output)
        self._judge_pending(requests)

    def forget(self, request_id: str) -> None:
        self._pending.pop(request_id, None)
        self._latest.pop(request_id, None)
        self._histories.pop(request_id, None)
        self._shadowed.discard(request_id)
        self.acceptance.forget(request_id)

    # -- acceptance bookkeeping ---------------------------------------------------------

    def _context_of(self, request: Any, drafts: list[int]) -> str:
        """How the request's previous proposal fares against the tokens generated since,
        and (copying proposers) how far the new drafts' source agrees with the text and,
        with ``source_divergence``, where other sources part from the drafts."""
        latest = self._latest.get(request.request_id)
        if latest is None or not self.previous_outcome:
            outcome = NO_PROPOSAL
        else:
            end = latest.position + len(latest.drafts)
            outcome = proposal_context(latest.drafts, request.all_token_ids[latest.position:end])
        if drafts[0] < 0 or not (self.by_source or self.by_divergence):
            return outcome
        history = self._histories.setdefault(request.request_id, TokenHistory())
        if self.by_source:
            outcome += "/" + agreement_bucket(history.agreement(request.all_token_ids, drafts[0]))
        if self.by_divergence:
            outcome += "/" + divergence_bucket(history.divergence(request.all_token_ids, drafts))
        return outcome

    def _remember(self, request: Any, drafts: list[int], context: str) -> _Pending:
        self._shadowed.add(request.request_id)
        queue = self._pending.setdefault(request.request_id, deque(maxlen=64))
        pending = _Pending(request.num_tokens, tuple(drafts), context)
        queue.append(pending)
        self._latest[request.request_id] = pending
        return pending

    def _observe_verified(self, scheduler_output: Any, runner_output: Any) -> None:
        """Placeholder drafts (async scheduling): learn from the verified ones."""
        sampled = getattr(runner_output, "sampled_token_ids", None)
        index = getattr(runner_output, "req_id_to_index", None)
        if not sampled or not index:
            return
        for request_id, drafts in scheduler_output.scheduled_spec_decode_tokens.items():
            if request_id in self._shadowed or not drafts or request_id not in index:
                continue
            generated = len(sampled[index[request_id]])
            if generated == 0:
                continue
            accepted = generated - 1
            judged = accepted + (1 if accepted < len(drafts) else 0)
            self.acceptance.observe(request_id, accepted, judged)

    def _judge_pending(self, requests: Mapping[str, Any]) -> None:
        for request_id in list(self._pending):
            queue = self._pending[request_id]
            request = requests.get(request_id)
            complete = request is None or request.is_finished()
            tokens = request.all_token_ids if request is not None else ()
            while queue:
                item = queue[0]
                actual = tokens[item.position: item.position + len(item.drafts)]
                verdict = judge_proposal(item.drafts, actual, complete)
                if verdict is None:
                    break
                queue.popleft()
                self.acceptance.observe(request_id, *verdict, item.context)
                if item.predicted:
                    self.calibration.add(item.predicted, *verdict, item.context)
            if not queue:
                del self._pending[request_id]
            if complete:
                self.forget(request_id)
        for request_id in self.acceptance.request_ids():  # ended without pending proposals
            if request_id not in requests:
                self.forget(request_id)

    # -- observability ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        last = self._last
        return {
            "steps": self._steps,
            "speculative_steps": self._spec_steps,
            "drafts_offered": self._drafts_offered,
            "drafts_verified": self._drafts_verified,
            "cost_probe_steps": self._cost_probes,
            "fixed_length_request_steps": self._fixed_steps,
            "chosen_lengths": {str(k): v for k, v in sorted(self._length_hist.items())},
            "last_lengths": dict(last.lengths) if last else {},
            "last_predicted_speedup": last.speedup if last else 1.0,
            "global_acceptance_by_position": [round(h, 4) for h in
                                              self.acceptance.global_hazards()],
            "judged_proposals": self.acceptance.observations,
            "cost_model_ms": self.cost.as_dict(),
            "cost_model_samples": self.cost.samples,
            "row_residuals_ms": self.rows.as_dict() if self.rows is not None else None,
            "output_rate_tokens_per_ms": self.rate.as_dict(),
            "calibration": self.calibration.as_dict(),
            "updated_at": time.time(),
        }
