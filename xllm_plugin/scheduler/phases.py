"""Phase-aware batching (paper §3.3): which work a step serves first.

vLLM spends a step's token budget in ``running`` order, then admits waiting requests.
When text and multimodal requests share an instance, three kinds of work compete:
decodes (one token each, every step late shows in TPOT), prefill chunks of requests
already admitted (their TTFT clock is running), and the encoder passes of new
multimodal requests (long, and every other request in the step waits for them).
The order is decodes, then partially computed prefills, then encodes; a new request
whose images still need the encoder waits while an admitted prefill is unfinished.

That wait is capped per request (``max_hold_steps``): without the cap, a steady
stream of text prompts, each leaving a prefill unfinished, would starve image
requests. The rules are pure; ``XLLMScheduler`` applies them to vLLM's queues.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

T = TypeVar("T")


def running_rank(offline: bool, num_computed_tokens: int, num_prompt_tokens: int
                 ) -> tuple[int, int]:
    """Sort key of a running request: online before offline (class priority stays
    outermost), and within a class decodes before unfinished prefills."""
    prefilling = num_computed_tokens < num_prompt_tokens
    return int(offline), int(prefilling)


class EncodeHold:
    """Picks the waiting requests whose encoder work sits out this step.

    Counts, per waiting request, the steps it has been held; a request held
    ``max_hold_steps`` times is not held again. Requests that left the queue are
    forgotten at the next call.
    """

    def __init__(self, max_hold_steps: int) -> None:
        if max_hold_steps < 0:
            raise ValueError("max_hold_steps must be >= 0")
        self.max_hold_steps = max_hold_steps
        self._held_steps: dict[Hashable, int] = {}
        self.holds = 0  # request-steps held, for the status feed
        self.released_by_cap = 0  # requests let through because they waited long enough

    def select(self, waiting: Iterable[T], *, prefill_pending: bool,
               needs_encode: Callable[[T], bool], key: Callable[[T], Hashable]) -> list[T]:
        """The requests of ``waiting`` to hold back this step (queue order kept)."""
        held: list[T] = []
        counts: dict[Hashable, int] = {}
        for request in waiting:
            if not needs_encode(request):
                continue
            request_key = key(request)
            steps = self._held_steps.get(request_key, 0)
            if prefill_pending and steps < self.max_hold_steps:
                held.append(request)
                steps += 1
            elif prefill_pending and steps == self.max_hold_steps:
                self.released_by_cap += 1
                steps += 1  # counted once
            counts[request_key] = steps
        self._held_steps = counts
        self.holds += len(held)
        return held
