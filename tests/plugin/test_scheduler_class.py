"""XLLMScheduler follows vLLM's own choice between the sync and the async scheduler."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: E402

from xllm_plugin.scheduler.xllm_scheduler import XLLMAsyncScheduler, XLLMScheduler  # noqa: E402


def _config(async_scheduling: bool | None) -> SimpleNamespace:
    return SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=async_scheduling))


@pytest.mark.parametrize(("async_scheduling", "expected"), [
    (True, XLLMAsyncScheduler), (False, XLLMScheduler), (None, XLLMScheduler)])
def test_async_config_selects_the_async_variant(async_scheduling: bool | None,
                                                expected: type) -> None:
    instance = XLLMScheduler.__new__(XLLMScheduler, vllm_config=_config(async_scheduling))
    assert type(instance) is expected


def test_async_variant_keeps_xllm_behaviour_over_vllm_async_scheduler() -> None:
    mro = XLLMAsyncScheduler.__mro__
    assert mro.index(XLLMScheduler) < mro.index(AsyncScheduler)
