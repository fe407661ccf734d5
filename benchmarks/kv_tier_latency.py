"""What one KV block costs to bring back from each tier, against recomputing it: the basis of
kv_aware's tier weights (``w = 1 - t_load / t_prefill``).

Measures, per block of SmolLM2-135M's KV (30 layers, 3 KV heads x 64, bf16, 32 tokens =
720 KiB), the connector's own code paths, in batches like a real load:

- ``dram``: DRAM slot rows -> engine KV tensors (``KVBlockIO.scatter``);
- ``ssd``: block file -> DRAM slot (``BlockFiles.read``) + scatter;
- ``store``: Mooncake Store batched get over TCP from another client's segment into DRAM
  slots (``MooncakeStoreClient.get``, a fresh ``mooncake_master``) + scatter;

and takes the prefill cost of a block from the simulator's fitted SmolLM2 CPU model
(``router/sim/perf_models/smollm2-cpu.json``: ms per prefill token x 32). No vLLM engine.

    python benchmarks/kv_tier_latency.py
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LAYERS, KV_HEADS, HEAD, BLOCK = 30, 3, 64, 32
ENGINE_BLOCKS, BATCH, REPS = 256, 16, 15


def timed(fn, reps: int = REPS) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs (after one warm-up)."""
    fn()
    samples = []
    for _ in range(reps):
        began = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)


def main() -> int:
    from xllm_plugin.kvstore.backends import BlockFiles, MooncakeStoreClient
    from xllm_plugin.kvstore.block_io import KVBlockIO
    from xllm_plugin.kvstore.master import MooncakeMaster

    torch.set_num_threads(1)
    caches = {f"model.layers.{i}.self_attn": torch.randn(2, ENGINE_BLOCKS, KV_HEADS, BLOCK, HEAD,
                                                         dtype=torch.bfloat16)
              for i in range(LAYERS)}
    io = KVBlockIO(caches, ENGINE_BLOCKS)
    pool = torch.empty((BATCH, io.block_bytes), dtype=torch.uint8)
    ids = list(range(0, 2 * BATCH, 2))
    io.gather(ids, pool)
    address = pool.data_ptr()

    def scatter() -> None:
        io.scatter(pool, [i + 1 for i in ids])

    results: dict[str, float] = {}
    results["dram_ms_per_block"] = timed(scatter) / BATCH * 1000

    with tempfile.TemporaryDirectory() as tmp:
        files = BlockFiles(tmp, io.block_bytes)
        for b in range(BATCH):
            files.write(f"b{b}", address + b * io.block_bytes)

        def from_ssd() -> None:
            for b in range(BATCH):
                files.read(f"b{b}", address + b * io.block_bytes)
            scatter()
        results["ssd_ms_per_block"] = timed(from_ssd) / BATCH * 1000

    with MooncakeMaster() as master:
        owner = MooncakeStoreClient(master.address, segment_bytes=64 << 20)
        reader = MooncakeStoreClient(master.address, segment_bytes=0)
        src = torch.empty_like(pool).copy_(pool)
        owner.register(src.data_ptr(), src.numel())
        reader.register(address, pool.numel())
        keys = [f"bench/{b}" for b in range(BATCH)]
        assert all(owner.put(keys, [src.data_ptr() + b * io.block_bytes for b in range(BATCH)],
                             io.block_bytes))

        def from_store() -> None:
            assert all(reader.get(keys, [address + b * io.block_bytes for b in range(BATCH)],
                                  io.block_bytes))
            scatter()
        results["store_ms_per_block"] = timed(from_store) / BATCH * 1000
        reader.close()
        owner.close()

    model = json.loads((ROOT / "router/sim/perf_models/smollm2-cpu.json").read_text())
    prefill = model["step_model"]["per_prefill_token_ms"] * BLOCK
    results["prefill_ms_per_block"] = prefill
    for tier in ("dram", "ssd", "store"):
        results[f"{tier}_weight_measured"] = round(1 - results[f"{tier}_ms_per_block"] / prefill, 3)
    results = {k: round(v, 4) for k, v in results.items()}
    results.update(block_bytes=io.block_bytes, batch_blocks=BATCH, repetitions=REPS,
                   command="python benchmarks/kv_tier_latency.py",
                   date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   machine=f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}")
    out = ROOT / "benchmarks/results/kv_tier_latency.json"
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(json.dumps(results, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
