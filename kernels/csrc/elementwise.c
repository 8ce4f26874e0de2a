/* The decoder's elementwise operations for bfloat16 and float32 on the CPU, one pass each.
 *
 * The torch versions (kernels/elementwise.py) are the definitions; each takes several passes
 * over the tensor and as many dispatches (an RMSNorm is eight ops, a RoPE six), which at decode
 * sizes cost more than the arithmetic. These compute the same thing in one pass, rounding to
 * bfloat16 exactly where transformers' bfloat16 modules round (after every op they run in the
 * model's dtype), so results equal transformers' bit for bit except where a float32 sum or expf
 * differs in its last bit and that bit decides a bfloat16 rounding. In float32 every op rounds
 * as torch's does (a product before the sum that uses it, 1 / sqrt as torch's rsqrt); only the
 * order of the sum of squares and expf's last bit may differ.
 *
 * Built without contraction (-ffp-contract=off: a product rounds before the sum that uses it, as
 * in torch) and without reassociation except the sum of squares (an OpenMP simd reduction).
 * Built at run time by kernels/cpu_elementwise.py (kernels/c_library.py); no torch headers.
 * The sampler's argmax is here too (the last function): a row pass like the others.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#pragma omp declare simd notinbranch
extern float expf(float); /* glibc's vector variants (libmvec) where the loop vectorises */

#define bf bf16_to_f32
#define to_bf f32_to_bf16

static inline float round_bf(float f) { return bf(to_bf(f)); }

#if defined(__AVX512BW__)
#include "elementwise_avx512.h"
#define AVX512_ROWS 1
#else
#define AVX512_ROWS 0
#endif

/* Rows in parallel only when there is enough work to pay for waking the team. */
#define PARALLEL_MIN 32768

#if !AVX512_ROWS
/* One row's output given its sum of squares s: Llama's bf16(w * bf16(y)), or Gemma's
 * bf16(y * (1 + w)), y = x / sqrt(s / dim + eps). */
static void rms_row_out(const uint16_t *x, const uint16_t *w, uint16_t *o, int64_t dim, float s,
                        float eps, int gemma) {
    const float inv = 1.0f / sqrtf(s / (float)dim + eps);
    if (gemma) {
#pragma omp simd
        for (int64_t j = 0; j < dim; j++) o[j] = to_bf(bf(x[j]) * inv * (1.0f + bf(w[j])));
    } else {
#pragma omp simd
        for (int64_t j = 0; j < dim; j++) o[j] = to_bf(bf(w[j]) * round_bf(bf(x[j]) * inv));
    }
}
#endif

/* y = x / sqrt(mean(x^2) + eps) in float32, then Llama's bf16(w * bf16(y)) or, gemma != 0,
 * Gemma's bf16(y * (1 + w)). x rows are x_stride apart; out is contiguous [rows, dim]. */
static inline void rms_one_bf16(const uint16_t *xr, const uint16_t *w, uint16_t *o, int64_t dim,
                                float eps, int gemma) {
#if AVX512_ROWS
    rms_row(xr, w, o, dim, eps, gemma);
#else
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < dim; j++) s += bf(xr[j]) * bf(xr[j]);
    rms_row_out(xr, w, o, dim, s, eps, gemma);
#endif
}

void rms_norm_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *w, uint16_t *out,
                   int64_t rows, int64_t dim, float eps, int gemma, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * dim >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++)
        rms_one_bf16(x + r * x_stride, w, out + r * dim, dim, eps, gemma);
}

/* rms_norm_bf16 of each of `heads` heads (dim values each) of `tokens` tokens, in place: Qwen3's
 * and Gemma 3's per-head q/k norms on the fused projection's output, where token t's heads
 * start at x + t * token_stride, side by side. (A row's sum is taken before it is written.) */
void rms_norm_heads_bf16(uint16_t *x, int64_t token_stride, int64_t tokens, int64_t heads,
                         int64_t dim, const uint16_t *w, float eps, int gemma, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) \
    if (tokens * heads * dim >= PARALLEL_MIN)
    for (int64_t r = 0; r < tokens * heads; r++) {
        uint16_t *xr = x + (r / heads) * token_stride + (r % heads) * dim;
        rms_one_bf16(xr, w, xr, dim, eps, gemma);
    }
}

