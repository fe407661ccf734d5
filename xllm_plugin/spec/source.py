"""How well a copying proposal's source agrees with the text the drafts would extend.

An n-gram (prompt-lookup) proposer copies the tokens that followed an earlier occurrence
of the sequence's last few tokens. It matches at most ``prompt_lookup_max`` tokens (4 in
the benchmark), so it cannot tell a source that agrees with the last 30 tokens (the
request is copying a passage) from one that shares only a common pair (``", and"``). The
scheduler can: this module measures, for the earlier occurrences whose continuation
starts with the first draft, how many tokens before them agree with the tokens before
the end of the sequence (capped).

On recorded SmolLM2 outputs of the benchmark's prompts (n-gram K=8, 3,531 proposals):
with agreement of 16 or more all 8 drafts were right in 74-81% of proposals and the first
in 96-99%, with agreement 2 in 7-9% and 52-64%. The previous proposal's outcome
(``acceptance.proposal_context``) does not capture this: after a proposal that matched
in full, the next one averaged 7.3 accepted drafts when its source agreed over 16+
tokens and 1.3 over 3-7 (repetitive prompts), where the proposer had switched sources.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Agreement lengths at which acceptance changed most on the recorded outputs.
BUCKETS = ((16, "16+"), (8, "8-15"), (3, "3-7"))
SHORT = "2"


def source_agreement(tokens: Sequence[int], first_draft: int, cap: int = 16) -> int:
    """Longest agreement (up to ``cap``) between the tokens before an earlier occurrence
    of the last two tokens followed by ``first_draft`` and the tokens before the end.

    0 when no such occurrence exists (the drafts did not come from copying this text).
    """
    n = len(tokens)
    if n < 3:
        return 0
    t = np.asarray(tokens)
    # j = where a copy would start: t[j-2:j] equals the last two tokens, t[j] the draft.
    starts = np.flatnonzero((t[: n - 2] == t[n - 2]) & (t[1: n - 1] == t[n - 1])
                            & (t[2:] == first_draft)) + 2
    if starts.size == 0:
        return 0
    depth = min(cap, int(starts.max()))
    back = np.arange(1, depth + 1)
    before = starts[:, None] - back[None, :]  # t[j-1], t[j-2], ... per occurrence
    agree = (before >= 0) & (t[np.maximum(before, 0)] == t[n - back][None, :])
    # Agreement runs until the first disagreement in each row.
    runs = np.where(agree.all(axis=1), depth, np.argmin(agree, axis=1))
    return int(runs.max())


class TokenHistory:
    """One request's tokens as a growing int array, for ``source_agreement``.

    Converting the whole token list every step costs time linear in its length (0.73 ms of
    the 0.78 ms a call took at 32k tokens); a request's tokens only grow, so only the new
    ones are copied. Tokens that shrink (a request started over) rebuild the array.
    """

    def __init__(self) -> None:
        self._buffer = np.empty(256, dtype=np.int64)
        self._size = 0

    def view(self, tokens: Sequence[int]) -> np.ndarray:
        n = len(tokens)
        if n < self._size:
            self._size = 0
        if n > len(self._buffer):
            grown = np.empty(max(2 * len(self._buffer), n), dtype=np.int64)
            grown[: self._size] = self._buffer[: self._size]
            self._buffer = grown
        if n > self._size:
            self._buffer[self._size: n] = tokens[self._size: n]
        self._size = n
        return self._buffer[:n]


def agreement_bucket(agreement: int) -> str:
    for threshold, name in BUCKETS:
        if agreement >= threshold:
            return name
    return SHORT
