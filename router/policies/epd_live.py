"""What the live router's EPD choice ranges over, and the traffic it re-picks on.

A live deployment cannot move an instance between the vision encoder and the
language model: vLLM's ``--mm-encoder-only`` is a start-up flag. So the choice
the router makes at run time is whether a model's images go through its encode
instances first (``E-PD``: E encodes, the language-model instance loads E's
output) or stay with the language-model instance that serves the request
(``none``: it encodes in its own steps). How the language-model instances split
prefill from decode is the PD policy's business (``static_pd``/``dynamic_pd``),
so here they count as one pool.

Pure: :mod:`router.server.epd_profile` feeds it measurements and requests.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from router.policies.epd import EPDConfig, WorkloadSummary, summarize_requests


def deployment_configs(encoders: int, generators: int) -> tuple[EPDConfig, ...]:
    """The configs a deployment of ``encoders`` encode-only and ``generators`` language-model
    instances can run without restarting any: aggregated first (ties go to it), then E-PD."""
    if generators < 1:
        return ()
    aggregated = EPDConfig("none", encode=generators)
    if encoders < 1:
        return (aggregated,)
    return aggregated, EPDConfig("E-PD", encode=encoders, prefill=generators)


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
