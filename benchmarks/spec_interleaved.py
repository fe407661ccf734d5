"""Adaptive speculation against static K inside one engine, configurations interleaved.

``spec_adaptive.py`` starts one engine per configuration. On the 2-core hosts here the
same static configuration moved up to 13% between engine starts on the EPYC host (k8,
ShareGPT c=4: 46.5 and 40.5 tok/s with the same drafts and acceptances) and up to 18% on
the Xeon host (float32), more than the differences in question. This benchmark takes the
engine start out: one plugin engine (n-gram drafts, K <= 8, the controller on) serves every
configuration, which each request selects:

- ``adaptive``: the controller chooses (no request field);
- ``kN``: ``vllm_xargs.spec_k = N``, the request verifies up to N drafts every step, as
  vLLM's static K would (``none`` is ``spec_k = 0``).

Per round, every (prompt set, concurrency) cell runs each configuration once over the
same requests as ``spec_adaptive.py`` (closed loop of ``c`` clients, greedy, fixed work),
the configurations' order rotating from cell to cell and round to round. Prefix caching
is off: every configuration sends the same prompts, and a cached prompt would favour the
later ones.

What it does not show: a static engine's own configuration (vLLM proposes N drafts
where this engine proposes 8 and keeps N; an n-gram proposal's first N tokens are the
same) and the controller's bookkeeping, which here runs for every configuration alike.

Engines run in float32 by default, where every configuration writes the same greedy texts.

Run: python benchmarks/spec_interleaved.py [--rounds 3] [--concurrency 1 4] [--pin]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import spec_adaptive as bench  # noqa: E402

from xllm_plugin.cpu_features import cpu_model, has_native_bf16, vllm_is_cpu_build  # noqa: E402
from xllm_plugin.launcher.cli import choose_dtype  # noqa: E402
from xllm_plugin.launcher.engine import EngineProcess, http_get_json  # noqa: E402
from xllm_plugin.models import build_model  # noqa: E402
from xllm_plugin.spec.step_log import (  # noqa: E402
    priced_ms,
    read_step_log,
    shape_prices_ms,
    split_step_log,
)

NAME = "spec_interleaved"
CONFIGS = ("none", "k2", "k4", "k8", "adaptive")


def request_fields(config: str) -> dict[str, Any]:
    """What a request of ``config`` adds to its body."""
    k = bench.static_k(config)
    return {} if k is None else {"vllm_xargs": {"spec_k": k}}


def rotated(configs: Sequence[str], shift: int) -> list[str]:
    shift %= len(configs)
    return [*configs[shift:], *configs[:shift]]


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    model, sets = build_model("smollm2"), bench.prompt_sets()
    spec = bench.spec_for("adaptive", model, bench.DEFAULT_TABLE, max(bench.CONCURRENCY),
                          args.dtype, bench.MAX_K, "0" if args.pin else None)
    spec.extra_args = [*spec.extra_args, "--no-enable-prefix-caching"]
    spec.xllm_config["speculative"].update(bench.adaptive_overrides(args.controller))
    spec.xllm_config["speculative"]["step_log"] = str(args.step_log.resolve())
    rows: list[dict[str, Any]] = []
    cells = [(s, c) for s in args.sets for c in args.concurrency]
    with EngineProcess(spec) as engine:
        asyncio.run(bench.measure(engine.url, sets["sharegpt"][-8:], 4, 8,
                                  args.max_tokens))  # warm-up, discarded
        for round_index in range(args.rounds):
            for cell_index, (prompt_set, c) in enumerate(cells):
                offset = bench.cell_offset(c, args.requests)
                prompts = sets[prompt_set][offset:] + sets[prompt_set][:offset]
                for config in rotated(args.configs, round_index + cell_index):
                    with args.step_log.open("a") as log:  # which steps are whose
                        log.write(json.dumps({"round": round_index, "set": prompt_set, "c": c,
                                              "config": config}) + "\n")
                    tps = asyncio.run(bench.measure(engine.url, prompts, c, args.requests[c],
                                                    args.max_tokens, request_fields(config)))
                    rows.append({"round": round_index, "set": prompt_set, "c": c,
                                 "config": config, "tps": tps})
                    print(f"round {round_index} {prompt_set:10s} c={c:2d} {config:8s}: "
                          f"{tps:6.1f} tok/s", flush=True)
        evidence = {"counters": bench.spec_counters(engine.url),
                    "controller": http_get_json(engine.url + "/xllm/status")["engine"][
                        "speculative"]}
    return rows, evidence


def summarize(rows: list[dict[str, Any]], evidence: dict[str, Any],
              args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        **bench.run_header(args, cpu_model(), ", K <= 8, prefix caching off, one engine"),
        "rounds": args.rounds,
        "controller": args.controller,
        "configs": json.dumps(args.configs),
        "max_tokens": args.max_tokens,
        "requests_per_cell": json.dumps({c: args.requests[c] for c in args.concurrency}),
    }
    for prompt_set in args.sets:
        for c in args.concurrency:
            cell = f"{prompt_set}_c{c}"
            by_round = {(r["round"], r["config"]): r["tps"] for r in rows
                        if r["set"] == prompt_set and r["c"] == c}
            for config in args.configs:
                values = [by_round[(i, config)] for i in range(args.rounds)]
                median = statistics.median(values)
                out[f"tps_{cell}_{config}"] = median
                out[f"spread_{cell}_{config}"] = (max(values) - min(values)) / median
            out.update(compare(by_round, list(range(args.rounds)), cell, args.configs))
    out.update(worst_cells(out, args))
    counters = evidence["counters"]
    drafts = counters.get("num_draft_tokens", 0.0)
    out["draft_tokens"] = drafts
    out["acceptance"] = counters.get("num_accepted_tokens", 0.0) / drafts if drafts else 0.0
    controller = evidence["controller"]
    out["fixed_length_request_steps"] = controller["fixed_length_request_steps"]
    out["adaptive_chosen_lengths"] = json.dumps(controller["chosen_lengths"])
    out["adaptive_cost_model_ms"] = json.dumps(
        {k: round(v, 3) for k, v in controller["cost_model_ms"].items()})
    return out


def priced_keys(step_log: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Adaptive against each static K by step time with the host's drift taken out.

    Fitted per cell (``step_log.priced_ms``): a shape's work depends on the prompts."""
    segments = split_step_log(read_step_log(step_log))  # (round, set, c, config) -> steps
    out: dict[str, Any] = {}
    for prompt_set in args.sets:
        for c in args.concurrency:
            cell_segments = {(key[0], key[3]): steps for key, steps in segments.items()
                             if key[1:3] == (prompt_set, c)}
            by_run = priced_ms(cell_segments)
            speed = {run: 1.0 / ms for run, ms in by_run.items()}  # higher is better
            out.update(compare(speed, sorted({i for i, _ in by_run}), f"{prompt_set}_c{c}",
                               args.configs, "priced_"))
            out.update(decode_step_prices(cell_segments, prompt_set, c))
    return {**out, **worst_cells(out, args, "priced_")}


