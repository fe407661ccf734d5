"""Runs batch lines through the router at offline class, resumably.

A batch's progress is the set of result lines on disk, so the runner needs no
other state to resume: on start it picks up every active batch and sends only
the lines without a result. A line is sent at most once per router lifetime;
after a crash, lines that were in flight but not recorded are sent again
(at-least-once, never a duplicate result line for a ``custom_id``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from router.batch.store import BatchRecord, BatchStore, InputLine, StoreError

log = logging.getLogger("xllm.router.batch")

# (endpoint path, request body) -> (HTTP status, JSON body)
Sender = Callable[[str, dict[str, Any]], Awaitable[tuple[int, dict[str, Any]]]]
OFFLINE_HEADERS = {"x-request-class": "offline"}
COUNTS_SAVE_INTERVAL_S = 0.5


def http_sender(session: aiohttp.ClientSession, base_url: str, api_key: str | None = None,
                timeout_s: float = 3600.0) -> Sender:
    """Send lines to an OpenAI front door (the router itself) marked as offline work."""
    headers = dict(OFFLINE_HEADERS)
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"

    async def send(path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with session.post(base_url + path, json={**body, "stream": False}, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            try:
                data = await response.json(content_type=None)
            except (aiohttp.ContentTypeError, ValueError):
                data = {"error": {"message": (await response.text())[:500]}}
            return response.status, data if isinstance(data, dict) else {"data": data}

    return send


class BatchRunner:
    def __init__(self, store: BatchStore, send: Sender, concurrency: int = 4) -> None:
        self.store = store
        self._send = send
        self._concurrency = concurrency
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancel_requested: set[str] = set()

    def start(self) -> None:
        """Resume every batch that was active when the router last stopped."""
        for batch in self.store.active_batches():
            log.info("resuming batch %s (%s)", batch.id, batch.status)
            self.submit(batch.id)

    def submit(self, batch_id: str) -> None:
        if batch_id not in self._tasks:
            task = asyncio.get_running_loop().create_task(self._run(batch_id))
            self._tasks[batch_id] = task
            task.add_done_callback(lambda _: self._tasks.pop(batch_id, None))

    def cancel(self, batch_id: str) -> BatchRecord:
        batch = self.store.get_batch(batch_id)
        if batch.status not in ("validating", "in_progress", "cancelling"):
            raise StoreError(409, f"cannot cancel batch {batch_id} with status '{batch.status}'")
        if batch.status != "cancelling":
            batch.status, batch.cancelling_at = "cancelling", int(time.time())
            self.store.save_batch(batch)
        self._cancel_requested.add(batch_id)
        self.submit(batch_id)  # finalizes it if no task is running
        return batch

    async def stop(self) -> None:
        """Stop work for a router shutdown; persisted state lets the next start resume."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait(self, batch_id: str) -> None:
        task = self._tasks.get(batch_id)
        if task is not None:
            await asyncio.shield(task)

    async def _run(self, batch_id: str) -> None:
        batch = self.store.get_batch(batch_id)
        done = self.store.finished_custom_ids(batch_id)
        pending = [line for line in self.store.input_lines(batch) if line.custom_id not in done]
        counts = batch.request_counts
        counts.completed = sum(1 for _ in self.store.results(batch_id, failed=False))
        counts.failed = sum(1 for _ in self.store.results(batch_id, failed=True))
        limit = asyncio.Semaphore(self._concurrency)
        last_save = 0.0

        async def one(line: InputLine) -> None:
            nonlocal last_save
            async with limit:
                if self._cancelling(batch_id):
                    return
                failed, result = await self._execute(line)
                self.store.append_result(batch_id, result, failed)
                if failed:
                    counts.failed += 1
                else:
                    counts.completed += 1
                if time.monotonic() - last_save > COUNTS_SAVE_INTERVAL_S:
                    last_save = time.monotonic()
                    self._save_counts(batch_id, counts)

        if batch.status != "cancelling":
            await asyncio.gather(*[one(line) for line in pending])
        self._finalize(batch_id, counts)

    def _cancelling(self, batch_id: str) -> bool:
        return batch_id in self._cancel_requested

    async def _execute(self, line: InputLine) -> tuple[bool, dict[str, Any]]:
        request_id = f"batch_req_{uuid.uuid4().hex[:24]}"
        try:
            status, body = await self._send(line.url, line.body)
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            return True, {"id": request_id, "custom_id": line.custom_id, "response": None,
                          "error": {"code": "request_failed", "message": f"{type(error).__name__}: {error}"}}
        response = {"status_code": status, "request_id": body.get("id", request_id), "body": body}
        if status == 200:
            return False, {"id": request_id, "custom_id": line.custom_id, "response": response,
                           "error": None}
        message = (body.get("error") or {}).get("message", f"HTTP {status}") \
            if isinstance(body.get("error"), dict) else f"HTTP {status}"
        return True, {"id": request_id, "custom_id": line.custom_id, "response": response,
                      "error": {"code": str(status), "message": message}}

    def _save_counts(self, batch_id: str, counts: Any) -> None:
        batch = self.store.get_batch(batch_id)
        batch.request_counts = counts
        self.store.save_batch(batch)

    def _finalize(self, batch_id: str, counts: Any) -> None:
        batch = self.store.get_batch(batch_id)
        batch.request_counts = counts
        now = int(time.time())
        if batch.status == "cancelling" or self._cancelling(batch_id):
            self.store.publish_results(batch)
            batch.status, batch.cancelled_at = "cancelled", now
        else:
            batch.status, batch.finalizing_at = "finalizing", now
            self.store.save_batch(batch)
            self.store.publish_results(batch)
            batch.status, batch.completed_at = "completed", int(time.time())
        self._cancel_requested.discard(batch_id)
        self.store.save_batch(batch)
        log.info("batch %s %s: %d completed, %d failed of %d", batch.id, batch.status,
                 counts.completed, counts.failed, counts.total)
