/* Products of a decode batch's or a short chunk's rows (1 to 256) against a weight in the layout
 * oneDNN packs it to on a CPU with AVX-512 and no AMX: out[m][n] = sum_k x[m][k] w[n][k] (+ bias[n]), summed in float32
 * (bfloat16: rounded to bfloat16 once).
 *
 * Why not oneDNN's own product over the same buffer: at these row counts it reaches 57-78 % of the
 * cores' vdpbf16ps rate in bfloat16 (8 rows: 19 of the 31 GB/s the cores stream) and reads a
 * float32 weight at 17-18 GB/s up to 8 rows, and it splits each product statically between the
 * threads, so a core taken by a neighbour for a moment (the router, the scheduler) stalls the
 * whole product (docs/BENCHMARKS.md). Here the tasks (one block of 64 output columns each) are
 * handed out dynamically, and a block's rows run in groups of up to 6 against the block's four
 * vectors of one k (float32) or k-pair (bfloat16), 24 accumulators in registers.
 *
 * The packed layouts are blocks of 64 output columns: float32 [Kp][64]; bfloat16 [Kp / 2][64][2],
 * k-pairs of one column next to each other, which is vdpbf16ps's operand (Kp: K padded, the
 * padding never read; kernels/cpu_linear.py checks a weight is in one before using this). A row's k (k-pair) is one 32-bit broadcast. Every
 * output sums its k (k-pairs) in order, one FMA (vdpbf16ps) each, as oneDNN's AVX-512 kernels do;
 * bfloat16 bias loads and roundings are elementwise_avx512.h's (torch's rounding).
 * Built at run time by kernels/cpu_linear.py (kernels/c_library.py); no torch headers.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 64 /* output columns per packed block */
#define MAX_ROWS 256 /* the most any caller asks (kernels/cpu_linear.py) */
#define ROW_GROUP 6 /* rows per register pass: 6 x 4 accumulators + 4 weight vectors of 32 */

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include "elementwise_avx512.h" /* lanes(); bfloat16 loads and stores */

typedef struct {
    const void *x; /* rows of K, x_stride elements apart */
    int64_t x_stride;
    const void *bias; /* N of the weight's dtype, or NULL */
    void *out;
    int64_t out_stride, N, steps; /* steps: k (float32) or k-pairs (bfloat16) per output */
} Product;

/* The float32 step: one k, 64 columns of it in 4 vectors, x[m][k] broadcast. */
#define F32_ELEMENT float
#define F32_STEP_ELEMENTS 1
#define F32_WEIGHT(wk, c) _mm512_loadu_ps((const float *)(wk) + 16 * (c))
#define F32_ROW(xr, kk) _mm512_set1_ps((xr)[kk])
#define F32_FMA(acc, a, w) _mm512_fmadd_ps(a, w, acc)
#define F32_TYPE __m512
#define F32_BIAS(bias, keep) _mm512_maskz_loadu_ps(keep, bias)
#define F32_STORE(dst, keep, v) _mm512_mask_storeu_ps(dst, keep, v)

#if defined(__AVX512BF16__)
static inline __m512bh row_pair(const uint16_t *xr, int64_t kk) {
    int32_t pair;
    memcpy(&pair, xr + 2 * kk, 4);
    return (__m512bh)_mm512_set1_epi32(pair);
}
/* The bfloat16 step: one k-pair, 64 columns of it in 4 vectors, x[m][2kk..2kk+1] broadcast. */
#define BF16_ELEMENT uint16_t
#define BF16_STEP_ELEMENTS 2
#define BF16_WEIGHT(wk, c) (__m512bh)_mm512_loadu_si512((const uint16_t *)(wk) + 32 * (c))
#define BF16_ROW(xr, kk) row_pair(xr, kk)
#define BF16_FMA(acc, a, w) _mm512_dpbf16_ps(acc, a, w)
#define BF16_TYPE __m512bh
#define BF16_BIAS(bias, keep) bf16x16_load(bias, keep)
#define BF16_STORE(dst, keep, v) bf16x16_store(dst, v, keep)
#endif

/* Rows r0..r0+MR-1 of one block (wb: its steps x 64 columns) into out, columns n0.. (n_valid
 * kept). */
#define DEFINE_PASS(T, MR)                                                                        \
static void T##_pass_##MR(const Product *p, const T##_ELEMENT *wb, int64_t r0, int64_t n0,        \
                          int64_t n_valid) {                                                      \
    __m512 acc[MR][4];                                                                            \
    for (int m = 0; m < MR; m++)                                                                  \
        for (int c = 0; c < 4; c++) acc[m][c] = _mm512_setzero_ps();                              \
    const T##_ELEMENT *xr = (const T##_ELEMENT *)p->x + r0 * p->x_stride;                         \
    for (int64_t kk = 0; kk < p->steps; kk++) {                                                   \
        const T##_ELEMENT *wk = wb + kk * T##_STEP_ELEMENTS * BLOCK;                              \
        T##_TYPE w[4];                                                                            \
        for (int c = 0; c < 4; c++) w[c] = T##_WEIGHT(wk, c);                                     \
        for (int m = 0; m < MR; m++) {                                                            \
            const T##_TYPE a = T##_ROW(xr + m * p->x_stride, kk);                                 \
            for (int c = 0; c < 4; c++) acc[m][c] = T##_FMA(acc[m][c], a, w[c]);                  \
        }                                                                                         \
    }                                                                                             \
    const T##_ELEMENT *bias = (const T##_ELEMENT *)p->bias;                                       \
    T##_ELEMENT *out = (T##_ELEMENT *)p->out;                                                     \
    for (int c = 0; c < 4; c++) {                                                                 \
        const int64_t left = n_valid - 16 * c;                                                    \
        if (left <= 0) break;                                                                     \
        const __mmask16 keep = lanes(left);                                                       \
        const __m512 b = bias ? T##_BIAS(bias + n0 + 16 * c, keep) : _mm512_setzero_ps();         \
        for (int m = 0; m < MR; m++)                                                              \
            T##_STORE(out + (r0 + m) * p->out_stride + n0 + 16 * c, keep,                         \
                      _mm512_add_ps(acc[m][c], b));                                               \
    }                                                                                             \
}

