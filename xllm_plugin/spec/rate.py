"""The engine's recent output rate (tokens per ms), by how many requests a step decodes.

A draft is worth verifying when the tokens it is expected to add exceed what the same
milliseconds yield on average: ``g > rate * b``. The rate that makes this the throughput
optimum is the long-run one (maximising total tokens over total time is maximising
``tokens - rate * ms`` step by step, at the optimal rate; Dinkelbach), not the step's own
``tokens / ms``. The two differ where steps differ: at one request on copy-heavy text, a
step whose drafts all look right yields 3-4x the average rate, and judging its drafts by
its own rate cuts the late ones that the average would keep.

Kept per decoding-request count, because the rate a step is compared with should be that
of steps like it: when requests arrive or finish, a single average would lag behind the
batch size for as long as its window. Measured as produced tokens over measured step time,
from decode-only steps: the caller leaves out steps with prefill work, since a token
produced now saves later decode steps, not prefill (counted in, prefill time lowered the
bar and replayed about 2% worse at concurrency 32). Exponentially decayed like the other
estimates; the estimate is used once its decayed mass reaches ``min_steps``.
"""

from __future__ import annotations


class OutputRate:
    def __init__(self, window_steps: int = 256, min_steps: float = 8.0) -> None:
        self._decay = 1.0 - 1.0 / max(window_steps, 2)
        self._min_steps = min_steps
        self._sums: dict[int, list[float]] = {}  # decoding requests -> [steps, tokens, ms]

    def observe(self, decoding_requests: int, tokens: int, step_ms: float) -> None:
        if decoding_requests <= 0 or step_ms <= 0:
            return
        sums = self._sums.setdefault(decoding_requests, [0.0, 0.0, 0.0])
        for i, value in enumerate((1.0, float(tokens), step_ms)):
            sums[i] = self._decay * sums[i] + value

    def tokens_per_ms(self, decoding_requests: int) -> float | None:
        """The recent rate of steps with this many decoding requests, or None while unknown
        (no tokens counted is unknown too: a zero rate would make every draft worth it)."""
        sums = self._sums.get(decoding_requests)
        if sums is None or sums[0] < self._min_steps or sums[1] <= 0 or sums[2] <= 0:
            return None
        return sums[1] / sums[2]

    def as_dict(self) -> dict[str, float]:
        return {str(b): round(s[1] / s[2], 5) for b, s in sorted(self._sums.items()) if s[2] > 0}
