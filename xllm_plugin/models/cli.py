"""``xllm-models``: build the project's models offline and print where they are."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from xllm_plugin.models.build import MODEL_NAMES, build_model, default_cache_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="xllm-models",
        description="Build test and demo models from files installed by pip; never touches a model hub.")
    parser.add_argument("names", nargs="*", default=list(MODEL_NAMES), metavar="NAME", help=f"models to build: {', '.join(MODEL_NAMES)} (default: all)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"where models go (default: $XLLM_MODEL_DIR or {default_cache_dir()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(MODEL_NAMES))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODEL_NAMES)}")
    for name in args.names:
        start = time.perf_counter()
        path = build_model(name, args.cache_dir, force=args.force)
        print(f"{name}: {path} ({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    main()