/* The residual stream's step between sublayers: sum = bf16(x + h) (rounded as torch adds two
 * bfloat16 tensors), then out = rms_norm_bf16(sum). One pass where torch reads x and h, writes
 * the sum, and the norm reads it back. x, h, sum and out are contiguous [rows, dim]; sum may
 * be x itself. */
void add_rms_norm_bf16(const uint16_t *x, const uint16_t *h, const uint16_t *w, uint16_t *sum,
                       uint16_t *out, int64_t rows, int64_t dim, float eps, int gemma,
                       int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * dim >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * dim, *hr = h + r * dim;
        uint16_t *sr = sum + r * dim, *o = out + r * dim;
#if AVX512_ROWS
        add_rms_row(xr, hr, w, sr, o, dim, eps, gemma);
#else
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < dim; j++) {
            const float v = round_bf(bf(xr[j]) + bf(hr[j]));
            sr[j] = to_bf(v);
            s += v * v;
        }
        rms_row_out(sr, w, o, dim, s, eps, gemma);
#endif
    }
}

/* Rotate-half RoPE in place on the first 2 * half dims of each of `heads` heads of `tokens`
 * tokens (token t, head h starts at x + t * token_stride + h * head_dim): transformers'
 * x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin, each product and sum rounded to bfloat16.
 * cos and sin of token t start at cos + t * cs_stride (bf16, half values each). */
void rope_bf16(uint16_t *x, int64_t token_stride, int64_t head_dim, int64_t tokens,
               int64_t heads, int64_t half, const uint16_t *cos, const uint16_t *sin,
               int64_t cs_stride, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) \
    if (tokens * heads * half >= PARALLEL_MIN)
    for (int64_t t = 0; t < tokens; t++) {
        const uint16_t *c = cos + t * cs_stride, *s = sin + t * cs_stride;
#if AVX512_ROWS
        rope_token(x + t * token_stride, head_dim, heads, half, c, s);
#else
        for (int64_t h = 0; h < heads; h++) {
            uint16_t *x1 = x + t * token_stride + h * head_dim, *x2 = x1 + half;
#pragma omp simd
            for (int64_t j = 0; j < half; j++) {
                const float a = bf(x1[j]), b = bf(x2[j]), cj = bf(c[j]), sj = bf(s[j]);
                x1[j] = to_bf(round_bf(a * cj) - round_bf(b * sj));
                x2[j] = to_bf(round_bf(b * cj) + round_bf(a * sj));
            }
        }
#endif
    }
}

/* out = bf16(bf16(silu(gate)) * up) for a fused [tokens, 2 * inter] gate/up projection whose rows
 * are stride apart; out is contiguous [tokens, inter]. */
void silu_mul_bf16(const uint16_t *gate_up, int64_t stride, uint16_t *out, int64_t tokens,
                   int64_t inter, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) \
    if (tokens * inter >= PARALLEL_MIN)
    for (int64_t t = 0; t < tokens; t++) {
        const uint16_t *g = gate_up + t * stride, *u = g + inter;
        uint16_t *o = out + t * inter;
#if AVX512_ROWS
        silu_mul_row(g, u, o, inter);
#else
#pragma omp simd
        for (int64_t j = 0; j < inter; j++) {
            const float x = bf(g[j]);
            o[j] = to_bf(round_bf(x / (1.0f + expf(-x))) * bf(u[j]));
        }
#endif
    }
}

/* GeGLU: out = act(gate) * up with torch's tanh GELU, 0.5 x (1 + tanh(b (x + k x^3))), in torch's
 * own arithmetic: its vector kernel's order (the inner sum an FMA, as GCC contracts ATen's
 * vector code) and its own vector tanh, whose address the caller passes (Sleef's, exported by
 * libtorch; kernels/cpu_elementwise.py checks once that the results equal torch's). Where
 * torch's threads split a row off a 16-value boundary torch takes those few values through
 * its scalar tanh instead. AVX-512 builds only (the tanh takes a 512-bit vector); returns 0,
 * nothing done, elsewhere or when inter is not a multiple of 16. bfloat16: the activation
 * rounded, then the product, as torch's two ops round. */
#if AVX512_ROWS
typedef __m512 (*tanh16_fn)(__m512);

