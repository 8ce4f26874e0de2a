/* Paged decode attention for the CPU: one query token per sequence over its paged K/V.
 *
 * The same contract as kernels.reference.paged_decode_attention, computed without copying K/V:
 * each (sequence, KV head) task walks the sequence's block table and reads every cached key and
 * value of its context exactly once, straight from the cache. Decode attention on a CPU is bound
 * by memory traffic, and the torch path (gather, then fused attention) reads and writes the K/V
 * once more on the way.
 *
 * Softmax is exact and in fp32: scores of a tile of positions are computed, the running maximum
 * and sum are rescaled once per tile (online softmax), and the tile's probabilities weight the
 * values. A sliding window (window > 0) starts the walk at the window's first position; a
 * soft-cap (softcap > 0, Gemma 2) maps each scaled score s to softcap * tanh(s / softcap).
 * Caches are fp32 or bf16 (widened to fp32 on load); q and out are fp32, or both bf16 (q_bf16;
 * q's sequences q_stride elements apart, its heads contiguous). Head dims 64, 128 and 256 take
 * the grouped walk of decode_grouped.h where the CPU has AVX-512 (fp32 caches, and bf16 caches
 * with a bf16 query, whose scores are then bf16 products summed in fp32), or of
 * decode_grouped_avx2.h where it has AVX2 and FMA only (fp32 caches); others the tile walk
 * below. Built with reassociation and FMA contraction allowed (the sums vectorize;
 * results stay within 1e-6 of the reference) but not -ffast-math, whose start-up code would flush
 * subnormals to zero in the whole process.
 *
 * Built at run time by kernels/cpu_decode.py with the system C compiler; no torch headers.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define TILE 128   /* positions per softmax tile */
#define MAX_QHEADS 64 /* query heads one task may hold: the whole layer's, when span is all */
#define MAX_DIM 256


/* One task is a sequence and a run of its KV heads: all of them when the batch alone keeps every
 * core busy (the task then streams whole cached rows, every byte it loads is used), one at a time
 * when it does not (a few long sequences still spread over the cores). */
/* exp(x) for x <= 0 (a score minus the running maximum) in a form the compiler vectorises, where
 * expf stays a scalar call: 2^n * p(r) with n = round(x / ln 2) and r = x - n ln 2 (ln 2 split
 * in two for an exact product) in [-ln 2 / 2, ln 2 / 2], p the degree-6 Taylor polynomial
 * (truncation error 1.2e-7 relative). Below -87 the result is 2^-126-ish instead of smaller:
 * a weight that small is nothing beside the maximum's weight of 1. */
static inline float exp_nonpositive(float x) {
    x = x < -87.f ? -87.f : x;
    const float n = rintf(x * 1.44269504088896341f);
    float r = fmaf(n, -0.693145751953125f, x);
    r = fmaf(n, -1.42860682030941723e-6f, r);
    float p = 1.f / 720.f;
    p = fmaf(p, r, 1.f / 120.f);
    p = fmaf(p, r, 1.f / 24.f);
    p = fmaf(p, r, 1.f / 6.f);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.f);
    p = fmaf(p, r, 1.f);
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Where the CPU has AVX-512, the task of decode_grouped.h for head dims 64, 128 and 256; where it
 * has only AVX2 and FMA, that of decode_grouped_avx2.h (fp32 caches). */
#define GROUPED_DIM(d) ((d) == 64 || (d) == 128 || (d) == 256)
#if defined(__AVX512F__)
#include "decode_grouped.h"
#define HAVE_GROUPED 1
#elif defined(__AVX2__) && defined(__FMA__)
#include "decode_grouped_avx2.h" /* fp32 caches only */
#define HAVE_GROUPED 1
#define HAVE_GROUPED_BF16 0
#else
#define HAVE_GROUPED 0
#define HAVE_GROUPED_BF16 0
#endif

/* The grouped task over fp32 caches (qs: the queries), or over bf16 caches with bf16 queries
 * (qb), where it is built and takes this head dim; 0 when it did nothing (the caller walks the
 * generic tiles). */
