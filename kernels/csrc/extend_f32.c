/* Prefill (extend) attention for float32 on AVX2 + FMA: one chunk's queries against its keys,
 * causal, optionally windowed; the contract of extend_amx.c (and of
 * kernels.reference.paged_extend_attention for one chunk) in float32, K/V handed over
 * token-major.
 *
 * Why: torch's fused CPU attention ran float32 prefill at 25-55 GFLOP/s on a 2-core Zen 3 (a
 * 256-token chunk 1.3 ms per layer, 2,048 tokens 120 ms: more than the layer's projections),
 * where the cores' FMA units give ~190 (docs/BENCHMARKS.md). Here each task takes one KV head
 * and 24 query rows in blocks of 6 (its query heads x consecutive tokens, so a GQA group reads
 * each key once; extend_rows.h) and walks key blocks of 64 as a register-blocked product: scores 6 rows x 16 keys per pass
 * (12 accumulators; K of the head packed once per call as [16 keys] per dim), an online
 * softmax over the block in float32, then the weighted values 6 rows x 16 dims per pass over V
 * where it lies. Keys no row of the task sees (past the last row's position, before the first
 * row's window) are never visited.
 *
 * Head dims that are multiples of 16 up to 256, on CPUs with AVX2 and FMA (AVX-512 ones too: on a
 * Zen 4 it took 0.38-0.73 of torch's time, docs/BENCHMARKS.md). Returns 0 (nothing written) for
 * anything else; the caller then runs its torch path. Built at run time by kernels/cpu_extend.py
 * (kernels/c_library.py); no torch headers.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include "vec_avx2.h"

int extend_f32_available(void) { return 1; }

#define ROWS 6    /* query rows per task */
#define KB 64     /* keys per block */
#define PASS 4    /* blocks of rows per task, each key block read once for all of them */
#define MAX_DIM 256
#include "extend_rows.h"

/* K of one KV head as [padded / 16][dim][16]: a pass of the score product loads 16 keys' values
 * of one dim as two vectors. Keys past len are 0. */
static void pack_keys(const float *k, int64_t stride, int64_t len, int64_t padded, int64_t dim,
                      float *kp) {
    for (int64_t t = 0; t < padded; t++) {
        float *dst = kp + (t / 16) * dim * 16 + t % 16;
        if (t < len)
            for (int64_t d = 0; d < dim; d++) dst[d * 16] = k[t * stride + d];
        else
            for (int64_t d = 0; d < dim; d++) dst[d * 16] = 0.0f;
    }
}

