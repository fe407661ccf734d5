"""EPD disaggregation for multimodal requests (xLLM §3.3): strategies and a profiler's chooser.

A multimodal request has three phases: **E**ncode (the vision encoder turns
images into embeddings), **P**refill (the language model computes the prompt,
image embeddings included) and **D**ecode. Where they run is the strategy:

==========  ====================================================================
``none``    aggregated: every instance runs E, P and D (vLLM's default)
``EP-D``    E and P together, D apart: encodes never stall decodes, TTFT pays both
``ED-P``    E beside D, P apart: decode instances' spare compute encodes, prefill
            instances run only the language model's prompt work
``E-P-D``   three pools: encodes batch on their own instances, nothing interferes
``E-PD``    E apart, P and D together: encodes leave the language model's instances,
            which prefill and decode as vLLM does (the live router's E -> PD path)
==========  ====================================================================

No split wins everywhere: encode-heavy traffic (large images, short text) wants
the encoder off the decode path; text-heavy traffic with few images makes an
encoder pool idle; few output tokens make decode pools idle. So the
:class:`EPDProfiler` picks, from stage cost models (measured on the engine or
taken from the simulator's deployment), the SLOs and a summary of the traffic:

1. **limits** by binary search: the largest encoder batch whose time fits the
   time left in a decode step under the TPOT SLO (for encoders beside decodes)
   or a share of the TTFT SLO (dedicated encoders), and the largest prefill
   token budget whose step, beside a typical decode batch, stays under the TPOT
   SLO (the budget chunked prefill obeys);
2. **estimate** every (strategy, instance split) candidate's goodput
   analytically (each pool's busy time per request, and whether its steps keep
   the TPOT SLO) and keep the best few per strategy;
3. **measure** those on a short probe workload through a caller-supplied
   ``goodput(candidate)`` (the simulator, or a live probe), and pick the best;
4. **re-pick** (:class:`EPDController`) only when the traffic summary has moved
   by more than a threshold since the last pick, and switch only when the new
   best beats the current choice by a margin: role changes cost drains and
   restarts, so noise must not flip them.

Everything here is pure (no I/O, no clock): the live router and the simulator
call the same code with their own cost models and probes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

Strategy = Literal["none", "EP-D", "ED-P", "E-P-D", "E-PD"]
STRATEGIES: tuple[Strategy, ...] = ("none", "EP-D", "ED-P", "E-P-D", "E-PD")
STRATEGY_CODES: dict[str, int] = {s: k for k, s in enumerate(STRATEGIES)}
"""Numeric codes for result files (values must be numbers): none 0, EP-D 1, ED-P 2, E-P-D 3,
E-PD 4."""
ENCODE_APART: frozenset[Strategy] = frozenset({"E-P-D", "E-PD"})
"""The strategies whose images go to instances that run only the encoder."""


# -- deployment candidates ------------------------------------------------------------------

@dataclass(frozen=True)
class EPDConfig:
    """One strategy with its instance split and the per-step limits its engines obey.

    ``encode``/``prefill``/``decode`` count the instances of each pool; a pool
    serving two phases is counted once, in the field of its first phase
    (``EP-D``: ``encode`` EP instances and ``decode`` D instances; ``ED-P``:
    ``prefill`` P instances and ``decode`` ED instances; ``E-PD``: ``encode`` E instances
    and ``prefill`` PD instances; ``none``: ``encode``).
    ``token_budget``/``encode_batch`` None mean the engine's defaults (vLLM:
    ``max_num_batched_tokens``, encoder budget of as many tokens); the profiler
    sets them, together with ``phase_aware`` (decodes, then running prefills,
    then new encodes only when no prefill waits). ``token_budget`` binds pools
    that decode (it exists to keep their steps within the TPOT SLO); pools that
    only prefill keep the engine's maximum.
    """

    strategy: Strategy
    encode: int = 0
    prefill: int = 0
    decode: int = 0
    token_budget: int | None = None
    encode_batch: int | None = None
    phase_aware: bool = False

    def __post_init__(self) -> None:
        need = {"none": ("encode",), "EP-D": ("encode", "decode"), "ED-P": ("prefill", "decode"),
                "E-P-D": ("encode", "prefill", "decode"), "E-PD": ("encode", "prefill"),
                }[self.strategy]
        for name in ("encode", "prefill", "decode"):
            count = getattr(self, name)
            if (name in need) != (count > 0):
                raise ValueError(f"{self.strategy} needs {' and '.join(need)} instances > 0 "
                                 f"and no others (got {name}={count})")

    @property
    def instances(self) -> int:
        return self.encode + self.prefill + self.decode

    @property
    def encodes_apart(self) -> bool:
        """True when images go to instances that run only the encoder."""
        return self.strategy in ENCODE_APART

    def pools(self) -> list[tuple[str, int]]:
        """``(phases, count)`` per pool, e.g. ``[("EP", 5), ("D", 3)]``."""
        return {"none": [("EPD", self.encode)],
                "EP-D": [("EP", self.encode), ("D", self.decode)],
                "ED-P": [("P", self.prefill), ("ED", self.decode)],
                "E-P-D": [("E", self.encode), ("P", self.prefill), ("D", self.decode)],
                "E-PD": [("E", self.encode), ("PD", self.prefill)],
                }[self.strategy]

    @property
    def label(self) -> str:
        return self.strategy + " " + ":".join(f"{p}{n}" for p, n in self.pools())


def splits(strategy: Strategy, instances: int) -> list[EPDConfig]:
    """Every instance split of ``strategy`` over ``instances`` (at least one per pool)."""
    n = instances
    if strategy == "none":
        return [EPDConfig("none", encode=n)]
    if strategy == "EP-D":
        return [EPDConfig("EP-D", encode=k, decode=n - k) for k in range(1, n)]
    if strategy == "ED-P":
        return [EPDConfig("ED-P", prefill=k, decode=n - k) for k in range(1, n)]
    if strategy == "E-PD":
        return [EPDConfig("E-PD", encode=k, prefill=n - k) for k in range(1, n)]
    return [EPDConfig("E-P-D", encode=e, prefill=p, decode=n - e - p)
            for e in range(1, n - 1) for p in range(1, n - e)]


# -- stage costs -------------------------------------------------------------------------------

EncodeCost = Callable[[int, int], float]
"""Seconds of encoder compute for ``(images, image_tokens_per_image)`` in one batch."""
StepCost = Callable[[int, int, int], float]
"""Seconds of one language-model step for ``(prefill_tokens, decode_seqs, decode_ctx_tokens)``."""


@dataclass(frozen=True)
class StageCosts:
    """Per-stage time models: where they come from is the caller's business.

    ``encode_s`` is encoder compute only (it runs inside a step when the encoder
    shares an instance); ``encode_overhead_s`` is the fixed cost of a step that
    only encodes. ``step_s`` includes the language model's per-step overhead.
    """

    encode_s: EncodeCost
    step_s: StepCost
    encode_overhead_s: float = 0.0


@dataclass(frozen=True)
class LinearCost:
    """``y = c0 + sum(ci * xi)`` fitted by least squares to measured samples; a stand-in for
    ``encode_s``/``step_s`` when only engine measurements exist (no roofline)."""

    coef: tuple[float, ...]

    def __call__(self, *x: float) -> float:
        return self.coef[0] + sum(c * v for c, v in zip(self.coef[1:], x))

    @classmethod
    def fit(cls, samples: Sequence[tuple[Sequence[float], float]]) -> LinearCost:
        """Fit to ``[(features, seconds), ...]`` (normal equations, no numpy: this module is
        imported by the router)."""
        rows = [(1.0, *map(float, x)) for x, _ in samples]
        ys = [float(y) for _, y in samples]
        k = len(rows[0])
        if len(rows) < k:
            raise ValueError(f"need at least {k} samples for {k - 1} features")
        a = [[sum(r[i] * r[j] for r in rows) for j in range(k)] for i in range(k)]
        b = [sum(r[i] * y for r, y in zip(rows, ys)) for i in range(k)]
        return cls(tuple(_solve(a, b)))


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (small, well-posed systems)."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-300:
            raise ValueError("samples do not determine every coefficient")
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]


# -- workload summary ------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkloadSummary:
    """What the profiler needs to know about the traffic (means per request)."""

    rate: float
    image_tokens: float
    images: float
    text_tokens: float
    output_tokens: float

    @property
    def prompt_tokens(self) -> float:
        return self.text_tokens + self.image_tokens

    @property
    def tokens_per_image(self) -> float:
        return self.image_tokens / self.images if self.images > 0 else 0.0

    def shift(self, other: WorkloadSummary) -> float:
        """Largest ``|log(a / b)|`` over the fields (+1 smooths zeros): 0 for equal traffic,
        ~0.41 when one mean grew by half. Rates count too: the best split depends on load."""
        pairs = ((self.rate, other.rate), (self.image_tokens, other.image_tokens),
                 (self.images, other.images), (self.text_tokens, other.text_tokens),
                 (self.output_tokens, other.output_tokens))
        return max(abs(math.log((a + 1.0) / (b + 1.0))) for a, b in pairs)


def summarize_requests(requests: Iterable[tuple[float, int, int, int, int]]) -> WorkloadSummary:
    """Summary of ``(arrival_s, text_tokens, image_tokens, images, output_tokens)`` tuples."""
    items = sorted(requests)
    if not items:
        raise ValueError("no requests to summarize")
    n = len(items)
    span = items[-1][0] - items[0][0]
    return WorkloadSummary(rate=(n - 1) / span if span > 0 else 0.0,
                           image_tokens=sum(r[2] for r in items) / n,
                           images=sum(r[3] for r in items) / n,
                           text_tokens=sum(r[1] for r in items) / n,
                           output_tokens=sum(r[4] for r in items) / n)


# -- (1) limits by binary search ---------------------------------------------------------------

def feasible_search(lo: int, hi: int) -> Generator[int, bool, int]:
    """The binary search of :func:`max_feasible` one probe at a time: it yields each ``x`` to
    try and takes whether it fit, so a caller whose test is a live measurement (an ``await``)
    drives the same search; it returns the answer."""
    if not (yield lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if (yield mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def max_feasible(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    """Largest ``x`` in ``[lo, hi]`` with ``fits(x)``, assuming ``fits`` is monotone
    (true up to a point, false after); ``lo - 1`` when even ``lo`` does not fit."""
    search = feasible_search(lo, hi)
    x = next(search)
    while True:
        try:
            x = search.send(fits(x))
        except StopIteration as done:
            return done.value


@dataclass(frozen=True)
class Limits:
    """Per-step limits the profiler found (see :func:`profile_limits`)."""

    token_budget: int
    """Prefill tokens per step beside ``decode_seqs`` decodes within the TPOT SLO."""
    encode_batch_beside_decode: int
    """Images per step an encoder sharing an instance with decodes may add within the TPOT SLO
    (at least 1: an image cannot be split, so one always goes)."""
    encode_batch_dedicated: int
    """Images per step on an instance that only encodes, within ``encode_ttft_share`` of TTFT."""
    decode_seqs: int
    """The decode batch the limits were computed beside."""


def profile_limits(costs: StageCosts, summary: WorkloadSummary, slo_ttft_s: float,
                   slo_tpot_s: float, max_budget: int = 8192, max_batch: int = 64,
                   headroom: float = 0.9, encode_ttft_share: float = 0.25,
                   decode_seqs: int | None = None) -> Limits:
    """Binary-search the encoder batch and the prefill token budget (xLLM's profiler, step 1).

    Why a TPOT bound on the prefill budget: every prefill chunk rides in a step
    with the instance's decodes, so a step longer than the TPOT SLO makes all of
    them late. The typical decode batch is Little's law on one instance's share
    of decodes at the summary's rate (output tokens x TPOT x rate), at least 1.
    Why a TTFT share for dedicated encoders: batching amortises the step
    overhead but every image in the batch waits for the slowest; a quarter of
    the TTFT SLO leaves the rest to queueing, prefill and transfers.
    """
    if decode_seqs is None:
        decode_seqs = max(1, round(summary.rate * summary.output_tokens * slo_tpot_s))
    ctx = int(decode_seqs * (summary.prompt_tokens + summary.output_tokens / 2))
    limit_s = headroom * slo_tpot_s
    budget = max_feasible(lambda t: costs.step_s(t, decode_seqs, ctx) <= limit_s, 1, max_budget)
    per_image = max(1, round(summary.tokens_per_image))
    spare = limit_s - costs.step_s(0, decode_seqs, ctx)
    beside = max(1, max_feasible(lambda b: costs.encode_s(b, per_image) <= spare, 1, max_batch))
    dedicated = max(1, max_feasible(
        lambda b: costs.encode_overhead_s + costs.encode_s(b, per_image)
        <= encode_ttft_share * slo_ttft_s, 1, max_batch))
    return Limits(max(budget, 1), beside, dedicated, decode_seqs)


# -- (2) analytic goodput estimate -------------------------------------------------------------

def estimate_goodput(config: EPDConfig, costs: StageCosts, summary: WorkloadSummary,
                     limits: Limits, slo_tpot_s: float, utilisation: float = 0.8,
                     max_seqs: int = 256, headroom: float = 0.9) -> float:
    """Requests/s the split sustains with every pool at most ``utilisation`` busy.
    A ranking device to prune splits, not a prediction.

    Per request, each pool's busy seconds: encode (images in batches of the
    pool's encoder batch, plus a step overhead per batch on dedicated
    encoders), prefill (the prompt's marginal step time, plus a step overhead
    per budget-sized chunk where the pool does not decode), decode
    (``output x step(b) / b`` at the largest batch ``b`` whose step stays
    within ``headroom x TPOT`` -- beside a full prefill chunk where the pool
    also prefills, since those steps must keep the SLO too). A pool serving
    several phases adds them; the split's rate is its slowest pool's.
    """
    per_image = max(1, round(summary.tokens_per_image))
    prompt = max(1, round(summary.prompt_tokens))
    out = max(1.0, summary.output_tokens)
    per_seq_ctx = summary.prompt_tokens + out / 2
    base = costs.step_s(0, 0, 0)
    chunks = math.ceil(prompt / max(1, limits.token_budget))
    prefill_marginal = costs.step_s(prompt, 0, 0) - base
    limit_s = headroom * slo_tpot_s
    best = math.inf
    for phases, count in config.pools():
        busy = 0.0
        if "E" in phases and summary.images > 0:
            batch = (limits.encode_batch_beside_decode if "D" in phases
                     else limits.encode_batch_dedicated)
            per_batch = costs.encode_s(batch, per_image)
            if phases == "E":
                per_batch += costs.encode_overhead_s
            busy += summary.images * per_batch / batch
        if "P" in phases:
            busy += prefill_marginal + (0.0 if "D" in phases else chunks * base)
        if "D" in phases:
            chunk = min(prompt, limits.token_budget) if "P" in phases else 0
            b = max(1, max_feasible(
                lambda n: costs.step_s(chunk, n, int(n * per_seq_ctx)) <= limit_s, 1, max_seqs))
            busy += out * costs.step_s(0, b, int(b * per_seq_ctx)) / b
        if busy > 0:
            best = min(best, utilisation * count / busy)
    return 0.0 if best is math.inf else best


# -- (3) choose, (4) re-pick with hysteresis ---------------------------------------------------

@dataclass(frozen=True)
class Choice:
    """The chosen candidate, its measured goodput, and what was compared."""

    config: EPDConfig
    goodput: float
    summary: WorkloadSummary
    limits: Limits
    """The chosen config's profiled limits."""
    measured: tuple[tuple[str, float], ...] = ()
    """``(label, goodput)`` of every candidate measured on the probe."""


