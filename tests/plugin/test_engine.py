"""The plugin inside a real ``vllm serve`` (tiny model): active, correct, and OpenAI-compatible."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from xllm_plugin.config import XLLMConfig
from xllm_plugin.launcher.engine import EngineProcess, EngineSpec, free_port

pytestmark = pytest.mark.engine

PROMPTS = [
    "The quick brown fox",
    "In a distant galaxy, far away,",
    "def fibonacci(n):",
    "Once upon a time",
    "The capital of France is",
    "1, 2, 3, 4,",
    "Dear hiring manager, I am writing to",
    "Rain falls softly on",
]


async def _complete(client: httpx.AsyncClient, url: str, prompt: str, **extra: object) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0.0, **extra}
    response = await client.post(f"{url}/v1/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()


async def _greedy_texts(url: str) -> list[str]:
    async with httpx.AsyncClient() as client:
        replies = await asyncio.gather(*[_complete(client, url, p) for p in PROMPTS])
    return [r["choices"][0]["text"] for r in replies]


async def test_greedy_outputs_equal_stock_vllm(plugin_engine: EngineProcess,
                                               stock_engine: EngineProcess) -> None:
    ours, stock = await asyncio.gather(_greedy_texts(plugin_engine.url),
                                       _greedy_texts(stock_engine.url))
    assert all(text for text in ours)
    assert ours == stock


async def test_status_shows_plugin_active_inside_the_engine(plugin_engine: EngineProcess,
                                                            stock_engine: EngineProcess) -> None:
    async with httpx.AsyncClient() as client:
        status = (await client.get(f"{plugin_engine.url}/xllm/status")).json()
        stock_status = await client.get(f"{stock_engine.url}/xllm/status")
    assert status["plugin"] == "xllm-plugin"
    assert status["features"]["xllm_scheduler"] is True
    engine = status["engine"]
    assert engine["scheduler"] == "XLLMScheduler"
    # Published by the engine-core process, not the API server that answers HTTP.
    assert engine["engine_pid"] != plugin_engine.process.pid
    assert engine["config"]["status_interval_ms"] == 20
    assert stock_status.status_code == 404


async def test_status_counts_running_requests_by_class(plugin_engine: EngineProcess) -> None:
    url = plugin_engine.url
    async with httpx.AsyncClient() as client:
        before = (await client.get(f"{url}/xllm/status")).json()["engine"]["finished"]
        long_requests = [
            asyncio.create_task(_complete(client, url, "Count slowly:", max_tokens=400,
                                          ignore_eos=True)),
            asyncio.create_task(_complete(client, url, "Count slowly:", max_tokens=400,
                                          ignore_eos=True,
                                          vllm_xargs={"request_class": "offline"})),
        ]
        seen = {"online": 0, "offline": 0}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(seen.values()):
            running = (await client.get(f"{url}/xllm/status")).json()["engine"]["running"]
            seen = {c: max(seen[c], running[c]) for c in seen}
            await asyncio.sleep(0.02)
        await asyncio.gather(*long_requests)
        # The engine publishes its state on its own clock: the answers can reach us first.
        deadline = time.monotonic() + 5
        while True:
            after = (await client.get(f"{url}/xllm/status")).json()["engine"]
            if not any(after["running"].values()) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    assert seen == {"online": 1, "offline": 1}
    assert after["running"] == {"online": 0, "offline": 0}
    assert after["finished"]["online"] == before["online"] + 1
    assert after["finished"]["offline"] == before["offline"] + 1


async def test_completions_through_the_plugin(plugin_engine: EngineProcess) -> None:
    async with httpx.AsyncClient() as client:
        reply = await _complete(client, plugin_engine.url, "Hello", max_tokens=8, ignore_eos=True)
    assert reply["object"] == "text_completion"
    assert reply["usage"]["completion_tokens"] == 8


async def test_streaming_chat_through_the_plugin(plugin_engine: EngineProcess) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": 12, "temperature": 0.0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    chunks: list[dict] = []
    async with httpx.AsyncClient() as client, client.stream(
            "POST", f"{plugin_engine.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    content = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert sum(1 for piece in content if piece) >= 2  # arrived as several chunks
    assert chunks[-1]["usage"]["completion_tokens"] == 12


def _serve_with_config(model: Path, config: str) -> subprocess.CompletedProcess[str]:
    spec = EngineSpec(model=model, port=free_port(), served_model_name="tiny")
    command = [*spec.command(), "--additional-config", config]
    return subprocess.run(command, env=spec.environment(), capture_output=True, text=True,
                          timeout=180)


@pytest.mark.parametrize(("config", "expected"), [
    ('{"xllm": {"bogus": 1}}',
     "unknown key 'xllm.bogus' in --additional-config; allowed keys: "
     + ", ".join(sorted(XLLMConfig.model_fields))),
    ('{"xllm": {"status_interval_ms": -5}}',
     "bad value -5 for 'xllm.status_interval_ms' in --additional-config; "
     "allowed: int >= 1 and <= 60000"),
])
def test_bad_additional_config_stops_startup_before_the_engine(tiny_model_dir: Path, config: str,
                                                               expected: str) -> None:
    result = _serve_with_config(tiny_model_dir, config)
    assert result.returncode == 2
    assert f"xllm-plugin: {expected}\n" in result.stderr
    # Rejected in the API-server process: no engine was ever started.
    assert "EngineCore" not in result.stdout + result.stderr


def test_xllm_vllm_reports_the_vllm_version() -> None:
    exe = Path(sys.executable).with_name("xllm-vllm")
    result = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("0.32.0")
