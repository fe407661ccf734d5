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
which runs its ``vec`` path there.

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

/* Portable path: any head size and group, bf16 (bf16 != 0) or fp32. */
static void head_generic(int bf16, const void *q, const void *k, const void *v, int64_t ts,
                         int len, int group, int d, float scale, float *scores, void *out) {
    const size_t es = bf16 ? 2 : 4;
    float qf[XT_MAX_GROUP * 256], row[256], acc[XT_MAX_GROUP * 256], mx[XT_MAX_GROUP];
    for (int i = 0; i < group * d; i++) {
        qf[i] = scale * (bf16 ? bf16_to_f32(((const uint16_t *)q)[i]) : ((const float *)q)[i]);
        acc[i] = 0.f;
    }
    for (int g = 0; g < group; g++) mx[g] = -INFINITY;
    for (int t = 0; t < len; t++) {
        const char *kt = (const char *)k + (size_t)t * ts * es;
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
        const char *vt = (const char *)v + (size_t)t * ts * es;
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

/* e^x for 16 floats: 2^n * 2^f with a degree-6 polynomial (rel. error ~1e-7). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
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
        int bf16, const void *q, const void *k, const void *v, int64_t ts, int len, int hkv,
        int group, int d, float scale, float *scores, float *accbuf, void *out) {
    const size_t es = bf16 ? 2 : 4;
    const int n16 = d / 16, n32 = d / 32, heads = hkv * group;
    const size_t row_bytes = (size_t)ts * es;
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
    int t = 0;
    for (; t + 16 <= len; t += 16) {
        const char *block = (const char *)k + (size_t)t * row_bytes;
        if (t + 32 <= len)
            for (size_t off = 0; off < 16 * row_bytes; off += 64)
                _mm_prefetch(block + 16 * row_bytes + off, _MM_HINT_T0);
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
        const char *kt = (const char *)k + (size_t)t * row_bytes;
        for (int hg = 0; hg < heads; hg++) {
            const float s = _mm512_reduce_add_ps(
                dot_partial(bf16, qb[hg], qf[hg], kt + (size_t)(hg / group) * d * es, n16, n32));
            scores[(size_t)hg * len + t] = s;
            if (s > mx[hg]) mx[hg] = s;
        }
    }
    for (int hg = 0; hg < heads; hg++) sum[hg] = exp_and_sum16(scores + (size_t)hg * len, len, mx[hg]);
    /* P.V: accumulators of 64 output dims of a head's group live in registers for one
       block of tokens, and in accbuf between blocks. */
    const int chunks = d / 64;
    memset(accbuf, 0, sizeof(float) * (size_t)heads * d);
    for (int t0 = 0; t0 < len; t0 += 16) {
        const int t1 = t0 + 16 < len ? t0 + 16 : len;
        const char *block = (const char *)v + (size_t)t0 * row_bytes;
        if (t0 + 32 <= len)
            for (size_t off = 0; off < 16 * row_bytes; off += 64)
                _mm_prefetch(block + 16 * row_bytes + off, _MM_HINT_T0);
        for (int h = 0; h < hkv; h++) {
            for (int c = 0; c < chunks; c++) {
                __m512 acc[XT_MAX_GROUP][4];
                for (int g = 0; g < group; g++)
                    for (int j = 0; j < 4; j++)
                        acc[g][j] = _mm512_loadu_ps(accbuf + ((size_t)(h * group + g) * d + c * 64 + j * 16));
                for (int tt = t0; tt < t1; tt++) {
                    const char *vt = (const char *)v + (size_t)tt * row_bytes + ((size_t)h * d + c * 64) * es;
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
        int bf16, const void *q, const void *k, const void *v, int64_t ts, int len, int hkv,
        int group, int d, float scale, float *scores, float *accbuf, void *out) {
    const size_t es = bf16 ? 2 : 4;
    const int n8 = d / 8, heads = hkv * group;
    const size_t row_bytes = (size_t)ts * es;
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
        const char *block = (const char *)k + (size_t)t * row_bytes;
        if (t + 16 <= len)
            for (size_t off = 0; off < 8 * row_bytes; off += 64)
                _mm_prefetch(block + 8 * row_bytes + off, _MM_HINT_T0);
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
        const char *kt = (const char *)k + (size_t)t * row_bytes;
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
        const char *block = (const char *)v + (size_t)t0 * row_bytes;
        if (t0 + 32 <= len)
            for (size_t off = 0; off < 16 * row_bytes; off += 64)
                _mm_prefetch(block + 16 * row_bytes + off, _MM_HINT_T0);
        for (int h = 0; h < hkv; h++) {
            for (int c = 0; c < chunks; c++) {
                __m256 acc[XT_MAX_GROUP][4];
                float *base = accbuf + (size_t)h * group * d + c * 32;
                for (int g = 0; g < group; g++)
                    for (int j = 0; j < 4; j++) acc[g][j] = _mm256_loadu_ps(base + g * d + j * 8);
                for (int tt = t0; tt < t1; tt++) {
                    const char *vt = (const char *)v + (size_t)tt * row_bytes + ((size_t)h * d + c * 32) * es;
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
    static void row_##B##_##G##_##D(const void *q, const void *k, const void *v, int64_t ts, \
                                    int len, int hkv, float scale, float *scores, \
                                    float *accbuf, void *out) { \
        XT_ROW_SIMD(B, q, k, v, ts, len, hkv, G, D, scale, scores, accbuf, out); \
    }
#define XT_SPECIAL_G(B, D) XT_SPECIAL(B, 1, D) XT_SPECIAL(B, 2, D) XT_SPECIAL(B, 3, D) \
    XT_SPECIAL(B, 4, D) XT_SPECIAL(B, 5, D) XT_SPECIAL(B, 6, D) XT_SPECIAL(B, 7, D) \
    XT_SPECIAL(B, 8, D)
XT_SPECIAL_G(0, 64) XT_SPECIAL_G(1, 64) XT_SPECIAL_G(0, 128) XT_SPECIAL_G(1, 128)

typedef void (*row_fn)(const void *, const void *, const void *, int64_t, int, int, float,
                       float *, float *, void *);
#define XT_ROW(B, D) { row_##B##_1_##D, row_##B##_2_##D, row_##B##_3_##D, row_##B##_4_##D, \
                       row_##B##_5_##D, row_##B##_6_##D, row_##B##_7_##D, row_##B##_8_##D }
static const row_fn special[2][2][XT_MAX_GROUP] = {
    {XT_ROW(0, 64), XT_ROW(0, 128)}, {XT_ROW(1, 64), XT_ROW(1, 128)}};
#endif

/* Which path xt_decode takes for head sizes the SIMD paths serve ("avx512", "avx2" or
   "generic"). */
const char *xt_isa(void) { return XT_ISA; }

/*
 * One decode token per row. Row r: query q + q_index[r] * q_stride ([Hq, D]);
 * keys k_plane + slots[r] * slot_stride + t * tok_stride + h * D for t < lens[r];
 * output out + q_index[r] * out_stride. Strides in elements. Returns 0, or -1 if the
 * shape is unsupported (group > 8 or head size > 256).
 */
int xt_decode(int bf16, const void *q, int64_t q_stride, const int32_t *q_index,
              const void *k_plane, const void *v_plane, int64_t slot_stride,
              int64_t tok_stride, const int64_t *slots, const int32_t *lens, int rows,
              int hq, int hkv, int d, float scale, void *out, int64_t out_stride) {
    const int group = hq / hkv;
    const size_t es = bf16 ? 2 : 4;
    if (group > XT_MAX_GROUP || d > 256 || hq > 64) return -1;
    #pragma omp parallel for schedule(dynamic, 1)
    for (int r = 0; r < rows; r++) {
        const int len = lens[r];
        float *scores = (float *)malloc(sizeof(float) * ((size_t)hq * (size_t)len + (size_t)hq * d));
        const char *qr = (const char *)q + (int64_t)q_index[r] * q_stride * es;
        const char *kr = (const char *)k_plane + slots[r] * slot_stride * es;
        const char *vr = (const char *)v_plane + slots[r] * slot_stride * es;
        char *orow = (char *)out + (int64_t)q_index[r] * out_stride * es;
#if defined(XT_AVX512) || defined(XT_AVX2)
        if (d == 64 || d == 128) {
            special[bf16 != 0][d == 128][group - 1](qr, kr, vr, tok_stride, len, hkv, scale,
                                                    scores, scores + (size_t)hq * len, orow);
        } else if (d % XT_DIM_MULTIPLE == 0) {
            XT_ROW_SIMD(bf16, qr, kr, vr, tok_stride, len, hkv, group, d, scale, scores,
                        scores + (size_t)hq * len, orow);
        } else
#endif
        {
            for (int h = 0; h < hkv; h++)
                head_generic(bf16, qr + (size_t)h * group * d * es, kr + (size_t)h * d * es,
                             vr + (size_t)h * d * es, tok_stride, len, group, d, scale, scores,
                             orow + (size_t)h * group * d * es);
        }
        free(scores);
    }
    return 0;
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
FORCED_ISAS = {"avx2": "-DXT_FORCE_AVX2", "generic": "-DXT_FORCE_GENERIC"}


def _cache_dir() -> Path:
    return Path(os.environ.get("XLLM_KERNEL_CACHE", Path.home() / ".cache/xllm-plugin/kernels"))


def _cpu_key(flags: list[str]) -> str:
    cpu = cpuinfo_field("flags")
    return hashlib.sha256((SOURCE + " ".join(flags) + cpu).encode()).hexdigest()[:16]


def load(force_isa: str | None = None) -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; None if no C compiler works.

    It takes the widest SIMD path the CPU has (AVX-512 with BF16, else AVX2 with FMA,
    else portable C); ``force_isa`` (a key of :data:`FORCED_ISAS`) caps it lower, so
    each path can be checked on a machine that would pick a wider one. Ask the loaded
    library which path it took with :func:`isa`.
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
        lib.xt_decode.restype = ctypes.c_int
        lib.xt_decode.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float,
            ctypes.c_void_p, ctypes.c_int64]
        _loaded[force_isa] = lib
        return lib


def isa(lib: ctypes.CDLL) -> str:
    """The SIMD path ``lib`` was built with: ``avx512``, ``avx2`` or ``generic``."""
    return lib.xt_isa().decode()


def supports(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float32)


def decode(lib: ctypes.CDLL, query: torch.Tensor, out: torch.Tensor, q_index: torch.Tensor,
           k_slots: torch.Tensor, v_slots: torch.Tensor, slots: torch.Tensor,
           lens: torch.Tensor, scale: float) -> None:
    """Decode attention for the rows given by ``q_index`` (query token per row).

    ``query/out``: ``[tokens, Hq, D]``; ``k_slots/v_slots``: ``[slots, max_tokens, Hkv, D]``
    with contiguous ``[Hkv, D]`` per token; ``slots`` (int64) and ``lens`` (int32) per row.
    """
    _, num_heads, head_size = query.shape
    _, _, num_kv_heads, _ = k_slots.shape
    assert query.stride(2) == 1 and query.stride(1) == head_size
    assert out.stride(2) == 1 and out.stride(1) == head_size
    assert k_slots.stride()[2:] == (head_size, 1) and k_slots.stride() == v_slots.stride()
    assert query.dtype == k_slots.dtype == out.dtype and supports(query.dtype)
    status = lib.xt_decode(
        int(query.dtype == torch.bfloat16), query.data_ptr(), query.stride(0),
        q_index.data_ptr(), k_slots.data_ptr(), v_slots.data_ptr(), k_slots.stride(0),
        k_slots.stride(1), slots.data_ptr(), lens.data_ptr(), int(slots.shape[0]), num_heads,
        num_kv_heads, head_size, float(scale), out.data_ptr(), out.stride(0))
    if status != 0:
        raise ValueError(f"native decode does not support {num_heads}/{num_kv_heads} heads of "
                         f"size {head_size}")
