"""Predicts how long an engine step takes, learned online from the engine's own steps.

Model (roofline-shaped, linear in the work of a step)::

    step_ms = c0 + c_prefill * prefill_tokens + c_decode * decode_tokens
                 + c_context * context_tokens / 1000

``c0`` is the fixed cost of a step (launch, sampling, Python), the per-token
terms are the weight-bound matmul work, and the context term is attention
reading the KV of every scheduled request. Coefficients start from a prior and
are refitted over a sliding window of measured steps, clipped at zero so the
model never predicts negative work. The fit minimises *relative* error (each
step weighted by 1 / its measured time): step times span two orders of magnitude
(decodes of tens of ms, prefill chunks of seconds on a CPU), the limit a plan must
meet is a fraction of an SLO, and a plain least-squares fit lets the longest steps
set the intercept for all of them (``tests/plugin/test_step_budget.py`` has a case
where it predicted decode-only steps 58% too long). Until there are enough steps for
that fit, the whole prior is scaled by measured / predicted time over the steps so
far: hosts differ by more than an order of magnitude (float32 prefill of a 135M
model on one AVX2 core was learned at 3.6-5.3 ms a token, 18-27x the prior), so a
2048-token step sized with the raw prior would take some 7-11 s (computed, not seen)
instead of the hundreds of ms meant.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepWork:
    """What one step computes."""

    prefill_tokens: int = 0
    decode_tokens: int = 0
    context_tokens: int = 0

    def features(self) -> np.ndarray:
        return np.array([1.0, self.prefill_tokens, self.decode_tokens,
                         self.context_tokens / 1000.0])


# A small model on one CPU core; overestimates on a GPU until the first refit.
DEFAULT_PRIOR_MS = (5.0, 0.2, 1.0, 0.5)

# Below this a measured step weighs no more in the fit (timer noise dominates).
_MIN_WEIGHTED_MS = 0.5


class StepLatencyModel:
    def __init__(self, prior_ms: tuple[float, float, float, float] = DEFAULT_PRIOR_MS,
                 window: int = 512, min_samples: int = 16, refit_every: int = 8) -> None:
        self.coefficients = np.array(prior_ms, dtype=float)
        self._prior = self.coefficients.copy()
        self._prior_predicted_ms = 0.0  # what the prior said of the steps seen so far
        self._measured_ms = 0.0
        self._fitted = False
        self._rows: deque[np.ndarray] = deque(maxlen=window)
        self._targets: deque[float] = deque(maxlen=window)
        self._min_samples = min_samples
        self._refit_every = refit_every
        self._since_fit = 0
        self.samples = 0

    def predict_ms(self, work: StepWork) -> float:
        return float(self.coefficients @ work.features())

    def observe(self, work: StepWork, measured_ms: float) -> None:
        self._rows.append(work.features())
        self._targets.append(measured_ms)
        self.samples += 1
        self._since_fit += 1
        if len(self._rows) >= self._min_samples and self._since_fit >= self._refit_every:
            self._refit()
        elif not self._fitted:
            self._prior_predicted_ms += float(self._prior @ work.features())
            self._measured_ms += measured_ms
            if self._prior_predicted_ms > 0:
                self.coefficients = self._prior * (self._measured_ms / self._prior_predicted_ms)

    def _refit(self) -> None:
        self._since_fit = 0
        self._fitted = True
        rows, targets = np.array(self._rows), np.array(self._targets)
        # Columns that never varied cannot be identified: keep their prior.
        varied = np.ptp(rows, axis=0) > 0
        varied[0] = True
        weights = 1.0 / np.maximum(targets, _MIN_WEIGHTED_MS)
        fitted, *_ = np.linalg.lstsq(rows[:, varied] * weights[:, None], targets * weights,
                                     rcond=None)
        coefficients = self.coefficients.copy()
        coefficients[varied] = np.maximum(fitted, 0.0)
        self.coefficients = coefficients

    def max_prefill_tokens(self, decode_tokens: int, context_tokens: int,
                           budget_ms: float) -> int:
        """Most prefill tokens a step with these decodes can take and stay within budget."""
        fixed = self.predict_ms(StepWork(0, decode_tokens, context_tokens))
        if fixed >= budget_ms:
            return 0
        per_token = self.coefficients[1]
        if per_token <= 0:  # prefill tokens measured as free (a tiny model): no cap
            return 1 << 30
        return max(0, int((budget_ms - fixed) / per_token))
