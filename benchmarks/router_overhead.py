"""Router overhead: latency a router adds in front of real vLLM, and the most req/s it relays.

Two parts, one command:

1. **Added latency** (real engines). Two stock ``vllm serve`` instances of the tiny
   random Llama, pinned to core 1 (routers and client on core 0). Three paths to them, alternated request by request
   (direct, xllm-router, vllm-router; the order rotates every round): the client
   talks straight to the engines (alternating the two), or through ``xllm-router
   --policy round_robin``, or through PyPI ``vllm-router --policy round_robin``.
   Requests go one at a time, so no queueing hides in the numbers: non-streaming
   ``/v1/completions`` (e2e latency) and streaming (time to first chunk).
   Added latency = router percentile - direct percentile over the pooled requests,
   with the per-repetition [min, max]. The same against two FakeOpenAIBackends
   (``fake_latency``) gives the router's own cost without engine jitter.

2. **Max requests/s** (FakeOpenAIBackend). The engine would be the bottleneck
   long before the router, so two ``FakeOpenAIBackend`` processes
   (``router/bench/fake_backend.py``: no model, fixed 5 ms + 1 ms/token delay)
   stand behind each router in turn. A closed-loop async client (aiohttp) keeps
   C requests in flight for a few seconds per level, C rising; the router's max
   sustained rate is the best completed req/s over the levels with no errors.
   The router is pinned to core 0; the client and the fake backends share
   core 1 (``direct``, the client against the backends with no router, shows
   that harness's own ceiling). Routers alternate, order rotated per repetition.

    flock /tmp/xllm-vllm.lock python benchmarks/router_overhead.py

Writes ``benchmarks/results/router_overhead.{json,md}``. ``--part latency`` or
``--part throughput`` runs one part (the other's numbers are then absent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_aware_live import VLLM_ROUTER  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LOGS = Path("/tmp/xllm-router-overhead")
PROMPT = "Write one sentence about the sea and the wind over the harbour at dawn."


# --- processes --------------------------------------------------------------------------------

def managed(name: str, cmd: list[str], health_url: str, cpu: str | None = None,
            env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """A started process (router or fake backend) judged healthy by ``health_url``."""
    from xllm_plugin.launcher.engine import ManagedProcess

    if cpu is not None:
        cmd = ["taskset", "-c", cpu, *cmd]
    proc = ManagedProcess(name, cmd, {**os.environ, **(env or {})}, health_url,
                          LOGS / f"{name}.log")
    return proc.start(timeout_s=60)


def xllm_router_cmd(port: int, urls: Sequence[str]) -> list[str]:
    exe = str(Path(sys.executable).with_name("xllm-router"))
    return [exe, "--port", str(port), "--policy", "round_robin", "--instances", ",".join(urls),
            "--log-level", "warning"]


def xllm_router_uvloop_cmd(port: int, urls: Sequence[str]) -> list[str]:
    """xllm-router on uvloop's event loop (an experiment: is the loop the ceiling?)."""
    code = ("import asyncio, sys, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
            "from router.cli import main; sys.argv[0] = 'xllm-router'; main()")
    return [sys.executable, "-c", code, *xllm_router_cmd(port, urls)[1:]]


def vllm_router_cmd(port: int, urls: Sequence[str], prometheus_port: int) -> list[str]:
    return [str(VLLM_ROUTER), "--port", str(port), "--policy", "round_robin",
            "--worker-urls", *urls, "--prometheus-port", str(prometheus_port),
            "--log-level", "warning"]


