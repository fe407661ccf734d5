"""Adaptive speculation against each peer engine: both engines up, every cell run on the two in turn.

``spec_adaptive.py`` runs one engine at a time, so a configuration's cell is measured
minutes from another's. On the 2-core EPYC host plugin-k8's steps over the same c=1
requests summed to 16.4 s in one repetition and 22.4 s in another (step logs of a pilot,
2026-12-06), more than the configurations differ. Here the candidate engine (the plugin,
``adaptive``) stays up beside one stock vLLM peer at a time (at most two vLLM processes fit
on two cores, and only one of the two runs at a time), and each (prompt set, concurrency)
cell runs on the candidate and on the peer back to back, the order alternating from cell
to cell, pair to pair and peer to peer. Each ratio is read across a minute or two, not an
hour. It is the issue's own comparison: measured output tok/s from the client, everything
inside the makespan (API server, scheduler, the plugin's bookkeeping), of the same greedy
requests as ``spec_adaptive.py`` (the same prompt sets, cells and fixed work per cell).

``--side-by-side`` runs a cell on the two engines at the same time instead, each engine's
whole process tree on a core of its own, the cores swapped from pair to pair: a host that
slows down slows both sides at once. Each engine then has one core, not two, so its
absolute tok/s (and where drafts pay) is that of a one-core engine; the ratio is still the
same two configurations' on the same hardware. On the 2-core EPYC host it took 0.63 of the
time of the sequential design, but its pairs strayed further from 1 in an A/A check (root
mean square log ratio 0.062 against 0.043): no better per hour there (README, #12). Run an
A/A check first on any host (``--candidate k4 --peers k4``): its spread is the method's own.

Peers: ``none``, static n-gram ``kN``, ``table`` (vLLM's per-batch-size K table, see
``spec_adaptive.py --table``). ``--candidate plugin-k8 --peers k8`` measures what the plugin
engine costs beside the choice of length. A plugin peer (``plugin-kN``) is a diagnostic:
with a step log on both sides (``adaptive:step_log="/tmp/a.jsonl"``,
``plugin-k4:step_log="/tmp/k.jsonl"``; each gets cell markers) the two engines' steps of one
shape can be compared minutes apart.

Result keys (``results/NAME.json``): ``ratio_vs_PEER_SET_cC`` (geometric mean over pairs of
candidate tok/s / peer tok/s, with ``_paired_min``/``_paired_max``), and, as in
``spec_adaptive.json``, ``ratio_vs_best_static_cC`` (the lowest ratio against a static peer,
none included, over both prompt sets), ``ratio_vs_table_cC`` and ``ratio_vs_none_min``.

Run: python benchmarks/spec_paired.py [--pairs 2] [--peers none k2 k4 k8 table]
     [--concurrency 1 4 16 32] [--side-by-side] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import spec_adaptive as bench  # noqa: E402

from xllm_plugin.cpu_features import cpu_model  # noqa: E402
from xllm_plugin.launcher.engine import EngineProcess  # noqa: E402
from xllm_plugin.models import build_model  # noqa: E402

NAME = "spec_paired"
PEERS = ("none", "k2", "k4", "k8", "table")


def side_order(peer_index: int, pair: int, cell_index: int) -> tuple[str, str]:
    """Which engine runs a cell first: alternating, so a host trend within a pair favours
    neither side over the whole run."""
    first_candidate = (peer_index + pair + cell_index) % 2 == 0
    return ("candidate", "peer") if first_candidate else ("peer", "candidate")


def _warm_up(url: str, sets: dict[str, list[str]], args: argparse.Namespace,
             body: dict[str, Any] | None) -> None:
    asyncio.run(bench.measure(url, sets["sharegpt"][-8:], 4, 8, args.max_tokens, body))


async def _cell(url: str, config: str, prompts: list[str], c: int,
                args: argparse.Namespace) -> tuple[float, list[str]]:
    """One engine's run of a cell: tok/s and the texts in request order."""
    texts: dict[int, str] = {}
    tps = await bench.measure(url, prompts, c, args.requests[c], args.max_tokens,
                              bench.request_body(config), texts=texts)
    return tps, [texts[i] for i in sorted(texts)]