@dataclass
class EPDProfiler:
    """Chooses a strategy and split for ``instances`` instances (steps 1-3 of the module doc).

    Limits are profiled per candidate at the *design rate*: the larger of the
    summary's rate and the aggregated deployment's estimated capacity, since
    goodput is a statement about the load a split sustains, and a decode pool of
    ``k`` instances carries ``1/k`` of that load's decodes each (more decodes
    per step leave less room for prefill under the TPOT SLO). ``finalists``
    candidates per strategy (by analytic estimate) are then measured with the
    caller's ``goodput``: the estimate is too coarse to rank strategies whose
    difference is interference, but good enough to drop splits that starve a pool.
    """

    costs: StageCosts
    slo_ttft_s: float
    slo_tpot_s: float
    instances: int
    strategies: Sequence[Strategy] = STRATEGIES
    configs: Sequence[EPDConfig] = ()
    """When given, the only candidates (a live deployment whose instances keep their roles);
    else every split of every strategy over ``instances``."""
    finalists: int = 2
    max_budget: int = 8192
    max_seqs: int = 256
    headroom: float = 0.9

    def limits(self, summary: WorkloadSummary, decoders: int | None = None,
               design_rate: float | None = None) -> Limits:
        """Limits for a split with ``decoders`` decode-capable instances (all when None)."""
        rate = summary.rate if design_rate is None else design_rate
        seqs = max(1, round(rate * summary.output_tokens * self.slo_tpot_s
                            / (decoders or self.instances)))
        # A pool that decodes and prefills gives decodes at most half of a step's time.
        ctx = summary.prompt_tokens + summary.output_tokens / 2
        half = 0.5 * self.headroom * self.slo_tpot_s
        cap = max_feasible(lambda n: self.costs.step_s(0, n, int(n * ctx)) <= half, 1,
                           self.max_seqs)
        seqs = max(1, min(seqs, cap))
        return profile_limits(self.costs, summary, self.slo_ttft_s, self.slo_tpot_s,
                              max_budget=self.max_budget, max_batch=64,
                              headroom=self.headroom, decode_seqs=seqs)

    def design_rate(self, summary: WorkloadSummary) -> float:
        aggregated = EPDConfig("none", encode=self.instances)
        first = self.limits(summary)
        return max(summary.rate, self._estimate(_with_limits(aggregated, first), summary, first))

    def _estimate(self, config: EPDConfig, summary: WorkloadSummary, limits: Limits) -> float:
        return estimate_goodput(config, self.costs, summary, limits, self.slo_tpot_s,
                                max_seqs=self.max_seqs, headroom=self.headroom)

    def configure(self, config: EPDConfig, summary: WorkloadSummary,
                  design_rate: float) -> tuple[EPDConfig, Limits, float]:
        """``config`` with its profiled limits, the limits, and its analytic goodput estimate."""
        decoders = sum(n for phases, n in config.pools() if "D" in phases)
        limits = self.limits(summary, decoders, design_rate)
        tuned = _with_limits(config, limits)
        return tuned, limits, self._estimate(tuned, summary, limits)

    def candidates(self, summary: WorkloadSummary) -> list[tuple[EPDConfig, Limits, float]]:
        """The finalists to measure with their limits and estimates, best estimate first per
        strategy."""
        rate = self.design_rate(summary)
        picked: list[tuple[EPDConfig, Limits, float]] = []
        for strategy in dict.fromkeys(c.strategy for c in self.configs) or self.strategies:
            pool = ([c for c in self.configs if c.strategy == strategy] if self.configs
                    else splits(strategy, self.instances))
            configured = (self.configure(c, summary, rate) for c in pool)
            ranked = sorted(configured, key=lambda t: -t[2])
            picked.extend(ranked[:self.finalists])
        return picked

    def choose(self, summary: WorkloadSummary,
               goodput: Callable[[EPDConfig, float], float]) -> Choice:
        """Measure the finalists with ``goodput(config, estimate)`` (max req/s at the SLO target;
        the estimate is a starting point for its search) and keep the best; ties go to the
        earlier strategy in ``strategies`` (fewer moving parts)."""
        measured = [(c, lim, goodput(c, est)) for c, lim, est in self.candidates(summary)]
        best, limits, value = max(measured, key=lambda t: t[2])
        return Choice(best, value, summary, limits, tuple((c.label, v) for c, _, v in measured))


