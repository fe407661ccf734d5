"""Per-instance latency predictors: TTFT(L, queue) and TPOT(batch, tokens), learned online.

Pure code (no I/O, no clock): a driver or a policy feeds measured samples, the
predictor answers in milliseconds. Both are small linear models whose features
follow how a continuous-batching engine spends its time:

**TTFT** (arrival to the end of the request's prefill on one instance)::

    ttft_ms = a + b * (L + Q) + c * (L^2 + Q * M) / 1000

with ``L`` the request's uncached prompt tokens, ``Q`` the prefill tokens
already queued on the instance (they run first) and ``M`` the typical prompt
length: a queued token costs what a token of a typical prompt costs,
``b + c * M / 1000``; ``c`` is attention's quadratic share of a long prefill.

**TPOT** (mean time between output tokens on one decode instance)::

    tpot_ms = d + e * batch + f * tokens / 1000

with ``batch`` the sequences the instance decodes and ``tokens`` their context
(KV read per step).

Fitting: ridge regression toward a prior (the profile taken when an instance
registers, or the generic default), with non-negative coefficients (every term
is a cost), over exponentially forgotten sufficient statistics, so the model
follows an instance whose speed drifts without storing samples. Both are
tested on measured SmolLM2 CPU data (``tests/router/test_predictors.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PredictorSettings:
    """How fast the predictors learn; every number documented here, nowhere else."""

    prior_weight: float = 2.0
    """Strength of the prior, in equivalent samples at the features' typical scale."""
    forgetting: float = 0.995
    """Each new sample multiplies the weight of older ones by this (half-life ~140 samples)."""
    ttft_prior: tuple[float, float, float] = (30.0, 0.05, 0.0)
    """(a ms, b ms/token, c ms per 1000 tokens^2) before any measurement."""
    tpot_prior: tuple[float, float, float] = (20.0, 0.0, 0.0)
    """(d ms, e ms/sequence, f ms per 1000 context tokens) before any measurement."""


class OnlineRidge:
    """``y ~ w . x`` with ``w >= 0``, pulled toward ``prior`` and forgetting old samples.

    Minimises ``sum_k g^(n-k) (y_k - w.x_k)^2 + lam * sum_j (s_j (w_j - w0_j))^2``
    where ``s_j`` is feature ``j``'s typical magnitude, so ``lam`` reads as a
    number of pseudo-samples. Coefficients forced negative are pinned to zero
    and the rest re-solved (a small active-set loop: at most one pass per feature).
    """

    def __init__(self, prior: Sequence[float], scales: Sequence[float], prior_weight: float,
                 forgetting: float) -> None:
        n = len(prior)
        if len(scales) != n:
            raise ValueError("prior and scales must have the same length")
        self.prior = np.asarray(prior, dtype=float)
        self._reg = prior_weight * np.diag(np.square(np.asarray(scales, dtype=float)))
        self.forgetting = forgetting
        self._xtx = np.zeros((n, n))
        self._xty = np.zeros(n)
        self.samples = 0
        self._w: np.ndarray | None = self.prior.copy()
        self._wf: tuple[float, ...] | None = None

    def reset_prior(self, prior: Sequence[float]) -> None:
        self.prior = np.asarray(prior, dtype=float)
        self._w = None
        self._wf = None

    def add(self, x: Sequence[float], y: float, weight: float = 1.0) -> None:
        if not math.isfinite(y) or y < 0:
            return
        v = np.asarray(x, dtype=float)
        self._xtx *= self.forgetting
        self._xty *= self.forgetting
        self._xtx += weight * np.outer(v, v)
        self._xty += weight * y * v
        self.samples += 1
        self._w = None
        self._wf = None

    @property
    def coefficients(self) -> np.ndarray:
        if self._w is None:
            self._w = self._solve()
        return self._w

    def _solve(self) -> np.ndarray:
        a = self._xtx + self._reg
        b = self._xty + self._reg @ self.prior
        free = np.ones(len(b), dtype=bool)
        w = np.zeros(len(b))
        for _ in range(len(b)):
            idx = np.flatnonzero(free)
            if idx.size == 0:
                break
            sol = np.linalg.solve(a[np.ix_(idx, idx)], b[idx])
            w[:] = 0.0
            w[idx] = sol
            negative = idx[sol < 0]
            if negative.size == 0:
                break
            free[negative] = False
        return np.maximum(w, 0.0)

    def predict(self, x: Sequence[float]) -> float:
        if self._wf is None:
            self._wf = tuple(float(v) for v in self.coefficients)
        return sum(w * v for w, v in zip(self._wf, x))


