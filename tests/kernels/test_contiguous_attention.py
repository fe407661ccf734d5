"""Attention over contiguous per-request K/V (no block table) matches plain causal attention."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from xllm_plugin.kernels.cpu_attention import attend_rows, reference_attention

# (query tokens, KV tokens) per request: decode, full prefill, chunked prefill / prefix hit.
ROWS = [(1, 1), (1, 77), (9, 9), (7, 40), (64, 64), (33, 130)]


def _kernel_or_skip(force_isa: str | None) -> ctypes.CDLL:
    """The native decode kernel built for ``force_isa`` (None: this CPU's best), or a skip
    where there is no compiler or the CPU cannot run that path."""
    from xllm_plugin.kernels import native_decode

    lib = native_decode.load(force_isa)
    if lib is None:
        pytest.skip("no C compiler: the native decode kernel falls back to SDPA")
    if force_isa is not None and native_decode.isa(lib) != force_isa:
        pytest.skip(f"this CPU cannot run the {force_isa} path")
    return lib


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads", [(9, 3), (4, 4), (8, 1)])
def test_cpu_sdpa_matches_reference(dtype: torch.dtype, tol: float,
                                    heads: tuple[int, int]) -> None:
    torch.manual_seed(0)
    num_heads, num_kv_heads = heads
    qsl = [0]
    for q_len, _ in ROWS:
        qsl.append(qsl[-1] + q_len)
    query = torch.randn(qsl[-1], num_heads, 64, dtype=dtype)
    # Each request's KV is a slice of a bigger strided tensor, as an xTensor slot is.
    slots = torch.randn(len(ROWS), 160, num_kv_heads, 64, dtype=dtype)
    keys = [slots[i, :kv] for i, (_, kv) in enumerate(ROWS)]
    values = [slots.flip(0)[i, :kv] for i, (_, kv) in enumerate(ROWS)]
    out = torch.empty_like(query)
    attend_rows(query, out, qsl, keys, values, scale=0.125)
    for i in range(len(ROWS)):
        ref = reference_attention(query[qsl[i]:qsl[i + 1]], keys[i], values[i], 0.125)
        torch.testing.assert_close(out[qsl[i]:qsl[i + 1]], ref, atol=tol, rtol=tol)


_TRITON_CHECK = textwrap.dedent("""
    import torch
    from xllm_plugin.kernels.cpu_attention import reference_attention
    from xllm_plugin.kernels.triton_attention import contiguous_attention, paged_attention
    torch.manual_seed(0)
    rows = [(1, 37), (5, 5), (7, 40), (20, 70), (1, 1)]
    num_heads, num_kv_heads, head, slots, max_tokens, page = 6, 2, 64, 5, 96, 16
    ks = torch.randn(slots, max_tokens, num_kv_heads, head)
    vs = torch.randn(slots, max_tokens, num_kv_heads, head)
    slot_ids = torch.tensor([2, 0, 4, 1, 3], dtype=torch.int32)
    qsl = [0]
    for q, _ in rows:
        qsl.append(qsl[-1] + q)
    query = torch.randn(qsl[-1], num_heads, head)
    qsl_t = torch.tensor(qsl, dtype=torch.int32)
    lens = torch.tensor([kv for _, kv in rows], dtype=torch.int32)
    max_q = max(q for q, _ in rows)
    out = contiguous_attention(query, ks, vs, slot_ids, qsl_t, lens, max_q, 0.125)
    for i, (q, kv) in enumerate(rows):
        ref = reference_attention(query[qsl[i]:qsl[i + 1]], ks[slot_ids[i], :kv],
                                  vs[slot_ids[i], :kv], 0.125)
        torch.testing.assert_close(out[qsl[i]:qsl[i + 1]], ref, atol=1e-5, rtol=1e-5)
    # The paged twin on the same data scattered over shuffled pages gives the same result.
    per_row = max_tokens // page
    perm = torch.randperm(len(rows) * per_row)
    kp = torch.empty(len(rows) * per_row, page, num_kv_heads, head)
    vp = torch.empty_like(kp)
    table = torch.zeros(len(rows), per_row, dtype=torch.int32)
    for i in range(len(rows)):
        for j in range(per_row):
            p = perm[i * per_row + j]
            table[i, j] = p
            kp[p] = ks[slot_ids[i], j * page:(j + 1) * page]
            vp[p] = vs[slot_ids[i], j * page:(j + 1) * page]
    paged = paged_attention(query, kp, vp, table, qsl_t, lens, max_q, 0.125, block_n=32)
    torch.testing.assert_close(paged, out, atol=1e-5, rtol=1e-5)
    # Decode with the keys split over programs (flash-decoding), both ways: splits that
    # end mid-request, a request shorter than one split, and one split left empty.
    decode = [i for i, (q, _) in enumerate(rows) if q == 1] + [3]
    d_query = torch.randn(len(decode), num_heads, head)
    d_qsl = torch.arange(len(decode) + 1, dtype=torch.int32)
    d_lens = torch.tensor([37, 1, 70], dtype=torch.int32)
    d_slots = slot_ids[decode]
    for splits in (2, 3):
        got = contiguous_attention(d_query, ks, vs, d_slots, d_qsl, d_lens, 1, 0.125,
                                   block_n=16, num_splits=splits)
        got_paged = paged_attention(d_query, kp, vp, table[decode], d_qsl, d_lens, 1, 0.125,
                                    block_n=16, num_splits=splits)
        for j, slot in enumerate(d_slots.tolist()):
            kv = int(d_lens[j])
            ref = reference_attention(d_query[j:j + 1], ks[slot, :kv], vs[slot, :kv], 0.125)
            torch.testing.assert_close(got[j:j + 1], ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_paged[j:j + 1], ref, atol=1e-5, rtol=1e-5)
    try:
        contiguous_attention(query, ks, vs, slot_ids, qsl_t, lens, max_q, 0.125, num_splits=2)
    except ValueError as error:
        assert "decode" in str(error)
    else:
        raise AssertionError("splitting the keys of a prefill was accepted")
    print("ok")
""")


def test_triton_kernel_logic_under_the_interpreter() -> None:
    """The GPU kernel's indexing, masking and online softmax, run by Triton's CPU interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", _TRITON_CHECK], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton GPU kernel needs a CUDA device")
