"""A closed-loop replay of speculative decoding on recorded greedy outputs.

Under greedy decoding a request's tokens do not depend on how many drafts were
verified, and a proposer such as n-gram lookup is a function of the tokens
before the draft. Given each request's prompt and output, every proposal any
policy would see is fixed, and a policy's throughput follows from a step-cost
function alone: the replay is exact where engine runs on a small host move
several percent between repetitions, which hides the differences a length
policy makes.

The replay steps ``concurrency`` clients in lockstep: a client whose request
finished sends the next one, whose prompt is prefilled in the next step (and
yields its first token there); every other request decodes, verifying the
drafts its policy keeps. The adaptive policy is the real
``AdaptiveSpeculation``, fed the same scheduler-shaped objects vLLM gives it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from xllm_plugin.spec.acceptance import judge_proposal
from xllm_plugin.spec.adaptive import AdaptiveSpeculation
from xllm_plugin.spec.cost import FEATURES, StepShape

Proposer = Callable[[Sequence[int], int], list[int]]
"""``propose(tokens, k)``: up to ``k`` drafts following ``tokens``."""


@dataclass(frozen=True)
class Recorded:
    """One request as it was really decoded: prompt and greedy output token ids."""

    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]


@dataclass(frozen=True)
class StepCost:
    """The modelled time of one engine step, ms, linear in the controller's own terms.

    ``row_tile`` > 1 charges query rows (decode rows, drafts, prefill tokens) in
    whole tiles of that many rows, as matrix engines that compute a tile at a
    time do: then a few drafts at a small batch are free and the linear terms
    only hold on average.

    ``draft_ms_by_batch`` ((fewest decoding requests, ms per draft), ascending)
    overrides ``per_draft_token_ms`` by batch size, for hosts where a draft row
    costs less in a step of few rows (measured on the Xeon host in bf16).

    ``rows_ms`` ((query rows, ms), ascending) gives a decode-only step's time by its
    query rows (decoding requests plus drafts), interpolated between the rows listed and
    continued past the last at ``per_draft_token_ms`` a row: measured on the AVX2 EPYC
    host in float32, where it is not a line (three to five drafts at one request cost less
    than none). Steps with prefill work stay on the line.
    """

    fixed_ms: float
    per_request_ms: float
    per_draft_token_ms: float
    per_prefill_token_ms: float
    spec_step_ms: float = 0.0
    row_tile: int = 1
    draft_ms_by_batch: tuple[tuple[int, float], ...] = ()
    rows_ms: tuple[tuple[int, float], ...] = ()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StepCost:
        known = {name: float(values[name]) for name in FEATURES if name in values}
        by_batch = tuple(sorted((int(k), float(v))
                                for k, v in values.get("draft_ms_by_batch", {}).items()))
        by_rows = tuple(sorted((int(k), float(v)) for k, v in values.get("rows_ms", {}).items()))
        return cls(**known, row_tile=int(values.get("row_tile", 1)), draft_ms_by_batch=by_batch,
                   rows_ms=by_rows)

    def draft_ms(self, decode_requests: int) -> float:
        price = self.per_draft_token_ms
        for fewest, ms in self.draft_ms_by_batch:
            if decode_requests >= fewest:
                price = ms
        return price

    def ms(self, shape: StepShape) -> float:
        if self.rows_ms and not shape.prefill_tokens and shape.decode_requests:
            return self._decode_rows_ms(shape.decode_requests + shape.draft_tokens)
        drafts, prefill = float(shape.draft_tokens), float(shape.prefill_tokens)
        if self.row_tile > 1:
            rows = shape.decode_requests + shape.draft_tokens + shape.prefill_tokens
            tiled = math.ceil(rows / self.row_tile) * self.row_tile if rows else 0
            extra = tiled - rows  # padding rows, charged as drafts
            drafts += extra
        return (self.fixed_ms + self.per_request_ms * shape.decode_requests
                + self.draft_ms(shape.decode_requests) * drafts
                + self.per_prefill_token_ms * prefill
                + (self.spec_step_ms if shape.draft_tokens else 0.0))

    def _decode_rows_ms(self, rows: int) -> float:
        points = self.rows_ms
        if rows <= points[0][0]:
            return points[0][1]
        for (low, low_ms), (high, high_ms) in zip(points, points[1:]):
            if rows <= high:
                return low_ms + (high_ms - low_ms) * (rows - low) / (high - low)
        last, last_ms = points[-1]
        return last_ms + self.per_draft_token_ms * (rows - last)


class LengthPolicy(Protocol):
    def choose(self, live: list[LiveRequest]) -> None:
        """Cut each decoding request's ``spec_token_ids`` to the drafts it verifies."""

    def learn(self, scheduled: ScheduledStep, runner: RunnerOutput, step_ms: float,
              requests: dict[str, LiveRequest]) -> None:
        """See the finished step."""


