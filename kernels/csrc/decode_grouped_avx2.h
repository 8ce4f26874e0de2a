/* One decode task over fp32 caches where the CPU has AVX2 and FMA but not AVX-512: head dims 64,
 * 128 and 256, tasks of one KV head (batches under 8) or of all of a sequence's (8 and more).
 * Included by paged_decode.c (MAX_* come from it) in place of decode_grouped.h, whose walk it
 * follows at half the width.
 *
 * The task walks its context 8 positions at a time: the group's key rows are read once for every
 * query head, and its scores, online-softmax update and weighted values are done before the next
 * group's rows are touched, while every cache line of the K and V rows two groups ahead is
 * prefetched. Scores are built four positions by two query heads at a time (eight FMA chains in
 * flight; one chain per dot product waited on each FMA's latency), then added across in one hadd
 * tree. Values: a head's row is loaded in chunks of four vectors, each chunk once for up to two
 * query heads of its KV head, whose accumulators stay in registers over the group (AVX2 has 16
 * vector registers). Against paged_decode.c's tile walk on a Zen 3 (2 threads, fp32, head dim 64,
 * 8 query and 4 KV heads, caches evicted before each call, medians of 9 calls in each of 3 runs
 * on a VM whose speed moved between runs): 64 sequences of 256-384 positions over 8 layers
 * 22.1 / 24.9 / 28.3 -> 21.6 / 23.4 / 26.4 ms, 4 of 300 1.74 / 2.54 / 2.56 -> 1.48 / 2.54 / 2.32,
 * 1 of 200 0.36 / 0.40 / 0.56 -> 0.28 / 0.33 / 0.51; 16 of 256-384 no better (5.9 / 7.4 / 6.2 ->
 * 6.5 / 8.7 / 6.1). Warm in L3 (8 of 320, 1 thread) 13.6 -> 21.5 GB/s; from memory a thread gets
 * under half of that (8.5-10 GB/s, where a plain sum streams 19): prefetching into L2 (T1), every
 * other line, or spread over the group measured no better, and the KV cache on transparent huge
 * pages no better served (docs/BENCHMARKS.md). */
#ifndef PAGEWIRE_DECODE_GROUPED_AVX2_H
#define PAGEWIRE_DECODE_GROUPED_AVX2_H
#include <immintrin.h>

#include "vec_avx2.h"

#define GROUP8 8 /* positions per step of the walk */
#define CHUNK 4  /* value vectors per pass */

/* Lane i of the result: the sum of the 8 lanes of v[i]. */
static inline __m256 sum_across8(const __m256 v[8]) {
    const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* One query head's scores for a group of n rows, folded into its online softmax: p the group's
 * weights (0 past n); returns the factor the head's accumulator must be scaled by. */
static inline float group_softmax8(const __m256 dots[GROUP8], int64_t n, float scale,
                                   float softcap, float *p, float *run_max, float *run_sum) {
    __m256 s = _mm256_mul_ps(sum_across8(dots), _mm256_set1_ps(scale));
    if (softcap > 0.f) {
        float t[GROUP8];
        _mm256_storeu_ps(t, s);
        for (int i = 0; i < GROUP8; i++) t[i] = softcap * tanhf(t[i] / softcap);
        s = _mm256_loadu_ps(t);
    }
    const __m256 valid = _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7),
                                       _mm256_set1_ps((float)n), _CMP_LT_OQ);
    s = _mm256_blendv_ps(_mm256_set1_ps(-FLT_MAX), s, valid);
    const float group_max = max8(s);
    const float m = group_max > *run_max ? group_max : *run_max;
    const __m256 e = _mm256_and_ps(valid, exp8(_mm256_sub_ps(s, _mm256_set1_ps(m))));
    _mm256_storeu_ps(p, e);
    const float correction = expf(*run_max - m); /* 0 on the first group */
    *run_sum = *run_sum * correction + add8(e);
    *run_max = m;
    return correction;
}

/* The walk's position: a block of the table and an offset in it. */
struct cursor8 { int64_t blk, off; };

/* Rows (element offsets, at the task's first KV head) of the next min(count, GROUP8) positions
 * from the cursor, which moves past them, and a prefetch of each row's K and V cache lines
 * (`lines` of them from the row's start). A table entry is read only for a position the sequence
 * has (count > 0). */
static inline void group_rows8(struct cursor8 *cur, const int32_t *table, int64_t block_size,
                               int64_t row, int64_t head_offset, int64_t count, int64_t lines,
                               const float *k_cache, const float *v_cache, int64_t *rows) {
    for (int64_t i = 0; i < GROUP8 && i < count; i++) {
        rows[i] = ((int64_t)table[cur->blk] * block_size + cur->off) * row + head_offset;
        if (++cur->off == block_size) { cur->off = 0; cur->blk++; }
        for (int64_t l = 0; l < lines; l++) {
            _mm_prefetch((const char *)(k_cache + rows[i]) + 64 * l, _MM_HINT_T0);
            _mm_prefetch((const char *)(v_cache + rows[i]) + 64 * l, _MM_HINT_T0);
        }
    }
}

