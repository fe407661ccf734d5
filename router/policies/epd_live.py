"""What the live router's EPD choice ranges over, and the traffic it re-picks on.

A live deployment cannot move an instance between the vision encoder and the
language model: vLLM's ``--mm-encoder-only`` is a start-up flag. So the choice
the router makes at run time is whether a model's images go through its encode
instances first (E encodes, the language-model instance loads E's output) or stay
with the language-model instance that serves the request (it encodes in its own
steps). Which language-model instance prefills and which decodes is the routing
policy's business: under a PD policy (``static_pd``/``dynamic_pd``) over instances
labelled ``prefill`` and ``decode`` the two paths are ``EP-D`` and ``E-P-D``, else the
language-model instances count as one pool and the paths are ``none`` and ``E-PD``.

Pure: :mod:`router.server.epd_profile` feeds it measurements and requests.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from router.policies.epd import (
    EPDConfig,
    LinearCost,
    StageCosts,
    WorkloadSummary,
    summarize_requests,
)


def deployment_configs(encoders: int, generators: int, decoders: int = 0
                       ) -> tuple[EPDConfig, ...]:
    """The configs a deployment of ``encoders`` encode-only and ``generators`` language-model
    instances can run without restarting any: images with the language model first (ties
    go to it), then through the encoders. ``decoders`` of the generators only decode (a PD
    policy's P/D split; 0: one aggregated pool)."""
    if generators < 1:
        return ()
    prefillers = generators - decoders
    if decoders > 0 and prefillers > 0:
        kept = EPDConfig("EP-D", encode=prefillers, decode=decoders)
        apart = EPDConfig("E-P-D", encode=encoders, prefill=prefillers, decode=decoders) \
            if encoders > 0 else None
    else:
        kept = EPDConfig("none", encode=generators)
        apart = EPDConfig("E-PD", encode=encoders, prefill=generators) if encoders > 0 else None
    return (kept,) if apart is None else (kept, apart)


@dataclass
class TrafficWindow:
    """The last ``size`` image requests, and whether ``size`` new ones came since the last
    summary: the controller re-picks at most once per window of traffic."""

    size: int = 32
    _items: deque[tuple[float, int, int, int, int]] = field(init=False)
    _new: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.size < 2:
            raise ValueError("a traffic window needs at least 2 requests (a rate needs a span)")
        self._items = deque(maxlen=self.size)

    def add(self, arrival_s: float, text_tokens: int, image_tokens: int, images: int,
            output_tokens: int) -> None:
        self._items.append((arrival_s, text_tokens, image_tokens, images, output_tokens))
        self._new += 1

    @property
    def due(self) -> bool:
        return self._new >= self.size

    def take(self) -> WorkloadSummary:
        """The summary of the window; counting towards the next one starts again."""
        self._new = 0
        return summarize_requests(self._items)


@dataclass
class Calibration:
    """Measured goodput over the analytic estimate, per config, from the probe workload.

    The analytic estimate knows stage compute (what the profile measured) but not what a
    path adds around it: E -> PD's extra request, the encoder output's trip through the
    connector, the API servers' work. Re-picks on live traffic cannot run the probe again,
    so they scale each config's estimate for the new traffic by its factor: the estimate
    follows the traffic's shape, the factor keeps what the probe measured.
    """

    factors: dict[str, float] = field(default_factory=dict)

    def measured(self, values: dict[str, float]) -> Callable[[EPDConfig, float], float]:
        """A ``goodput(config, estimate)`` for the first pick: the probe's measurement, the
        factor recorded on the way."""
        def goodput(config: EPDConfig, estimate: float) -> float:
            value = values[config.label]
            self.factors[config.label] = value / estimate if estimate > 0 else 0.0
            return value
        return goodput

    def __call__(self, config: EPDConfig, estimate: float) -> float:
        """The calibrated estimate (a config the probe never measured keeps its estimate)."""
        return estimate * self.factors.get(config.label, 1.0)


@dataclass
class Measured:
    """What one live profile of a model measured (shown at ``/admin/epd``): encode samples
    are ``(images sent at once, seconds until all came back)``, step samples ``(prefill
    tokens, decode sequences, seconds of one step)``."""

    encoder: str
    generator: str
    tokens_per_image: int
    text_tokens: int
    encode_batch: int
    token_budget: int
    encode_samples: list[tuple[int, float]] = field(default_factory=list)
    step_samples: list[tuple[int, int, float]] = field(default_factory=list)
    probe_goodput: dict[str, float] = field(default_factory=dict)
    probe_attainment: dict[str, float] = field(default_factory=dict)
    probe_concurrency: dict[str, int] = field(default_factory=dict)  # the goodput's level


def fitted_costs(measured: Measured) -> StageCosts:
    """Stage costs from the profile's timings, clamped at zero (noise can make a slope
    negative). Encode time per image scales with its tokens relative to the probe image."""
    encode = LinearCost.fit([((b,), s) for b, s in measured.encode_samples])
    step = LinearCost.fit([((t, n), s) for t, n, s in measured.step_samples])
    per_image_s = max(encode.coef[1], 0.0)
    probe_tokens = max(1, measured.tokens_per_image)
    return StageCosts(
        encode_s=lambda images, tokens: per_image_s * images * tokens / probe_tokens,
        step_s=lambda prefill, seqs, ctx: max(step(prefill, seqs), 1e-6),
        encode_overhead_s=max(encode.coef[0], 0.0))