static int grouped_task(int bf16, const void *k_cache, const void *v_cache, const int32_t *table,
                        int64_t block_size, int64_t row, int64_t h0, int64_t span, int64_t group,
                        int64_t head_dim, int64_t first, int64_t len, const float qs[][MAX_DIM],
                        const uint16_t qb[][MAX_DIM], float scale, float softcap,
                        float acc[][MAX_DIM], float *run_max, float *run_sum) {
#if HAVE_GROUPED_BF16
    if (bf16) {
        if (!grouped_task_bf16(k_cache, v_cache, table, block_size, row, h0, span, group,
                               head_dim, first, len, qb, scale, softcap, acc, run_max, run_sum))
            return 0;
        natural_order(acc, span * group, head_dim);
        return 1;
    }
#endif
#if HAVE_GROUPED
    if (!bf16)
        return grouped_task_f32(k_cache, v_cache, table, block_size, row, h0, span, group,
                                head_dim, first, len, qs, scale, softcap, acc, run_max, run_sum);
#endif
    (void)bf16; (void)k_cache; (void)v_cache; (void)table; (void)block_size; (void)row; (void)h0;
    (void)span; (void)group; (void)head_dim; (void)first; (void)len; (void)qs; (void)qb;
    (void)scale; (void)softcap; (void)acc; (void)run_max; (void)run_sum;
    return 0;
}