MIN_SHAPE_STEPS = 5  # a decode step shape seen fewer times is left out of the price table


def decode_step_prices(segments: dict[tuple, list[dict]], prompt_set: str,
                       c: int) -> dict[str, float]:
    """``step_ms_{set}_c{c}_rows{R}``: a decode-only step of all ``c`` requests and ``R``
    query rows (requests plus drafts), at the cell's mean host speed. On the 2-core EPYC the
    price moved in tiles of rows, not a line (README, adaptive speculation)."""
    return {f"step_ms_{prompt_set}_c{c}_rows{c + drafts}": ms
            for (decoding, drafts, prefill), (ms, steps) in sorted(shape_prices_ms(segments).items())
            if decoding == c and not prefill and steps >= MIN_SHAPE_STEPS}


def compare(values: dict[tuple[int, str], float], rounds: list[int], cell: str,
            configs: Sequence[str], prefix: str = "") -> dict[str, Any]:
    """Adaptive against the best static configuration and none, from ``(round, config)``
    values where higher is better: ratio of medians and the per-round range."""
    median = {config: statistics.median(values[(i, config)] for i in rounds)
              for config in configs}
    best = max((c for c in configs if c != "adaptive"), key=lambda k: median[k])
    out: dict[str, Any] = {f"{prefix}best_static_{cell}": best}
    for peer, key in ((best, "best_static"), ("none", "none")):
        paired = [values[(i, "adaptive")] / values[(i, peer)] for i in rounds]
        name = f"{prefix}ratio_vs_{key}_{cell}"
        out[name] = median["adaptive"] / median[peer]
        out[f"{name}_paired_min"] = min(paired)
        out[f"{name}_paired_max"] = max(paired)
    return out


def worst_cells(out: dict[str, Any], args: argparse.Namespace,
                prefix: str = "") -> dict[str, float]:
    """The headline keys: worst cell per concurrency against the best static K, and
    the lowest ratio to none."""
    cells = [(s, c) for s in args.sets for c in args.concurrency]
    worst = {f"{prefix}ratio_vs_best_static_c{c}": min(
        out[f"{prefix}ratio_vs_best_static_{s}_c{c}"] for s in args.sets)
        for c in args.concurrency}
    worst[f"{prefix}ratio_vs_none_min"] = min(out[f"{prefix}ratio_vs_none_{s}_c{c}"]
                                              for s, c in cells)
    return worst


