"""The keep-alive race (router/server/upstream.py): a request the instance's connection
dropped before any answer is sent again on another connection; a refused one is not."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from router.server.upstream import STALE_RETRIES, post

pytestmark = pytest.mark.asyncio(loop_scope="session")

OK = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
      b"Connection: close\r\n\r\n{}")


async def _server(drop_first: int) -> tuple[asyncio.Server, list[bytes]]:
    """Reads each request; closes the first ``drop_first`` connections without a byte of
    answer (what a keep-alive timeout on the engine side looks like), answers the rest."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        if len(seen) > drop_first:
            writer.write(OK)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), seen


async def test_a_connection_closed_before_the_answer_is_retried_on_another() -> None:
    server, seen = await _server(drop_first=1)
    port = server.sockets[0].getsockname()[1]
    async with server, aiohttp.ClientSession() as session:
        async with await post(session, f"http://127.0.0.1:{port}/v1/completions",
                              data=b"{}") as response:
            assert response.status == 200 and await response.json() == {}
    assert len(seen) == 2


async def test_gives_up_after_the_retries() -> None:
    server, seen = await _server(drop_first=STALE_RETRIES + 1)
    port = server.sockets[0].getsockname()[1]
    async with server, aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await post(session, f"http://127.0.0.1:{port}/", data=b"{}")
    assert len(seen) == STALE_RETRIES + 1


async def test_a_refused_connection_is_not_retried() -> None:
    server, _ = await _server(drop_first=0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorError):
            await post(session, f"http://127.0.0.1:{port}/", data=b"{}")