/* All rows of one block, in groups as even as 6 rows a group allows (8 rows: 4 + 4, not 6 + 2);
 * direct calls, each inlined. */
#define DEFINE_BLOCK(T)                                                                           \
DEFINE_PASS(T, 1) DEFINE_PASS(T, 2) DEFINE_PASS(T, 3)                                             \
DEFINE_PASS(T, 4) DEFINE_PASS(T, 5) DEFINE_PASS(T, 6)                                             \
static void T##_block(const Product *p, const T##_ELEMENT *wb, int64_t M, int64_t n0,             \
                      int64_t n_valid) {                                                          \
    const int64_t groups = (M + ROW_GROUP - 1) / ROW_GROUP;                                       \
    int64_t r0 = 0;                                                                               \
    for (int64_t g = 0; g < groups; g++) {                                                        \
        const int64_t rows = (M - r0 + groups - g - 1) / (groups - g);                            \
        switch (rows) {                                                                           \
        case 1: T##_pass_1(p, wb, r0, n0, n_valid); break;                                        \
        case 2: T##_pass_2(p, wb, r0, n0, n_valid); break;                                        \
        case 3: T##_pass_3(p, wb, r0, n0, n_valid); break;                                        \
        case 4: T##_pass_4(p, wb, r0, n0, n_valid); break;                                        \
        case 5: T##_pass_5(p, wb, r0, n0, n_valid); break;                                        \
        default: T##_pass_6(p, wb, r0, n0, n_valid); break;                                       \
        }                                                                                         \
        r0 += rows;                                                                               \
    }                                                                                             \
}                                                                                                 \
/* Every block of the weight (wp: ceil(N / 64) blocks of Kp x 64), one task each, handed out      \
 * dynamically. */                                                                                \
static void T##_blocks(const Product *p, const T##_ELEMENT *wp, int64_t Kp, int64_t M,            \
                       int num_threads) {                                                         \
    const int64_t blocks = (p->N + BLOCK - 1) / BLOCK;                                            \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(num_threads)")                     \
    for (int64_t b = 0; b < blocks; b++) {                                                        \
        const int64_t n0 = b * BLOCK;                                                             \
        T##_block(p, wp + b * Kp * BLOCK, M, n0, p->N - n0 < BLOCK ? p->N - n0 : BLOCK);          \
    }                                                                                             \
}

DEFINE_BLOCK(F32)
#if defined(__AVX512BF16__)
DEFINE_BLOCK(BF16)
#endif

#endif

/* An entry point built without its instructions: nothing done (the caller runs oneDNN's). */
#define NOT_BUILT()                                                                               \
    (void)x; (void)x_stride; (void)M; (void)wp; (void)N; (void)K; (void)Kp; (void)bias;          \
    (void)out; (void)out_stride; (void)num_threads;                                               \
    return 0

/* x: M rows of K float32, x_stride apart; wp: the packed weight, ceil(N / 64) blocks of [Kp][64];
 * out: M rows of N, out_stride apart. Returns 0 (nothing done) for M outside 1..256 or a
 * build without AVX-512. */
int rows_f32(const float *x, int64_t x_stride, int64_t M, const float *wp, int64_t N, int64_t K,
             int64_t Kp, const float *bias, float *out, int64_t out_stride, int num_threads) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (M < 1 || M > MAX_ROWS) return 0;
    const Product p = {x, x_stride, bias, out, out_stride, N, K};
    F32_blocks(&p, wp, Kp, M, num_threads);
    return 1;
#else
    NOT_BUILT();
#endif
}

/* x: M rows of K bfloat16, x_stride apart; wp: the packed weight, ceil(N / 64) blocks of
 * [Kp / 2][64][2] (zero past K); out: M rows of N, out_stride apart. Returns 0 (nothing done) for
 * M outside 1..256, an odd K (its last pair would read past a row), or a build without AVX-512
 * BF16. */
int rows_bf16(const uint16_t *x, int64_t x_stride, int64_t M, const uint16_t *wp, int64_t N,
              int64_t K, int64_t Kp, const uint16_t *bias, uint16_t *out, int64_t out_stride,
              int num_threads) {
#if defined(__AVX512BF16__)
    if (M < 1 || M > MAX_ROWS || K % 2 || Kp % 2 || Kp < K) return 0;
    const Product p = {x, x_stride, bias, out, out_stride, N, K / 2};
    BF16_blocks(&p, wp, Kp, M, num_threads);
    return 1;
#else
    NOT_BUILT();
#endif
}
