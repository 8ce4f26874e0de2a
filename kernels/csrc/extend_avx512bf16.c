/* Prefill (extend) attention for bfloat16 on AVX-512 BF16 dot products, for CPUs that have them
 * but no AMX (AMD Zen 4 and 5): the contract of extend_amx.c, K/V handed over token-major.
 *
 * Why: without AMX a bfloat16 chunk was widened to float32 copies for extend_f32.c (the copies
 * alone a twentieth of a prefill on a 2-core Zen 4), and a float32 FMA does half the work of a
 * vdpbf16ps, which multiplies two pairs of bfloat16s and adds both products into a float32 lane.
 * Here K and V of each KV head are packed once per call as word pairs (extend_pack_bf16.h, the
 * layouts of the AMX kernel), and each task, one KV head and 24 query rows (its query heads x
 * consecutive tokens, so a GQA group reads each key once), walks key blocks of 64 with 4 blocks
 * of 6 rows: scores 6 rows x 32 keys per pass over the dim pairs (12 accumulators), an online
 * softmax in float32 (exact maximum and sum; the probabilities rounded to bfloat16 for the second
 * product, as torch's attention and the AMX kernel round them), then the weighted values 6 rows
 * x 64 dims per pass over the key pairs (24 accumulators). Keys no row of a task sees are never
 * visited.
 *
 * Head dims that are multiples of 16 up to 256. Returns 0 (nothing written) for anything else;
 * the caller then runs another path. Built at run time by kernels/cpu_extend.py
 * (kernels/c_library.py); no torch headers.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

#include "exp_avx512.h"
#include "extend_pack_bf16.h"

int extend_avx512bf16_available(void) { return 1; }

#define ROWS 6    /* query rows per block */
#define KB 64     /* keys per block */
#define PASS 4    /* blocks of rows per task, each key block read once for all of them */
#define MAX_DIM 256
#include "extend_rows.h"

/* s[r][0 .. 16 nb) = q_r . k for the 16 nb keys from 16-key block kb16 of kp (nb 1 or 2). */
static inline void scores(const uint32_t *const q[ROWS], const uint32_t *kp, int64_t kb16,
                          int64_t pairs, int nb, float *s) {
    __m512 c[ROWS][2];
    for (int r = 0; r < ROWS; r++) c[r][0] = c[r][1] = _mm512_setzero_ps();
    const uint32_t *b0 = kp + kb16 * 16 * pairs, *b1 = b0 + 16 * pairs;
    for (int64_t p = 0; p < pairs; p++) {
        const __m512bh k0 = (__m512bh)_mm512_loadu_si512(b0 + p * 16);
        const __m512bh k1 = nb > 1 ? (__m512bh)_mm512_loadu_si512(b1 + p * 16) : k0;
        for (int r = 0; r < ROWS; r++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)q[r][p]);
            c[r][0] = _mm512_dpbf16_ps(c[r][0], k0, a);
            if (nb > 1) c[r][1] = _mm512_dpbf16_ps(c[r][1], k1, a);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        _mm512_storeu_ps(s + r * KB, c[r][0]);
        if (nb > 1) _mm512_storeu_ps(s + r * KB + 16, c[r][1]);
    }
}

/* acc[r][d0 .. d0 + 16 NV) = acc * alpha[r] + the products of the rows' probability pairs pw
 * (row stride KB / 2 words) with the value pairs from pair i0 of vp, n2 pairs. */
#define DEFINE_VALUES(NAME, NV)                                                                   \
static inline void NAME(const uint32_t *pw, const uint32_t *vp, int64_t i0, int64_t n2,          \
                        int64_t d0, int64_t dim, const float *alpha, float *acc) {               \
    __m512 c[ROWS][NV];                                                                           \
    for (int r = 0; r < ROWS; r++) {                                                              \
        const __m512 a = _mm512_set1_ps(alpha[r]);                                                \
        for (int v = 0; v < NV; v++)                                                              \
            c[r][v] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * dim + d0 + 16 * v), a);             \
    }                                                                                             \
    for (int64_t i = 0; i < n2; i++) {                                                            \
        const uint32_t *row = vp + (i0 + i) * dim + d0;                                           \
        __m512bh b[NV];                                                                           \
        for (int v = 0; v < NV; v++) b[v] = (__m512bh)_mm512_loadu_si512(row + 16 * v);           \
        for (int r = 0; r < ROWS; r++) {                                                          \
            const __m512bh w = (__m512bh)_mm512_set1_epi32((int)pw[r * (KB / 2) + i]);            \
            for (int v = 0; v < NV; v++) c[r][v] = _mm512_dpbf16_ps(c[r][v], b[v], w);            \
        }                                                                                         \
    }                                                                                             \
    for (int r = 0; r < ROWS; r++)                                                                \
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(acc + r * dim + d0 + 16 * v, c[r][v]);      \
}
DEFINE_VALUES(values64, 4)
DEFINE_VALUES(values16, 1)

