"""Double-buffered expert swap: the transfer plan, and stage/ready/commit on CPU ranks."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xllm_plugin.moe.placement import initial_placement, place
from xllm_plugin.moe.swap import DoubleBufferedExpertSwap, plan_transfers

LOAD = np.array([9, 9, 48, 6, 48, 29, 26, 11], dtype=float)
OLD = np.stack([initial_placement(8, 12), initial_placement(8, 12)])
NEW = np.stack([place(LOAD, 12, 4, OLD[0]), place(LOAD[::-1], 12, 4, OLD[1])])


def _weights(phy2log: np.ndarray, rank: int, ranks: int) -> list[list[torch.Tensor]]:
    """Per layer two tensors whose rows say which expert they hold (value = expert id)."""
    per_rank = phy2log.shape[1] // ranks
    out = []
    for layer in range(phy2log.shape[0]):
        ids = torch.tensor(phy2log[layer, rank * per_rank:(rank + 1) * per_rank], dtype=torch.float32)
        out.append([ids[:, None].repeat(1, 3).clone(), (10 * ids)[:, None].repeat(1, 2).clone()])
    return out


def _held(weights: list[list[torch.Tensor]]) -> np.ndarray:
    return np.stack([w[0][:, 0].numpy().astype(int) for w in weights])


def test_plan_moves_each_changed_slot_once_from_a_holder_preferring_local_copies() -> None:
    plan = plan_transfers(OLD, NEW, 4)
    changed = {(layer, slot) for layer in range(2) for slot in np.flatnonzero(OLD[layer] != NEW[layer])}
    assert {(t.layer, t.dst_rank * 3 + t.dst_slot) for t in plan} == changed
    assert len(plan) == len(changed)
    for t in plan:
        assert OLD[t.layer, t.src_rank * 3 + t.src_slot] == t.expert == NEW[t.layer, t.dst_rank * 3 + t.dst_slot]
        if t.src_rank != t.dst_rank:  # remote only when the destination rank lacks the expert
            assert t.expert not in OLD[t.layer, t.dst_rank * 3:(t.dst_rank + 1) * 3]


def test_single_rank_serves_old_weights_until_commit_then_the_new_placement() -> None:
    old, new = OLD.reshape(2, 12), NEW.reshape(2, 12)
    weights = _weights(old, 0, 1)
    swap = DoubleBufferedExpertSwap(weights)
    staged = swap.stage(old, new)
    assert staged == int((old != new).sum())
    assert swap.staged_bytes > 0
    np.testing.assert_array_equal(_held(weights), old)  # still serving the old placement
    assert swap.ready()
    swap.commit()
    np.testing.assert_array_equal(_held(weights), new)
    assert torch.equal(weights[0][1][:, 0], 10 * weights[0][0][:, 0])  # every tensor moved


def _two_rank_worker(rank: int, port: int, queue) -> None:  # type: ignore[no-untyped-def]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    old = np.stack([initial_placement(8, 10)] * 2)
    new = np.stack([place(LOAD, 10, 2, old[0]), place(LOAD[::-1], 10, 2, old[1])])
    weights = _weights(old, rank, 2)
    flags = dist.new_group(backend="gloo")  # readiness votes on their own group, as vLLM's cpu_group
    swap = DoubleBufferedExpertSwap(weights, rank=rank, num_ranks=2, group=dist.group.WORLD,
                                    cpu_group=flags)
    swap.stage(old, new)
    before = _held(weights).tolist()
    while not swap.ready():
        pass
    swap.commit()
    queue.put((rank, before, _held(weights).tolist(), new[:, rank * 5:(rank + 1) * 5].tolist(),
               old[:, rank * 5:(rank + 1) * 5].tolist()))
    dist.destroy_process_group()


def test_two_ranks_exchange_experts_over_gloo_and_switch_together() -> None:
    from xllm_plugin.launcher.engine import free_port

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = free_port()
    processes = [context.Process(target=_two_rank_worker, args=(rank, port, queue))
                 for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    results = [queue.get() for _ in range(2)]
    for _rank, before, after, expected, old in results:
        assert before == old  # nothing switched before every rank was ready
        assert after == expected


def test_gpu_swap_benchmark_smoke_runs_the_swap_end_to_end() -> None:
    """``benchmarks/eplb_swap_gpu.py --smoke``: placements from the policy, staged and
    committed swap, and the step reading the old experts before and the new ones after."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "benchmarks/eplb_swap_gpu.py", "--smoke"], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout[done.stdout.index("{"):])
    assert result["slots_changed"] > 0 and result["slots_staged"] == result["slots_changed"]
    assert result["step_read_old_experts_before"] == 1
    assert result["slots_hold_new_experts"] == 1 and result["step_reads_new_experts"] == 1
    assert (result["imbalance_new_placement_on_new_load"]
            < result["imbalance_old_placement_on_new_load"])
