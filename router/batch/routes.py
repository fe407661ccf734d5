"""HTTP routes of the Batch API, in OpenAI's shapes (``/v1/files``, ``/v1/batches``)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from router.batch.runner import BatchRunner
from router.batch.store import BatchStore, StoreError
from router.server.errors import error_body

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FILE_PURPOSES = ("batch",)
MAX_LIST_LIMIT = 100


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), status=status,
                        content_type="application/json")


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param=param), status=status)


def _answer_store_errors(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except StoreError as error:
            return _error(error.status, error.message, error.param)

    return wrapped


class BatchAPI:
    def __init__(self, store: BatchStore, runner: BatchRunner) -> None:
        self.store = store
        self.runner = runner

    def add_routes(self, app: web.Application) -> None:
        routes: list[tuple[str, str, Handler]] = [
            ("POST", "/v1/files", self.upload_file),
            ("GET", "/v1/files", self.list_files),
            ("GET", "/v1/files/{file_id}", self.get_file),
            ("GET", "/v1/files/{file_id}/content", self.file_content),
            ("DELETE", "/v1/files/{file_id}", self.delete_file),
            ("POST", "/v1/batches", self.create_batch),
            ("GET", "/v1/batches", self.list_batches),
            ("GET", "/v1/batches/{batch_id}", self.get_batch),
            ("POST", "/v1/batches/{batch_id}/cancel", self.cancel_batch),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, _answer_store_errors(handler))

    async def upload_file(self, request: web.Request) -> web.Response:
        if not request.content_type.startswith("multipart/"):
            return _error(400, "upload the file as multipart/form-data with fields "
                               "'file' and 'purpose'")
        purpose, filename, content = None, None, None
        async for part in await request.multipart():
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file":
                filename = part.filename or "upload.jsonl"
                content = await part.read()
        if content is None:
            return _error(400, "missing form field 'file'", "file")
        if purpose not in FILE_PURPOSES:
            return _error(400, f"'purpose' must be one of {', '.join(FILE_PURPOSES)}", "purpose")
        return _json(self.store.create_file(filename or "upload.jsonl", purpose, content))

    async def list_files(self, request: web.Request) -> web.Response:
        files = self.store.list_files(request.query.get("purpose"))
        return _json({"object": "list", "data": files, "has_more": False})

    async def get_file(self, request: web.Request) -> web.Response:
        return _json(self.store.get_file(request.match_info["file_id"]))

    async def file_content(self, request: web.Request) -> web.Response:
        content = self.store.file_content(request.match_info["file_id"])
        return web.Response(body=content, content_type="application/octet-stream")

    async def delete_file(self, request: web.Request) -> web.Response:
        file_id = request.match_info["file_id"]
        self.store.delete_file(file_id)
        return _json({"id": file_id, "object": "file", "deleted": True})

    async def create_batch(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return _error(400, f"request body is not valid JSON: {error}")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        for field in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(body.get(field), str):
                return _error(400, f"'{field}' is required and must be a string", field)
        metadata = body.get("metadata")
        if metadata is not None and not (isinstance(metadata, dict) and
                                         all(isinstance(v, str) for v in metadata.values())):
            return _error(400, "'metadata' must be an object of strings", "metadata")
        batch = self.store.create_batch(body["input_file_id"], body["endpoint"],
                                        body["completion_window"], metadata)
        if batch.status == "in_progress":
            self.runner.submit(batch.id)
        return _json(batch)

    async def list_batches(self, request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            return _error(400, "'limit' must be an integer", "limit")
        if not 1 <= limit <= MAX_LIST_LIMIT:
            return _error(400, f"'limit' must be between 1 and {MAX_LIST_LIMIT}", "limit")
        batches = self.store.list_batches()
        after = request.query.get("after")
        if after:
            ids = [b.id for b in batches]
            batches = batches[ids.index(after) + 1:] if after in ids else []
        page = batches[:limit]
        return _json({"object": "list", "data": page,
                      "first_id": page[0].id if page else None,
                      "last_id": page[-1].id if page else None,
                      "has_more": len(batches) > limit})

    async def get_batch(self, request: web.Request) -> web.Response:
        return _json(self.store.get_batch(request.match_info["batch_id"]))

    async def cancel_batch(self, request: web.Request) -> web.Response:
        return _json(self.runner.cancel(request.match_info["batch_id"]))
