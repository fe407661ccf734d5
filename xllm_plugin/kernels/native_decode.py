"""A native CPU decode kernel over contiguous per-request K/V, built on first use.

Decode is where per-request SDPA calls hurt: one query token per request makes each
call tiny, so Python and dispatch overhead (~10 µs per request per layer) dominate. This
kernel does every decode row of a layer in one call: for each (request, KV head) it reads
the request's K and V once, straight from its xTensor slot (``plane + slot * stride``:
no block table, no gather), and serves the whole GQA group. Rows are spread over the
OpenMP threads of the process (PyTorch's runtime, so vLLM's thread binding applies).

Three paths, the widest the CPU has: AVX-512 with BF16 dot products, AVX2 with FMA
(bf16 widened to fp32 by a shift), and portable C for anything else (and head sizes
the SIMD paths do not tile). The AVX2 path matters as much as the wide one: on a host
without AVX-512 (an AMD EPYC VM, 2026-12-03) only it beats vLLM's own paged kernel,
which runs its ``vec`` path there. Where the CPU has AMX tiles (Sapphire Rapids and
later), bf16 rows of 64 tokens or more put both products on the tile unit: vLLM's ``amx``
path does, and on such a Xeon (2026-12-05) the vector path took about twice its time.
Q.K loads 16 token rows of K straight from the view (the tile stride is the token
stride); P.V needs V in the unit's pair layout: the store keeps V that way where both
kernels run (:class:`KVWrites` with ``v_pairs``), else it is repacked per block of 32
tokens. A step's rows (:class:`DecodeRows`) and KV slots (:class:`KVWrites`) are packed
once and serve every layer's call.

The C source is compiled with the system C compiler into ``~/.cache/xllm-plugin/kernels``
(keyed by source, flags and CPU), about a second, once per machine. Without a compiler,
:func:`load` returns None and callers keep using SDPA.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from xllm_plugin.cpu_features import cpuinfo_field

log = logging.getLogger("xllm_plugin.kernels.native_decode")

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
/* The widest path this CPU runs, unless a lower level is forced (XT_FORCE_AVX2 or
   XT_FORCE_GENERIC, so every path can be tested on a machine that has the wider one). */
#if defined(__AVX512F__) && defined(__AVX512BF16__) && !defined(XT_FORCE_AVX2) \
    && !defined(XT_FORCE_GENERIC)
#include <immintrin.h>
#define XT_AVX512 1
#define XT_ISA "avx512"
#define XT_DIM_MULTIPLE 64
#elif defined(__AVX2__) && defined(__FMA__) && !defined(XT_FORCE_GENERIC)
#include <immintrin.h>
#define XT_AVX2 1
#define XT_ISA "avx2"
#define XT_DIM_MULTIPLE 32
#else
#define XT_ISA "generic"
#endif

#define XT_MAX_GROUP 8

/* Per-thread scratch that only grows (a decode row's scores and probabilities, a prefill
   task's rows); kept for the process, so steady-state calls neither allocate nor fault
   fresh pages in. */
static __thread char *scratch_mem = NULL;
static __thread size_t scratch_size = 0;
static char *scratch(size_t bytes) {
    if (bytes > scratch_size) {
        free(scratch_mem);
        scratch_mem = (char *)aligned_alloc(64, (bytes + 63) & ~(size_t)63);
        scratch_size = scratch_mem ? bytes : 0;
    }
    return scratch_mem;
}

static inline float bf16_to_f32(uint16_t x) {
    union { uint32_t u; float f; } v; v.u = ((uint32_t)x) << 16; return v.f;
}
static inline uint16_t f32_to_bf16(float f) {
    union { uint32_t u; float f; } v; v.f = f;
    v.u += 0x7fffu + ((v.u >> 16) & 1u);  /* round to nearest even */
    return (uint16_t)(v.u >> 16);
}

/* Softmax numerators in place; returns the sum. */
static float exp_and_sum(float *s, int len, float mx) {
    float total = 0.f;
    for (int t = 0; t < len; t++) { s[t] = expf(s[t] - mx); total += s[t]; }
    return total;
}

/* Where a row's K (or V) tokens lie: token t at base + pages[t / page_tokens] * page_bytes
   + (t % page_tokens) * row_bytes. A row with a view is one run (pages {0}, page_bytes 0,
   page_tokens past any length); a row without one is read where its pages are, which
   spares copying them first. The kernels step through tokens in blocks of 16 and 32 (and
   V in pairs), so pages must hold a multiple of 32 tokens: no block straddles two. */
typedef struct {
    const char *base;
    const int64_t *pages;
    int page_tokens;
    size_t page_bytes, row_bytes;
} kv_run;

static inline const char *kv_at(const kv_run *a, int t) {
    if (a->page_bytes == 0) return a->base + (size_t)t * a->row_bytes;  /* a view: no divide */
    const unsigned page = (unsigned)t / (unsigned)a->page_tokens;
    const unsigned within = (unsigned)t % (unsigned)a->page_tokens;
    return a->base + (size_t)a->pages[page] * a->page_bytes + (size_t)within * a->row_bytes;
}

/* Portable path: any head size and group, bf16 (bf16 != 0) or fp32. hoff: the KV head's
   byte offset within a token. */
static void head_generic(int bf16, const void *q, const kv_run *k, const kv_run *v, size_t hoff,
                         int len, int group, int d, float scale, float *scores, void *out) {
    const size_t es = bf16 ? 2 : 4;
    float qf[XT_MAX_GROUP * 256], row[256], acc[XT_MAX_GROUP * 256], mx[XT_MAX_GROUP];
    for (int i = 0; i < group * d; i++) {
        qf[i] = scale * (bf16 ? bf16_to_f32(((const uint16_t *)q)[i]) : ((const float *)q)[i]);
        acc[i] = 0.f;
    }
    for (int g = 0; g < group; g++) mx[g] = -INFINITY;
    for (int t = 0; t < len; t++) {
        const char *kt = kv_at(k, t) + hoff;
        for (int i = 0; i < d; i++)
            row[i] = bf16 ? bf16_to_f32(((const uint16_t *)kt)[i]) : ((const float *)kt)[i];
        for (int g = 0; g < group; g++) {
            float s = 0.f;
            for (int i = 0; i < d; i++) s += qf[g * d + i] * row[i];
            scores[g * len + t] = s;
            if (s > mx[g]) mx[g] = s;
        }
    }
    float sum[XT_MAX_GROUP];
    for (int g = 0; g < group; g++) sum[g] = exp_and_sum(scores + g * len, len, mx[g]);
    for (int t = 0; t < len; t++) {
        const char *vt = kv_at(v, t) + hoff;
        for (int i = 0; i < d; i++)
            row[i] = bf16 ? bf16_to_f32(((const uint16_t *)vt)[i]) : ((const float *)vt)[i];
        for (int g = 0; g < group; g++) {
            const float p = scores[g * len + t];
            for (int i = 0; i < d; i++) acc[g * d + i] += p * row[i];
        }
    }
    for (int g = 0; g < group; g++)
        for (int i = 0; i < d; i++) {
            const float o = acc[g * d + i] / sum[g];
            if (bf16) ((uint16_t *)out)[g * d + i] = f32_to_bf16(o);
            else ((float *)out)[g * d + i] = o;
        }
}

#ifdef XT_AVX512
static inline __m512 load16(int bf16, const void *p) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
    return _mm512_loadu_ps(p);
}

/* 2^x for 16 floats as 2^n * p(f), p the Taylor polynomial of 2^f to degree 6 (relative
   error ~1e-7) or, where the result only feeds bf16, degree 4 (~4e-5, a hundredth of a bf16
   ulp). `degree` is a constant at every call, so the branch folds away. */
static inline __m512 pow2_16(__m512 x, int degree) {
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(9.6181291076284772e-3f);
    if (degree == 6) {
        p = _mm512_set1_ps(1.5403530393381606e-4f);
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    }
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* e^x for 16 floats (x clamped at -87, so 2^n stays a normal float). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    return pow2_16(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), 6);
}

static float exp_and_sum16(float *s, int len, float mx) {
    const __m512 m = _mm512_set1_ps(mx);
    __m512 total = _mm512_setzero_ps();
    int t = 0;
    for (; t + 16 <= len; t += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), m));
        _mm512_storeu_ps(s + t, e);
        total = _mm512_add_ps(total, e);
    }
    float rest = 0.f;
    for (; t < len; t++) { s[t] = expf(s[t] - mx); rest += s[t]; }
    return _mm512_reduce_add_ps(total) + rest;
}

/* 2^x for 16 floats, x <= 0, to the precision bf16 keeps. */
static inline __m512 exp2_16_bf16(__m512 x) { return pow2_16(x, 4); }

/* Softmax numerators of one head's decode row, straight to bf16 in token order (the pair
   layout P.V's tile loads read: word i = (p[2i], p[2i+1]), zero past len); returns their
   fp32 sum. Scores are already scaled (the query was): e^(s - mx) = 2^(s l2e - mx l2e). */
static float exp_pairs_bf16(const float *s, int len, float mx, uint32_t *dst) {
    const __m512 l2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 mc = _mm512_set1_ps(mx * 1.44269504088896341f);
    uint16_t *words = (uint16_t *)dst;
    __m512 total = _mm512_setzero_ps();
    int t = 0;
    for (; t + 32 <= len; t += 32) {
        const __m512 e0 = exp2_16_bf16(_mm512_fmsub_ps(_mm512_loadu_ps(s + t), l2e, mc));
        const __m512 e1 = exp2_16_bf16(_mm512_fmsub_ps(_mm512_loadu_ps(s + t + 16), l2e, mc));
        total = _mm512_add_ps(total, _mm512_add_ps(e0, e1));
        _mm512_storeu_si512(words + t, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
    }
    for (; t < len; t += 16) {
        const __mmask16 keep = len - t >= 16 ? (__mmask16)0xFFFF
                                             : (__mmask16)((1u << (len - t)) - 1);
        const __m512 e = _mm512_maskz_mov_ps(keep, exp2_16_bf16(_mm512_fmsub_ps(
            _mm512_maskz_loadu_ps(keep, s + t), l2e, mc)));
        total = _mm512_add_ps(total, e);
        _mm256_mask_storeu_epi16(words + t, keep, (__m256i)_mm512_cvtneps_pbh(e));
    }
    if (len & 1) words[len] = 0;
    return _mm512_reduce_add_ps(total);
}

/* bf16 rows use the AMX tile unit where the CPU has it (Sapphire Rapids and later), unless
   XT_NO_AMX caps the build at plain AVX-512. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && !defined(XT_NO_AMX)
#include <sys/syscall.h>
#include <unistd.h>
#define XT_AMX 1
/* Linux gives a process AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
   XTILEDATA, Linux 5.16+); 1 once granted, -1 if refused, 0 before asking. xt_decode asks
   before its parallel region, so the rows only read it. */
static int amx_state = 0;
/* Shorter rows stay on the vector path: the tile setup costs more than it saves there. */
#define XT_AMX_MIN_LEN 64
static int amx_ready(void) {
    if (amx_state == 0) amx_state = syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : -1;
    return amx_state > 0;
}
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) xt_tilecfg;

/* One tile palette serves every decode row of a call (loading a configuration and
   releasing it costs about as much as a row's Q.K at 128 tokens, so a thread sets it once
   per call, not per product):
   tmm0-3  P.V accumulators, group rows x 16 fp32 dims each;
   tmm4    P.V's A: group rows of 16 bf16 token pairs (the probabilities);
   tmm5    16 rows x 64 bytes: P.V's B (16 token pairs x 16 dims) and Q.K's A (16 tokens x
           32 dims);
   tmm6    Q.K's accumulator, 16 tokens x 16 query-head columns;
   tmm7    Q.K's B, 16 dim pairs x 16 columns (the block-diagonal Q^T).
   tmm5-7 have one shape, so P.V over token-pair V also loads its B tiles into 6 and 7. */
static void decode_tiles(int group) {
    xt_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 5; i++) { cfg.rows[i] = (uint8_t)group; cfg.colsb[i] = 64; }
    for (int i = 5; i < 8; i++) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
    _tile_loadconfig(&cfg);
}

/* 16 x 16 transpose of 32-bit elements in registers: out[j] lane i = r[i] lane j (four
   rounds of in-lane and cross-lane shuffles). */
static inline void transpose16(const __m512 *r, __m512 *out) {
    __m512 u[16], w[16];
    for (int i = 0; i < 8; i++) {  /* lane L: rows 2i, 2i+1 of columns 4L..4L+1 | 4L+2..4L+3 */
        u[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        u[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int m = 0; m < 4; m++) {  /* w[4m + j], lane L: column 4L + j of rows 4m..4m+3 */
        w[4 * m] = _mm512_shuffle_ps(u[4 * m], u[4 * m + 2], 0x44);
        w[4 * m + 1] = _mm512_shuffle_ps(u[4 * m], u[4 * m + 2], 0xEE);
        w[4 * m + 2] = _mm512_shuffle_ps(u[4 * m + 1], u[4 * m + 3], 0x44);
        w[4 * m + 3] = _mm512_shuffle_ps(u[4 * m + 1], u[4 * m + 3], 0xEE);
    }
    for (int j = 0; j < 4; j++) {  /* column 4L + j: lane L of w[j], w[4+j], w[8+j], w[12+j] */
        const __m512 v0 = _mm512_shuffle_f32x4(w[j], w[4 + j], 0x44);
        const __m512 v1 = _mm512_shuffle_f32x4(w[j], w[4 + j], 0xEE);
        const __m512 v2 = _mm512_shuffle_f32x4(w[8 + j], w[12 + j], 0x44);
        const __m512 v3 = _mm512_shuffle_f32x4(w[8 + j], w[12 + j], 0xEE);
        out[j] = _mm512_shuffle_f32x4(v0, v2, 0x88);
        out[4 + j] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
        out[8 + j] = _mm512_shuffle_f32x4(v1, v3, 0x88);
        out[12 + j] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
    }
}

/* Columns of a stored accumulator (16 token rows of 16 floats) into scores[hg][t..t+15]. */
static void qk_scatter(const float *ct, int cols, int hg0, int len, int t, float *scores,
                       __m512 *vmx) {
    __m512 r[16], c[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_load_ps(ct + 16 * i);
    transpose16(r, c);
    for (int col = 0; col < cols; col++) {
        _mm512_storeu_ps(scores + (size_t)(hg0 + col) * len + t, c[col]);
        vmx[hg0 + col] = _mm512_max_ps(vmx[hg0 + col], c[col]);
    }
}

/* Q.K for every full block of 16 tokens on the AMX tile unit. The 16 token rows of K load
   straight from the token-major view (tile stride = the token stride), 32 dims at a time,
   against a block-diagonal Q^T (each 32-dim step of one KV head meets only that head's
   query group; the other columns are zero), so one accumulator holds the scores of up to
   16 query heads: C[t][col] for a run of whole KV-head groups. Returns how many tokens it
   scored (a multiple of 16); scores land in scores[hg * len + t], raising mx[hg]. */
static int qk_amx(const __m512bh (*qb)[8], const kv_run *k, int len, int hkv,
                  int group, int d, float *scores, float *mx) {
    const size_t row_bytes = k->row_bytes;
    const int steps = d / 32, full = len & ~15;
    const int per_run = 16 / group < 16 / steps ? 16 / group : 16 / steps;  /* cols, steps <= 16 */
    if (full == 0 || per_run == 0) return 0;
    uint32_t qt[16 * 16 * 16];  /* [step of the run][pair i][col] */
    __m512 vmx[64];  /* running maxima per head, reduced once at the end */
    for (int hg = 0; hg < hkv * group; hg++) vmx[hg] = _mm512_set1_ps(-INFINITY);
    float ct[16 * 16] __attribute__((aligned(64))) = {0};
    for (int h0 = 0; h0 < hkv; h0 += per_run) {
        const int h1 = h0 + per_run < hkv ? h0 + per_run : hkv;
        const int cols = (h1 - h0) * group, nsteps = (h1 - h0) * steps;
        memset(qt, 0, sizeof(uint32_t) * (size_t)nsteps * 16 * 16);
        for (int h = h0; h < h1; h++)
            for (int g = 0; g < group; g++) {
                const uint32_t *words = (const uint32_t *)qb[h * group + g];
                const int col = (h - h0) * group + g;
                for (int s = 0; s < steps; s++)
                    for (int i = 0; i < 16; i++)
                        qt[(((h - h0) * steps + s) * 16 + i) * 16 + col] = words[s * 16 + i];
            }
        for (int t = 0; t < full; t += 16) {
            const char *block = kv_at(k, t) + (size_t)h0 * d * 2;
            _tile_zero(6);
            for (int s = 0; s < nsteps; s++) {
                _tile_loadd(5, block + 64 * s, (long)row_bytes);
                _tile_loadd(7, qt + (size_t)s * 16 * 16, 64);
                _tile_dpbf16ps(6, 5, 7);
            }
            _tile_stored(6, ct, 64);
            qk_scatter(ct, cols, h0 * group, len, t, scores, vmx);
        }
    }
    for (int hg = 0; hg < hkv * group; hg++)
        mx[hg] = fmaxf(mx[hg], _mm512_reduce_max_ps(vmx[hg]));
    return full;
}

/* 32 tokens x 64 dims of V (rows row_bytes apart) into the tile unit's pair layout: row i
   of bt[j] holds (v[2i][n], v[2i+1][n]) for the 16 dims n of unpack j. */
static inline void repack_pairs(const char *v, size_t row_bytes, uint32_t bt[4][16][16]) {
    for (int i = 0; i < 16; i++) {
        const char *va = v + (size_t)(2 * i) * row_bytes;
        const __m512i a0 = _mm512_loadu_si512(va), a1 = _mm512_loadu_si512(va + 64);
        const __m512i b0 = _mm512_loadu_si512(va + row_bytes);
        const __m512i b1 = _mm512_loadu_si512(va + row_bytes + 64);
        _mm512_store_si512(bt[0][i], _mm512_unpacklo_epi16(a0, b0));
        _mm512_store_si512(bt[1][i], _mm512_unpackhi_epi16(a0, b0));
        _mm512_store_si512(bt[2][i], _mm512_unpacklo_epi16(a1, b1));
        _mm512_store_si512(bt[3][i], _mm512_unpackhi_epi16(a1, b1));
    }
}

/* P.V for one KV head's group over 64 output dims, on the AMX tile unit, for every full
   block of 32 tokens: C[g][n] = sum_t P[g][t] V[t][n]. P rows come straight from the
   bf16 probabilities (pp: row g at pp + g * half words, tokens in order); V is repacked
   per block into the unit's pair layout with the same unpacks as the vector path (so C's
   columns carry the same in-lane dim permutation, undone by the caller). Writes C to
   cacc[g][j][16] (j = which unpack) if there was a full block; returns how many token
   pairs it consumed. */
static int pv_amx(const uint32_t *pp, int half, const kv_run *v, size_t off, int len,
                  float *cacc) {
    const size_t row_bytes = v->row_bytes;
    const int blocks = len / 32;
    if (blocks == 0) return 0;
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    /* Two repack buffers, one block apart: the tile loads of block b read what was
       stored while block b - 1 ran, so they do not wait on the stores of the block just
       repacked (a tile load takes no data forwarded from pending stores). */
    uint32_t bt[2][4][16][16] __attribute__((aligned(64)));
    repack_pairs(kv_at(v, 0) + off, row_bytes, bt[0]);
    for (int b = 0; b < blocks; b++) {
        if (b + 1 < blocks) repack_pairs(kv_at(v, 32 * (b + 1)) + off, row_bytes,
                                         bt[(b + 1) & 1]);
        uint32_t (*cur)[16][16] = bt[b & 1];
        _tile_loadd(4, pp + (size_t)b * 16, (long)half * 4);
        _tile_loadd(5, cur[0], 64); _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(5, cur[1], 64); _tile_dpbf16ps(1, 4, 5);
        _tile_loadd(5, cur[2], 64); _tile_dpbf16ps(2, 4, 5);
        _tile_loadd(5, cur[3], 64); _tile_dpbf16ps(3, 4, 5);
    }
    _tile_stored(0, cacc, 256); _tile_stored(1, cacc + 16, 256);
    _tile_stored(2, cacc + 32, 256); _tile_stored(3, cacc + 48, 256);
    return blocks * 16;
}

/* pv_amx for V stored in token pairs: each block's four B tiles load straight from the
   pairs (pair_bytes apart), nothing repacked; C's columns are dims in order. The loads
   rotate over tiles 5-7 (Q.K's, idle here): tiles are not renamed, so a load into the tile
   the previous product still reads would wait for it. */
static int pv_amx_pairs(const uint32_t *pp, int half, const kv_run *v, size_t off, int len,
                        float *cacc) {
    const size_t pair_bytes = 2 * v->row_bytes;
    const int blocks = len / 32;
    if (blocks == 0) return 0;
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int b = 0; b < blocks; b++) {
        const char *block = kv_at(v, 32 * b) + off;
        _tile_loadd(4, pp + (size_t)b * 16, (long)half * 4);
        _tile_loadd(5, block, (long)pair_bytes);
        _tile_loadd(6, block + 64, (long)pair_bytes);
        _tile_loadd(7, block + 128, (long)pair_bytes);
        _tile_dpbf16ps(0, 4, 5);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(5, block + 192, (long)pair_bytes);
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(3, 4, 5);
    }
    _tile_stored(0, cacc, 256); _tile_stored(1, cacc + 16, 256);
    _tile_stored(2, cacc + 32, 256); _tile_stored(3, cacc + 48, 256);
    return blocks * 16;
}
#endif

/* 16 lanes of partial products of q . k (their sum is the dot product). */
static inline __m512 dot_partial(int bf16, const __m512bh *qb, const __m512 *qf,
                                 const char *kt, int n16, int n32) {
    __m512 acc = _mm512_setzero_ps();
    if (bf16) {
        for (int c = 0; c < n32; c++)
            acc = _mm512_dpbf16_ps(acc, qb[c], (__m512bh)_mm512_loadu_si512(kt + c * 64));
    } else {
        for (int c = 0; c < n16; c++)
            acc = _mm512_fmadd_ps(qf[c], _mm512_loadu_ps(kt + c * 64), acc);
    }
    return acc;
}

/* Horizontal sums of 16 vectors at once: lane j of the result is the sum of v[j]. */
static inline __m512 hsum16(const __m512 *v) {
    __m512 s[8], u[4], w[2];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: x0+x2, y0+y2, x1+x3, y1+y3 */
        s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  /* per 128-bit lane: lane sums of 4 vectors */
        const __m512d a = _mm512_castps_pd(s[2 * i]), b = _mm512_castps_pd(s[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; i++)  /* add 128-bit lanes pairwise */
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88),
                         _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

/* AVX-512 path for one request: head size a multiple of 64 (<= 256), group <= 8.
   Tokens are walked in blocks of 16 with every KV head of a block handled while its rows
   are in L1 (the view is token-major: a token's heads are adjacent), and the next block
   prefetched, so K and V stream through memory once. bf16 dot products use AVX512-BF16
   (vdpbf16ps); fp32 uses FMA. scores: [hkv * group * len]. */
static inline __attribute__((always_inline)) void row_avx512(
        int bf16, const void *q, const kv_run *k, const kv_run *v, int len, int hkv,
        int group, int d, float scale, float *scores, float *accbuf, void *out, int pairs) {
    const size_t es = bf16 ? 2 : 4;
    const int n16 = d / 16, n32 = d / 32, heads = hkv * group;
    const size_t row_bytes = k->row_bytes;
    const __m512 vscale = _mm512_set1_ps(scale);
    float mx[64], sum[64];
    __m512bh qb[64][8];
    __m512 qf[64][16];
    for (int hg = 0; hg < heads; hg++) {
        for (int c = 0; c < n16; c++)
            qf[hg][c] = _mm512_mul_ps(vscale, load16(bf16, (const char *)q + (hg * d + c * 16) * es));
        for (int c = 0; c < n32; c++)
            qb[hg][c] = _mm512_cvtne2ps_pbh(qf[hg][2 * c + 1], qf[hg][2 * c]);
        mx[hg] = -INFINITY;
    }
#ifdef XT_AMX
    const int amx = bf16 && amx_ready(), tile_row = amx && len >= XT_AMX_MIN_LEN;
#else
    const int amx = 0, tile_row = 0;
#endif
    int t = 0;
#ifdef XT_AMX
    if (tile_row)
        t = qk_amx((const __m512bh (*)[8])qb, k, len, hkv, group, d, scores, mx);
#endif
    for (; t + 16 <= len; t += 16) {
        const char *block = kv_at(k, t);
        if (t + 32 <= len) {
            const char *next = kv_at(k, t + 16);
            for (size_t off = 0; off < 16 * row_bytes; off += 64)
                _mm_prefetch(next + off, _MM_HINT_T0);
        }
        for (int h = 0; h < hkv; h++) {
            for (int g = 0; g < group; g++) {
                const int hg = h * group + g;
                __m512 part[16];
                for (int j = 0; j < 16; j++)
                    part[j] = dot_partial(bf16, qb[hg], qf[hg],
                                          block + (size_t)j * row_bytes + (size_t)h * d * es,
                                          n16, n32);
                const __m512 s16 = hsum16(part);
                _mm512_storeu_ps(scores + (size_t)hg * len + t, s16);
                const float m = _mm512_reduce_max_ps(s16);
                if (m > mx[hg]) mx[hg] = m;
            }
        }
    }
    for (; t < len; t++) {
        const char *kt = kv_at(k, t);
        for (int hg = 0; hg < heads; hg++) {
            const float s = _mm512_reduce_add_ps(
                dot_partial(bf16, qb[hg], qf[hg], kt + (size_t)(hg / group) * d * es, n16, n32));
            scores[(size_t)hg * len + t] = s;
            if (s > mx[hg]) mx[hg] = s;
        }
    }
    /* P.V in bf16 pairs of tokens, (p[t], p[t+1]) times (v[t][n], v[t+1][n]): where V is
       stored in token pairs (any length), or where the tile unit takes the row. P is rounded
       to bf16 first (as the tile unit needs). Full blocks of 32 tokens go to the tile unit,
       the remaining pairs to vdpbf16ps. Token-major V is interleaved by one unpack per 16
       dims, which permutes dims within 128-bit lanes (undone at the end); token-pair V is
       already in the unit's layout, dims in order. */
    if (bf16 && (pairs || tile_row)) {
        const int half = (len + 1) / 2;
        uint32_t *pp = (uint32_t *)(accbuf + (size_t)heads * d);
        for (int hg = 0; hg < heads; hg++)
            sum[hg] = exp_pairs_bf16(scores + (size_t)hg * len, len, mx[hg],
                                     pp + (size_t)hg * half);
        const __m512i zero = _mm512_setzero_si512();
        /* the last pair of an odd length: keep token 2i (low halves), not what follows */
        const __m512i low_halves = _mm512_set1_epi32(0xFFFF);
        for (int h = 0; h < hkv; h++) {
            for (int c = 0; c < d / 64; c++) {
                /* token-major: dims from h * d + 64c of each token row; token pairs: the same
                   elements are words (4 bytes) of each pair's 2 * row_bytes */
                const size_t off = ((size_t)h * d + c * 64) * (pairs ? 4 : es);
                float cacc[XT_MAX_GROUP * 64] __attribute__((aligned(64)));
                memset(cacc, 0, sizeof(float) * 64 * (size_t)group);
                int i0 = 0;
#ifdef XT_AMX
                if (amx)
                    i0 = pairs ? pv_amx_pairs(pp + (size_t)h * group * half, half, v, off, len,
                                              cacc)
                               : pv_amx(pp + (size_t)h * group * half, half, v, off, len, cacc);
#endif
                __m512 acc[XT_MAX_GROUP][4];
                for (int g = 0; g < group; g++)
                    for (int j = 0; j < 4; j++) acc[g][j] = _mm512_load_ps(cacc + 64 * g + 16 * j);
                for (int i = i0; i < half; i++) {
                    __m512bh x[4];
                    if (pairs) {
                        const char *vp = kv_at(v, 2 * i) + off;
                        const int odd_end = 2 * i + 1 == len;
                        for (int j = 0; j < 4; j++) {
                            const __m512i w = _mm512_loadu_si512(vp + 64 * j);
                            x[j] = (__m512bh)(odd_end ? _mm512_and_si512(w, low_halves) : w);
                        }
                    } else {
                        const char *va = kv_at(v, 2 * i) + off;
                        const __m512i a0 = _mm512_loadu_si512(va), a1 = _mm512_loadu_si512(va + 64);
                        __m512i b0 = zero, b1 = zero;
                        if (2 * i + 1 < len) {
                            b0 = _mm512_loadu_si512(va + row_bytes);
                            b1 = _mm512_loadu_si512(va + row_bytes + 64);
                        }
                        x[0] = (__m512bh)_mm512_unpacklo_epi16(a0, b0);
                        x[1] = (__m512bh)_mm512_unpackhi_epi16(a0, b0);
                        x[2] = (__m512bh)_mm512_unpacklo_epi16(a1, b1);
                        x[3] = (__m512bh)_mm512_unpackhi_epi16(a1, b1);
                    }
                    for (int g = 0; g < group; g++) {
                        const __m512bh p = (__m512bh)_mm512_set1_epi32(
                            (int)pp[(size_t)(h * group + g) * half + i]);
                        for (int j = 0; j < 4; j++) acc[g][j] = _mm512_dpbf16_ps(acc[g][j], p, x[j]);
                    }
                }
                /* Token-major V: acc j holds unpack (lo, hi) = j % 2 of dims 32 * (j / 2) ..;
                   lane e of it is dim 8 * (e / 4) + 4 * (j % 2) + e % 4 of that run, so one
                   two-source permute per 16 dims puts them back in order. */
                const __m512i first = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4,
                                                       19, 18, 17, 16, 3, 2, 1, 0);
                const __m512i second = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12,
                                                        27, 26, 25, 24, 11, 10, 9, 8);
                for (int g = 0; g < group; g++) {
                    const int hg = h * group + g;
                    const __m512 inv = _mm512_set1_ps(1.f / sum[hg]);
                    for (int q4 = 0; q4 < 4; q4++) {
                        const __m512 lo = acc[g][2 * (q4 / 2)], hi = acc[g][2 * (q4 / 2) + 1];
                        const __m512 o = pairs ? acc[g][q4]
                            : _mm512_permutex2var_ps(lo, q4 % 2 ? second : first, hi);
                        char *dst = (char *)out + (hg * d + c * 64 + q4 * 16) * es;
                        _mm256_storeu_si256((__m256i *)dst,
                                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(o, inv)));
                    }
                }
            }
        }
        return;
    }
    for (int hg = 0; hg < heads; hg++)
        sum[hg] = exp_and_sum16(scores + (size_t)hg * len, len, mx[hg]);
    /* P.V: accumulators of 64 output dims of a head's group live in registers for one
       block of tokens, and in accbuf between blocks. */
    const int chunks = d / 64;
    memset(accbuf, 0, sizeof(float) * (size_t)heads * d);
    for (int t0 = 0; t0 < len; t0 += 16) {
        const int t1 = t0 + 16 < len ? t0 + 16 : len;
        const char *block = kv_at(v, t0);
        if (t0 + 32 <= len) {
            const char *next = kv_at(v, t0 + 16);
            for (size_t off = 0; off < 16 * row_bytes; off += 64)
                _mm_prefetch(next + off, _MM_HINT_T0);
        }
        for (int h = 0; h < hkv; h++) {
            for (int c = 0; c < chunks; c++) {
                __m512 acc[XT_MAX_GROUP][4];
                for (int g = 0; g < group; g++)
                    for (int j = 0; j < 4; j++)
                        acc[g][j] = _mm512_loadu_ps(accbuf + ((size_t)(h * group + g) * d + c * 64 + j * 16));
                for (int tt = t0; tt < t1; tt++) {
                    const char *vt = block + (size_t)(tt - t0) * row_bytes + ((size_t)h * d + c * 64) * es;
                    const __m512 v0 = load16(bf16, vt), v1 = load16(bf16, vt + 16 * es);
                    const __m512 v2 = load16(bf16, vt + 32 * es), v3 = load16(bf16, vt + 48 * es);
                    for (int g = 0; g < group; g++) {
                        const __m512 p = _mm512_set1_ps(scores[(size_t)(h * group + g) * len + tt]);
                        acc[g][0] = _mm512_fmadd_ps(p, v0, acc[g][0]);
                        acc[g][1] = _mm512_fmadd_ps(p, v1, acc[g][1]);
                        acc[g][2] = _mm512_fmadd_ps(p, v2, acc[g][2]);
                        acc[g][3] = _mm512_fmadd_ps(p, v3, acc[g][3]);
                    }
                }
                for (int g = 0; g < group; g++)
                    for (int j = 0; j < 4; j++)
                        _mm512_storeu_ps(accbuf + ((size_t)(h * group + g) * d + c * 64 + j * 16), acc[g][j]);
            }
        }
    }
    for (int hg = 0; hg < heads; hg++) {
        const __m512 inv = _mm512_set1_ps(1.f / sum[hg]);
        for (int c = 0; c < n16; c++) {
            const __m512 o = _mm512_mul_ps(_mm512_loadu_ps(accbuf + (size_t)hg * d + c * 16), inv);
            char *dst = (char *)out + (hg * d + c * 16) * es;
            if (bf16) _mm256_storeu_si256((__m256i *)dst, (__m256i)_mm512_cvtneps_pbh(o));
            else _mm512_storeu_ps(dst, o);
        }
    }
}

#endif

#ifdef XT_AVX2
static inline __m256 load8(int bf16, const void *p) {
    if (bf16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
    return _mm256_loadu_ps((const float *)p);
}

static inline float hmax8(__m256 x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

static inline float hadd8(__m256 x) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
}

/* Lane j of the result is the sum of v[j]'s lanes (8 dot products finished at once). */
static inline __m256 hsum8(const __m256 *v) {
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    /* a: [sums of v0..v3 over lanes 0-3 | over lanes 4-7], b likewise for v4..v7 */
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

/* e^x for 8 floats, x <= 0: 2^n * p(f), p the AVX-512 path's polynomial; 2^n built in the
   exponent field (AVX2 has no scalef). The clamp keeps n >= -126, a normal float. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(1.5403530393381606e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static float exp_and_sum8(float *s, int len, float mx) {
    const __m256 m = _mm256_set1_ps(mx);
    __m256 total = _mm256_setzero_ps();
    int t = 0;
    for (; t + 8 <= len; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), m));
        _mm256_storeu_ps(s + t, e);
        total = _mm256_add_ps(total, e);
    }
    float rest = 0.f;
    for (; t < len; t++) { s[t] = expf(s[t] - mx); rest += s[t]; }
    return hadd8(total) + rest;
}

/* 8 floats to bf16, rounded to nearest even (no AVX-512 BF16 conversion here). */
static inline void store8_bf16(void *dst, __m256 x) {
    __m256i u = _mm256_castps_si256(x);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    _mm_storeu_si128((__m128i *)dst, _mm_packus_epi32(_mm256_castsi256_si128(u),
                                                      _mm256_extracti128_si256(u, 1)));
}

/* AVX2 + FMA path for one request: head size a multiple of 32 (<= 256), group <= 8. The
   same walk as row_avx512 with 8 lanes: tokens in blocks of 8 for Q.K (each KV head's
   block converted to fp32 once, in L1, and shared by the head's group), blocks of 16 for
   P.V with 32 output dims of the group in registers. scores: [hkv * group * len]. */
static inline __attribute__((always_inline)) void row_avx2(
        int bf16, const void *q, const kv_run *k, const kv_run *v, int len, int hkv,
        int group, int d, float scale, float *scores, float *accbuf, void *out,
        int pairs __attribute__((unused))) {  /* xt_decode takes token pairs on AVX-512 only */
    const size_t es = bf16 ? 2 : 4;
    const int n8 = d / 8, heads = hkv * group;
    const size_t row_bytes = k->row_bytes;
    const __m256 vscale = _mm256_set1_ps(scale);
    float mx[64], sum[64];
    __m256 qv[64][32];
    float kf[8 * 256];
    for (int hg = 0; hg < heads; hg++) {
        for (int c = 0; c < n8; c++)
            qv[hg][c] = _mm256_mul_ps(vscale, load8(bf16, (const char *)q + (hg * d + c * 8) * es));
        mx[hg] = -INFINITY;
    }
    int t = 0;
    for (; t + 8 <= len; t += 8) {
        const char *block = kv_at(k, t);
        if (t + 16 <= len) {
            const char *next = kv_at(k, t + 8);
            for (size_t off = 0; off < 8 * row_bytes; off += 64)
                _mm_prefetch(next + off, _MM_HINT_T0);
        }
        for (int h = 0; h < hkv; h++) {
            for (int j = 0; j < 8; j++)
                for (int c = 0; c < n8; c++)
                    _mm256_storeu_ps(kf + j * d + c * 8,
                                     load8(bf16, block + (size_t)j * row_bytes + ((size_t)h * d + c * 8) * es));
            for (int g = 0; g < group; g++) {
                const int hg = h * group + g;
                __m256 part[8];
                for (int j = 0; j < 8; j++) {
                    __m256 acc = _mm256_mul_ps(qv[hg][0], _mm256_loadu_ps(kf + j * d));
                    for (int c = 1; c < n8; c++)
                        acc = _mm256_fmadd_ps(qv[hg][c], _mm256_loadu_ps(kf + j * d + c * 8), acc);
                    part[j] = acc;
                }
                const __m256 s8 = hsum8(part);
                _mm256_storeu_ps(scores + (size_t)hg * len + t, s8);
                const float m = hmax8(s8);
                if (m > mx[hg]) mx[hg] = m;
            }
        }
    }
    for (; t < len; t++) {
        const char *kt = kv_at(k, t);
        for (int hg = 0; hg < heads; hg++) {
            const char *kh = kt + (size_t)(hg / group) * d * es;
            __m256 acc = _mm256_setzero_ps();
            for (int c = 0; c < n8; c++)
                acc = _mm256_fmadd_ps(qv[hg][c], load8(bf16, kh + c * 8 * es), acc);
            const float s = hadd8(acc);
            scores[(size_t)hg * len + t] = s;
            if (s > mx[hg]) mx[hg] = s;
        }
    }
    for (int hg = 0; hg < heads; hg++) sum[hg] = exp_and_sum8(scores + (size_t)hg * len, len, mx[hg]);
    const int chunks = d / 32;
    memset(accbuf, 0, sizeof(float) * (size_t)heads * d);
    for (int t0 = 0; t0 < len; t0 += 16) {
        const int t1 = t0 + 16 < len ? t0 + 16 : len;
        const char *block = kv_at(v, t0);
        if (t0 + 32 <= len) {
            const char *next = kv_at(v, t0 + 16);
            for (size_t off = 0; off < 16 * row_bytes; off += 64)
                _mm_prefetch(next + off, _MM_HINT_T0);
        }
        for (int h = 0; h < hkv; h++) {
            for (int c = 0; c < chunks; c++) {
                __m256 acc[XT_MAX_GROUP][4];
                float *base = accbuf + (size_t)h * group * d + c * 32;
                for (int g = 0; g < group; g++)
                    for (int j = 0; j < 4; j++) acc[g][j] = _mm256_loadu_ps(base + g * d + j * 8);
                for (int tt = t0; tt < t1; tt++) {
                    const char *vt = block + (size_t)(tt - t0) * row_bytes + ((size_t)h * d + c * 32) * es;
                    const __m256 v0 = load8(bf16, vt), v1 = load8(bf16, vt + 8 * es);
                    const __m256 v2 = load8(bf16, vt + 16 * es), v3 = load8(bf16, vt + 24 * es);
                    for (int g = 0; g < group; g++) {
                        const __m256 p = _mm256_set1_ps(scores[(size_t)(h * group + g) * len + tt]);
                        acc[g][0] = _mm256_fmadd_ps(p, v0, acc[g][0]);
                        acc[g][1] = _mm256_fmadd_ps(p, v1, acc[g][1]);
                        acc[g][2] = _mm256_fmadd_ps(p, v2, acc[g][2]);
                        acc[g][3] = _mm256_fmadd_ps(p, v3, acc[g][3]);
                    }
                }
                for (int g = 0; g < group; g++)
                    for (int j = 0; j < 4; j++) _mm256_storeu_ps(base + g * d + j * 8, acc[g][j]);
            }
        }
    }
    for (int hg = 0; hg < heads; hg++) {
        const __m256 inv = _mm256_set1_ps(1.f / sum[hg]);
        for (int c = 0; c < n8; c++) {
            const __m256 o = _mm256_mul_ps(_mm256_loadu_ps(accbuf + (size_t)hg * d + c * 8), inv);
            char *dst = (char *)out + (hg * d + c * 8) * es;
            if (bf16) store8_bf16(dst, o);
            else _mm256_storeu_ps((float *)dst, o);
        }
    }
}
#endif

#if defined(XT_AVX512) || defined(XT_AVX2)
#ifdef XT_AVX512
#define XT_ROW_SIMD row_avx512
#else
#define XT_ROW_SIMD row_avx2
#endif
/* Compile-time copies for common shapes, so that loops over group and dims unroll and
   accumulators stay in registers. */
#define XT_SPECIAL(B, G, D) \
    static void row_##B##_##G##_##D(const void *q, const kv_run *k, const kv_run *v, \
                                    int len, int hkv, float scale, float *scores, \
                                    float *accbuf, void *out, int pairs) { \
        XT_ROW_SIMD(B, q, k, v, len, hkv, G, D, scale, scores, accbuf, out, pairs); \
    }
#define XT_SPECIAL_G(B, D) XT_SPECIAL(B, 1, D) XT_SPECIAL(B, 2, D) XT_SPECIAL(B, 3, D) \
    XT_SPECIAL(B, 4, D) XT_SPECIAL(B, 5, D) XT_SPECIAL(B, 6, D) XT_SPECIAL(B, 7, D) \
    XT_SPECIAL(B, 8, D)
XT_SPECIAL_G(0, 64) XT_SPECIAL_G(1, 64) XT_SPECIAL_G(0, 128) XT_SPECIAL_G(1, 128)

typedef void (*row_fn)(const void *, const kv_run *, const kv_run *, int, int, float,
                       float *, float *, void *, int);
#define XT_ROW(B, D) { row_##B##_1_##D, row_##B##_2_##D, row_##B##_3_##D, row_##B##_4_##D, \
                       row_##B##_5_##D, row_##B##_6_##D, row_##B##_7_##D, row_##B##_8_##D }
static const row_fn special[2][2][XT_MAX_GROUP] = {
    {XT_ROW(0, 64), XT_ROW(0, 128)}, {XT_ROW(1, 64), XT_ROW(1, 128)}};
#endif

#ifdef XT_AMX
/* Q.K's B operand for one KV head: per block of 16 keys and step of 32 dims, a 16 x 16
   transpose of 32-bit words (row i: dims 32s + 2i, 2i + 1 of each key). Keys past len
   are zero. kt: [blocks][steps][16][16]. */
static void repack_keys(const char *k, size_t row_bytes, int len, int d, uint32_t *kt) {
    const int steps = d / 32, blocks = (len + 15) / 16;
    for (int b = 0; b < blocks; b++)
        for (int s = 0; s < steps; s++) {
            __m512 rows[16], cols[16];
            for (int n = 0; n < 16; n++) {
                const int t = 16 * b + n;
                rows[n] = t < len ? _mm512_loadu_ps(k + (size_t)t * row_bytes + 64 * s)
                                  : _mm512_setzero_ps();
            }
            transpose16(rows, cols);
            float *dst = (float *)(kt + ((size_t)b * steps + s) * 256);
            for (int i = 0; i < 16; i++) _mm512_store_ps(dst + 16 * i, cols[i]);
        }
}

/* P.V's B operand for one KV head: per block of 32 tokens and 16 dims, row i holds
   (v[2i][n], v[2i+1][n]) for the 16 dims n, in order (one two-source word permute).
   Tokens past len are zero. vv: [blocks][d / 16][16][16]. */
static void repack_values(const char *v, size_t row_bytes, int len, int d, uint32_t *vv) {
    const int blocks = (len + 31) / 32, chunks = d / 16;
    __m512i lo_idx, hi_idx;
    {
        uint16_t lo[32], hi[32];
        for (int n = 0; n < 16; n++) {
            lo[2 * n] = (uint16_t)n; lo[2 * n + 1] = (uint16_t)(32 + n);
            hi[2 * n] = (uint16_t)(16 + n); hi[2 * n + 1] = (uint16_t)(48 + n);
        }
        lo_idx = _mm512_loadu_si512(lo); hi_idx = _mm512_loadu_si512(hi);
    }
    for (int b = 0; b < blocks; b++)
        for (int i = 0; i < 16; i++) {
            const int t = 32 * b + 2 * i;
            for (int c = 0; c < d / 32; c++) {
                const __m512i a = t < len ? _mm512_loadu_si512(v + (size_t)t * row_bytes + 64 * c)
                                          : _mm512_setzero_si512();
                const __m512i n = t + 1 < len
                    ? _mm512_loadu_si512(v + (size_t)(t + 1) * row_bytes + 64 * c)
                    : _mm512_setzero_si512();
                uint32_t *base = vv + ((size_t)b * chunks + 2 * c) * 256 + 16 * i;
                _mm512_store_si512(base, _mm512_permutex2var_epi16(a, lo_idx, n));
                _mm512_store_si512(base + 256, _mm512_permutex2var_epi16(a, hi_idx, n));
            }
        }
}

/* repack_values for V stored in token pairs (see xt_store_kv): the pairs are already the
   B layout, so each 16-dim row of a block is one 64-byte copy. vbase: the head's first
   element (4 bytes per element of a pair). Past len: zero, and the unwritten high half of
   an odd length's last pair too. */
static void repack_value_pairs(const char *vbase, size_t pair_bytes, int len, int d,
                               uint32_t *vv) {
    const int blocks = (len + 31) / 32, chunks = d / 16;
    const __m512i low_halves = _mm512_set1_epi32(0xFFFF);
    for (int b = 0; b < blocks; b++)
        for (int i = 0; i < 16; i++) {
            const int t = 32 * b + 2 * i;
            const char *src = vbase + (size_t)(16 * b + i) * pair_bytes;
            for (int c = 0; c < chunks; c++) {
                __m512i w = _mm512_setzero_si512();
                if (t < len) {
                    w = _mm512_loadu_si512(src + 64 * c);
                    if (t + 1 == len) w = _mm512_and_si512(w, low_halves);
                }
                _mm512_store_si512(vv + ((size_t)b * chunks + c) * 256 + 16 * i, w);
            }
        }
}

/* Keys per step of the online softmax: the step's scores (32 x 128 fp32) and both
   probability buffers stay in L1, where one pass over all keys would stream them through L2. */
#define XT_KEY_CHUNK 128

/* Scores of 32 query rows (qbuf, [32][d] bf16) against nb key blocks from kt, into
   sc[32][XT_KEY_CHUNK]: rows 0-15 in tile 0 (their queries in tile 2), rows 16-31 in tile 4
   (queries in tile 5); each block's keys (tile 1) are loaded once for both halves, which
   halves the key traffic of 16-row tasks. */
static void prefill_scores(const uint16_t *qbuf, const uint32_t *kt, int nb, int d,
                           float *sc) {
    const int steps = d / 32;
    for (int b = 0; b < nb; b++) {
        _tile_zero(0); _tile_zero(4);
        for (int st = 0; st < steps; st++) {
            _tile_loadd(1, kt + ((size_t)b * steps + st) * 256, 64);
            _tile_loadd(2, qbuf + 32 * st, d * 2);
            _tile_loadd(5, qbuf + (size_t)16 * d + 32 * st, d * 2);
            _tile_dpbf16ps(0, 2, 1);
            _tile_dpbf16ps(4, 5, 1);
        }
        _tile_stored(0, sc + 16 * b, XT_KEY_CHUNK * 4);
        _tile_stored(4, sc + (size_t)16 * XT_KEY_CHUNK + 16 * b, XT_KEY_CHUNK * 4);
    }
}

/* One row's step of the online softmax over its vis visible scores (of n32 slots): raises
   *m, returns the factor that rescales what came before, adds the new mass to *l, and
   writes bf16 probabilities (zero past vis) to pr. c = scale * log2(e). */
static float softmax_step(const float *sr, int vis, int n32, float c, float *m, float *l,
                          uint16_t *pr) {
    int t = 0;
    float alpha = 1.f;
    if (vis > 0) {
        __m512 vm = _mm512_set1_ps(-INFINITY);
        for (; t + 16 <= vis; t += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(sr + t));
        if (t < vis)
            vm = _mm512_max_ps(vm, _mm512_maskz_loadu_ps((__mmask16)((1u << (vis - t)) - 1),
                                                         sr + t));
        const float mnew = fmaxf(*m, _mm512_reduce_max_ps(vm));
        alpha = *m == -INFINITY ? 0.f : exp2f((*m - mnew) * c);
        *m = mnew;
        const __m512 vc = _mm512_set1_ps(c), vmc = _mm512_set1_ps(mnew * c);
        __m512 total = _mm512_setzero_ps();
        for (t = 0; t + 32 <= vis; t += 32) {
            const __m512 e0 = exp2_16_bf16(_mm512_fmsub_ps(_mm512_loadu_ps(sr + t), vc, vmc));
            const __m512 e1 = exp2_16_bf16(_mm512_fmsub_ps(_mm512_loadu_ps(sr + t + 16), vc, vmc));
            total = _mm512_add_ps(total, _mm512_add_ps(e0, e1));
            _mm512_storeu_si512(pr + t, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
        }
        for (; t < vis; t += 16) {  /* the last < 32: masked, zeros past vis */
            const __mmask16 keep = vis - t >= 16 ? (__mmask16)0xFFFF
                                                 : (__mmask16)((1u << (vis - t)) - 1);
            const __m512 e = _mm512_maskz_mov_ps(keep, exp2_16_bf16(_mm512_fmsub_ps(
                _mm512_maskz_loadu_ps(keep, sr + t), vc, vmc)));
            total = _mm512_add_ps(total, e);
            _mm256_storeu_si256((__m256i *)(pr + t), (__m256i)_mm512_cvtneps_pbh(e));
        }
        *l = *l * alpha + _mm512_reduce_add_ps(total);
    }
    for (; t < n32; t += 16) _mm256_storeu_si256((__m256i *)(pr + t), _mm256_setzero_si256());
    return alpha;
}

/* acc[32][d] = acc * alpha[r] + P.V for nb blocks of 32 keys, 32 dims at a time:
   probabilities of rows 0-15 in tile 3 and of rows 16-31 in tile 2 (pc, [32][XT_KEY_CHUNK]
   bf16), the two 16-dim value tiles of the block in tiles 1 and 0 (each loaded once for
   both halves), accumulators 4, 5 (rows 0-15) and 6, 7 (rows 16-31). */
static void prefill_values(const uint16_t *pc, const uint32_t *vv, int nb, int rows, int d,
                           const float *alpha, float *oc, float *acc) {
    const int chunks = d / 16;
    for (int dh = 0; dh < d / 32; dh++) {
        _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
        for (int b = 0; b < nb; b++) {
            const uint32_t *vb = vv + ((size_t)b * chunks + 2 * dh) * 256;
            _tile_loadd(3, pc + 32 * b, XT_KEY_CHUNK * 2);
            _tile_loadd(2, pc + (size_t)16 * XT_KEY_CHUNK + 32 * b, XT_KEY_CHUNK * 2);
            _tile_loadd(1, vb, 64);
            _tile_loadd(0, vb + 256, 64);
            _tile_dpbf16ps(4, 3, 1);
            _tile_dpbf16ps(6, 2, 1);
            _tile_dpbf16ps(5, 3, 0);
            _tile_dpbf16ps(7, 2, 0);
        }
        _tile_stored(4, oc, 128); _tile_stored(5, oc + 16, 128);
        _tile_stored(6, oc + 16 * 32, 128); _tile_stored(7, oc + 16 * 32 + 16, 128);
        for (int r = 0; r < rows; r++) {
            const __m512 a = _mm512_set1_ps(alpha[r]);
            float *ar = acc + (size_t)r * d + 32 * dh;
            for (int j = 0; j < 2; j++)
                _mm512_storeu_ps(ar + 16 * j, _mm512_fmadd_ps(
                    _mm512_loadu_ps(ar + 16 * j), a, _mm512_loadu_ps(oc + 32 * r + 16 * j)));
        }
    }
}

/* One prefill task: 32 query rows (fewer at the end) of one query head against one KV head's
   repacked K (kt) and V (vv). Row r sees keys 0 .. visible0 + r - 1. Online softmax over
   chunks of XT_KEY_CHUNK keys, software-pipelined: chunk i's probabilities are written
   while chunk i - 1's go through P.V, so the tile unit never loads what the vector unit
   has just stored (a tile load takes no data forwarded from pending stores).
   mem: scratch of XT_PREFILL_SCRATCH(d) floats. */
#define XT_TASK_ROWS 32
#define XT_PREFILL_SCRATCH(d) ((size_t)XT_TASK_ROWS * XT_KEY_CHUNK * 2 + XT_TASK_ROWS * 32 \
                               + (size_t)XT_TASK_ROWS * (d) * 3 / 2)
static void prefill_task(const char *q, int64_t q_stride, const uint32_t *kt,
                         const uint32_t *vv, int rows, int visible0, int d, float scale,
                         float *mem, char *out, int64_t out_stride) {
    enum { R = XT_TASK_ROWS };
    const int keys = visible0 + rows - 1;
    float *sc = mem;                                                   /* [R][chunk] */
    uint16_t *pc = (uint16_t *)(sc + (size_t)R * XT_KEY_CHUNK);        /* [2][R][chunk] */
    float *oc = (float *)(pc + (size_t)2 * R * XT_KEY_CHUNK);          /* [R][32] */
    float *acc = oc + R * 32;                                          /* [R][d] */
    uint16_t *qbuf = (uint16_t *)(acc + (size_t)R * d);                /* [R][d] */
    float m[R], l[R], alpha[2][R];
    for (int r = 0; r < R; r++) {
        if (r < rows) memcpy(qbuf + (size_t)r * d, q + (size_t)r * q_stride * 2, (size_t)d * 2);
        else memset(qbuf + (size_t)r * d, 0, (size_t)d * 2);
        m[r] = -INFINITY; l[r] = 0.f;
    }
    memset(acc, 0, sizeof(float) * R * (size_t)d);
    for (int r = rows; r < R; r++) {
        memset(pc + (size_t)r * XT_KEY_CHUNK, 0, XT_KEY_CHUNK * 2);
        memset(pc + (size_t)(R + r) * XT_KEY_CHUNK, 0, XT_KEY_CHUNK * 2);
    }
    xt_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
    _tile_loadconfig(&cfg);
    const float c = scale * 1.44269504088896341f;
    const int steps = d / 32, chunks = d / 16;
    int pending = -1, pending_blocks = 0;  /* the chunk whose P.V is still to do */
    for (int k0 = 0; k0 < keys; k0 += XT_KEY_CHUNK) {
        const int n = keys - k0 < XT_KEY_CHUNK ? keys - k0 : XT_KEY_CHUNK;
        const int n32 = (n + 31) & ~31, buf = (k0 / XT_KEY_CHUNK) & 1;
        prefill_scores(qbuf, kt + (size_t)(k0 / 16) * steps * 256, (n + 15) / 16, d, sc);
        uint16_t *pb = pc + (size_t)buf * R * XT_KEY_CHUNK;
        for (int r = 0; r < rows; r++) {
            const int vis = visible0 + r - k0 < n ? visible0 + r - k0 : n;
            alpha[buf][r] = softmax_step(sc + (size_t)r * XT_KEY_CHUNK, vis, n32, c, &m[r], &l[r],
                                         pb + (size_t)r * XT_KEY_CHUNK);
        }
        if (pending >= 0)
            prefill_values(pc + (size_t)(buf ^ 1) * R * XT_KEY_CHUNK,
                           vv + (size_t)(pending / 32) * chunks * 256, pending_blocks, rows, d,
                           alpha[buf ^ 1], oc, acc);
        pending = k0;
        pending_blocks = n32 / 32;
    }
    const int last = (pending / XT_KEY_CHUNK) & 1;
    prefill_values(pc + (size_t)last * R * XT_KEY_CHUNK,
                   vv + (size_t)(pending / 32) * chunks * 256, pending_blocks, rows, d,
                   alpha[last], oc, acc);
    _tile_release();
    for (int r = 0; r < rows; r++) {
        const __m512 inv = _mm512_set1_ps(1.f / l[r]);
        char *dst = out + (size_t)r * out_stride * 2;
        for (int j = 0; j < d / 16; j++)
            _mm256_storeu_si256((__m256i *)(dst + 32 * j), (__m256i)_mm512_cvtneps_pbh(
                _mm512_mul_ps(_mm512_loadu_ps(acc + (size_t)r * d + 16 * j), inv)));
    }
}

/*
 * Causal attention of one request's chunk of q_len query tokens (query + i * q_stride,
 * [Hq, D]) over its kv_len keys (k/v + t * tok_stride, [Hkv, D]; bottom-right aligned: query
 * i sees keys 0 .. kv_len - q_len + i), bf16 on the AMX tile unit, no block table. Per KV
 * head, K and V are repacked once into the unit's layouts; then each task (query head,
 * block of 32 query tokens) runs an online softmax over its visible keys in steps of
 * XT_KEY_CHUNK: scores on the tile unit, max / exp / sum in fp32, bf16 probabilities times V
 * on the tile unit, the running output rescaled in fp32.
 * Returns 0, or -1 where this path does not apply (no AMX, head size not a multiple of
 * 64 or over 256, q_len > kv_len): the caller then uses SDPA.
 */
int xt_prefill(const void *q, int64_t q_stride, const void *k, const void *v,
               int64_t tok_stride, int q_len, int kv_len, int hq, int hkv, int d, float scale,
               void *out, int64_t out_stride, int pairs) {
    if (!amx_ready() || d % 64 != 0 || d > 256 || q_len > kv_len || q_len <= 0
        || hq % hkv != 0)
        return -1;
    const int group = hq / hkv, steps = d / 32, chunks = d / 16;
    const int kblocks = (kv_len + 15) / 16, vblocks = (kv_len + 31) / 32;
    const size_t row_bytes = (size_t)tok_stride * 2;
    const size_t kt_words = (size_t)kblocks * steps * 256;
    const size_t vv_words = (size_t)vblocks * chunks * 256;
    /* 64-byte aligned: the repacks store whole cache lines. */
    uint32_t *packed = (uint32_t *)aligned_alloc(
        64, sizeof(uint32_t) * (size_t)hkv * (kt_words + vv_words));
    if (packed == NULL) return -1;
    #pragma omp parallel for schedule(static)
    for (int h = 0; h < hkv; h++) {
        repack_keys((const char *)k + (size_t)h * d * 2, row_bytes, kv_len, d,
                    packed + (size_t)h * kt_words);
        uint32_t *vv = packed + (size_t)hkv * kt_words + (size_t)h * vv_words;
        if (pairs)
            repack_value_pairs((const char *)v + (size_t)h * d * 4, 2 * row_bytes, kv_len, d, vv);
        else
            repack_values((const char *)v + (size_t)h * d * 2, row_bytes, kv_len, d, vv);
    }
    const int qblocks = (q_len + XT_TASK_ROWS - 1) / XT_TASK_ROWS, offset = kv_len - q_len;
    int failed = 0;
    #pragma omp parallel for schedule(dynamic, 1)
    for (int task = 0; task < hq * qblocks; task++) {
        const int hg = task % hq, qb = task / hq, h = hg / group;
        const int first = XT_TASK_ROWS * qb;
        const int rows = q_len - first < XT_TASK_ROWS ? q_len - first : XT_TASK_ROWS;
        float *mem = (float *)scratch(sizeof(float) * XT_PREFILL_SCRATCH(d));
        if (mem == NULL) { failed = 1; continue; }  /* the caller redoes the chunk with SDPA */
        prefill_task((const char *)q + ((size_t)first * q_stride + (size_t)hg * d) * 2,
                     q_stride, packed + (size_t)h * kt_words,
                     packed + (size_t)hkv * kt_words + (size_t)h * vv_words, rows,
                     offset + first + 1, d, scale, mem,
                     (char *)out + ((size_t)first * out_stride + (size_t)hg * d) * 2,
                     out_stride);
    }
    free(packed);
    return failed ? -1 : 0;
}
#else
int xt_prefill(const void *q, int64_t q_stride, const void *k, const void *v,
               int64_t tok_stride, int q_len, int kv_len, int hq, int hkv, int d, float scale,
               void *out, int64_t out_stride, int pairs) {
    return -1;
}
#endif

/* Which path xt_decode takes for head sizes the SIMD paths serve ("avx512-amx" where bf16
   rows use the tile unit, "avx512", "avx2" or "generic"). */
const char *xt_isa(void) {
#ifdef XT_AMX
    if (amx_ready()) return "avx512-amx";
#endif
    return XT_ISA;
}

/*
 * One decode token per row. The rows of a step are the same for every layer, so they
 * travel in one struct built once per step (a ctypes call pays for each argument: 17 of
 * them cost ~1.6 us, five ~0.4 us). Row r: query q + q_index[r] * q_stride ([Hq, D]);
 * keys k_plane + slots[r] * slot_stride + t * tok_stride + h * D for t < lens[r];
 * output out + q_index[r] * out_stride. Strides in elements. With pairs set, V is stored in
 * token pairs (see xt_store_kv): same bytes per pair of tokens, element n of tokens 2i and
 * 2i + 1 side by side in one 32-bit word, which is the tile unit's B layout.
 * With page_table set (rows read where their pages are: page_tokens a multiple of 32), the
 * planes hold pages of page_tokens tokens, slot_stride apart, and token t of row r lies in
 * page page_table[r * table_width + t / page_tokens]; slots is not read.
 */
typedef struct {
    int32_t bf16, rows, hq, hkv, d, pairs;
    float scale;
    int64_t q_stride, out_stride, slot_stride, tok_stride;
    const int32_t *q_index;
    const int64_t *slots;
    const int32_t *lens;
    const int64_t *page_table;
    int64_t table_width;
    int32_t page_tokens;
} xt_rows;

static const int64_t xt_one_run = 0;  /* the page list of a row with a view */

/* Returns 0; -1 if the shape is unsupported (group > 8, head size > 256, over 64 query
   heads; token pairs other than bf16 on AVX-512 with a head size multiple of 64), -2 if
   scratch memory could not be had. */
int xt_decode(const xt_rows *b, const void *q, const void *k_plane, const void *v_plane,
              void *out) {
    const int bf16 = b->bf16, hq = b->hq, hkv = b->hkv, d = b->d, group = hq / hkv;
    const int pairs = b->pairs;
    const size_t es = bf16 ? 2 : 4;
    if (group > XT_MAX_GROUP || d > 256 || hq > 64) return -1;
    if (b->page_table != NULL && (b->page_tokens <= 0 || b->page_tokens % 32 != 0)) return -1;
#ifdef XT_AVX512
    if (pairs && (!bf16 || d % 64 != 0)) return -1;
#else
    if (pairs) return -1;
#endif
    int failed = 0;
#ifdef XT_AMX
    const int tiles = bf16 && amx_ready();
#endif
    #pragma omp parallel
    {
#ifdef XT_AMX
        if (tiles) decode_tiles(group);
#endif
        #pragma omp for schedule(dynamic, 1)
        for (int r = 0; r < b->rows; r++) {
            const int len = b->lens[r];
            float *scores = (float *)scratch(sizeof(float) * ((size_t)hq * (size_t)len
                                             + (size_t)hq * d + (size_t)hq * ((size_t)len / 2 + 1)));
            if (scores == NULL) { failed = 1; continue; }
            const char *qr = (const char *)q + (int64_t)b->q_index[r] * b->q_stride * es;
            char *orow = (char *)out + (int64_t)b->q_index[r] * b->out_stride * es;
            const int paged = b->page_table != NULL;
            const size_t row_off = paged ? 0 : (size_t)b->slots[r] * b->slot_stride * es;
            kv_run kr = {(const char *)k_plane + row_off, &xt_one_run, INT32_MAX, 0,
                         (size_t)b->tok_stride * es};
            if (paged) {
                kr.pages = b->page_table + (int64_t)r * b->table_width;
                kr.page_tokens = b->page_tokens;
                kr.page_bytes = (size_t)b->slot_stride * es;
            }
            kv_run vr = kr;
            vr.base = (const char *)v_plane + row_off;
#if defined(XT_AVX512) || defined(XT_AVX2)
            if (d == 64 || d == 128) {
                special[bf16 != 0][d == 128][group - 1](qr, &kr, &vr, len, hkv, b->scale,
                                                        scores, scores + (size_t)hq * len, orow,
                                                        pairs);
            } else if (d % XT_DIM_MULTIPLE == 0) {
                XT_ROW_SIMD(bf16, qr, &kr, &vr, len, hkv, group, d, b->scale, scores,
                            scores + (size_t)hq * len, orow, pairs);
            } else
#endif
            {
                for (int h = 0; h < hkv; h++)
                    head_generic(bf16, qr + (size_t)h * group * d * es, &kr, &vr,
                                 (size_t)h * d * es, len, group, d, b->scale, scores,
                                 orow + (size_t)h * group * d * es);
            }
        }
#ifdef XT_AMX
        if (tiles) _tile_release();
#endif
    }
    return failed ? -2 : 0;
}

/*
 * A step's new K/V rows into the token planes at their slots (token indices; -1 = a padded
 * token, skipped). Like xt_rows, the slots are the same for every layer and travel in one
 * struct. K rows are copied whole; V rows too, or, with pairs set (bf16 only), into token
 * pairs: token s lands in the pair starting at token 2 * (s / 2), element n in the low
 * (s even) or high (s odd) half of the pair's word n.
 */
typedef struct {
    int32_t rows, width, es, pairs;  /* width: elements per token (kv heads x head size) */
    int64_t k_stride, v_stride;      /* source row strides, elements */
    const int64_t *slots;
} xt_writes;

void xt_store_kv(const xt_writes *w, const void *key, const void *value, void *k_tokens,
                 void *v_tokens) {
    const size_t row = (size_t)w->width * (size_t)w->es;
    for (int i = 0; i < w->rows; i++) {
        const int64_t s = w->slots[i];
        if (s < 0) continue;
        memcpy((char *)k_tokens + (size_t)s * row, (const char *)key + i * w->k_stride * w->es,
               row);
        const char *src = (const char *)value + i * w->v_stride * w->es;
        if (!w->pairs) {
            memcpy((char *)v_tokens + (size_t)s * row, src, row);
            continue;
        }
        uint16_t *dst = (uint16_t *)((char *)v_tokens + (size_t)(s & ~(int64_t)1) * row) + (s & 1);
        const uint16_t *from = (const uint16_t *)src;
        for (int n = 0; n < w->width; n++) dst[2 * n] = from[n];
    }
}
"""