@dataclass
class LiveRequest:
    """The attributes of a vLLM ``Request`` the controller reads, for one replayed request."""

    request_id: str
    recorded: Recorded
    all_token_ids: list[int]
    num_computed_tokens: int = 0
    spec_token_ids: list[int] = field(default_factory=list)
    sampling_params: Any = None
    finished: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def remaining(self) -> int:
        return len(self.recorded.prompt_ids) + len(self.recorded.output_ids) - self.num_tokens

    def is_finished(self) -> bool:
        return self.finished


@dataclass
class ScheduledStep:
    """The fields of vLLM's ``SchedulerOutput`` the controller reads."""

    num_scheduled_tokens: dict[str, int]
    scheduled_spec_decode_tokens: dict[str, list[int]]
    num_spec_tokens_to_schedule: int | None = None


@dataclass
class RunnerOutput:
    """The fields of vLLM's ``ModelRunnerOutput`` the controller reads: the tokens each
    scheduled request produced this step."""

    req_id_to_index: dict[str, int] = field(default_factory=dict)
    sampled_token_ids: list[list[int]] = field(default_factory=list)


class StaticLength:
    """vLLM with a fixed ``num_speculative_tokens``: verify every draft up to ``k``."""

    def __init__(self, k: int) -> None:
        self.k = k

    def choose(self, live: list[LiveRequest]) -> None:
        for request in live:
            request.spec_token_ids = request.spec_token_ids[: self.k]

    def learn(self, scheduled: ScheduledStep, runner: RunnerOutput, step_ms: float,
              requests: dict[str, LiveRequest]) -> None:
        return None


class BatchSizeTable(StaticLength):
    """vLLM's ``num_speculative_tokens_per_batch_size``: the next proposal's K is looked up
    from how many requests this step scheduled (``lookup[batch]``, index 0 unused)."""

    def __init__(self, lookup: Sequence[int], k: int) -> None:
        super().__init__(k)
        self.lookup = list(lookup)

    def learn(self, scheduled: ScheduledStep, runner: RunnerOutput, step_ms: float,
              requests: dict[str, LiveRequest]) -> None:
        batch = len(scheduled.num_scheduled_tokens)
        if batch:
            self.k = self.lookup[min(batch, len(self.lookup) - 1)]


class OracleLength:
    """Verify exactly the drafts that will be accepted: no controller can know this, so it
    bounds what better acceptance estimates could still win (the rule and costs aside)."""

    def choose(self, live: list[LiveRequest]) -> None:
        for request in live:
            if request.num_computed_tokens == 0 or not request.spec_token_ids:
                continue
            offset = request.num_tokens - len(request.recorded.prompt_ids)
            drafts = request.spec_token_ids
            right, _ = judge_proposal(drafts, request.recorded.output_ids[
                offset: offset + len(drafts)], True)
            # The step adds a token of its own: drafts past the request's end are wasted.
            request.spec_token_ids = drafts[:max(0, min(right, request.remaining - 1))]

    def learn(self, scheduled: ScheduledStep, runner: RunnerOutput, step_ms: float,
              requests: dict[str, LiveRequest]) -> None:
        return None


