"""How well the acceptance estimates predict: predicted against realized worth of drafts.

The length rule trusts ``g(i)``, the estimated probability that a request's drafts ``1..i``
are all accepted. A bias there moves the rule's choices without any error showing: a
``g`` too high at late positions verifies drafts that are thrown away, one too low cuts
drafts that would have paid. Every judged proposal (shadow judging covers drafts that were
cut, see ``adaptive.py``) is compared here with what was predicted for it when it was
chosen: per context and position, the predicted ``g(i)`` beside whether the proposal's
first ``i`` drafts were all right, in decayed sums (recent proposals count most). A
diagnosis for ``/xllm/status``, not an input to the rule.

Which way the estimates lean depends on what the engine served before: they carry the
engine-wide history into each context's prior. Replayed on SmolLM2 outputs recorded for the
benchmark's prompts (xeon-fp32 costs) after a copy-heavy warm-up, late positions (5-8) were
predicted above what was found in most contexts (0.25 against 0.12 after a missed proposal
on ShareGPT at c=4); after the engine's own ShareGPT warm-up, repetitive c=1 showed the
opposite (0.53-0.55 predicted for the seventh draft after a full match from a 16+ agreement,
0.93 found), in the engine as in the replay. Scaling each ``g(i)``
by its context's realized-over-predicted ratio was tried (2026-12-06): over 4 cost
functions x 8 cells x 3 seeds it moved adaptive / best static K by -1.1% to +0.7%, worst
cells 0.991-0.996 against 0.993-0.997 without it, so the rule does not use it.
"""

from __future__ import annotations

from collections.abc import Sequence


class Calibration:
    def __init__(self, window_proposals: int = 256) -> None:
        self._decay = 1.0 - 1.0 / max(window_proposals, 2)
        self._sums: dict[str, list[list[float]]] = {}  # context -> [predicted, realized, n]

    def add(self, predicted: Sequence[float], matched: int, judged: int, context: str) -> None:
        """One judged proposal (``judge_proposal``'s ``matched``/``judged``) and the ``g(i)``
        predicted for its first ``len(predicted)`` drafts.

        Past the last judged draft a position's outcome is known only when a wrong draft
        was seen (then every later one failed too); a proposal cut short by the request's
        end says nothing about its later positions.
        """
        known = len(predicted) if judged > matched else min(judged, len(predicted))
        rows = self._sums.setdefault(context, [])
        while len(rows) < known:
            rows.append([0.0, 0.0, 0.0])
        for row in rows:
            for j in range(3):
                row[j] *= self._decay
        for i in range(known):
            rows[i][0] += predicted[i]
            rows[i][1] += 1.0 if i < matched else 0.0
            rows[i][2] += 1.0

    def as_dict(self) -> dict[str, list[list[float]]]:
        """Per context and draft position: [mean predicted g, realized fraction, proposals]
        (decayed)."""
        return {context: [[round(p / n, 4), round(r / n, 4), round(n, 1)]
                          for p, r, n in rows if n]
                for context, rows in sorted(self._sums.items())}