/* The online softmax over one block's raw scores s (ROWS x kb, row stride KB): the weights of
 * the keys each row sees (0 for the rest) into p as bfloat16 (row stride KB), alpha the rescale
 * of each row's running output. run_max is kept in scaled units (scale > 0); the running sum adds
 * the float32 weights. lo/hi: the keys [lo, hi) row r sees. */
static void softmax_block(const float *s, uint16_t *p, int64_t kb, int64_t k0, const int64_t *lo,
                          const int64_t *hi, float scale, float *run_max, float *run_sum,
                          float *alpha) {
    const __m512 lane = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 ninf = _mm512_set1_ps(-INFINITY), vscale = _mm512_set1_ps(scale);
    for (int r = 0; r < ROWS; r++) {
        const float *sr = s + r * KB;
        uint16_t *pr = p + r * KB;
        if (hi[r] <= k0 || lo[r] >= k0 + kb) {  /* sees none of the block */
            memset(pr, 0, KB * 2);
            alpha[r] = 1.0f;
            continue;
        }
        __mmask16 seen[KB / 16];
        __m512 mx = ninf;
        for (int64_t j = 0; j < kb; j += 16) {
            const __m512 key = _mm512_add_ps(_mm512_set1_ps((float)(k0 + j)), lane);
            seen[j / 16] = _mm512_cmp_ps_mask(key, _mm512_set1_ps((float)hi[r]), _CMP_LT_OQ) &
                           _mm512_cmp_ps_mask(key, _mm512_set1_ps((float)lo[r]), _CMP_GE_OQ);
            mx = _mm512_mask_max_ps(mx, seen[j / 16], mx, _mm512_loadu_ps(sr + j));
        }
        const float m_new = fmaxf(run_max[r], _mm512_reduce_max_ps(mx) * scale);
        alpha[r] = run_max[r] == -INFINITY ? 0.0f : expf(run_max[r] - m_new);
        const __m512 vmax = _mm512_set1_ps(m_new);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < kb; j += 16) {  /* a masked key's weight is exactly 0 */
            const __m512 e = _mm512_maskz_mov_ps(
                seen[j / 16], exp16(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), vscale, vmax)));
            sum = _mm512_add_ps(sum, e);
            _mm256_storeu_si256((__m256i *)(pr + j), (__m256i)_mm512_cvtneps_pbh(e));
        }
        if (kb < KB) memset(pr + kb, 0, (KB - kb) * 2);
        run_sum[r] = run_sum[r] * alpha[r] + _mm512_reduce_add_ps(sum);
        run_max[r] = m_new;
    }
}

/* The rows of b against keys [k0, k0 + KB): scores, online softmax, weighted values. */
static void attend_block(RowBlock *b, const uint16_t *q, int64_t k0, const uint32_t *kp,
                         const uint32_t *vp, int64_t dim, float scale, float *s, uint16_t *p) {
    const int64_t kb = b->last - k0 < KB ? (b->last - k0 + 15) / 16 * 16 : KB, pairs = dim / 2;
    const uint32_t *qr[ROWS];  /* each row's dim pairs */
    for (int r = 0; r < ROWS; r++) qr[r] = (const uint32_t *)(q + b->at[r]);
    int64_t j = 0;
    for (; j + 32 <= kb; j += 32) scores(qr, kp, (k0 + j) / 16, pairs, 2, s + j);
    if (j < kb) scores(qr, kp, (k0 + j) / 16, pairs, 1, s + j);
    softmax_block(s, p, kb, k0, b->lo, b->hi, scale, b->run_max, b->run_sum, b->alpha);
    const uint32_t *pw = (const uint32_t *)p;
    const int64_t n2 = kb / 2;  /* key pairs; the packed V past len is 0, as are their weights */
    int64_t d0 = 0;
    for (; d0 + 64 <= dim; d0 += 64) values64(pw, vp, k0 / 2, n2, d0, dim, b->alpha, b->acc);
    for (; d0 < dim; d0 += 16) values16(pw, vp, k0 / 2, n2, d0, dim, b->alpha, b->acc);
}

