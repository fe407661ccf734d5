"""Worker side: run each step's plan (see ``tiers.py``) off the engine's critical path.

On the engine thread, after the forward pass, ``submit`` only gathers the
blocks the step completed into a host staging buffer (a memory copy; on CUDA
a device-to-host copy on a side stream). Everything slow runs on one I/O
thread, strictly in submission order: writing DRAM slots, demoting to SSD
files, batched store puts and gets, and scattering loaded blocks into the
engine's KV cache. A request whose blocks are being loaded is not scheduled
until ``finished_loads`` reports it (vLLM's asynchronous-load protocol), so
the I/O thread writes blocks no forward pass reads.

Failures never stop the engine: a slot whose fill failed is marked invalid,
any later read of it fails too, and the affected engine blocks are reported
through ``failed_block_ids`` so vLLM recomputes them.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from xllm_plugin.kvstore.backends import BlockFiles, MooncakeStoreClient, block_key
from xllm_plugin.kvstore.block_io import KVBlockIO
from xllm_plugin.kvstore.settings import KVStoreConfig
from xllm_plugin.kvstore.tiers import (
    DEMOTE,
    FILL_SSD,
    FILL_STORE,
    PUT,
    RESET,
    SAVE,
    SCATTER,
    SSD_DROP,
    Op,
    StepPlan,
)

log = logging.getLogger("vllm.xllm_plugin.kvstore")  # vLLM configures "vllm.*" handlers


@dataclass
class WorkerStats:
    """Counters since start (blocks and seconds), logged and exported for benchmarks."""

    saved: int = 0
    put: int = 0
    put_failed: int = 0
    demoted: int = 0
    scattered: int = 0  # blocks written into the engine cache (from any tier)
    filled: dict[str, int] = field(default_factory=lambda: {"ssd": 0, "store": 0})
    load_failed: int = 0
    io_s: float = 0.0


class TierWorker:
    """Owns the DRAM pool, the SSD files and the store client of one worker."""

    def __init__(self, settings: KVStoreConfig, block_io: KVBlockIO, dram_slots: int,
                 ssd_root: Path | None, store: MooncakeStoreClient | None, key_prefix: str) -> None:
        self.settings = settings
        self.key_prefix = key_prefix
        self.io = block_io
        self.block_bytes = block_io.block_bytes
        pin = block_io.device.type == "cuda"
        self.pool = torch.empty((dram_slots, self.block_bytes), dtype=torch.uint8, pin_memory=pin)
        self.pool_address = self.pool.data_ptr()
        self.files = BlockFiles(ssd_root, self.block_bytes) if ssd_root is not None else None
        self.store = store
        if store is not None:
            store.register(self.pool_address, self.pool.numel())
        # slot -> hash of the block it validly holds (None: empty or invalid)
        self._content: list[bytes | None] = [None] * dram_slots
        self._jobs: queue.Queue[tuple[Sequence[Op], torch.Tensor | None,
                                      threading.Event | None] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._finished: set[str] = set()
        self._failed_blocks: set[int] = set()
        self.stats = WorkerStats()
        self._thread = threading.Thread(target=self._run, name="xllm-kvstore-io", daemon=True)
        self._thread.start()

    # --- engine thread --------------------------------------------------------------------------

    def load_now(self, plan: StepPlan) -> None:
        """Synchronous loads: run the plan's load ops (after everything queued before
        them) and return when they are done, before the step's forward pass."""
        if plan.load_ops_end == 0:
            return
        done = threading.Event()
        self._jobs.put((plan.ops[:plan.load_ops_end], None, done))
        done.wait()

    def submit(self, plan: StepPlan, loads_done: bool = False) -> None:
        """Gather this step's completed blocks now; queue the rest of the plan
        (without its loads if ``load_now`` already ran them)."""
        ops = plan.ops[plan.load_ops_end:] if loads_done else plan.ops
        if not ops:
            return
        staging = None
        if plan.save_block_ids:
            staging = torch.empty((len(plan.save_block_ids), self.block_bytes), dtype=torch.uint8,
                                  pin_memory=self.io.device.type == "cuda")
            self.io.gather(plan.save_block_ids, staging)
            self.io.sync()
        self._jobs.put((ops, staging, None))

    def finished_loads(self) -> set[str]:
        with self._lock:
            done, self._finished = self._finished, set()
        return done

    def failed_block_ids(self) -> set[int]:
        with self._lock:
            failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def shutdown(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)
        if self.files is not None:
            self.files.clear()
            try:
                self.files.root.rmdir()
            except OSError:
                pass
        if self.store is not None:
            self.store.close()

    # --- I/O thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            ops, staging, done = job
            began = time.perf_counter()
            try:
                self._execute(ops, staging)
            except Exception:  # noqa: BLE001 (the engine must keep running)
                log.exception("xllm kv_store: a step's I/O failed")
            finally:
                if done is not None:
                    done.set()
            self.stats.io_s += time.perf_counter() - began

    def _key(self, h: bytes) -> str:
        return block_key(self.key_prefix, h)

    def _slot_address(self, slot: int) -> int:
        return self.pool_address + slot * self.block_bytes

    def _execute(self, ops: Sequence[Op], staging: torch.Tensor | None) -> None:
        i = 0
        while i < len(ops):
            kind = ops[i][0]
            if kind in (PUT, FILL_STORE):  # batch consecutive store ops into one call
                j = i
                while j < len(ops) and ops[j][0] == kind:
                    j += 1
                (self._put if kind == PUT else self._fill_from_store)(ops[i:j])
                i = j
                continue
            op = ops[i]
            if kind == SAVE:
                _, row, slot, h = op
                assert staging is not None
                self.pool[slot].copy_(staging[row])
                self._content[slot] = h
                self.stats.saved += 1
            elif kind == DEMOTE:
                _, slot, h = op
                if self.files is not None and self._content[slot] == h:
                    if self.files.write(self._key(h).replace("/", "_"), self._slot_address(slot)):
                        self.stats.demoted += 1
            elif kind == SSD_DROP:
                if self.files is not None:
                    self.files.drop(self._key(op[1]).replace("/", "_"))
            elif kind == FILL_SSD:
                _, slot, h = op
                ok = (self.files is not None
                      and self.files.read(self._key(h).replace("/", "_"), self._slot_address(slot)))
                self._content[slot] = h if ok else None
                if ok:
                    self.stats.filled["ssd"] += 1
            elif kind == SCATTER:
                self._scatter(op[1], op[2], op[3])
            elif kind == RESET:
                self._content = [None] * len(self._content)
                if self.files is not None:
                    self.files.clear()
            i += 1

    def _put(self, ops: Sequence[Op]) -> None:
        if self.store is None:
            return
        valid = [(slot, h) for _, slot, h in ops if self._content[slot] == h]
        if not valid:
            return
        results = self.store.put([self._key(h) for _, h in valid],
                                 [self._slot_address(slot) for slot, _ in valid], self.block_bytes)
        ok = sum(results)
        self.stats.put += ok
        self.stats.put_failed += len(results) - ok

    def _fill_from_store(self, ops: Sequence[Op]) -> None:
        slots = [slot for _, slot, _ in ops]
        if self.store is None:
            for slot in slots:
                self._content[slot] = None
            return
        results = self.store.get([self._key(h) for _, _, h in ops],
                                 [self._slot_address(s) for s in slots], self.block_bytes)
        for (_, slot, h), ok in zip(ops, results):
            self._content[slot] = h if ok else None
            if ok:
                self.stats.filled["store"] += 1

    def _scatter(self, req_id: str, targets: Sequence[tuple[int, int, bytes]],
                 report: bool) -> None:
        good_slots, good_blocks, failed = [], [], []
        for slot, block_id, h in targets:
            if slot >= 0 and self._content[slot] == h:
                good_slots.append(slot)
                good_blocks.append(block_id)
            else:
                failed.append(block_id)
        if good_blocks:
            rows = self.pool[torch.tensor(good_slots, dtype=torch.long)]
            self.io.scatter(rows, good_blocks)
            self.io.sync()
        self.stats.scattered += len(good_blocks)
        self.stats.load_failed += len(failed)
        with self._lock:
            self._failed_blocks.update(failed)
            if report:  # an asynchronous load: vLLM waits for this request id
                self._finished.add(req_id)


def ssd_root_for(settings: KVStoreConfig, rank: int) -> Path | None:
    """This worker's own SSD directory (one per process, emptied on start and exit)."""
    if settings.ssd_mb <= 0 or not settings.ssd_dir:
        return None
    root = Path(settings.ssd_dir) / f"{settings.namespace}-{os.getpid()}-rank{rank}"
    return root