# Not -ffast-math: linking with it pulls in crtfastmath.o, which turns on flush-to-zero for the
# whole process on load (numpy and everything else then lose subnormals). These four allow the
# vectorised reductions without touching global FPU state.
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
          "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"]
_lock = threading.Lock()
_loaded: dict[str | None, ctypes.CDLL | None] = {}

#: Lower paths than the CPU's best, by the define that forces them (for tests and A/B runs).
FORCED_ISAS = {"avx512": "-DXT_NO_AMX", "avx2": "-DXT_FORCE_AVX2",
               "generic": "-DXT_FORCE_GENERIC"}


def _cache_dir() -> Path:
    return Path(os.environ.get("XLLM_KERNEL_CACHE", Path.home() / ".cache/xllm-plugin/kernels"))


def _cpu_key(flags: list[str]) -> str:
    cpu = cpuinfo_field("flags")
    return hashlib.sha256((SOURCE + " ".join(flags) + cpu).encode()).hexdigest()[:16]


def load(force_isa: str | None = None) -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; None if no C compiler works.

    It takes the widest SIMD path the CPU has (AVX-512 with BF16, with AMX tiles for bf16
    where present, else AVX2 with FMA, else portable C); ``force_isa`` (a key of
    :data:`FORCED_ISAS`) caps it lower, so each path can be checked on a machine that would
    pick a wider one. Ask the loaded library which path it took with :func:`isa`.
    """
    if force_isa is not None and force_isa not in FORCED_ISAS:
        raise ValueError(f"force_isa must be one of {sorted(FORCED_ISAS)}, not {force_isa!r}")
    with _lock:
        if force_isa in _loaded:
            return _loaded[force_isa]
        flags = _FLAGS + ([FORCED_ISAS[force_isa]] if force_isa else [])
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        target = _cache_dir() / f"xt_decode-{_cpu_key(flags)}.so"
        try:
            if not target.exists():
                if compiler is None:
                    raise RuntimeError("no C compiler (cc/gcc) on PATH")
                target.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory() as tmp:
                    src = Path(tmp) / "xt_decode.c"
                    src.write_text(SOURCE)
                    built = Path(tmp) / target.name
                    subprocess.run([compiler, *flags, str(src), "-o", str(built), "-lm"],
                                   check=True, capture_output=True, text=True, timeout=120)
                    os.replace(built, target)  # atomic: concurrent builders agree
            lib = ctypes.CDLL(str(target))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", "") or error
            log.warning("xTensor native decode kernel unavailable (%s); using SDPA", detail)
            _loaded[force_isa] = None
            return None
        lib.xt_isa.restype = ctypes.c_char_p
        lib.xt_isa.argtypes = []
        lib.xt_prefill.restype = ctypes.c_int
        lib.xt_prefill.argtypes = [
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float,
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
        lib.xt_decode.restype = ctypes.c_int
        lib.xt_decode.argtypes = [ctypes.c_void_p] * 5
        lib.xt_store_kv.restype = None
        lib.xt_store_kv.argtypes = [ctypes.c_void_p] * 5
        _loaded[force_isa] = lib
        return lib


def isa(lib: ctypes.CDLL) -> str:
    """The SIMD path ``lib`` runs: ``avx512-amx``, ``avx512``, ``avx2`` or ``generic``."""
    return lib.xt_isa().decode()


#: The kernel's ``bf16`` argument per supported dtype.
_DTYPE_CODES = {torch.bfloat16: 1, torch.float32: 0}


def supports(dtype: torch.dtype) -> bool:
    return dtype in _DTYPE_CODES


class _Rows(ctypes.Structure):
    """The C kernel's ``xt_rows``: one step's decode rows, shared by every layer's call."""

    _fields_ = [("bf16", ctypes.c_int32), ("rows", ctypes.c_int32), ("hq", ctypes.c_int32),
                ("hkv", ctypes.c_int32), ("d", ctypes.c_int32), ("pairs", ctypes.c_int32),
                ("scale", ctypes.c_float),
                ("q_stride", ctypes.c_int64), ("out_stride", ctypes.c_int64),
                ("slot_stride", ctypes.c_int64), ("tok_stride", ctypes.c_int64),
                ("q_index", ctypes.c_void_p), ("slots", ctypes.c_void_p),
                ("lens", ctypes.c_void_p), ("page_table", ctypes.c_void_p),
                ("table_width", ctypes.c_int64), ("page_tokens", ctypes.c_int32)]


