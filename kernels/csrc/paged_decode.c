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
 * Caches are fp32 or bf16 (widened to fp32 on load); q and out are fp32. With a bf16 cache and a
 * query that was bf16 (q_bf16), scores are bf16 products summed in fp32 where the CPU has
 * AVX-512 BF16 (below). Built with reassociation and FMA contraction allowed (the sums vectorize;
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

/* Where the CPU has AVX-512 BF16, the scores of a bfloat16 cache: each key row meets the query
 * (rounded to bfloat16: exact for the bfloat16 queries of the worker's bfloat16 models, and only
 * used for them) in vdpbf16ps products summed in fp32, with no widening of the key; the 16
 * per-position partial sums of a group of 16 positions are then added across in one
 * transpose-and-add tree instead of 16 horizontal sums. */
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_DP_BF16 1

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

/* score[i] = dot(q, rows[i]) for i < n; q in `chunks` registers of 32 bfloat16. */
static inline void scores_bf16(const __m512bh *qv, int64_t chunks, const uint16_t *const *rows,
                               int64_t n, float *score) {
    for (int64_t i0 = 0; i0 < n; i0 += 16) {
        __m512 acc[16];
        for (int i = 0; i < 16; i++) {
            acc[i] = _mm512_setzero_ps();
            if (i0 + i >= n) continue;
            for (int64_t c = 0; c < chunks; c++)
                acc[i] = _mm512_dpbf16_ps(
                    acc[i], (__m512bh)_mm512_loadu_si512(rows[i0 + i] + 32 * c), qv[c]);
        }
        float out[16];
        _mm512_storeu_ps(out, sum_across16(acc));
        for (int i = 0; i < 16 && i0 + i < n; i++) score[i0 + i] = out[i];
    }
}
#else
#define HAVE_DP_BF16 0
#endif
#if HAVE_DP_BF16
/* The tile's values into each query head's accumulator: for one query head at a time the
 * accumulator stays in CH registers over the whole tile (the generic loop reads and writes it
 * in memory for every position), and each bfloat16 value row is widened as it is loaded. */
#define DEFINE_VALUES(CH)                                                                        \
static void values_bf16_##CH(const uint16_t *v_cache, const int64_t *base, int64_t span,         \
                             int64_t group, int64_t n, float score[][TILE],                      \
                             float acc[][MAX_DIM]) {                                             \
    for (int64_t hh = 0; hh < span; hh++)                                                        \
        for (int64_t g = 0; g < group; g++) {                                                    \
            const int64_t j = hh * group + g;                                                    \
            __m512 a[CH];                                                                        \
            for (int c = 0; c < CH; c++) a[c] = _mm512_loadu_ps(acc[j] + 16 * c);               \
            for (int64_t i = 0; i < n; i++) {                                                    \
                const uint16_t *vr = v_cache + base[i] + hh * 16 * CH;                           \
                const __m512 p = _mm512_set1_ps(score[j][i]);                                    \
                for (int c = 0; c < CH; c++) {                                                   \
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(vr + 16 * c));      \
                    const __m512 v = _mm512_castsi512_ps(                                        \
                        _mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));                      \
                    a[c] = _mm512_fmadd_ps(p, v, a[c]);                                          \
                }                                                                                \
            }                                                                                    \
            for (int c = 0; c < CH; c++) _mm512_storeu_ps(acc[j] + 16 * c, a[c]);               \
        }                                                                                        \
}
DEFINE_VALUES(4)
DEFINE_VALUES(8)
DEFINE_VALUES(16)
#endif

/* values_bf16 for head dims 64, 128 and 256 where the CPU has AVX-512; 0 when it did nothing. */
static int tile_values_bf16(const uint16_t *v_cache, const int64_t *base, int64_t span,
                            int64_t group, int64_t head_dim, int64_t n, float score[][TILE],
                            float acc[][MAX_DIM]) {
#if HAVE_DP_BF16
    switch (head_dim) {
    case 64: values_bf16_4(v_cache, base, span, group, n, score, acc); return 1;
    case 128: values_bf16_8(v_cache, base, span, group, n, score, acc); return 1;
    case 256: values_bf16_16(v_cache, base, span, group, n, score, acc); return 1;
    default: return 0;
    }
#else
    (void)v_cache; (void)base; (void)span; (void)group; (void)head_dim; (void)n; (void)score;
    (void)acc;
    return 0;
#endif
}

/* The tile's scores of every query head of a task (scaled, soft-capped) by scores_bf16; base[i]:
 * position i's row in the cache, at the task's first KV head. */
