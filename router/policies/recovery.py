"""Where a request whose instance failed resumes: move its KV, or recompute it (xLLM §3.5).

When a decode instance dies, the request's prompt KV may still live elsewhere: in
the prefix cache of its prefill instance under PD (the blocks stay cached after
the transfer), in another instance's prefix cache, or in a lower tier or the
global store (``TierHits``). Resuming where that KV can be reused skips part of
the prefill; fetching it from a tier or the store costs its bytes over the
link. Recomputing costs prefill time on whichever instance is least busy.
This module compares the estimates per candidate and picks the cheapest.

Pure: the driver supplies per-instance estimates (its measured prefill cost
per token, its queued prompt tokens) and what it knows of cached blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

ResumeMode = Literal["move", "recompute"]


@dataclass(frozen=True, slots=True)
class ResumeCandidate:
    """One instance that could take the resumed request."""

    instance_id: str
    prefill_ms_per_token: float  # measured on this instance (queueing included)
    queued_tokens: int = 0  # prompt tokens queued there before ours
    local_cached_tokens: int = 0  # prompt tokens in its own prefix cache: free to reuse
    remote_cached_tokens: int = 0  # further prompt tokens it can fetch from a tier or store


@dataclass(frozen=True, slots=True)
class ResumePlan:
    """The choice, with both estimates so logs and metrics can show why."""

    instance_id: str
    mode: ResumeMode  # "move": reuses KV that outlived the failed instance
    estimate_ms: float
    recompute_estimate_ms: float  # best plan that reuses no KV at all
    transfer_tokens: int  # tokens fetched over the link (0: none, or reuse was local)


def plan_resume(candidates: Sequence[ResumeCandidate], *, prompt_tokens: int,
                generated_tokens: int, kv_bytes_per_token: float,
                transfer_bytes_per_ms: float) -> ResumePlan:
    """The cheapest way to rebuild the request's context (prompt + generated) somewhere.

    Per candidate, the context's cost is its queue plus: tokens in its own cache
    for free, the tier/store tokens either fetched (bytes / bandwidth) or
    recomputed, whichever is cheaper, and the rest recomputed. Generated tokens
    are always recomputed (no cache holds them). Ties go to the first candidate.
    """
    if not candidates:
        raise ValueError("no candidate instance to resume on")
    context = prompt_tokens + generated_tokens
    transfer_ms_per_token = (kv_bytes_per_token / transfer_bytes_per_ms
                             if transfer_bytes_per_ms > 0 else float("inf"))
    best: ResumePlan | None = None
    best_recompute = float("inf")
    for c in candidates:
        rate = max(c.prefill_ms_per_token, 0.0)
        queue_ms = c.queued_tokens * rate
        recompute_ms = queue_ms + context * rate
        best_recompute = min(best_recompute, recompute_ms)
        local = max(0, min(c.local_cached_tokens, prompt_tokens))
        remote = max(0, min(c.remote_cached_tokens, prompt_tokens - local))
        fetch = remote if transfer_ms_per_token < rate else 0
        estimate = (queue_ms + fetch * transfer_ms_per_token
                    + (context - local - fetch) * rate)
        reuses = local > 0 or fetch > 0
        if best is None or estimate < best.estimate_ms:
            best = ResumePlan(c.instance_id, "move" if reuses else "recompute", estimate,
                              0.0, fetch)
    assert best is not None
    return ResumePlan(best.instance_id, best.mode, best.estimate_ms, best_recompute,
                      best.transfer_tokens)