async def _together(engines: list[tuple[str, str]], prompts: list[str], c: int,
                    args: argparse.Namespace) -> list[tuple[float, list[str]]]:
    return list(await asyncio.gather(*[_cell(url, config, prompts, c, args)
                                       for url, config in engines]))


def core_pair() -> tuple[int, int]:
    """The two cores a side-by-side run puts its engines on."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("--side-by-side needs two cores")
    return cores[0], cores[1]


def cores_of(peer_index: int, pair: int, cores: tuple[int, int]) -> tuple[int, int]:
    """(candidate's core, peer's core) for a side-by-side pair: swapped from pair to pair
    and peer to peer, so a difference between the cores favours neither side."""
    return cores if (peer_index + pair) % 2 == 0 else (cores[1], cores[0])


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (peer, pair, cell, side): tok/s and the output texts."""
    model, sets = build_model("smollm2"), bench.prompt_sets()
    max_seqs = max(bench.CONCURRENCY)
    cells = [(s, c) for s in args.sets for c in args.concurrency]
    for config in (args.candidate, *args.peers):
        if log := bench.step_log_of(config):
            Path(log).unlink(missing_ok=True)
    total, done = len(args.peers) * args.pairs * len(cells) * 2, 0
    rows: list[dict[str, Any]] = []
    cores = core_pair() if args.side_by_side else None
    candidate_spec = bench.spec_for(args.candidate, model, args.table, max_seqs, args.dtype,
                                    args.candidate_max_k, cores and str(cores[0]))
    with EngineProcess(candidate_spec) as candidate:
        _warm_up(candidate.url, sets, args, bench.request_body(args.candidate))
        for peer_index, peer in enumerate(args.peers):
            with EngineProcess(bench.spec_for(peer, model, args.table, max_seqs, args.dtype,
                                              engine_cores=cores and str(cores[1]))
                               ) as peer_engine:
                _warm_up(peer_engine.url, sets, args, bench.request_body(peer))
                engines = {"candidate": (candidate.url, args.candidate),
                           "peer": (peer_engine.url, peer)}
                for pair in range(args.pairs):
                    on_core: dict[str, int | None] = {"candidate": None, "peer": None}
                    if cores is not None:
                        on_core["candidate"], on_core["peer"] = cores_of(peer_index, pair, cores)
                        candidate.move_to_cores({on_core["candidate"]})
                        peer_engine.move_to_cores({on_core["peer"]})
                    for cell_index, (prompt_set, c) in enumerate(cells):
                        offset = bench.cell_offset(c, args.requests)
                        prompts = sets[prompt_set][offset:] + sets[prompt_set][:offset]
                        order = (("candidate", "peer") if cores is not None
                                 else side_order(peer_index, pair, cell_index))
                        # Side by side: both engines at once; else one after the other.
                        batches = [order] if cores is not None else [(side,) for side in order]
                        for batch in batches:
                            time.sleep(bench.SHM_SPIN_WAIT_S)
                            for side in batch:
                                bench.mark_step_log(
                                    bench.step_log_of(engines[side][1]),
                                    {"config": engines[side][1], "peer": peer, "pair": pair,
                                     "set": prompt_set, "c": c})
                            results = asyncio.run(_together([engines[side] for side in batch],
                                                            prompts, c, args))
                            for side, (tps, texts) in zip(batch, results):
                                bench.mark_step_log(bench.step_log_of(engines[side][1]),
                                                    bench.BETWEEN_CELLS)
                                done += 1
                                rows.append({"peer": peer.split(":")[0], "engine": peer_index,
                                             "pair": pair, "side": side, "set": prompt_set, "c": c,
                                             "tps": tps, "core": on_core[side], "texts": texts})
                                print(f"[{done}/{total}] vs {peer:5s} pair {pair} "
                                      f"{prompt_set:10s} c={c:2d} {engines[side][1]:9s} "
                                      f"{tps:6.1f} tok/s"
                                      + (f" (core {on_core[side]})" if cores else ""),
                                      flush=True)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Paired ratios per peer and cell, and the issue's headline keys from them."""
    tps: dict[tuple[str, str, int, int, int], dict[str, float]] = defaultdict(dict)
    texts: dict[tuple[str, str, int, int, int], dict[str, list[str]]] = defaultdict(dict)
    by_side: dict[tuple[str, str, str, int], list[float]] = defaultdict(list)
    for row in rows:
        # A peer named twice runs on two engines: their pairs pool under its name.
        key = (row["peer"], row["set"], row["c"], row["pair"], row.get("engine", 0))
        tps[key][row["side"]] = row["tps"]
        by_side[(row["peer"], row["side"], row["set"], row["c"])].append(row["tps"])
        if "texts" in row:
            texts[key][row["side"]] = row["texts"]
    ratios: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    same = compared = 0
    for key, sides in tps.items():
        if len(sides) == 2:
            ratios[key[:3]].append(sides["candidate"] / sides["peer"])
            if len(texts.get(key, {})) == 2:
                pair_texts = texts[key]
                same += sum(a == b for a, b in zip(pair_texts["candidate"], pair_texts["peer"]))
                compared += len(pair_texts["candidate"])
    out: dict[str, Any] = {"same_texts_as_peer": same / compared} if compared else {}
    for (peer, prompt_set, c), values in sorted(ratios.items()):
        name = f"ratio_vs_{peer}_{prompt_set}_c{c}"
        out[name] = statistics.geometric_mean(values)
        out[f"{name}_paired_min"], out[f"{name}_paired_max"] = min(values), max(values)
    out.update(pair_spread(list(ratios.values())))
    peers = {peer for peer, _, _ in ratios}
    sets = sorted({s for _, s, _ in ratios})
    for c in sorted({c for _, _, c in ratios}):
        static = [p for p in bench.STATIC if p in peers]
        if static:
            worst = {s: min(static, key=lambda p: out[f"ratio_vs_{p}_{s}_c{c}"]) for s in sets}
            for prompt_set, peer in worst.items():
                out[f"best_static_{prompt_set}_c{c}"] = peer
                out[f"ratio_vs_best_static_{prompt_set}_c{c}"] = \
                    out[f"ratio_vs_{peer}_{prompt_set}_c{c}"]
            out[f"ratio_vs_best_static_c{c}"] = min(
                out[f"ratio_vs_best_static_{s}_c{c}"] for s in sets)
        if "table" in peers:
            out[f"ratio_vs_table_c{c}"] = min(out[f"ratio_vs_table_{s}_c{c}"] for s in sets)
    if "none" in peers:
        out["ratio_vs_none_min"] = min(value for key, value in out.items()
                                       if key.startswith("ratio_vs_none_")
                                       and not key.endswith(("_min", "_max")))
    for key, values in sorted(by_side.items()):
        out["tps_{}_{}_{}_c{}".format(*key)] = statistics.median(values)
    return out


