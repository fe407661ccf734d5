"""The live EPD profiler: measure a model's encoders and language-model instances, choose
whether its images go through an encode instance, and re-choose when the traffic moves.

With ``--epd-profile``, once per model (again on ``POST /admin/epd/profile``), as soon as
a healthy encode instance and a healthy language-model instance serve it and the
router's front door is bound, it runs xLLM's profiler (§3.3) against them:

1. **tokens per image**: the same short chat with and without the probe image, one
   token each, on the language-model instance (the difference of ``usage.prompt_tokens``);
2. **encoder batch** by binary search: the most images whose encodes, sent to E at
   once, all come back within ``encode_ttft_share`` of the TTFT SLO (each image has its
   own media uuid, so nothing is served from a cache);
3. **token budget** by binary search: the TPOT of 1 and 4 concurrent decodes first, then
   the longest prompt (random token ids: no prefix hits) whose prefill, as a step beside
   one decode (that decode's step plus what the prompt adds to TTFT over a 16-token
   prompt's), fits in ``headroom`` x the TPOT SLO on the idle language-model instance.
   These and step 2's timings are fitted into the
   :class:`~router.policies.epd.StageCosts` the analytic estimate needs (context length
   is not varied: the probes are short);
4. **probe workload**: for every config the deployment can run
   (:func:`~router.policies.epd_live.deployment_configs`), image chats through the
   router's own front door, forced onto the config with ``x-xllm-epd-strategy``, at
   ``probe_concurrency`` in flight, then twice that, up to ``probe_max_concurrency``
   (``probe_requests`` chats per level, at least two per slot), until fewer than
   ``PROBE_TARGET`` of a level's chats meet both SLOs; goodput = the most requests within
   both SLOs per second of a level that met the target. One level measures a path at one
   load only: on two CPU cores the path that won at 2 in flight (E-P-D) lost at saturation
   (``benchmarks/results/epd_live_pd.md`` as of commit f4cf790);
5. the :class:`~router.policies.epd.EPDProfiler`, restricted to those configs, picks the
   best measured goodput (ties go to ``none``: fewer moving parts).

After that, each ``window`` finished image requests the
:class:`~router.policies.epd.EPDController` re-picks on their summary with the
analytic estimates of the fitted costs, each scaled by what the probe measured for that
config over what the estimate said (:class:`~router.policies.epd_live.Calibration`: no
probe traffic on a serving deployment, but no forgetting what it showed), with the
controller's hysteresis: a small shift keeps the choice, a new strategy must win by a
margin.

Under a PD routing policy over instances labelled ``prefill`` and ``decode`` the two
paths are ``EP-D`` and ``E-P-D`` (:func:`~router.policies.epd_live.deployment_configs`);
the measurements of steps 1-3 run on one of them, which serves a direct request whole.

Until a model's profile is done, and without ``--epd-profile``, images go through an
encode instance whenever one is healthy. A client may force either path with the
request header ``x-xllm-epd-strategy``: ``none`` or ``EP-D`` keep the images with the
language-model instances, ``E-PD`` or ``E-P-D`` send them through an encode instance
(the names differ only in whether the routing policy splits prefill from decode).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import statistics
import struct
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Generator
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import aiohttp
import numpy as np

from router.bench.load import stream_chat
from router.policies.epd import (
    ENCODE_APART,
    Choice,
    EPDConfig,
    EPDController,
    EPDProfiler,
    WorkloadSummary,
    feasible_search,
)
from router.policies.epd_live import (
    Calibration,
    Measured,
    TrafficWindow,
    deployment_configs,
    fitted_costs,
)
from router.server.epd import ENCODE_ROLE, encode_body
from router.server.load_view import InstanceLoad, LoadView
from router.server.metrics import RouterMetrics
from router.server.profiler import probe_completion, random_ids, served_model

log = logging.getLogger("xllm.router.epd_profile")

HEADER_EPD_STRATEGY = "x-xllm-epd-strategy"  # request: force one of LIVE_STRATEGIES
HEADER_PROBE = "x-xllm-probe"  # the profiler's own requests: not counted as traffic
LIVE_STRATEGIES = ("none", "EP-D", "E-PD", "E-P-D")
PROBE_TEXT = "Describe the image."
PROBE_TARGET = 0.9  # share of a probe level's chats within both SLOs for its goodput to count
MIN_BUDGET = 16
DECODE_PROBE_SEQS = (1, 4)
DECODE_PROBE_TOKENS = 16
DECODE_PROBE_PROMPT = 32
DECODE_PROBE_ROUNDS = 3  # 16, 32, then 64 tokens
CHARS_PER_TOKEN = 4


class ProfileError(Exception):
    """A probe the profile cannot do without (an instance refused or broke off)."""


class ProbeLevel(NamedTuple):
    """One level of the probe workload: image chats ``concurrency`` at a time."""

    concurrency: int
    goodput: float  # requests within both SLOs per second
    attainment: float  # their share of the level's requests


def probe_ladder(start: int, stop: int) -> list[int]:
    """The probe workload's concurrency levels: ``start``, doubling, capped at ``stop``."""
    levels = [start]
    while levels[-1] < stop:
        levels.append(min(2 * levels[-1], stop))
    return levels


