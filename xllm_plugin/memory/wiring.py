"""How ``xllm.xtensor`` meets the rest of the plugin: startup checks and the scheduler hint.

Imports neither torch nor vLLM at module level (``register()`` calls it in the API
server before vLLM parses its arguments).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from importlib import import_module

from xllm_plugin.config import XLLMConfig, XLLMConfigError

WORKER_CLS = "xllm_plugin.memory.XTensorCPUWorker"


def worker_cls_from_argv(argv: Sequence[str]) -> str | None:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--worker-cls", "--worker_cls", dest="worker_cls")
    known, _ = parser.parse_known_args(list(argv))
    return known.worker_cls


def _is_xtensor_worker(qualname: str | None) -> bool:
    if not qualname or qualname == "auto":
        return False
    if qualname in (WORKER_CLS, "xllm_plugin.memory.vllm_worker.XTensorCPUWorker"):
        return True
    module, _, name = qualname.rpartition(".")
    try:
        cls = getattr(import_module(module), name)
        from xllm_plugin.memory.vllm_worker import XTensorCPUWorker

        return isinstance(cls, type) and issubclass(cls, XTensorCPUWorker)
    except (ImportError, AttributeError, ValueError):
        return False


def check_worker(config: XLLMConfig, worker_cls: str | None) -> None:
    """Raise XLLMConfigError when xTensor is on but vLLM would start its stock worker."""
    if config.xtensor and not _is_xtensor_worker(worker_cls):
        raise XLLMConfigError(
            f"'xllm.xtensor' needs --worker-cls {WORKER_CLS} (got {worker_cls or 'auto'}): "
            "the KV cache must be allocated by xTensor's worker")


def scheduler_lookahead_tokens(config: XLLMConfig) -> int:
    """Tokens the scheduler should allocate KV for ahead of need.

    One token: the block a decode's *next* token needs is allocated in the step that
    fills the current block, so the worker can pre-map it during that step. A request
    never holds more than one unused page because of it.
    """
    return 1 if config.xtensor and config.xtensor_options.premap else 0
