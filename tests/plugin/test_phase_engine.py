"""Phase-aware batching inside a real ``vllm serve`` of the tiny multimodal model: image
requests that arrive while long text prompts are mid-prefill are held back (the status
feed counts it), and every answer equals the one the request gets alone (greedy, float32)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from xllm_plugin.launcher.engine import EngineProcess, EngineSpec, free_port
from xllm_plugin.models.tiny_mm import sample_image_url

pytestmark = pytest.mark.engine

MODEL = "tiny-mm"
STEP_TOKENS = 32  # a small step budget: each long prompt prefills over many steps
TEXT_PROMPTS = 6
TEXT_WORDS = 300  # about 600 tokens: ~20 steps of prefill each


@pytest.fixture(scope="module")
def phase_engine() -> Iterator[EngineProcess]:
    from xllm_plugin.models import build_model

    spec = EngineSpec(
        model=build_model(MODEL), port=free_port(), served_model_name=MODEL, plugin=True,
        xllm_config={"status_interval_ms": 20,
                     "batching": {"phase_aware": True, "max_encode_hold_steps": 10_000}},
        cpu_bind="0", max_model_len=1024,
        extra_args=["--dtype", "float32", "--max-num-batched-tokens", str(STEP_TOKENS),
                    "--enable-chunked-prefill", "--no-enable-prefix-caching"])
    engine = EngineProcess(spec, log_path=Path("/tmp/xllm-phase-test.log"))
    engine.start(timeout_s=240)
    try:
        yield engine
    finally:
        engine.stop()


def _image_chat(seed: int) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": sample_image_url(seed)}},
                {"type": "text", "text": "Describe the image."}]}]}


def _text(i: int) -> dict[str, Any]:
    words = " ".join(f"w{(i * 7 + k) % 50}" for k in range(TEXT_WORDS))
    return {"model": MODEL, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "prompt": words}


async def _answer(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> str:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = await client.post(url + path, json=body, timeout=300)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["message"]["content"] if "messages" in body else choice["text"]


async def _engine_status(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    return (await client.get(url + "/xllm/status")).json()["engine"]


async def test_images_wait_for_unfinished_prefills_and_answers_are_unchanged(
        phase_engine: EngineProcess) -> None:
    url = phase_engine.url
    texts = [_text(i) for i in range(TEXT_PROMPTS)]
    images = [_image_chat(seed) for seed in range(3)]
    async with httpx.AsyncClient() as client:
        # Together first: the images are new to the encoder cache, so they need the encoder.
        text_tasks = [asyncio.create_task(_answer(client, url, body)) for body in texts]
        for _ in range(500):  # until the long prompts are being prefilled
            if (await _engine_status(client, url))["running"]["online"]:
                break
            await asyncio.sleep(0.01)
        image_answers = await asyncio.gather(*(_answer(client, url, b) for b in images))
        text_answers = await asyncio.gather(*text_tasks)
        status = await _engine_status(client, url)
        alone = [await _answer(client, url, body) for body in [*texts, *images]]
    assert [*text_answers, *image_answers] == alone
    assert status["phase_aware"]["encode_holds"] > 0
    assert status["phase_aware"]["released_by_cap"] == 0