class AdaptiveLength:
    """The plugin's controller, driven through the three hooks XLLMScheduler calls."""

    def __init__(self, controller: AdaptiveSpeculation) -> None:
        self.controller = controller

    def choose(self, live: list[LiveRequest]) -> None:
        self.controller.before_schedule(live)

    def learn(self, scheduled: ScheduledStep, runner: RunnerOutput, step_ms: float,
              requests: dict[str, LiveRequest]) -> None:
        self.controller.after_schedule(scheduled)
        self.controller.after_update(scheduled, runner, step_ms, requests)


@dataclass
class CellResult:
    output_tokens: int
    elapsed_ms: float
    steps: int
    drafts_verified: int
    drafts_accepted: int

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 * self.output_tokens / self.elapsed_ms if self.elapsed_ms else 0.0


def replay_cell(requests: Sequence[Recorded], concurrency: int, policy: LengthPolicy,
                propose: Proposer, max_drafts: int, cost: StepCost,
                noise: float = 0.0, seed: int = 0, prefix: str = "") -> CellResult:
    """Run ``requests`` through ``concurrency`` closed-loop clients under ``policy``.

    ``noise``: the relative spread (log-normal sigma) of the step times the
    policy observes; the modelled time itself stays exact.
    """
    rng = random.Random(seed)
    queue = iter(enumerate(requests))
    live: dict[str, LiveRequest] = {}
    result = CellResult(0, 0.0, 0, 0, 0)

    def admit() -> None:
        while len(live) < concurrency:
            item = next(queue, None)
            if item is None:
                return
            index, recorded = item
            request_id = f"{prefix}{index}"
            live[request_id] = LiveRequest(request_id, recorded, list(recorded.prompt_ids))

    admit()
    while live:
        decoding = [r for r in live.values() if r.num_computed_tokens > 0]
        for request in decoding:
            request.spec_token_ids = list(propose(request.all_token_ids, max_drafts))
        policy.choose(list(live.values()))
        scheduled = ScheduledStep({}, {})
        prefill_tokens = verified = 0
        for request in live.values():
            if request.num_computed_tokens == 0:
                scheduled.num_scheduled_tokens[request.request_id] = request.num_tokens
                prefill_tokens += request.num_tokens
                continue
            drafts = request.spec_token_ids
            scheduled.num_scheduled_tokens[request.request_id] = 1 + len(drafts)
            if drafts:
                scheduled.scheduled_spec_decode_tokens[request.request_id] = list(drafts)
            verified += len(drafts)
        shape = StepShape(len(decoding), verified, prefill_tokens)
        step_ms = cost.ms(shape)
        result.elapsed_ms += step_ms
        result.steps += 1
        result.drafts_verified += verified
        runner = RunnerOutput()
        for request in live.values():
            drafting = request.num_computed_tokens > 0 and bool(request.spec_token_ids)
            new = _advance(request)
            runner.req_id_to_index[request.request_id] = len(runner.sampled_token_ids)
            runner.sampled_token_ids.append(request.all_token_ids[-new:] if new else [])
            result.output_tokens += new
            if drafting:
                result.drafts_accepted += max(0, new - 1)
        observed = step_ms * math.exp(rng.gauss(0.0, noise)) if noise > 0 else step_ms
        for request in live.values():
            request.finished = request.remaining <= 0
        policy.learn(scheduled, runner, observed, live)
        for request_id in [r.request_id for r in live.values() if r.finished]:
            del live[request_id]
        admit()
    return result


def _advance(request: LiveRequest) -> int:
    """Append the tokens this step produced for ``request``; how many it produced."""
    position = request.num_tokens
    outputs = request.recorded.output_ids
    offset = position - len(request.recorded.prompt_ids)
    if request.num_computed_tokens == 0:  # prefill: the first output token
        request.num_computed_tokens = position
        produced = 1
    else:
        drafts = request.spec_token_ids
        accepted, _ = judge_proposal(drafts, outputs[offset: offset + len(drafts)], True)
        produced = accepted + 1
        request.num_computed_tokens = position + accepted
    produced = min(produced, request.remaining)
    request.all_token_ids.extend(outputs[offset: offset + produced])
    request.spec_token_ids = []
    return produced
