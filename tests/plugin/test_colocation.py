"""Online/offline co-location in the engine: online work preempts offline work, nothing is lost."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from xllm_plugin.launcher.engine import EngineProcess

pytestmark = pytest.mark.engine

OFFLINE_TOKENS = 1200
# Generous for a shared 2-core CI machine; the point is that the online request
# does not wait for an offline job (hundreds of decode steps) to finish.
ONLINE_TTFT_SLO_S = 2.0


def _offline_prompts(count: int) -> list[str]:
    return [f"Offline job {i}: summarise the archive" for i in range(count)]


async def _offline(client: httpx.AsyncClient, url: str, prompt: str) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": OFFLINE_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "vllm_xargs": {"request_class": "offline"}}
    response = await client.post(f"{url}/v1/completions", json=body, timeout=300)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


async def _online_ttft(client: httpx.AsyncClient, url: str) -> float:
    body = {"model": "tiny", "prompt": "Urgent question:", "max_tokens": 4, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                return time.perf_counter() - start
    raise AssertionError("online stream produced no text")


async def _status(client: httpx.AsyncClient, url: str) -> dict:
    return (await client.get(f"{url}/xllm/status")).json()["engine"]


async def _stock_holds(client: httpx.AsyncClient, url: str) -> float:
    """Requests stock vLLM has received and not finished (running or waiting), from its
    Prometheus gauges."""
    text = (await client.get(f"{url}/metrics")).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name in ("vllm:num_requests_running", "vllm:num_requests_waiting"))


async def _wait_for(predicate, timeout_s: float = 60.0,  # type: ignore[no-untyped-def]
                    seen: list | None = None) -> None:
    """``seen``: what the predicate observed, for the failure message."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not reached in {timeout_s:.0f} s"
                         + (f"; observed (changes only): {seen}" if seen is not None else ""))


async def test_online_request_preempts_offline_and_offline_output_is_unchanged(
        plugin_engine: EngineProcess, stock_engine: EngineProcess,
        engine_max_num_seqs: int) -> None:
    url = plugin_engine.url
    prompts = _offline_prompts(engine_max_num_seqs)
    async with httpx.AsyncClient() as client:
        reference = await asyncio.gather(*[_offline(client, stock_engine.url, p)
                                           for p in prompts])
        before = await _status(client, url)
        offline = [asyncio.create_task(_offline(client, url, p)) for p in prompts]

        async def saturated() -> bool:
            return (await _status(client, url))["running"]["offline"] == engine_max_num_seqs

        await _wait_for(saturated)
        ttft = await _online_ttft(client, url)

        async def preempted_for_online() -> bool:
            # Snapshots are rate-limited: wait for one taken after the preemption.
            now = await _status(client, url)
            return now["offline_preempted_for_online"] > before["offline_preempted_for_online"]

        await _wait_for(preempted_for_online, timeout_s=10)
        outputs = await asyncio.gather(*offline)
        want_finished = before["finished"]["offline"] + engine_max_num_seqs
        deadline = time.monotonic() + 5  # status snapshots are rate-limited: wait for a fresh one
        after = await _status(client, url)
        while after["finished"]["offline"] < want_finished and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            after = await _status(client, url)

    assert ttft < ONLINE_TTFT_SLO_S
    assert after["preemptions"]["online"] == before["preemptions"]["online"]
    assert after["finished"]["offline"] == want_finished
    assert outputs == reference


async def _stream_times(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int,
                        xargs: dict, first_token: asyncio.Event | None = None
                        ) -> tuple[float, float]:
    """(first text, end of stream) in ``time.perf_counter`` seconds."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "vllm_xargs": xargs}
    first = None
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as response:
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {") and \
                    json.loads(line[6:])["choices"][0]["text"]:
                first = time.perf_counter()
                if first_token is not None:
                    first_token.set()
    assert first is not None, "stream produced no text"
    return first, time.perf_counter()


async def test_step_budget_floor_moves_online_prefill_only(plugin_engine: EngineProcess) -> None:
    """While an online request decodes under a TPOT SLO no step can meet (1 ms), a step's
    prefill tokens are the floor (``slo.min_prefill_tokens``), and only online prefill may
    use it: a later online request starts while the long one still decodes, an offline
    request submitted before it starts only once the online decodes are done."""
    url = plugin_engine.url
    async with httpx.AsyncClient() as client:
        decoding = asyncio.Event()
        long_online = asyncio.create_task(_stream_times(
            client, url, "Keep talking:", 400, {"slo_tpot_ms": 1}, decoding))
        await asyncio.wait_for(decoding.wait(), timeout=60)
        offline = asyncio.create_task(_stream_times(
            client, url, "Offline job: summarise the archive", 4, {"request_class": "offline"}))
        await asyncio.sleep(0.3)
        online = asyncio.create_task(_stream_times(client, url, "Quick question:", 4, {}))
        (_, long_done), (offline_first, _), (online_first, _) = await asyncio.gather(
            long_online, offline, online)
        budget = (await _status(client, url))["budget"]
    assert online_first < long_done
    assert offline_first > long_done
    # The status compares each sized step with the model's prediction for the work it
    # held (not with the time planned for the most work the limit allowed).
    assert budget["last_predicted_ms"] > 0 and budget["last_step_ms"] > 0
    timing = budget["timing"]
    assert timing["sized_steps"] > 0
    assert 0.2 < timing["compute_over_predicted_p50"] < 5


async def test_stock_vllm_makes_the_online_request_wait_for_offline_work(
        stock_engine: EngineProcess, engine_max_num_seqs: int) -> None:
    """The A side of the comparison: without the plugin all slots stay taken by offline jobs."""
    async with httpx.AsyncClient() as client:
        offline = [asyncio.create_task(_offline(client, stock_engine.url, p))
                   for p in _offline_prompts(engine_max_num_seqs)]

        holds_seen: list[tuple[float, float]] = []
        started = time.monotonic()

        async def all_offline_received() -> bool:
            # After a fixed sleep a slow host can admit the online request before the
            # last offline one reaches the engine (the likely cause of CI's failure at
            # stop 41: all four offline jobs unfinished at the online first token).
            # At least, not exactly: this session-wide engine may still hold a request of
            # an earlier test. A timeout lists the counts read.
            holds = await _stock_holds(client, stock_engine.url)
            if not holds_seen or holds_seen[-1][1] != holds:
                holds_seen.append((round(time.monotonic() - started, 2), holds))
            return holds >= engine_max_num_seqs

        await _wait_for(all_offline_received, seen=holds_seen)
        await _online_ttft(client, stock_engine.url)
        unfinished = sum(not task.done() for task in offline)
        await asyncio.gather(*offline)
    # The online request got its first token only after an offline job had finished.
    assert unfinished < engine_max_num_seqs