def wait_routable(url: str, model: str, timeout_s: float = 60.0) -> None:
    """Block until one completion through ``url`` succeeds (instances scraped, workers healthy)."""
    async def once() -> bool:
        body = {"model": model, "prompt": "hi", "max_tokens": 1}
        try:
            async with aiohttp.ClientSession() as s, s.post(url + "/v1/completions", json=body) as r:
                await r.read()
                return r.status == 200
        except aiohttp.ClientError:
            return False

    deadline = time.monotonic() + timeout_s
    while not asyncio.run(once()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no successful completion through {url} in {timeout_s:.0f}s")
        time.sleep(0.5)


# --- part 1: added latency on real engines ----------------------------------------------------

async def timed_request(session: aiohttp.ClientSession, url: str, model: str, stream: bool,
                        max_tokens: int) -> float:
    """ms to the whole response (non-streaming) or to the first streamed chunk."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": stream}
    start = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status} {(await resp.text())[:200]}")
        if not stream:
            await resp.read()
            return (time.perf_counter() - start) * 1e3
        first = None
        async for line in resp.content:
            if first is None and line.startswith(b"data: {"):
                first = (time.perf_counter() - start) * 1e3
        if first is None:
            raise RuntimeError(f"{url}: no streamed chunk")
        return first


async def latency_rounds(paths: dict[str, list[str]], model: str, rounds: int,
                         max_tokens: int) -> dict[str, dict[str, list[float]]]:
    """``rounds`` rounds; in each, every path serves one non-streaming and one streaming
    request, paths in rotated order. Direct paths alternate over their URLs."""
    names = list(paths)
    out: dict[str, dict[str, list[float]]] = {n: {"e2e": [], "ttft": []} for n in names}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                urls = paths[name]
                url = urls[r % len(urls)]
                out[name]["e2e"].append(await timed_request(session, url, model, False, max_tokens))
                out[name]["ttft"].append(await timed_request(session, url, model, True, max_tokens))
    return out


def run_latency(args: argparse.Namespace) -> dict[str, Any]:
    from sim_live import pinned_engine

    from xllm_plugin.launcher.engine import EngineSpec, free_port
    from xllm_plugin.models import model_path

    # Engines on core 1 (whole process trees; requests go one at a time, so they never
    # compete), routers and the client on core 0: what the router costs, not how much
    # it disturbs an engine that shares its core.
    os.sched_setaffinity(0, {0})
    model = model_path(args.latency_model)
    specs = [EngineSpec(model=model, port=free_port(), served_model_name="served", plugin=False,
                        max_model_len=1024) for _ in range(2)]
    engines = [pinned_engine(s, 1) for s in specs]
    procs = []
    try:
        for e in engines:
            e.start()
        urls = [e.url for e in engines]
        xport, vport = free_port(), free_port()
        procs.append(managed("lat-xllm-router", xllm_router_cmd(xport, urls),
                             f"http://127.0.0.1:{xport}/health", cpu="0"))
        procs.append(managed("lat-vllm-router", vllm_router_cmd(vport, urls, free_port()),
                             f"http://127.0.0.1:{vport}/health", cpu="0"))
        paths = {"direct": urls, "xllm_router": [f"http://127.0.0.1:{xport}"],
                 "vllm_router": [f"http://127.0.0.1:{vport}"]}
        for url in paths["xllm_router"] + paths["vllm_router"]:
            wait_routable(url, "served")
        asyncio.run(latency_rounds(paths, "served", args.warmup_rounds, args.max_tokens))  # discard
        reps = []
        for rep in range(args.reps):
            data = asyncio.run(latency_rounds(paths, "served", args.rounds, args.max_tokens))
            reps.append(data)
            print(f"latency rep {rep}: " + ", ".join(
                f"{n} e2e p50 {np.percentile(d['e2e'], 50):.1f} ms" for n, d in data.items()),
                flush=True)
    finally:
        for p in procs:
            p.stop()
        for e in engines:
            e.stop()
    return summarise_latency(reps)


def summarise_latency(reps: list[dict[str, dict[str, list[float]]]], prefix: str = "") -> dict[str, Any]:
    """Added latency = router percentile - direct percentile, over all repetitions' requests
    pooled (a p99 of one repetition's requests is little more than its largest value);
    ``_min``/``_max`` are the same difference per repetition, for the spread."""
    out: dict[str, Any] = {}
    for metric, label in (("e2e", "latency"), ("ttft", "ttft")):
        for q in (50, 99):
            pooled = {name: [v for r in reps for v in r[name][metric]]
                      for name in ("direct", "xllm_router", "vllm_router")}
            for name, values in pooled.items():
                out[f"{label}{prefix}_p{q}_ms_{name}"] = round(float(np.percentile(values, q)), 2)
            for name, key in (("xllm_router", ""), ("vllm_router", "_vllm_router")):
                added = float(np.percentile(pooled[name], q) - np.percentile(pooled["direct"], q))
                per_rep = [float(np.percentile(r[name][metric], q) - np.percentile(r["direct"][metric], q))
                           for r in reps]
                out[f"added_{label}{prefix}_p{q}_ms{key}"] = round(added, 2)
                out[f"added_{label}{prefix}_p{q}_ms{key}_min"] = round(min(per_rep), 2)
                out[f"added_{label}{prefix}_p{q}_ms{key}_max"] = round(max(per_rep), 2)
    out[f"latency{prefix}_requests_per_path_per_rep"] = len(reps[0]["direct"]["e2e"]) if reps else 0
    out[f"latency{prefix}_reps"] = len(reps)
    return out


def run_fake_latency(args: argparse.Namespace) -> dict[str, Any]:
    """The same alternating latency measurement against two FakeOpenAIBackends (fixed
    delay, no engine jitter): the router's own added latency, tails included."""
    from xllm_plugin.launcher.engine import free_port

    os.sched_setaffinity(0, {0})  # client beside the routers; the fake backends on core 1
    procs = []
    try:
        urls = []
        for k in range(2):
            port = free_port()
            procs.append(managed(
                f"lat-fake-backend{k}",
                [sys.executable, "-m", "router.bench.fake_backend", "--port", str(port),
                 "--model", "served", "--first-token-ms", str(args.fake_first_token_ms),
                 "--itl-ms", str(args.fake_itl_ms)],
                f"http://127.0.0.1:{port}/health", cpu="1"))
            urls.append(f"http://127.0.0.1:{port}")
        xport, vport = free_port(), free_port()
        procs.append(managed("lat-fake-xllm-router", xllm_router_cmd(xport, urls),
                             f"http://127.0.0.1:{xport}/health", cpu="0"))
        procs.append(managed("lat-fake-vllm-router", vllm_router_cmd(vport, urls, free_port()),
                             f"http://127.0.0.1:{vport}/health", cpu="0"))
        paths = {"direct": urls, "xllm_router": [f"http://127.0.0.1:{xport}"],
                 "vllm_router": [f"http://127.0.0.1:{vport}"]}
        for url in paths["xllm_router"] + paths["vllm_router"]:
            wait_routable(url, "served")
        asyncio.run(latency_rounds(paths, "served", args.warmup_rounds, args.max_tokens))
        reps = [asyncio.run(latency_rounds(paths, "served", args.rounds, args.max_tokens))
                for _ in range(args.reps)]
    finally:
        for p in procs:
            p.stop()
    return summarise_latency(reps, prefix="_fake")


# --- part 2: max req/s against fake backends ---------------------------------------------------

@dataclass
class Level:
    concurrency: int
    completed: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    window_s: float = 0.0
    first_error: str = ""

    @property
    def rps(self) -> float:
        return self.completed / self.window_s if self.window_s else 0.0


async def closed_loop(urls: Sequence[str], model: str, concurrency: int, stream: bool,
                      warmup_s: float, window_s: float, max_tokens: int) -> Level:
    """``concurrency`` workers, each sending its next request when the last one finished;
    only requests that finish inside the measured window count."""
    level = Level(concurrency)
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                       "stream": stream}).encode()
    headers = {"Content-Type": "application/json"}
    t0 = time.perf_counter()
    start, end = t0 + warmup_s, t0 + warmup_s + window_s
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def worker(k: int) -> None:
            i = k
            while True:
                began = time.perf_counter()
                if began >= end:
                    return
                url = urls[i % len(urls)] + "/v1/completions"
                i += 1
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        if resp.status != 200:
                            raise RuntimeError(f"HTTP {resp.status}")
                        if stream:
                            async for _ in resp.content:
                                pass
                        else:
                            await resp.read()
                    done = time.perf_counter()
                    if start <= done < end:
                        level.completed += 1
                        level.latencies_ms.append((done - began) * 1e3)
                except Exception as exc:  # noqa: BLE001 (counted, the loop goes on)
                    if start <= time.perf_counter() < end:
                        level.errors += 1
                        level.first_error = level.first_error or f"{type(exc).__name__}: {exc}"[:200]

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    level.window_s = window_s
    return level


