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

from router.policies import POLICY_FACTORIES
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
    args = parser.parse_args(argv)
    if args.instances < 1:
        parser.error("--instances must be at least 1")
    return args


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

    def make_spec(index: int, port: int, cpu_bind: str) -> EngineSpec:
        return EngineSpec(model=model_dir, port=port, served_model_name=served_name,
                          plugin=not args.stock, kv_cache_gib=args.kv_cache_gib,
                          cpu_bind=cpu_bind, max_model_len=args.max_model_len)

    router = None if args.no_router else RouterSpec(args.router_port, args.policy, model_dir)
    cluster = LocalCluster.of(args.instances, args.base_port, make_spec, router)
    print(f"starting {args.instances} vllm serve instance(s): {', '.join(cluster.urls)}"
          + (f" behind xllm-router {router.url} (policy {router.policy})" if router else ""),
          flush=True)
    try:
        cluster.start(args.startup_timeout)
    except EngineStartError as error:
        print(f"xllm-local: {error}", file=sys.stderr)
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
