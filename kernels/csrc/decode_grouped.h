/* One decode task over fp32 caches, or over bfloat16 caches met by a bfloat16 query where the
 * CPU has AVX-512 BF16: head dims 64, 128 and 256. Included by paged_decode.c (MAX_* come from
 * it) where the CPU has AVX-512; exp16 from exp_avx512.h.
 *
 * The task walks its context 16 positions at a time. Each group's key rows (all the task's KV
 * heads of a position are one contiguous row) are read once for every query head and the
 * group's scores, online-softmax update and weighted values are done before the next group's
 * rows are touched, while the rows two groups ahead are prefetched into L2: a group is at most
 * 16 rows of 512 bytes (4 bf16 KV heads of 64), so everything it reads stays in L1, and the
 * memory stream runs ahead of the arithmetic instead of stalling at every new page of a
 * scattered block (a step over 64 sequences of ~300 positions: 14.8 -> 10.7 ms on a Sapphire
 * Rapids, prefetched into L1 then). Into L2: on a Zen 4 the L1 prefetch of two groups (32 KiB
 * in bf16, 64 in fp32: the whole L1 or more) bought nothing over none, the L2 one 11-36 %.
 *
 * A task of several KV heads (batches of 8 and more) spreads those prefetches over the group's
 * work: each KV head's key lines of the row two groups ahead as its first query head's score of
 * that position is done, its value lines as its values are. Issued all at once at the group's
 * start, its 256 prefetches (bf16) wait on the core's few outstanding-miss slots while the
 * arithmetic that follows leaves them idle: memory and arithmetic took turns. Spread, they
 * overlap: 64 sequences of 256-384 positions over 8 layers, 2 threads, from memory, Zen 4: bf16
 * 11.6-12.6 -> 8.0-9.5 ms, fp32 19.2-19.8 -> 15.3-15.8 (docs/BENCHMARKS.md). A task of one KV head
 * (smaller batches) reads a quarter of each row and keeps the prefetch at the group's start:
 * spread, it measured a few per cent slower. The first two groups are prefetched at the task's
 * start either way.
 *
 * Scores: 16 positions' dot products (vdpbf16ps products of the bf16 query and key summed in
 * fp32; fp32 FMAs) added across in one transpose-and-add tree. Values: a bf16 row's 32-value
 * chunk is widened by two unpacks against zero (a bf16 is the high half of its fp32), which
 * leaves the lanes in an interleaved order; the accumulators keep that order throughout and the
 * output is written back in the natural one. A value row is loaded once for all the query heads
 * that share its KV head (GB of them at a time in registers). */
#ifndef PAGEWIRE_DECODE_GROUPED_H
#define PAGEWIRE_DECODE_GROUPED_H
#include <immintrin.h>

#include "exp_avx512.h"

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
    const __m512 e = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(s, _mm512_set1_ps(m))));
    _mm512_storeu_ps(p, e);
    const float correction = expf(*run_max - m); /* 0 on the first group */
    *run_sum = *run_sum * correction + _mm512_reduce_add_ps(e);
    *run_max = m;
    return correction;
}

/* The walk's position: a block of the table and an offset in it. */
struct cursor { int64_t blk, off; };

/* Rows (element offsets, at the task's first KV head) of the next min(count, GROUP) positions
 * from the cursor, which moves past them, and a prefetch into L2 of each row's first `lines`
 * cache lines of K and V (`elem` bytes per element). A table entry is read only for a position
 * the sequence has (count > 0). */
static inline void group_rows(struct cursor *cur, const int32_t *table, int64_t block_size,
                              int64_t row, int64_t head_offset, int64_t count, int64_t lines,
                              const void *k_cache, const void *v_cache, int64_t elem,
                              int64_t *rows) {
    for (int64_t i = 0; i < GROUP && i < count; i++) {
        rows[i] = ((int64_t)table[cur->blk] * block_size + cur->off) * row + head_offset;
        if (++cur->off == block_size) { cur->off = 0; cur->blk++; }
        for (int64_t l = 0; l < lines; l++) {
            _mm_prefetch((const char *)k_cache + rows[i] * elem + 64 * l, _MM_HINT_T1);
            _mm_prefetch((const char *)v_cache + rows[i] * elem + 64 * l, _MM_HINT_T1);
        }
    }
}

