"""xTensor's counters: what /xllm/status shows under ``xtensor``. Pure accumulation.

Map/unmap call counts and latency come from the mapper's :class:`~.mapper.MapStats`;
everything else is accumulated here from :class:`~.views.Binding` results and from the
requests' sizes at each step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xllm_plugin.memory.views import Binding


@dataclass
class XTensorMetrics:
    """Cumulative since start, except the ``last_*`` fields (the latest step)."""

    steps: int = 0
    rows: int = 0  # request-steps served
    fallback_rows: int = 0  # request-steps read through the page list (no slot in budget)
    binds: int = 0  # requests (re)bound to a slot
    pages_mapped: int = 0  # page positions mapped (demand + ahead)
    map_runs: int = 0  # coalesced runs (each one call per plane)
    reuse_hits: int = 0  # positions a new binding found already mapped (reuse list / prefix)
    premap_hits: int = 0  # pages a decoding request grew into that were mapped ahead
    premap_misses: int = 0  # pages a decoding request grew into that were mapped on demand
    slots_dropped: int = 0  # slots unmapped whole (VMA budget or eviction)
    wasted_bytes_max: int = 0  # largest allocated-but-unused KV of one request, ever
    last_wasted_bytes_max: int = 0
    last_wasted_bytes_mean: float = 0.0

    def record_binding(self, binding: Binding) -> None:
        self.rows += 1
        if binding.slot is None:
            self.fallback_rows += 1
        if binding.steady:
            return
        if binding.fresh and binding.slot is not None:
            self.binds += 1
        self.pages_mapped += binding.mapped_pages
        self.map_runs += len(binding.runs) + len(binding.ahead)
        self.reuse_hits += binding.reuse_hits
        self.premap_hits += binding.premap_hits
        self.premap_misses += binding.premap_misses
        self.slots_dropped += len(binding.drop)

    def record_waste(self, wasted_bytes: list[int]) -> None:
        """Per live request: bytes of the pages it holds that no token of it fills."""
        self.steps += 1
        if not wasted_bytes:
            self.last_wasted_bytes_max, self.last_wasted_bytes_mean = 0, 0.0
            return
        self.last_wasted_bytes_max = max(wasted_bytes)
        self.last_wasted_bytes_mean = sum(wasted_bytes) / len(wasted_bytes)
        self.wasted_bytes_max = max(self.wasted_bytes_max, self.last_wasted_bytes_max)

    @property
    def premap_hit_rate(self) -> float | None:
        total = self.premap_hits + self.premap_misses
        return self.premap_hits / total if total else None

    def snapshot(self) -> dict[str, Any]:
        body = {name: getattr(self, name) for name in self.__dataclass_fields__}
        body["premap_hit_rate"] = self.premap_hit_rate
        return body


def wasted_bytes(tokens: int, pages_held: int, page_tokens: int, bytes_per_token: int) -> int:
    """KV bytes a request holds beyond its tokens (its last page's empty tail, and any
    page allocated ahead), over all layers."""
    return max(0, pages_held * page_tokens - tokens) * bytes_per_token
