"""KV-aware routing on two real vLLM CPU instances: prefix-hit ratio and TTFT per router.

Workload: the ``--groups`` largest prefix groups of the Mooncake FAST'25
synthetic trace (requests whose first ``hash_id`` is the same; in this trace
such requests share nearly their whole prompt), ``--per-group`` requests from
each, in trace order. Each
trace ``hash_id`` (a 512-token block in the trace) becomes a fixed chunk of
``--words-per-block`` pseudo-random common words (same id -> same text), so
requests that share leading hash ids share a text prefix; prompts are capped
at ``--max-blocks`` ids to fit ``--max-model-len``. Requests are streaming
``/v1/completions`` with a few output tokens, ``--concurrency`` in flight.

Measurements per run: prefix-hit ratio = sum over engines of
d vllm:prefix_cache_hits_total / d vllm:prefix_cache_queries_total (the
engines' own counters, in tokens); client-side TTFT (first streamed chunk).

Configurations (each run starts from empty engine caches and a fresh router):
xllm-router --policy kv_aware | round_robin | least_load, and PyPI vllm-router
--policy kv_aware fed the same KV event endpoints. Order rotates between
repetitions (A B C D, B C D A, ...).

    flock /tmp/xllm-vllm.lock python benchmarks/kv_aware_live.py --reps 3

``--url`` skips engines and routers and runs the workload once against any
OpenAI URL (``--metrics-url`` engine URLs for the hit ratio).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT.parent / "shared" / "data" / "mooncake" / "synthetic_trace.jsonl"
if not TRACE.exists():
    TRACE = Path("/work/shared/data/mooncake/synthetic_trace.jsonl")
RESULTS = ROOT / "benchmarks" / "results"
VLLM_ROUTER = Path(os.environ.get("VLLM_ROUTER_BIN",
                                  "/root/.cache/xllm-bench/vllm-router-venv/bin/vllm-router"))

WORDS = ("time person year way day thing man world life hand part child eye woman place work week "
         "case point government company number group problem fact be have do say get make go know "
         "take see come think look want give use find tell ask seem feel try leave call good new "
         "first last long great little own other old right big high different small large next "
         "early young important few public bad same able to of in for on with at by from up about "
         "into over after water house river stone light music paper table garden window market "
         "letter story morning evening winter summer city country road train ship bridge forest "
         "mountain island ocean cloud rain snow wind fire earth metal glass wood bread apple "
         "orange coffee tea sugar salt green blue red black white yellow brown quiet loud fast slow").split()


# --- workload -------------------------------------------------------------------------------

def block_text(hash_id: int, words: int) -> str:
    rng = random.Random(hash_id * 7919 + 17)
    return " ".join(rng.choice(WORDS) for _ in range(words)) + ".\n"


def build_workload(trace: Path, groups: int, per_group: int, max_blocks: int,
                   words_per_block: int) -> tuple[list[str], dict[str, Any]]:
    """The ``groups`` largest prefix groups (requests whose first trace block is shared),
    ``per_group`` requests each, in trace order."""
    rows = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
    members: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        members.setdefault(row["hash_ids"][0], []).append(i)
    biggest = sorted(members.values(), key=lambda idx: (-len(idx), idx[0]))[:groups]
    chosen = sorted(i for idx in biggest for i in idx[:per_group])
    prompts, distinct = [], set()
    for i in chosen:
        ids = rows[i]["hash_ids"][:max_blocks]
        distinct.update(ids)
        prompts.append("".join(block_text(h, words_per_block) for h in ids))
    info = {"requests": len(prompts), "prefix_groups": len(biggest),
            "distinct_trace_blocks": len(distinct),
            "trace_blocks_per_request_mean": round(statistics.mean(
                min(len(rows[i]["hash_ids"]), max_blocks) for i in chosen), 2)}
    return prompts, info


# --- measurement ----------------------------------------------------------------------------

def scrape_prefix_counters(url: str) -> tuple[float, float]:
    """(queries, hits) in tokens, from an engine's /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:  # noqa: S310 (loopback)
        text = r.read().decode()
    queries = hits = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:prefix_cache_queries_total"):
            queries += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:prefix_cache_hits_total"):
            hits += float(line.rsplit(" ", 1)[1])
    return queries, hits


