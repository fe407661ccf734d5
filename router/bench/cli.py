"""``xllm-bench``: one command, several subcommands, each defined in its own module.

A module joins by exposing ``add_subcommand(subparsers)`` that registers its
parser and sets ``func`` (called with the parsed args); list it in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = (
    "router.bench.load",
    "router.sim.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xllm-bench",
        description="Workloads and benchmarks for xllm-plugin: live load runs, A/B against "
                    "stock vLLM, trace-driven simulation.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMANDS:
        importlib.import_module(module_name).add_subcommand(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args) or 0)
