"""What the router knows about one instance before it has scraped it.

The same record is the JSON value an instance registers in etcd (see
``router/README.md`` for the key schema) and what one ``--instances`` entry
parses into, so both discovery sources produce identical objects.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, get_args
from urllib.parse import urlsplit

from router.policies.types import Role

SCHEMA_VERSION = 1
ROLES: tuple[str, ...] = get_args(Role)


class RecordError(ValueError):
    """An instance record (etcd value or --instances entry) is malformed."""


def normalize_url(url: str) -> str:
    """``http://host:port`` without a trailing slash; rejects anything else."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RecordError(f"instance url '{url}' must look like http://HOST:PORT")
    if parts.path or parts.query or parts.fragment:
        raise RecordError(f"instance url '{url}' must not carry a path or query")
    try:
        parts.port  # noqa: B018 (validates the port number)
    except ValueError as exc:
        raise RecordError(f"instance url '{url}': {exc}") from None
    return url


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """One engine instance as discovery reports it.

    ``instance_id`` is the etcd key suffix (or, for --instances, the ``id=``
    option, else ``host:port``). ``incarnation`` changes each time the process
    behind the id restarts, so the router resets its state for the new one.
    """

    instance_id: str
    url: str
    model: str | None = None
    role: Role = "both"
    kv_events_endpoint: str | None = None
    kv_events_replay_endpoint: str | None = None
    block_size: int | None = None
    capacity: int | None = None
    incarnation: str | None = None
    source: str = "static"  # "static" or "etcd"; not part of the etcd value
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.instance_id or "/" in self.instance_id:
            raise RecordError(f"instance id '{self.instance_id}' must be non-empty without '/'")
        if self.role not in ROLES:
            raise RecordError(f"instance {self.instance_id}: role '{self.role}' is not one of "
                              f"{', '.join(ROLES)}")
        for name in ("block_size", "capacity"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise RecordError(f"instance {self.instance_id}: {name} must be a positive integer")

    def to_etcd_value(self) -> str:
        body = {k: v for k, v in asdict(self).items() if k not in ("instance_id", "source", "extra")}
        return json.dumps({"schema": SCHEMA_VERSION, **body, **self.extra}, sort_keys=True)

    @classmethod
    def from_etcd_value(cls, instance_id: str, value: str | bytes) -> InstanceRecord:
        try:
            data = json.loads(value)
        except ValueError as exc:
            raise RecordError(f"etcd value for '{instance_id}' is not JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("url"), str):
            raise RecordError(f"etcd value for '{instance_id}' must be an object with a 'url'")
        known = {"url", "model", "role", "kv_events_endpoint", "kv_events_replay_endpoint",
                 "block_size", "capacity", "incarnation"}
        fields = {k: data[k] for k in known if data.get(k) is not None}
        fields["url"] = normalize_url(fields["url"])
        extra = {k: v for k, v in data.items() if k not in known and k != "schema"}
        return cls(instance_id=instance_id, source="etcd", extra=extra, **fields)


_OPTION = re.compile(r"^([a-z_]+)=(.*)$")
_OPTION_NAMES = {"id": "instance_id", "kv": "kv_events_endpoint",
                 "replay": "kv_events_replay_endpoint", "role": "role", "model": "model",
                 "block_size": "block_size", "capacity": "capacity"}


def parse_instance_spec(spec: str) -> InstanceRecord:
    """Parse one ``--instances`` entry: ``URL[;key=value...]``.

    Keys: ``id`` (default host:port), ``model``, ``role`` (both|prefill|decode|encode),
    ``kv`` (KV-event PUB endpoint), ``replay`` (KV-event replay endpoint),
    ``block_size``, ``capacity``. Example:
    ``http://127.0.0.1:8001;kv=tcp://127.0.0.1:5557;replay=tcp://127.0.0.1:5558``.
    """
    url, *options = [p.strip() for p in spec.strip().split(";")]
    url = normalize_url(url)
    fields: dict[str, Any] = {}
    for option in options:
        if not option:
            continue
        match = _OPTION.match(option)
        if not match or match.group(1) not in _OPTION_NAMES:
            raise RecordError(f"instance '{spec}': option '{option}' is not one of "
                              f"{', '.join(k + '=...' for k in _OPTION_NAMES)}")
        key, value = _OPTION_NAMES[match.group(1)], match.group(2)
        if key in ("block_size", "capacity"):
            try:
                fields[key] = int(value)
            except ValueError:
                raise RecordError(f"instance '{spec}': {match.group(1)} must be an integer") from None
        else:
            fields[key] = value
    parts = urlsplit(url)
    fields.setdefault("instance_id", f"{parts.hostname}:{parts.port or 80}")
    return InstanceRecord(url=url, source="static", **fields)


def parse_instances(values: list[str]) -> list[InstanceRecord]:
    """Parse repeated/comma-separated ``--instances`` values; ids must be unique."""
    records = [parse_instance_spec(item) for value in values for item in value.split(",")
               if item.strip()]
    seen: set[str] = set()
    for record in records:
        if record.instance_id in seen:
            raise RecordError(f"instance id '{record.instance_id}' given twice in --instances")
        seen.add(record.instance_id)
    return records
