"""``vllm serve`` flags that attach an engine to the global KV store (launcher, tests, benchmarks)."""

from __future__ import annotations

import json
from typing import Any

KV_TRANSFER_CONFIG = {"kv_connector": "XLLMStoreConnector",
                      "kv_connector_module_path": "xllm_plugin.kvstore.connector",
                      "kv_role": "kv_both"}


def connector_args() -> list[str]:
    """The ``--kv-transfer-config`` that loads ``XLLMStoreConnector`` (prefix caching on)."""
    return ["--enable-prefix-caching", "--kv-transfer-config", json.dumps(KV_TRANSFER_CONFIG)]


def kv_store_section(master: str | None, **settings: Any) -> dict[str, Any]:
    """The ``xllm.kv_store`` section of ``--additional-config``."""
    return {"master": master, **settings}
