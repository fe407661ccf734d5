"""xTensor: logically contiguous, physically paged KV memory (paper §4.3). See README.md here.

Pure bookkeeping (``geometry``, ``pool``, ``views``, ``metrics``) is separate from the
device mappers (``cpu_mapper``, ``cuda_mapper``) and from the vLLM integration
(``vllm_worker``, ``vllm_backend``, ``vllm_store``), which alone import vLLM.
``XTensorCPUWorker`` is imported lazily so that this package loads without vLLM.
"""

from __future__ import annotations

from typing import Any

__all__ = ["XTensorCPUWorker"]


def __getattr__(name: str) -> Any:
    if name == "XTensorCPUWorker":
        from xllm_plugin.memory.vllm_worker import XTensorCPUWorker

        return XTensorCPUWorker
    raise AttributeError(name)