@dataclass
class RunResult:
    ttft_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    hit_ratio: float = float("nan")
    wall_s: float = 0.0


async def one_request(session: aiohttp.ClientSession, url: str, model: str, prompt: str,
                      max_tokens: int, out: RunResult) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "ignore_eos": True}
    start = time.perf_counter()
    try:
        async with session.post(url + "/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=600)) as resp:
            if resp.status != 200:
                out.errors.append(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                return
            first = None
            async for line in resp.content:
                if first is None and line.startswith(b"data: {"):
                    first = time.perf_counter()
            if first is None:
                out.errors.append("no streamed chunk")
                return
            out.ttft_ms.append((first - start) * 1000)
    except Exception as exc:  # noqa: BLE001 (recorded, the run goes on)
        out.errors.append(f"{type(exc).__name__}: {exc}")


async def run_workload(url: str, model: str, prompts: Sequence[str], concurrency: int,
                       max_tokens: int) -> RunResult:
    out = RunResult()
    sem = asyncio.Semaphore(concurrency)
    began = time.perf_counter()

    async def guarded(p: str) -> None:
        async with sem:
            await one_request(session, url, model, p, max_tokens, out)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(guarded(p) for p in prompts))
    out.wall_s = time.perf_counter() - began
    return out


def measure(url: str, engine_urls: Sequence[str], model: str, prompts: Sequence[str],
            concurrency: int, max_tokens: int) -> RunResult:
    before = [scrape_prefix_counters(u) for u in engine_urls]
    result = asyncio.run(run_workload(url, model, prompts, concurrency, max_tokens))
    time.sleep(1.0)  # counters are updated at the end of an engine step
    after = [scrape_prefix_counters(u) for u in engine_urls]
    dq = sum(a[0] - b[0] for a, b in zip(after, before))
    dh = sum(a[1] - b[1] for a, b in zip(after, before))
    result.hit_ratio = dh / dq if dq else float("nan")
    return result


# --- processes ------------------------------------------------------------------------------

def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):  # noqa: S310
            return True
    except Exception:  # noqa: BLE001
        return False


