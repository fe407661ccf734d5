"""Recommendation workload generator: Poisson arrivals of beam searches against a server.

The same requests (same prompts, same arrival times for a seed) go either to our
route (``api="recommend"``: ``POST /xllm/v1/recommend``) or to stock vLLM's beam
search (``api="stock"``: ``POST /v1/completions`` with ``use_beam_search``), so an
A/B run compares the two on identical work. Prompts are user histories of
catalog items behind a fixed instruction prefix (shared by every request, as a
system prompt would be). Imports neither torch nor vLLM.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import aiohttp
import numpy as np

from xllm_plugin.recommend.catalog import Catalog
from xllm_plugin.recommend.synthetic import FIRST_USABLE_TOKEN, user_history


@dataclass(frozen=True)
class Workload:
    """What to send: shape of every request and how fast requests arrive."""

    beam_width: int = 16
    num_tokens: int = 3
    top_k: int | None = None
    num_requests: int = 16
    rate: float = 1.0  # requests/s, Poisson; 0 = one at a time (closed loop)
    history_items: tuple[int, int] = (10, 40)  # items per user history, inclusive range
    prefix_tokens: int = 16  # fixed instruction prefix shared by all requests
    vocab_size: int = 49152
    catalog_ref: str | None = None  # catalog name the server knows (mask on)
    seed: int = 0


@dataclass
class WorkloadResult:
    api: str
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    responses: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict[str, float]:
        lat = np.asarray(self.latencies_s) if self.latencies_s else np.asarray([np.nan])
        return {"requests": float(len(self.latencies_s)), "errors": float(len(self.errors)),
                "mean_s": float(lat.mean()), "p50_s": float(np.percentile(lat, 50)),
                "p99_s": float(np.percentile(lat, 99)), "wall_s": self.wall_s}


def build_prompts(workload: Workload, catalog: Catalog | None) -> list[list[int]]:
    """Prompt token ids of every request; the same for a given seed."""
    rng = np.random.default_rng(workload.seed)
    prefix = rng.integers(FIRST_USABLE_TOKEN, workload.vocab_size, workload.prefix_tokens).tolist()
    low, high = workload.history_items
    prompts = []
    for _ in range(workload.num_requests):
        items = int(rng.integers(low, high + 1))
        if catalog is not None:
            history = user_history(catalog, items, rng)
        else:
            history = rng.integers(FIRST_USABLE_TOKEN, workload.vocab_size,
                                   items * workload.num_tokens).tolist()
        prompts.append(prefix + history)
    return prompts


def arrival_offsets(workload: Workload) -> list[float]:
    """Seconds after the start at which each request is sent (Poisson process)."""
    if workload.rate <= 0:
        return [0.0] * workload.num_requests
    rng = np.random.default_rng(workload.seed + 1)
    gaps = rng.exponential(1.0 / workload.rate, workload.num_requests)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


def request_body(api: Literal["recommend", "stock"], workload: Workload, prompt: list[int],
                 model: str, extra: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of one request for either API; ``extra`` is merged into the body."""
    if api == "stock":
        return "/v1/completions", {
            "model": model, "prompt": prompt, "use_beam_search": True,
            "n": workload.beam_width, "max_tokens": workload.num_tokens, "ignore_eos": True,
            "temperature": 0.0, **(extra or {})}
    body: dict[str, Any] = {"model": model, "prompt_token_ids": prompt,
                            "beam_width": workload.beam_width, "num_tokens": workload.num_tokens}
    if workload.top_k:
        body["top_k"] = workload.top_k
    if workload.catalog_ref:
        body["catalog"] = workload.catalog_ref
    return "/xllm/v1/recommend", {**body, **(extra or {})}


async def run_workload(url: str, api: Literal["recommend", "stock"], workload: Workload,
                       catalog: Catalog | None = None, model: str = "",
                       prompts: list[list[int]] | None = None,
                       timeout_s: float = 600.0,
                       extra: dict[str, Any] | None = None) -> WorkloadResult:
    """Send the workload and measure each request's end-to-end latency."""
    prompts = prompts if prompts is not None else build_prompts(workload, catalog)
    offsets = arrival_offsets(workload)
    result = WorkloadResult(api=api)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(prompt: list[int]) -> None:
            path, body = request_body(api, workload, prompt, model, extra)
            began = time.perf_counter()
            try:
                async with session.post(url.rstrip("/") + path, json=body) as response:
                    payload = await response.json(content_type=None)
                    if response.status != 200:
                        result.errors.append(f"{response.status}: {payload}")
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                result.errors.append(repr(error))
                return
            result.latencies_s.append(time.perf_counter() - began)
            result.responses.append(payload)

        started = time.perf_counter()
        if workload.rate <= 0:
            for prompt in prompts:
                await one(prompt)
        else:
            tasks = []
            for prompt, offset in zip(prompts, offsets):
                delay = started + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(prompt)))
            await asyncio.gather(*tasks)
        result.wall_s = time.perf_counter() - started
    return result


def workload_dict(workload: Workload) -> dict[str, Any]:
    return asdict(workload)