/* Every cache line of one head's `bytes` at element `at` of a cache (`elem` bytes each), into L2.
 * A head's row starts on a cache line: torch aligns the cache to 64 bytes, and a row of the
 * grouped head dims is a multiple of 128 bytes. */
static inline void prefetch_head(const void *cache, int64_t at, int64_t elem, int64_t bytes) {
    const char *from = (const char *)cache + at * elem;
    for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(from + off, _MM_HINT_T1);
}

/* Value rows: NV fp32 vectors per head; a bf16 row widened (lanes interleaved), fp32 as is. */
#define LOAD_V_BF16(v, vr, NV)                                                                    \
    for (int c = 0; c < NV / 2; c++) {                                                            \
        const __m512i raw = _mm512_loadu_si512((const uint16_t *)(vr) + 32 * c);                  \
        v[2 * c] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), raw));       \
        v[2 * c + 1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), raw));   \
    }
#define LOAD_V_F32(v, vr, NV)                                                                     \
    for (int c = 0; c < NV; c++) v[c] = _mm512_loadu_ps((const float *)(vr) + 16 * c);

/* The weighted values of a group's n rows into K query heads' accumulators (j0 .. j0+K-1, all
 * of KV head hh), rescaled by the softmax's correction and kept in registers over the group:
 * each row is loaded once for all K. NV: fp32 vectors per head (head_dim / 16). With each of
 * the first n_ahead rows, head hh's value lines of row ahead[i] are prefetched (a spread task). */
#define DEFINE_VALUES(NAME, T, LOAD_V, NV, K)                                                     \
static inline void NAME(const T *v_cache, const int64_t *base, int64_t hh, int64_t n, int64_t j0, \
                        float p[][GROUP], const float *correction, float acc[][MAX_DIM],          \
                        const int64_t *ahead, int64_t n_ahead) {                                  \
    __m512 a[K][NV];                                                                              \
    for (int k = 0; k < K; k++)                                                                   \
        for (int c = 0; c < NV; c++)                                                              \
            a[k][c] = _mm512_mul_ps(_mm512_loadu_ps(acc[j0 + k] + 16 * c),                        \
                                    _mm512_set1_ps(correction[j0 + k]));                          \
    for (int64_t i = 0; i < n; i++) {                                                             \
        if (i < n_ahead) prefetch_head(v_cache, ahead[i] + hh * 16 * NV, sizeof(T), 16 * NV * sizeof(T)); \
        __m512 v[NV];                                                                             \
        LOAD_V(v, v_cache + base[i] + hh * 16 * NV, NV)                                           \
        for (int k = 0; k < K; k++) {                                                             \
            const __m512 w = _mm512_set1_ps(p[j0 + k][i]);                                        \
            for (int c = 0; c < NV; c++) a[k][c] = _mm512_fmadd_ps(w, v[c], a[k][c]);             \
        }                                                                                         \
    }                                                                                             \
    for (int k = 0; k < K; k++)                                                                   \
        for (int c = 0; c < NV; c++) _mm512_storeu_ps(acc[j0 + k] + 16 * c, a[k][c]);             \
}

/* Scores of query head j against a key row: QN query vectors of type QT (bf16 pairs or fp32). */
#define DOT_BF16(acc, kr, q, c)                                                                   \
    _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512((const uint16_t *)(kr) + 32 * (c)), q)
#define DOT_F32(acc, kr, q, c) _mm512_fmadd_ps(_mm512_loadu_ps((const float *)(kr) + 16 * (c)), q, acc)
#define QLOAD_BF16(q, c) ((__m512bh)_mm512_loadu_si512((const uint16_t *)(q) + 32 * (c)))
#define QLOAD_F32(q, c) _mm512_loadu_ps((const float *)(q) + 16 * (c))

/* The task: NV fp32 vectors per head (head_dim / 16), QN query vectors, GB heads' accumulators
 * in registers at once (VAL: GB of them, VAL1: one, for a group's remainder). Q: the task's
 * queries, [MAX_QHEADS][MAX_DIM] of T. SPREAD: the prefetches spread over the group's work (a
 * task of several KV heads) or issued at its start. */
