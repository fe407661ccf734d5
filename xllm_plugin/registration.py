"""Registers the running ``vllm serve`` in etcd, from inside its API-server process.

Started by the endpoint plugin when ``xllm.registration.etcd`` is set, so an
instance needs no side-car: its record (URL, model, role, KV-event endpoints,
block size) is derived from the server's own arguments. The registration loop
itself is the router's ``Registrar`` (health-gated, leased, re-granted after
etcd restarts).
"""

from __future__ import annotations

import asyncio
import json
import logging
from argparse import Namespace
from typing import Any
from urllib.parse import urlparse

from xllm_plugin.config import RegistrationConfig

log = logging.getLogger("xllm_plugin.registration")


def _advertised_url(args: Namespace, config: RegistrationConfig) -> str:
    if config.advertise_url:
        return config.advertise_url.rstrip("/")
    host = getattr(args, "host", None)
    if not host or host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{getattr(args, 'port', 8000)}"


def _kv_event_endpoints(args: Namespace, host: str) -> tuple[str | None, str | None]:
    """The engine's KV-event publisher and replay endpoints, as a router must dial them."""
    raw = getattr(args, "kv_events_config", None)
    if raw is None:
        return None, None
    config: Any = json.loads(raw) if isinstance(raw, str) else raw
    get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    if not get("enable_kv_cache_events"):
        return None, None

    def dialable(endpoint: str | None) -> str | None:
        return endpoint.replace("*", host) if endpoint else None

    return dialable(get("endpoint")), dialable(get("replay_endpoint"))


def instance_record(args: Namespace, config: RegistrationConfig) -> Any:
    """The etcd record for this server, built from its command-line arguments."""
    from router.discovery.records import InstanceRecord

    url = _advertised_url(args, config)
    host = urlparse(url).hostname or "127.0.0.1"
    kv, replay = _kv_event_endpoints(args, host)
    names = getattr(args, "served_model_name", None)
    model = names[0] if names else getattr(args, "model", None)
    return InstanceRecord(instance_id=config.instance_id or urlparse(url).netloc, url=url,
                          model=model, role=config.role, kv_events_endpoint=kv,
                          kv_events_replay_endpoint=replay,
                          block_size=getattr(args, "block_size", None))


def start_registration(args: Namespace, config: RegistrationConfig) -> asyncio.Task[None]:
    """Run the registrar in the server's event loop until the server stops."""
    from router.discovery.etcd import EtcdClient
    from router.discovery.registrar import Registrar

    record = instance_record(args, config)

    async def register() -> None:
        async with EtcdClient(config.etcd) as etcd:
            log.info("registering %s as %s%s in etcd %s", record.url, config.prefix,
                     record.instance_id, config.etcd)
            await Registrar(etcd, record, prefix=config.prefix, ttl_s=config.ttl_s).run()

    return asyncio.get_running_loop().create_task(register(), name="xllm-registration")
