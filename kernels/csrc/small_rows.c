/* Products of a few rows against a float32 weight in the layout oneDNN packs it to on an AVX2
 * CPU: out[m][n] = sum_k x[m][k] w[n][k] (+ bias[n]) for M <= 3 rows (at 4, oneDNN's product is
 * as fast).
 *
 * oneDNN's own product over its packed weight reads the weight at ~17 GB/s at one row on two
 * Zen 3 cores, where the cores stream memory at 33 GB/s: at decode batch sizes a product is the
 * time it takes to read its weight, and a step of one sequence reads all of them (102 MB for the
 * small test model). The packed layout is blocks of 64 output columns, each [Kp][64] with the
 * columns contiguous (kernels/cpu_linear.py checks a weight is in it before using this): a
 * block is one sequential stream, and a row's product is a broadcast of x[m][k] times the
 * block's row k, summed in registers over k. No horizontal sums, no second copy of the weight.
 * Blocks are split over the threads in contiguous runs, so each thread streams one region.
 *
 * Sums run over k in order for every output (one FMA chain per 8 columns): float32 results
 * differ from oneDNN's by rounding only, as oneDNN's differ from MKL's.
 * Built at run time by kernels/cpu_linear.py (kernels/c_library.py); no torch headers.
 */
#include <immintrin.h>
#include <stdint.h>

#define BLOCK 64 /* columns per packed block */

/* All MB rows of x against columns c0..c0+8*CV-1 of one packed block (wb: its [Kp][64]), into
 * out (rows out_stride apart). */
#define DEFINE_PASS(NAME, MB, CV)                                                                 \
static inline void NAME(const float *x, int64_t x_stride, const float *wb, int64_t K, int c0,      \
                        float *out, int64_t out_stride) {                                          \
    __m256 acc[MB][CV];                                                                           \
    for (int m = 0; m < MB; m++)                                                                  \
        for (int c = 0; c < CV; c++) acc[m][c] = _mm256_setzero_ps();                             \
    for (int64_t k = 0; k < K; k++) {                                                             \
        const float *row = wb + k * BLOCK + c0;                                                   \
        __m256 w[CV];                                                                             \
        for (int c = 0; c < CV; c++) w[c] = _mm256_loadu_ps(row + 8 * c);                         \
        for (int m = 0; m < MB; m++) {                                                            \
            const __m256 xv = _mm256_broadcast_ss(x + m * x_stride + k);                          \
            for (int c = 0; c < CV; c++) acc[m][c] = _mm256_fmadd_ps(xv, w[c], acc[m][c]);        \
        }                                                                                         \
    }                                                                                             \
    for (int m = 0; m < MB; m++)                                                                  \
        for (int c = 0; c < CV; c++) _mm256_storeu_ps(out + m * out_stride + c0 + 8 * c, acc[m][c]); \
}

/* Registers: MB x CV accumulators plus CV weight vectors within AVX2's 16. */
DEFINE_PASS(pass_1x8, 1, 8)
DEFINE_PASS(pass_2x4, 2, 4)
DEFINE_PASS(pass_3x4, 3, 4)

/* One packed block's 64 columns for all M rows into out (columns past n_valid dropped). */
static void block_product(const float *x, int64_t x_stride, int64_t M, const float *wb,
                          int64_t K, int64_t n0, int64_t n_valid, const float *bias, float *out,
                          int64_t out_stride) {
    float part[3][BLOCK];
    /* Direct calls, each inlined: through a function pointer 2 and 3 rows ran 20-40 % slower. */
    if (M == 1)
        pass_1x8(x, x_stride, wb, K, 0, part[0], BLOCK);
    else if (M == 2)
        for (int c0 = 0; c0 < BLOCK; c0 += 32) pass_2x4(x, x_stride, wb, K, c0, part[0], BLOCK);
    else
        for (int c0 = 0; c0 < BLOCK; c0 += 32) pass_3x4(x, x_stride, wb, K, c0, part[0], BLOCK);
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < n_valid; c++)
            out[m * out_stride + n0 + c] = part[m][c] + (bias ? bias[n0 + c] : 0.f);
}

/* x: M (<= 3) rows of K, x_stride apart; wp: the packed weight, ceil(N / 64) blocks of
 * [Kp][64]; out: M rows of N, out_stride apart. Returns 0 (nothing done) for M outside 1..3. */
int small_rows_f32(const float *x, int64_t x_stride, int64_t M, const float *wp, int64_t N,
                   int64_t K, int64_t Kp, const float *bias, float *out, int64_t out_stride,
                   int num_threads) {
    if (M < 1 || M > 3) return 0;
    const int64_t blocks = (N + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * BLOCK;
        block_product(x, x_stride, M, wp + b * Kp * BLOCK, K, n0,
                      N - n0 < BLOCK ? N - n0 : BLOCK, bias, out, out_stride);
    }
    return 1;
}