class DecodeRows:
    """A step's decode rows, packed once and run for every layer.

    Row ``i`` reads query token ``q_index[i]`` (int32), K/V slot ``slots[i]`` (int64) and
    its first ``lens[i]`` (int32) tokens. At short contexts one layer's kernel takes a few
    µs, so the per-layer call must cost well under that: the rows travel as one C struct,
    and :meth:`run` checks the layout only when it differs from the last call's (each
    layer's query and output are fresh views of one shape, and its K/V slot planes are
    built once, so after the first layer that is a tuple comparison). ``v_pairs``: V is
    stored in token pairs (:class:`KVWrites` with ``v_pairs``; bf16 on AVX-512 with a head
    size multiple of 64), not token-major.

    :meth:`paged` builds rows read where their pages lie (a request the VMA budget left
    without a view): copying a long row's pages into a buffer first cost 3-5x the attention
    itself.
    """

    def __init__(self, lib: ctypes.CDLL, q_index: torch.Tensor, slots: torch.Tensor,
                 lens: torch.Tensor, v_pairs: bool = False) -> None:
        if not (q_index.dtype == lens.dtype == torch.int32 and slots.dtype == torch.int64
                and q_index.is_contiguous() and slots.is_contiguous() and lens.is_contiguous()
                and slots.dim() == 1 and q_index.numel() == slots.numel() == lens.numel()):
            raise ValueError("decode rows need contiguous int32 q_index and lens and int64 "
                             "slots of one length")
        self._lib = lib
        self._index = (q_index, slots, lens)  # the struct points into these
        self._rows = _Rows(rows=q_index.numel(), pairs=int(v_pairs), q_index=q_index.data_ptr(),
                           slots=slots.data_ptr(), lens=lens.data_ptr())
        self._address = ctypes.addressof(self._rows)
        self._layout: tuple | None = None
        self._pages: tuple[int, int, int] | None = None  # page tokens, lowest/highest id

    @classmethod
    def paged(cls, lib: ctypes.CDLL, q_index: torch.Tensor, page_table: torch.Tensor,
              lens: torch.Tensor, page_tokens: int, v_pairs: bool = False) -> DecodeRows:
        """Rows whose K/V :meth:`run` reads from page planes ``[pages, page_tokens, Hkv, D]``:
        row ``i``'s token ``t`` in page ``page_table[i, t // page_tokens]`` (int64
        ``[rows, width]``, padding past a row's length never read). ``page_tokens`` must be
        a multiple of 32 (the kernel's token blocks never straddle two pages)."""
        if page_tokens <= 0 or page_tokens % 32:
            raise ValueError(f"paged decode rows need pages of a multiple of 32 tokens, "
                             f"not {page_tokens}")
        if page_table.dim() != 2 or not page_table.is_contiguous():
            raise ValueError("the page table must be a contiguous [rows, width] tensor")
        if lens.numel() and int(lens.max()) > page_table.shape[1] * page_tokens:
            raise ValueError(f"a row of {int(lens.max())} tokens does not fit "
                             f"{page_table.shape[1]} pages of {page_tokens}")
        if page_table.dtype != torch.int64 or page_table.shape[0] != q_index.numel():
            raise ValueError("the page table needs one int64 row per decode row")
        rows = cls(lib, q_index, torch.zeros(q_index.numel(), dtype=torch.int64), lens, v_pairs)
        rows._index += (page_table,)
        rows._rows.page_table = page_table.data_ptr()
        rows._rows.table_width = page_table.shape[1]
        rows._rows.page_tokens = page_tokens
        ids = (int(page_table.min()), int(page_table.max())) if page_table.numel() else (0, 0)
        rows._pages = (page_tokens, *ids)
        return rows

    def __len__(self) -> int:
        return self._rows.rows

    def run(self, query: torch.Tensor, out: torch.Tensor, k_slots: torch.Tensor,
            v_slots: torch.Tensor, scale: float) -> None:
        """Attention of every row: ``query/out`` ``[tokens, Hq, D]``; ``k_slots/v_slots``
        ``[slots, max_tokens, Hkv, D]`` with contiguous ``[Hkv, D]`` per token."""
        layout = (query.shape, query.stride(), out.stride(), query.dtype, out.dtype,
                  k_slots.shape, k_slots.stride(), v_slots.stride(), k_slots.dtype,
                  v_slots.dtype, scale)
        if layout != self._layout:
            self._check(layout)
        status = self._lib.xt_decode(self._address, query.data_ptr(), k_slots.data_ptr(),
                                     v_slots.data_ptr(), out.data_ptr())
        if status != 0:
            raise (MemoryError("native decode could not allocate its scratch") if status == -2
                   else ValueError(f"native decode does not support {self._rows.hq}/"
                                   f"{self._rows.hkv} heads of size {self._rows.d}"))

    def _check(self, layout: tuple) -> None:
        (q_shape, q_stride, out_stride, dtype, out_dtype, kv_shape, kv_stride, v_stride,
         k_dtype, v_dtype, scale) = layout
        if len(q_shape) != 3 or len(kv_shape) != 4 or q_shape[1] % kv_shape[2]:
            raise ValueError("native decode needs query [tokens, Hq, D] and K/V [slots, tokens, "
                             "Hkv, D] with Hq a multiple of Hkv")
        _, num_heads, head_size = q_shape
        if (q_stride[1:] != (head_size, 1) or out_stride[1:] != (head_size, 1)
                or kv_stride[2:] != (head_size, 1) or kv_stride != v_stride
                or kv_shape[3] != head_size
                or not dtype == k_dtype == v_dtype == out_dtype or dtype not in _DTYPE_CODES):
            raise ValueError("native decode needs [tokens, heads, head_size] query/out and "
                             "[slots, tokens, kv_heads, head_size] K/V with contiguous heads, "
                             "one dtype (bfloat16 or float32)")
        if self._pages is not None:
            page_tokens, lowest, highest = self._pages
            if kv_shape[1] != page_tokens or lowest < 0 or highest >= kv_shape[0]:
                raise ValueError(f"paged decode rows read pages of {page_tokens} tokens with "
                                 f"ids {lowest}..{highest}; the planes hold {kv_shape[0]} "
                                 f"pages of {kv_shape[1]}")
        if self._rows.pairs and not supports_pairs(self._lib, dtype, head_size):
            raise ValueError("V in token pairs needs bf16, a head size multiple of 64 and the "
                             f"AVX-512 path (this kernel: {isa(self._lib)}, {dtype}, {head_size})")
        rows = self._rows
        rows.bf16, rows.hq, rows.hkv, rows.d = (_DTYPE_CODES[dtype], num_heads, kv_shape[2],
                                                head_size)
        rows.q_stride, rows.out_stride = q_stride[0], out_stride[0]
        rows.slot_stride, rows.tok_stride = kv_stride[0], kv_stride[1]
        rows.scale = scale
        self._layout = layout


