/* One decode task over a bfloat16 cache with a bfloat16 query, where the CPU has AVX-512 BF16:
 * head dims 64, 128 and 256. Included by paged_decode.c (exp_nonpositive, MAX_* come from it).
 *
 * The task walks its context 16 positions at a time. Each group's key rows (all the task's KV
 * heads of a position are one contiguous row) are read once for every query head and the
 * group's scores, online-softmax update and weighted values are done before the next group's
 * rows are touched, while the next group's rows are prefetched: a group is at most 16 rows of
 * 512 bytes (4 KV heads of 64), so everything it reads stays in L1, and the memory stream runs
 * ahead of the arithmetic instead of stalling at every new page of a scattered block.
 *
 * Scores: vdpbf16ps products of the bf16 query and key summed in fp32, the 16 positions' partial
 * sums added across in one transpose-and-add tree. Values: each 32-value chunk of a bf16 row is
 * widened by two unpacks against zero (a bf16 is the high half of its fp32), which leaves the
 * lanes in an interleaved order; the accumulators keep that order throughout and the output is
 * written back in the natural one. A value row is widened once for all the query heads that
 * share its KV head (GB of them at a time in registers). */
#ifndef PAGEWIRE_DECODE_BF16_DP_H
#define PAGEWIRE_DECODE_BF16_DP_H
#include <immintrin.h>

#define GROUP 16 /* positions per step of the walk */

/* Lane i of the result: the sum of the 16 lanes of v[i]. */
static inline __m512 sum_across16(__m512 v[16]) {
    __m512 u[8], w[4];
    for (int k = 0; k < 8; k++)
        u[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]),
                             _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
    for (int k = 0; k < 4; k++)
        w[k] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * k], u[2 * k + 1], 0x44),
                             _mm512_shuffle_ps(u[2 * k], u[2 * k + 1], 0xEE));
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x44),
                                     _mm512_shuffle_f32x4(w[0], w[1], 0xEE));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x44),
                                     _mm512_shuffle_f32x4(w[2], w[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88),
                         _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

/* Where accumulator lane p of a 32-value chunk holds value d: the unpacks take values 0-3 of
 * each 128-bit lane into the low vector and 4-7 into the high one. */
static inline int widened_lane(int d) {
    const int lane = d / 8, e = d % 8;
    return e < 4 ? lane * 4 + e : 16 + lane * 4 + (e - 4);
}

/* The weighted values of a group's n rows into K query heads' accumulators (j0 .. j0+K-1, all
 * of KV head hh), rescaled by the softmax's correction and kept in registers over the group:
 * each row is widened once for all K. */
#define DEFINE_VALUES(CH, K)                                                                      \
static inline void values_##CH##_##K(const uint16_t *v_cache, const int64_t *base, int64_t hh,     \
                                     int64_t n, int64_t j0, float p[][GROUP],                      \
                                     const float *correction, float acc[][MAX_DIM]) {              \
    __m512 a[K][2 * CH];                                                                          \
    for (int k = 0; k < K; k++)                                                                   \
        for (int c = 0; c < 2 * CH; c++)                                                          \
            a[k][c] = _mm512_mul_ps(_mm512_loadu_ps(acc[j0 + k] + 16 * c),                        \
                                    _mm512_set1_ps(correction[j0 + k]));                          \
    for (int64_t i = 0; i < n; i++) {                                                             \
        const uint16_t *vr = v_cache + base[i] + hh * 32 * CH;                                    \
        __m512 v[2 * CH];                                                                         \
        for (int c = 0; c < CH; c++) {                                                            \
            const __m512i raw = _mm512_loadu_si512(vr + 32 * c);                                  \
            v[2 * c] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), raw));   \
            v[2 * c + 1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), raw)); \
        }                                                                                         \
        for (int k = 0; k < K; k++) {                                                             \
            const __m512 w = _mm512_set1_ps(p[j0 + k][i]);                                        \
            for (int c = 0; c < 2 * CH; c++) a[k][c] = _mm512_fmadd_ps(w, v[c], a[k][c]);         \
        }                                                                                         \
    }                                                                                             \
    for (int k = 0; k < K; k++)                                                                   \
        for (int c = 0; c < 2 * CH; c++) _mm512_storeu_ps(acc[j0 + k] + 16 * c, a[k][c]);         \
}