/* s[r][0..16) = q_r . k for the 16 keys of kp16 ([dim][16]), r < ROWS. */
static inline void scores16(const float *const q[ROWS], const float *kp16, int64_t dim, float *s) {
    __m256 c[ROWS][2];
    for (int r = 0; r < ROWS; r++) c[r][0] = c[r][1] = _mm256_setzero_ps();
    for (int64_t d = 0; d < dim; d++) {
        const __m256 b0 = _mm256_loadu_ps(kp16 + d * 16), b1 = _mm256_loadu_ps(kp16 + d * 16 + 8);
        for (int r = 0; r < ROWS; r++) {
            const __m256 a = _mm256_broadcast_ss(q[r] + d);
            c[r][0] = _mm256_fmadd_ps(a, b0, c[r][0]);
            c[r][1] = _mm256_fmadd_ps(a, b1, c[r][1]);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        _mm256_storeu_ps(s + r * KB, c[r][0]);
        _mm256_storeu_ps(s + r * KB + 8, c[r][1]);
    }
}

/* acc[r][d0..d0+16) = acc * alpha[r] + sum over keys j < n of p[r][j] v_j[d0..d0+16). */
static inline void values16(const float *p, const float *v, int64_t stride, int64_t n,
                            int64_t d0, const float *alpha, float *acc, int64_t dim) {
    __m256 c[ROWS][2];
    for (int r = 0; r < ROWS; r++) {
        const __m256 a = _mm256_set1_ps(alpha[r]);
        c[r][0] = _mm256_mul_ps(_mm256_loadu_ps(acc + r * dim + d0), a);
        c[r][1] = _mm256_mul_ps(_mm256_loadu_ps(acc + r * dim + d0 + 8), a);
    }
    for (int64_t j = 0; j < n; j++) {
        const float *vj = v + j * stride + d0;
        const __m256 b0 = _mm256_loadu_ps(vj), b1 = _mm256_loadu_ps(vj + 8);
        for (int r = 0; r < ROWS; r++) {
            const __m256 a = _mm256_broadcast_ss(p + r * KB + j);
            c[r][0] = _mm256_fmadd_ps(a, b0, c[r][0]);
            c[r][1] = _mm256_fmadd_ps(a, b1, c[r][1]);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        _mm256_storeu_ps(acc + r * dim + d0, c[r][0]);
        _mm256_storeu_ps(acc + r * dim + d0 + 8, c[r][1]);
    }
}

/* The online softmax over one block's raw scores s (ROWS x kb, row stride KB), in place: the
 * weights of the keys each row sees (0 for the rest), alpha the rescale of each row's running
 * output. run_max is kept in scaled units (scale > 0). lo/hi: the keys [lo, hi) row r sees. */
static void softmax_block(float *s, int64_t kb, int64_t k0, const int64_t *lo, const int64_t *hi,
                          float scale, float *run_max, float *run_sum, float *alpha) {
    const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), ninf = _mm256_set1_ps(-INFINITY);
    const __m256 vscale = _mm256_set1_ps(scale);
    for (int r = 0; r < ROWS; r++) {
        float *sr = s + r * KB;
        if (hi[r] <= k0 || lo[r] >= k0 + kb) {  /* sees none of the block */
            memset(sr, 0, kb * 4);
            alpha[r] = 1.0f;
            continue;
        }
        const int whole = k0 >= lo[r] && k0 + kb <= hi[r];
        const __m256 vlo = _mm256_set1_ps((float)lo[r]), vhi = _mm256_set1_ps((float)hi[r]);
        __m256 mx = ninf;
        for (int64_t j = 0; j < kb; j += 8) {
            __m256 x = _mm256_loadu_ps(sr + j);
            if (!whole) {
                const __m256 key = _mm256_add_ps(_mm256_set1_ps((float)(k0 + j)), lane);
                const __m256 seen = _mm256_and_ps(_mm256_cmp_ps(key, vhi, _CMP_LT_OQ),
                                                  _mm256_cmp_ps(key, vlo, _CMP_GE_OQ));
                x = _mm256_blendv_ps(ninf, x, seen);
                _mm256_storeu_ps(sr + j, x);
            }
            mx = _mm256_max_ps(mx, x);
        }
        const float m_new = fmaxf(run_max[r], max8(mx) * scale);
        alpha[r] = run_max[r] == -INFINITY ? 0.0f : expf(run_max[r] - m_new);
        const __m256 vmax = _mm256_set1_ps(m_new);
        __m256 sum = _mm256_setzero_ps();
        for (int64_t j = 0; j < kb; j += 8) {
            const __m256 x = _mm256_loadu_ps(sr + j);
            __m256 e = exp8(_mm256_fmsub_ps(x, vscale, vmax));
            if (!whole)  /* a masked key's weight is exactly 0 */
                e = _mm256_and_ps(e, _mm256_cmp_ps(x, ninf, _CMP_NEQ_OQ));
            sum = _mm256_add_ps(sum, e);
            _mm256_storeu_ps(sr + j, e);
        }
        run_sum[r] = run_sum[r] * alpha[r] + add8(sum);
        run_max[r] = m_new;
    }
}

/* The rows of b against keys [k0, k0 + KB): scores, online softmax, weighted values. */
static void attend_block(RowBlock *b, const float *q, int64_t k0, const float *kp,
                         const float *v, int64_t kv_stride, int64_t dim, float scale, float *s) {
    const int64_t kb = b->last - k0 < KB ? (b->last - k0 + 15) / 16 * 16 : KB;
    const float *qr[ROWS];
    for (int r = 0; r < ROWS; r++) qr[r] = q + b->at[r];
    for (int64_t j = 0; j < kb; j += 16) scores16(qr, kp + (k0 + j) * dim, dim, s + j);
    softmax_block(s, kb, k0, b->lo, b->hi, scale, b->run_max, b->run_sum, b->alpha);
    const int64_t n = b->last - k0 < kb ? b->last - k0 : kb;  /* V rows past len are not read */
    for (int64_t d0 = 0; d0 < dim; d0 += 16)
        values16(s, v + k0 * kv_stride, kv_stride, n, d0, b->alpha, b->acc, dim);
}

/* One task: KV head kvh, rows [r0, r0 + rows) in blocks of ROWS, every block against each key
 * block in turn while its K and V rows are in the core's cache (one block of rows per pass over
 * the keys read them from L3 at the rate it could: 55 GFLOP/s at 2,048 tokens against 110 at 256). */
static void extend_task(const float *q, int64_t q_stride, int64_t r0, int64_t rows, int64_t kvh,
                        int64_t group, const float *kp, const float *v, int64_t kv_stride,
                        int64_t len, int64_t q_offset, int64_t window, int64_t dim, float scale,
                        float *out, int64_t out_stride) {
    RowBlock blocks[PASS];
    float s[ROWS * KB];
    int64_t first, last;
    const int nb = start_task(blocks, q_stride, r0, rows, kvh, group, len, q_offset, window, dim,
                              &first, &last);
    for (int64_t k0 = first / 16 * 16; k0 < last; k0 += KB)
        for (int b = 0; b < nb; b++)
            if (sees(&blocks[b], k0, KB))
                attend_block(&blocks[b], q, k0, kp, v, kv_stride, dim, scale, s);
    for (int64_t r = 0; r < rows; r++) {
        const RowBlock *b = &blocks[r / ROWS];
        const int64_t rr = r % ROWS;
        const __m256 inv = _mm256_set1_ps(b->run_sum[rr] > 0.0f ? 1.0f / b->run_sum[rr] : 0.0f);
        float *o = out + row_at(r0 + r, out_stride, kvh, group, dim);
        for (int64_t d = 0; d < dim; d += 8)
            _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(b->acc + rr * dim + d), inv));
    }
}

