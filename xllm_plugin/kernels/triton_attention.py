"""Triton attention over xTensor's contiguous per-request K/V (GPU), with a paged twin.

``contiguous_attention`` reads request ``i``'s keys at ``K[slot_ids[i], t]``: the K/V
tensors are the xTensor plane views ``[slots, max_tokens, kv_heads, head_size]`` whose
slots are evenly spaced in virtual memory, so the address of token ``t`` is one
multiply-add, with no block-table load in the inner loop. ``paged_attention`` is the
same kernel with the address taken through a block table over
``[pages, page_tokens, kv_heads, head_size]``; the GPU benchmark compares the two at
identical sizes, so the difference is the block table and nothing else.

One program handles one request, one KV head and a tile of its queries; the tile's
rows are (query token, query head of the group) pairs, so GQA loads each K/V tile once
for the whole group. Causality is bottom-right aligned (the query chunk ends the
sequence), which covers decode, chunked prefill and prefix-cache hits.

Decode can split each request's keys over ``num_splits`` programs (flash-decoding): a
batch of a few requests has too few (request, KV head) programs to keep a GPU's SMs
busy, so each split keeps its own softmax state and a second kernel merges them.

Runs on CUDA; the unit tests also run it on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _attention_kernel(
    Q, K, V, O, slot_ids, block_table, query_start_loc, seq_lens, scale,
    split_acc, split_max, split_sum,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_ks, stride_kt, stride_kh, stride_vs, stride_vt, stride_vh, stride_bt,
    page_tokens, num_heads,
    GROUP: tl.constexpr, TOKENS_PER_TILE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD: tl.constexpr, HEAD_SIZE: tl.constexpr, PAGED: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    m_block = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS
    q_start = tl.load(query_start_loc + row)
    q_len = tl.load(query_start_loc + row + 1) - q_start
    first_token = m_block * TOKENS_PER_TILE
    if first_token >= q_len:
        return
    kv_len = tl.load(seq_lens + row)

    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD)
    token = first_token + offs_r // GROUP
    head = kv_head * GROUP + offs_r % GROUP
    r_valid = (offs_r < TOKENS_PER_TILE * GROUP) & (token < q_len)
    d_valid = offs_d < HEAD_SIZE
    q = tl.load(Q + (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh
                + offs_d[None, :], mask=r_valid[:, None] & d_valid[None, :], other=0.0)
    q_pos = kv_len - q_len + token  # absolute position of each query row
    last = tl.minimum(q_len, first_token + TOKENS_PER_TILE)
    hi = kv_len - q_len + last  # keys beyond the tile's last query are masked anyway
    lo = 0
    if NUM_SPLITS > 1:  # decode only: every key is visible to the one query
        chunk = tl.cdiv(tl.cdiv(kv_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(hi, lo + chunk)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD], dtype=tl.float32)
    if not PAGED:
        slot = tl.load(slot_ids + row).to(tl.int64)
        k_base = K + slot * stride_ks + kv_head * stride_kh
        v_base = V + slot * stride_vs + kv_head * stride_vh
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < hi
        if PAGED:
            page = tl.load(block_table + row * stride_bt + offs_n // page_tokens,
                           mask=n_valid, other=0).to(tl.int64)
            within = (offs_n % page_tokens).to(tl.int64)
            k_ptrs = K + page[:, None] * stride_ks + within[:, None] * stride_kt \
                + kv_head * stride_kh + offs_d[None, :]
            v_ptrs = V + page[:, None] * stride_vs + within[:, None] * stride_vt \
                + kv_head * stride_vh + offs_d[None, :]
        else:
            k_ptrs = k_base + offs_n.to(tl.int64)[:, None] * stride_kt + offs_d[None, :]
            v_ptrs = v_base + offs_n.to(tl.int64)[:, None] * stride_vt + offs_d[None, :]
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where((offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    out_mask = r_valid[:, None] & d_valid[None, :]
    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(O + (q_start + token)[:, None] * stride_ot + head[:, None] * stride_oh
                 + offs_d[None, :], out.to(O.dtype.element_ty), mask=out_mask)
    else:  # this split's unnormalised state, merged by _merge_splits_kernel
        state = ((q_start + token) * num_heads + head) * NUM_SPLITS + split
        tl.store(split_max + state, m_i, mask=r_valid)
        tl.store(split_sum + state, l_i, mask=r_valid)
        tl.store(split_acc + state[:, None] * HEAD + offs_d[None, :], acc, mask=out_mask)


@triton.jit
def _merge_splits_kernel(O, split_acc, split_max, split_sum, stride_ot, stride_oh, num_heads,
                         NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, HEAD: tl.constexpr,
                         HEAD_SIZE: tl.constexpr):
    """One program per (query token, head): rescale each split's state to a common max."""
    token = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, HEAD)
    s_valid = offs_s < NUM_SPLITS
    state = (token * num_heads + head) * NUM_SPLITS + offs_s
    m = tl.load(split_max + state, mask=s_valid, other=float("-inf"))
    total = tl.load(split_sum + state, mask=s_valid, other=0.0)
    acc = tl.load(split_acc + state[:, None] * HEAD + offs_d[None, :],
                  mask=s_valid[:, None], other=0.0)
    weight = tl.exp(m - tl.max(m, 0))  # empty splits (m = -inf) weigh 0
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(total * weight, 0)
    tl.store(O + token * stride_ot + head * stride_oh + offs_d, out.to(O.dtype.element_ty),
             mask=offs_d < HEAD_SIZE)