def sweep_levels(urls: Sequence[str], levels: Sequence[int], stream: bool,
                 args: argparse.Namespace) -> list[Level]:
    out = []
    for c in levels:
        lv = asyncio.run(closed_loop(urls, "fake", c, stream, args.warmup_s, args.window_s,
                                     args.max_tokens))
        out.append(lv)
    return out


def best(levels: Sequence[Level]) -> Level | None:
    """The level with the most completed req/s among those without errors."""
    clean = [lv for lv in levels if lv.errors == 0 and lv.completed]
    return max(clean, key=lambda lv: lv.rps) if clean else None


def run_throughput(args: argparse.Namespace) -> dict[str, Any]:
    from xllm_plugin.launcher.engine import free_port

    try:
        import uvloop

        uvloop.install()  # the client's own overhead as low as Python allows
    except ImportError:
        pass
    client_cpu, router_cpu = "1", "0"
    os.sched_setaffinity(0, {int(client_cpu)})
    backends, routers_running = [], []
    levels = [int(c) for c in args.levels.split(",")]
    results: dict[str, dict[str, list[Level]]] = {}
    try:
        for k in range(2):
            port = free_port()
            backends.append((managed(
                f"fake-backend{k}",
                [sys.executable, "-m", "router.bench.fake_backend", "--port", str(port),
                 "--first-token-ms", str(args.fake_first_token_ms), "--itl-ms", str(args.fake_itl_ms)],
                f"http://127.0.0.1:{port}/health", cpu=client_cpu), f"http://127.0.0.1:{port}"))
        urls = [u for _, u in backends]
        targets = args.targets.split(",")
        for rep in range(args.reps):
            order = targets[rep % len(targets):] + targets[:rep % len(targets)]
            for name in order:
                proc = None
                port = free_port()
                if name == "direct":
                    front = urls
                else:
                    cmd = {"xllm_router": lambda: xllm_router_cmd(port, urls),
                           "xllm_router_uvloop": lambda: xllm_router_uvloop_cmd(port, urls),
                           "vllm_router": lambda: vllm_router_cmd(port, urls, free_port())}[name]()
                    proc = managed(f"tp-{name}-{rep}", cmd, f"http://127.0.0.1:{port}/health",
                                   cpu=router_cpu)
                    routers_running.append(proc)
                    front = [f"http://127.0.0.1:{port}"]
                    wait_routable(front[0], "fake")
                try:
                    for stream in (False, True):
                        lv = sweep_levels(front, levels, stream, args)
                        key = f"{name}{'_stream' if stream else ''}"
                        results.setdefault(key, {}).setdefault("reps", []).append(lv)  # type: ignore[arg-type]
                        print(f"throughput rep {rep} {key}: " + ", ".join(
                            f"c={x.concurrency}: {x.rps:.0f}/s"
                            f"{f' ({x.errors} err: {x.first_error})' if x.errors else ''}"
                            for x in lv), flush=True)
                finally:
                    if proc is not None:
                        proc.stop()
                        routers_running.remove(proc)
    finally:
        for proc in routers_running:
            proc.stop()
        for proc, _ in backends:
            proc.stop()
    return summarise_throughput(results, levels)


