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

A line is not the whole story where kernels work in tiles of query rows. On the 2-core
AVX2 EPYC host (float32, 2026-12-06) a decode step without prefill cost, by its query
rows ``R`` (decoding requests plus drafts), about 52 ms at R = 1, 63 at 2, 45-49 at 3-6,
56 at 7 and then about 3 ms more per row: three to five drafts at one request were
cheaper than none, and one draft the dearest. GPUs pad a step's tokens to captured
graph sizes, the same kind of step. ``RowResiduals`` learns, per ``R``, how far
decode-only steps fall from the line; the length rule prices a step's drafts with it
(``policy.choose_lengths``, ``rows_residual_ms``).
"""

from __future__ import annotations

from collections.abc import Callable
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


class RowResiduals:
    """Decode-only steps' time off the cost line, by query rows (decoding requests plus
    drafts).

    Kept as each row count's decayed step times and features, and compared with the line
    when read: a residual taken when the step was seen would hold the line of that moment,
    and where the line cannot yet tell its terms apart (one request, always the same
    drafts) it moves a lot, leaving old rows priced against a line long gone.

    A row count seen a few times is shrunk, by ``prior_steps`` pseudo-steps, towards all
    decode steps' residual, not towards the line: the line also fits prefill steps and
    can miss decode steps by tens of ms, and a row count priced at the line's error would
    never be chosen and so never measured."""

    def __init__(self, line: VerifyCostModel, window_steps: int = 256,
                 prior_steps: float = 4.0) -> None:
        self._line = line
        self._decay = 1.0 - 1.0 / max(window_steps, 2)
        self._prior = prior_steps
        self._steps = 0
        # rows -> [decayed steps, decayed ms, decayed features..., the step decayed to];
        # ALL_ROWS: every decode step's
        self._sums: dict[int, list[float]] = {}

    def observe(self, shape: StepShape, measured_ms: float) -> None:
        rows = shape.decode_requests + shape.draft_tokens
        if shape.prefill_tokens or rows <= 0 or not np.isfinite(measured_ms):
            return
        self._steps += 1
        features = shape.features().tolist()
        for key in (rows, ALL_ROWS):
            sums = self._aged(key)
            sums[0] += 1.0
            sums[1] += measured_ms
            for i, value in enumerate(features):
                sums[2 + i] += value

    def residual_ms(self, rows: int) -> float:
        return self.pricer()(rows)

    def pricer(self) -> Callable[[int], float]:
        """``residual_ms`` with the line and the pooled residual of this moment taken once:
        the length rule asks for every row count a step could have (up to 256 at c=32,
        0.65 ms a step when each call worked them out afresh). Sums are decayed on the fly,
        not in place: the residual is a ratio of sums, each linear in them."""
        if ALL_ROWS not in self._sums:
            return lambda rows: 0.0
        t0, t1, t2, t3, t4 = (float(value) for value in self._line.coefficients)
        decay, now, prior, table = self._decay, self._steps, self._prior, self._sums

        def off_line(sums: list[float]) -> float:
            return sums[1] - (t0 * sums[2] + t1 * sums[3] + t2 * sums[4] + t3 * sums[5]
                              + t4 * sums[6])
        pooled = table[ALL_ROWS]
        typical = off_line(pooled) / pooled[0] if pooled[0] > 0 else 0.0

        def residual(rows: int) -> float:
            sums = table.get(rows)
            if sums is None:
                return typical
            factor = decay ** (now - sums[-1])
            return (factor * off_line(sums) + prior * typical) / (factor * sums[0] + prior)
        return residual

    def _aged(self, key: int) -> list[float]:
        """A row count's sums decayed to now, in place: each is decayed when it is next
        seen, not every step, so a step costs two updates whatever the batch (``pricer``
        decays the others on the fly)."""
        sums = self._sums.get(key)
        if sums is None:
            sums = self._sums[key] = [0.0] * (2 + len(FEATURES)) + [float(self._steps)]
        elif self._steps > sums[-1]:
            factor = self._decay ** (self._steps - sums[-1])
            for i in range(len(sums) - 1):
                sums[i] *= factor
            sums[-1] = float(self._steps)
        return sums

    def as_dict(self) -> dict[str, float]:
        residual = self.pricer()
        return {str(rows): round(residual(rows), 2) for rows in sorted(self._sums)
                if rows != ALL_ROWS}


ALL_ROWS = 0  # RowResiduals' key for every decode step (a real one has at least one row)
