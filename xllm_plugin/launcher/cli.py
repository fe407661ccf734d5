"""``xllm-local``: run the project's main job on this machine with one command.

Builds the model offline if needed, starts the engines with the plugin, sends
a short demo workload, prints a latency table, and stops everything (or keeps
serving with ``--serve``). Growing the cluster is a flag: ``--instances``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

from router.policies import POLICY_FACTORIES
from xllm_plugin.cpu_features import cpu_model, has_native_bf16, vllm_is_cpu_build
from xllm_plugin.launcher.cluster import LocalCluster, RouterSpec
from xllm_plugin.launcher.engine import EngineSpec, EngineStartError
from xllm_plugin.models import MODEL_NAMES, build_model


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="xllm-local",
        description="Start vLLM instances with the xllm plugin on this machine, run a demo "
                    "workload through them, and print TTFT/TPOT/throughput.")
    parser.add_argument("--model", default="smollm2",
                        help=f"one of {', '.join(MODEL_NAMES)} (built offline on first use) or a "
                             "path to a Hugging Face model directory (default: smollm2)")
    parser.add_argument("--instances", type=int, default=2,
                        help="number of vllm serve instances (default: 2)")
    parser.add_argument("--base-port", type=int, default=8001,
                        help="first instance port; the others follow (default: 8001)")
    parser.add_argument("--no-router", action="store_true",
                        help="no xllm-router: the demo talks to the first instance directly")
    parser.add_argument("--router-port", type=int, default=8000,
                        help="where xllm-router listens (default: 8000)")
    parser.add_argument("--policy", default="kv_aware", choices=sorted(POLICY_FACTORIES),
                        help="the router's routing policy (default: kv_aware)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights and activations; auto: the model's own dtype, except on "
                             "vLLM's CPU build where the CPU has no native bf16 (no AVX-512 BF16 "
                             "or AMX), which runs float32: bf16 decoded about half as fast there "
                             "(default: auto)")
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="KV cache per instance, GiB")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--stock", action="store_true",
                        help="run stock vLLM (no plugin loaded) for comparison")
    parser.add_argument("--demo-requests", type=int, default=16,
                        help="requests in the demo workload; 0 skips the demo")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--serve", action="store_true",
                        help="keep serving after the demo until Ctrl-C")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--kv-store", action="store_true",
                        help="global multi-tier KV cache: start mooncake_master and attach every "
                             "engine to it with the plugin's KV store connector (DRAM tier, SSD "
                             "tier with --kv-store-ssd-dir, Mooncake Store across instances)")
    parser.add_argument("--kv-store-dram-mb", type=int, default=1024,
                        help="DRAM tier per instance, MiB (default: 1024)")
    parser.add_argument("--kv-store-ssd-dir", default=None,
                        help="directory of the SSD tier's block files (default: no SSD tier)")
    parser.add_argument("--kv-store-ssd-mb", type=int, default=4096,
                        help="SSD tier per instance, MiB, with --kv-store-ssd-dir (default: 4096)")
    parser.add_argument("--kv-store-segment-mb", type=int, default=1024,
                        help="memory each instance lends to the global store, MiB (default: 1024)")
    args = parser.parse_args(argv)
    if args.instances < 1:
        parser.error("--instances must be at least 1")
    if args.kv_store and args.stock:
        parser.error("--kv-store needs the plugin (its settings live in --additional-config xllm)")
    return args


DTYPES = ("auto", "float32", "bfloat16", "float16")


def choose_dtype(requested: str, *, cpu_build: bool, native_bf16: bool) -> tuple[str, str]:
    """The ``--dtype`` to give ``vllm serve`` and why (for the log)."""
    if requested != "auto":
        return requested, "as asked"
    if cpu_build and not native_bf16:
        return "float32", "auto: no native bf16 here, i.e. neither AVX-512 BF16 nor AMX"
    return "auto", "auto: the model's own dtype"


def _model_dir(name_or_path: str) -> Path:
    if name_or_path in MODEL_NAMES:
        print(f"building/locating model '{name_or_path}' ...", flush=True)
        return build_model(name_or_path)
    path = Path(name_or_path)
    if not (path / "config.json").exists():
        raise SystemExit(f"xllm-local: {path} is neither a known model ({', '.join(MODEL_NAMES)}) "
                         "nor a model directory with config.json")
    return path


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    began = time.perf_counter()
    model_dir = _model_dir(args.model)
    served_name = args.model if args.model in MODEL_NAMES else model_dir.name

    dtype, why = choose_dtype(args.dtype, cpu_build=vllm_is_cpu_build(),
                              native_bf16=has_native_bf16())
    print(f"dtype {dtype} on {cpu_model()} ({why})", flush=True)
    master = _start_kv_store_master(args) if args.kv_store else None

    def make_spec(index: int, port: int, cpu_bind: str) -> EngineSpec:
        spec = EngineSpec(model=model_dir, port=port, served_model_name=served_name,
                          plugin=not args.stock, kv_cache_gib=args.kv_cache_gib,
                          cpu_bind=cpu_bind, max_model_len=args.max_model_len,
                          extra_args=["--dtype", dtype])
        if master is not None:
            _attach_kv_store(spec, master.address, args)
        return spec

    router = None if args.no_router else RouterSpec(args.router_port, args.policy, model_dir)
    cluster = LocalCluster.of(args.instances, args.base_port, make_spec, router)
    print(f"starting {args.instances} vllm serve instance(s): {', '.join(cluster.urls)}"
          + (f" behind xllm-router {router.url} (policy {router.policy})" if router else ""),
          flush=True)
    try:
        cluster.start(args.startup_timeout)
    except EngineStartError as error:
        print(f"xllm-local: {error}", file=sys.stderr)
        if master is not None:
            master.stop()
        raise SystemExit(1) from None
    try:
        ready_s = time.perf_counter() - began
        processes = [*cluster.engines, *([cluster.router_process] if cluster.router_process else [])]
        print(f"ready in {ready_s:.1f}s "
              f"(engine startup {', '.join(f'{e.startup_s:.1f}s' for e in cluster.engines)}); "
              f"logs: {', '.join(str(p.log_path) for p in processes)}", flush=True)
        front = cluster.front_url
        if args.demo_requests > 0:
            _demo(front, served_name, args)
        if args.serve:
            print(f"serving on {front} (model '{served_name}'); Ctrl-C stops", flush=True)
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.stop()
        if master is not None:
            master.stop()


def _demo(url: str, model: str, args: argparse.Namespace) -> None:
    from router.bench.load import print_summary, run_load, summarize
    from router.bench.prompts import BUILTIN_PROMPTS

    results, wall = asyncio.run(run_load(url, model, BUILTIN_PROMPTS, args.demo_requests,
                                         args.concurrency, args.max_tokens, progress=True))
    summary = summarize(results, wall)
    print_summary(summary, title=f"demo: {args.demo_requests} chat requests to {url} ({model})")
    sample = next((r for r in results if r.ok), None)
    if sample:
        question = BUILTIN_PROMPTS[sample.index % len(BUILTIN_PROMPTS)]
        print(f"sample: {question!r} -> {sample.text.strip()[:120]!r}")
    if summary["failed"]:
        raise SystemExit(f"xllm-local: {summary['failed']} demo request(s) failed")


def _start_kv_store_master(args: argparse.Namespace) -> Any:
    """mooncake_master for ``--kv-store``, on a free port; stopped with the cluster."""
    from xllm_plugin.kvstore.master import MooncakeMaster

    try:
        master = MooncakeMaster().start()
    except EngineStartError as error:
        raise SystemExit(f"xllm-local: {error}") from None
    print(f"mooncake_master at {master.address} (log {master.log_path})", flush=True)
    return master


def _attach_kv_store(spec: EngineSpec, master: str, args: argparse.Namespace) -> None:
    """The connector flags and the ``xllm.kv_store`` section for one engine."""
    from xllm_plugin.kvstore.launch import connector_args, kv_store_section

    ssd = ({"ssd_dir": args.kv_store_ssd_dir, "ssd_mb": args.kv_store_ssd_mb}
           if args.kv_store_ssd_dir else {})
    section = kv_store_section(master, dram_mb=args.kv_store_dram_mb,
                               segment_mb=args.kv_store_segment_mb, **ssd)
    spec.xllm_config = {**(spec.xllm_config or {}), "kv_store": section}
    spec.extra_args = [*spec.extra_args, *connector_args()]
