"""Queue readers that sleep instead of spin (xllm_plugin/shm_spin.py), on vLLM's own
``SpinCondition`` with a real zmq context: the env value is validated, a patched reader
never busy-loops, its wait returns within the cap when no notification comes, a
notification still wakes it at once, and patching twice does not stack."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from xllm_plugin import shm_spin
from xllm_plugin.config import XLLMConfigError

zmq = pytest.importorskip("zmq")
shm_broadcast = pytest.importorskip(shm_spin.SHM_MODULE)


@pytest.mark.parametrize("raw", ["fast", "0", "-1", "5001", "1.5"])
def test_a_bad_wait_is_refused_with_the_variable_named(raw: str) -> None:
    with pytest.raises(XLLMConfigError, match=shm_spin.ENV):
        shm_spin.poll_ms_from_env({shm_spin.ENV: raw})


def test_unset_means_vllms_own_spin() -> None:
    assert shm_spin.poll_ms_from_env({}) is None
    assert shm_spin.poll_ms_from_env({shm_spin.ENV: " 2 "}) == 2


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch) -> Iterator[type]:
    cls = shm_broadcast.SpinCondition
    monkeypatch.setattr(cls, "__init__", cls.__init__)
    monkeypatch.setattr(cls, "wait", cls.wait)
    shm_spin.patch_spin_condition(shm_broadcast, 20)
    shm_spin.patch_spin_condition(shm_broadcast, 5)  # again: replaces, does not stack
    yield cls


def _pair(context: Any, cls: type) -> tuple[Any, Any]:
    address = f"inproc://xllm-shm-spin-{time.monotonic_ns()}"
    writer = cls(is_reader=False, context=context, notify_address=address)
    reader = cls(is_reader=True, context=context, notify_address=address)
    return writer, reader


def test_a_patched_reader_sleeps_at_most_the_cap_and_wakes_on_notify(patched: type) -> None:
    context = zmq.Context()
    try:
        writer, reader = _pair(context, patched)
        assert reader.busy_loop_s == 0.0 and writer.busy_loop_s == 0
        reader.last_read = 0.0  # idle: vLLM's reader would now sleep the whole 5 s
        began = time.perf_counter()
        reader.wait(timeout_ms=5000)  # nothing written: the cap ends the wait
        assert time.perf_counter() - began < 1.0
        time.sleep(0.05)  # the SUB connection settles before the notification
        writer.notify()
        began = time.perf_counter()
        reader.wait(timeout_ms=None)
        assert reader.local_notify_socket.poll(0) == 0  # the notification was taken
        assert time.perf_counter() - began < 1.0
    finally:
        context.destroy(linger=0)


def test_unpatched_vllm_spins_after_a_read() -> None:
    """What the patch changes: vLLM's reader busy-loops for a second after each read."""
    context = zmq.Context()
    try:
        _, reader = _pair(context, shm_broadcast.SpinCondition)
        assert reader.busy_loop_s == 1
    finally:
        context.destroy(linger=0)


def test_a_vllm_without_the_class_is_an_error() -> None:
    from types import ModuleType

    with pytest.raises(XLLMConfigError, match="SpinCondition"):
        shm_spin.patch_spin_condition(ModuleType("elsewhere"), 1)