#define DEFINE_DECODE(NAME, T, LOAD, DP)                                                             \
void NAME(const void *q, int64_t q_stride, const T *k_cache, const T *v_cache,                    \
          const int32_t *block_tables, int64_t table_stride, const int32_t *context_lens,         \
          int64_t batch, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,             \
          int64_t block_size, float scale, void *out, int num_threads, int64_t window,            \
          float softcap, int q_bf16) {                                                            \
    const int64_t group = num_q_heads / num_kv_heads;                                            \
    const int64_t row = num_kv_heads * head_dim; /* elements per cached token */                 \
    const int64_t span = batch >= 8 ? num_kv_heads : 1; /* KV heads per task */                  \
    const int64_t tasks = batch * (num_kv_heads / span);                                         \
    const int use_dp = DP && HAVE_GROUPED_BF16 && q_bf16 && GROUPED_DIM(head_dim);               \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(num_threads)")                   \
    for (int64_t task = 0; task < tasks; task++) {                                               \
        const int64_t b = task / (num_kv_heads / span), h0 = task % (num_kv_heads / span) * span; \
        const int64_t nq = span * group; /* query heads of this task: h0*group .. +nq */         \
        float qs[MAX_QHEADS][MAX_DIM], acc[MAX_QHEADS][MAX_DIM];                                 \
        float score[MAX_QHEADS][TILE], run_max[MAX_QHEADS], run_sum[MAX_QHEADS];                 \
        float kv[MAX_DIM];                                                                       \
        uint16_t qb[use_dp ? MAX_QHEADS : 1][MAX_DIM];                                           \
        const int64_t len = context_lens[b];                                                     \
        const int32_t *table = block_tables + b * table_stride;                                  \
        for (int64_t j = 0; j < nq; j++) {                                                       \
            const int64_t at = b * q_stride + (h0 * group + j) * head_dim;                       \
            for (int64_t d = 0; d < head_dim; d++) {                                             \
                const float x = q_bf16 ? bf16_to_f32(((const uint16_t *)q)[at + d])              \
                                       : ((const float *)q)[at + d];                             \
                qs[j][d] = x * scale;                                                            \
                acc[j][d] = 0.f;                                                                 \
                if (use_dp) qb[j][d] = f32_to_bf16(x); /* exact: x came from a bf16 */           \
            }                                                                                    \
            run_max[j] = -FLT_MAX; /* finite: exp(run_max - m) is 0 on the first tile */      \
            run_sum[j] = 0.f;                                                                    \
        }                                                                                        \
        const int64_t first = window > 0 && len > window ? len - window : 0;                     \
        const int done = (use_dp || !DP) && grouped_task(DP, k_cache, v_cache, table, block_size, \
            row, h0, span, group, head_dim, first, len, (const float (*)[MAX_DIM])qs,            \
            (const uint16_t (*)[MAX_DIM])qb, DP ? scale : 1.f /* qs is scaled */, softcap, acc,  \
            run_max, run_sum);                                                                   \
        for (int64_t t0 = done ? len : first; t0 < len; t0 += TILE) {                            \
            const int64_t n = len - t0 < TILE ? len - t0 : TILE;                                 \
            int64_t base[TILE]; /* rows of the tile's positions: no division per position */     \
            for (int64_t i = 0, blk = t0 / block_size, o = t0 % block_size; i < n; i++) {        \
                base[i] = ((int64_t)table[blk] * block_size + o) * row + h0 * head_dim;          \
                if (++o == block_size) { o = 0; blk++; }                                         \
            }                                                                                    \
            for (int64_t i = 0; i < n; i++) {                                                    \
                const T *kr = k_cache + base[i];                                                 \
                for (int64_t hh = 0; hh < span; hh++) {                                          \
                    for (int64_t d = 0; d < head_dim; d++) kv[d] = LOAD(kr[hh * head_dim + d]);  \
                    for (int64_t g = 0; g < group; g++) {                                        \
                        const float *qv = qs[hh * group + g];                                    \
                        float s = 0.f;                                                           \
                        _Pragma("omp simd reduction(+:s)")                                       \
                        for (int64_t d = 0; d < head_dim; d++) s += qv[d] * kv[d];               \
                        score[hh * group + g][i] = softcap > 0.f ? softcap * tanhf(s / softcap) : s; \
                    }                                                                            \
                }                                                                                \
            }                                                                                    \
            for (int64_t j = 0; j < nq; j++) {                                                   \
                float m = run_max[j];                                                            \
                _Pragma("omp simd reduction(max:m)")                                             \
                for (int64_t i = 0; i < n; i++) m = score[j][i] > m ? score[j][i] : m;           \
                const float correction = expf(run_max[j] - m); /* 0 on the first tile */         \
                float sum = 0.f;                                                                 \
                for (int64_t i = 0; i < n; i++) { score[j][i] = exp_nonpositive(score[j][i] - m); sum += score[j][i]; } \
                run_sum[j] = run_sum[j] * correction + sum;                                      \
                run_max[j] = m;                                                                  \
                if (correction != 1.f)                                                           \
                    for (int64_t d = 0; d < head_dim; d++) acc[j][d] *= correction;              \
            }                                                                                    \
            for (int64_t i = 0; i < n; i++) {                                                    \
                const T *vr = v_cache + base[i];                                                 \
                for (int64_t hh = 0; hh < span; hh++) {                                          \
                    for (int64_t d = 0; d < head_dim; d++) kv[d] = LOAD(vr[hh * head_dim + d]);  \
                    for (int64_t g = 0; g < group; g++) {                                        \
                        float *a = acc[hh * group + g];                                          \
                        const float p = score[hh * group + g][i];                                \
                        _Pragma("omp simd")                                                      \
                        for (int64_t d = 0; d < head_dim; d++) a[d] += p * kv[d];                \
                    }                                                                            \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        for (int64_t j = 0; j < nq; j++) {                                                       \
            const int64_t at = (b * num_q_heads + h0 * group + j) * head_dim;                    \
            const float inv = 1.f / run_sum[j];                                                  \
            for (int64_t d = 0; d < head_dim; d++) {                                             \
                if (q_bf16) ((uint16_t *)out)[at + d] = f32_to_bf16(acc[j][d] * inv);            \
                else ((float *)out)[at + d] = acc[j][d] * inv;                                   \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
}

#define LOAD_F32(x) (x)
#define LOAD_BF16(x) bf16_to_f32(x)
DEFINE_DECODE(paged_decode_f32, float, LOAD_F32, 0)
DEFINE_DECODE(paged_decode_bf16, uint16_t, LOAD_BF16, 1)

int max_q_heads(void) { return MAX_QHEADS; }
int max_head_dim(void) { return MAX_DIM; }

/* K/V rows of one step into their cache slots: row i of k and v (src_stride bytes apart; the
 * strided views of the fused projection) to row slots[i] of each cache, row_bytes each. One call
 * for both caches where index_copy_ took two, plus a dispatch each, per layer. */
void store_kv_rows(const char *k, const char *v, int64_t src_stride, char *k_cache, char *v_cache,
                   const int64_t *slots, int64_t rows, int64_t row_bytes, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * row_bytes >= (1 << 20))
    for (int64_t i = 0; i < rows; i++) {
        memcpy(k_cache + slots[i] * row_bytes, k + i * src_stride, row_bytes);
        memcpy(v_cache + slots[i] * row_bytes, v + i * src_stride, row_bytes);
    }
}
