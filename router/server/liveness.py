"""Telling a dead instance from a slow one while its streams are silent.

A process killed with SIGKILL closes its sockets only at the end of its exit,
after the kernel has torn down its memory; on a loaded host that took 0.1-1.6 s
in the chaos benchmark, and until then the router's reads just wait. Meanwhile
the kernel still completes TCP handshakes on the dead server's listening
socket, so a new request connects and is never answered.

So when a stream has been silent for a few TPOTs, the router asks the instance
``GET /health``. An engine that is merely busy (a long prefill chunk, a slow
step) still answers: its HTTP server is a separate process from the engine
core. No answer within the probe timeout, or not 200, means its in-flight
streams should move now rather than after the silence limit. A hung engine
core is the other case: its HTTP server still answers /health (in 5 ms with the
EngineCore stopped, measured), so the probe also reads vLLM's token counters
from /metrics, and an engine that computed no token while a stream stayed
silent for long enough (``--liveness-stuck-s``) is "stuck". The timeout is
learnt per instance (``LongestPause``, ``probe_timeout_s``): how fast a live
instance answers depends on the host. Every stream of one instance shares one
probe, so a kill that silences 30 streams costs one request, not 30.

Measured (benchmarks/results/chaos_freeze*.md, two CPU cores): a frozen engine
(SIGSTOP, sockets open) had its streams moved after p50 0.34 s with probes
(engines pinned to their cores; 3.75 s while a frozen engine's timed-out scrape
still counted as a pause, see ``InstanceLoad.health_answered``) and 6.2 s
without (scrapes failed it; engines not pinned), and without probes requests
waiting for a first byte sat out the 120 s first-byte timeout. On that starved
host the learnt timeout is long enough that a kill -9 is still seen first by
the closing connection (benchmarks/results/chaos.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import aiohttp

from router.server.vllm_metrics import sum_vllm_metrics

# Shortest silence that triggers a probe, whatever the TPOT: token chunks of a
# healthy stream may bunch up (the relay reads whatever has arrived).
MIN_PROBE_AFTER_S = 0.05
# A finished probe's answer is reused this long: streams that fall silent together
# (every stream of a killed instance) wait on one answer, not one probe each.
RESULT_REUSE_S = 0.05

T = TypeVar("T")


class Silence(Exception):
    """A stream stayed silent: ``kind`` is "idle", "stall" (TPOT-based limit), "dead" (a
    failed probe) or "stuck" (a live HTTP server, an engine that computes nothing)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def probe_after_s(tpot_ms: Sequence[float], multiple: float) -> float | None:
    """Silence after which the instance is probed: ``multiple`` x its median TPOT.

    None (no probing) when probing is off (``multiple`` 0) or no TPOT has been
    observed yet: the router cannot tell a silence from a normal gap without one.
    """
    if multiple <= 0 or not tpot_ms:
        return None
    median_s = sorted(tpot_ms)[len(tpot_ms) // 2] / 1000
    return max(MIN_PROBE_AFTER_S, multiple * median_s)


@dataclass(slots=True)
class LongestPause:
    """The longest pause a live instance has recently come back from: a /health round trip
    or a silence between two chunks of one stream that no /health answer broke
    (``InstanceLoad.observe_silence``). A maximum that halves every
    ``half_life_s``, so one freak pause is remembered for minutes, not for ever.

    Why it exists: on a starved host (two CPU cores shared by two engines, their HTTP
    servers, the router and the client) live engines went silent for over a second with
    /health unanswered, and a fixed 0.25 s probe timeout failed both engines of the chaos
    benchmark with no kill at all. A probe is only conclusive when it waits longer than
    the instance has been seen to pause and come back.
    """

    half_life_s: float = 600.0
    seconds: float = 0.0
    at: float = 0.0  # time.monotonic() of ``seconds``

    def value(self, now: float) -> float:
        return self.seconds * 0.5 ** (max(0.0, now - self.at) / self.half_life_s)

    def observe(self, pause_s: float, now: float) -> None:
        if pause_s >= self.value(now):
            self.seconds, self.at = pause_s, now


def probe_timeout_s(longest_pause_s: float, floor_s: float, margin: float = 2.0) -> float:
    """How long a probe waits: ``margin`` x the instance's longest recent pause, at least
    ``floor_s``."""
    return max(floor_s, margin * longest_pause_s)


# vLLM counters that grow with every engine step that computes tokens: a hung engine core
# behind a live HTTP server (which still answers /health) stops them.
PROGRESS_METRICS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")


def engine_progress(metrics_text: str) -> float | None:
    """Sum of the PROGRESS_METRICS over their label sets; None when the engine has none."""
    totals = sum_vllm_metrics(metrics_text, PROGRESS_METRICS)
    return sum(totals.values()) if totals else None


@dataclass(frozen=True, slots=True)
class ProbeResult:
    alive: bool
    detail: str
    seconds: float
    finished_at: float  # time.monotonic()
    progress: float | None = None  # engine_progress() of its /metrics, when it answered


class LivenessProber:
    """One ``/health`` probe at a time per instance, shared by every stream that asks."""

    def __init__(self, session: Callable[[], aiohttp.ClientSession | None],
                 headers: dict[str, str],
                 on_result: Callable[[str, ProbeResult], None] | None = None) -> None:
        self._session = session
        self._headers = headers
        self._on_result = on_result
        self._running: dict[str, asyncio.Task[ProbeResult]] = {}

    def probe(self, instance_id: str, url: str, timeout_s: float) -> asyncio.Task[ProbeResult]:
        """The probe of ``instance_id`` in flight or just finished, or a new one."""
        task = self._running.get(instance_id)
        if task is None or (task.done() and (
                task.cancelled() or task.exception() is not None
                or time.monotonic() - task.result().finished_at > RESULT_REUSE_S)):
            task = asyncio.get_running_loop().create_task(self._probe(instance_id, url,
                                                                      timeout_s),
                                                          name=f"liveness-{instance_id}")
            self._running[instance_id] = task
        return task

    async def stop(self) -> None:
        """Cancel the probes still in flight (the router is shutting down)."""
        tasks = [task for task in self._running.values() if not task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._running.clear()

    async def _progress(self, session: aiohttp.ClientSession, url: str,
                        timeout_s: float) -> float | None:
        """The engine's token counters from /metrics (None when it has no such counters or
        does not answer in time: then only /health decides)."""
        try:
            async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(
                    total=timeout_s), headers=self._headers) as response:
                if response.status != 200:
                    return None
                return engine_progress(await response.text())
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None

    async def _probe(self, instance_id: str, url: str, timeout_s: float) -> ProbeResult:
        began = time.perf_counter()
        session = self._session()
        progress = None
        try:
            if session is None:
                raise RuntimeError("router session closed")
            async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(
                    total=timeout_s), headers=self._headers) as response:
                alive = response.status == 200
                detail = "answered 200" if alive else f"/health answered {response.status}"
        except TimeoutError:
            alive, detail = False, f"/health did not answer within {timeout_s:.2f}s"
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            alive, detail = False, f"/health failed: {exc!r}"[:300]
        seconds = time.perf_counter() - began
        if alive and session is not None:
            progress = await self._progress(session, url, timeout_s)
        result = ProbeResult(alive, detail, seconds, time.monotonic(), progress)
        if self._on_result is not None:
            self._on_result(instance_id, result)
        return result


