"""Reading vLLM's Prometheus text: the load view's gauges and the liveness probe's counters."""

from __future__ import annotations

from collections.abc import Collection


def sum_vllm_metrics(text: str, names: Collection[str]) -> dict[str, float]:
    """Each of ``names`` summed over all its label sets; names absent from ``text`` are
    left out (an engine without the metric is not an engine at zero)."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            try:
                totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
    return totals
