"""One JSON line per engine step: the shape the cost model sees, and the measured time.

The cost model fits one line through every step; whether a draft's price depends on
the step's shape (how many requests, how the drafts spread over them) can only be
read off the steps themselves. Written by the scheduler process, line-buffered so a
killed engine leaves whole lines.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from xllm_plugin.spec.cost import StepShape


class StepLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None

    def write(self, shape: StepShape, verified: Sequence[tuple[int, int | None]],
              step_ms: float, gap_ms: float | None = None) -> None:
        """``verified``: (drafts verified, drafts accepted) per request that verified drafts;
        ``gap_ms``: the time from the previous step's end to this one's start (the scheduler's
        and the output processing's work, plus any idle time), when known."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", buffering=1)
        row = {"decode": shape.decode_requests, "drafts": shape.draft_tokens,
               "prefill": shape.prefill_tokens,
               "verified": sorted(verified, key=lambda pair: -pair[0]), "ms": round(step_ms, 3)}
        if gap_ms is not None:
            row["gap"] = round(gap_ms, 3)
        self._file.write(json.dumps(row) + "\n")


def read_step_log(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def split_step_log(rows: Sequence[dict], key: str = "config") -> dict[tuple, list[dict]]:
    """Steps grouped by the marker line before them (a line holding ``key``), as
    ``(marker values...) -> steps``; steps before the first marker are dropped."""
    out: dict[tuple, list[dict]] = {}
    current: tuple | None = None
    for row in rows:
        if key in row:
            current = tuple(row.values())
            out.setdefault(current, [])
        elif current is not None and "ms" in row:
            out[current].append(row)
    return out


def priced_ms(segments: dict[tuple, list[dict]], sweeps: int = 20) -> dict[tuple, float]:
    """Each segment's step time with the host's drift between segments taken out.

    Steps of one shape (decoding requests, drafts, prefill tokens) take the same work, so
    what moves their time between segments of one engine run is the host: on the 2-core
    hosts here every step of a configuration ran up to 27% slower in one round than in the
    next. Fitted as ``ms = drift[segment] * price[shape]`` by alternating medians (robust
    to the odd slow step; shapes common to all segments, such as decode steps without
    drafts, tie the drifts together), each segment's time is then the sum of its steps'
    prices: what the policy decided (how many steps, of which shapes) at one speed.
    """
    _, price = _drift_and_price(segments, sweeps)
    return {name: _priced(rows, price) for name, rows in segments.items()}


def priced_with_gaps_ms(segments: dict[tuple, list[dict]], sweeps: int = 20
                        ) -> dict[tuple, tuple[float, float | None]]:
    """Each segment's ``priced_ms`` and, at the same host speed (one fit for both), its
    host time between steps (``gap``): the scheduler's and the output processing's work,
    which a step's own time leaves out. The gap's median per step times the steps: the
    client's think time between requests and the idle time between segments are rare and
    long, and not the engine's. None where the steps carry no gaps."""
    drift, price = _drift_and_price(segments, sweeps)
    out: dict[tuple, tuple[float, float | None]] = {}
    for name, rows in segments.items():
        gaps = [step["gap"] / drift[name] for step in rows if step.get("gap") is not None]
        out[name] = (_priced(rows, price), statistics.median(gaps) * len(rows) if gaps else None)
    return out


def shape_prices_ms(segments: dict[tuple, list[dict]], sweeps: int = 20
                    ) -> dict[tuple[int, int, int], tuple[float, int]]:
    """Each step shape's (decoding requests, drafts, prefill tokens) time at one host speed
    (the fit of ``priced_ms``), with how many steps had it: what a draft costs at a batch
    size, read off the engine rather than assumed linear."""
    _, price = _drift_and_price(segments, sweeps)
    counts = Counter(_shape_of(step) for rows in segments.values() for step in rows
                     if step["ms"] > 0)
    return {shape: (ms, counts[shape]) for shape, ms in price.items()}


def _priced(rows: list[dict], price: dict[tuple[int, int, int], float]) -> float:
    return sum(price[_shape_of(step)] for step in rows if step["ms"] > 0)


def _drift_and_price(segments: dict[tuple, list[dict]], sweeps: int
                     ) -> tuple[dict[tuple, float], dict[tuple[int, int, int], float]]:
    steps = [(name, _shape_of(step), step["ms"]) for name, rows in segments.items()
             for step in rows if step["ms"] > 0]
    drift = {name: 1.0 for name in segments}
    price: dict[tuple[int, int, int], float] = {}
    for _ in range(sweeps):
        by_shape: dict[tuple[int, int, int], list[float]] = {}
        for name, shape, ms in steps:
            by_shape.setdefault(shape, []).append(ms / drift[name])
        price = {shape: statistics.median(times) for shape, times in by_shape.items()}
        by_segment: dict[tuple, list[float]] = {}
        for name, shape, ms in steps:
            by_segment.setdefault(name, []).append(ms / price[shape])
        drift = {name: statistics.median(by_segment[name]) if name in by_segment else 1.0
                 for name in segments}
        scale = statistics.geometric_mean(drift.values())
        drift = {name: value / scale for name, value in drift.items()}
    return drift, price


def _shape_of(step: dict) -> tuple[int, int, int]:
    return step["decode"], step["drafts"], step["prefill"]