def _with_limits(config: EPDConfig, limits: Limits) -> EPDConfig:
    """The config with the profiler's step limits, phase-aware batching on: the TPOT-bound token
    budget (pools that decode), and the encoder batch of its encoder pool's kind (beside
    decodes for ``none`` and ``ED-P``, free of them for ``EP-D``, ``E-P-D`` and ``E-PD``)."""
    dedicated = config.strategy in ("EP-D", "E-P-D", "E-PD")
    return EPDConfig(config.strategy, config.encode, config.prefill, config.decode,
                     token_budget=limits.token_budget,
                     encode_batch=(limits.encode_batch_dedicated if dedicated
                                   else limits.encode_batch_beside_decode),
                     phase_aware=True)


@dataclass
class EPDController:
    """Keeps a choice and re-picks it when the traffic moves (step 4).

    Two thresholds make the hysteresis, because a new strategy or split means
    draining and relabelling instances: the profiler runs again only when the
    summary has shifted by more than ``shift_threshold`` (:meth:`WorkloadSummary.shift`)
    from the one the current choice was made for (below it the reference stays,
    so a slow drift adds up until it crosses); and a different split replaces
    the current one only if it beats the current split, re-profiled and
    measured on the new traffic, by more than ``switch_margin`` (relative).
    Staying keeps the split but takes its re-profiled limits: those are step
    settings, cheap to change.
    """

    profiler: EPDProfiler
    shift_threshold: float = 0.25
    switch_margin: float = 0.1
    current: Choice | None = None
    history: list[tuple[str, str]] = field(default_factory=list)
    """``(event, label)``: ``pick``, ``keep`` (shift too small), ``stay`` (not better enough),
    ``switch``."""

    def update(self, summary: WorkloadSummary,
               goodput: Callable[[EPDConfig, float], float]) -> Choice:
        """The config to run for traffic like ``summary``."""
        current = self.current
        if current is None:
            self.current = self.profiler.choose(summary, goodput)
            self.history.append(("pick", self.current.config.label))
            return self.current
        if summary.shift(current.summary) <= self.shift_threshold:
            self.history.append(("keep", current.config.label))
            return current
        best = self.profiler.choose(summary, goodput)
        split = EPDConfig(current.config.strategy, current.config.encode, current.config.prefill,
                          current.config.decode)
        same, limits, estimate = self.profiler.configure(split, summary,
                                                         self.profiler.design_rate(summary))
        measured = dict(best.measured)
        incumbent = measured.get(same.label)
        if incumbent is None:
            incumbent = goodput(same, estimate)
        better = best.goodput > incumbent * (1.0 + self.switch_margin)
        if best.config.label != same.label and better:
            self.current = best
            self.history.append(("switch", best.config.label))
        else:
            self.current = Choice(same, incumbent, summary, limits, best.measured)
            self.history.append(("stay", same.label))
        return self.current