def write_report(result: dict[str, Any], args: argparse.Namespace) -> None:
    configs = json.loads(result["configs"]) if "configs" in result else list(CONFIGS)
    lines = []
    for prompt_set in args.sets:
        lines += [f"\n**{prompt_set}** (output tok/s, median of {result['rounds']} rounds; "
                  "± half the spread (max-min)/median)\n",
                  "| c | " + " | ".join(configs) + " | adaptive / best static (rounds) | "
                  "adaptive / none |", "|---|" + "---|" * (len(configs) + 2)]
        for c in args.concurrency:
            cell = f"{prompt_set}_c{c}"
            values = " | ".join(f"{result[f'tps_{cell}_{k}']:.1f} "
                                f"(±{50 * result[f'spread_{cell}_{k}']:.0f}%)" for k in configs)
            lines.append(
                f"| {c} | {values} | {result[f'ratio_vs_best_static_{cell}']:.3f} "
                f"({result[f'best_static_{cell}']}; "
                f"{result[f'ratio_vs_best_static_{cell}_paired_min']:.3f}-"
                f"{result[f'ratio_vs_best_static_{cell}_paired_max']:.3f}) | "
                f"{result[f'ratio_vs_none_{cell}']:.3f} |")
    verdicts = []
    for prompt_set in args.sets:
        for c in args.concurrency:
            cell = f"{prompt_set}_c{c}"
            low = result[f"ratio_vs_best_static_{cell}_paired_min"]
            high = result[f"ratio_vs_best_static_{cell}_paired_max"]
            side = ("above it in every round" if low >= 1.0 else
                    "below it in every round" if high < 1.0 else "on both sides of it")
            verdicts.append(f"{prompt_set} c={c} {side} ({low:.3f}-{high:.3f})")
    headline = "\n".join(f"| {prefix}ratio_vs_best_static_c{c} | "
                         f"{result[f'{prefix}ratio_vs_best_static_c{c}']:.3f} |"
                         for prefix in ("", "priced_") for c in args.concurrency)
    priced = "; ".join(
        f"{s} c={c} {result[f'priced_ratio_vs_best_static_{s}_c{c}']:.3f} "
        f"({result[f'priced_best_static_{s}_c{c}']}; rounds "
        f"{result[f'priced_ratio_vs_best_static_{s}_c{c}_paired_min']:.3f}-"
        f"{result[f'priced_ratio_vs_best_static_{s}_c{c}_paired_max']:.3f})"
        for s in args.sets for c in args.concurrency)
    step_prices = "\n".join(
        f"- {s} c={c}: " + ", ".join(
            f"{key.rsplit('_rows', 1)[1]}: {value:.1f}" for key, value in result.items()
            if key.startswith(f"step_ms_{s}_c{c}_rows"))
        for s in args.sets for c in args.concurrency
        if any(key.startswith(f"step_ms_{s}_c{c}_rows") for key in result))
    text = f"""# Adaptive speculation against static K inside one engine

One plugin engine (n-gram drafts, K <= 8, `xllm.speculative.adaptive` on, prefix caching
off) serves every configuration; each request selects its own: `adaptive` leaves the
length to the controller, `kN` sets `vllm_xargs.spec_k = N` (verify up to N drafts every
step, vLLM's static K; `none` = 0). Per round each cell runs every configuration once over
the same requests as `spec_adaptive.md` (closed loop of `c` clients, greedy, up to
{result['max_tokens']} tokens, requests per concurrency `{result['requests_per_cell']}`),
the order rotating between cells and rounds. This takes the engine start, which moved the
same static configuration by up to 18% between runs of `spec_adaptive.py` here, out of
the comparison.
{chr(10).join(lines)}

"adaptive / best static" is the ratio of medians against the static K (or none) with the
highest median in the cell; in brackets that static K, then the lowest and highest
per-round ratio (a round's adaptive run over the same round's run of that K).
Against that K, adaptive was {"; ".join(verdicts)}. Where the rounds fall on both sides,
this run does not tell the two apart.

**Step time with the host's drift taken out.** Every configuration writes the same greedy
tokens here (float32), so a configuration's throughput is set by its steps. The engine
logged every step (`xllm.speculative.step_log`). Per cell, each step's time is fitted as
a drift factor of its configuration's run times a price of its shape (decoding requests,
drafts verified, prefill tokens; `step_log.priced_ms`), and a run is priced as the sum of
its steps' prices. That keeps what the policies decide (how many steps, of which shapes)
and drops the host's speed, which moved every step of a run by up to 27% between the
rounds of one run here (2026-12-06). Adaptive / best static K by priced step time (the best static K by the same
measure; then the lowest and highest per-round ratio): {priced}. Time outside the steps
(HTTP, detokenizing, scheduling) is not in it: 1.6-2.9% of a run's wall time, about the
same for every configuration, in one round of the 2026-12-06 run.

Decode steps of all `c` requests by query rows (requests plus drafts), ms at the cell's
mean host speed (`step_ms_SET_cC_rowsR`; shapes seen at least {MIN_SHAPE_STEPS} times):
{step_prices or "(none logged)"}

| key | value |
|---|---|
{headline}
| ratio_vs_none_min | {result['ratio_vs_none_min']:.3f} |
| priced_ratio_vs_none_min | {result['priced_ratio_vs_none_min']:.3f} |

Over the whole run: {result['draft_tokens']:.0f} draft tokens verified (vLLM's counter),
acceptance {result['acceptance']:.2f}; {result['fixed_length_request_steps']} request-steps
ran a fixed length. Controller at the end: lengths chosen (length: request-steps)
`{result['adaptive_chosen_lengths']}`, learned step cost (ms)
`{result['adaptive_cost_model_ms']}` (it learns from every step, the static ones too).

What it does not show: a static engine's own set-up (vLLM proposes N drafts where this
engine proposes 8 and keeps N; an n-gram proposal's first N tokens are the same), and the
controller's bookkeeping, which here runs for every configuration alike (py-spy put
XLLMScheduler's own work under 1% of the engine core's time). The engine-per-configuration
comparison, with vLLM's per-batch-size table, is `spec_adaptive.md`.

Measured on: {result['machine']}; controller settings `{result.get('controller', 'adaptive')}`;
{result['date']}.
Rerun: `{result['command']}`.
"""
    (bench.RESULTS / f"{args.out}.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4],
                        choices=bench.CONCURRENCY)
    parser.add_argument("--sets", nargs="+", default=list(bench.PROMPT_SETS),
                        choices=bench.PROMPT_SETS)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=("auto", "bfloat16", "float32"),
                        help="float32: every configuration writes the same greedy texts (bf16 "
                             "flips some between draft lengths, see spec_adaptive.py); auto: "
                             "float32 on a CPU without native bf16, else the model's")
    parser.add_argument("--pin", action="store_true",
                        help="engine on core 0, this client on the other cores")
    parser.add_argument("--quick", action="store_true", help="fewer requests (smoke test)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS),
                        help="what the requests select: none, kN (spec_k = N, any N up to 8) "
                             "and adaptive; none and adaptive are needed for the ratios")
    parser.add_argument("--controller", default="adaptive",
                        help="the controller's settings, as spec_adaptive's configurations: "
                             "'adaptive:long_run_rate=false' (its requests still show as "
                             "'adaptive')")
    parser.add_argument("--step-log", type=Path,
                        help="keep the engine's per-step log (xllm.speculative.step_log, with a "
                             "line before each configuration's requests) here; default: a "
                             "temporary file")
    parser.add_argument("--out", default=NAME)
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the page from the JSON (same --sets and --concurrency); "
                             "with --step-log, recompute its priced_* keys from that log")
    args = parser.parse_args()
    if args.report_only:
        result = json.loads((bench.RESULTS / f"{args.out}.json").read_text())
        args.configs = json.loads(result.get("configs", json.dumps(args.configs)))
        if args.step_log:
            result.update(priced_keys(args.step_log, args))
            (bench.RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=1))
        write_report(result, args)
        return
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    bad = [c for c in args.configs if c != "adaptive"
           and (bench.static_k(c) is None or bench.static_k(c) > bench.MAX_K)]
    if bad or not {"none", "adaptive"} <= set(args.configs):
        parser.error(f"--configs: none, adaptive and kN (1 <= N <= {bench.MAX_K}); got "
                     f"{' '.join(args.configs)}")
    args.dtype, _ = choose_dtype(args.dtype, cpu_build=vllm_is_cpu_build(),
                                 native_bf16=has_native_bf16())
    args.requests = bench.requests_per_cell(args.quick)
    if args.pin:
        bench.pin_client(parser)
    with tempfile.TemporaryDirectory() as scratch:
        args.step_log = args.step_log or Path(scratch) / "steps.jsonl"
        args.step_log.unlink(missing_ok=True)
        rows, evidence = run(args)
        priced = priced_keys(args.step_log, args)
    result = {**summarize(rows, evidence, args), **priced}
    bench.RESULTS.mkdir(exist_ok=True)
    (bench.RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=1))
    write_report(result, args)
    print(json.dumps({k: v for k, v in result.items() if k.endswith("none_min") or k.startswith(
        ("ratio_vs_best_static_c", "priced_ratio_vs_best_static_c"))}, indent=1))


if __name__ == "__main__":
    main()
