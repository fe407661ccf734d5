"""Expert load statistics and a dynamic EPLB policy (paper §4.4.2).

- ``capture``: per-layer expert counters fed by ``BaseRouter.set_capture_fn``,
  with a sliding window in steps (torch, graph-safe);
- ``loader``: ``--load-format xllm`` installs them before compilation;
- ``worker``: worker extension to read/reset them and select the policy;
- ``placement`` / ``policy``: pure decision code (where replicas go, when to move);
- ``eplb_policy``: the same decision as a vLLM EPLB policy class (GPU deployments);
- ``swap``: a double-buffered expert-weight swap for GPU ranks.
"""
