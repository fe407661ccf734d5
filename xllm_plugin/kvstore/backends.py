"""The two places blocks go below DRAM: Mooncake Store (global) and block files (SSD tier).

Both move bytes between a host address and their medium; neither knows about
torch or vLLM. Store keys and file names derive from vLLM's block hash plus a
namespace and the KV layout tag, so only instances with the same model,
dtype, block size and tensor-parallel rank ever exchange a block.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("vllm.xllm_plugin.kvstore")  # vLLM configures "vllm.*" handlers

OK = 0


def block_key(prefix: str, block_hash: bytes) -> str:
    """The store key of one block: ``PREFIX/HASH-HEX`` (prefix: namespace and layout tag)."""
    return f"{prefix}/{block_hash.hex()}"


def parse_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host, int(port)


class MooncakeStoreClient:
    """One ``MooncakeDistributedStore`` client: batched puts, gets and existence checks.

    ``segment_bytes`` is the memory this client contributes to the global pool
    (0 for a lookup-only client, such as the scheduler's). Buffers handed to
    puts and gets should be registered once with ``register`` (needed for RDMA;
    over TCP it only spares a copy).
    """

    def __init__(self, master: str, *, metadata_server: str = "P2PHANDSHAKE",
                 local_hostname: str = "127.0.0.1", protocol: str = "tcp", device_name: str = "",
                 segment_bytes: int = 0, local_buffer_bytes: int = 16 << 20) -> None:
        try:
            from mooncake.store import MooncakeDistributedStore
        except ImportError as exc:  # libibverbs1 missing is the usual cause
            raise RuntimeError(
                "xllm kv_store: cannot import Mooncake Store (pip install "
                "mooncake-transfer-engine-non-cuda; on Debian/Ubuntu apt-get install libibverbs1): "
                f"{exc}") from exc
        host, port = parse_host_port(master)
        # Mooncake's own setup retries for about 90 s against a missing master; fail fast.
        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as exc:
            raise RuntimeError(f"xllm kv_store: no mooncake_master running at {master} ({exc})") \
                from None
        self.master = master
        self._store = MooncakeDistributedStore()
        ret = self._store.setup(local_hostname, metadata_server, segment_bytes, local_buffer_bytes,
                                protocol, device_name, master)
        if ret != OK:
            raise RuntimeError(f"xllm kv_store: Mooncake Store setup failed ({ret}) against the "
                               f"mooncake_master running at {master}")

    def register(self, address: int, size: int) -> None:
        ret = self._store.register_buffer(address, size)
        if ret != OK:
            raise RuntimeError(f"xllm kv_store: registering {size} bytes with Mooncake failed ({ret})")

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """One round trip to the master; an error counts as absent."""
        if not keys:
            return []
        return [r == 1 for r in self._store.batch_is_exist(list(keys))]

    def put(self, keys: Sequence[str], addresses: Sequence[int], size: int) -> list[bool]:
        """Batched put of ``size`` bytes from each address; True where stored (or already there)."""
        if not keys:
            return []
        results = self._store.batch_put_from(list(keys), list(addresses), [size] * len(keys))
        return [r == OK for r in results]

    def get(self, keys: Sequence[str], addresses: Sequence[int], size: int) -> list[bool]:
        """Batched get into each address; True where the whole block arrived."""
        if not keys:
            return []
        results = self._store.batch_get_into(list(keys), list(addresses), [size] * len(keys))
        return [r == size for r in results]

    def close(self) -> None:
        try:
            self._store.close()
        except Exception:  # noqa: BLE001 (shutdown path)
            log.debug("closing the Mooncake client failed", exc_info=True)


class BlockFiles:
    """The SSD tier: one file per block under ``root``, written whole and renamed into place."""

    def __init__(self, root: str | Path, block_bytes: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.block_bytes = block_bytes

    def _path(self, name: str) -> Path:
        return self.root / name

    def write(self, name: str, address: int) -> bool:
        path = self._path(name)
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write((ctypes.c_char * self.block_bytes).from_address(address))
            os.replace(tmp, path)
            return True
        except OSError:
            log.warning("SSD tier: writing %s failed", path, exc_info=True)
            return False

    def read(self, name: str, address: int) -> bool:
        try:
            with open(self._path(name), "rb", buffering=0) as f:
                view = memoryview((ctypes.c_char * self.block_bytes).from_address(address)).cast("B")
                return f.readinto(view) == self.block_bytes
        except OSError:
            return False

    def drop(self, name: str) -> None:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            pass

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