#define DEFINE_TASK(NAME, T, NV, QT, QN, QLOAD, DOT, VAL, VAL1, GB, SPREAD)                       \
static void NAME(const T *k_cache, const T *v_cache, const int32_t *table, int64_t block_size,    \
                 int64_t row, int64_t h0, int64_t span, int64_t group, int64_t first, int64_t len, \
                 const T q[][MAX_DIM], float scale, float softcap, float acc[][MAX_DIM],          \
                 float *run_max, float *run_sum) {                                                \
    const int64_t head_dim = 16 * NV, head_bytes = head_dim * sizeof(T);                          \
    const int64_t lines = span * head_bytes / 64; /* of a task's row */                          \
    struct cursor cur = {first / block_size, first % block_size};                                 \
    int64_t base[GROUP], next[GROUP], ahead[GROUP];                                               \
    group_rows(&cur, table, block_size, row, h0 * head_dim, len - first, lines, k_cache, v_cache, \
               sizeof(T), next);                                                                  \
    group_rows(&cur, table, block_size, row, h0 * head_dim, len - first - GROUP, lines, k_cache,  \
               v_cache, sizeof(T), ahead);                                                        \
    for (int64_t t0 = first; t0 < len; t0 += GROUP) {                                             \
        const int64_t n = len - t0 < GROUP ? len - t0 : GROUP;                                    \
        const int64_t left = len - t0 - 2 * GROUP, n_ahead = left < 0 ? 0 : left;                 \
        memcpy(base, next, sizeof base);                                                          \
        memcpy(next, ahead, sizeof next);                                                         \
        group_rows(&cur, table, block_size, row, h0 * head_dim, left, SPREAD ? 0 : lines,         \
                   k_cache, v_cache, sizeof(T), ahead);                                           \
        float p[MAX_QHEADS][GROUP], correction[MAX_QHEADS];                                       \
        for (int64_t hh = 0; hh < span; hh++)                                                     \
            for (int64_t g = 0; g < group; g++) {                                                 \
                const int64_t j = hh * group + g;                                                 \
                QT qv[QN];                                                                        \
                for (int c = 0; c < QN; c++) qv[c] = QLOAD(q[j], c);                              \
                __m512 dots[GROUP];                                                               \
                for (int64_t i = 0; i < GROUP; i++) {                                             \
                    dots[i] = _mm512_setzero_ps();                                                \
                    if (i >= n) continue;                                                         \
                    if (SPREAD && g == 0 && i < n_ahead)                                          \
                        prefetch_head(k_cache, ahead[i] + hh * head_dim, sizeof(T), head_bytes);  \
                    const T *kr = k_cache + base[i] + hh * head_dim;                              \
                    for (int c = 0; c < QN; c++) dots[i] = DOT(dots[i], kr, qv[c], c);            \
                }                                                                                 \
                correction[j] = group_softmax(dots, n, scale, softcap, p[j], &run_max[j],        \
                                              &run_sum[j]);                                       \
            }                                                                                     \
        for (int64_t hh = 0; hh < span; hh++) {                                                   \
            int64_t g0 = 0, pf = SPREAD ? n_ahead : 0; /* by the head's first call */           \
            for (; g0 + GB <= group; g0 += GB, pf = 0)                                            \
                VAL(v_cache, base, hh, n, hh * group + g0, p, correction, acc, ahead, pf);        \
            for (; g0 < group; g0++, pf = 0)                                                      \
                VAL1(v_cache, base, hh, n, hh * group + g0, p, correction, acc, ahead, pf);       \
        }                                                                                         \
    }                                                                                             \
}

/* grouped_task_TY: the task of TY for this head dim, its spread variant for a task of several
 * KV heads; 0 when the head dim has none. */
