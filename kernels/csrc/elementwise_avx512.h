/* AVX-512 rows of the bfloat16 elementwise operations (included by elementwise.c where the
 * compiler targets AVX-512BW; rows.c takes its bfloat16 loads and stores). The plain C loops of
 * elementwise.c vectorise, but GCC turns each bfloat16 rounding into a long select chain and
 * calls libmvec's expf out of line: RMSNorm ran at ~1.5 cycles per element and SiLU at ~2 per
 * thread, which made them a sixth of a bfloat16 prefill step. Here each rounding is one instruction (AVX512-BF16) or five integer ops, and
 * exp is inline.
 *
 * Same arithmetic as the C loops, in the same order (no contraction: -ffp-contract=off, and
 * no FMA outside exp), with two exceptions that may move a result by one float32 ulp, and so
 * rarely a bfloat16 rounding: the sum of squares adds in sixteen lanes, and exp is the
 * polynomial below rather than libm's.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "exp_avx512.h"

/* 16 bfloat16 values (lanes past the mask: 0) widened to float32. */
static inline __m512 bf16x16_load(const uint16_t *p, __mmask16 m) {
    const __m256i v = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

/* f rounded to bfloat16 (nearest even; a NaN stays a quiet NaN): f32_to_bf16 of bf16.h, lane by
 * lane, in five integer ops. */
static inline __m256i bf16x16_pack_int(__m512 f) {
    const __m512i u = _mm512_castps_si512(f), hi = _mm512_srli_epi32(u, 16);
    const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, hi, _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
}

#if defined(__AVX512BF16__)
/* The same in one instruction where the CPU has AVX512-BF16 (it rounds as f32_to_bf16 does,
 * NaN included, but flushes float32 denormals to zero: a vector holding one takes the integer
 * path, checked exhaustively against f32_to_bf16 over all 2^32 inputs). */
static inline __m256i bf16x16_pack(__m512 f) {
    const __m512i u = _mm512_castps_si512(f);
    const __mmask16 tiny = _mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7f800000));
    if (__builtin_expect(_mm512_mask_test_epi32_mask(tiny, u, _mm512_set1_epi32(0x007fffff)), 0))
        return bf16x16_pack_int(f);
    return (__m256i)_mm512_cvtneps_pbh(f);
}
#else
#define bf16x16_pack bf16x16_pack_int
#endif

static inline void bf16x16_store(uint16_t *p, __m512 f, __mmask16 m) {
    _mm256_mask_storeu_epi16(p, m, bf16x16_pack(f));
}

/* f rounded to bfloat16 and widened back: round_bf of elementwise.c. */
static inline __m512 bf16x16_round(__m512 f) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16x16_pack(f)), 16));
}

static inline __mmask16 lanes(int64_t left) {
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
}

/* One row of rms_norm_bf16 given its sum of squares s. */
static inline void rms_row_out(const uint16_t *x, const uint16_t *w, uint16_t *o, int64_t dim,
                               float s, float eps, int gemma) {
    const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(s / (float)dim + eps));
    for (int64_t j = 0; j < dim; j += 16) {
        const __mmask16 m = lanes(dim - j);
        const __m512 xv = bf16x16_load(x + j, m), wv = bf16x16_load(w + j, m);
        __m512 y;
        if (gemma)
            y = _mm512_mul_ps(_mm512_mul_ps(xv, inv), _mm512_add_ps(_mm512_set1_ps(1.0f), wv));
        else
            y = _mm512_mul_ps(wv, bf16x16_round(_mm512_mul_ps(xv, inv)));
        bf16x16_store(o + j, y, m);
    }
}

static inline void rms_row(const uint16_t *x, const uint16_t *w, uint16_t *o, int64_t dim,
                           float eps, int gemma) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < dim; j += 16) {
        const __m512 v = bf16x16_load(x + j, lanes(dim - j));
        acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
    }
    rms_row_out(x, w, o, dim, _mm512_reduce_add_ps(acc), eps, gemma);
}

static inline void add_rms_row(const uint16_t *x, const uint16_t *h, const uint16_t *w,
                               uint16_t *sum, uint16_t *o, int64_t dim, float eps, int gemma) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < dim; j += 16) {
        const __mmask16 m = lanes(dim - j);
        const __m512 v = bf16x16_round(_mm512_add_ps(bf16x16_load(x + j, m), bf16x16_load(h + j, m)));
        bf16x16_store(sum + j, v, m);
        acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
    }
    rms_row_out(sum, w, o, dim, _mm512_reduce_add_ps(acc), eps, gemma);
}

static inline void silu_mul_row(const uint16_t *g, const uint16_t *u, uint16_t *o, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = lanes(n - j);
        const __m512 x = bf16x16_load(g + j, m);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
        const __m512 silu = bf16x16_round(_mm512_div_ps(x, _mm512_add_ps(one, e)));
        bf16x16_store(o + j, _mm512_mul_ps(silu, bf16x16_load(u + j, m)), m);
    }
}

/* RoPE of every head of one token (rope_bf16 of elementwise.c): cos/sin widened once per 16
 * values for all heads. */
static inline void rope_token(uint16_t *x, int64_t head_dim, int64_t heads, int64_t half,
                              const uint16_t *cos, const uint16_t *sin) {
    for (int64_t j = 0; j < half; j += 16) {
        const __mmask16 m = lanes(half - j);
        const __m512 c = bf16x16_load(cos + j, m), s = bf16x16_load(sin + j, m);
        for (int64_t h = 0; h < heads; h++) {
            uint16_t *x1 = x + h * head_dim + j, *x2 = x1 + half;
            const __m512 a = bf16x16_load(x1, m), b = bf16x16_load(x2, m);
            bf16x16_store(x1, _mm512_sub_ps(bf16x16_round(_mm512_mul_ps(a, c)),
                                            bf16x16_round(_mm512_mul_ps(b, s))), m);
            bf16x16_store(x2, _mm512_add_ps(bf16x16_round(_mm512_mul_ps(b, c)),
                                            bf16x16_round(_mm512_mul_ps(a, s))), m);
        }
    }
}
