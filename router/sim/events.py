"""Simulated time: a clock and a priority queue of timed events.

Events at the same time run in the order they were scheduled (a sequence
number breaks ties), which keeps every run deterministic.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any


class EventQueue:
    """A min-heap of ``(time, seq, handler, payload)``; ``now`` is the last popped time."""

    __slots__ = ("_heap", "_seq", "now")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = 0
        self.now = 0.0

    def schedule(self, at: float, handler: Callable[[Any], None], payload: Any = None) -> None:
        """Run ``handler(payload)`` at simulated time ``at`` (never before now)."""
        self._seq += 1
        heapq.heappush(self._heap, (max(at, self.now), self._seq, handler, payload))

    def next_time(self) -> float:
        """Time of the earliest pending event, or +inf when none is pending."""
        return self._heap[0][0] if self._heap else float("inf")

    def pop_and_run(self) -> None:
        """Advance the clock to the earliest event and run it."""
        at, _, handler, payload = heapq.heappop(self._heap)
        self.now = at
        handler(payload)

    def __len__(self) -> int:
        return len(self._heap)
