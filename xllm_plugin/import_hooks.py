"""Patch a module of another package right after it is imported, without importing it early.

Why not import and patch at plugin load: the plugin's general entry point runs in every
vLLM process, and the modules patched here (nixl's bindings, vLLM's NIXL connector) cost
about a second to import and matter only to engines configured for KV transfer.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

Patch = Callable[[ModuleType], None]


class _PatchAfterLoad(importlib.abc.Loader):
    """Runs the real loader, then the patches registered for the module it loaded."""

    def __init__(self, loader: importlib.abc.Loader, patches: list[Patch]) -> None:
        self._loader = loader
        self._patches = patches

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        for patch in self._patches:
            patch(module)


class ImportPatcher(importlib.abc.MetaPathFinder):
    """The one finder on ``sys.meta_path`` that holds every pending patch, by module name."""

    def __init__(self) -> None:
        self.patches: dict[str, dict[str, Patch]] = {}

    def find_spec(self, fullname: str, path: Any = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        patches = self.patches.get(fullname)
        if not patches:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchAfterLoad(spec.loader, list(patches.values()))
                return spec
        return None


def _patcher() -> ImportPatcher:
    for finder in sys.meta_path:
        if isinstance(finder, ImportPatcher):
            return finder
    patcher = ImportPatcher()
    sys.meta_path.insert(0, patcher)
    return patcher


def patch_on_import(modules: Iterable[str], key: str, patch: Patch) -> None:
    """Apply ``patch`` to each of ``modules``: now where it is imported already, else right
    after its import. Registering the same ``key`` again replaces the earlier patch (a patch
    must itself tolerate being applied to a module it has patched before)."""
    patcher = _patcher()
    for name in modules:
        patcher.patches.setdefault(name, {})[key] = patch
        if name in sys.modules:
            patch(sys.modules[name])