#define DEFINE_DISPATCH(TY, T)                                                                    \
static int grouped_task_##TY(const T *k_cache, const T *v_cache, const int32_t *table,            \
                             int64_t block_size, int64_t row, int64_t h0, int64_t span,           \
                             int64_t group, int64_t head_dim, int64_t first, int64_t len,         \
                             const T q[][MAX_DIM], float scale, float softcap,                    \
                             float acc[][MAX_DIM], float *run_max, float *run_sum) {              \
    void (*task)(const T *, const T *, const int32_t *, int64_t, int64_t, int64_t, int64_t,       \
                 int64_t, int64_t, int64_t, const T[][MAX_DIM], float, float, float[][MAX_DIM], \
                 float *, float *) =                                                              \
        head_dim == 64 ? (span > 1 ? task_##TY##_64s : task_##TY##_64)                            \
        : head_dim == 128 ? (span > 1 ? task_##TY##_128s : task_##TY##_128)                       \
        : head_dim == 256 ? (span > 1 ? task_##TY##_256s : task_##TY##_256) : NULL;               \
    if (task == NULL) return 0;                                                                   \
    task(k_cache, v_cache, table, block_size, row, h0, span, group, first, len, q, scale, softcap, \
         acc, run_max, run_sum);                                                                  \
    return 1;                                                                                     \
}

/* Every task of one cache dtype TY (values in registers for 4, 2 and 1 query heads by head
 * dim; QDIV: fp32 values per query-vector lane, 1 for fp32, 2 for bf16 pairs), each plain and
 * spread, and its dispatch, grouped_task_TY. */
#define DEFINE_TASKS(TY, T, LOAD_V, QT, QDIV, QLOAD, DOT)                                          \
DEFINE_VALUES(values_##TY##_4_4, T, LOAD_V, 4, 4)                                                 \
DEFINE_VALUES(values_##TY##_4_1, T, LOAD_V, 4, 1)                                                 \
DEFINE_VALUES(values_##TY##_8_2, T, LOAD_V, 8, 2)                                                 \
DEFINE_VALUES(values_##TY##_8_1, T, LOAD_V, 8, 1)                                                 \
DEFINE_VALUES(values_##TY##_16_1, T, LOAD_V, 16, 1)                                               \
DEFINE_TASK(task_##TY##_64, T, 4, QT, 4 / QDIV, QLOAD, DOT, values_##TY##_4_4, values_##TY##_4_1, 4, 0) \
DEFINE_TASK(task_##TY##_64s, T, 4, QT, 4 / QDIV, QLOAD, DOT, values_##TY##_4_4, values_##TY##_4_1, 4, 1) \
DEFINE_TASK(task_##TY##_128, T, 8, QT, 8 / QDIV, QLOAD, DOT, values_##TY##_8_2, values_##TY##_8_1, 2, 0) \
DEFINE_TASK(task_##TY##_128s, T, 8, QT, 8 / QDIV, QLOAD, DOT, values_##TY##_8_2, values_##TY##_8_1, 2, 1) \
DEFINE_TASK(task_##TY##_256, T, 16, QT, 16 / QDIV, QLOAD, DOT, values_##TY##_16_1, values_##TY##_16_1, 1, 0) \
DEFINE_TASK(task_##TY##_256s, T, 16, QT, 16 / QDIV, QLOAD, DOT, values_##TY##_16_1, values_##TY##_16_1, 1, 1) \
DEFINE_DISPATCH(TY, T)

/* Tasks over fp32 caches (q: the task's fp32 queries). */
DEFINE_TASKS(f32, float, LOAD_V_F32, __m512, 1, QLOAD_F32, DOT_F32)

#if defined(__AVX512BF16__)
#define HAVE_GROUPED_BF16 1
/* Tasks over bf16 caches with the task's queries rounded to bf16 (exact for a bf16 model's);
 * their accumulators come back in the widened order: natural_order puts them back. */
DEFINE_TASKS(bf16, uint16_t, LOAD_V_BF16, __m512bh, 2, QLOAD_BF16, DOT_BF16)

/* The nq accumulators of a bf16 task, from the unpacks' interleaved lanes to value order. */
static void natural_order(float acc[][MAX_DIM], int64_t nq, int64_t head_dim) {
    float natural[MAX_DIM];
    for (int64_t j = 0; j < nq; j++) {
        for (int64_t d = 0; d < head_dim; d++) natural[d] = acc[j][d / 32 * 32 + widened_lane(d % 32)];
        memcpy(acc[j], natural, head_dim * sizeof(float));
    }
}
#else
#define HAVE_GROUPED_BF16 0
#endif
#endif