static inline __m512 gelu_tanh16(__m512 x, tanh16_fn tanh16) {
    /* torch's sqrt(2) * 2 / sqrt(pi) * 0.5, formed in double and rounded once */
    const __m512 beta =
        _mm512_set1_ps((float)(1.41421356237309504880 * 1.12837916709551257390 * 0.5));
    const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
    const __m512 inner = _mm512_mul_ps(beta, _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), cube, x));
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x),
                         _mm512_add_ps(_mm512_set1_ps(1.0f), tanh16(inner)));
}
#endif

/* Both dtypes' rows (bf16: gate_up and out are bfloat16, else float32). */
static int gelu_tanh_mul(const void *gate_up, int64_t stride, void *out, int64_t tokens,
                         int64_t inter, const void *tanh16, int bf16, int num_threads) {
#if AVX512_ROWS
    if (inter % 16) return 0;
    const tanh16_fn th = (tanh16_fn)tanh16;
#pragma omp parallel for schedule(static) num_threads(num_threads) \
    if (tokens * inter >= PARALLEL_MIN)
    for (int64_t t = 0; t < tokens; t++) {
        for (int64_t j = 0; j < inter; j += 16) {
            const int64_t at = t * stride + j, to = t * inter + j;
            if (bf16) {
                const uint16_t *g = (const uint16_t *)gate_up + at;
                const __m512 act = bf16x16_round(gelu_tanh16(bf16x16_load(g, 0xffff), th));
                bf16x16_store((uint16_t *)out + to,
                              _mm512_mul_ps(act, bf16x16_load(g + inter, 0xffff)), 0xffff);
            } else {
                const float *g = (const float *)gate_up + at;
                const __m512 act = gelu_tanh16(_mm512_loadu_ps(g), th);
                _mm512_storeu_ps((float *)out + to, _mm512_mul_ps(act, _mm512_loadu_ps(g + inter)));
            }
        }
    }
    return 1;
#else
    (void)gate_up; (void)stride; (void)out; (void)tokens; (void)inter; (void)tanh16; (void)bf16;
    (void)num_threads;
    return 0;
#endif
}

int gelu_tanh_mul_bf16(const uint16_t *gate_up, int64_t stride, uint16_t *out, int64_t tokens,
                       int64_t inter, const void *tanh16, int num_threads) {
    return gelu_tanh_mul(gate_up, stride, out, tokens, inter, tanh16, 1, num_threads);
}

int gelu_tanh_mul_f32(const float *gate_up, int64_t stride, float *out, int64_t tokens,
                      int64_t inter, const void *tanh16, int num_threads) {
    return gelu_tanh_mul(gate_up, stride, out, tokens, inter, tanh16, 0, num_threads);
}

/* float32: the same operations, rounded only where torch rounds (after each op). */

static void rms_row_f32(const float *x, const float *w, float *o, int64_t dim, float eps,
                        int gemma) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < dim; j++) s += x[j] * x[j];
    const float inv = 1.0f / sqrtf(s / (float)dim + eps);
    if (gemma) {
#pragma omp simd
        for (int64_t j = 0; j < dim; j++) o[j] = x[j] * inv * (1.0f + w[j]);
    } else {
#pragma omp simd
        for (int64_t j = 0; j < dim; j++) o[j] = w[j] * (x[j] * inv);
    }
}

void rms_norm_f32(const float *x, int64_t x_stride, const float *w, float *out, int64_t rows,
                  int64_t dim, float eps, int gemma, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * dim >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) rms_row_f32(x + r * x_stride, w, out + r * dim, dim, eps, gemma);
}

void rms_norm_heads_f32(float *x, int64_t token_stride, int64_t tokens, int64_t heads,
                        int64_t dim, const float *w, float eps, int gemma, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) \
    if (tokens * heads * dim >= PARALLEL_MIN)
    for (int64_t r = 0; r < tokens * heads; r++) {
        float *xr = x + (r / heads) * token_stride + (r % heads) * dim;
        rms_row_f32(xr, w, xr, dim, eps, gemma);
    }
}

void add_rms_norm_f32(const float *x, const float *h, const float *w, float *sum, float *out,
                      int64_t rows, int64_t dim, float eps, int gemma, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * dim >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim, *hr = h + r * dim;
        float *sr = sum + r * dim;
#pragma omp simd
        for (int64_t j = 0; j < dim; j++) sr[j] = xr[j] + hr[j];
        rms_row_f32(sr, w, out + r * dim, dim, eps, gemma);
    }
}