def post(url: str, body: dict[str, Any] | None = None) -> None:
    req = urllib.request.Request(url, data=json.dumps(body or {}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60):  # noqa: S310
        pass


class Router:
    """One router process in front of the engines, started fresh per run."""

    def __init__(self, cmd: list[str], health_url: str, log_path: Path) -> None:
        self.cmd, self.health_url, self.log_path = cmd, health_url, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Router:
        log = open(self.log_path, "w")  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while not http_ok(self.health_url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"router failed: {shlex.join(self.cmd)}\n"
                                   f"{self.log_path.read_text()[-2000:]}")
            time.sleep(0.3)
        time.sleep(1.0)  # let KV event subscriptions connect
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def xllm_router_cmd(policy: str, port: int, engines: list[dict[str, Any]], model_dir: Path,
                    block_size: int) -> list[str]:
    exe = str(Path(sys.executable).with_name("xllm-router"))
    instances = ",".join(f"{e['url']};id=e{i};kv={e['kv']};replay={e['replay']};block_size={block_size}"
                         for i, e in enumerate(engines))
    return [exe, "--port", str(port), "--policy", policy, "--instances", instances,
            "--tokenizer", str(model_dir), "--block-size", str(block_size),
            "--scrape-interval-s", "0.25", "--log-level", "info"]


def vllm_router_cmd(port: int, engines: list[dict[str, Any]], model_name: str, block_size: int,
                    prometheus_port: int) -> list[str]:
    cmd = [str(VLLM_ROUTER), "--port", str(port), "--policy", "kv_aware",
           "--worker-urls", *[e["url"] for e in engines],
           "--kv-event-block-size", str(block_size), "--kv-event-model", model_name,
           "--prometheus-port", str(prometheus_port), "--log-level", "debug"]
    for e in engines:
        cmd += ["--kv-event-source", f"{e['url']}={e['kv']}",
                "--kv-event-replay-source", f"{e['url']}={e['replay']}"]
    return cmd


def reset_engines(engine_urls: Sequence[str], model: str) -> None:
    """Empty both prefix caches; a one-token request flushes the AllBlocksCleared event
    (vLLM publishes events at the end of an engine step) before a router starts."""
    for u in engine_urls:
        post(u + "/reset_prefix_cache")
        post(u + "/v1/completions", {"model": model, "prompt": "ok", "max_tokens": 1})
    time.sleep(0.5)


# --- main -----------------------------------------------------------------------------------

def summarise(runs: dict[str, list[RunResult]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        hits = [r.hit_ratio for r in rs]
        p50s = [statistics.median(r.ttft_ms) for r in rs if r.ttft_ms]
        means = [statistics.mean(r.ttft_ms) for r in rs if r.ttft_ms]
        out[f"prefix_hit_ratio_{name}"] = round(statistics.median(hits), 4)
        out[f"prefix_hit_ratio_{name}_min"] = round(min(hits), 4)
        out[f"prefix_hit_ratio_{name}_max"] = round(max(hits), 4)
        if p50s:
            out[f"ttft_p50_ms_{name}"] = round(statistics.median(p50s), 1)
            out[f"ttft_p50_ms_{name}_min"] = round(min(p50s), 1)
            out[f"ttft_p50_ms_{name}_max"] = round(max(p50s), 1)
            out[f"ttft_mean_ms_{name}"] = round(statistics.median(means), 1)
        out[f"wall_s_{name}"] = round(statistics.median(r.wall_s for r in rs), 2)
        out[f"errors_{name}"] = sum(len(r.errors) for r in rs)
        out[f"repetitions_{name}"] = len(rs)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--groups", type=int, default=10)
    ap.add_argument("--per-group", type=int, default=5)
    ap.add_argument("--max-blocks", type=int, default=12)
    ap.add_argument("--words-per-block", type=int, default=60)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--num-blocks", type=int, default=0,
                    help="KV blocks per engine (--num-gpu-blocks-override); 0: half the working set")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--configs", default="kv_aware,round_robin,least_load,vllm_router_kv_aware")
    ap.add_argument("--url", help="only run the workload against this OpenAI URL")
    ap.add_argument("--metrics-url", action="append", default=[])
    ap.add_argument("--out", default=str(RESULTS / "kv_aware_live.json"))
    args = ap.parse_args(argv)

    from xllm_plugin.models import model_path
    from router.kv import PromptTokenizer

    model_dir = model_path(args.model)
    prompts, info = build_workload(TRACE, args.groups, args.per_group, args.max_blocks,
                                   args.words_per_block)
    tok = PromptTokenizer.from_dir(model_dir)
    lengths = [len(tok.completion_ids(p)) for p in prompts]
    tokens_per_trace_block = statistics.mean(len(tok.completion_ids(block_text(h, args.words_per_block)))
                                              for h in range(20))
    working_blocks = int(info["distinct_trace_blocks"] * tokens_per_trace_block / args.block_size)
    info.update(prompt_tokens_mean=round(statistics.mean(lengths)), prompt_tokens_max=max(lengths),
                tokens_per_trace_block=round(tokens_per_trace_block, 1),
                working_set_kv_blocks=working_blocks)
    print("workload:", json.dumps(info), flush=True)

    if args.url:
        r = measure(args.url, args.metrics_url or [args.url], "served", prompts, args.concurrency,
                    args.max_tokens)
        print(json.dumps({"hit_ratio": r.hit_ratio, "ttft_p50_ms": statistics.median(r.ttft_ms),
                          "errors": r.errors[:3]}))
        return 0

    from xllm_plugin.launcher.engine import EngineProcess, EngineSpec

    num_blocks = args.num_blocks or max(working_blocks // 2, args.max_model_len // args.block_size + 8)
    engines = [{"url": f"http://127.0.0.1:{8160 + i}", "kv": f"tcp://127.0.0.1:{5660 + 2 * i}",
                "replay": f"tcp://127.0.0.1:{5661 + 2 * i}"} for i in range(2)]
    specs = []
    for i, e in enumerate(engines):
        kv_cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "topic": "kv",
                  "endpoint": e["kv"].replace("127.0.0.1", "*"),
                  "replay_endpoint": e["replay"].replace("127.0.0.1", "*")}
        specs.append(EngineSpec(
            model=model_dir, port=8160 + i, served_model_name="served", plugin=False,
            block_size=args.block_size, max_model_len=args.max_model_len, cpu_bind=str(i),
            # --enable-scale-out: vllm-router's kv_aware gets token ids from the engines'
            # /v1/completions/render; without it every decision falls back ("missing_tokens").
            extra_args=["--enable-prefix-caching", "--kv-events-config", json.dumps(kv_cfg),
                        "--num-gpu-blocks-override", str(num_blocks), "--max-num-seqs", "8",
                        "--enable-scale-out"],
            env={"VLLM_SERVER_DEV_MODE": "1"}))
    configs = args.configs.split(",")
    runs: dict[str, list[RunResult]] = {c: [] for c in configs}
    engine_urls = [e["url"] for e in engines]
    logs = Path("/tmp/xllm-kv-bench")
    logs.mkdir(exist_ok=True)
    peer_check: dict[str, Any] = {}
    procs = [EngineProcess(s, log_path=logs / f"engine{i}.log") for i, s in enumerate(specs)]
    try:
        for p in procs:
            p.start()
        # Warm-up: compile paths on both engines, then discard.
        asyncio.run(run_workload(engine_urls[0], "served", prompts[:2], 2, args.max_tokens))
        asyncio.run(run_workload(engine_urls[1], "served", prompts[:2], 2, args.max_tokens))
        for rep in range(args.reps):
            order = configs[rep % len(configs):] + configs[:rep % len(configs)]
            for name in order:
                reset_engines(engine_urls, "served")
                port = 8170
                log_path = logs / f"router-{name}-{rep}.log"
                if name == "vllm_router_kv_aware":
                    cmd = vllm_router_cmd(port, engines, "served", args.block_size, 8179)
                else:
                    cmd = xllm_router_cmd(name, port, engines, model_dir, args.block_size)
                with Router(cmd, f"http://127.0.0.1:{port}/health", log_path):
                    r = measure(f"http://127.0.0.1:{port}", engine_urls, "served", prompts,
                                args.concurrency, args.max_tokens)
                    if name == "vllm_router_kv_aware":
                        for k, v in peer_evidence(log_path, 8179).items():
                            peer_check[k] = peer_check.get(k, 0) + v if isinstance(v, float) else v
                runs[name].append(r)
                print(f"rep {rep} {name}: hit={r.hit_ratio:.3f} ttft_p50="
                      f"{statistics.median(r.ttft_ms) if r.ttft_ms else float('nan'):.0f}ms "
                      f"wall={r.wall_s:.1f}s errors={len(r.errors)} {r.errors[:1]}", flush=True)
    finally:
        for p in procs:
            p.stop()

    result: dict[str, Any] = summarise(runs)
    result.update({f"workload_{k}": v for k, v in info.items()})
    result.update(kv_blocks_per_engine=num_blocks, block_size=args.block_size,
                  concurrency=args.concurrency, max_tokens=args.max_tokens)
    result.update({f"peer_{k}": v for k, v in peer_check.items()})
    result["command"] = "flock /tmp/xllm-vllm.lock python " + shlex.join(
        ["benchmarks/kv_aware_live.py", *(argv if argv is not None else sys.argv[1:])])
    result["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["machine"] = f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(json.dumps(result, indent=1, sort_keys=True))
    return 0


def peer_evidence(log_path: Path, prometheus_port: int) -> dict[str, Any]:
    """Whether vllm-router's KV feature engaged: its own decision counters, by outcome
    (``missing_tokens`` means it could not tokenize and fell back to load only)."""
    evidence: dict[str, Any] = {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{prometheus_port}/metrics", timeout=5) as r:  # noqa: S310
            metrics = r.read().decode()
        Path(str(log_path) + ".metrics").write_text(metrics)
    except Exception as exc:  # noqa: BLE001
        return {"metrics_error": str(exc)[:100]}
    for line in metrics.splitlines():
        if line.startswith("vllm_router_prefix_routing_decisions_total{") and 'outcome="' in line:
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            evidence[f"decisions_{outcome}"] = evidence.get(f"decisions_{outcome}", 0) + float(line.rsplit(" ", 1)[1])
    return evidence


if __name__ == "__main__":
    raise SystemExit(main())
