"""Attention on CPU over each request's contiguous K/V: PyTorch SDPA with GQA, no block table.

Each request's keys and values arrive as plain ``[tokens, kv_heads, head_size]`` tensors
(slices of its xTensor view), so attention is one ``scaled_dot_product_attention`` call
per request; nothing gathers pages or follows a block table.

Causality is bottom-right aligned: a query chunk of ``q_len`` tokens is the *last*
``q_len`` positions of a sequence of ``kv_len`` tokens (chunked prefill and prefix-cache
hits have ``q_len < kv_len``), so query ``i`` sees keys ``0 .. kv_len - q_len + i``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _lower_right(q_len: int, kv_len: int) -> torch.Tensor:
    """Boolean mask (True = attend) of a query chunk that ends the sequence."""
    rows = torch.arange(q_len).unsqueeze(1) + (kv_len - q_len)
    return torch.arange(kv_len).unsqueeze(0) <= rows


def attend_one(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
               out: torch.Tensor) -> None:
    """Causal attention of ``query [q_len, Hq, D]`` over ``key/value [kv_len, Hkv, D]``.

    Writes ``out [q_len, Hq, D]``. ``Hq`` must be a multiple of ``Hkv`` (GQA).
    """
    q_len, num_heads, head_size = query.shape
    kv_len, num_kv_heads, _ = key.shape
    k = key.transpose(0, 1).unsqueeze(0)  # [1, Hkv, kv_len, D], a view
    v = value.transpose(0, 1).unsqueeze(0)
    if q_len == 1:
        # Decode: the group's query heads share keys and need no mask, so fold them into
        # the query length instead of letting SDPA expand K/V per query head.
        group = num_heads // num_kv_heads
        q = query.view(num_kv_heads, group, head_size).unsqueeze(0)
        result = F.scaled_dot_product_attention(q, k, v, scale=scale)
        out.copy_(result.view(1, num_heads, head_size))
        return
    q = query.transpose(0, 1).unsqueeze(0)  # [1, Hq, q_len, D]
    if q_len == kv_len:
        result = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                enable_gqa=num_heads != num_kv_heads)
    else:
        result = F.scaled_dot_product_attention(q, k, v, attn_mask=_lower_right(q_len, kv_len),
                                                scale=scale,
                                                enable_gqa=num_heads != num_kv_heads)
    out.copy_(result[0].transpose(0, 1))


def attend_rows(query: torch.Tensor, out: torch.Tensor, query_start_loc: Sequence[int],
                keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                scale: float) -> None:
    """Attention for a batch: row ``i`` owns queries ``query_start_loc[i]:[i+1]`` and KV
    ``keys[i]``/``values[i]`` (each ``[kv_len_i, Hkv, D]``, contiguous per token)."""
    for i, (key, value) in enumerate(zip(keys, values, strict=True)):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        if end > start:
            attend_one(query[start:end], key, value, scale, out[start:end])


def reference_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Plain float64 causal attention (bottom-right), for tests."""
    q_len, num_heads, _ = query.shape
    kv_len, num_kv_heads, _ = key.shape
    repeat = num_heads // num_kv_heads
    k = key.double().repeat_interleave(repeat, dim=1).transpose(0, 1)
    v = value.double().repeat_interleave(repeat, dim=1).transpose(0, 1)
    q = query.double().transpose(0, 1)
    scores = q @ k.transpose(1, 2) * scale
    offset = kv_len - q_len
    mask = torch.arange(kv_len)[None, :] > (torch.arange(q_len)[:, None] + offset)
    scores.masked_fill_(mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).to(query.dtype)
