"""``xllm.kv_store`` in ``--additional-config``: the global multi-tier KV cache's settings.

Only pydantic here, so ``xllm_plugin.config`` can validate the section in the
API-server process before vLLM (or Mooncake) is imported anywhere.

The section turns nothing on by itself: the connector runs when vLLM is
started with ``--kv-transfer-config '{"kv_connector": "XLLMStoreConnector",
"kv_connector_module_path": "xllm_plugin.kvstore.connector", "kv_role": "kv_both"}'``
and then reads these settings (defaults when the section is absent).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class KVStoreConfig(BaseModel):
    """Tiers below the engine's KV cache (HBM on a GPU, the KV cache region on CPU).

    Per instance: a DRAM tier (``dram_mb``) that holds every block the engine
    computed or loaded (inclusion: a block in the engine cache is also in DRAM,
    as long as DRAM is at least as large) and an SSD tier of files below it
    (``ssd_mb`` in ``ssd_dir``) that receives DRAM's least-recently-used victims.
    Across instances: Mooncake Store (``master``), to which every saved block is
    put, so any instance can load a prefix another one computed.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    master: str | None = Field(
        default=None,
        description="mooncake_master HOST:PORT; none = local tiers only, no global store.")
    metadata_server: str = Field(
        default="P2PHANDSHAKE",
        description="Mooncake transfer-engine metadata: P2PHANDSHAKE, http://..., or etcd://HOST:PORT.")
    local_hostname: str = Field(
        default="127.0.0.1", description="Address other store clients reach this one at.")
    protocol: str = Field(default="tcp", description="Mooncake transfer protocol: tcp or rdma.")
    device_name: str = Field(default="", description="RDMA devices (protocol rdma).")
    segment_mb: int = Field(
        default=512, ge=0,
        description="Memory each worker contributes to the global store (embedded mode); 0 = "
                    "a client only (a standalone mooncake_client owns the memory).")
    dram_mb: int = Field(
        default=1024, ge=1,
        description="DRAM tier per worker, MiB; also the staging area of every store transfer.")
    ssd_mb: int = Field(default=0, ge=0, description="SSD tier per worker, MiB; 0 = no SSD tier.")
    ssd_dir: str | None = Field(
        default=None, description="Directory of the SSD tier's block files (required with ssd_mb).")
    namespace: str = Field(
        default="xllm", pattern=r"^[A-Za-z0-9_.-]+$",
        description="Prefix of every store key; instances that share KV must share it.")
    save: bool = Field(default=True, description="Save computed blocks to the tiers and the store.")
    load: bool = Field(default=True, description="Load prefix hits from the tiers and the store.")
    async_load: bool = Field(
        default=True,
        description="Load hits between engine steps while the request waits (vLLM's asynchronous "
                    "protocol: other requests keep running); false = load inside the step, before "
                    "its forward pass (no waiting step, but the step waits for the copies).")
    lookup_cache_s: float = Field(
        default=0.5, ge=0,
        description="How long one request's store lookup is reused while it waits to be scheduled.")

    @model_validator(mode="after")
    def _check(self) -> KVStoreConfig:
        if self.ssd_mb > 0 and not self.ssd_dir:
            raise ValueError("ssd_mb > 0 needs ssd_dir")
        if 0 < self.segment_mb < 16:
            raise ValueError("segment_mb must be 0 or at least 16 (Mooncake's minimum segment)")
        return self
