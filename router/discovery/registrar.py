"""Register one engine instance in etcd under a lease while it is healthy.

Runs beside a ``vllm serve`` (``xllm-router register --etcd ... --url ... --model ...``)
or inside another asyncio program (``await Registrar(...).run()``). The loop:

1. wait until ``URL/health`` answers 200;
2. grant a lease of ``ttl_s`` seconds and put ``PREFIX + instance_id`` -> the
   instance's JSON record under it;
3. every ``ttl_s / 3`` seconds refresh the lease and probe ``/health``; after
   ``unhealthy_after`` failed probes, delete the key (the router drops the
   instance at once) and go back to 1;
4. on cancellation (SIGINT/SIGTERM in the CLI) delete the key and revoke the lease.

If the registrar itself dies, the lease expires within ``ttl_s`` and etcd
deletes the key, so the router never keeps a dead instance longer than that.
A lost lease (etcd restarted, network partition longer than the TTL) is
re-granted and the key put again. Importing this module has no side effects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import replace

import aiohttp

from router.discovery.etcd import EtcdClient, EtcdError
from router.discovery.records import InstanceRecord

log = logging.getLogger("xllm.router.registrar")

DEFAULT_PREFIX = "/xllm/instances/"


class Registrar:
    """Keeps ``record`` registered in etcd under ``prefix`` while the instance is healthy."""

    def __init__(self, etcd: EtcdClient, record: InstanceRecord, *, prefix: str = DEFAULT_PREFIX,
                 ttl_s: int = 10, health_interval_s: float | None = None,
                 unhealthy_after: int = 3) -> None:
        if ttl_s < 2:
            raise ValueError("lease ttl must be at least 2 seconds")
        if record.incarnation is None:
            record = replace(record, incarnation=uuid.uuid4().hex[:12])
        self.etcd = etcd
        self.record = record
        self.key = prefix + record.instance_id
        self.ttl_s = ttl_s
        self.interval_s = health_interval_s or ttl_s / 3
        self.unhealthy_after = unhealthy_after
        self.lease: int | None = None
        self.registered = asyncio.Event()

    async def _healthy(self, session: aiohttp.ClientSession) -> bool:
        try:
            async with session.get(self.record.url + "/health",
                                   timeout=aiohttp.ClientTimeout(total=min(2.0, self.interval_s))) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _register(self) -> None:
        self.lease = await self.etcd.grant(self.ttl_s)
        await self.etcd.put(self.key, self.record.to_etcd_value(), lease=self.lease)
        self.registered.set()
        log.info("registered %s -> %s (lease %x, ttl %ss)", self.key, self.record.url,
                 self.lease, self.ttl_s)

    async def _deregister(self) -> None:
        self.registered.clear()
        lease, self.lease = self.lease, None
        with contextlib.suppress(EtcdError):
            await self.etcd.delete(self.key)
            if lease is not None:
                await self.etcd.revoke(lease)
        log.info("deregistered %s", self.key)

    async def run(self) -> None:
        """Register and keep registered until cancelled; deregisters on the way out."""
        async with aiohttp.ClientSession() as session:
            try:
                await self._loop(session)
            finally:
                if self.lease is not None or self.registered.is_set():
                    await asyncio.shield(self._deregister())

    async def _loop(self, session: aiohttp.ClientSession) -> None:
        failures = 0
        while True:
            healthy = await self._healthy(session)
            failures = 0 if healthy else failures + 1
            try:
                if self.lease is None:
                    if healthy:
                        await self._register()
                elif failures >= self.unhealthy_after:
                    log.warning("%s failed %d health probes; deregistering", self.record.url,
                                failures)
                    await self._deregister()
                elif await self.etcd.keepalive(self.lease) <= 0:
                    log.warning("lease for %s was lost; registering again", self.key)
                    self.lease = None
                    if healthy:
                        await self._register()
            except EtcdError as exc:
                log.warning("etcd: %s (retrying)", exc)
            await asyncio.sleep(self.interval_s if self.lease is not None else
                                min(self.interval_s, 0.5))
