"""``xllm-bench load``: send a chat workload to any OpenAI-compatible URL and report latency.

Streaming chat requests give the client-side view users care about: TTFT
(time to the first content chunk), TPOT (time per output token after the
first) and throughput. The same code drives the local demo and benchmarks,
against a single ``vllm serve`` or the router alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from router.bench.prompts import PROMPT_SETS, load_prompts


@dataclass
class RequestResult:
    """One request as the client saw it."""

    ok: bool
    index: int = -1
    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    text: str = ""
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


async def stream_chat(session: aiohttp.ClientSession, base_url: str, model: str,
                      prompt: str | list[dict[str, Any]], max_tokens: int, headers: dict[str, str] | None = None,
                      timeout_s: float = 300.0,
                      extra_body: dict[str, Any] | None = None) -> RequestResult:
    """Send one streaming chat completion and time it from the client's side.

    ``prompt`` is the user message's content: text, or a list of content parts (images).
    ``extra_body`` adds fields such as ``priority``, ``vllm_xargs`` or ``ignore_eos``.
    """
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, **(extra_body or {})}
    start = time.perf_counter()
    result = RequestResult(ok=False)
    pieces: list[str] = []
    try:
        async with session.post(f"{base_url}/v1/chat/completions", json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if result.ttft_s is None:
                            result.ttft_s = time.perf_counter() - start
                        pieces.append(content)
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens", 0)
                    result.output_tokens = usage.get("completion_tokens", 0)
        result.e2e_s = time.perf_counter() - start
        result.text = "".join(pieces)
        result.ok = result.ttft_s is not None
        if not result.ok:
            result.error = "stream ended without content"
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as error:
        result.error = f"{type(error).__name__}: {error}"
    return result


async def run_load(base_url: str, model: str, prompts: Sequence[str], num_requests: int,
                   concurrency: int, max_tokens: int, rate: float | None = None,
                   headers: dict[str, str] | None = None, seed: int = 0,
                   progress: bool = False) -> tuple[list[RequestResult], float]:
    """Run ``num_requests`` requests; return the results and the wall time.

    With ``rate`` set, arrivals are Poisson at that many requests per second
    (open loop); otherwise ``concurrency`` requests are kept in flight (closed loop).
    Concurrency caps in-flight requests in both modes.
    """
    rng = np.random.default_rng(seed)
    limit = asyncio.Semaphore(concurrency)
    results: list[RequestResult] = []

    async def one(index: int, session: aiohttp.ClientSession) -> None:
        async with limit:
            result = await stream_chat(session, base_url, model, prompts[index % len(prompts)],
                                       max_tokens, headers)
            result.index = index
            results.append(result)

    from rich.progress import Progress

    began = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        with Progress(transient=True, disable=not progress) as bar:
            task_id = bar.add_task("requests", total=num_requests)
            tasks = []
            for index in range(num_requests):
                if rate:
                    await asyncio.sleep(float(rng.exponential(1.0 / rate)))
                task = asyncio.create_task(one(index, session))
                task.add_done_callback(lambda _: bar.advance(task_id))
                tasks.append(task)
            await asyncio.gather(*tasks)
    results.sort(key=lambda r: r.index)
    return results, time.perf_counter() - began


def _percentile_ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q) * 1000) if values else None


def summarize(results: Sequence[RequestResult], wall_s: float) -> dict[str, Any]:
    """Flat numbers for tables and result files; failed requests count as failed, never dropped."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [t for r in ok if (t := r.tpot_s) is not None]
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results),
        "succeeded": len(ok),
        "failed": len(results) - len(ok),
        "ttft_p50_ms": _percentile_ms(ttft, 50),
        "ttft_p99_ms": _percentile_ms(ttft, 99),
        "tpot_p50_ms": _percentile_ms(tpot, 50),
        "tpot_p99_ms": _percentile_ms(tpot, 99),
        "output_tokens": output_tokens,
        "output_tok_per_s": output_tokens / wall_s if wall_s > 0 else None,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "wall_s": wall_s,
    }


def print_summary(summary: dict[str, Any], title: str = "workload") -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(value: Any) -> str:
        return "-" if value is None else (f"{value:.1f}" if isinstance(value, float) else str(value))

    table = Table(title=title, caption="latencies in ms; tok/s = output tokens per second")
    for column in ("reqs", "failed", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
                   "tok/s", "req/s"):
        table.add_column(column, justify="right")
    table.add_row(fmt(summary["requests"]), fmt(summary["failed"]), fmt(summary["ttft_p50_ms"]),
                  fmt(summary["ttft_p99_ms"]), fmt(summary["tpot_p50_ms"]),
                  fmt(summary["tpot_p99_ms"]), fmt(summary["output_tok_per_s"]),
                  fmt(summary["requests_per_s"]))
    Console().print(table)


def _run(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    prompts = load_prompts(args.prompts, args.num_requests)
    results, wall = asyncio.run(run_load(args.url.rstrip("/"), args.model, prompts,
                                         args.num_requests, args.concurrency, args.max_tokens,
                                         args.rate, headers, args.seed, progress=True))
    summary = summarize(results, wall)
    print_summary(summary, title=f"{args.url} · {args.model}")
    for failure in [r for r in results if not r.ok][:5]:
        print(f"failed: {failure.error}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary,
                                         "requests": [asdict(r) for r in results]}, indent=1))
    return 0 if summary["failed"] == 0 else 1


def add_subcommand(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "load", help="send a streaming chat workload to an OpenAI URL and print latency",
        description="Send streaming chat completions (greedy) to an OpenAI-compatible server "
                    "(vllm serve or xllm-router) and print TTFT/TPOT percentiles and throughput. "
                    "Exits 1 if any request failed.")
    parser.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="model name as the server lists it")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4, help="max requests in flight")
    parser.add_argument("--rate", type=float, default=None,
                        help="Poisson arrival rate in req/s (default: closed loop)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompts", choices=sorted(PROMPT_SETS), default="builtin",
                        help="builtin: a few short questions; sharegpt: first turns from "
                             "../shared/data/sharegpt")
    parser.add_argument("--api-key", default=None, help="sent as a Bearer token")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write summary and per-request data")
    parser.set_defaults(func=_run)