/* One task: KV head kvh, rows [r0, r0 + rows) in blocks of ROWS, every block against each key
 * block in turn while its packed K and V are in the core's cache. */
static void extend_task(const uint16_t *q, int64_t q_stride, int64_t r0, int64_t rows,
                        int64_t kvh, int64_t group, const uint32_t *kp, const uint32_t *vp,
                        int64_t len, int64_t q_offset, int64_t window, int64_t dim, float scale,
                        uint16_t *out, int64_t out_stride) {
    RowBlock blocks[PASS];
    float s[ROWS * KB];
    uint16_t p[ROWS * KB] __attribute__((aligned(64)));
    int64_t first, last;
    const int nb = start_task(blocks, q_stride, r0, rows, kvh, group, len, q_offset, window, dim,
                              &first, &last);
    for (int64_t k0 = first / KB * KB; k0 < last; k0 += KB)
        for (int b = 0; b < nb; b++)
            if (sees(&blocks[b], k0, KB))
                attend_block(&blocks[b], q, k0, kp, vp, dim, scale, s, p);
    for (int64_t r = 0; r < rows; r++) {
        const RowBlock *b = &blocks[r / ROWS];
        const int64_t rr = r % ROWS;
        const __m512 inv = _mm512_set1_ps(b->run_sum[rr] > 0.0f ? 1.0f / b->run_sum[rr] : 0.0f);
        uint16_t *o = out + row_at(r0 + r, out_stride, kvh, group, dim);
        for (int64_t d = 0; d < dim; d += 16)
            _mm256_storeu_si256((__m256i *)(o + d), (__m256i)_mm512_cvtneps_pbh(
                _mm512_mul_ps(_mm512_loadu_ps(b->acc + rr * dim + d), inv)));
    }
}

/* q [q_len, heads, dim] with q_stride elements between tokens; k, v [len, kv_heads, dim] with
 * kv_stride (even, k and v 4-byte aligned: they are read as pairs); query row i sits at key
 * position q_offset + i; window 0: none. out like q. */
int extend_attention_avx512bf16(const uint16_t *q, int64_t q_stride, int64_t q_len,
                                const uint16_t *k, const uint16_t *v, int64_t kv_stride,
                                int64_t len, int64_t heads, int64_t kv_heads, int64_t dim,
                                int64_t q_offset, int64_t window, float scale, uint16_t *out,
                                int64_t out_stride, int num_threads) {
    if (dim % 16 != 0 || dim > MAX_DIM || heads % kv_heads != 0 || len <= 0 || q_len <= 0 ||
        !(scale > 0.0f))
        return 0;
    const int64_t padded = (len + KB - 1) / KB * KB, group = heads / kv_heads;
    const int64_t head_words = padded * dim / 2;
    uint32_t *kp = malloc(2 * kv_heads * head_words * 4);
    if (kp == NULL) return 0;
    uint32_t *vp = kp + kv_heads * head_words;
    const int64_t task_rows = ROWS * PASS, tasks = (q_len * group + task_rows - 1) / task_rows;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t h = 0; h < 2 * kv_heads; h++) {
            const int64_t kvh = h % kv_heads;
            if (h < kv_heads)
                pack_keys(k + kvh * dim, kv_stride, len, padded, dim, kp + kvh * head_words);
            else
                pack_values(v + kvh * dim, kv_stride, len, padded, dim, vp + kvh * head_words);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < kv_heads * tasks; task++) {
            const int64_t h = task / tasks, b = tasks - 1 - task % tasks;  /* long rows first */
            const int64_t left = q_len * group - task_rows * b;
            extend_task(q, q_stride, task_rows * b, left < task_rows ? left : task_rows, h, group,
                        kp + h * head_words, vp + h * head_words, len, q_offset, window, dim,
                        scale, out, out_stride);
        }
    }
    free(kp);
    return 1;
}
#else
int extend_avx512bf16_available(void) { return 0; }
int extend_attention_avx512bf16(const uint16_t *q, int64_t q_stride, int64_t q_len,
                                const uint16_t *k, const uint16_t *v, int64_t kv_stride,
                                int64_t len, int64_t heads, int64_t kv_heads, int64_t dim,
                                int64_t q_offset, int64_t window, float scale, uint16_t *out,
                                int64_t out_stride, int num_threads) {
    (void)q, (void)q_stride, (void)q_len, (void)k, (void)v, (void)kv_stride, (void)len;
    (void)heads, (void)kv_heads, (void)dim, (void)q_offset, (void)window, (void)scale;
    (void)out, (void)out_stride, (void)num_threads;
    return 0;
}
#endif