def summarise_throughput(results: dict[str, dict[str, list[list[Level]]]],
                         levels: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, data in results.items():
        bests = [best(rep) for rep in data["reps"]]
        rps = [b.rps if b else 0.0 for b in bests]
        name = key.replace("_stream", "")
        suffix = "_stream" if key.endswith("_stream") else ""
        out[f"max_rps_{name}{suffix}"] = round(statistics.median(rps), 1)
        out[f"max_rps_{name}{suffix}_min"] = round(min(rps), 1)
        out[f"max_rps_{name}{suffix}_max"] = round(max(rps), 1)
        chosen = [b for b in bests if b]
        if chosen:
            out[f"max_rps_{name}{suffix}_at_concurrency"] = int(statistics.median(
                b.concurrency for b in chosen))
            out[f"max_rps_{name}{suffix}_p99_ms"] = round(statistics.median(
                float(np.percentile(b.latencies_ms, 99)) for b in chosen), 1)
        for i, c in enumerate(levels):
            out[f"rps_{name}{suffix}_c{c}"] = round(statistics.median(rep[i].rps for rep in data["reps"]), 1)
            out[f"errors_{name}{suffix}_c{c}"] = sum(rep[i].errors for rep in data["reps"])
    out["throughput_reps"] = len(next(iter(results.values()))["reps"]) if results else 0
    return out


# --- part 3: cost of the migration token ledger (fake backends) -----------------------------------

def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def fixed_run(url: str, requests: int, concurrency: int, max_tokens: int) -> tuple[float, int]:
    """``requests`` streamed completions with ``concurrency`` in flight: (wall s, errors)."""
    body = json.dumps({"model": "fake", "prompt": PROMPT, "max_tokens": max_tokens,
                       "stream": True}).encode()
    headers = {"Content-Type": "application/json"}
    left, errors = requests, 0
    connector = aiohttp.TCPConnector(limit=0)
    began = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def worker() -> None:
            nonlocal left, errors
            while left > 0:
                left -= 1
                try:
                    async with session.post(url + "/v1/completions", data=body,
                                            headers=headers) as resp:
                        async for _ in resp.content:
                            pass
                        errors += resp.status != 200
                except Exception:  # noqa: BLE001 (counted)
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - began, errors


def run_ledger(args: argparse.Namespace) -> dict[str, Any]:
    """xllm-router with migration on (default ``--migration-limit``: every streamed event is
    decoded, its token ids recorded and re-encoded) against ``--migration-limit 0`` (bytes
    relayed as they come), streaming ``--ledger-tokens`` tokens per request from two fake
    backends. The router's own CPU seconds per request (from /proc) give the ledger's cost
    whatever the bottleneck of the harness; req/s is reported beside it."""
    from xllm_plugin.launcher.engine import free_port

    os.sched_setaffinity(0, {1})  # client with the fake backends on core 1, router on core 0
    backends, urls = [], []
    samples: dict[str, dict[str, list[float]]] = {}
    try:
        for k in range(2):
            port = free_port()
            backends.append(managed(
                f"ledger-fake-backend{k}",
                [sys.executable, "-m", "router.bench.fake_backend", "--port", str(port),
                 "--first-token-ms", str(args.fake_first_token_ms),
                 "--itl-ms", str(args.fake_itl_ms)],
                f"http://127.0.0.1:{port}/health", cpu="1"))
            urls.append(f"http://127.0.0.1:{port}")
        modes = {"migration_on": [], "migration_off": ["--migration-limit", "0"]}
        for rep in range(args.reps):
            for mode in (list(modes) if rep % 2 == 0 else list(modes)[::-1]):
                port = free_port()
                proc = managed(f"ledger-{mode}-{rep}", xllm_router_cmd(port, urls) + modes[mode],
                               f"http://127.0.0.1:{port}/health", cpu="0")
                try:
                    front = f"http://127.0.0.1:{port}"
                    wait_routable(front, "fake")
                    asyncio.run(fixed_run(front, 200, args.ledger_concurrency, args.ledger_tokens))
                    assert proc.process is not None
                    cpu0 = process_cpu_s(proc.process.pid)
                    wall, errors = asyncio.run(fixed_run(front, args.ledger_requests,
                                                         args.ledger_concurrency,
                                                         args.ledger_tokens))
                    cpu = process_cpu_s(proc.process.pid) - cpu0
                finally:
                    proc.stop()
                got = samples.setdefault(mode, {"cpu_us": [], "rps": [], "errors": []})
                got["cpu_us"].append(cpu / args.ledger_requests * 1e6)
                got["rps"].append(args.ledger_requests / wall)
                got["errors"].append(errors)
                print(f"ledger rep {rep} {mode}: {got['rps'][-1]:.0f} req/s, router "
                      f"{got['cpu_us'][-1]:.0f} us CPU per request, {errors} errors", flush=True)
    finally:
        for proc in backends:
            proc.stop()
    import router

    out: dict[str, Any] = {"ledger_router_code": str(Path(router.__file__).parent),
                           "ledger_tokens": args.ledger_tokens,
                           "ledger_concurrency": args.ledger_concurrency,
                           "ledger_requests_per_rep": args.ledger_requests,
                           "ledger_reps": args.reps}
    for mode, got in samples.items():
        for key, digits in (("cpu_us", 0), ("rps", 1)):
            out[f"ledger_router_{key}_per_request_{mode}" if key == "cpu_us"
                else f"ledger_rps_stream_{mode}"] = round(statistics.median(got[key]), digits)
        out[f"ledger_router_cpu_us_per_request_{mode}_min"] = round(min(got["cpu_us"]))
        out[f"ledger_router_cpu_us_per_request_{mode}_max"] = round(max(got["cpu_us"]))
        out[f"ledger_errors_{mode}"] = sum(got["errors"])
    # Streamed events per request: one per token, the usage chunk, [DONE].
    extra = (out["ledger_router_cpu_us_per_request_migration_on"]
             - out["ledger_router_cpu_us_per_request_migration_off"])
    out["ledger_cpu_us_per_request"] = round(extra, 1)
    out["ledger_cpu_us_per_chunk"] = round(extra / (args.ledger_tokens + 2), 2)
    return out


# --- main ---------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default="all",
                    help="all, or a comma list of latency, fake_latency, throughput, ledger")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=300,
                    help="latency: requests per path (of each kind) per repetition")
    ap.add_argument("--warmup-rounds", type=int, default=10)
    ap.add_argument("--latency-model", default="tiny")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--levels", default="16,64,256", help="throughput: client concurrency levels")
    ap.add_argument("--targets", default="direct,xllm_router,vllm_router",
                    help="throughput: what the client talks to (also xllm_router_uvloop)")
    ap.add_argument("--warmup-s", type=float, default=1.0)
    ap.add_argument("--window-s", type=float, default=4.0)
    ap.add_argument("--fake-first-token-ms", type=float, default=5.0)
    ap.add_argument("--fake-itl-ms", type=float, default=1.0)
    ap.add_argument("--ledger-tokens", type=int, default=64,
                    help="ledger: streamed tokens per request")
    ap.add_argument("--ledger-concurrency", type=int, default=32)
    ap.add_argument("--ledger-requests", type=int, default=2000,
                    help="ledger: measured requests per router per repetition")
    ap.add_argument("--out", default=str(RESULTS / "router_overhead.json"))
    args = ap.parse_args(argv)
    parts = ({"latency", "fake_latency", "throughput", "ledger"} if args.part == "all"
             else set(args.part.split(",")))
    if parts - {"ledger"} and not VLLM_ROUTER.exists():
        raise SystemExit(f"vllm-router not found at {VLLM_ROUTER}: python3 -m venv "
                         "~/.cache/xllm-bench/vllm-router-venv && ~/.cache/xllm-bench/vllm-router-venv"
                         "/bin/pip install vllm-router (or set VLLM_ROUTER_BIN)")
    LOGS.mkdir(exist_ok=True)
    result: dict[str, Any] = {}
    if "latency" in parts:
        result.update(run_latency(args))
    if "fake_latency" in parts:
        result.update(run_fake_latency(args))
    if "throughput" in parts:
        result.update(run_throughput(args))
    if "ledger" in parts:
        result.update(run_ledger(args))
    result.update(max_tokens=args.max_tokens, fake_first_token_ms=args.fake_first_token_ms,
                  fake_itl_ms=args.fake_itl_ms, throughput_window_s=args.window_s)
    if VLLM_ROUTER.exists():
        result["vllm_router_version"] = vllm_router_version()
    result["backend_note"] = ("max_rps_*: FakeOpenAIBackend (router/bench/fake_backend.py, no model) "
                              "behind the router so the engine is not the bottleneck; router on core 0, "
                              "load generator and fake backends share core 1")
    result["command"] = "flock /tmp/xllm-vllm.lock python " + shlex.join(
        ["benchmarks/router_overhead.py", *(argv if argv is not None else sys.argv[1:])])
    result["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["machine"] = f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}"
    out = Path(args.out)
    if out.exists() and args.part != "all":  # keep the other parts' numbers
        previous = json.loads(out.read_text())
        result = {**previous, **result,
                  "command": f"{previous.get('command', '')}; then {result['command']}",
                  "date": f"{previous.get('date', '')[:10]}, parts rerun {result['date']}"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    out.with_suffix(".md").write_text(markdown(result, [int(c) for c in args.levels.split(",")]))
    print(json.dumps(result, indent=1, sort_keys=True))
    return 0


def markdown(r: dict[str, Any], levels: Sequence[int]) -> str:
    """The result page (written next to the JSON; both parts must be in ``r``)."""
    def ms(key: str) -> str:
        return (f"{r[key]:+.2f} [{r[key + '_min']:+.2f}, {r[key + '_max']:+.2f}]"
                if key in r else "-")

    def rps(key: str) -> str:
        return f"{r[key]:.0f} [{r[key + '_min']:.0f}, {r[key + '_max']:.0f}]" if key in r else "-"

    lat_rows = []
    for backend, prefix in (("vLLM", ""), ("fake", "_fake")):
        for label, metric in (("non-streaming e2e", "latency"), ("streaming, first chunk", "ttft")):
            for q in (50, 99):
                direct = r.get(f"{metric}{prefix}_p{q}_ms_direct")
                if direct is None:
                    continue
                lat_rows.append(
                    f"| {backend} | {label} p{q} | {direct:.1f} | "
                    f"{ms(f'added_{metric}{prefix}_p{q}_ms')} | "
                    f"{ms(f'added_{metric}{prefix}_p{q}_ms_vllm_router')} |")
    targets = [t for t in ("direct", "xllm_router", "xllm_router_uvloop", "vllm_router")
               if f"max_rps_{t}" in r]
    tp_rows = []
    for t in targets:
        cells = " | ".join(f"{r.get(f'rps_{t}_c{c}', 0):.0f}" for c in levels)
        cells_s = " | ".join(f"{r.get(f'rps_{t}_stream_c{c}', 0):.0f}" for c in levels)
        tp_rows.append(f"| {t} | {rps(f'max_rps_{t}')} | {rps(f'max_rps_{t}_stream')} | {cells} | {cells_s} |")
    head = " | ".join(f"c={c}" for c in levels)
    head_s = " | ".join(f"c={c} stream" for c in levels)
    return f"""# Router overhead: added latency and max requests/s

`benchmarks/router_overhead.py`. Results: `router_overhead.json` ({r.get('latency_reps', '?')} repetitions of the
latency parts, {r.get('throughput_reps', '?')} of the throughput part; `_min`/`_max` for the spread).
xllm-router vs PyPI `vllm-router {r.get('vllm_router_version', '?')}` (Rust), both with `--policy round_robin`
(the cheapest policy, so the number is the proxy's own cost).

## 1. Added latency, real vLLM behind the router

Two stock `vllm serve` instances of the tiny random Llama (SmolLM2 tokenizer), both pinned
(whole process trees) to core 1; the routers and the client on core 0, so that the router's cost
is measured, not its interference with an engine on a shared core.
The client alternates, request by request and in a rotating order, between going **direct**
(alternating the two engines), through **xllm-router** and through **vllm-router**, one request at a
time (no queueing): {r.get('latency_requests_per_path_per_rep', '?')} non-streaming and as many streaming
`/v1/completions` per path per repetition, {r.get('max_tokens', 4)} output tokens, {r.get('latency_reps', '?')} repetitions.
Added latency = router percentile - direct percentile over all repetitions' requests pooled;
[min, max] of the same difference per repetition (the pooled value can fall outside it when
the repetitions' baselines differ). The same measurement against two `FakeOpenAIBackend`s (rows "fake"; routers
on core 0, backends on core 1) shows the router's own cost without the engines' jitter.

| backend | request | direct (ms) | added by xllm-router (ms) | added by vllm-router (ms) |
| --- | --- | --- | --- | --- |
{chr(10).join(lat_rows)}

## 2. Max requests/s, FakeOpenAIBackend behind the router

**The backend is fake** (`router/bench/fake_backend.py`, `FakeOpenAIBackend`: no model, answers
after a fixed {r.get('fake_first_token_ms', 5):g} ms + {r.get('fake_itl_ms', 1):g} ms per token, {r.get('max_tokens', 4)}
tokens), so that the engine is not the bottleneck. Two fake backends; a closed-loop async client
(aiohttp on uvloop, one process) keeps c requests in flight for {r.get('throughput_window_s', 5):g} s per
level after 1 s of warm-up; max sustained = best completed req/s over the levels with no errors.
**The router is pinned to core 0; the load generator and both fake backends share core 1**, so
`direct` (client against the backends, no router) is the harness's own ceiling: a router that
reaches it is limited by the harness, not by itself. Targets alternate, order rotated per
repetition.

| target | max req/s (non-streaming) | max req/s (streaming) | {head} | {head_s} |
| --- | --- | --- | {' | '.join('---' for _ in levels)} | {' | '.join('---' for _ in levels)} |
{chr(10).join(tp_rows)}

{ledger_section(r)}## Reading it

{reading(r)}

## Rerun

```
flock /tmp/xllm-vllm.lock python benchmarks/router_overhead.py   # about 12 minutes
# vllm-router in its own venv (or point VLLM_ROUTER_BIN at a binary):
python3 -m venv ~/.cache/xllm-bench/vllm-router-venv && ~/.cache/xllm-bench/vllm-router-venv/bin/pip install vllm-router
# some parts only: --part latency,fake_latency,throughput,ledger; --targets adds xllm_router_uvloop
```

This file's numbers: `{r['command']}` ({r['date']}). Logs: `/tmp/xllm-router-overhead/`.
"""


def ledger_section(r: dict[str, Any]) -> str:
    """Part 3's table (empty when the ledger part has not run)."""
    if "ledger_cpu_us_per_chunk" not in r:
        return ""
    rows = "\n".join(
        f"| {label} | {r[f'ledger_router_cpu_us_per_request_{mode}']:.0f} "
        f"[{r[f'ledger_router_cpu_us_per_request_{mode}_min']:.0f}, "
        f"{r[f'ledger_router_cpu_us_per_request_{mode}_max']:.0f}] "
        f"| {r[f'ledger_rps_stream_{mode}']:.0f} | {r[f'ledger_errors_{mode}']} |"
        for mode, label in (("migration_on", "on (default `--migration-limit 3`)"),
                            ("migration_off", "off (`--migration-limit 0`)")))
    return f"""## 3. Cost of the migration token ledger (fake backends)

With migration on, the router decodes every streamed event, records its token ids and
re-encodes it (router/server/migration.py); with `--migration-limit 0` it relays the bytes.
{r['ledger_requests_per_rep']} streamed requests of {r['ledger_tokens']} tokens per router and
repetition ({r['ledger_reps']} repetitions, order alternated), {r['ledger_concurrency']} in flight,
two fake backends (which send no token ids, so the events are a little smaller than vLLM's).
Router on core 0, client and backends on core 1; the router's own CPU time comes from
`/proc/PID/stat` over the measured requests, so it does not depend on which core is the
bottleneck.

| migration | router CPU per request, us (median [min, max]) | req/s | errors |
| --- | --- | --- | --- |
{rows}

Ledger cost: **{r['ledger_cpu_us_per_request']:.0f} us of router CPU per request, {r['ledger_cpu_us_per_chunk']:.2f} us per
streamed event** ({r['ledger_tokens']} tokens + usage chunk + `[DONE]`). The req/s of the two
are alike because the client's core, not the router's, limits this harness. Router code:
`{r.get('ledger_router_code', '?')}`.

"""


def reading(r: dict[str, Any]) -> str:
    """Plain-language conclusions drawn from the numbers in ``r`` (no fixed claims)."""
    lines = []
    ceiling = r.get("max_rps_direct")
    for name, label in (("xllm_router", "xllm-router"), ("vllm_router", "vllm-router")):
        got = r.get(f"max_rps_{name}")
        if got and ceiling:
            share = got / ceiling
            verdict = ("at the harness ceiling: its own limit is higher than this harness can "
                       "measure" if share >= 0.95 else "below the harness ceiling: the router "
                       "itself is the limit")
            lines.append(f"- {label}: {got:.0f} req/s non-streaming = {share:.0%} of `direct` "
                         f"({ceiling:.0f}), {verdict}; streaming {r.get(f'max_rps_{name}_stream', 0):.0f} "
                         f"req/s vs {r.get('max_rps_direct_stream', 0):.0f} direct.")
    if "max_rps_xllm_router_uvloop" in r:
        lines.append(f"- xllm-router on uvloop (experiment, not the shipped default): "
                     f"{r['max_rps_xllm_router_uvloop']:.0f} req/s non-streaming, "
                     f"{r['max_rps_xllm_router_uvloop_stream']:.0f} streaming: no gain over "
                     f"asyncio's loop within the spread, so the router keeps the standard loop."
                     if r["max_rps_xllm_router_uvloop"] <= r.get("max_rps_xllm_router_max", 0)
                     else f"- xllm-router on uvloop (experiment): "
                          f"{r['max_rps_xllm_router_uvloop']:.0f} req/s non-streaming.")
    if "added_latency_fake_p50_ms" in r:
        lines.append(f"- The router's own cost per request (fake backends): xllm-router adds "
                     f"{r['added_latency_fake_p50_ms']:.2f} ms at p50 and "
                     f"{r['added_latency_fake_p99_ms']:.2f} ms at p99; vllm-router "
                     f"{r['added_latency_fake_p50_ms_vllm_router']:.2f} / "
                     f"{r['added_latency_fake_p99_ms_vllm_router']:.2f} ms. In front of real engines "
                     f"the p99 difference is within the engines' own tail jitter (see the [min, max] "
                     f"per repetition).")
    lines.append("- On a GPU: part 2 does not involve an engine, so it carries over as a statement "
                 "about the routers on one CPU core (xllm-router is one asyncio process and uses one "
                 "core whatever the host has; vllm-router is multi-threaded and would use more). The added milliseconds of part 1 stay the same in absolute "
                 "terms; against GPU TTFTs of tens to hundreds of ms they are a few percent at most.")
    lines.append("- Caveat: the load generator shares core 1 with the fake backends, so the "
                 "`direct` row is this harness's ceiling, not the backends'.")
    return "\n".join(lines)


def vllm_router_version() -> str:
    meta = list(VLLM_ROUTER.parent.parent.glob("lib/python*/site-packages/vllm_router-*.dist-info"))
    return meta[0].name.split("-")[1].removesuffix(".dist") if meta else "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
