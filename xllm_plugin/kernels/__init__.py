"""Attention kernels over xTensor's contiguous per-request K/V (no block tables).

``cpu_attention``: PyTorch SDPA with GQA, one call per request. ``triton_attention``:
a Triton kernel for GPUs (and its block-table twin, the baseline it is measured
against). Imported by module so that neither pulls in the other's dependencies.
"""
