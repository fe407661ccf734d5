"""Online draft-acceptance estimates, per request and engine-wide, by draft position.

A proposal of ``D`` draft tokens is judged position by position: draft ``i``
counts only if drafts ``1..i-1`` were right, so the natural statistic is the
*conditional* acceptance (hazard) ``h(i) = P(draft i right | drafts before it
right)``. The expected number of accepted tokens when verifying ``k`` drafts is
``sum_{i<=k} g(i)`` with ``g(i) = prod_{j<=i} h(j)``; ``g(i)`` is what the
``i``-th draft is worth, and it falls with ``i``.

Each request keeps exponentially decayed counts (a sliding window in steps),
shrunk towards the engine-wide estimate with weight ``prior_weight``, so a new
request starts from what recent requests saw and moves to its own behaviour as
evidence accumulates. Everything here is plain Python over ints: no vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# Engine-wide starting point before any draft has been judged: a coin flip per position.
INITIAL_HAZARD = 0.5


@dataclass
class PositionCounts:
    """Decayed trials/successes per draft position (index 0 = first draft)."""

    max_positions: int
    trials: list[float] = field(default_factory=list)
    successes: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.trials = [0.0] * self.max_positions
        self.successes = [0.0] * self.max_positions

    def decay(self, factor: float) -> None:
        for i in range(self.max_positions):
            self.trials[i] *= factor
            self.successes[i] *= factor

    def add(self, matched: int, judged: int) -> None:
        """One proposal: the first ``matched`` drafts were right, ``judged`` drafts were checked.

        ``judged`` is ``matched + 1`` when a wrong draft was seen, ``matched``
        when the proposal ran out (or the request ended) before a wrong one.
        """
        for i in range(min(judged, self.max_positions)):
            self.trials[i] += 1.0
            if i < matched:
                self.successes[i] += 1.0


class AcceptanceEstimator:
    """Per-request and engine-wide acceptance by draft position.

    ``window_steps``: memory of a request's own estimate (decay ``1 - 1/window``
    per observation); the engine-wide estimate remembers ``4 * window_steps``.
    ``prior_weight``: how many observations the engine-wide estimate is worth
    in a request's estimate.
    """

    def __init__(self, max_positions: int, window_steps: int = 32,
                 prior_weight: float = 4.0) -> None:
        if max_positions < 1:
            raise ValueError("max_positions must be >= 1")
        self.max_positions = max_positions
        self.prior_weight = prior_weight
        self._decay = 1.0 - 1.0 / max(window_steps, 1)
        self._global_decay = 1.0 - 1.0 / max(4 * window_steps, 1)
        self._global = PositionCounts(max_positions)
        self._requests: dict[str, PositionCounts] = {}
        self.observations = 0

    def observe(self, request_id: str, matched: int, judged: int) -> None:
        """Record one judged proposal of ``request_id`` (see ``PositionCounts.add``)."""
        if judged <= 0:
            return
        counts = self._requests.get(request_id)
        if counts is None:
            counts = self._requests[request_id] = PositionCounts(self.max_positions)
        counts.decay(self._decay)
        counts.add(matched, judged)
        self._global.decay(self._global_decay)
        self._global.add(matched, judged)
        self.observations += 1

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def request_ids(self) -> list[str]:
        return list(self._requests)

    def global_hazards(self) -> list[float]:
        """Engine-wide conditional acceptance per position."""
        out = []
        for i in range(self.max_positions):
            trials, wins = self._global.trials[i], self._global.successes[i]
            # One pseudo-observation at the initial value keeps unseen positions defined.
            out.append((wins + INITIAL_HAZARD) / (trials + 1.0))
        return out

    def hazards(self, request_id: str) -> list[float]:
        """The request's conditional acceptance per position, shrunk to the engine-wide one."""
        prior = self.global_hazards()
        counts = self._requests.get(request_id)
        if counts is None:
            return prior
        w = self.prior_weight
        return [(counts.successes[i] + w * prior[i]) / (counts.trials[i] + w) if
                counts.trials[i] + w > 0 else prior[i] for i in range(self.max_positions)]

    def gains(self, request_id: str, length: int | None = None) -> list[float]:
        """``g(i)``: probability that drafts ``1..i`` are all accepted, for ``i = 1..length``."""
        return cumulative_gains(self.hazards(request_id)[: length or self.max_positions])


def cumulative_gains(hazards: Sequence[float]) -> list[float]:
    out, running = [], 1.0
    for h in hazards:
        running *= min(max(h, 0.0), 1.0)
        out.append(running)
    return out


def judge_proposal(drafts: Sequence[int], actual: Sequence[int],
                   complete: bool) -> tuple[int, int] | None:
    """Compare a proposal with the tokens that were really generated after it.

    ``actual`` holds the tokens generated so far at the drafts' positions. The
    result is ``(matched, judged)`` once the proposal can be judged, i.e. a
    wrong draft was found, every draft was covered, or ``complete`` says no
    more tokens will come; otherwise ``None`` (wait for more tokens).

    Greedy decoding makes this exactly what verification would accept; with
    sampling and deterministic (n-gram) drafts the match probability equals
    the rejection sampler's acceptance probability in expectation.
    """
    matched = 0
    for draft, token in zip(drafts, actual):
        if draft != token:
            return matched, matched + 1
        matched += 1
    if matched == len(drafts) or complete:
        return matched, matched
    return None
