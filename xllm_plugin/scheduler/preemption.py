"""Which offline requests to preempt so that waiting online work can start (paper §3.1).

Pure code over a minimal view of requests, so the rule is testable without an engine.

Rule: when online requests wait and the engine lacks run slots or free KV blocks for
them, preempt running *offline* requests, newest arrival first (least work thrown
away), until ``slots_needed`` slots and ``blocks_needed`` blocks are free, or no
offline request is left. Online requests are never preempted here; vLLM's own
out-of-memory preemption still applies to them as a last resort.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

R = TypeVar("R")


@dataclass(frozen=True)
class Shortfall:
    """What the waiting online requests lack right now."""

    slots: int
    blocks: int

    @property
    def any(self) -> bool:
        return self.slots > 0 or self.blocks > 0


def shortfall(online_waiting_blocks: Sequence[int], running: int, max_running: int,
              free_blocks: int) -> Shortfall:
    """Slots and blocks missing to admit every waiting online request (by its prompt's blocks)."""
    return Shortfall(slots=max(0, running + len(online_waiting_blocks) - max_running),
                     blocks=max(0, sum(online_waiting_blocks) - free_blocks))


@dataclass
class OfflineVictimPicker(Generic[R]):
    """Chooses victims among running requests, given accessors for the facts it needs."""

    is_offline: Callable[[R], bool]
    arrival_time: Callable[[R], float]
    blocks_held: Callable[[R], int]

    def pick(self, running: Sequence[R], need: Shortfall) -> list[R]:
        victims: list[R] = []
        slots, blocks = need.slots, need.blocks
        for request in sorted((r for r in running if self.is_offline(r)),
                              key=self.arrival_time, reverse=True):
            if slots <= 0 and blocks <= 0:
                break
            victims.append(request)
            slots -= 1
            blocks -= self.blocks_held(request)
        return victims