async def read_or_probe(read: Callable[[], Awaitable[T]], *, silence_s: float,
                        stall: bool, probe_after: float | None,
                        probe: Callable[[], asyncio.Task[ProbeResult]],
                        stuck_after: float = float("inf")) -> T:
    """What ``read()`` returns (an upstream's headers, its next chunk), or :class:`Silence`.

    Waits at most ``silence_s``; after each ``probe_after`` of silence asks
    ``probe()`` whether the instance lives and gives up at once when it does
    not ("dead"), or when it answers but its engine's progress counters have
    not moved for ``stuck_after`` ("stuck": a hung engine core behind a live
    HTTP server). The read itself is never cancelled by a probe, so a chunk that
    arrives while the probe runs is returned as usual.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + silence_s
    reading = asyncio.ensure_future(read())
    still: tuple[float, float] | None = None  # (progress, since when) during this silence
    try:
        while True:
            left = deadline - loop.time()
            wait = left if probe_after is None else min(left, probe_after)
            done, _ = await asyncio.wait({reading}, timeout=max(wait, 0.0))
            if reading in done:
                return reading.result()
            if loop.time() >= deadline:
                raise Silence("stall" if stall else "idle", f"silent for {silence_s:g}s")
            checking = probe()
            done, _ = await asyncio.wait({reading, checking}, timeout=max(
                deadline - loop.time(), 0.0), return_when=asyncio.FIRST_COMPLETED)
            if reading in done:
                return reading.result()
            if checking not in done:
                continue
            answer = checking.result()
            silent_s = silence_s - (deadline - loop.time())
            if not answer.alive:
                raise Silence("dead", f"silent for {silent_s:.2f}s and {answer.detail}")
            if answer.progress is None:
                continue
            if still is None or answer.progress != still[0]:
                still = (answer.progress, loop.time())
            elif loop.time() - still[1] >= stuck_after:
                raise Silence("stuck", f"silent for {silent_s:.2f}s; it answers /health but "
                              f"its engine computed no token for {loop.time() - still[1]:.2f}s")
    finally:
        if not reading.done():
            reading.cancel()