/* exp_nonpositive on 16 lanes: the same polynomial, 2^n applied by vscalefps. */
static inline __m512 exp_nonpositive16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693145751953125f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.42860682030941723e-6f), r);
    __m512 p = _mm512_set1_ps(1.f / 720.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* One query head's scores for a group of n rows, folded into its online softmax: p the group's
 * weights (0 past n); returns the factor the head's accumulator must be scaled by (the values
 * step applies it as it loads the accumulator). */
static inline float group_softmax(__m512 dots[GROUP], int64_t n, float scale, float softcap,
                                  float *p, float *run_max, float *run_sum) {
    __m512 s = _mm512_mul_ps(sum_across16(dots), _mm512_set1_ps(scale));
    if (softcap > 0.f) {
        float t[GROUP];
        _mm512_storeu_ps(t, s);
        for (int i = 0; i < GROUP; i++) t[i] = softcap * tanhf(t[i] / softcap);
        s = _mm512_loadu_ps(t);
    }
    const __mmask16 valid = (__mmask16)((1u << n) - 1u);
    s = _mm512_mask_mov_ps(_mm512_set1_ps(-FLT_MAX), valid, s);
    const float group_max = _mm512_reduce_max_ps(s);
    const float m = group_max > *run_max ? group_max : *run_max;
    const __m512 e = _mm512_maskz_mov_ps(valid, exp_nonpositive16(_mm512_sub_ps(s, _mm512_set1_ps(m))));
    _mm512_storeu_ps(p, e);
    const float correction = expf(*run_max - m); /* 0 on the first group */
    *run_sum = *run_sum * correction + _mm512_reduce_add_ps(e);
    *run_max = m;
    return correction;
}

/* The walk's position: a block of the table and an offset in it. */
struct cursor { int64_t blk, off; };

/* Rows (element offsets, at the task's first KV head) of the next min(count, GROUP) positions
 * from the cursor, which moves past them, and a prefetch of each row's K and V cache lines. A
 * table entry is read only for a position the sequence has (count > 0). */
static inline void group_rows(struct cursor *cur, const int32_t *table, int64_t block_size,
                              int64_t row, int64_t head_offset, int64_t count, int64_t lines,
                              const uint16_t *k_cache, const uint16_t *v_cache, int64_t *rows) {
    for (int64_t i = 0; i < GROUP && i < count; i++) {
        rows[i] = ((int64_t)table[cur->blk] * block_size + cur->off) * row + head_offset;
        if (++cur->off == block_size) { cur->off = 0; cur->blk++; }
        for (int64_t l = 0; l < lines; l++) {
            _mm_prefetch((const char *)(k_cache + rows[i]) + 64 * l, _MM_HINT_T0);
            _mm_prefetch((const char *)(v_cache + rows[i]) + 64 * l, _MM_HINT_T0);
        }
    }
}

/* CH: 32-value chunks per head (head_dim / 32); GB: query heads whose accumulators sit in
 * registers at once (2 * CH vectors each). Rows are found and prefetched two groups ahead. */