def decode(lib: ctypes.CDLL, query: torch.Tensor, out: torch.Tensor, q_index: torch.Tensor,
           k_slots: torch.Tensor, v_slots: torch.Tensor, slots: torch.Tensor,
           lens: torch.Tensor, scale: float) -> None:
    """One call of :class:`DecodeRows` (for rows used by a single layer)."""
    DecodeRows(lib, q_index, slots, lens).run(query, out, k_slots, v_slots, scale)


def supports_pairs(lib: ctypes.CDLL, dtype: torch.dtype, head_size: int) -> bool:
    """Whether decode reads V stored in token pairs for this dtype and head size."""
    return dtype == torch.bfloat16 and head_size % 64 == 0 and head_size <= 256 \
        and isa(lib).startswith("avx512")


class _Writes(ctypes.Structure):
    """The C kernel's ``xt_writes``: one step's KV slots, shared by every layer's write."""

    _fields_ = [("rows", ctypes.c_int32), ("width", ctypes.c_int32), ("es", ctypes.c_int32),
                ("pairs", ctypes.c_int32), ("k_stride", ctypes.c_int64),
                ("v_stride", ctypes.c_int64), ("slots", ctypes.c_void_p)]


class KVWrites:
    """A step's new K/V rows written into the token planes, packed once for every layer.

    One C call per layer where ``index_copy_`` on K and V and the padding check took ~7 µs
    (vLLM's own cache write ~3 µs). With ``v_pairs``, V goes into token pairs: element n of
    tokens 2i and 2i + 1 side by side in one 32-bit word, the tile unit's B layout, so decode
    and prefill read V without repacking it. Slots of -1 (padded tokens) are skipped.
    """

    def __init__(self, lib: ctypes.CDLL, slots: torch.Tensor, v_pairs: bool = False) -> None:
        if slots.dim() != 1 or slots.dtype.is_floating_point:
            raise ValueError("KV slots must be a 1-D integer tensor")
        self._lib = lib
        self.source = slots  # what the caller built this from (vLLM's slot mapping)
        self._slots = slots.to(torch.int64).contiguous()
        self._writes = _Writes(rows=self._slots.numel(), pairs=int(v_pairs),
                               slots=self._slots.data_ptr())
        self._address = ctypes.addressof(self._writes)
        self._layout: tuple | None = None

    def run(self, key: torch.Tensor, value: torch.Tensor, k_tokens: torch.Tensor,
            v_tokens: torch.Tensor) -> None:
        """``key/value``: ``[>= rows, Hkv, D]`` with contiguous ``[Hkv, D]``; ``k_tokens/
        v_tokens``: contiguous ``[tokens, Hkv, D]`` planes of the same dtype."""
        layout = (key.shape, key.stride(), value.shape, value.stride(), key.dtype,
                  value.dtype, k_tokens.shape, v_tokens.shape, k_tokens.dtype, v_tokens.dtype)
        if layout != self._layout:
            self._check(layout, k_tokens, v_tokens)
        self._lib.xt_store_kv(self._address, key.data_ptr(), value.data_ptr(),
                              k_tokens.data_ptr(), v_tokens.data_ptr())

    def _check(self, layout: tuple, k_tokens: torch.Tensor, v_tokens: torch.Tensor) -> None:
        (k_shape, k_stride, v_shape, v_stride, k_dtype, v_dtype, tokens_shape, v_tokens_shape,
         tokens_dtype, v_tokens_dtype) = layout
        rows = self._writes.rows
        if (len(k_shape) != 3 or k_shape[1:] != v_shape[1:] or k_shape[1:] != tokens_shape[1:]
                or k_stride[1:] != (k_shape[2], 1) or v_stride[1:] != (k_shape[2], 1)
                or min(k_shape[0], v_shape[0]) < rows or tokens_shape != v_tokens_shape
                or not k_tokens.is_contiguous() or not v_tokens.is_contiguous()
                or not k_dtype == v_dtype == tokens_dtype == v_tokens_dtype
                or k_dtype not in _DTYPE_CODES):
            raise ValueError("KV writes need key/value [>= rows, Hkv, D] with contiguous heads "
                             "and contiguous [tokens, Hkv, D] planes, one dtype (bfloat16 or "
                             "float32)")
        if self._writes.pairs and k_dtype != torch.bfloat16:
            raise ValueError("V in token pairs is bf16 only")
        if self._writes.pairs and tokens_shape[0] % 2:
            raise ValueError("V in token pairs needs an even number of tokens per plane")
        if rows and int(self._slots.max()) >= tokens_shape[0]:
            raise ValueError(f"a KV slot is past the plane's {tokens_shape[0]} tokens")
        writes = self._writes
        writes.width = k_shape[1] * k_shape[2]
        writes.es = k_tokens.element_size()
        writes.k_stride, writes.v_stride = k_stride[0], v_stride[0]
        self._layout = layout


