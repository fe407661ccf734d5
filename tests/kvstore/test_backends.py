"""The media below DRAM against the real thing: a ``mooncake_master`` started and stopped
by the fixture with two store clients (what two engines' workers are), and block files.
No vLLM engine is started."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import pytest

pytest.importorskip("mooncake.store", reason="needs mooncake-transfer-engine-non-cuda and libibverbs1")

from xllm_plugin.kvstore.backends import BlockFiles, MooncakeStoreClient, block_key  # noqa: E402
from xllm_plugin.kvstore.master import MooncakeMaster  # noqa: E402
from xllm_plugin.launcher.cli import _attach_kv_store, _parse  # noqa: E402
from xllm_plugin.launcher.engine import EngineSpec  # noqa: E402

BLOCK = 64 * 1024


@pytest.fixture(scope="module")
def master() -> Iterator[MooncakeMaster]:
    with MooncakeMaster() as m:
        yield m
    assert m.process is None  # stopped


def buffer(fill: int, n: int = 4) -> ctypes.Array:
    return (ctypes.c_char * (BLOCK * n)).from_buffer_copy(bytes([fill]) * (BLOCK * n))


def test_a_block_put_by_one_client_is_read_by_another(master):
    writer = MooncakeStoreClient(master.address, segment_bytes=16 << 20)
    reader = MooncakeStoreClient(master.address, segment_bytes=0)
    try:
        src, dst = buffer(7), buffer(0)
        writer.register(ctypes.addressof(src), len(src))
        reader.register(ctypes.addressof(dst), len(dst))
        keys = [block_key("test/abc", bytes([i]) * 32) for i in range(4)]
        assert reader.exists(keys) == [False] * 4
        assert writer.put(keys[:3], [ctypes.addressof(src) + i * BLOCK for i in range(3)], BLOCK) \
            == [True] * 3
        assert reader.exists(keys) == [True, True, True, False]
        got = reader.get(keys, [ctypes.addressof(dst) + i * BLOCK for i in range(4)], BLOCK)
        assert got == [True, True, True, False]
        assert bytes(dst)[: 3 * BLOCK] == bytes([7]) * (3 * BLOCK)
    finally:
        reader.close()
        writer.close()


def test_setup_against_no_master_fails_with_a_clear_error():
    from xllm_plugin.launcher.engine import free_port

    with pytest.raises(RuntimeError, match="mooncake_master running"):
        MooncakeStoreClient(f"127.0.0.1:{free_port()}")


def test_block_files_round_trip_and_drop(tmp_path):
    files = BlockFiles(tmp_path / "ssd", BLOCK)
    src, dst = buffer(3, 1), buffer(0, 1)
    assert files.write("k1", ctypes.addressof(src))
    assert files.read("k1", ctypes.addressof(dst)) and bytes(dst) == bytes(src)
    files.drop("k1")
    assert not files.read("k1", ctypes.addressof(dst))


def test_xllm_local_kv_store_flag_attaches_the_connector():
    args = _parse(["--kv-store", "--kv-store-ssd-dir", "/tmp/x", "--kv-store-dram-mb", "64"])
    spec = EngineSpec(model="m", port=1, plugin=True)
    _attach_kv_store(spec, "127.0.0.1:5", args)
    cmd = " ".join(spec.command())
    assert "XLLMStoreConnector" in cmd and "--enable-prefix-caching" in cmd
    assert spec.xllm_config["kv_store"] == {"master": "127.0.0.1:5", "dram_mb": 64,
                                            "segment_mb": 1024, "ssd_dir": "/tmp/x",
                                            "ssd_mb": 4096}
    with pytest.raises(SystemExit):
        _parse(["--kv-store", "--stock"])