def test_triton_kernel_on_gpu_matches_reference() -> None:
    from xllm_plugin.kernels.triton_attention import contiguous_attention

    torch.manual_seed(0)
    rows = [(1, 1000), (1, 17), (128, 128), (31, 300)]
    qsl = [0]
    for q, _ in rows:
        qsl.append(qsl[-1] + q)
    dev, dt = "cuda", torch.bfloat16
    query = torch.randn(qsl[-1], 32, 128, device=dev, dtype=dt)
    ks = torch.randn(4, 1024, 8, 128, device=dev, dtype=dt)
    vs = torch.randn(4, 1024, 8, 128, device=dev, dtype=dt)
    slot_ids = torch.tensor([3, 1, 0, 2], device=dev, dtype=torch.int32)
    out = contiguous_attention(query, ks, vs, slot_ids,
                               torch.tensor(qsl, device=dev, dtype=torch.int32),
                               torch.tensor([kv for _, kv in rows], device=dev,
                                            dtype=torch.int32), 128, 128 ** -0.5)
    for i, (_, kv) in enumerate(rows):
        ref = reference_attention(query[qsl[i]:qsl[i + 1]].cpu(), ks[slot_ids[i], :kv].cpu(),
                                  vs[slot_ids[i], :kv].cpu(), 128 ** -0.5)
        torch.testing.assert_close(out[qsl[i]:qsl[i + 1]].cpu(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton GPU kernel needs a CUDA device")
@pytest.mark.parametrize("num_splits", [1, 4, 32])
def test_triton_decode_paged_and_contiguous_agree_on_gpu(num_splits: int) -> None:
    """Decode, both addressings, with and without split keys: the benchmark's two sides."""
    from xllm_plugin.kernels.triton_attention import contiguous_attention, paged_attention

    torch.manual_seed(1)
    dev, dt, page = "cuda", torch.bfloat16, 16
    lens = [3000, 1, 17, 1024]
    ks = torch.randn(len(lens), 3072, 8, 128, device=dev, dtype=dt)
    vs = torch.randn_like(ks)
    per_row = ks.shape[1] // page
    table = torch.randperm(len(lens) * per_row, device=dev).view(len(lens), per_row)
    kp = torch.empty(len(lens) * per_row, page, 8, 128, device=dev, dtype=dt)
    vp = torch.empty_like(kp)
    kp[table.flatten()] = ks.view(-1, page, 8, 128)
    vp[table.flatten()] = vs.view(-1, page, 8, 128)
    query = torch.randn(len(lens), 32, 128, device=dev, dtype=dt)
    qsl = torch.arange(len(lens) + 1, device=dev, dtype=torch.int32)
    seq = torch.tensor(lens, device=dev, dtype=torch.int32)
    slot_ids = torch.arange(len(lens), device=dev, dtype=torch.int32)
    got = contiguous_attention(query, ks, vs, slot_ids, qsl, seq, 1, 128 ** -0.5,
                               num_splits=num_splits)
    got_paged = paged_attention(query, kp, vp, table.to(torch.int32), qsl, seq, 1, 128 ** -0.5,
                                num_splits=num_splits)
    for i, kv in enumerate(lens):
        ref = reference_attention(query[i:i + 1].cpu(), ks[i, :kv].cpu(), vs[i, :kv].cpu(),
                                  128 ** -0.5)
        torch.testing.assert_close(got[i:i + 1].cpu(), ref, atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(got_paged[i:i + 1].cpu(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("force_isa", [None, "avx512", "avx2", "generic"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,head_size", [((9, 3), 64), ((8, 1), 128), ((4, 4), 64),
                                             ((32, 8), 64), ((6, 2), 96), ((16, 2), 32)])
def test_native_decode_matches_reference(dtype: torch.dtype, tol: float,
                                         heads: tuple[int, int], head_size: int,
                                         force_isa: str | None) -> None:
    """Every path the kernel has, each capped below the CPU's best where the CPU has it."""
    from xllm_plugin.kernels import native_decode

    lib = _kernel_or_skip(force_isa)
    torch.manual_seed(1)
    num_heads, num_kv_heads = heads
    # Around the tile unit's blocks (16 tokens for Q.K, 32 for P.V, rows from 64 tokens)
    # and their tails.
    lens = [1, 15, 16, 17, 63, 64, 97, 130, 700]
    slots = torch.randn(10, 720, num_kv_heads, head_size, dtype=dtype)
    values = torch.randn_like(slots)
    # The query tensor is a strided view (as vLLM's split of a fused QKV projection).
    qkv = torch.randn(len(lens) + 2, num_heads + 7, head_size, dtype=dtype)
    query = qkv[:, :num_heads]
    out = torch.zeros(len(lens) + 2, num_heads, head_size, dtype=dtype)
    q_index = torch.tensor([0, 2, 3, 4, 6, 7, 8, 9, 10], dtype=torch.int32)
    slot_ids = torch.tensor([5, 0, 7, 2, 3, 1, 9, 4, 8], dtype=torch.int64)
    native_decode.decode(lib, query, out, q_index, slots, values, slot_ids,
                         torch.tensor(lens, dtype=torch.int32), 0.11)
    for row, (token, slot, length) in enumerate(zip(q_index.tolist(), slot_ids.tolist(), lens)):
        ref = reference_attention(query[token:token + 1], slots[slot, :length],
                                  values[slot, :length], 0.11)
        torch.testing.assert_close(out[token:token + 1], ref, atol=tol, rtol=tol)
    assert (out[[1, 5]] == 0).all()  # rows not asked for are untouched


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_decode_rows_serve_every_layer_of_a_step(dtype: torch.dtype, tol: float) -> None:
    """Rows packed once run against each layer's own query and K/V planes (as the backend
    calls them), and a call whose layout differs from the last one is checked again."""
    from xllm_plugin.kernels import native_decode

    lib = native_decode.load()
    if lib is None:
        pytest.skip("no C compiler: the native decode kernel falls back to SDPA")
    torch.manual_seed(3)
    lens = [5, 64, 130, 300]
    q_index = torch.tensor([3, 0, 1, 2], dtype=torch.int32)
    slot_ids = torch.tensor([2, 0, 3, 1], dtype=torch.int64)
    rows = native_decode.DecodeRows(lib, q_index, slot_ids, torch.tensor(lens, dtype=torch.int32))
    assert len(rows) == 4
    for layer, scale in enumerate([0.125, 0.125, 0.2]):
        keys = torch.randn(4, 320, 3, 64, dtype=dtype)
        values = torch.randn_like(keys)
        query = torch.randn(4, 9, 64, dtype=dtype)
        out = torch.zeros_like(query)
        rows.run(query, out, keys, values, scale)
        for token, slot, length in zip(q_index.tolist(), slot_ids.tolist(), lens):
            ref = reference_attention(query[token:token + 1], keys[slot, :length],
                                      values[slot, :length], scale)
            torch.testing.assert_close(out[token:token + 1], ref, atol=tol, rtol=tol,
                                       msg=f"layer {layer}, row of {length} tokens")
    with pytest.raises(ValueError, match="one dtype"):
        rows.run(query.float() if dtype != torch.float32 else query.double(), out, keys,
                 values, 0.2)
    with pytest.raises(ValueError, match="contiguous heads"):
        padded = torch.randn(4, 320, 3, 128, dtype=dtype)[..., :64]  # heads 128 apart
        rows.run(query, out, padded, padded, 0.2)
    with pytest.raises(ValueError, match="int32"):
        native_decode.DecodeRows(lib, q_index.long(), slot_ids, torch.tensor(lens))


@pytest.mark.parametrize("heads,head_size", [((9, 3), 64), ((8, 1), 128), ((32, 8), 64),
                                             ((4, 4), 256)])
def test_native_prefill_matches_reference(heads: tuple[int, int], head_size: int) -> None:
    """Prefill chunks on the AMX tile unit: whole prompts, chunks that end a longer sequence
    (chunked prefill, prefix-cache hits), lengths around its 16-, 32- and 128-token blocks."""
    from xllm_plugin.kernels import native_decode

    lib = native_decode.load()
    if lib is None or not native_decode.has_prefill(lib, torch.bfloat16):
        pytest.skip("no AMX tiles here: prefill chunks use SDPA")
    torch.manual_seed(2)
    num_heads, num_kv_heads = heads
    for q_len, kv_len in [(1, 1), (5, 5), (16, 16), (17, 40), (130, 130), (33, 300),
                          (300, 300), (64, 1000)]:
        # K/V as an xTensor view: one token stride, room past kv_len.
        slot = torch.randn(kv_len + 3, num_kv_heads, head_size, dtype=torch.bfloat16)
        key, value = slot[:kv_len], torch.randn_like(slot)[:kv_len]
        qkv = torch.randn(q_len, num_heads + 5, head_size, dtype=torch.bfloat16)
        query = qkv[:, :num_heads]  # strided, as vLLM's split of a fused QKV projection
        out = torch.zeros(q_len, num_heads, head_size, dtype=torch.bfloat16)
        assert native_decode.prefill(lib, query, key, value, 0.11, out)
        torch.testing.assert_close(out, reference_attention(query, key, value, 0.11),
                                   atol=2e-2, rtol=2e-2)


def test_native_prefill_declines_what_it_does_not_cover() -> None:
    from xllm_plugin.kernels import native_decode

    lib = native_decode.load()
    if lib is None:
        pytest.skip("no C compiler")
    query = torch.randn(4, 4, 64)  # fp32: SDPA's job
    out = torch.zeros_like(query)
    assert not native_decode.prefill(lib, query, query, query, 0.1, out)
    assert (out == 0).all()
    if native_decode.has_prefill(lib, torch.bfloat16):  # head size 96: not a multiple of 64
        q96 = torch.randn(4, 4, 96, dtype=torch.bfloat16)
        assert not native_decode.prefill(lib, q96, q96, q96, 0.1, torch.zeros_like(q96))


def _paired(lib, values: torch.Tensor) -> torch.Tensor:
    """``values [slots, tokens, Hkv, D]`` written into fresh planes in token pairs through
    KVWrites, the halves no token owns filled with NaN (stale bytes a kernel must not read)."""
    from xllm_plugin.kernels import native_decode

    slots, tokens, heads, size = values.shape
    planes = torch.full((slots * tokens, heads, size), float("nan"), dtype=values.dtype)
    keys = torch.empty_like(planes)
    flat = values.reshape(slots * tokens, heads, size)
    order = torch.randperm(slots * tokens)  # any order, and padded tokens skipped
    slot_ids = torch.cat([order, torch.tensor([-1])])
    source = torch.cat([flat[order], torch.zeros(1, heads, size, dtype=values.dtype)])
    native_decode.KVWrites(lib, slot_ids, v_pairs=True).run(source, source, keys, planes)
    torch.testing.assert_close(keys, flat, atol=0, rtol=0, equal_nan=True)  # K rows whole
    return planes.view(slots, tokens, heads, size)


@pytest.mark.parametrize("force_isa", [None, "avx512", "avx2", "generic"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("page_tokens", [32, 128])
def test_paged_rows_read_their_pages_where_they_lie(force_isa: str | None, dtype: torch.dtype,
                                                    tol: float, page_tokens: int) -> None:
    """Decode rows without a view read token t from page table[t // page_tokens]: pages
    scattered and shared between rows, lengths ending mid-page and on a page's edge, on
    every path the kernel has (the tile unit's 16- and 32-token blocks meet page edges at
    32-token pages); bf16 V in token pairs too."""
    import random

    from xllm_plugin.kernels import native_decode

    lib = _kernel_or_skip(force_isa)
    torch.manual_seed(5)
    rng = random.Random(5)
    lens = [1, 31, 32, 33, page_tokens, page_tokens + 1, 3 * page_tokens - 5, 5 * page_tokens]
    width = max(-(-n // page_tokens) for n in lens)
    for (num_heads, num_kv_heads), head_size in [((9, 3), 64), ((8, 1), 128), ((6, 2), 96)]:
        keys = torch.randn(12, page_tokens, num_kv_heads, head_size, dtype=dtype)
        values = torch.randn_like(keys)
        table = torch.empty(len(lens), width, dtype=torch.int64)
        for row, length in enumerate(lens):
            own = rng.sample(range(12), -(-length // page_tokens))
            table[row] = torch.tensor(own + [own[0]] * (width - len(own)))
        query = torch.randn(len(lens), num_heads, head_size, dtype=dtype)
        q_index = torch.arange(len(lens), dtype=torch.int32)
        planes = [(values, False)]
        if native_decode.supports_pairs(lib, dtype, head_size):
            planes.append((_paired(lib, values), True))
        for v_plane, pairs in planes:
            out = torch.zeros_like(query)
            rows = native_decode.DecodeRows.paged(lib, q_index, table,
                                                  torch.tensor(lens, dtype=torch.int32),
                                                  page_tokens, v_pairs=pairs)
            rows.run(query, out, keys, v_plane, 0.11)
            for row, length in enumerate(lens):
                pages = table[row, :-(-length // page_tokens)]
                ref = reference_attention(query[row:row + 1], keys[pages].flatten(0, 1)[:length],
                                          values[pages].flatten(0, 1)[:length], 0.11)
                torch.testing.assert_close(out[row:row + 1], ref, atol=tol, rtol=tol,
                                           msg=f"{num_heads}/{num_kv_heads} x {head_size}, "
                                               f"{length} tokens, pairs {pairs}")


def test_paged_rows_check_their_pages() -> None:
    from xllm_plugin.kernels import native_decode

    lib = native_decode.load()
    if lib is None:
        pytest.skip("no C compiler: the native decode kernel falls back to SDPA")
    q_index, lens = torch.arange(2, dtype=torch.int32), torch.tensor([40, 70], dtype=torch.int32)
    table = torch.tensor([[3, 0], [1, 2]], dtype=torch.int64)
    with pytest.raises(ValueError, match="multiple of 32"):
        native_decode.DecodeRows.paged(lib, q_index, table, lens, 16)
    with pytest.raises(ValueError, match="does not fit"):
        native_decode.DecodeRows.paged(lib, q_index, table[:, :1].contiguous(), lens, 32)
    rows = native_decode.DecodeRows.paged(lib, q_index, table, lens, 64)
    query = torch.randn(2, 4, 64)
    with pytest.raises(ValueError, match="pages of 64 tokens with ids 0..3"):
        rows.run(query, torch.empty_like(query), *[torch.randn(3, 64, 2, 64)] * 2, 0.1)
    with pytest.raises(ValueError, match="pages of 64 tokens"):
        rows.run(query, torch.empty_like(query), *[torch.randn(4, 32, 2, 64)] * 2, 0.1)


@pytest.mark.parametrize("force_isa", [None, "avx512"])
def test_decode_reads_values_stored_in_token_pairs(force_isa: str | None) -> None:
    """V in token pairs (the tile unit's layout, written by KVWrites) gives the same
    attention as token-major V: on the tile unit and on the vector path, odd lengths
    included, where the pair's unwritten half holds NaN."""
    from xllm_plugin.kernels import native_decode

    lib = native_decode.load(force_isa)
    if lib is None or not native_decode.supports_pairs(lib, torch.bfloat16, 64):
        pytest.skip("token pairs need the AVX-512 BF16 path")
    if force_isa is not None and native_decode.isa(lib) != force_isa:
        pytest.skip(f"this CPU cannot run the {force_isa} path")
    torch.manual_seed(4)
    for (num_heads, num_kv_heads), head_size in [((9, 3), 64), ((8, 1), 128), ((4, 2), 256)]:
        lens = [1, 2, 15, 31, 32, 33, 63, 64, 97, 130, 301]
        keys = torch.randn(len(lens), 304, num_kv_heads, head_size, dtype=torch.bfloat16)
        values = torch.randn_like(keys)
        for slot, length in enumerate(lens):  # past each row's length: stale NaN
            keys[slot, length:] = values[slot, length:] = float("nan")
        paired = _paired(lib, values)
        query = torch.randn(len(lens), num_heads, head_size, dtype=torch.bfloat16)
        out = torch.zeros_like(query)
        rows = native_decode.DecodeRows(
            lib, torch.arange(len(lens), dtype=torch.int32),
            torch.arange(len(lens), dtype=torch.int64), torch.tensor(lens, dtype=torch.int32),
            v_pairs=True)
        rows.run(query, out, keys, paired, 0.11)
        for row, length in enumerate(lens):
            ref = reference_attention(query[row:row + 1], keys[row, :length],
                                      values[row, :length], 0.11)
            torch.testing.assert_close(out[row:row + 1], ref, atol=3e-2, rtol=3e-2,
                                       msg=f"{num_heads}/{num_kv_heads} x {head_size}, "
                                           f"{length} tokens")
        unpaired = native_decode.values_from_pairs(paired[len(lens) - 1], lens[-1])
        torch.testing.assert_close(unpaired, values[len(lens) - 1, :lens[-1]], atol=0, rtol=0)


def test_prefill_reads_values_stored_in_token_pairs() -> None:
    from xllm_plugin.kernels import native_decode

    lib = native_decode.load()
    if lib is None or not native_decode.has_prefill(lib, torch.bfloat16):
        pytest.skip("no AMX tiles here: prefill chunks use SDPA")
    torch.manual_seed(5)
    for q_len, kv_len in [(1, 1), (5, 5), (17, 41), (33, 301), (300, 300), (64, 999)]:
        key = torch.randn(kv_len + 2 - kv_len % 2, 3, 64, dtype=torch.bfloat16)  # even
        value = torch.randn_like(key)
        value[kv_len:] = float("nan")
        paired = _paired(lib, value[None])[0]
        query = torch.randn(q_len, 9, 64, dtype=torch.bfloat16)
        out = torch.zeros_like(query)
        assert native_decode.prefill(lib, query, key[:kv_len], paired[:kv_len], 0.11, out,
                                     v_pairs=True)
        torch.testing.assert_close(
            out, reference_attention(query, key[:kv_len], value[:kv_len], 0.11),
            atol=2e-2, rtol=2e-2, msg=f"{q_len} queries over {kv_len} tokens")


def test_kv_writes_check_what_they_are_given() -> None:
    from xllm_plugin.kernels import native_decode

    lib = native_decode.load()
    if lib is None:
        pytest.skip("no C compiler")
    planes = torch.zeros(64, 2, 64)
    rows = torch.randn(3, 2, 64)
    with pytest.raises(ValueError, match="past the plane"):
        native_decode.KVWrites(lib, torch.tensor([0, 5, 64])).run(rows, rows, planes, planes)
    with pytest.raises(ValueError, match="bf16 only"):
        native_decode.KVWrites(lib, torch.tensor([0, 5, 6]), v_pairs=True).run(
            rows, rows, planes, planes)
    with pytest.raises(ValueError, match="even number"):
        native_decode.KVWrites(lib, torch.tensor([0, 5, 6]), v_pairs=True).run(
            rows.bfloat16(), rows.bfloat16(), planes[:63].bfloat16(), planes[:63].bfloat16())
    with pytest.raises(ValueError, match="one dtype"):
        native_decode.KVWrites(lib, torch.tensor([0, 5, 6])).run(
            rows, rows.bfloat16(), planes, planes)
    writes = native_decode.KVWrites(lib, torch.tensor([9, -1, 4], dtype=torch.int32))
    values = torch.randn(3, 2, 64)
    writes.run(rows, values, planes, planes.clone())
    assert torch.equal(planes[9], rows[0]) and torch.equal(planes[4], rows[2])
    assert planes.abs().sum(dim=(1, 2)).nonzero().flatten().tolist() == [4, 9]