def pair_spread(cells: list[list[float]]) -> dict[str, float]:
    """How far one pair's ratio falls from its cell's mean, pooled over every cell with two
    pairs or more: the SD of log ratio per pair (``pair_sd_log``), and so the standard error
    of a cell's geometric mean (``cell_se_log``, at the run's pairs per cell).

    A floor for what a ratio must clear, not the whole noise: an offset shared by every
    pair of a cell is not seen. Stock k4 against itself (an A/A run, 2026-12-07, EPYC)
    scattered 1.9% per pair about cell means of 0.938-0.991, and the headline key, the worst
    of several such means, read 0.938 at c=4 where nothing differs.
    """
    logs = [[math.log(value) for value in values] for values in cells if len(values) > 1]
    freedom = sum(len(values) - 1 for values in logs)
    if not freedom:
        return {}
    squares = sum((x - statistics.fmean(values)) ** 2 for values in logs for x in values)
    sd = math.sqrt(squares / freedom)
    pairs = statistics.median(len(values) for values in logs)
    return {"pair_sd_log": sd, "cell_se_log": sd / math.sqrt(pairs)}


def write_report(result: dict[str, Any], name: str) -> None:
    """``results/{name}.md`` and its plot."""
    named = json.loads(result.get("peers", json.dumps(PEERS)))
    peers = [p for p in named if any(k.startswith(f"ratio_vs_{p}_") for k in result)]
    sets = [s for s in bench.PROMPT_SETS if any(f"_{s}_c" in k for k in result)]
    concurrency = [c for c in bench.CONCURRENCY
                   if any(k.endswith(f"_c{c}") and k.startswith("ratio_vs_") for k in result)]
    lines = [f"# {name}: {_label(result)} against each peer, paired cells", "",
             f"`{result['command']}`", "", f"{result['date']}, {result['machine']}.", "",
             "Candidate tok/s / peer tok/s, geometric mean over "
             f"{result['pairs']} pair(s) per peer engine [lowest, highest pair]; each pair "
             "ran the cell on "
             + ("the two engines at the same time, each on a core of its own (swapped every "
                "pair)" if result.get("side_by_side") else
                "the two engines back to back (both up)")
             + ". Above 1: the candidate was faster.", ""]
    for prompt_set in sets:
        lines += [f"## {prompt_set}", "", "| c | " + " | ".join(peers) + " |",
                  "|---|" + "---|" * len(peers)]
        for c in concurrency:
            cells = []
            for peer in peers:
                key = f"ratio_vs_{peer}_{prompt_set}_c{c}"
                cells.append(f"{result[key]:.3f} [{result[key + '_paired_min']:.3f}, "
                             f"{result[key + '_paired_max']:.3f}]" if key in result else "")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    headline = [k for k in result if k.startswith(("ratio_vs_best_static_c", "ratio_vs_table_c"))
                or k == "ratio_vs_none_min"]
    if headline:
        lines += ["## Headline (the worse prompt set)", "", "| key | value |", "|---|---|"]
        lines += [f"| `{k}` | {result[k]:.3f} |" for k in headline]
    if "pair_sd_log" in result:
        lines += ["", "Spread of the pairs: one pair's log ratio scatters "
                  f"{result['pair_sd_log']:.3f} (SD, pooled over the cells) about its cell's "
                  f"mean, so a cell's mean is known to about ±{result['cell_se_log']:.3f} (one "
                  "standard error). The headline "
                  "takes the worst of several such means, which tends to read below 1 where "
                  "nothing differs."]
    lines += ["", f"Texts equal to the peer's (same prompt, same pair): "
              f"{100 * result.get('same_texts_as_peer', float('nan')):.1f}%.", "",
              f"![ratios]({_plot(result, name, peers, sets, concurrency)})", "",
              f"Rerun: `{result['command']}` (about {result['wall_minutes']:.0f} minutes)."]
    (bench.RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def _label(result: dict[str, Any]) -> str:
    """The candidate's configuration without its overrides (a step log's path, say), and
    its K where it is not the benchmark's 8."""
    label = result["candidate"].split(":")[0]
    max_k = result.get("candidate_max_k", bench.MAX_K)
    return label if max_k == bench.MAX_K else f"{label} (K <= {max_k})"


def _plot(result: dict[str, Any], name: str, peers: list[str], sets: list[str],
          concurrency: list[int]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4), squeeze=False)
    for axis, prompt_set in zip(axes[0], sets):
        for shift, peer in enumerate(peers):
            keys = [f"ratio_vs_{peer}_{prompt_set}_c{c}" for c in concurrency]
            xs = [i + 0.06 * (shift - len(peers) / 2) for i in range(len(concurrency))]
            mid = [result.get(k, float("nan")) for k in keys]
            low = [m - result.get(k + "_paired_min", m) for k, m in zip(keys, mid)]
            high = [result.get(k + "_paired_max", m) - m for k, m in zip(keys, mid)]
            axis.errorbar(xs, mid, yerr=[low, high], marker="o", capsize=3, label=f"vs {peer}")
        axis.set_xticks(range(len(concurrency)), [str(c) for c in concurrency])
        axis.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        axis.set(xlabel="concurrency", ylabel=f"{_label(result)} tok/s / peer tok/s",
                 title=prompt_set)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    png = f"{name}.png"
    fig.savefig(bench.RESULTS / png, dpi=110)
    plt.close(fig)
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidate", default="adaptive",
                        help="the plugin configuration measured against every peer (as in "
                             "spec_adaptive.py --configs: adaptive[:KEY=VALUE...], plugin-kN)")
    parser.add_argument("--candidate-max-k", type=int, default=bench.MAX_K,
                        choices=range(1, bench.MAX_K + 1), metavar=f"1..{bench.MAX_K}",
                        help="num_speculative_tokens of the candidate engine: the most drafts "
                             "its proposer makes (plugin-k4 with 4 configures what stock k4 "
                             "does)")
    parser.add_argument("--peers", nargs="+", default=list(PEERS),
                        help="stock vLLM configurations: none, kN, table (or plugin-kN[:KEY="
                             "VALUE], a diagnostic); one named twice is started twice and its "
                             "pairs pool, averaging out each engine's own speed")
    parser.add_argument("--pairs", type=int, default=2,
                        help="back-to-back runs of every cell on the two engines, per peer")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(bench.CONCURRENCY),
                        choices=bench.CONCURRENCY)
    parser.add_argument("--sets", nargs="+", default=list(bench.PROMPT_SETS),
                        choices=bench.PROMPT_SETS)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--table", type=json.loads, default=bench.DEFAULT_TABLE,
                        help="num_speculative_tokens_per_batch_size of the table peer (JSON)")
    parser.add_argument("--dtype", default="float32", choices=("auto", "bfloat16", "float32"),
                        help="vLLM --dtype of both engines (float32: the same greedy texts)")
    parser.add_argument("--side-by-side", action="store_true",
                        help="run each cell on both engines at once, each engine's whole "
                             "process tree on a core of its own (swapped every pair), instead "
                             "of one engine after the other on both cores")
    parser.add_argument("--quick", action="store_true", help="fewer requests (smoke test)")
    parser.add_argument("--out", default=NAME)
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the ratios and the page from NAME_rows.json")
    args = parser.parse_args()
    rows_file = bench.rows_path(args.out)
    if args.report_only:
        result = json.loads((bench.RESULTS / f"{args.out}.json").read_text())
        result.update(summarize(json.loads(rows_file.read_text())))
    else:
        args.pin = False
        args.requests = bench.requests_per_cell(args.quick)
        started = time.perf_counter()
        rows = run(args)
        setup = (", one candidate and one peer engine up, side by side on a core each "
                 "(swapped every pair)" if args.side_by_side
                 else ", one candidate and one peer engine up")
        result = {**bench.run_header(args, cpu_model(), setup),
                  "side_by_side": int(args.side_by_side),
                  "candidate": args.candidate, "candidate_max_k": args.candidate_max_k,
                  "pairs": args.pairs,
                  "peers": json.dumps(list(dict.fromkeys(peer.split(":")[0]
                                                         for peer in args.peers))),
                  "max_tokens": args.max_tokens, "table": json.dumps(args.table),
                  "requests_per_cell": json.dumps(args.requests), **summarize(rows),
                  "wall_minutes": (time.perf_counter() - started) / 60}
        bench.RESULTS.mkdir(exist_ok=True)
        rows_file.write_text(json.dumps([{k: v for k, v in row.items() if k != "texts"}
                                         for row in rows], indent=0))
    (bench.RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=1))
    write_report(result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k.startswith("ratio_vs_best")
                      or k.startswith("ratio_vs_table_c") or k == "ratio_vs_none_min"},
                     indent=1))


if __name__ == "__main__":
    main()
