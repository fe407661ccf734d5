"""A request's run state inside one simulation (the workload's RequestSpec stays immutable)."""

from __future__ import annotations

from router.sim.workload import RequestSpec


class SimRequest:
    """Progress of one request: tokens in KV, tokens generated, blocks held, timestamps.

    Token accounting follows vLLM: a request has ``prompt + generated`` known
    tokens; a step computes some of them into the KV cache and, once all known
    tokens are computed, samples one more. ``computed`` is the number in KV.
    """

    __slots__ = (
        "spec", "prompt", "output", "block_hashes", "computed", "generated", "pinned",
        "private_blocks", "instance_id", "prefill_instance_id", "prefill_only", "first_token_s",
        "finish_s", "queued_since", "prefill_start_s", "prefill_end_s", "cached_tokens",
        "preemptions", "ok", "error", "decode_instance_id", "offline", "migrations",
    )

    def __init__(self, spec: RequestSpec, block_hashes: tuple[int, ...]) -> None:
        self.spec = spec
        self.prompt = spec.prompt_tokens
        self.output = spec.output_tokens
        self.block_hashes = block_hashes
        self.computed = 0
        self.generated = 0
        self.pinned: list[int] = []
        self.private_blocks = 0
        self.instance_id: str | None = None
        self.prefill_instance_id: str | None = None
        self.prefill_only = False  # on a prefill instance under PD: stop after the prompt
        self.first_token_s: float | None = None
        self.finish_s: float | None = None
        self.queued_since = spec.arrival_s
        self.prefill_start_s: float | None = None
        self.prefill_end_s: float | None = None
        self.cached_tokens = 0
        self.preemptions = 0
        self.ok = True
        self.error = ""
        self.decode_instance_id: str | None = None
        self.offline = spec.request_class == "offline"
        self.migrations = 0  # times moved to another instance (re-prefill of prompt + generated)

    @property
    def remaining(self) -> int:
        """Known tokens not yet in the KV cache (1 while decoding)."""
        return self.prompt + self.generated - self.computed

    def __repr__(self) -> str:
        return (f"SimRequest({self.spec.request_id}, computed={self.computed}, "
                f"generated={self.generated}/{self.output})")
