"""The NIXL affinity fix (xllm_plugin/nixl_affinity.py): a constructor that moves its calling
thread to other CPUs, as vLLM's NIXL connector worker does on CPU, leaves it where it was;
the fix reaches the connector module when it is imported later; the switch is validated."""

from __future__ import annotations

import os
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from xllm_plugin import nixl_affinity
from xllm_plugin.config import XLLMConfigError

CPUS = sorted(os.sched_getaffinity(0))
needs_two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs to move a thread")


def _in_thread(pinned: set[int], make: type) -> tuple[set[int], set[int]]:
    """Construct ``make()`` on a fresh thread pinned to ``pinned``; its CPUs during and after."""
    seen: dict[str, set[int]] = {}

    def run() -> None:
        os.sched_setaffinity(0, pinned)
        seen["during"] = make().cpus_during
        seen["after"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return seen["during"], seen["after"]


class MovesItsCaller:
    """Does what vLLM's connector worker does on CPU: pins its caller to the last CPU."""

    def __init__(self) -> None:
        os.sched_setaffinity(0, {CPUS[-1]})
        self.cpus_during = os.sched_getaffinity(0)


@needs_two_cpus
def test_the_calling_thread_gets_its_cpus_back() -> None:
    class Fixed(MovesItsCaller):
        pass

    Fixed.__init__ = nixl_affinity.keep_caller_affinity(MovesItsCaller.__init__)
    Fixed.__init__ = nixl_affinity.keep_caller_affinity(Fixed.__init__)  # twice: one wrapper
    during, after = _in_thread({CPUS[0]}, Fixed)
    assert during == {CPUS[-1]}  # the constructor itself ran as written
    assert after == {CPUS[0]}
    assert _in_thread({CPUS[0]}, MovesItsCaller)[1] == {CPUS[-1]}  # unpatched: moved


@needs_two_cpus
def test_the_fix_reaches_the_connector_module_when_it_is_imported_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "fake_vllm_nixl_base_worker"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
        import os
        class {nixl_affinity.CONNECTOR_WORKER_CLASS}:
            def __init__(self):
                os.sched_setaffinity(0, {{{CPUS[-1]}}})
                self.cpus_during = os.sched_getaffinity(0)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(nixl_affinity, "CONNECTOR_WORKER_MODULE", name)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.delenv(nixl_affinity.ENV, raising=False)
    assert nixl_affinity.install_from_env()
    try:
        module = __import__(name)
        cls = getattr(module, nixl_affinity.CONNECTOR_WORKER_CLASS)
        assert _in_thread({CPUS[0]}, cls)[1] == {CPUS[0]}
    finally:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("raw", ["yes", "2", "off"])
def test_a_bad_switch_is_refused_with_the_variable_named(raw: str) -> None:
    with pytest.raises(XLLMConfigError, match=nixl_affinity.ENV):
        nixl_affinity.enabled_from_env({nixl_affinity.ENV: raw})


def test_on_by_default_and_off_with_zero() -> None:
    assert nixl_affinity.enabled_from_env({})
    assert not nixl_affinity.enabled_from_env({nixl_affinity.ENV: "0"})
