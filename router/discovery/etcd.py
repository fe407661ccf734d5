"""A small asyncio etcd v3 client over etcd's HTTP/JSON gateway.

Why the gateway and not a gRPC client: the router is an aiohttp program and
already has an HTTP client; etcd (3.4 and later) serves the same v3 API as JSON
at ``/v3/kv/range``, ``/v3/kv/put``, ``/v3/lease/grant``, ``/v3/watch`` ...
(keys and values base64). The PyPI ``etcd3`` client is unmaintained since
2020, blocks the event loop, and needs ``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python``
with current protobuf; pulling gRPC and protobuf into a router that otherwise
needs neither is a poor trade for the six calls used here. Watches are a
chunked HTTP response of JSON objects, one per line, which aiohttp reads
natively. Tested against a real ``etcd`` (Debian ``etcd-server``) in
``tests/router``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp


class EtcdError(RuntimeError):
    """etcd answered with an error or could not be reached."""


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _unb64(data: str | None) -> bytes:
    return base64.b64decode(data) if data else b""


def prefix_range_end(prefix: str) -> bytes:
    """The key just past every key starting with ``prefix`` (etcd's prefix idiom)."""
    raw = bytearray(prefix.encode())
    for i in range(len(raw) - 1, -1, -1):
        if raw[i] < 0xFF:
            raw[i] += 1
            return bytes(raw[: i + 1])
    return b"\0"


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: str  # "PUT" or "DELETE"
    key: str
    value: bytes
    mod_revision: int


def normalize_endpoint(endpoint: str) -> str:
    """``HOST:PORT`` or ``http://HOST:PORT`` -> ``http://HOST:PORT``."""
    endpoint = endpoint.strip().rstrip("/")
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    return endpoint


class EtcdClient:
    """The etcd calls the router and the registrar need: range, put, delete, lease, watch."""

    def __init__(self, endpoint: str, session: aiohttp.ClientSession | None = None,
                 timeout_s: float = 5.0) -> None:
        self.endpoint = normalize_endpoint(endpoint)
        self._session = session
        self._own_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            async with self.session.post(self.endpoint + path, json=body,
                                         timeout=self._timeout) as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EtcdError(f"etcd at {self.endpoint} unreachable: {exc!r}") from exc
        try:
            data = json.loads(text)
        except ValueError:
            raise EtcdError(f"etcd {path} answered {response.status}: {text[:200]}") from None
        if response.status != 200 or "error" in data:
            raise EtcdError(f"etcd {path} answered {response.status}: "
                            f"{data.get('message') or data.get('error')}")
        return data

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """All keys under ``prefix`` and the store revision they were read at."""
        data = await self._call("/v3/kv/range", {"key": _b64(prefix),
                                                 "range_end": _b64(prefix_range_end(prefix))})
        kvs = [KeyValue(_unb64(kv["key"]).decode(), _unb64(kv.get("value")),
                        int(kv.get("mod_revision", 0))) for kv in data.get("kvs", [])]
        return kvs, int(data["header"]["revision"])

    async def put(self, key: str, value: str | bytes, lease: int | None = None) -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        await self._call("/v3/kv/put", body)

    async def delete(self, key: str) -> None:
        await self._call("/v3/kv/deleterange", {"key": _b64(key)})

    async def grant(self, ttl_s: int) -> int:
        data = await self._call("/v3/lease/grant", {"TTL": str(ttl_s)})
        return int(data["ID"])

    async def keepalive(self, lease: int) -> int:
        """Refresh ``lease`` once; returns its TTL, 0 if the lease no longer exists."""
        data = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(data.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        await self._call("/v3/lease/revoke", {"ID": str(lease)})

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Events under ``prefix`` from ``start_revision`` on, until the stream ends.

        Raises EtcdError when etcd cancels the watch (e.g. the revision was
        compacted); the caller re-lists and watches again.
        """
        body = {"create_request": {"key": _b64(prefix), "range_end": _b64(prefix_range_end(prefix)),
                                   "start_revision": str(start_revision)}}
        timeout = aiohttp.ClientTimeout(total=None, connect=self._timeout.total, sock_read=None)
        try:
            async with self.session.post(self.endpoint + "/v3/watch", json=body,
                                         timeout=timeout) as response:
                if response.status != 200:
                    raise EtcdError(f"etcd watch answered {response.status}")
                async for line in response.content:
                    if not line.strip():
                        continue
                    message = json.loads(line)
                    if "error" in message:
                        raise EtcdError(f"etcd watch error: {message['error']}")
                    result = message.get("result", {})
                    if result.get("canceled"):
                        raise EtcdError(f"etcd cancelled the watch: {result.get('cancel_reason')}"
                                        f" (compact_revision={result.get('compact_revision')})")
                    for event in result.get("events", []):
                        kv = event.get("kv", {})
                        yield WatchEvent(event.get("type", "PUT"), _unb64(kv.get("key")).decode(),
                                         _unb64(kv.get("value")), int(kv.get("mod_revision", 0)))
        except (aiohttp.ClientError, ValueError) as exc:
            raise EtcdError(f"etcd watch on {self.endpoint} broke: {exc!r}") from exc
