"""Which catalog a request means: a name from the config, or a file under ``catalog_dir``.

Requests name catalogs (``"catalog": "books"`` on the route, ``"xllm_catalog"`` in
``vllm_xargs``); the API server and the engine process resolve the name the same
way, each loading the file once. A path is accepted only inside the configured
``catalog_dir``, so a request cannot make the server read arbitrary files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from xllm_plugin.config import RecommendConfig, parse_xllm_config
from xllm_plugin.recommend.catalog import Catalog, CatalogError, load_catalog


def recommend_config(additional_config: Mapping[str, Any] | None) -> RecommendConfig:
    """The ``xllm.recommend`` section of vLLM's additional config (validated)."""
    return parse_xllm_config(additional_config).recommend


def resolve_catalog(ref: str, config: RecommendConfig) -> Catalog:
    """Load the catalog ``ref`` names; raises ``CatalogError`` with what is allowed."""
    if not isinstance(ref, str) or not ref:
        raise CatalogError("catalog must be a non-empty string (a configured name or a path)")
    if ref in config.catalogs:
        return load_catalog(config.catalogs[ref])
    if config.catalog_dir:
        base = os.path.realpath(config.catalog_dir)
        path = os.path.realpath(os.path.join(base, ref))
        if os.path.commonpath([base, path]) == base:
            return load_catalog(path)
    names = ", ".join(sorted(config.catalogs)) or "none configured"
    where = f" or a file under {config.catalog_dir}" if config.catalog_dir else ""
    raise CatalogError(f"unknown catalog {ref!r}; use one of: {names}{where} "
                       "(xllm.recommend.catalogs / catalog_dir in --additional-config)")
