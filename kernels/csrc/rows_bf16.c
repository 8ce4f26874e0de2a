/* Products of a decode batch's rows (1 to 64) against a bfloat16 weight in the layout oneDNN packs
 * it to on a CPU with AVX-512 BF16 and no AMX: out[m][n] = sum_k x[m][k] w[n][k] (+ bias[n]),
 * summed in float32, rounded to bfloat16 once.
 *
 * Why not oneDNN's own product over the same buffer: at these row counts it reaches 57-78 % of the
 * cores' vdpbf16ps rate (8 rows: 19 of the 31 GB/s the cores stream), and it splits each product
 * statically between the threads, so a core taken by a neighbour for a moment (the router, the
 * scheduler) stalls the whole product (docs/BENCHMARKS.md). Here the tasks (one block of 64 output
 * columns each) are handed out dynamically, and a block's rows run in groups of up to 6 against
 * the block's four vectors of a k-pair, 24 accumulators in registers.
 *
 * The packed layout is blocks of 64 output columns, each [Kp / 2][64][2]: k-pairs of one column
 * next to each other, which is vdpbf16ps's operand (kernels/cpu_linear.py checks a weight is in it
 * before using this). A row's k-pair is one 32-bit broadcast. Every output sums its k-pairs in
 * order, one vdpbf16ps each, as oneDNN's AVX-512 BF16 kernel does.
 * Built at run time by kernels/cpu_linear.py (kernels/c_library.py); no torch headers.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 64 /* output columns per packed block */
#define MAX_ROWS 64
#define ROW_GROUP 6 /* rows per register pass: 6 x 4 accumulators + 4 weight vectors of 32 */

#if defined(__AVX512BF16__)

typedef struct {
    const uint16_t *x; /* rows of Kp bfloat16 (zero past K), x_stride elements apart */
    int64_t x_stride;
    const uint16_t *bias; /* N bfloat16, or NULL */
    uint16_t *out;
    int64_t out_stride, N, K2; /* K2: k-pairs */
} Product;

static inline __m512 widen(__m256i v) { /* 16 bfloat16 -> float32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

/* Rows r0..r0+MR-1 of one block (wb: its [K2][64][2]) into out, columns n0.. (n_valid kept). */
#define DEFINE_PASS(MR)                                                                           \
static void pass_##MR(const Product *p, const uint16_t *wb, int64_t r0, int64_t n0,                \
                      int64_t n_valid) {                                                          \
    __m512 acc[MR][4];                                                                            \
    for (int m = 0; m < MR; m++)                                                                  \
        for (int c = 0; c < 4; c++) acc[m][c] = _mm512_setzero_ps();                              \
    const uint16_t *xr = p->x + r0 * p->x_stride;                                                 \
    for (int64_t kk = 0; kk < p->K2; kk++) {                                                      \
        const uint16_t *wk = wb + kk * 2 * BLOCK;                                                 \
        __m512bh w[4];                                                                            \
        for (int c = 0; c < 4; c++) w[c] = (__m512bh)_mm512_loadu_si512(wk + 32 * c);             \
        for (int m = 0; m < MR; m++) {                                                            \
            int32_t pair;                                                                         \
            memcpy(&pair, xr + m * p->x_stride + 2 * kk, 4);                                      \
            const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);                                 \
            for (int c = 0; c < 4; c++) acc[m][c] = _mm512_dpbf16_ps(acc[m][c], a, w[c]);         \
        }                                                                                         \
    }                                                                                             \
    for (int c = 0; c < 4; c++) {                                                                 \
        const int64_t left = n_valid - 16 * c;                                                    \
        if (left <= 0) break;                                                                     \
        const __mmask16 keep = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);               \
        __m512 b = _mm512_setzero_ps();                                                           \
        if (p->bias)                                                                              \
            b = widen(_mm256_maskz_loadu_epi16(keep, p->bias + n0 + 16 * c));                     \
        for (int m = 0; m < MR; m++) {                                                            \
            const __m256i y = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[m][c], b));           \
            _mm256_mask_storeu_epi16(p->out + (r0 + m) * p->out_stride + n0 + 16 * c, keep, y);   \
        }                                                                                         \
    }                                                                                             \
}

DEFINE_PASS(1)
DEFINE_PASS(2)
DEFINE_PASS(3)
DEFINE_PASS(4)
DEFINE_PASS(5)
DEFINE_PASS(6)

/* All rows of one block, in groups as even as 6 rows a group allows (8 rows: 4 + 4, not 6 + 2). */
static void block_product(const Product *p, const uint16_t *wb, int64_t M, int64_t n0,
                          int64_t n_valid) {
    const int64_t groups = (M + ROW_GROUP - 1) / ROW_GROUP;
    int64_t r0 = 0;
    for (int64_t g = 0; g < groups; g++) {
        const int64_t rows = (M - r0) / (groups - g) + ((M - r0) % (groups - g) ? 1 : 0);
        switch (rows) { /* direct calls, each inlined */
        case 1: pass_1(p, wb, r0, n0, n_valid); break;
        case 2: pass_2(p, wb, r0, n0, n_valid); break;
        case 3: pass_3(p, wb, r0, n0, n_valid); break;
        case 4: pass_4(p, wb, r0, n0, n_valid); break;
        case 5: pass_5(p, wb, r0, n0, n_valid); break;
        default: pass_6(p, wb, r0, n0, n_valid); break;
        }
        r0 += rows;
    }
}

#endif

/* x: M rows of Kp bfloat16 (K valid, zero to Kp), x_stride apart; wp: the packed weight,
 * ceil(N / 64) blocks of [Kp / 2][64][2]; out: M rows of N, out_stride apart. Returns 0 (nothing
 * done) for M outside 1..64, an odd Kp, or a build without AVX-512 BF16. */
int rows_bf16(const uint16_t *x, int64_t x_stride, int64_t M, const uint16_t *wp, int64_t N,
              int64_t Kp, const uint16_t *bias, uint16_t *out, int64_t out_stride,
              int num_threads) {
#if defined(__AVX512BF16__)
    if (M < 1 || M > MAX_ROWS || Kp % 2) return 0;
    const Product p = {x, x_stride, bias, out, out_stride, N, Kp / 2};
    const int64_t blocks = (N + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * BLOCK;
        block_product(&p, wp + b * Kp * BLOCK, M, n0, N - n0 < BLOCK ? N - n0 : BLOCK);
    }
    return 1;
#else
    (void)x; (void)x_stride; (void)M; (void)wp; (void)N; (void)Kp; (void)bias; (void)out;
    (void)out_stride; (void)num_threads;
    return 0;
#endif
}
