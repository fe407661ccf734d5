"""What a run produced: per-request records and the summary numbers reported.

SLO attainment is the share of *all* requests of the workload (failed and
unfinished ones count as misses) that met their TTFT SLO and TPOT SLO
(``SLO.require`` picks both, or one of them). A request with one output token
has no TPOT and meets any TPOT SLO. Goodput is SLO-meeting requests per second
of the workload's arrival span.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np


@dataclass(frozen=True)
class SLO:
    """Latency targets; per-request values (``RequestSpec.slo_*``) override them."""

    ttft_ms: float
    tpot_ms: float
    require: Literal["both", "ttft", "tpot"] = "both"


@dataclass(slots=True)
class RequestRecord:
    """One request's fate in a simulated run."""

    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    instance_id: str | None
    prefill_instance_id: str | None
    ok: bool
    ttft_ms: float | None
    tpot_ms: float | None
    finish_s: float | None
    cached_prompt_tokens: int = 0
    preemptions: int = 0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    error: str = ""

    def meets(self, slo: SLO) -> bool:
        if not self.ok or self.ttft_ms is None:
            return False
        ttft_target = self.slo_ttft_ms if self.slo_ttft_ms is not None else slo.ttft_ms
        tpot_target = self.slo_tpot_ms if self.slo_tpot_ms is not None else slo.tpot_ms
        ttft_ok = self.ttft_ms <= ttft_target
        tpot_ok = self.tpot_ms is None or self.tpot_ms <= tpot_target
        if slo.require == "ttft":
            return ttft_ok
        if slo.require == "tpot":
            return tpot_ok
        return ttft_ok and tpot_ok


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summarize(records: Sequence[RequestRecord], slo: SLO, span_s: float,
              instances: dict[str, dict[str, Any]] | None = None,
              role_switches: int = 0) -> dict[str, Any]:
    """Flat numbers for tables, sweeps and result files."""
    ok = [r for r in records if r.ok]
    ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
    tpot = [r.tpot_ms for r in ok if r.tpot_ms is not None]
    met = sum(r.meets(slo) for r in records)
    ttft_met = sum(r.meets(SLO(slo.ttft_ms, slo.tpot_ms, "ttft")) for r in records)
    tpot_met = sum(r.meets(SLO(slo.ttft_ms, slo.tpot_ms, "tpot")) for r in records)
    n = len(records)
    prompt = sum(r.prompt_tokens for r in ok)
    out: dict[str, Any] = {
        "requests": n,
        "finished": len(ok),
        "failed": n - len(ok),
        "slo_attainment": met / n if n else None,
        "ttft_attainment": ttft_met / n if n else None,
        "tpot_attainment": tpot_met / n if n else None,
        "goodput_rps": met / span_s if span_s > 0 else None,
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p90_ms": percentile(ttft, 90),
        "ttft_p99_ms": percentile(ttft, 99),
        "tpot_p50_ms": percentile(tpot, 50),
        "tpot_p90_ms": percentile(tpot, 90),
        "tpot_p99_ms": percentile(tpot, 99),
        "output_tok_per_s": sum(r.output_tokens for r in ok) / span_s if span_s > 0 else None,
        "prefix_hit_ratio": sum(r.cached_prompt_tokens for r in ok) / prompt if prompt else 0.0,
        "preemptions": sum(r.preemptions for r in records),
        "disaggregated": sum(1 for r in ok if r.prefill_instance_id is not None),
        "role_switches": role_switches,
    }
    if instances:
        utils = [v["utilisation"] for v in instances.values()]
        out["utilisation_mean"] = float(np.mean(utils))
        out["utilisation_max"] = float(np.max(utils))
    return out
