"""Workloads: trace readers for ``../shared/data``, synthetic arrivals, rate scaling.

A :class:`Workload` is a time-ordered list of :class:`RequestSpec` (immutable;
the simulator keeps run state elsewhere, so one workload serves many runs).
Readers exist for each trace class, not for one file:

- ``azure``: Azure LLM inference CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``), code or conversation;
- ``mooncake``: JSONL with ``timestamp`` (ms), ``input_length``, ``output_length`` and
  ``hash_ids`` (chained prefix blocks, ``hash_block_tokens`` tokens each, 512 in Mooncake's traces);
- ``servegen``: ServeGen per-client folders (``chunk-N-trace.csv`` with per-window arrival
  rate, CV and inter-arrival distribution; ``chunk-N-dataset.json`` with per-window
  length distributions): arrivals and lengths are *sampled*, so a seed picks one realisation;
- ``lengths``: a CSV of prompt/decode lengths without times (sarathi ShareGPT stats),
  given Poisson or Gamma arrivals;
- ``poisson`` / ``gamma``: synthetic arrivals with lengths drawn from any of the above or fixed.

Time scaling (:meth:`Workload.at_rate`) compresses or stretches inter-arrival
times so the mean rate hits a target while keeping the trace's burst shape.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np

AZURE_CODE = "azure/AzureLLMInferenceTrace_code.csv"
MOONCAKE = "mooncake/synthetic_trace.jsonl"
SERVEGEN_MM_IMAGE = "servegen/mm-image"
SHAREGPT_LENGTHS = "lengths/sarathi_sharegpt_8k_filtered_stats_llama2_tokenizer.csv"


def data_dir() -> Path:
    """``$XLLM_DATA_DIR``, else ``shared/data`` beside the repository checkout."""
    env = os.environ.get("XLLM_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _resolve(path: str | Path | None, default: str) -> Path:
    resolved = Path(path) if path is not None else data_dir() / default
    if not resolved.exists():
        raise FileNotFoundError(f"{resolved} not found; set XLLM_DATA_DIR to the shared data folder")
    return resolved


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request of a workload: when it arrives and how much work it is."""

    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    # Prefix identity: chained hashes of the prompt's leading blocks of
    # ``Workload.hash_block_tokens`` tokens; equal hash = equal prefix block.
    prefix_hashes: tuple[int, ...] = ()
    request_class: str = "online"
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    image_tokens: int = 0  # multimodal share of prompt_tokens (ServeGen)
    image_count: int = 0


@dataclass
class Workload:
    """Requests sorted by arrival time, plus where they came from."""

    name: str
    requests: list[RequestSpec]
    hash_block_tokens: int = 0  # 0: no prefix identity
    source: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.requests.sort(key=lambda r: r.arrival_s)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration_s(self) -> float:
        """Span from the first to the last arrival."""
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0

    @property
    def mean_rate(self) -> float:
        """Requests per second over the span (n - 1 gaps)."""
        return (len(self.requests) - 1) / self.duration_s if self.duration_s > 0 else 0.0

    def scaled(self, time_factor: float, name: str | None = None) -> Workload:
        """Every inter-arrival time multiplied by ``time_factor`` (< 1 = faster)."""
        if time_factor <= 0:
            raise ValueError("time_factor must be positive")
        t0 = self.requests[0].arrival_s if self.requests else 0.0
        reqs = [replace(r, arrival_s=(r.arrival_s - t0) * time_factor) for r in self.requests]
        return Workload(name or self.name, reqs, self.hash_block_tokens,
                        {**self.source, "time_factor": time_factor})

    def at_rate(self, rate: float) -> Workload:
        """The same trace compressed or stretched to a mean of ``rate`` requests/s."""
        if rate <= 0 or self.mean_rate <= 0:
            raise ValueError("rate and the workload's own rate must be positive")
        return self.scaled(self.mean_rate / rate, f"{self.name}@{rate:g}rps")

    def window(self, start_s: float = 0.0, duration_s: float | None = None,
               limit: int | None = None) -> Workload:
        """Requests arriving in ``[start, start + duration)`` (at most ``limit``), times rebased to 0."""
        t0 = (self.requests[0].arrival_s if self.requests else 0.0) + start_s
        end = t0 + duration_s if duration_s is not None else math.inf
        picked = [r for r in self.requests if t0 <= r.arrival_s < end][:limit]
        base = picked[0].arrival_s if picked else 0.0
        reqs = [replace(r, arrival_s=r.arrival_s - base) for r in picked]
        return Workload(self.name, reqs, self.hash_block_tokens, {**self.source, "start_s": start_s,
                                                                    "window_s": duration_s})

    def with_slo(self, ttft_ms: float | None, tpot_ms: float | None) -> Workload:
        """Every request carries these SLOs (overrides any per-request value)."""
        reqs = [replace(r, slo_ttft_ms=ttft_ms, slo_tpot_ms=tpot_ms) for r in self.requests]
        return Workload(self.name, reqs, self.hash_block_tokens, dict(self.source))

    def clipped(self, max_prompt: int | None = None, max_output: int | None = None) -> Workload:
        """Prompt and output lengths capped (for engines with a short context)."""
        def clip(r: RequestSpec) -> RequestSpec:
            p = min(r.prompt_tokens, max_prompt) if max_prompt else r.prompt_tokens
            o = min(r.output_tokens, max_output) if max_output else r.output_tokens
            return replace(r, prompt_tokens=p, output_tokens=max(o, 1))
        return Workload(self.name, [clip(r) for r in self.requests], self.hash_block_tokens,
                        {**self.source, "max_prompt": max_prompt, "max_output": max_output})