void rope_f32(float *x, int64_t token_stride, int64_t head_dim, int64_t tokens, int64_t heads,
              int64_t half, const float *cos, const float *sin, int64_t cs_stride,
              int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) \
    if (tokens * heads * half >= PARALLEL_MIN)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos + t * cs_stride, *s = sin + t * cs_stride;
        for (int64_t h = 0; h < heads; h++) {
            float *x1 = x + t * token_stride + h * head_dim, *x2 = x1 + half;
#pragma omp simd
            for (int64_t j = 0; j < half; j++) {
                const float a = x1[j], b = x2[j];
                x1[j] = a * c[j] - b * s[j];
                x2[j] = b * c[j] + a * s[j];
            }
        }
    }
}

void silu_mul_f32(const float *gate_up, int64_t stride, float *out, int64_t tokens,
                  int64_t inter, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) \
    if (tokens * inter >= PARALLEL_MIN)
    for (int64_t t = 0; t < tokens; t++) {
        const float *g = gate_up + t * stride, *u = g + inter;
        float *o = out + t * inter;
#pragma omp simd
        for (int64_t j = 0; j < inter; j++) o[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
    }
}

/* Index of each row's largest value, as torch's argmax picks it: the first of equal maxima,
 * and the first NaN where a row holds one. torch's CPU argmax runs one compare at a time
 * (0.9 ns an element: 7.8 ms for 64 rows of a 152k vocabulary). x rows are x_stride apart. */
#if AVX512_ROWS
static int64_t first_nan(const float *x, int64_t cols) {
    for (int64_t j = 0; j < cols; j++)
        if (x[j] != x[j]) return j;
    return -1;
}

/* One pass: each of 4 x 16 lanes keeps its running maximum and where it first saw it (a strict
 * greater-than keeps the first), and a lane holding a NaN is noted; then the lanes' maxima are
 * reduced, the lowest index winning a tie. */
static int64_t argmax_row_f32(const float *x, int64_t cols) {
    const __m512i step = _mm512_set1_epi32(64);
    __m512 best[4];
    __m512i at[4], idx[4];
    __mmask16 nan = 0;
    for (int c = 0; c < 4; c++) {
        best[c] = _mm512_set1_ps(-INFINITY);
        at[c] = _mm512_setzero_si512();
        idx[c] = _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3,
                                                   2, 1, 0), _mm512_set1_epi32(16 * c));
    }
    int64_t j = 0;
    for (; j + 64 <= cols; j += 64) {
        for (int c = 0; c < 4; c++) {
            const __m512 v = _mm512_loadu_ps(x + j + 16 * c);
            const __mmask16 gt = _mm512_cmp_ps_mask(v, best[c], _CMP_GT_OQ);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            best[c] = _mm512_mask_mov_ps(best[c], gt, v);
            at[c] = _mm512_mask_mov_epi32(at[c], gt, idx[c]);
            idx[c] = _mm512_add_epi32(idx[c], step);
        }
    }
    float m = -INFINITY;
    int64_t arg = -1;
    for (int c = 0; c < 4; c++) {
        float vals[16];
        int32_t where[16];
        _mm512_storeu_ps(vals, best[c]);
        _mm512_storeu_si512(where, at[c]);
        for (int l = 0; l < 16; l++)
            if (vals[l] > m || (vals[l] == m && where[l] < arg)) m = vals[l], arg = where[l];
    }
    for (; j < cols; j++) {
        if (x[j] != x[j]) nan = 1;
        if (x[j] > m) m = x[j], arg = j;
    }
    if (nan) return first_nan(x, cols);
    return arg < 0 ? 0 : arg; /* a row of -inf: its first */
}
#else
static int64_t argmax_row_f32(const float *x, int64_t cols) {
    float m = -INFINITY;
    int64_t arg = 0;
    for (int64_t j = 0; j < cols; j++) {
        if (x[j] != x[j]) return j;
        if (x[j] > m) m = x[j], arg = j;
    }
    return arg;
}
#endif

void argmax_f32(const float *x, int64_t x_stride, int64_t rows, int64_t cols, int64_t *out,
                int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * cols >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) out[r] = argmax_row_f32(x + r * x_stride, cols);
}
