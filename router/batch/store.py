"""Durable storage of uploaded files, batch records and per-line results.

Layout under the root directory::

    files/<file_id>.json        metadata (id, filename, purpose, bytes, created_at)
    files/<file_id>.data        the uploaded bytes
    batches/<batch_id>.json     the batch record, rewritten atomically on every change
    batches/<batch_id>.out      one JSON line per finished request (appended, fsynced)
    batches/<batch_id>.err      one JSON line per failed request (appended, fsynced)

Appends are flushed and fsynced line by line, so after a crash the result
files hold every finished line except possibly a torn last one, which is
ignored on recovery; the line is then simply run again.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import msgspec

BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed",
                      "expired", "cancelling", "cancelled"]
ACTIVE_STATUSES: frozenset[str] = frozenset({"validating", "in_progress", "finalizing",
                                             "cancelling"})
SUPPORTED_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
COMPLETION_WINDOWS = ("24h",)


class FileRecord(msgspec.Struct):
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    object: str = "file"
    status: str = "processed"


class RequestCounts(msgspec.Struct):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchError(msgspec.Struct):
    code: str
    message: str
    line: int | None = None
    param: str | None = None


class BatchErrors(msgspec.Struct):
    data: list[BatchError] = msgspec.field(default_factory=list)
    object: str = "list"


class BatchRecord(msgspec.Struct):
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: int
    request_counts: RequestCounts = msgspec.field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None
    errors: BatchErrors | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    expires_at: int | None = None
    object: str = "batch"


class InputLine(msgspec.Struct):
    custom_id: str
    method: str
    url: str
    body: dict[str, Any]


class StoreError(Exception):
    """A request the store refuses; carries the HTTP status and parameter for the API."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class BatchStore:
    """All batch state, on disk; safe to share between the API handlers and the runner."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._files = root / "files"
        self._batches = root / "batches"
        self._files.mkdir(parents=True, exist_ok=True)
        self._batches.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    # ---- files -------------------------------------------------------------
    def create_file(self, filename: str, purpose: str, content: bytes) -> FileRecord:
        record = FileRecord(id=_new_id("file-"), bytes=len(content), created_at=int(time.time()),
                            filename=filename, purpose=purpose)
        _write_atomic(self._files / f"{record.id}.data", content)
        _write_atomic(self._files / f"{record.id}.json", msgspec.json.encode(record))
        return record

    def get_file(self, file_id: str) -> FileRecord:
        path = self._files / f"{file_id}.json"
        if not _safe_id(file_id) or not path.exists():
            raise StoreError(404, f"no file with id '{file_id}'", "file_id")
        return msgspec.json.decode(path.read_bytes(), type=FileRecord)

    def file_content(self, file_id: str) -> bytes:
        self.get_file(file_id)
        return (self._files / f"{file_id}.data").read_bytes()

    def list_files(self, purpose: str | None = None) -> list[FileRecord]:
        records = [msgspec.json.decode(p.read_bytes(), type=FileRecord)
                   for p in self._files.glob("*.json")]
        return sorted((r for r in records if purpose is None or r.purpose == purpose),
                      key=lambda r: (r.created_at, r.id), reverse=True)

    def delete_file(self, file_id: str) -> None:
        self.get_file(file_id)
        for suffix in (".json", ".data"):
            (self._files / f"{file_id}{suffix}").unlink(missing_ok=True)

    # ---- batches -----------------------------------------------------------
    def create_batch(self, input_file_id: str, endpoint: str, completion_window: str,
                     metadata: dict[str, str] | None) -> BatchRecord:
        if endpoint not in SUPPORTED_ENDPOINTS:
            raise StoreError(400, f"endpoint must be one of {', '.join(SUPPORTED_ENDPOINTS)}",
                             "endpoint")
        if completion_window not in COMPLETION_WINDOWS:
            raise StoreError(400, "completion_window must be '24h'", "completion_window")
        record = self.get_file(input_file_id)
        if record.purpose != "batch":
            raise StoreError(400, f"file '{input_file_id}' has purpose '{record.purpose}', "
                                  "not 'batch'", "input_file_id")
        now = int(time.time())
        batch = BatchRecord(id=_new_id("batch_"), endpoint=endpoint,
                            input_file_id=input_file_id, completion_window=completion_window,
                            status="validating", created_at=now, metadata=metadata,
                            expires_at=now + 24 * 3600)
        lines, errors = self.validate_input(input_file_id, endpoint)
        batch.request_counts.total = len(lines)
        if errors:
            batch.status, batch.failed_at = "failed", now
            batch.errors = BatchErrors(data=errors)
        else:
            batch.status, batch.in_progress_at = "in_progress", now
        self.save_batch(batch)
        return batch

    def validate_input(self, file_id: str, endpoint: str) -> tuple[list[InputLine], list[BatchError]]:
        lines: list[InputLine] = []
        errors: list[BatchError] = []
        seen: set[str] = set()
        for number, raw in enumerate(self.file_content(file_id).splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                line = msgspec.json.decode(raw, type=InputLine)
            except msgspec.DecodeError as error:
                errors.append(BatchError("invalid_json_line", str(error), number))
                continue
            if line.method.upper() != "POST":
                errors.append(BatchError("invalid_method", "method must be POST", number, "method"))
            if line.url != endpoint:
                errors.append(BatchError("mismatched_endpoint",
                                         f"url '{line.url}' differs from the batch endpoint "
                                         f"'{endpoint}'", number, "url"))
            if line.custom_id in seen:
                errors.append(BatchError("duplicate_custom_id",
                                         f"custom_id '{line.custom_id}' repeats", number,
                                         "custom_id"))
            seen.add(line.custom_id)
            lines.append(line)
        if not lines and not errors:
            errors.append(BatchError("empty_file", "the input file has no requests"))
        return lines, errors

    def input_lines(self, batch: BatchRecord) -> list[InputLine]:
        return self.validate_input(batch.input_file_id, batch.endpoint)[0]

    def get_batch(self, batch_id: str) -> BatchRecord:
        path = self._batches / f"{batch_id}.json"
        if not _safe_id(batch_id) or not path.exists():
            raise StoreError(404, f"no batch with id '{batch_id}'", "batch_id")
        return msgspec.json.decode(path.read_bytes(), type=BatchRecord)

    def save_batch(self, batch: BatchRecord) -> None:
        with self._lock:
            _write_atomic(self._batches / f"{batch.id}.json", msgspec.json.encode(batch))

    def list_batches(self) -> list[BatchRecord]:
        records = [msgspec.json.decode(p.read_bytes(), type=BatchRecord)
                   for p in self._batches.glob("*.json")]
        return sorted(records, key=lambda r: (r.created_at, r.id), reverse=True)

    def active_batches(self) -> list[BatchRecord]:
        return [b for b in self.list_batches() if b.status in ACTIVE_STATUSES]

    # ---- results -----------------------------------------------------------
    def append_result(self, batch_id: str, line: dict[str, Any], failed: bool) -> None:
        path = self._batches / f"{batch_id}.{'err' if failed else 'out'}"
        data = msgspec.json.encode(line) + b"\n"
        with self._lock, open(path, "ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    def results(self, batch_id: str, failed: bool) -> Iterator[dict[str, Any]]:
        """Finished lines; a torn last line from a crash is skipped (and so rerun)."""
        path = self._batches / f"{batch_id}.{'err' if failed else 'out'}"
        if not path.exists():
            return
        for raw in path.read_bytes().splitlines():
            try:
                yield json.loads(raw)
            except json.JSONDecodeError:
                continue

    def finished_custom_ids(self, batch_id: str) -> set[str]:
        return {line["custom_id"] for failed in (False, True)
                for line in self.results(batch_id, failed)}

    def publish_results(self, batch: BatchRecord) -> None:
        """Turn the result logs into downloadable output and error files."""
        for failed in (False, True):
            lines = list(self.results(batch.id, failed))
            if not lines:
                continue
            content = b"".join(msgspec.json.encode(line) + b"\n" for line in lines)
            record = self.create_file(f"{batch.id}_{'error' if failed else 'output'}.jsonl",
                                      "batch_output", content)
            if failed:
                batch.error_file_id = record.id
            else:
                batch.output_file_id = record.id


def _safe_id(identifier: str) -> bool:
    """Ids become file names: refuse anything that could leave the store's folders."""
    return bool(identifier) and all(c.isalnum() or c in "-_" for c in identifier)