static void tile_scores_dp(const uint16_t *k_cache, const int64_t *base, int64_t span,
                           int64_t group, int64_t head_dim, int64_t n, const uint16_t qb[][MAX_DIM],
                           float scale, float softcap, float score[][TILE]) {
#if HAVE_DP_BF16
    const uint16_t *rows[TILE];
    __m512bh qv[MAX_DIM / 32];
    const int64_t chunks = head_dim / 32;
    for (int64_t hh = 0; hh < span; hh++) {
        for (int64_t i = 0; i < n; i++) rows[i] = k_cache + base[i] + hh * head_dim;
        for (int64_t g = 0; g < group; g++) {
            const int64_t j = hh * group + g;
            for (int64_t c = 0; c < chunks; c++) qv[c] = (__m512bh)_mm512_loadu_si512(qb[j] + 32 * c);
            scores_bf16(qv, chunks, rows, n, score[j]);
            for (int64_t i = 0; i < n; i++) {
                const float sc = score[j][i] * scale;
                score[j][i] = softcap > 0.f ? softcap * tanhf(sc / softcap) : sc;
            }
        }
    }
#else
    (void)k_cache; (void)base; (void)span; (void)group; (void)head_dim; (void)n; (void)qb;
    (void)scale; (void)softcap; (void)score;
#endif
}


#define DEFINE_DECODE(NAME, T, LOAD, DP)                                                             \
void NAME(const float *q, const T *k_cache, const T *v_cache, const int32_t *block_tables,       \
          int64_t table_stride, const int32_t *context_lens, int64_t batch, int64_t num_q_heads, \
          int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale, float *out,   \
          int num_threads, int64_t window, float softcap, int q_bf16) {                          \
    const int64_t group = num_q_heads / num_kv_heads;                                            \
    const int64_t row = num_kv_heads * head_dim; /* elements per cached token */                 \
    const int64_t span = batch >= 8 ? num_kv_heads : 1; /* KV heads per task */                  \
    const int64_t tasks = batch * (num_kv_heads / span);                                         \
    const int use_dp = DP && HAVE_DP_BF16 && q_bf16 && head_dim % 32 == 0;                       \
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
            const float *src = q + (b * num_q_heads + h0 * group + j) * head_dim;                \
            for (int64_t d = 0; d < head_dim; d++) { qs[j][d] = src[d] * scale; acc[j][d] = 0.f; } \
            if (use_dp) for (int64_t d = 0; d < head_dim; d++) qb[j][d] = f32_to_bf16(src[d]);  \
            run_max[j] = -FLT_MAX; /* finite: exp(run_max - m) is 0 on the first tile */      \
            run_sum[j] = 0.f;                                                                    \
        }                                                                                        \
        const int64_t first = window > 0 && len > window ? len - window : 0;                     \
        for (int64_t t0 = first; t0 < len; t0 += TILE) {                                         \
            const int64_t n = len - t0 < TILE ? len - t0 : TILE;                                 \
            int64_t base[TILE]; /* rows of the tile's positions: no division per position */     \
            for (int64_t i = 0, blk = t0 / block_size, o = t0 % block_size; i < n; i++) {        \
                base[i] = ((int64_t)table[blk] * block_size + o) * row + h0 * head_dim;          \
                if (++o == block_size) { o = 0; blk++; }                                         \
            }                                                                                    \
            if (use_dp)                                                                          \
                tile_scores_dp((const uint16_t *)k_cache, base, span, group, head_dim, n,        \
                               (const uint16_t (*)[MAX_DIM])qb, scale, softcap, score);          \
            else for (int64_t i = 0; i < n; i++) {                                               \
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
            if (!(use_dp && tile_values_bf16((const uint16_t *)v_cache, base, span, group,      \
                                             head_dim, n, score, acc)))                          \
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
            float *dst = out + (b * num_q_heads + h0 * group + j) * head_dim;                    \
            const float inv = 1.f / run_sum[j];                                                  \
            for (int64_t d = 0; d < head_dim; d++) dst[d] = acc[j][d] * inv;                     \
        }                                                                                        \
    }                                                                                            \
}

#define LOAD_F32(x) (x)
#define LOAD_BF16(x) bf16_to_f32(x)
DEFINE_DECODE(paged_decode_f32, float, LOAD_F32, 0)
DEFINE_DECODE(paged_decode_bf16, uint16_t, LOAD_BF16, 1)

int max_q_heads(void) { return MAX_QHEADS; }
int max_head_dim(void) { return MAX_DIM; }
