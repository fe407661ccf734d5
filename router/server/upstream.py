"""POST to an instance, surviving the keep-alive race.

An engine closes idle HTTP connections after its keep-alive timeout (vLLM: 5 s). A
request written to a pooled connection in the instant the engine closes it fails before
any byte of answer (``ServerDisconnectedError`` or a reset) although the instance is
fine; under CPU pressure the router's own idle cut-off (``keepalive_timeout``, shorter
than vLLM's) does not always win that race. Seen in the chaos benchmark: seven requests
failed this way at once, the instance counted as failed, and with the other instance
restarting the router refused thousands of requests for two seconds.

Nothing was answered, so sending again is safe; the retry goes out on another
connection (the broken one is discarded). A refused connection is not retried: that
instance is down, and the caller's failure handling takes over.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp

log = logging.getLogger("xllm.router.upstream")

STALE_RETRIES = 2  # pooled connections the engine may have closed at the same moment


async def post(session: aiohttp.ClientSession, url: str, **kwargs: Any
               ) -> aiohttp.ClientResponse:
    """``session.post(url, **kwargs)``, sent again when a pooled connection turns out closed.

    ``kwargs`` must not hold a one-shot body (a stream or generator); bytes are fine."""
    for attempt in range(STALE_RETRIES + 1):
        try:
            return await session.post(url, **kwargs)
        except aiohttp.ClientConnectorError:
            raise  # could not connect at all: not a stale connection
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if attempt == STALE_RETRIES:
                raise
            log.info("POST %s: connection closed before any answer (%r); sending again on "
                     "another connection", url, exc)
    raise AssertionError("unreachable")
