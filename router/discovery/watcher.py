"""Follow the instances registered in etcd and report changes to the router.

List the prefix, report every record, then watch from the next revision. When
the watch breaks (etcd restart, compaction, network), wait a little, list again
and report the difference, so a missed event can never leave a ghost instance.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from router.discovery.etcd import EtcdClient, EtcdError
from router.discovery.records import InstanceRecord, RecordError

log = logging.getLogger("xllm.router.discovery")


class EtcdWatcher:
    """Calls ``on_upsert(record)`` / ``on_remove(instance_id, reason)`` as etcd changes.

    A broken watch or an unreachable etcd removes nothing: the instances last seen stay
    (their health is the router's own business) until etcd answers again and says
    otherwise.
    """

    def __init__(self, etcd: EtcdClient, prefix: str,
                 on_upsert: Callable[[InstanceRecord], None],
                 on_remove: Callable[[str, str], None], retry_s: float = 1.0) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.on_upsert = on_upsert
        self.on_remove = on_remove
        self.retry_s = retry_s
        self.known: set[str] = set()
        self.synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="etcd-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def _apply_put(self, key: str, value: bytes) -> None:
        instance_id = key[len(self.prefix):]
        try:
            record = InstanceRecord.from_etcd_value(instance_id, value)
        except RecordError as exc:
            log.warning("ignoring etcd key %s: %s", key, exc)
            self._apply_delete(key, "etcd value malformed")
            return
        self.known.add(instance_id)
        self.on_upsert(record)

    def _apply_delete(self, key: str, reason: str) -> None:
        instance_id = key[len(self.prefix):]
        if instance_id in self.known:
            self.known.discard(instance_id)
            self.on_remove(instance_id, reason)

    async def resync(self) -> int:
        """List the prefix, report the difference, return the revision read at."""
        kvs, revision = await self.etcd.get_prefix(self.prefix)
        present = {kv.key[len(self.prefix):] for kv in kvs}
        for gone in sorted(self.known - present):
            self._apply_delete(self.prefix + gone, "etcd key gone when re-listed")
        for kv in kvs:
            self._apply_put(kv.key, kv.value)
        self.synced.set()
        return revision

    async def _run(self) -> None:
        while True:
            try:
                revision = await self.resync()
                async for event in self.etcd.watch_prefix(self.prefix, revision + 1):
                    if event.kind == "DELETE":
                        self._apply_delete(event.key, "etcd key deleted (deregistered or "
                                           "lease expired)")
                    else:
                        self._apply_put(event.key, event.value)
                log.warning("etcd watch ended; re-listing")
            except EtcdError as exc:
                log.warning("etcd discovery: %s; retrying in %.1fs", exc, self.retry_s)
            await asyncio.sleep(self.retry_s)