def values_from_pairs(pairs: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` V rows, token-major, from a ``[tokens, Hkv, D]`` view of V stored
    in token pairs (starting at an even token; at least ``length`` rounded up to even rows):
    for the rare row no native kernel takes, so SDPA can read it."""
    rows = length + (length & 1)
    _, heads, size = pairs.shape
    words = pairs[:rows].reshape(rows // 2, heads * size, 2)
    return words.transpose(1, 2).reshape(rows, heads, size)[:length]


def has_prefill(lib: ctypes.CDLL, dtype: torch.dtype) -> bool:
    """Whether :func:`prefill` runs natively for ``dtype`` (bf16 on AMX tiles), not SDPA."""
    return dtype == torch.bfloat16 and isa(lib) == "avx512-amx"


def prefill(lib: ctypes.CDLL, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            scale: float, out: torch.Tensor, v_pairs: bool = False) -> bool:
    """Causal attention of one request's chunk, bottom-right aligned, on the AMX tile unit.

    ``query/out``: ``[q_len, Hq, D]`` with contiguous heads; ``key/value``: ``[kv_len, Hkv,
    D]`` with one token stride (an xTensor view or a gathered copy). Returns False, leaving
    ``out`` to the caller, where the kernel does not apply (no AMX, not bf16, head size not
    a multiple of 64 or over 256). ``v_pairs``: ``value`` holds V in token pairs (see
    :class:`KVWrites`) from an even token on; an odd ``kv_len``'s last pair is read whole,
    its second half ignored.
    """
    q_len, num_heads, head_size = query.shape
    kv_len, num_kv_heads, _ = key.shape
    if (query.dtype != torch.bfloat16 or not query.dtype == key.dtype == value.dtype == out.dtype
            or query.stride()[1:] != (head_size, 1) or out.stride()[1:] != (head_size, 1)
            or key.stride()[1:] != (head_size, 1) or key.stride() != value.stride()):
        return False
    return lib.xt_prefill(query.data_ptr(), query.stride(0), key.data_ptr(), value.data_ptr(),
                          key.stride(0), q_len, kv_len, num_heads, num_kv_heads, head_size,
                          scale, out.data_ptr(), out.stride(0), int(v_pairs)) == 0