/* The scores of a group's n rows for K query heads (j0 .. j0+K-1, all of KV head hh) folded into
 * their online softmax: four positions at a time, so 4K dot products build up at once (one chain
 * per product would wait on each FMA's latency), each key vector loaded once for all K heads.
 * Positions past n read row n-1 again; group_softmax8 masks them. */
#define DEFINE_SCORES8(NAME, NV, K)                                                               \
static inline void NAME(const float *k_cache, const int64_t *base, int64_t hh, int64_t n,         \
                        const float q[][MAX_DIM], int64_t j0, float scale, float softcap,         \
                        float p[][GROUP8], float *correction, float *run_max, float *run_sum) {   \
    __m256 dots[K][GROUP8];                                                                       \
    for (int i0 = 0; i0 < GROUP8; i0 += 4) {                                                      \
        const float *kr[4];                                                                       \
        for (int r = 0; r < 4; r++)                                                               \
            kr[r] = k_cache + base[i0 + r < n ? i0 + r : n - 1] + hh * 8 * NV;                    \
        __m256 a[K][4];                                                                           \
        for (int k = 0; k < K; k++)                                                               \
            for (int r = 0; r < 4; r++) a[k][r] = _mm256_setzero_ps();                            \
        for (int c = 0; c < NV; c++) {                                                            \
            __m256 kv[4];                                                                         \
            for (int r = 0; r < 4; r++) kv[r] = _mm256_loadu_ps(kr[r] + 8 * c);                  \
            for (int k = 0; k < K; k++) {                                                         \
                const __m256 qv = _mm256_loadu_ps(q[j0 + k] + 8 * c);                             \
                for (int r = 0; r < 4; r++) a[k][r] = _mm256_fmadd_ps(kv[r], qv, a[k][r]);        \
            }                                                                                     \
        }                                                                                         \
        for (int k = 0; k < K; k++)                                                               \
            for (int r = 0; r < 4; r++) dots[k][i0 + r] = a[k][r];                                \
    }                                                                                             \
    for (int k = 0; k < K; k++)                                                                   \
        correction[j0 + k] = group_softmax8(dots[k], n, scale, softcap, p[j0 + k],               \
                                            &run_max[j0 + k], &run_sum[j0 + k]);                  \
}

/* The weighted values of a group's n rows into K query heads' accumulators (j0 .. j0+K-1, all
 * of KV head hh), rescaled by the softmax's correction, CHUNK vectors of the head at a time. */
#define DEFINE_VALUES8(NAME, NV, K)                                                               \
static inline void NAME(const float *v_cache, const int64_t *base, int64_t hh, int64_t n,         \
                        int64_t j0, float p[][GROUP8], const float *correction,                   \
                        float acc[][MAX_DIM]) {                                                   \
    for (int c0 = 0; c0 < NV; c0 += CHUNK) {                                                      \
        __m256 a[K][CHUNK];                                                                       \
        for (int k = 0; k < K; k++)                                                               \
            for (int c = 0; c < CHUNK; c++)                                                       \
                a[k][c] = _mm256_mul_ps(_mm256_loadu_ps(acc[j0 + k] + 8 * (c0 + c)),              \
                                        _mm256_set1_ps(correction[j0 + k]));                      \
        for (int64_t i = 0; i < n; i++) {                                                         \
            const float *vr = v_cache + base[i] + hh * 8 * NV + 8 * c0;                           \
            __m256 v[CHUNK];                                                                      \
            for (int c = 0; c < CHUNK; c++) v[c] = _mm256_loadu_ps(vr + 8 * c);                   \
            for (int k = 0; k < K; k++) {                                                         \
                const __m256 w = _mm256_set1_ps(p[j0 + k][i]);                                    \
                for (int c = 0; c < CHUNK; c++) a[k][c] = _mm256_fmadd_ps(w, v[c], a[k][c]);      \
            }                                                                                     \
        }                                                                                         \
        for (int k = 0; k < K; k++)                                                               \
            for (int c = 0; c < CHUNK; c++)                                                       \
                _mm256_storeu_ps(acc[j0 + k] + 8 * (c0 + c), a[k][c]);                            \
    }                                                                                             \
}

