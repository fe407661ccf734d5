"""The Batch API on a real router process in front of a real engine: offline class, kill -9.

The router runs as its own process (``xllm-router --batch-dir``) so that a kill -9
is a real crash: nothing is flushed or finalised. Its successor on the same
directory must finish the job without repeating finished lines.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from router_fakes import wait_for

from conftest import free_port_in

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

LINES = 12


def _router_process(engine_url: str, port: int, batch_dir: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "router.cli", "--port", str(port), "--instances",
         f"{engine_url};id=engine-0", "--batch-dir", str(batch_dir), "--batch-concurrency", "2",
         "--scrape-interval-s", "0.2"],
        stdout=log.open("a"), stderr=subprocess.STDOUT)


async def _wait_ready(client: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            async with client.get(url + "/ready") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError("router did not become ready")


async def _offline_finished(client: aiohttp.ClientSession, engine_url: str) -> int:
    async with client.get(engine_url + "/xllm/status") as r:
        return (await r.json())["engine"]["finished"]["offline"]


async def test_batch_job_runs_offline_on_the_engine_and_survives_router_kill_9(
        router_engines, client, tmp_path: Path) -> None:
    engine = router_engines[0]  # the engine with the plugin: it counts requests by class
    port = free_port_in(8150, 8189)
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "router.log"
    offline_before = await _offline_finished(client, engine.url)
    router = _router_process(engine.url, port, tmp_path / "batches", log)
    try:
        await _wait_ready(client, url)
        lines = b"".join(json.dumps({
            "custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
            "body": {"model": "tiny", "prompt": f"Item {i}:", "max_tokens": 120, "temperature": 0,
                     "ignore_eos": True}}).encode() + b"\n" for i in range(LINES))
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", lines, filename="lines.jsonl")
        async with client.post(url + "/v1/files", data=form) as r:
            file_id = (await r.json())["id"]
        async with client.post(url + "/v1/batches", json={
                "input_file_id": file_id, "endpoint": "/v1/completions",
                "completion_window": "24h"}) as r:
            assert r.status == 200, await r.text()
            batch_id = (await r.json())["id"]

        results = tmp_path / "batches" / "batches" / f"{batch_id}.out"
        await wait_for(lambda: results.exists() and results.read_bytes().count(b"\n") >= 2, 60,
                       "a few lines to finish")
        router.send_signal(signal.SIGKILL)
        router.wait(10)
        finished_before_crash = results.read_bytes().count(b"\n")
        assert finished_before_crash < LINES, "the job finished before the crash; make it longer"

        router = _router_process(engine.url, port, tmp_path / "batches", log)
        await _wait_ready(client, url)
        deadline = time.monotonic() + 120
        while True:
            async with client.get(f"{url}/v1/batches/{batch_id}") as r:
                batch = await r.json()
            if batch["status"] == "completed" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert batch["status"] == "completed", batch
        assert batch["request_counts"] == {"total": LINES, "completed": LINES, "failed": 0}
        async with client.get(f"{url}/v1/files/{batch['output_file_id']}/content") as r:
            output = [json.loads(line) for line in (await r.read()).splitlines()]
        assert sorted(o["custom_id"] for o in output) == sorted(f"line-{i}" for i in range(LINES))
        assert all(o["response"]["body"]["usage"]["completion_tokens"] == 120 for o in output)
        # Every line reached the engine as offline work (the plugin counts by class); lines in
        # flight at the crash may have run twice, finished ones never.
        offline = await _offline_finished(client, engine.url) - offline_before
        assert LINES <= offline <= LINES + 2
    finally:
        router.send_signal(signal.SIGTERM)
        try:
            router.wait(10)
        except subprocess.TimeoutExpired:
            router.kill()