/* q [q_len, heads, dim] with q_stride elements between tokens; k, v [len, kv_heads, dim] with
 * kv_stride; query row i sits at key position q_offset + i; window 0: none. out like q. */
int extend_attention_f32(const float *q, int64_t q_stride, int64_t q_len, const float *k,
                         const float *v, int64_t kv_stride, int64_t len, int64_t heads,
                         int64_t kv_heads, int64_t dim, int64_t q_offset, int64_t window,
                         float scale, float *out, int64_t out_stride, int num_threads) {
    if (dim % 16 != 0 || dim > MAX_DIM || heads % kv_heads != 0 || len <= 0 || q_len <= 0 ||
        !(scale > 0.0f))
        return 0;
    const int64_t padded = (len + 15) / 16 * 16, group = heads / kv_heads;
    float *kp = malloc(kv_heads * padded * dim * 4);
    if (kp == NULL) return 0;
    const int64_t task_rows = ROWS * PASS, tasks = (q_len * group + task_rows - 1) / task_rows;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t h = 0; h < kv_heads; h++)
            pack_keys(k + h * dim, kv_stride, len, padded, dim, kp + h * padded * dim);
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < kv_heads * tasks; task++) {
            const int64_t h = task / tasks, b = tasks - 1 - task % tasks;  /* long rows first */
            const int64_t left = q_len * group - task_rows * b;
            extend_task(q, q_stride, task_rows * b, left < task_rows ? left : task_rows, h, group,
                        kp + h * padded * dim, v + h * dim, kv_stride, len, q_offset, window, dim,
                        scale, out, out_stride);
        }
    }
    free(kp);
    return 1;
}
#else
int extend_f32_available(void) { return 0; }
int extend_attention_f32(const float *q, int64_t q_stride, int64_t q_len, const float *k,
                         const float *v, int64_t kv_stride, int64_t len, int64_t heads,
                         int64_t kv_heads, int64_t dim, int64_t q_offset, int64_t window,
                         float scale, float *out, int64_t out_stride, int num_threads) {
    (void)q, (void)q_stride, (void)q_len, (void)k, (void)v, (void)kv_stride, (void)len;
    (void)heads, (void)kv_heads, (void)dim, (void)q_offset, (void)window, (void)scale;
    (void)out, (void)out_stride, (void)num_threads;
    return 0;
}
#endif