#define DEFINE_DP_TASK(CH, GB)                                                                    \
DEFINE_VALUES(CH, GB)                                                                             \
static void dp_task_##CH(const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *table,  \
                         int64_t block_size, int64_t row, int64_t h0, int64_t span, int64_t group, \
                         int64_t first, int64_t len, const uint16_t qb[][MAX_DIM], float scale,   \
                         float softcap, float acc[][MAX_DIM], float *run_max, float *run_sum) {   \
    const int64_t head_dim = 32 * CH;                                                             \
    const int64_t lines = (span * head_dim * 2 + 63) / 64; /* cache lines of a task's row */       \
    struct cursor cur = {first / block_size, first % block_size};                                 \
    int64_t base[GROUP], next[GROUP], ahead[GROUP];                                               \
    group_rows(&cur, table, block_size, row, h0 * head_dim, len - first, lines, k_cache, v_cache, next); \
    group_rows(&cur, table, block_size, row, h0 * head_dim, len - first - GROUP, lines, k_cache,  \
               v_cache, ahead);                                                                   \
    for (int64_t t0 = first; t0 < len; t0 += GROUP) {                                             \
        const int64_t n = len - t0 < GROUP ? len - t0 : GROUP;                                    \
        memcpy(base, next, sizeof base);                                                          \
        memcpy(next, ahead, sizeof next);                                                         \
        group_rows(&cur, table, block_size, row, h0 * head_dim, len - t0 - 2 * GROUP, lines,      \
                   k_cache, v_cache, ahead);                                                      \
        float p[MAX_QHEADS][GROUP], correction[MAX_QHEADS];                                       \
        for (int64_t hh = 0; hh < span; hh++)                                                     \
            for (int64_t g = 0; g < group; g++) {                                                 \
                const int64_t j = hh * group + g;                                                 \
                __m512bh qv[CH];                                                                  \
                for (int c = 0; c < CH; c++) qv[c] = (__m512bh)_mm512_loadu_si512(qb[j] + 32 * c); \
                __m512 dots[GROUP];                                                               \
                for (int64_t i = 0; i < GROUP; i++) {                                             \
                    dots[i] = _mm512_setzero_ps();                                                \
                    if (i >= n) continue;                                                         \
                    const uint16_t *kr = k_cache + base[i] + hh * head_dim;                       \
                    for (int c = 0; c < CH; c++)                                                  \
                        dots[i] = _mm512_dpbf16_ps(dots[i],                                       \
                            (__m512bh)_mm512_loadu_si512(kr + 32 * c), qv[c]);                    \
                }                                                                                 \
                correction[j] = group_softmax(dots, n, scale, softcap, p[j], &run_max[j],        \
                                              &run_sum[j]);                                       \
            }                                                                                     \
        for (int64_t hh = 0; hh < span; hh++) {                                                   \
            int64_t g0 = 0;                                                                       \
            for (; g0 + GB <= group; g0 += GB)                                                    \
                values_##CH##_##GB(v_cache, base, hh, n, hh * group + g0, p, correction, acc);    \
            for (; g0 < group; g0++)                                                              \
                values_##CH##_1(v_cache, base, hh, n, hh * group + g0, p, correction, acc);       \
        }                                                                                         \
    }                                                                                             \
}
DEFINE_VALUES(2, 1)
DEFINE_VALUES(4, 1)
DEFINE_DP_TASK(2, 4)
DEFINE_DP_TASK(4, 2)
DEFINE_DP_TASK(8, 1)

/* Run the task if this head dim has a dp kernel; 0 when it does not. The accumulators come back
 * in the natural order. */
static int dp_task(const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *table,
                   int64_t block_size, int64_t row, int64_t h0, int64_t span, int64_t group,
                   int64_t head_dim, int64_t first, int64_t len, const uint16_t qb[][MAX_DIM],
                   float scale, float softcap, float acc[][MAX_DIM], float *run_max,
                   float *run_sum) {
    switch (head_dim) {
    case 64: dp_task_2(k_cache, v_cache, table, block_size, row, h0, span, group, first, len, qb,
                       scale, softcap, acc, run_max, run_sum); break;
    case 128: dp_task_4(k_cache, v_cache, table, block_size, row, h0, span, group, first, len, qb,
                        scale, softcap, acc, run_max, run_sum); break;
    case 256: dp_task_8(k_cache, v_cache, table, block_size, row, h0, span, group, first, len, qb,
                        scale, softcap, acc, run_max, run_sum); break;
    default: return 0;
    }
    float natural[MAX_DIM];
    for (int64_t j = 0; j < span * group; j++) {
        for (int64_t d = 0; d < head_dim; d++) natural[d] = acc[j][d / 32 * 32 + widened_lane(d % 32)];
        memcpy(acc[j], natural, head_dim * sizeof(float));
    }
    return 1;
}
#endif
