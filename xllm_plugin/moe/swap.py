"""Double-buffered expert-weight swap: stage a whole new placement, switch when every rank is ready.

A new placement (physical-to-logical map, see ``placement.py``) changes some
slots of some layers. Serving continues on the old weights while the weights a
rank will need are staged in spare buffers, sized for the changed slots only:
local copies for experts the rank already holds, point-to-point receives for
the others (every rank sends what its old slots hold to whoever needs it).
When the local copies and transfers have completed, a rank reports ready;
``ready()`` is true only once *every* rank is (an all-reduce of the flags), and
``commit()`` then writes the staged slots into the live weight tensors in
place. In-place means the tensors keep their addresses, so captured CUDA graphs
stay valid; the switch is one ``index_copy_`` per weight tensor, after which the
caller publishes the new map (``EplbState.update_mapping``).

The transfer plan is pure and identical on every rank (``plan_transfers``), so
sends and receives pair up in the same order everywhere. Exercised here on CPU
tensors (one rank, and two ranks over gloo in the tests) and on one GPU with local
copies only (``benchmarks/eplb_swap_gpu.py``); the NCCL path between GPUs, where
vLLM's EPLB runs, has not run in this project.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Transfer:
    """Slot ``dst_slot`` of ``dst_rank`` gets ``expert`` from slot ``src_slot`` of ``src_rank``."""

    layer: int
    expert: int
    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int


def plan_transfers(old_map: np.ndarray, new_map: np.ndarray, num_ranks: int) -> list[Transfer]:
    """Every changed slot, with its source: a local slot if the rank holds the expert,
    else the holder that has sent least so far (spreads the outgoing traffic)."""
    old_map, new_map = np.asarray(old_map), np.asarray(new_map)
    if old_map.shape != new_map.shape or old_map.shape[1] % num_ranks:
        raise ValueError(f"maps {old_map.shape} and {new_map.shape} do not fit {num_ranks} ranks")
    per_rank = old_map.shape[1] // num_ranks
    plan: list[Transfer] = []
    for layer in range(old_map.shape[0]):
        sends: Counter[int] = Counter()
        for slot in np.flatnonzero(old_map[layer] != new_map[layer]):
            expert = int(new_map[layer, slot])
            dst_rank = int(slot) // per_rank
            holders = [int(s) for s in np.flatnonzero(old_map[layer] == expert)]
            if not holders:
                raise ValueError(f"layer {layer}: expert {expert} is on no slot of the old map")
            local = [s for s in holders if s // per_rank == dst_rank]
            source = local[0] if local else min(holders, key=lambda s: (sends[s // per_rank], s))
            sends[source // per_rank] += 0 if local else 1
            plan.append(Transfer(layer, expert, source // per_rank, source % per_rank,
                                 dst_rank, int(slot) % per_rank))
    return plan


class DoubleBufferedExpertSwap:
    """Stage, wait for all ranks, commit. ``expert_weights[layer]`` lists the layer's
    weight tensors, each ``[local_slots, ...]`` (vLLM's ``model.expert_weights``)."""

    def __init__(self, expert_weights: Sequence[Sequence[torch.Tensor]], rank: int = 0,
                 num_ranks: int = 1, group: Any = None, cpu_group: Any = None) -> None:
        self.expert_weights = expert_weights
        self.rank = rank
        self.num_ranks = num_ranks
        self.group = group
        self.cpu_group = cpu_group if cpu_group is not None else group
        self._staged: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
        self._commit_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._requests: list[Any] = []
        self._ops: list[Any] = []
        self._event: Any = None
        self.plan: list[Transfer] = []

    @property
    def staged_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for _, bufs in self._staged.values() for b in bufs)

    def stage(self, old_map: np.ndarray, new_map: np.ndarray) -> int:
        """Start copying what this rank needs into spare buffers; returns slots staged here."""
        self.plan = plan_transfers(old_map, new_map, self.num_ranks)
        self._staged, ops = {}, []
        mine_by_layer: dict[int, list[Transfer]] = {}
        for t in self.plan:
            if t.dst_rank == self.rank:
                mine_by_layer.setdefault(t.layer, []).append(t)
        buffers: dict[int, list[torch.Tensor]] = {}
        for layer, mine in mine_by_layer.items():
            weights = self.expert_weights[layer]
            buffers[layer] = [w.new_empty((len(mine), *w.shape[1:])) for w in weights]
            self._staged[layer] = ([t.dst_slot for t in mine], buffers[layer])
        index = {layer: {t: i for i, t in enumerate(mine)} for layer, mine in mine_by_layer.items()}
        local_dst: list[torch.Tensor] = []
        local_src: list[torch.Tensor] = []
        for t in self.plan:  # same order on every rank: sends and receives pair up
            weights = self.expert_weights[t.layer]
            if t.dst_rank == self.rank and t.src_rank == self.rank:
                i = index[t.layer][t]
                for buffer, weight in zip(buffers[t.layer], weights):
                    local_dst.append(buffer[i])
                    local_src.append(weight[t.src_slot])
            elif t.dst_rank == self.rank:
                i = index[t.layer][t]
                ops += [torch.distributed.P2POp(torch.distributed.irecv, buffer[i],
                                                self._global(t.src_rank), self.group)
                        for buffer in buffers[t.layer]]
            elif t.src_rank == self.rank:
                ops += [torch.distributed.P2POp(torch.distributed.isend,
                                                weight[t.src_slot].contiguous(),
                                                self._global(t.dst_rank), self.group)
                        for weight in weights]
        _copy_all(local_dst, local_src)
        # The commit's copy pairs, built now: the commit is the serving pause, and building
        # a few thousand views in Python there took about as long as the copy itself.
        self._commit_pairs = ([w[slot] for layer, (slots, _) in self._staged.items()
                               for w in self.expert_weights[layer] for slot in slots],
                              [row for _, bufs in self._staged.values() for b in bufs
                               for row in b])
        self._ops = ops  # keeps send tensors alive until the transfers complete
        self._requests = torch.distributed.batch_isend_irecv(ops) if ops else []
        if torch.cuda.is_available() and any(w[0].is_cuda for w in self.expert_weights):
            self._event = torch.cuda.Event()
            self._event.record()
        return sum(len(slots) for slots, _ in self._staged.values())

    def _global(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return torch.distributed.get_global_rank(self.group, group_rank)

    def locally_ready(self) -> bool:
        if self._event is None:
            # CPU tensors (gloo): its point-to-point work reports completion only through
            # wait(), and there is no device to overlap with anyway.
            for request in self._requests:
                request.wait()
            self._requests = []  # gloo work must not be waited on twice
            return True
        return all(request.is_completed() for request in self._requests) and self._event.query()

    def ready(self) -> bool:
        """True once every rank has staged its slots (collective: call on all ranks)."""
        flag = torch.tensor([1 if self.locally_ready() else 0], dtype=torch.int32)
        if self.num_ranks > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN,
                                         group=self.cpu_group)
        return bool(flag.item())

    def commit(self) -> None:
        """Switch: write the staged slots into the live weights, in place; drop the buffers."""
        for request in self._requests:
            request.wait()
        stream = None
        if self._event is not None:  # staged on the GPU, perhaps on another stream
            stream = torch.cuda.current_stream()
            stream.wait_event(self._event)
        _copy_all(*self._commit_pairs)
        if stream is not None:  # the allocator must not reuse the buffers before the copy ran
            for _, buffers in self._staged.values():
                for buffer in buffers:
                    buffer.record_stream(stream)
        self._commit_pairs = ([], [])
        self._staged, self._requests, self._ops, self._event = {}, [], [], None


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for all i, on a GPU in few multi-tensor kernels. One
    ``copy_`` per slot and tensor was launch-bound: 3,612 copies took 105 ms to issue on
    an H200 host (first run of ``benchmarks/eplb_swap_gpu.py``)."""
    if dst:
        torch._foreach_copy_(dst, src)
