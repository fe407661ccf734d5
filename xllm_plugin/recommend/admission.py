"""First-come, first-served admission of beam searches by the engine resources they pin.

A beam search keeps ``beam_width`` sessions alive in the engine between steps,
and each pins KV blocks while it waits for its next token. If more beams were
admitted than the engine can run (``max_num_seqs``) or hold (KV blocks), every
search would wait for sessions that cannot be scheduled: a deadlock. Searches
therefore reserve their whole need up front, in arrival order, and queue here
instead of inside the engine.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class AdmissionError(ValueError):
    """A single request needs more than the whole capacity; it could never run."""


class Admission:
    """Two counted resources (beams, KV blocks) granted all-or-nothing in FIFO order."""

    def __init__(self, beams: int, blocks: int | None) -> None:
        self.capacity = (beams, blocks)
        self._free_beams = beams
        self._free_blocks = blocks
        self._waiters: deque[tuple[int, int, asyncio.Future[None]]] = deque()

    @property
    def in_use(self) -> tuple[int, int | None]:
        beams, blocks = self.capacity
        return (beams - self._free_beams,
                None if blocks is None or self._free_blocks is None else blocks - self._free_blocks)

    def _fits(self, beams: int, blocks: int) -> bool:
        return beams <= self._free_beams and (self._free_blocks is None or blocks <= self._free_blocks)

    def _take(self, beams: int, blocks: int) -> None:
        self._free_beams -= beams
        if self._free_blocks is not None:
            self._free_blocks -= blocks

    def _wake(self) -> None:
        while self._waiters:
            beams, blocks, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if not self._fits(beams, blocks):
                return
            self._waiters.popleft()
            self._take(beams, blocks)
            future.set_result(None)

    def release(self, beams: int, blocks: int) -> None:
        self._free_beams += beams
        if self._free_blocks is not None:
            self._free_blocks += blocks
        self._wake()

    @asynccontextmanager
    async def reserve(self, beams: int, blocks: int) -> AsyncIterator[None]:
        """Hold ``beams`` and ``blocks`` for the body; waits behind earlier requests."""
        max_beams, max_blocks = self.capacity
        if beams > max_beams or (max_blocks is not None and blocks > max_blocks):
            raise AdmissionError(
                f"request needs {beams} beams and {blocks} KV blocks; the engine has "
                f"{max_beams} run slots (max_num_seqs / xllm.recommend.max_live_beams) and "
                f"{max_blocks} KV blocks")
        if not self._waiters and self._fits(beams, blocks):
            self._take(beams, blocks)
        else:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((beams, blocks, future))
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self.release(beams, blocks)  # granted while being cancelled
                else:
                    future.cancel()
                    self._wake()  # a cancelled head must not block those behind it
                raise
        try:
            yield
        finally:
            self.release(beams, blocks)
