"""Host-side beam selection: the best ``width`` (beam, token) extensions of a step.

Each beam offers candidates whose log-probs arrive sorted best first (vLLM's
top-k logprobs are). A candidate's score is the beam's cumulative log-prob plus
its own. Instead of sorting all ``beams x k`` candidates, a bounded min-heap of
size ``width`` holds the best so far (xLLM §4.5), and two early exits skip work:

- beams are visited best-first by their best candidate; once a beam's best
  candidate cannot beat the heap's minimum, no later beam's can either, so the
  scan stops;
- inside a beam, the first candidate that cannot beat the minimum ends that
  beam, because the rest are worse.

The result equals the first ``width`` entries of a full sort by score (ties at
the cut may resolve to different but equally scored candidates).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, order=True)
class Selected:
    """One surviving extension: the new beam's score, its parent beam and token."""

    score: float
    beam: int
    token: int


def select_top(beam_scores: Sequence[float], tokens: Sequence[Sequence[int]],
               logprobs: Sequence[Sequence[float]], width: int) -> list[Selected]:
    """The ``width`` best extensions over all beams, best first.

    ``tokens[b]`` and ``logprobs[b]`` are beam ``b``'s candidates with log-probs
    sorted in descending order; ``-inf`` and NaN entries (masked tokens) are
    never selected.
    """
    if width <= 0:
        return []
    firsts = [(-(beam_scores[b] + logprobs[b][0]), b) for b in range(len(beam_scores))
              if len(logprobs[b]) and not math.isnan(logprobs[b][0])]
    firsts.sort()
    heap: list[tuple[float, int, int]] = []  # (score, beam, token); min at heap[0]
    for negative_best, beam in firsts:
        if negative_best == math.inf:
            break
        if len(heap) == width and -negative_best <= heap[0][0]:
            break  # later beams' best candidates are no better
        base = beam_scores[beam]
        beam_tokens = tokens[beam]
        for lp, token in zip(logprobs[beam], beam_tokens):
            score = base + lp
            if not score > -math.inf:  # -inf or NaN: this and the rest are masked
                break
            if len(heap) < width:
                heapq.heappush(heap, (score, beam, int(token)))
            elif score > heap[0][0]:
                heapq.heapreplace(heap, (score, beam, int(token)))
            else:
                break  # the rest of this beam is worse
    heap.sort(key=lambda entry: -entry[0])
    return [Selected(score, beam, token) for score, beam, token in heap]


def select_top_full_sort(beam_scores: Sequence[float], tokens: Sequence[Sequence[int]],
                         logprobs: Sequence[Sequence[float]], width: int) -> list[Selected]:
    """Reference: score every candidate and sort them all (what stock vLLM does)."""
    flat: list[Selected] = []
    for beam, (base, beam_tokens, beam_lps) in enumerate(zip(beam_scores, tokens, logprobs)):
        for token, lp in zip(beam_tokens, beam_lps):
            score = base + lp
            if score > -math.inf:
                flat.append(Selected(float(score), beam, int(token)))
    flat.sort(key=lambda s: -s.score)
    return flat[:max(width, 0)]


def select_top_numpy(beam_scores: np.ndarray, logprobs: np.ndarray,
                     width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised variant over a dense ``(beams, k)`` log-prob matrix: (scores, beams, columns).

    Used when the candidates already sit in one array; ``argpartition`` is
    linear in ``beams x k`` and avoids Python-level loops.
    """
    scores = (beam_scores[:, None] + logprobs).ravel()
    finite = np.isfinite(scores)
    count = min(width, int(finite.sum()))
    if count == 0:
        empty = np.empty(0, dtype=np.int64)
        return np.empty(0), empty, empty
    scores = np.where(finite, scores, -np.inf)
    part = np.argpartition(-scores, count - 1)[:count] if count < scores.size else np.arange(scores.size)
    part = part[np.argsort(-scores[part], kind="stable")]
    beams, columns = np.divmod(part, logprobs.shape[1])
    return scores[part], beams, columns
