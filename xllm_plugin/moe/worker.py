"""Worker extension: read and reset expert-load statistics, select the xLLM EPLB policy.

Enable with ``--worker-extension-cls xllm_plugin.moe.worker.MoEStatsExtension``;
vLLM mixes these methods into its worker class, and callers reach them with
``collective_rpc`` (``LLM.collective_rpc(...)`` in Python, or
``POST /collective_rpc`` when the server runs with ``VLLM_SERVER_DEV_MODE=1``).
The counters themselves are installed at load time by ``--load-format xllm``.
"""

from __future__ import annotations

from typing import Any


class MoEStatsExtension:
    """Methods added to vLLM's worker (names prefixed to avoid clashes)."""

    def _xllm_model(self) -> Any:
        runner = getattr(self, "model_runner", None)
        return runner.get_model() if runner is not None else None

    def xllm_moe_load(self) -> dict[str, Any] | None:
        """Per-layer expert counts: since reset (``total``) and over the sliding window."""
        from xllm_plugin.moe.capture import recorder_of

        model = self._xllm_model()
        recorder = recorder_of(model) if model is not None else None
        return recorder.snapshot() if recorder is not None else None

    def xllm_moe_reset(self) -> dict[str, bool]:
        """Zero the counters (after warm-up, or between benchmark phases)."""
        from xllm_plugin.moe.capture import recorder_of

        model = self._xllm_model()
        recorder = recorder_of(model) if model is not None else None
        if recorder is not None:
            recorder.reset()
        return {"reset": recorder is not None}

    def xllm_eplb_use_policy(self) -> str:
        """Make vLLM's EPLB use ``XLLMEplbPolicy`` (GPU deployments with ``--enable-eplb``).

        vLLM validates ``eplb_config.policy`` against its own names only, so the
        policy is selected in code, on every worker, after the model loaded.
        """
        from xllm_plugin.config import parse_xllm_config
        from xllm_plugin.moe.eplb_policy import XLLMEplbPolicy

        runner = getattr(self, "model_runner", None)
        state = getattr(runner, "eplb_state", None)
        if state is None:
            raise RuntimeError(
                "vLLM EPLB is not enabled on this worker (start with --enable-eplb; "
                "vLLM supports EPLB on CUDA, ROCm and XPU only)")
        XLLMEplbPolicy.configure(parse_xllm_config(self.vllm_config.additional_config).moe)
        state.policy = XLLMEplbPolicy
        return XLLMEplbPolicy.__name__

    def xllm_eplb_rebalance_now(self, timeout_s: str = "120") -> dict[str, Any]:
        """One drift-gated rebalance from the plugin's own load window, with the
        double-buffered swap: every rank stages, all switch together.

        GPU only (needs vLLM's EPLB state for redundant slots and maps); call on
        all workers at once (``collective_rpc``). Not run in this project (no GPU).
        """
        import time

        import torch
        from vllm.distributed.parallel_state import get_ep_group

        from xllm_plugin.config import parse_xllm_config
        from xllm_plugin.moe.capture import recorder_of
        from xllm_plugin.moe.eplb_policy import XLLMEplbPolicy
        from xllm_plugin.moe.swap import DoubleBufferedExpertSwap

        runner = getattr(self, "model_runner", None)
        state = getattr(runner, "eplb_state", None)
        recorder = recorder_of(runner.get_model()) if runner is not None else None
        if state is None or recorder is None:
            raise RuntimeError("needs --enable-eplb (GPU) and --load-format xllm")
        XLLMEplbPolicy.configure(parse_xllm_config(self.vllm_config.additional_config).moe)
        group = get_ep_group()
        load = recorder.ring.sum(dim=0).to(torch.float64).cpu()
        torch.distributed.all_reduce(load, group=group.cpu_group)  # every rank: global load
        model_state = next(iter(state.model_states.values()))
        old = model_state.physical_to_logical_map.cpu()
        new = XLLMEplbPolicy.rebalance_experts(load, old.shape[1], 1, 1, group.world_size, old)
        if torch.equal(new, old):
            return {"rebalanced": False}
        swap = DoubleBufferedExpertSwap(model_state.model.expert_weights,
                                        rank=group.rank_in_group, num_ranks=group.world_size,
                                        group=group.device_group, cpu_group=group.cpu_group)
        staged = swap.stage(old.numpy(), new.numpy())
        deadline = time.monotonic() + float(timeout_s)
        while not swap.ready():  # collective: every rank polls the same number of times
            if time.monotonic() > deadline:
                raise TimeoutError("ranks did not finish staging expert weights")
            time.sleep(0.001)
        swap.commit()
        state.update_mapping(self.vllm_config.model_config, new.to(old.device))
        return {"rebalanced": True, "slots_staged_here": staged,
                "layers": XLLMEplbPolicy.status()["last_rebalanced_layers"]}