class TTFTPredictor:
    """``ttft_ms = a + b (L + Q) + c L^2 / 1000`` for one instance (see the module docstring)."""

    SCALES = (1.0, 2000.0, 4000.0)  # typical |feature|: 1, L+Q ~ 2k tokens, L^2/1e3 ~ 4k

    def __init__(self, settings: PredictorSettings | None = None) -> None:
        s = settings or PredictorSettings()
        self.model = OnlineRidge(s.ttft_prior, self.SCALES, s.prior_weight, s.forgetting)

    @staticmethod
    def features(prompt_tokens: float, queued_tokens: float,
                 mean_prompt: float | None = None) -> tuple[float, float, float]:
        m = prompt_tokens if mean_prompt is None else mean_prompt
        return (1.0, prompt_tokens + queued_tokens,
                (prompt_tokens * prompt_tokens + queued_tokens * m) / 1000.0)

    def predict_ms(self, prompt_tokens: float, queued_tokens: float = 0.0,
                   mean_prompt: float | None = None) -> float:
        return self.model.predict(self.features(prompt_tokens, queued_tokens, mean_prompt))

    def observe(self, prompt_tokens: float, queued_tokens: float, ttft_ms: float,
                mean_prompt: float | None = None) -> None:
        self.model.add(self.features(prompt_tokens, queued_tokens, mean_prompt), ttft_ms)

    def fit_profile(self, samples: Sequence[tuple[int, float]]) -> None:
        """Set the prior from an isolated-request profile ``[(prompt_tokens, ttft_ms), ...]``.

        Profiles have ``Q = 0``; with fewer than three lengths the quadratic
        term stays at the prior. The profile samples also count as data.
        """
        if not samples:
            return
        xs = np.array([self.features(p, 0.0) for p, _ in samples])
        ys = np.maximum(np.array([t for _, t in samples], dtype=float), 1e-3)
        # Relative errors: a short prompt's 60 ms matters as much as a long one's 1.5 s.
        w = ys.mean() / ys
        cols = 3 if len({p for p, _ in samples}) >= 3 else 2
        coef, *_ = np.linalg.lstsq(xs[:, :cols] * w[:, None], ys * w, rcond=None)
        prior = list(self.model.prior)
        prior[:cols] = [max(0.0, float(v)) for v in coef]
        if cols == 3 and coef[2] < 0:  # a concave fit is noise: refit without it
            coef2, *_ = np.linalg.lstsq(xs[:, :2] * w[:, None], ys * w, rcond=None)
            prior = [max(0.0, float(coef2[0])), max(0.0, float(coef2[1])), 0.0]
        self.model.reset_prior(prior)
        for x, y, weight in zip(xs, ys, w * w):
            self.model.add(x, float(y), float(weight))

    def per_token_ms(self, mean_prompt: float = 0.0) -> float:
        """Cost of one queued prefill token of a typical prompt: ``b + c * M / 1000``."""
        _, b, c = self.model.coefficients
        return float(b + c * mean_prompt / 1000.0)


class TPOTPredictor:
    """``tpot_ms = d + e batch + f tokens / 1000`` for one decode instance."""

    SCALES = (1.0, 16.0, 16.0)  # typical batch ~16 sequences, ~16k context tokens

    def __init__(self, settings: PredictorSettings | None = None) -> None:
        s = settings or PredictorSettings()
        self.model = OnlineRidge(s.tpot_prior, self.SCALES, s.prior_weight, s.forgetting)

    @staticmethod
    def features(batch: float, tokens: float) -> tuple[float, float, float]:
        return (1.0, float(batch), tokens / 1000.0)

    def predict_ms(self, batch: float, tokens: float) -> float:
        return self.model.predict(self.features(batch, tokens))

    def observe(self, batch: float, tokens: float, tpot_ms: float) -> None:
        self.model.add(self.features(batch, tokens), tpot_ms)

    def fit_profile(self, samples: Sequence[tuple[int, int, float]]) -> None:
        """Set the intercept from isolated decodes ``[(batch, tokens, tpot_ms), ...]``."""
        if not samples:
            return
        prior = list(self.model.prior)
        slope = prior[1] * np.mean([b for b, _, _ in samples]) + prior[2] * np.mean(
            [t for _, t, _ in samples]) / 1000.0
        prior[0] = max(0.0, float(np.median([t for _, _, t in samples])) - slope)
        self.model.reset_prior(prior)
        for batch, tokens, tpot in samples:
            self.observe(batch, tokens, tpot)

    def max_batch(self, tokens_per_seq: float, budget_ms: float, limit: int = 4096) -> int:
        """Largest batch whose predicted TPOT stays within ``budget_ms`` (0 if none)."""
        d, e, f = self.model.coefficients
        per_seq = e + f * tokens_per_seq / 1000.0
        if d > budget_ms:
            return 0
        if per_seq <= 0:
            return limit
        return int(min(limit, (budget_ms - d) // per_seq))


class RateMeter:
    """An exponentially decayed rate (units per second) on the driver's clock.

    ``add(now, amount)`` records work; ``rate(now)`` is the amount per second
    over roughly the last ``window_s`` seconds. Time comes from the caller
    (``ClusterView.now``), so the meter is pure and works in simulated time.
    """

    __slots__ = ("window_s", "_mass", "_at")

    def __init__(self, window_s: float) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.window_s = window_s
        self._mass = 0.0
        self._at: float | None = None

    def _decay(self, now: float) -> None:
        if self._at is not None and now > self._at:
            self._mass *= math.exp(-(now - self._at) / self.window_s)
        if self._at is None or now > self._at:
            self._at = now

    def add(self, now: float, amount: float) -> None:
        self._decay(now)
        self._mass += amount

    def rate(self, now: float) -> float:
        self._decay(now)
        return self._mass / self.window_s


class Ewma:
    """An exponentially weighted mean over samples (not time); None until the first sample."""

    __slots__ = ("alpha", "value")

    def __init__(self, alpha: float, value: float | None = None) -> None:
        self.alpha = alpha
        self.value = value

    def add(self, x: float) -> float:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)
        return self.value


class RecentQuantile:
    """A quantile of the last ``size`` samples (recomputed at most every ``every`` samples)."""

    __slots__ = ("q", "every", "_values", "_since", "_cached")

    def __init__(self, q: float, size: int = 512, every: int = 32) -> None:
        from collections import deque

        self.q = q
        self.every = every
        self._values: deque[float] = deque(maxlen=size)
        self._since = 0
        self._cached: float | None = None

    def add(self, x: float) -> None:
        self._values.append(x)
        self._since += 1
        if self._cached is None or self._since >= self.every:
            self._cached = None

    @property
    def value(self) -> float | None:
        if self._cached is None and self._values:
            self._cached = float(np.quantile(np.fromiter(self._values, float), self.q))
            self._since = 0
        return self._cached