# -- trace readers ------------------------------------------------------------------

def _azure_seconds(stamp: str) -> float:
    # "2023-11-16 18:17:03.9799600": seven fractional digits, more than strptime takes.
    whole, _, frac = stamp.partition(".")
    base = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def read_azure(path: str | Path | None = None, limit: int | None = None) -> Workload:
    """Azure LLM inference trace CSV (code by default); arrivals relative to the first row."""
    resolved = _resolve(path, AZURE_CODE)
    reqs: list[RequestSpec] = []
    t0 = None
    with resolved.open(newline="") as handle:
        for i, row in enumerate(csv.DictReader(handle)):
            if limit is not None and i >= limit:
                break
            t = _azure_seconds(row["TIMESTAMP"])
            t0 = t if t0 is None else t0
            reqs.append(RequestSpec(f"azure-{i}", t - t0, max(int(row["ContextTokens"]), 1),
                                    max(int(row["GeneratedTokens"]), 1)))
    return Workload(resolved.stem, reqs, source={"reader": "azure", "path": str(resolved)})


def read_mooncake(path: str | Path | None = None, limit: int | None = None,
                  hash_block_tokens: int = 512) -> Workload:
    """Mooncake JSONL; ``hash_ids`` become the requests' prefix hashes."""
    resolved = _resolve(path, MOONCAKE)
    reqs: list[RequestSpec] = []
    with resolved.open() as handle:
        for i, line in enumerate(handle):
            if limit is not None and i >= limit:
                break
            if not line.strip():
                continue
            item = json.loads(line)
            reqs.append(RequestSpec(f"mooncake-{i}", item["timestamp"] / 1000.0,
                                    max(int(item["input_length"]), 1),
                                    max(int(item["output_length"]), 1),
                                    prefix_hashes=tuple(int(h) for h in item.get("hash_ids", ()))))
    return Workload(resolved.stem, reqs, hash_block_tokens=hash_block_tokens,
                    source={"reader": "mooncake", "path": str(resolved)})


def read_lengths(path: str | Path | None = None) -> list[tuple[int, int]]:
    """(prompt, output) pairs from a lengths CSV (``num_prefill_tokens,num_decode_tokens``)."""
    resolved = _resolve(path, SHAREGPT_LENGTHS)
    with resolved.open(newline="") as handle:
        return [(max(int(float(r["num_prefill_tokens"])), 1), max(int(float(r["num_decode_tokens"])), 1))
                for r in csv.DictReader(handle)]


# -- synthetic arrivals ---------------------------------------------------------------