/* The task: NV fp32 vectors per head (head_dim / 8); q the task's (scaled) queries. */
#define DEFINE_TASK8(NAME, NV, SCO2, SCO1, VAL2, VAL1)                                    \
static void NAME(const float *k_cache, const float *v_cache, const int32_t *table,                \
                 int64_t block_size, int64_t row, int64_t h0, int64_t span, int64_t group,        \
                 int64_t first, int64_t len, const float q[][MAX_DIM], float scale,               \
                 float softcap, float acc[][MAX_DIM], float *run_max, float *run_sum) {           \
    const int64_t head_dim = 8 * NV;                                                              \
    const int64_t lines = (span * head_dim * 4 + 63) / 64; /* cache lines of a task's row */      \
    struct cursor8 cur = {first / block_size, first % block_size};                                \
    int64_t base[GROUP8], next[GROUP8], ahead[GROUP8];                                            \
    group_rows8(&cur, table, block_size, row, h0 * head_dim, len - first, lines, k_cache,         \
                v_cache, next);                                                                   \
    group_rows8(&cur, table, block_size, row, h0 * head_dim, len - first - GROUP8, lines,         \
                k_cache, v_cache, ahead);                                                         \
    for (int64_t t0 = first; t0 < len; t0 += GROUP8) {                                            \
        const int64_t n = len - t0 < GROUP8 ? len - t0 : GROUP8;                                  \
        memcpy(base, next, sizeof base);                                                          \
        memcpy(next, ahead, sizeof next);                                                         \
        group_rows8(&cur, table, block_size, row, h0 * head_dim, len - t0 - 2 * GROUP8, lines,    \
                    k_cache, v_cache, ahead);                                                     \
        float p[MAX_QHEADS][GROUP8], correction[MAX_QHEADS];                                      \
        for (int64_t hh = 0; hh < span; hh++) {                                                   \
            int64_t g0 = 0;                                                                       \
            for (; g0 + 2 <= group; g0 += 2)                                                      \
                SCO2(k_cache, base, hh, n, q, hh * group + g0, scale, softcap, p, correction,     \
                     run_max, run_sum);                                                           \
            for (; g0 < group; g0++)                                                              \
                SCO1(k_cache, base, hh, n, q, hh * group + g0, scale, softcap, p, correction,     \
                     run_max, run_sum);                                                           \
        }                                                                                         \
        for (int64_t hh = 0; hh < span; hh++) {                                                   \
            int64_t g0 = 0;                                                                       \
            for (; g0 + 2 <= group; g0 += 2) VAL2(v_cache, base, hh, n, hh * group + g0, p, correction, acc); \
            for (; g0 < group; g0++) VAL1(v_cache, base, hh, n, hh * group + g0, p, correction, acc); \
        }                                                                                         \
    }                                                                                             \
}

DEFINE_VALUES8(values8_8_2, 8, 2)
DEFINE_VALUES8(values8_8_1, 8, 1)
DEFINE_VALUES8(values8_16_2, 16, 2)
DEFINE_VALUES8(values8_16_1, 16, 1)
DEFINE_VALUES8(values8_32_2, 32, 2)
DEFINE_VALUES8(values8_32_1, 32, 1)
DEFINE_SCORES8(scores8_8_2, 8, 2)
DEFINE_SCORES8(scores8_8_1, 8, 1)
DEFINE_SCORES8(scores8_16_2, 16, 2)
DEFINE_SCORES8(scores8_16_1, 16, 1)
DEFINE_SCORES8(scores8_32_2, 32, 2)
DEFINE_SCORES8(scores8_32_1, 32, 1)
DEFINE_TASK8(task8_64, 8, scores8_8_2, scores8_8_1, values8_8_2, values8_8_1)
DEFINE_TASK8(task8_128, 16, scores8_16_2, scores8_16_1, values8_16_2, values8_16_1)
DEFINE_TASK8(task8_256, 32, scores8_32_2, scores8_32_1, values8_32_2, values8_32_1)

/* The task for this head dim over fp32 caches; 0 when the head dim has none or the task holds
 * more than one KV head (the tile walk takes it). */
static int grouped_task_f32(const float *k_cache, const float *v_cache, const int32_t *table,
                            int64_t block_size, int64_t row, int64_t h0, int64_t span,
                            int64_t group, int64_t head_dim, int64_t first, int64_t len,
                            const float q[][MAX_DIM], float scale, float softcap,
                            float acc[][MAX_DIM], float *run_max, float *run_sum) {
    void (*task)(const float *, const float *, const int32_t *, int64_t, int64_t, int64_t,
                 int64_t, int64_t, int64_t, int64_t, const float[][MAX_DIM], float, float,
                 float[][MAX_DIM], float *, float *) =
        head_dim == 64 ? task8_64 : head_dim == 128 ? task8_128 : head_dim == 256 ? task8_256 : NULL;
    if (task == NULL) return 0;
    task(k_cache, v_cache, table, block_size, row, h0, span, group, first, len, q, scale, softcap,
         acc, run_max, run_sum);
    return 1;
}
#endif
