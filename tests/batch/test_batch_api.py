"""Batch API: OpenAI shapes, offline marking, failures, cancel, and resume after a crash."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from router.batch import BatchRunner, BatchStore, http_sender
from router.batch.routes import BatchAPI


class FakeUpstream:
    """An OpenAI chat endpoint that records what it was sent; prompts starting 'bad' get 400."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: Counter[str] = Counter()
        self.classes: Counter[str] = Counter()

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        prompt = body["messages"][0]["content"]
        self.calls[prompt] += 1
        self.classes[request.headers.get("x-request-class", "")] += 1
        await asyncio.sleep(self.delay_s)
        if prompt.startswith("bad"):
            return web.json_response({"error": {"message": "bad prompt", "type": "invalid_request_error",
                                                "param": None, "code": 400}}, status=400)
        return web.json_response({"id": f"chatcmpl-{prompt}", "object": "chat.completion",
                                  "choices": [{"index": 0, "message": {"role": "assistant",
                                                                       "content": prompt.upper()}}]})


def _lines(prompts: list[str], url: str = "/v1/chat/completions") -> bytes:
    return b"".join(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url,
                                "body": {"model": "m", "messages": [{"role": "user", "content": p}]}
                                }).encode() + b"\n" for i, p in enumerate(prompts))


class Harness:
    def __init__(self, root: Path, upstream: FakeUpstream) -> None:
        self.root = root
        self.upstream = upstream

    async def __aenter__(self) -> Harness:
        upstream_app = web.Application()
        upstream_app.router.add_post("/v1/chat/completions", self.upstream.chat)
        self.upstream_server = TestServer(upstream_app)
        await self.upstream_server.start_server()
        self.session = aiohttp.ClientSession()
        await self.open_router()
        return self

    async def open_router(self) -> None:
        self.store = BatchStore(self.root)
        base = str(self.upstream_server.make_url("")).rstrip("/")
        self.runner = BatchRunner(self.store, http_sender(self.session, base), concurrency=2)
        app = web.Application()
        BatchAPI(self.store, self.runner).add_routes(app)
        self.client = TestClient(TestServer(app))
        await self.client.start_server()
        self.runner.start()

    async def crash_router(self) -> None:
        """Drop the router without any orderly finalisation (tasks just stop)."""
        await self.runner.stop()
        await self.client.close()

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.stop()
        await self.client.close()
        await self.session.close()
        await self.upstream_server.close()

    async def upload(self, content: bytes, purpose: str = "batch") -> dict:
        form = aiohttp.FormData()
        form.add_field("purpose", purpose)
        form.add_field("file", content, filename="in.jsonl")
        response = await self.client.post("/v1/files", data=form)
        return await response.json()

    async def create(self, file_id: str, **overrides: object) -> aiohttp.ClientResponse:
        body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                "completion_window": "24h", **overrides}
        return await self.client.post("/v1/batches", json=body)

    async def wait_status(self, batch_id: str, statuses: set[str], timeout_s: float = 20) -> dict:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            batch = await (await self.client.get(f"/v1/batches/{batch_id}")).json()
            if batch["status"] in statuses or asyncio.get_running_loop().time() > deadline:
                return batch
            await asyncio.sleep(0.05)

    async def content(self, file_id: str) -> list[dict]:
        raw = await (await self.client.get(f"/v1/files/{file_id}/content")).read()
        return [json.loads(line) for line in raw.splitlines()]


@pytest_asyncio.fixture(loop_scope="function")
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with Harness(tmp_path, FakeUpstream()) as h:
        yield h


