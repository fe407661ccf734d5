"""Per-layer expert-load counters fed by vLLM's router capture hook (``BaseRouter.set_capture_fn``).

vLLM's MoE routers call ``capture_fn(topk_ids)`` with the *logical* expert ids
of every routed token, before any EPLB mapping. ``ExpertLoadRecorder`` turns
those calls into counts with tensor operations only (no host sync, no Python
state that changes per call), so the same hook works in eager mode and under
``torch.compile`` (both checked on CPU: exact counts) and is written to be
captured in CUDA graphs (untested: no GPU here), provided it is installed
before the model is compiled: a hook installed later is not part of the
compiled graph and sees nothing. The plugin's model loader (``--load-format xllm``) installs
it right after the weights load, before warm-up and compilation.

Counts live in two tensors on the model's device:

- ``total[layer, expert]``: tokens routed since the last reset;
- ``ring[slot, layer, expert]``: the last ``window_steps`` forward passes, one
  slot per pass (the first MoE layer of a pass advances the slot), i.e. a
  sliding window in steps.

Warm-up and profiling passes route dummy tokens too; reset after start-up.
On GPUs with CUDA-graph padding the padded rows are counted as well.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

RECORDER_ATTR = "_xllm_expert_load"


class ExpertLoadRecorder:
    def __init__(self, layer_ids: list[int], num_experts: int, window_steps: int,
                 device: torch.device | str) -> None:
        self.layer_ids = list(layer_ids)
        self.num_experts = num_experts
        self.window_steps = window_steps
        layers = len(layer_ids)
        self.total = torch.zeros(layers, num_experts, dtype=torch.int64, device=device)
        self.ring = torch.zeros(window_steps, layers, num_experts, dtype=torch.int64,
                                device=device)
        self.steps = torch.zeros(1, dtype=torch.int64, device=device)
        self._slot_stride = layers * num_experts

    def record(self, row: int, topk_ids: torch.Tensor) -> None:
        """Count one layer's routing; ``row`` is bound per layer at install time."""
        ids = topk_ids.reshape(-1).to(torch.int64)
        ones = torch.ones_like(ids)
        if row == 0:  # static per layer: resolved when traced, not per call
            self.steps.add_(1)
            slot = torch.remainder(self.steps, self.window_steps)
            self.ring.index_fill_(0, slot, 0)
        slot = torch.remainder(self.steps, self.window_steps)
        flat = self.ring.view(-1)
        flat.index_add_(0, slot * self._slot_stride + row * self.num_experts + ids, ones)
        self.total[row].index_add_(0, ids, ones)

    def reset(self) -> None:
        self.total.zero_()
        self.ring.zero_()
        self.steps.zero_()

    def snapshot(self) -> dict[str, Any]:
        """Host copy: counts since reset, the sliding window, and the passes seen."""
        steps = int(self.steps.item())
        return {
            "layer_ids": self.layer_ids,
            "num_experts": self.num_experts,
            "window_steps": self.window_steps,
            "steps": steps,
            "total": self.total.cpu().tolist(),
            "window": self.ring.sum(dim=0).cpu().tolist(),
            "window_filled_steps": min(steps, self.window_steps),
        }


def moe_routers(model: torch.nn.Module) -> list[tuple[int, Any]]:
    """(layer index, router) of every MoE layer whose router supports capture, in layer order."""
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    found: dict[int, tuple[int, Any]] = {}
    for name, module in model.named_modules():
        router = getattr(module, "router", None)
        if not isinstance(router, BaseRouter) or id(router) in found:
            continue
        layer_id = _layer_index(module, name)
        found[id(router)] = (layer_id, router)
    return sorted(found.values(), key=lambda item: item[0])


def _layer_index(module: Any, name: str) -> int:
    try:
        return int(module.layer_id)
    except Exception:  # noqa: BLE001 - fall back to the module path
        digits = [int(part) for part in name.split(".") if part.isdigit()]
        return digits[0] if digits else 0


def install_recorder(model: torch.nn.Module, window_steps: int) -> ExpertLoadRecorder | None:
    """Attach an ``ExpertLoadRecorder`` to every MoE router of ``model``; None if it has none."""
    routers = moe_routers(model)
    if not routers:
        return None
    num_experts = int(routers[0][1].global_num_experts)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    recorder = ExpertLoadRecorder([layer for layer, _ in routers], num_experts, window_steps,
                                  device)
    for row, (_, router) in enumerate(routers):
        router.set_capture_fn(partial(recorder.record, row))
    setattr(model, RECORDER_ATTR, recorder)
    return recorder


def recorder_of(model: torch.nn.Module) -> ExpertLoadRecorder | None:
    return getattr(model, RECORDER_ATTR, None)
