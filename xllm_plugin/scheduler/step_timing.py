"""How long steps really take next to what the step model predicted for them.

The step model (``step_model.py``) learns the time from ``schedule()`` to
``update_from_output()``: the forward pass and sampling. What a decoding request
sees as its TPOT is the whole cycle from one step's start to the next one's, which
adds the engine core's own work between steps (handing outputs over, taking in new
requests) and, on a CPU host, whatever the API server and its neighbours take from
the shared cores. When that gap is a large part of the limit, steps planned inside it
still miss it. This records the two parts so ``/xllm/status`` can say which one did:
the model's error on the steps it sized, and the gap between busy steps.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

WINDOW_STEPS = 512
"""Steps remembered for the percentiles: a few seconds to a minute of recent load."""


def _quantiles(values: deque[float], *qs: float) -> list[float | None]:
    """One sort for all of ``qs`` (the snapshot is built on the step path)."""
    if not values:
        return [None] * len(qs)
    ordered = sorted(values)
    return [ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in qs]


@dataclass
class _Sized:
    """A finished step the budget sized to a time limit, waiting for its gap to be known."""

    compute_ms: float
    limit_ms: float


class StepTiming:
    """Sliding-window record of step compute time, planning error and inter-step gaps."""

    def __init__(self, window: int = WINDOW_STEPS) -> None:
        self.ratios: deque[float] = deque(maxlen=window)  # compute / predicted, sized steps
        self.gaps_ms: deque[float] = deque(maxlen=window)  # update end -> next schedule, busy
        self.sized_steps = 0
        self.sized_over_limit = 0  # sized steps whose cycle (compute + next gap) passed the limit
        self.sized_compute_over_limit = 0  # ... whose compute alone did
        self._pending: _Sized | None = None
        self._compute_end: float | None = None

    def step_began(self, now: float) -> None:
        """``schedule()`` started. A gap counts only after a step that left work to do:
        an idle engine waits for requests, which is no cost of the previous step."""
        if self._compute_end is not None:
            gap_ms = (now - self._compute_end) * 1000
            self.gaps_ms.append(gap_ms)
            if self._pending is not None and self._pending.compute_ms + gap_ms > \
                    self._pending.limit_ms:
                self.sized_over_limit += 1
        self._compute_end = None
        self._pending = None

    def step_finished(self, now: float, compute_ms: float, predicted_ms: float | None,
                      limit_ms: float | None, constrained: bool) -> None:
        """The step's outputs are in (``update_from_output()`` began at ``now``);
        ``predicted_ms``: the model's time for the work it held, ``limit_ms``: its budget's
        limit. The gap runs from here, so it holds vLLM's processing of the outputs as well
        as the engine core's loop."""
        self._compute_end = now
        if not constrained or limit_ms is None:
            return
        self.sized_steps += 1
        self.sized_compute_over_limit += compute_ms > limit_ms
        if predicted_ms:
            self.ratios.append(compute_ms / predicted_ms)
        self._pending = _Sized(compute_ms, limit_ms)

    def outputs_sent(self, busy: bool) -> None:
        """``update_from_output()`` returned; ``busy``: requests remain, so the next
        ``schedule()`` follows as soon as the engine core gets to it."""
        if not busy:
            self._compute_end = None
            self._pending = None

    def status(self) -> dict[str, float | int | None]:
        def rounded(value: float | None, digits: int) -> float | None:
            return None if value is None else round(value, digits)

        ratio_p50, ratio_p90 = _quantiles(self.ratios, 0.5, 0.9)
        gap_p50, gap_p90 = _quantiles(self.gaps_ms, 0.5, 0.9)
        return {
            "sized_steps": self.sized_steps,
            "sized_steps_over_limit": self.sized_over_limit,
            "sized_steps_compute_over_limit": self.sized_compute_over_limit,
            "compute_over_predicted_p50": rounded(ratio_p50, 3),
            "compute_over_predicted_p90": rounded(ratio_p90, 3),
            "gap_ms_p50": rounded(gap_p50, 2),
            "gap_ms_p90": rounded(gap_p90, 2),
        }
