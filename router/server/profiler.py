"""Profiling a newly registered instance for policies that predict its latency.

A policy implementing ``ProfilingPolicy`` (``dynamic_pd``) names a few
``(prompt_tokens, max_tokens)`` probes. Once per instance incarnation, after its
first healthy scrape, the router sends them one at a time (after one discarded
warm-up probe) as streaming completions of random token ids, so no tokenizer is
needed and no probe hits another's prefix cache. TTFT is send to first chunk,
TPOT the mean gap after it. Probes longer than the instance's ``max_model_len``
(from ``/v1/models``) are skipped. The measurements go to the policy's
``observe_profile``; a failure only logs (the policy then starts from its prior
and learns from live requests).

Probes reach the engine directly, not through the router's front door, so they
are not counted as client requests; they do show in the engine's own metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable

import aiohttp

from router.policies.types import ProfileSample, ProfilingPolicy
from router.server.load_view import InstanceLoad

log = logging.getLogger("xllm.router.profile")

TOKEN_ID_RANGE = (100, 1000)  # ordinary ids in any real vocabulary
PROBE_TIMEOUT_S = 120.0


class InstanceProfiler:
    """Runs each new instance's probes in the background and reports them to the policy."""

    def __init__(self, session: Callable[[], aiohttp.ClientSession | None],
                 headers: dict[str, str], enabled: bool = True) -> None:
        self._session = session
        self.headers = headers
        self.enabled = enabled
        self._done: set[tuple[str, str | None, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.results: dict[str, tuple[ProfileSample, ...]] = {}
        """Last profile per instance id (shown in /admin/instances)."""

    def maybe_start(self, load: InstanceLoad, policy: object) -> None:
        """Profile ``load`` for ``policy`` once per incarnation, when it is healthy."""
        if not self.enabled or not load.healthy or not isinstance(policy, ProfilingPolicy):
            return
        key = (load.instance_id, load.record.incarnation, load.record.url)
        if key in self._done:
            return
        self._done.add(key)
        task = asyncio.get_running_loop().create_task(self._profile(load, policy),
                                                      name=f"profile-{load.instance_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self) -> None:
        """Until every started profile finished (tests, benchmarks)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _profile(self, load: InstanceLoad, policy: ProfilingPolicy) -> None:
        session = self._session()
        if session is None:
            return
        try:
            model, max_len = await served_model(session, load.record.url, self.headers)
            plan = [(p, o) for p, o in policy.profile_plan() if p + o <= max_len]
            rng = random.Random(hash((load.instance_id, load.record.incarnation)))
            if plan:
                await self._probe(session, load.record.url, model, min(plan)[0], 2, rng)
            samples = []
            for prompt, output in plan:
                sample = await self._probe(session, load.record.url, model, prompt, output, rng)
                if sample is not None:
                    samples.append(sample)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
            log.warning("profiling %s failed: %r", load.instance_id, exc)
            return
        if samples:
            self.results[load.instance_id] = tuple(samples)
            policy.observe_profile(load.instance_id, tuple(samples))
            log.info("profiled %s: %s", load.instance_id, ", ".join(
                f"{s.prompt_tokens} tok -> TTFT {s.ttft_ms:.0f} ms" for s in samples))

    async def _probe(self, session: aiohttp.ClientSession, url: str, model: str, prompt: int,
                     output: int, rng: random.Random) -> ProfileSample | None:
        return await probe_completion(session, url, model, random_ids(rng, prompt), output,
                                      self.headers)


async def served_model(session: aiohttp.ClientSession, url: str,
                       headers: dict[str, str]) -> tuple[str, int]:
    """The first model the instance at ``url`` serves, and its ``max_model_len``."""
    async with session.get(url + "/v1/models", headers=headers,
                           timeout=aiohttp.ClientTimeout(total=10)) as r:
        data = (await r.json())["data"]
    first = data[0]
    return str(first["id"]), int(first.get("max_model_len") or 2048)


def random_ids(rng: random.Random, count: int) -> list[int]:
    """A prompt of ``count`` ordinary token ids that shares no prefix with another's."""
    return [rng.randrange(*TOKEN_ID_RANGE) for _ in range(count)]


async def probe_completion(session: aiohttp.ClientSession, url: str, model: str,
                           ids: list[int], output: int, headers: dict[str, str],
                           timeout_s: float = PROBE_TIMEOUT_S) -> ProfileSample | None:
    """One streamed completion of ``ids`` on the instance at ``url``, timed from this side:
    TTFT, and TPOT when tokens came in more than one chunk (None when it did not answer 200).

    Tokens are counted from each chunk's ``token_ids`` (vLLM's ``return_token_ids``), or one
    per chunk with text from a server without them. A token can decode to no text (part of
    a UTF-8 character), and an API server that falls behind its engine sends the tokens it
    has in one chunk, so neither chunks nor texts count tokens."""
    body = {"model": model, "prompt": ids, "max_tokens": output, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    arrivals: list[tuple[float, int]] = []  # (seconds since the request, tokens it brought)
    began = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body, headers=headers,
                            timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
        if r.status != 200:
            log.warning("profile probe on %s answered %d", url, r.status)
            return None
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            tokens = sum(chunk_tokens(c) for c in json.loads(line[5:]).get("choices") or ())
            if tokens:
                arrivals.append((time.perf_counter() - began, tokens))
    if not arrivals:
        return None
    total = sum(n for _, n in arrivals)
    (first_s, first_n), last_s = arrivals[0], arrivals[-1][0]
    tpot = (last_s - first_s) * 1000 / (total - first_n) if len(arrivals) > 1 else None
    return ProfileSample(len(ids), total, first_s * 1000, tpot)


def chunk_tokens(choice: dict) -> int:
    """Output tokens one streamed choice brings: its ``token_ids``, else one per text."""
    ids = choice.get("token_ids")
    if ids is not None:
        return len(ids)
    return 1 if choice.get("text") else 0
