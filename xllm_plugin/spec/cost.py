"""What verifying one more draft token costs, learned online from the engine's own steps.

Model, per step::

    step_ms = a + r * decode_requests + b * draft_tokens + c * prefill_tokens
                + s * [step verifies drafts]

A decoding request costs ``r`` whether or not it brings drafts (its KV is
read, its logits sampled); each verified draft adds ``b`` (one more query
row through the weights and the logits), the number the speculation
controller weighs against expected acceptance; ``s`` is the fixed price of a
speculative step (rejection sampling). Keeping ``r`` and ``b`` apart matters:
a model with tokens only charges drafts for per-request work and
under-speculates at large batches, where a draft row is much cheaper than a
request.

Fitted by ridge regression over exponentially decayed sufficient statistics
(a sliding window without a buffer). Weak priors, each worth a pseudo-step or
two, keep it defined when the steps do not separate the terms:

- ``b`` is pulled towards ``c`` (a query row is a query row until the data say
  otherwise; prefill chunks vary a lot and pin ``c`` down early);
- ``b`` and ``s`` are pulled towards zero (optimism: when the data cannot tell
  the terms apart, e.g. a constant batch without drafts, speculation is
  assumed cheap, tried, and the resulting steps settle it).

The priors alone cannot be trusted to restart speculation: tied to ``c``, ``b``
is as wrong as ``c``, and ``c`` fitted on a slow first step (warm-up) priced a
draft at 40 ms on this host, so no draft was verified and nothing corrected it.
``speculative_steps`` (decayed steps that verified drafts) lets the controller
see when ``b`` rests on priors alone and verify some drafts to measure it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FEATURES = ("fixed_ms", "per_request_ms", "per_draft_token_ms", "per_prefill_token_ms",
            "spec_step_ms")
_R, _B, _C, _S = 1, 2, 3, 4
# Refit after every step while the model is young, then every REFIT_EVERY steps: a refit
# (a 5x5 solve with numpy's call overhead) was 45% of the controller's time in the engine
# (0.2 ms of 0.47 per step at c=1 under cProfile, 2026-12-06); with a 256-step window a fit
# up to 7 steps old replayed within 0.1% of refitting every step.
REFIT_EAGER_STEPS, REFIT_EVERY = 32, 8


@dataclass(frozen=True)
class StepShape:
    decode_requests: int
    draft_tokens: int = 0
    prefill_tokens: int = 0

    def features(self) -> np.ndarray:
        return np.array([1.0, self.decode_requests, self.draft_tokens, self.prefill_tokens,
                         1.0 if self.draft_tokens else 0.0])


class VerifyCostModel:
    def __init__(self, window_steps: int = 256, tie_weight: float = 2.0,
                 optimism: float = 0.5, spec_weight: float = 1.0) -> None:
        self._decay = 1.0 - 1.0 / max(window_steps, 2)
        n = len(FEATURES)
        self._xtx = np.zeros((n, n))
        self._xty = np.zeros(n)
        self._tie_weight = tie_weight
        self._optimism = optimism
        self._spec_weight = spec_weight
        self.coefficients = np.zeros(n)
        self.samples = 0

    def observe(self, shape: StepShape, measured_ms: float) -> None:
        if not np.isfinite(measured_ms) or measured_ms <= 0:
            return
        x = shape.features()
        self._xtx = self._decay * self._xtx + np.outer(x, x)
        self._xty = self._decay * self._xty + measured_ms * x
        self.samples += 1
        if self.samples <= REFIT_EAGER_STEPS or self.samples % REFIT_EVERY == 0:
            self._refit()

    def _refit(self) -> None:
        n = len(FEATURES)
        mass = max(self._xtx[0, 0], 1e-9)
        # Each prior is worth ``weight`` pseudo-steps at the feature's mean square,
        # so it dominates only while the data do not vary that feature.
        draft_sq = max(self._xtx[_B, _B] / mass, 1.0)
        tie = np.zeros(n)
        tie[_B], tie[_C] = 1.0, -1.0
        prior = self._tie_weight * draft_sq * np.outer(tie, tie)
        prior[_B, _B] += self._optimism * draft_sq
        prior[_S, _S] += self._spec_weight
        for k in (_R, _C):  # numerical floor only
            prior[k, k] += 1e-6 * max(self._xtx[k, k] / mass, 1.0)
        try:
            theta = np.linalg.solve(self._xtx + prior + 1e-9 * np.eye(n), self._xty)
        except np.linalg.LinAlgError:
            return
        theta[1:] = np.maximum(theta[1:], 0.0)
        self.coefficients = theta

    @property
    def per_draft_token_ms(self) -> float:
        return float(self.coefficients[_B])

    @property
    def speculative_steps(self) -> float:
        """Steps that verified drafts, decayed like the fit's statistics."""
        return float(self._xtx[_S, _S])

    @property
    def spec_step_ms(self) -> float:
        return float(self.coefficients[_S])

    def predict_ms(self, shape: StepShape) -> float:
        return float(self.coefficients @ shape.features())

    def as_dict(self) -> dict[str, float]:
        return {name: float(v) for name, v in zip(FEATURES, self.coefficients)}
