"""``xllm-recommend``: make a synthetic catalog, or send a recommendation workload.

    xllm-recommend catalog --out /tmp/catalog.npy --items 100000 --tokens 3
    xllm-recommend workload --url http://127.0.0.1:8000 --api recommend \\
        --rate 2 --requests 32 --beam-width 32 --catalog-file /tmp/catalog.npy --catalog books
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from xllm_plugin.recommend.catalog import load_catalog, write_catalog
from xllm_plugin.recommend.synthetic import synthetic_items
from xllm_plugin.recommend.workload import Workload, run_workload


def _catalog(args: argparse.Namespace) -> int:
    items = synthetic_items(args.items, args.tokens, args.vocab_size, args.codebook_size,
                            args.zipf, args.seed)
    path = write_catalog(args.out, items)
    catalog = load_catalog(path)
    print(json.dumps({"path": str(path), "items": catalog.num_items,
                      "tokens_per_item": catalog.item_len,
                      "first_level_tokens": len(catalog.level_tokens[0])}))
    return 0


def _workload(args: argparse.Namespace) -> int:
    catalog = load_catalog(args.catalog_file) if args.catalog_file else None
    workload = Workload(
        beam_width=args.beam_width, num_tokens=catalog.item_len if catalog else args.tokens,
        top_k=args.top_k, num_requests=args.requests, rate=args.rate,
        history_items=(args.history_min, args.history_max), prefix_tokens=args.prefix_tokens,
        vocab_size=args.vocab_size, catalog_ref=args.catalog, seed=args.seed)
    result = asyncio.run(run_workload(args.url, args.api, workload, catalog, args.model))
    print(json.dumps({"api": args.api, **result.summary(), "first_errors": result.errors[:3]}))
    return 1 if result.errors else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xllm-recommend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    cat = sub.add_parser("catalog", help="write a synthetic catalog (.npy or text)")
    cat.add_argument("--out", type=Path, required=True)
    cat.add_argument("--items", type=int, default=100_000)
    cat.add_argument("--tokens", type=int, default=3, help="tokens per item")
    cat.add_argument("--vocab-size", type=int, default=49152, help="model vocabulary size")
    cat.add_argument("--codebook-size", type=int, default=256,
                     help="token ids per item position (0 = the whole vocabulary)")
    cat.add_argument("--zipf", type=float, default=1.1, help="skew of the first code")
    cat.add_argument("--seed", type=int, default=0)
    cat.set_defaults(func=_catalog)

    load = sub.add_parser("workload", help="send Poisson beam-search requests, print latency")
    load.add_argument("--url", required=True)
    load.add_argument("--api", choices=("recommend", "stock"), default="recommend",
                      help="recommend: POST /xllm/v1/recommend; stock: vLLM use_beam_search")
    load.add_argument("--model", default="", help="model name for the stock API")
    load.add_argument("--rate", type=float, default=1.0, help="requests/s (0 = sequential)")
    load.add_argument("--requests", type=int, default=16)
    load.add_argument("--beam-width", type=int, default=16)
    load.add_argument("--top-k", type=int, default=None)
    load.add_argument("--tokens", type=int, default=3, help="tokens per item without a catalog")
    load.add_argument("--catalog-file", help="catalog file used to build user histories")
    load.add_argument("--catalog", help="catalog name the server knows (turns the mask on)")
    load.add_argument("--history-min", type=int, default=10)
    load.add_argument("--history-max", type=int, default=40)
    load.add_argument("--prefix-tokens", type=int, default=16)
    load.add_argument("--vocab-size", type=int, default=49152)
    load.add_argument("--seed", type=int, default=0)
    load.set_defaults(func=_workload)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
