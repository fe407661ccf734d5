"""Client side of the simulator's live runs: timed streaming completions with exact token counts.

Prompts are random token ids (``/v1/completions`` accepts a list of ints), so a
request has exactly the prompt length the trace says and no prefix-cache hits;
``ignore_eos`` makes it generate exactly ``max_tokens`` tokens. Shared by
``sim_profile.py`` (fit the step model) and ``sim_validate.py`` (live vs simulated).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp
import numpy as np

TOKEN_LOW, TOKEN_HIGH = 1000, 40000  # ordinary vocabulary ids of SmolLM2 (49,152 ids)


@dataclass
class Timed:
    """One request as the client saw it: chunk arrival times relative to the send."""

    prompt_tokens: int
    max_tokens: int
    sent_at: float = 0.0
    token_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""

    @property
    def ttft_ms(self) -> float | None:
        return self.token_times[0] * 1e3 if self.token_times else None

    @property
    def tpot_ms(self) -> float | None:
        if len(self.token_times) < 2 or self.output_tokens < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) * 1e3 / (self.output_tokens - 1)

    def itls_ms(self, skip: int = 0) -> list[float]:
        t = self.token_times
        return [(b - a) * 1e3 for a, b in zip(t[skip:], t[skip + 1:])]


def pinned_engine(spec, core: int):  # type: ignore[no-untyped-def]
    """An ``EngineProcess`` whose whole process tree (API server, engine core, worker) runs
    on ``core`` alone, not only its OpenMP threads (``VLLM_CPU_OMP_THREADS_BIND``).

    With only the worker's threads pinned, each engine's API server and engine-core
    processes float over both cores and take time from the *other* engine's worker, so
    two "one-core" instances slow each other down; the simulator (like a GPU cluster,
    one device per instance) treats instances as independent. Profiling and validation
    both start engines this way so that the fitted step model and the live run match.
    """
    from dataclasses import replace

    from xllm_plugin.launcher.engine import EngineProcess

    spec = replace(spec, cpu_bind=str(core))
    engine = EngineProcess(spec)
    engine.command = ["taskset", "-c", str(core), *engine.command]
    return engine


def random_prompt(n: int, rng: np.random.Generator) -> list[int]:
    return rng.integers(TOKEN_LOW, TOKEN_HIGH, size=n).tolist()


async def timed_completion(session: aiohttp.ClientSession, url: str, model: str,
                           prompt: list[int], max_tokens: int, timeout_s: float = 600) -> Timed:
    """Stream one completion; record when each token chunk arrived."""
    result = Timed(len(prompt), max_tokens)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    result.sent_at = start
    try:
        async with session.post(f"{url}/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                for choice in chunk.get("choices") or []:
                    if choice.get("text") is not None and (choice.get("text") or
                                                           choice.get("finish_reason") is None):
                        result.token_times.append(time.perf_counter() - start)
                usage = chunk.get("usage")
                if usage:
                    result.output_tokens = usage.get("completion_tokens", 0)
    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
        result.error = f"{type(error).__name__}: {error}"
    return result