def probe_png(side: int = 448, seed: int = 0) -> bytes:
    """An RGB gradient of ``side`` pixels as PNG bytes, written with zlib: the router has no
    imaging library, and a model resizes whatever it gets to its own input size."""
    y, x = np.mgrid[0:side, 0:side]
    pixels = np.stack([x * 256 // side, y * 256 // side, (x + y + seed) % 256],
                      axis=-1).astype(np.uint8)
    rows = pixels.reshape(side, 3 * side).astype(np.int16)
    rows[:, 3:] = (rows[:, 3:] - rows[:, :-3]) % 256  # filter "Sub": each byte minus its left
    raw = b"".join(b"\x01" + row.astype(np.uint8).tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def image_data_url(data: bytes, kind: str) -> str:
    """``data:image/KIND;base64,...`` for an image file's bytes."""
    return f"data:image/{'jpeg' if kind == 'jpg' else kind};base64," + \
        base64.b64encode(data).decode()


def image_part(url: str) -> dict[str, Any]:
    """A chat image part with a media uuid of its own: E and the language-model instance key
    encoder outputs by it, so a fresh one is never served from their caches."""
    return {"type": "image_url", "image_url": {"url": url}, "uuid": uuid.uuid4().hex}


async def drive_search(search: Generator[int, bool, int],
                       fits: Callable[[int], Awaitable[bool]]) -> int:
    """Run a :func:`~router.policies.epd.feasible_search` whose test is a live measurement."""
    x = next(search)
    while True:
        try:
            x = search.send(await fits(x))
        except StopIteration as done:
            return done.value


@dataclass(frozen=True)
class EPDSettings:
    """The profiler's knobs (validated in :class:`router.config.RouterConfig`)."""

    enabled: bool
    slo_ttft_s: float
    slo_tpot_s: float
    probe_requests: int = 8
    probe_concurrency: int = 2
    probe_max_concurrency: int = 16
    probe_max_tokens: int = 16
    window: int = 32
    image_url: str = ""
    max_encode_batch: int = 16
    max_budget: int = 8192
    encode_ttft_share: float = 0.25
    headroom: float = 0.9


@dataclass
class ModelState:
    """One model's profile, controller and traffic window."""

    status: str = "waiting"  # waiting | profiling | ready | failed
    error: str = ""
    measured: Measured | None = None
    controller: EPDController | None = None
    calibration: Calibration | None = None
    window: TrafficWindow | None = None
    task: asyncio.Task[None] | None = None

    @property
    def choice(self) -> Choice | None:
        return self.controller.current if self.controller is not None else None


class EPDAutoStrategy:
    """Per model: whether images go through an encode instance, and the profile behind it."""

    def __init__(self, settings: EPDSettings, load: LoadView, metrics: RouterMetrics,
                 session: Callable[[], aiohttp.ClientSession | None],
                 front_url: Callable[[], str | None], upstream_headers: dict[str, str],
                 client_headers: dict[str, str], splits_prefill: bool = False) -> None:
        self.settings = settings
        self._splits_prefill = splits_prefill  # the routing policy separates P from D
        self._load = load
        self._metrics = metrics
        self._session = session
        self._front_url = front_url
        self._upstream_headers = upstream_headers
        self._client_headers = client_headers
        self.models: dict[str, ModelState] = {}

    # -- the routing decision -------------------------------------------------------------------

    def encodes_apart(self, model: str, forced: str | None = None) -> bool:
        """Whether an image request for ``model`` should go through an encode instance."""
        if forced is not None:
            return forced in ENCODE_APART
        state = self.models.get(model)
        choice = state.choice if state is not None else None
        return True if choice is None else choice.config.encodes_apart

    # -- starting a profile ---------------------------------------------------------------------

    def pools(self, model: str) -> tuple[list[InstanceLoad], list[InstanceLoad]]:
        healthy = [i for i in self._load.serving(model) if i.healthy]
        encoders = [i for i in healthy if i.role == ENCODE_ROLE]
        generators = sorted((i for i in healthy if i.role != ENCODE_ROLE),
                            key=lambda i: (i.role != "both", i.instance_id))
        return encoders, generators

    def maybe_start(self, model: str) -> None:
        """Profile ``model`` once its pools are up (called after every health scrape)."""
        if not self.settings.enabled or self._front_url() is None:
            return
        state = self.models.setdefault(model, ModelState())
        if state.status != "waiting":
            return
        encoders, generators = self.pools(model)
        if encoders and generators:
            self.start(model)

    def start(self, model: str) -> asyncio.Task[None]:
        """(Re-)profile ``model`` now, in the background."""
        state = self.models.setdefault(model, ModelState())
        if state.task is not None and not state.task.done():
            return state.task
        state.status, state.error = "profiling", ""
        state.task = asyncio.get_running_loop().create_task(self._profile(model, state),
                                                            name=f"epd-profile-{model}")
        return state.task

    async def stop(self) -> None:
        tasks = [s.task for s in self.models.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the profile ----------------------------------------------------------------------------

    async def _profile(self, model: str, state: ModelState) -> None:
        began = time.perf_counter()
        try:
            measured, configs = await self._measure(model)
            profiler = EPDProfiler(fitted_costs(measured), self.settings.slo_ttft_s,
                                   self.settings.slo_tpot_s, instances=configs[0].instances,
                                   configs=configs, max_budget=self.settings.max_budget,
                                   headroom=self.settings.headroom)
            summary = WorkloadSummary(
                rate=max(measured.probe_goodput.values()), image_tokens=measured.tokens_per_image,
                images=1.0, text_tokens=measured.text_tokens,
                output_tokens=self.settings.probe_max_tokens)
            controller, calibration = EPDController(profiler), Calibration()
            controller.update(summary, calibration.measured(measured.probe_goodput))
        except (ProfileError, aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
            state.status, state.error = "failed", f"{type(exc).__name__}: {exc}"
            log.warning("EPD profile of %s failed (%s); %s", model, state.error,
                        "the previous choice stays" if state.controller is not None else
                        "images go through an encode instance when one is healthy")
            return
        state.measured, state.controller, state.calibration = measured, controller, calibration
        state.window = TrafficWindow(self.settings.window)
        state.status = "ready"
        self._metrics.epd_picks.labels(model, "pick").inc()
        self._publish(model, controller.current)
        log.info("EPD profile of %s in %.1f s: encoder batch %d, token budget %d, %d tokens "
                 "per image; probe goodput %s -> %s", model, time.perf_counter() - began,
                 measured.encode_batch, measured.token_budget, measured.tokens_per_image,
                 ", ".join(f"{k} {v:.2f} req/s" for k, v in measured.probe_goodput.items()),
                 controller.current.config.label if controller.current else "-")

    async def _measure(self, model: str) -> tuple[Measured, tuple[EPDConfig, ...]]:
        session = self._session()
        if session is None:
            raise ProfileError("the router is shutting down")
        encoders, generators = self.pools(model)
        split = self._splits_prefill and all(i.role in ("prefill", "decode") for i in generators)
        decoders = sum(i.role == "decode" for i in generators) if split else 0
        configs = deployment_configs(len(encoders), len(generators), decoders)
        if len(configs) < 2:
            raise ProfileError("needs a healthy encode instance and a healthy language-model "
                               "instance")
        e, g = encoders[0], generators[0]
        _, max_len = await served_model(session, g.record.url, self._upstream_headers)
        with_image = await self._prompt_tokens(session, g.record.url, model, True)
        text_only = await self._prompt_tokens(session, g.record.url, model, False)
        measured = Measured(encoder=e.instance_id, generator=g.instance_id,
                            tokens_per_image=max(1, with_image - text_only),
                            text_tokens=text_only, encode_batch=0, token_budget=0)
        measured.encode_batch = await self._encoder_batch(session, e.record.url, model,
                                                          measured)
        await self._decode_steps(session, g.record.url, model, measured)
        measured.token_budget = await self._token_budget(session, g.record.url, model,
                                                         min(self.settings.max_budget,
                                                             max_len - 2), measured)
        for config in configs:
            level = await self._probe_workload(model, config)
            measured.probe_goodput[config.label] = level.goodput
            measured.probe_attainment[config.label] = level.attainment
            measured.probe_concurrency[config.label] = level.concurrency
        return measured, configs

    async def _prompt_tokens(self, session: aiohttp.ClientSession, url: str, model: str,
                             with_image: bool) -> int:
        content: list[dict[str, Any]] = [{"type": "text", "text": PROBE_TEXT}]
        if with_image:
            content.insert(0, image_part(self.settings.image_url))
        body = {"model": model, "messages": [{"role": "user", "content": content}],
                "max_tokens": 1, "temperature": 0.0}
        async with session.post(url + "/v1/chat/completions", json=body,
                                headers=self._upstream_headers,
                                timeout=aiohttp.ClientTimeout(total=120)) as r:
            if r.status != 200:
                raise ProfileError(f"{url} answered {r.status} to a probe chat: "
                                   f"{(await r.text())[:200]}")
            return int((await r.json())["usage"]["prompt_tokens"])

    async def _encode(self, session: aiohttp.ClientSession, url: str, model: str) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": [
            image_part(self.settings.image_url), {"type": "text", "text": PROBE_TEXT}]}]}
        async with session.post(url + "/v1/chat/completions", data=encode_body(body),
                                headers={"Content-Type": "application/json",
                                         **self._upstream_headers},
                                timeout=aiohttp.ClientTimeout(total=120)) as r:
            answer = await r.json() if r.status == 200 else None
        if not answer or not answer.get("ec_transfer_params"):
            raise ProfileError(f"encode instance {url} answered {r.status} without "
                               "ec_transfer_params")

    async def _encoder_batch(self, session: aiohttp.ClientSession, url: str, model: str,
                             measured: Measured) -> int:
        limit_s = self.settings.encode_ttft_share * self.settings.slo_ttft_s

        async def fits(batch: int) -> bool:
            began = time.perf_counter()
            await asyncio.gather(*(self._encode(session, url, model) for _ in range(batch)))
            seconds = time.perf_counter() - began
            measured.encode_samples.append((batch, seconds))
            return seconds <= limit_s

        await fits(1)  # warm-up: the first encode pays for lazy initialisation
        measured.encode_samples.clear()
        batch = await drive_search(feasible_search(1, self.settings.max_encode_batch), fits)
        if len({b for b, _ in measured.encode_samples}) < 2:  # the fit needs two batch sizes
            await fits(2)
        return max(batch, 1)

    async def _token_budget(self, session: aiohttp.ClientSession, url: str, model: str,
                            longest: int, measured: Measured) -> int:
        """Binary search on the step a prefill of ``t`` tokens makes beside one decode: the
        measured one-decode step plus what ``t`` tokens add to TTFT over the shortest probe's.
        TTFT alone would also count the HTTP round trip and the API server, which are not
        in any step and, on a busy host, can exceed a tight TPOT SLO by themselves."""
        limit_s = self.settings.headroom * self.settings.slo_tpot_s
        rng = random.Random(f"{model}-budget")
        decode_s = next(sec for t, seqs, sec in measured.step_samples if (t, seqs) == (0, 1))

        async def ttft_s(tokens: int) -> float:
            sample = await probe_completion(session, url, model, random_ids(rng, tokens), 1,
                                            self._upstream_headers)
            if sample is None:
                raise ProfileError(f"{url} refused a {tokens}-token prefill probe")
            return sample.ttft_ms / 1e3

        base_s = statistics.median([await ttft_s(MIN_BUDGET) for _ in range(3)])
        measured.step_samples.append((MIN_BUDGET, 1, decode_s))

        async def fits(tokens: int) -> bool:
            step_s = decode_s + max(0.0, await ttft_s(tokens) - base_s)
            measured.step_samples.append((tokens, 1, step_s))
            return step_s <= limit_s

        budget = await drive_search(feasible_search(MIN_BUDGET, max(MIN_BUDGET, longest)), fits)
        if len({t for t, _, _ in measured.step_samples}) < 3:  # the fit needs two prefill sizes
            await fits(4 * MIN_BUDGET)
        return max(budget, 1)

    async def _decode_steps(self, session: aiohttp.ClientSession, url: str, model: str,
                            measured: Measured) -> None:
        """Mean TPOT at each of ``DECODE_PROBE_SEQS`` concurrent sequences. An API server
        that falls behind its engine sends a probe's tokens in one chunk, which times
        nothing; the probes then run again with twice the tokens, so that decoding outlasts
        the stall (seen under the full test suite on two cores with a tiny model)."""
        rng = random.Random(f"{model}-decode")
        for seqs in DECODE_PROBE_SEQS:
            tokens = DECODE_PROBE_TOKENS
            for _ in range(DECODE_PROBE_ROUNDS):
                samples = await asyncio.gather(*(probe_completion(
                    session, url, model, random_ids(rng, DECODE_PROBE_PROMPT), tokens,
                    self._upstream_headers) for _ in range(seqs)))
                if any(s is None for s in samples):
                    raise ProfileError(f"{url} refused a decode probe")
                tpots = [s.tpot_ms for s in samples if s.tpot_ms is not None]
                if tpots:
                    measured.step_samples.append((0, seqs, sum(tpots) / len(tpots) / 1e3))
                    break
                log.info("decode probes of %d on %s came in one chunk each; again with %d "
                         "tokens", seqs, url, 2 * tokens)
                tokens *= 2
            else:
                raise ProfileError(f"{url} sent every decode probe of {seqs} in one chunk, "
                                   f"up to {tokens // 2} tokens")

    async def _probe_workload(self, model: str, config: EPDConfig) -> ProbeLevel:
        """Image chats forced onto ``config`` up the concurrency ladder: the level with the
        best goodput among those that met ``PROBE_TARGET``, else the first level."""
        s = self.settings
        levels: list[ProbeLevel] = []
        for concurrency in probe_ladder(s.probe_concurrency, s.probe_max_concurrency):
            levels.append(await self._probe_level(model, config, concurrency,
                                                  max(s.probe_requests, 2 * concurrency)))
            if levels[-1].attainment < PROBE_TARGET:
                break
        met = [level for level in levels if level.attainment >= PROBE_TARGET]
        return max(met, key=lambda level: level.goodput) if met else levels[0]

    async def _probe_level(self, model: str, config: EPDConfig, concurrency: int,
                           requests: int) -> ProbeLevel:
        """``requests`` image chats forced onto ``config`` through the front door,
        ``concurrency`` at a time."""
        session, front = self._session(), self._front_url()
        if session is None or front is None:
            raise ProfileError("the router is shutting down")
        s = self.settings
        headers = {**self._client_headers, HEADER_EPD_STRATEGY: config.strategy,
                   HEADER_PROBE: "epd"}
        gate = asyncio.Semaphore(concurrency)

        async def one() -> bool:
            async with gate:
                result = await stream_chat(
                    session, front, model, [image_part(s.image_url),
                                            {"type": "text", "text": PROBE_TEXT}],
                    s.probe_max_tokens, headers=headers, extra_body={"ignore_eos": True})
            tpot = result.tpot_s
            return (result.ok and result.ttft_s is not None and result.ttft_s <= s.slo_ttft_s
                    and (tpot is None or tpot <= s.slo_tpot_s))

        began = time.perf_counter()
        met = sum(await asyncio.gather(*(one() for _ in range(requests))))
        return ProbeLevel(concurrency, met / (time.perf_counter() - began), met / requests)

    # -- live traffic ---------------------------------------------------------------------------

    def record(self, model: str, arrival_s: float, text_chars: int, images: int,
               output_tokens: int) -> None:
        """One finished image request (``arrival_s`` on any one clock); every ``window`` of
        them the controller re-picks."""
        state = self.models.get(model)
        if state is None or state.status != "ready" or state.window is None:
            return
        assert state.measured is not None and state.controller is not None
        assert state.calibration is not None
        state.window.add(arrival_s, -(-text_chars // CHARS_PER_TOKEN),
                         images * state.measured.tokens_per_image, images, output_tokens)
        if not state.window.due:
            return
        summary = state.window.take()
        before = state.controller.current
        choice = state.controller.update(summary, state.calibration)
        event = state.controller.history[-1][0]
        self._metrics.epd_picks.labels(model, event).inc()
        if before is None or choice.config.strategy != before.config.strategy:
            log.info("EPD: %s now runs %s (%s; traffic %s)", model, choice.config.label, event,
                     summary)
            self._publish(model, choice)

    def _publish(self, model: str, choice: Choice | None) -> None:
        for name in LIVE_STRATEGIES:
            self._metrics.epd_strategy.labels(model, name).set(
                1 if choice is not None and choice.config.strategy == name else 0)

    def snapshot(self) -> dict[str, Any]:
        """Every model's status, measurements, current choice and decision history."""
        out: dict[str, Any] = {}
        for model, state in self.models.items():
            choice = state.choice
            out[model] = {
                "status": state.status, "error": state.error or None,
                "measured": asdict(state.measured) if state.measured is not None else None,
                "strategy": choice.config.strategy if choice is not None else None,
                "config": choice.config.label if choice is not None else None,
                "limits": asdict(choice.limits) if choice is not None else None,
                "goodput": choice.goodput if choice is not None else None,
                "compared": dict(choice.measured) if choice is not None else {},
                "calibration": dict(state.calibration.factors)
                if state.calibration is not None else {},
                "history": [list(h) for h in state.controller.history]
                if state.controller is not None else [],
            }
        return out
