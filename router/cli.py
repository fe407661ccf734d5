"""``xllm-router``: run the router, or register an engine instance in etcd.

``xllm-router [OPTIONS]`` (or ``xllm-router serve [OPTIONS]``) runs the router;
``xllm-router register [OPTIONS]`` runs the registrar beside a ``vllm serve``.
Each flag's help text is the matching ``RouterConfig`` field's description,
so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from router.config import ConfigError, RouterConfig

_FIELDS = RouterConfig.model_fields

_SERVE_EPILOG = """\
instances:
  --instances takes URL[;key=value...] entries, comma-separated or the flag repeated.
  Keys: id (default HOST:PORT), model, role (both|prefill|decode|encode),
  kv (the engine's KV-event PUB endpoint), replay (its replay endpoint),
  block_size, capacity. Quote the value in a shell, e.g.
    --instances 'http://127.0.0.1:8001;kv=tcp://127.0.0.1:5557;replay=tcp://127.0.0.1:5558'

cluster mode:
  --etcd HOST:PORT watches --etcd-prefix; engines register with
  `xllm-router register` (see `xllm-router register --help` and router/README.md).

per-request headers:
  x-request-class: online|offline    request class (else `priority` >= --offline-min-priority)
  x-slo-ttft-ms, x-slo-tpot-ms       SLOs in milliseconds, passed to the policy
                                     (default --slo-ttft-ms / --slo-tpot-ms)
  x-xllm-policy: NAME                route this request with another policy (experiments)
responses carry x-xllm-instance (who served it) and x-xllm-policy.
"""


def _help(name: str) -> str:
    field = _FIELDS[name]
    default = field.default
    suffix = f" (default: {default})" if default not in (None, (), "") else ""
    return f"{field.description}{suffix}"


def build_serve_parser(prog: str = "xllm-router") -> argparse.ArgumentParser:
    from router.policies import POLICY_FACTORIES

    parser = argparse.ArgumentParser(
        prog=prog, epilog=_SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="xLLM router: an OpenAI-compatible front door that routes each request to "
                    "one of several vLLM instances (policies: " + ", ".join(POLICY_FACTORIES)
                    + "). `xllm-router register --help` shows the etcd registrar.")
    add = parser.add_argument
    add("--host", help=_help("host"))
    add("--port", type=int, help=_help("port"))
    add("--instances", action="append", metavar="URL[;opts][,...]", help=_help("instances"))
    add("--etcd", metavar="HOST:PORT", help=_help("etcd"))
    add("--etcd-prefix", help=_help("etcd_prefix"))
    add("--policy", help=_help("policy") + f"; one of {', '.join(POLICY_FACTORIES)}")
    add("--api-key", dest="api_keys", action="append", metavar="KEY", help=_help("api_keys")
        + "; repeat for several")
    add("--admin-token", metavar="TOKEN", help=_help("admin_token"))
    add("--upstream-api-key", metavar="KEY", help=_help("upstream_api_key"))
    add("--tokenizer", metavar="DIR", help=_help("tokenizer"))
    add("--block-size", type=int, help=_help("block_size"))
    add("--hash-seed", help=_help("hash_seed"))
    add("--hash-algo", help=_help("hash_algo"))
    add("--scrape-interval-s", type=float, help=_help("scrape_interval_s"))
    add("--scrape-timeout-s", type=float, help=_help("scrape_timeout_s"))
    add("--unhealthy-after", type=int, help=_help("unhealthy_after"))
    add("--recover-after", type=int, help=_help("recover_after"))
    add("--failed-hold-s", type=float, help=_help("failed_hold_s"))
    add("--failed-hold-max-s", type=float, help=_help("failed_hold_max_s"))
    add("--flap-window-s", type=float, help=_help("flap_window_s"))
    add("--remove-after-s", type=float, help=_help("remove_after_s"))
    add("--connect-timeout-s", type=float, help=_help("connect_timeout_s"))
    add("--first-byte-timeout-s", type=float, help=_help("first_byte_timeout_s"))
    add("--idle-timeout-s", type=float, help=_help("idle_timeout_s"))
    add("--request-timeout-s", type=float, help=_help("request_timeout_s"))
    add("--migration-limit", type=int, help=_help("migration_limit"))
    add("--stall-timeout-multiple", type=float, help=_help("stall_timeout_multiple"))
    add("--liveness-probe-multiple", type=float, help=_help("liveness_probe_multiple"))
    add("--liveness-probe-timeout-s", type=float, help=_help("liveness_probe_timeout_s"))
    add("--liveness-stuck-s", type=float, help=_help("liveness_stuck_s"))
    add("--kv-bytes-per-token", type=float, help=_help("kv_bytes_per_token"))
    add("--kv-transfer-gbps", type=float, help=_help("kv_transfer_gbps"))
    add("--offline-min-priority", type=int, help=_help("offline_min_priority"))
    add("--max-body-mb", type=float, help=_help("max_body_mb"))
    add("--batch-dir", metavar="DIR", help=_help("batch_dir"))
    add("--batch-concurrency", type=int, help=_help("batch_concurrency"))
    add("--slo-ttft-ms", type=float, help=_help("slo_ttft_ms"))
    add("--slo-tpot-ms", type=float, help=_help("slo_tpot_ms"))
    add("--pd-role-dwell-s", type=float, help=_help("pd_role_dwell_s"))
    add("--pd-restore-quiet-s", type=float, help=_help("pd_restore_quiet_s"))
    add("--pd-mixed-max-batch", type=int, help=_help("pd_mixed_max_batch"))
    add("--profile-instances", action=argparse.BooleanOptionalAction, default=None,
        help=_help("profile_instances"))
    add("--epd-profile", action=argparse.BooleanOptionalAction, default=None,
        help=_help("epd_profile"))
    add("--epd-probe-requests", type=int, help=_help("epd_probe_requests"))
    add("--epd-probe-concurrency", type=int, help=_help("epd_probe_concurrency"))
    add("--epd-probe-max-concurrency", type=int, help=_help("epd_probe_max_concurrency"))
    add("--epd-probe-max-tokens", type=int, help=_help("epd_probe_max_tokens"))
    add("--epd-window", type=int, help=_help("epd_window"))
    add("--epd-probe-image", metavar="FILE|URL", help=_help("epd_probe_image"))
    add("--log-level", help=_help("log_level"))
    return parser


def build_register_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xllm-router register",
        description="Register one engine instance in etcd while it is healthy: wait for "
                    "URL/health, put PREFIX+ID -> JSON record under a lease, keep the lease "
                    "alive, deregister after repeated failed health probes or on exit. If this "
                    "process dies, the lease expires within --ttl and the router drops the "
                    "instance.")
    add = parser.add_argument
    add("--etcd", required=True, metavar="HOST:PORT", help="etcd endpoint.")
    add("--url", required=True, help="The engine's base URL, e.g. http://127.0.0.1:8001.")
    add("--model", required=True, help="Served model name (as in /v1/models).")
    add("--id", dest="instance_id", help="Instance id, the key suffix (default HOST:PORT "
        "of --url).")
    add("--etcd-prefix", default="/xllm/instances/", help="Key prefix (default: %(default)s).")
    add("--role", default="both", help="both|prefill|decode|encode (default: %(default)s).")
    add("--kv-events-endpoint", help="The engine's KV-event PUB endpoint as the router should "
        "connect to it, e.g. tcp://10.0.0.5:5557.")
    add("--kv-events-replay-endpoint", help="The engine's KV-event replay endpoint.")
    add("--block-size", type=int, help="The engine's KV block size.")
    add("--capacity", type=int, help="Relative capacity (e.g. max concurrent sequences).")
    add("--incarnation", help="Id of this engine process (default: random per registrar run).")
    add("--ttl", type=int, default=10, help="Lease TTL in seconds (default: %(default)s).")
    add("--unhealthy-after", type=int, default=3, help="Failed health probes before "
        "deregistering (default: %(default)s).")
    add("--log-level", default="info", help="debug|info|warning|error (default: %(default)s).")
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def _run_until_signal(coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass


def register_main(argv: list[str]) -> int:
    from router.discovery.etcd import EtcdClient
    from router.discovery.records import InstanceRecord, RecordError, normalize_url
    from router.discovery.registrar import Registrar

    args = build_register_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        url = normalize_url(args.url)
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        record = InstanceRecord(
            instance_id=args.instance_id or f"{parts.hostname}:{parts.port or 80}", url=url,
            model=args.model, role=args.role, kv_events_endpoint=args.kv_events_endpoint,
            kv_events_replay_endpoint=args.kv_events_replay_endpoint, block_size=args.block_size,
            capacity=args.capacity, incarnation=args.incarnation, source="etcd")
        if not args.etcd_prefix.startswith("/") or not args.etcd_prefix.endswith("/"):
            raise RecordError("--etcd-prefix must start and end with '/'")

        async def run() -> None:
            async with EtcdClient(args.etcd) as etcd:
                await Registrar(etcd, record, prefix=args.etcd_prefix, ttl_s=args.ttl,
                                unhealthy_after=args.unhealthy_after).run()

        asyncio.run(_run_until_signal(run()))
    except (RecordError, ValueError) as exc:
        print(f"xllm-router register: {exc}", file=sys.stderr)
        return 2
    return 0


def serve_main(argv: list[str]) -> int:
    args = build_serve_parser().parse_args(argv)
    try:
        config = RouterConfig.from_args(vars(args))
    except ConfigError as exc:
        print(f"xllm-router: {exc}", file=sys.stderr)
        return 2
    _setup_logging(config.log_level)
    from router.server.app import serve

    try:
        asyncio.run(_run_until_signal(serve(config)))
    except OSError as exc:
        print(f"xllm-router: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "register":
        sys.exit(register_main(argv[1:]))
    if argv and argv[0] == "serve":
        argv = argv[1:]
    sys.exit(serve_main(argv))


if __name__ == "__main__":
    main()
