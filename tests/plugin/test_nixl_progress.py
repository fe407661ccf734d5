"""The pause of NIXL's progress thread (xllm_plugin/nixl_progress.py): the env value is
validated, agents created after the patch get the pause, and the import hook patches nixl
when it is imported later (here: a stand-in package, so the test needs no nixl)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from xllm_plugin import nixl_progress
from xllm_plugin.config import XLLMConfigError
from xllm_plugin.import_hooks import ImportPatcher


def _fake_api() -> tuple[ModuleType, list[tuple[str, int]]]:
    created: list[tuple[str, int]] = []
    api = ModuleType("fake_api")
    api.nixlBind = SimpleNamespace(
        nixlAgent=lambda name, config: created.append((name, config.pthrDelay)) or name)
    return api, created


def test_agents_created_after_the_patch_pause_between_polls() -> None:
    api, created = _fake_api()
    nixl_progress.pause_progress_thread(api, 1000)
    nixl_progress.pause_progress_thread(api, 250)  # again: replaces, does not stack
    assert api.nixlBind.nixlAgent("a", SimpleNamespace(pthrDelay=0)) == "a"
    assert created == [("a", 250)]


@pytest.mark.parametrize("raw", ["fast", "-1", "1000001", "1.5"])
def test_a_bad_delay_is_refused_with_the_variable_named(raw: str) -> None:
    with pytest.raises(XLLMConfigError, match="XLLM_NIXL_PROGRESS_DELAY_US"):
        nixl_progress.delay_from_env({nixl_progress.ENV: raw})


def test_unset_means_nixls_own_behaviour() -> None:
    assert nixl_progress.delay_from_env({}) is None
    assert nixl_progress.delay_from_env({nixl_progress.ENV: "0"}) == 0


def test_the_hook_patches_nixl_when_it_is_imported_later(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "nixl_cu12"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "_api.py").write_text(textwrap.dedent("""
        from types import SimpleNamespace
        made = []
        nixlBind = SimpleNamespace(nixlAgent=lambda name, config: made.append(config.pthrDelay))
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(nixl_progress.ENV, "500")
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    for name in ("nixl_cu12", "nixl_cu12._api"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert nixl_progress.install_from_env() == 500
    assert nixl_progress.install_from_env() == 500  # idempotent: one hook
    assert sum(isinstance(f, ImportPatcher) for f in sys.meta_path) == 1
    try:
        import nixl_cu12._api as api  # noqa: PLC0415

        api.nixlBind.nixlAgent("agent", SimpleNamespace(pthrDelay=0))
        assert api.made == [500]
    finally:  # later tests must import the real nixl, if any
        for name in ("nixl_cu12._api", "nixl_cu12"):
            sys.modules.pop(name, None)