def _launch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor,
            slot_ids: torch.Tensor | None, block_table: torch.Tensor | None,
            query_start_loc: torch.Tensor, seq_lens: torch.Tensor, max_query_len: int,
            scale: float, page_tokens: int, block_m: int, block_n: int,
            num_splits: int) -> torch.Tensor:
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads = key.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if key.stride(3) != 1 or value.stride(3) != 1 or query.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError("the head dimension must be contiguous")
    if num_splits < 1 or (num_splits > 1 and max_query_len != 1):
        raise ValueError(f"num_splits={num_splits}: splitting the keys is for decode "
                         "(max_query_len 1) and needs at least one split")
    group = num_heads // num_kv_heads
    block_m = max(block_m, triton.next_power_of_2(group), 16)
    tokens_per_tile = block_m // group
    num_rows = seq_lens.shape[0]
    grid = (num_rows, num_kv_heads, triton.cdiv(max_query_len, tokens_per_tile) * num_splits)
    paged = block_table is not None
    head = max(16, triton.next_power_of_2(head_size))
    dummy = seq_lens
    if num_splits > 1:
        split_acc = torch.empty(num_tokens, num_heads, num_splits, head, device=query.device,
                                dtype=torch.float32)
        split_max = torch.empty(num_tokens, num_heads, num_splits, device=query.device,
                                dtype=torch.float32)
        split_sum = torch.empty_like(split_max)
    else:
        split_acc = split_max = split_sum = dummy
    _attention_kernel[grid](
        query, key, value, out,
        dummy if paged else slot_ids, block_table if paged else dummy,
        query_start_loc, seq_lens, scale, split_acc, split_max, split_sum,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        block_table.stride(0) if paged else 0, page_tokens, num_heads,
        GROUP=group, TOKENS_PER_TILE=tokens_per_tile, BLOCK_M=block_m, BLOCK_N=block_n,
        HEAD=head, HEAD_SIZE=head_size, PAGED=paged, NUM_SPLITS=num_splits,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out, split_acc, split_max, split_sum, out.stride(0), out.stride(1), num_heads,
            NUM_SPLITS=num_splits, SPLITS_P2=triton.next_power_of_2(num_splits), HEAD=head,
            HEAD_SIZE=head_size)
    return out


def contiguous_attention(query: torch.Tensor, key_slots: torch.Tensor, value_slots: torch.Tensor,
                         slot_ids: torch.Tensor, query_start_loc: torch.Tensor,
                         seq_lens: torch.Tensor, max_query_len: int, scale: float,
                         out: torch.Tensor | None = None, block_m: int = 16,
                         block_n: int = 64, num_splits: int = 1) -> torch.Tensor:
    """Attention over contiguous per-request K/V, no block table.

    ``query/out``: ``[tokens, Hq, D]``; ``key_slots/value_slots``: ``[slots, max_tokens,
    Hkv, D]`` (any slot/token strides); row ``i`` uses slot ``slot_ids[i]``, queries
    ``query_start_loc[i]:[i+1]`` and the first ``seq_lens[i]`` tokens of its slot.
    ``num_splits > 1`` (decode only) spreads each request's keys over that many programs.
    """
    out = torch.empty_like(query) if out is None else out
    return _launch(query, key_slots, value_slots, out, slot_ids, None, query_start_loc,
                   seq_lens, max_query_len, scale, 1, block_m, block_n, num_splits)


def paged_attention(query: torch.Tensor, key_pages: torch.Tensor, value_pages: torch.Tensor,
                    block_table: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, max_query_len: int, scale: float,
                    out: torch.Tensor | None = None, block_m: int = 16,
                    block_n: int = 64, num_splits: int = 1) -> torch.Tensor:
    """The same kernel reading ``[pages, page_tokens, Hkv, D]`` through ``block_table``
    (the baseline the contiguous kernel is measured against)."""
    out = torch.empty_like(query) if out is None else out
    page_tokens = key_pages.shape[1]
    if block_n > page_tokens and block_n % page_tokens:
        raise ValueError("block_n must divide into whole pages")
    return _launch(query, key_pages, value_pages, out, None, block_table, query_start_loc,
                   seq_lens, max_query_len, scale, page_tokens, block_m, block_n, num_splits)
