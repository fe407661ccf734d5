"""xTensor inside a real ``vllm serve`` (tiny model): greedy outputs equal stock vLLM's,
with prefix caching and preemption, and /xllm/status shows the KV memory at work."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest

from xllm_plugin.kernels import native_decode
from xllm_plugin.launcher.engine import EngineProcess, EngineSpec, free_port
from xllm_plugin.memory.wiring import WORKER_CLS

pytestmark = pytest.mark.engine

# Small KV on purpose: 24 blocks of 32 tokens (768 tokens) for 4 run slots, so that
# concurrent long requests preempt each other and resume by recomputation.
XTENSOR_ARGS = ["--max-num-seqs", "4", "--dtype", "float32", "--num-gpu-blocks-override", "24",
                "--worker-cls", WORKER_CLS]
STEM = "The committee reviewed the quarterly report and noted that "
PROMPTS = [
    "Hi",
    "The quick brown fox",
    STEM,                                      # shared prefix: prefix-cache hits
    STEM + "revenue grew in every region",
    STEM + "costs fell",
    "def fibonacci(n):\n    " + "a, b = b, a + b\n    " * 12,
    " ".join(f"item {i}," for i in range(60)),  # ~240 tokens
    "Once upon a time " * 25,                  # ~125 tokens
]
MAX_TOKENS = 120


class XTensorEngine(NamedTuple):
    url: str
    views: bool  # whether the VMA budget lets requests have views


# "no views": a VMA budget of a few mappings, so no request gets a view and every decode
# row reads its pages in place through its page table (what a worker does once
# vm.max_map_count runs short).
@pytest.fixture(scope="module", params=["views", "no views"])
def xtensor_engine(tiny_model_dir: Path, request: pytest.FixtureRequest
                   ) -> Iterator[XTensorEngine]:
    xllm: dict = {"xtensor": True, "status_interval_ms": 20}
    if request.param == "no views":
        xllm["xtensor_options"] = {"map_budget_fraction": 1e-6}
    spec = EngineSpec(model=tiny_model_dir, port=free_port(), served_model_name="tiny",
                      plugin=True, xllm_config=xllm,
                      cpu_bind="0", block_size=32, max_model_len=512, extra_args=XTENSOR_ARGS)
    with EngineProcess(spec) as engine:
        yield XTensorEngine(engine.url, views=request.param == "views")


async def _greedy(client: httpx.AsyncClient, url: str, prompt: str) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True}
    response = await client.post(f"{url}/v1/completions", json=body, timeout=300)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


async def _all(url: str) -> list[str]:
    async with httpx.AsyncClient() as client:
        return list(await asyncio.gather(*[_greedy(client, url, p) for p in PROMPTS]))


async def test_greedy_outputs_equal_stock_with_prefix_caching_and_preemption(
        xtensor_engine: XTensorEngine, stock_engine: EngineProcess) -> None:
    ours = await _all(xtensor_engine.url)
    again = await _all(xtensor_engine.url)  # now prefixes are cached and views are reused
    stock = await _all(stock_engine.url)
    assert ours == stock
    assert again == stock
    async with httpx.AsyncClient() as client:
        status = (await client.get(f"{xtensor_engine.url}/xllm/status")).json()
    assert status["features"]["xtensor"] is True
    assert sum(status["engine"]["preemptions"].values()) > 0  # the KV cache ran out
    xt = status["xtensor"]
    if xtensor_engine.views:
        assert xt["rows"] > 0 and xt["fallback_rows"] == 0  # every request read its own view
        assert xt["map_calls"] > 0 and xt["reuse_hits"] > 0
    else:  # every row read its pages through its page table
        assert xt["rows"] > 0 and xt["fallback_rows"] == xt["rows"]


async def test_status_reports_pages_views_and_waste(xtensor_engine: XTensorEngine) -> None:
    if not xtensor_engine.views:
        pytest.skip("views, parking and pre-mapping need a VMA budget")
    await _all(xtensor_engine.url)
    async with httpx.AsyncClient() as client:
        xt = (await client.get(f"{xtensor_engine.url}/xllm/status")).json()["xtensor"]
    assert sum(xt["pages"].values()) == xt["pages_total"] == 24
    assert xt["slots"]["parked"] > 0  # finished requests' views are kept for reuse
    # No request ever held more than one page per plane beyond its tokens.
    assert 0 < xt["wasted_bytes_max"] <= xt["page_bytes"] * xt["planes"]
    assert xt["vma"]["estimate"] <= xt["vma"]["budget"]
    assert xt["map_latency_us"]["p50"] > 0
    assert xt["premap_hits"] > 0  # the next block was mapped before a decode needed it
    lib = native_decode.load()  # the engine builds the same kernel on the same CPU
    assert xt["decode_kernel"] == ("native-" + native_decode.isa(lib) if lib else "sdpa")


def test_xtensor_without_its_worker_stops_startup(tiny_model_dir: Path) -> None:
    spec = EngineSpec(model=tiny_model_dir, port=free_port(), served_model_name="tiny",
                      xllm_config={"xtensor": True})
    result = subprocess.run(spec.command(), env=spec.environment(), capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 2
    assert f"'xllm.xtensor' needs --worker-cls {WORKER_CLS}" in result.stderr
    assert "EngineCore" not in result.stdout + result.stderr