async def test_batch_runs_every_line_at_offline_class_and_returns_output_file(harness: Harness) -> None:
    uploaded = await harness.upload(_lines(["a", "b", "c"]))
    assert uploaded["object"] == "file" and uploaded["purpose"] == "batch"
    created = await (await harness.create(uploaded["id"], metadata={"job": "nightly"})).json()
    assert created["object"] == "batch" and created["metadata"] == {"job": "nightly"}
    batch = await harness.wait_status(created["id"], {"completed"})
    assert batch["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    output = await harness.content(batch["output_file_id"])
    by_id = {line["custom_id"]: line for line in output}
    assert by_id["req-1"]["response"]["status_code"] == 200
    assert by_id["req-1"]["response"]["body"]["choices"][0]["message"]["content"] == "B"
    assert harness.upstream.classes == Counter({"offline": 3})


async def test_failed_lines_go_to_the_error_file(harness: Harness) -> None:
    uploaded = await harness.upload(_lines(["ok", "bad one"]))
    created = await (await harness.create(uploaded["id"])).json()
    batch = await harness.wait_status(created["id"], {"completed"})
    assert batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    errors = await harness.content(batch["error_file_id"])
    assert [e["custom_id"] for e in errors] == ["req-1"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["error"]["message"] == "bad prompt"


async def test_invalid_input_fails_validation_with_line_numbers(harness: Harness) -> None:
    bad = _lines(["a"]) + b"{not json\n" + _lines(["b"], url="/v1/completions")
    uploaded = await harness.upload(bad)
    batch = await (await harness.create(uploaded["id"])).json()
    assert batch["status"] == "failed"
    assert {(e["code"], e["line"]) for e in batch["errors"]["data"]} >= {
        ("invalid_json_line", 2), ("mismatched_endpoint", 3)}


@pytest.mark.parametrize(("method", "path", "body", "status", "param"), [
    ("GET", "/v1/batches/batch_missing", None, 404, "batch_id"),
    ("GET", "/v1/files/file-missing/content", None, 404, "file_id"),
    ("GET", "/v1/batches/../../etc", None, 404, None),
    ("POST", "/v1/batches", {"endpoint": "/v1/chat/completions"}, 400, "input_file_id"),
    ("POST", "/v1/batches", {"input_file_id": "file-x", "endpoint": "/v1/embeddings",
                             "completion_window": "24h"}, 400, "endpoint"),
    ("GET", "/v1/batches?limit=0", None, 400, "limit"),
])
async def test_bad_requests_get_openai_error_shapes(harness: Harness, method: str, path: str,
                                                    body: dict | None, status: int,
                                                    param: str | None) -> None:
    response = await harness.client.request(method, path, json=body)
    assert response.status == status
    if param is not None:
        error = (await response.json())["error"]
        assert error["param"] == param and error["message"]


async def test_upload_needs_batch_purpose(harness: Harness) -> None:
    response = await harness.upload(_lines(["a"]), purpose="fine-tune")
    assert response["error"]["param"] == "purpose"


async def test_cancel_stops_sending_and_finished_batches_cannot_be_cancelled(tmp_path: Path) -> None:
    async with Harness(tmp_path, FakeUpstream(delay_s=0.2)) as h:
        uploaded = await h.upload(_lines([f"p{i}" for i in range(20)]))
        created = await (await h.create(uploaded["id"])).json()
        await asyncio.sleep(0.3)
        cancelling = await (await h.client.post(f"/v1/batches/{created['id']}/cancel")).json()
        assert cancelling["status"] == "cancelling"
        batch = await h.wait_status(created["id"], {"cancelled"})
        assert batch["status"] == "cancelled"
        assert batch["request_counts"]["completed"] < 20
        again = await h.client.post(f"/v1/batches/{created['id']}/cancel")
        assert again.status == 409


async def test_batch_survives_a_router_crash_without_duplicates(tmp_path: Path) -> None:
    prompts = [f"p{i}" for i in range(12)]
    async with Harness(tmp_path, FakeUpstream(delay_s=0.1)) as h:
        uploaded = await h.upload(_lines(prompts))
        created = await (await h.create(uploaded["id"])).json()
        await h.wait_status(created["id"], {"completed"}, timeout_s=0.35)
        await h.crash_router()
        finished_before = len(BatchStore(tmp_path).finished_custom_ids(created["id"]))
        assert 0 < finished_before < len(prompts)

        await h.open_router()  # a new router process on the same batch directory
        batch = await h.wait_status(created["id"], {"completed"})
        output = await h.content(batch["output_file_id"])
    assert sorted(line["custom_id"] for line in output) == sorted(f"req-{i}" for i in range(12))
    assert batch["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
    # Lines finished before the crash were not sent again.
    assert sum(h.upstream.calls.values()) <= len(prompts) + 2  # at most the in-flight pair twice


def test_torn_last_result_line_is_ignored(tmp_path: Path) -> None:
    store = BatchStore(tmp_path)
    store.append_result("batch_x", {"custom_id": "a"}, failed=False)
    with open(tmp_path / "batches" / "batch_x.out", "ab") as handle:
        handle.write(b'{"custom_id": "b", "resp')
    assert store.finished_custom_ids("batch_x") == {"a"}