def gamma_arrivals(rate: float, cv: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` arrival times with Gamma inter-arrivals of mean 1/rate and the given CV (1 = Poisson)."""
    if rate <= 0 or cv <= 0:
        raise ValueError("rate and cv must be positive")
    shape = 1.0 / (cv * cv)
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n)
    return np.cumsum(gaps) - gaps[0]


def synthetic(lengths: Sequence[tuple[int, int]], rate: float, n: int, cv: float = 1.0,
              seed: int = 0, name: str | None = None) -> Workload:
    """``n`` requests at ``rate`` req/s (Poisson when cv = 1, bursty Gamma when cv > 1),
    lengths sampled with replacement from ``lengths``."""
    rng = np.random.default_rng(seed)
    times = gamma_arrivals(rate, cv, n, rng)
    picks = rng.integers(0, len(lengths), size=n)
    reqs = [RequestSpec(f"syn-{i}", float(times[i]), *lengths[int(picks[i])]) for i in range(n)]
    kind = "poisson" if cv == 1.0 else f"gamma-cv{cv:g}"
    return Workload(name or kind, reqs, source={"reader": kind, "rate": rate, "cv": cv, "seed": seed})


# -- ServeGen -------------------------------------------------------------------------

def _pdf(text: str) -> tuple[np.ndarray, np.ndarray]:
    table = ast.literal_eval(text) if isinstance(text, str) else text
    values = np.array([float(k) for k in table], dtype=float)
    probs = np.array([float(v) for v in table.values()], dtype=float)
    return values, probs / probs.sum()


def _servegen_gaps(pattern: str, a: float, b: float, rate: float, cv: float, n: int,
                   rng: np.random.Generator) -> np.ndarray:
    if pattern == "Gamma" and a > 0 and b > 0:
        return rng.gamma(a, b, size=n)
    if pattern == "Weibull" and a > 0 and b > 0:
        return b * rng.weibull(a, size=n)
    shape = 1.0 / max(cv, 1e-3) ** 2  # unknown pattern: Gamma with the window's rate and CV
    return rng.gamma(shape, 1.0 / (rate * shape), size=n)


def read_servegen(path: str | Path | None = None, duration_s: float = 600.0, start_s: float = 0.0,
                  seed: int = 0, clients: Iterable[int] | None = None,
                  hash_block_tokens: int = 0) -> Workload:
    """Sample a ServeGen workload: every client's windows in ``[start, start + duration)``.

    Per client and per window (``chunk-N-trace.csv`` rows: window start s, rate,
    CV, pattern, two pattern parameters) arrivals follow the named inter-arrival
    distribution; lengths are drawn from the client's dataset window in force
    (``chunk-N-dataset.json``: window start -> pdf per field). Prompt tokens =
    text + image tokens.
    """
    folder = _resolve(path, SERVEGEN_MM_IMAGE)
    rng = np.random.default_rng(seed)
    ids = sorted(int(p.name.split("-")[1]) for p in folder.glob("chunk-*-trace.csv"))
    if clients is not None:
        wanted = set(clients)
        ids = [i for i in ids if i in wanted]
    end_s = start_s + duration_s
    reqs: list[RequestSpec] = []
    for client in ids:
        datasets = json.loads((folder / f"chunk-{client}-dataset.json").read_text())
        starts = sorted(int(k) for k in datasets)
        pdf_cache: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        with (folder / f"chunk-{client}-trace.csv").open(newline="") as handle:
            rows = [r for r in csv.reader(handle) if r]
        windows = [(float(r[0]), float(r[1] or 0), float(r[2] or 0), r[3],
                    float(r[4] or 0), float(r[5] or 0)) for r in rows]
        for k, (w_start, rate, cv, pattern, a, b) in enumerate(windows):
            w_end = windows[k + 1][0] if k + 1 < len(windows) else w_start + 600.0
            lo, hi = max(w_start, start_s), min(w_end, end_s)
            if rate <= 0 or hi <= lo:
                continue
            n_guess = int(rate * (w_end - w_start) * 1.5) + 10
            times = w_start + np.cumsum(_servegen_gaps(pattern, a, b, rate, cv, n_guess, rng))
            times = times[(times >= lo) & (times < hi)]
            if not len(times):
                continue
            key = max([s for s in starts if s <= w_start] or [starts[0]])
            pdfs = pdf_cache.get(key)
            if pdfs is None:
                pdfs = pdf_cache[key] = {f: _pdf(v) for f, v in datasets[str(key)].items()}

            def draw(field_name: str, size: int) -> np.ndarray:
                if field_name not in pdfs:
                    return np.zeros(size, dtype=int)
                values, probs = pdfs[field_name]
                return rng.choice(values, size=size, p=probs).astype(int)

            m = len(times)
            text, image = draw("text_tokens", m), draw("image_tokens", m)
            images, output = draw("image_count", m), draw("output_tokens", m)
            for j in range(m):
                reqs.append(RequestSpec(
                    f"servegen-{client}-{len(reqs)}", float(times[j] - start_s),
                    max(int(text[j] + image[j]), 1), max(int(output[j]), 1),
                    image_tokens=int(image[j]), image_count=int(images[j])))
    return Workload(f"servegen-{folder.name}", reqs, hash_block_tokens=hash_block_tokens,
                    source={"reader": "servegen", "path": str(folder), "seed": seed,
                            "start_s": start_s, "duration_s": duration_s})


# -- one entry point for the CLI -------------------------------------------------------

TRACES = ("azure-code", "mooncake", "servegen-mm", "sharegpt-poisson", "sharegpt-gamma")


def load_workload(name: str, path: str | Path | None = None, seed: int = 0, n: int = 2000,
                  rate: float = 2.0, cv: float = 4.0, duration_s: float = 600.0) -> Workload:
    """A workload by trace name (see ``TRACES``); ``n``/``rate``/``cv`` shape the synthetic ones."""
    if name == "azure-code":
        return read_azure(path)
    if name == "mooncake":
        return read_mooncake(path)
    if name == "servegen-mm":
        return read_servegen(path, duration_s=duration_s, seed=seed)
    if name in ("sharegpt-poisson", "sharegpt-gamma"):
        lengths = read_lengths(path)
        return synthetic(lengths, rate, n, cv=1.0 if name == "sharegpt-poisson" else cv, seed=seed,
                         name=name)
    raise ValueError(f"unknown trace '{name}'; choose one of {', '.join(TRACES)}")
