/* Prefill (extend) attention for bfloat16 on AMX tiles: one chunk's queries against its keys,
 * causal, optionally windowed; the contract of kernels.reference.paged_extend_attention for one
 * chunk whose K/V rows the caller hands over token-major (its own new rows, or its cache rows
 * gathered), so no block table is read here.
 *
 * Why: torch's fused CPU attention spent 0.7 ms per ~358-token chunk and layer in a prefill step
 * (about 280 GFLOP/s), more at a length it had not run before (its first call at a new length
 * sets up new kernels) or one not a multiple of 16 (docs/BENCHMARKS.md: a burst of 64 new lengths
 * 349 ms, 135 here; bench/cpu_extend.py). Here K and V are packed once per KV
 * head into the layouts the tile multiply reads, and each task (a query head, 16 query rows)
 * walks key blocks: scores S = Q K^T on tiles in float32, an online softmax over S in AVX-512
 * (exact float32 maximum and sum, probabilities rounded to bfloat16 for the second product as
 * torch's kernel rounds them), then P V on tiles, the running output rescaled in float32.
 *
 * Head dims 64 (key blocks of 64) and 128 (blocks of 32), the block sizes that keep Q, the
 * scores and one operand within the 8 tile registers. Returns 0 (nothing written) for anything
 * else, or where the kernel may not use AMX; the caller then runs its torch path.
 * Built at run time by kernels/cpu_extend.py (kernels/c_library.py); no torch headers.
 */
#define _GNU_SOURCE /* syscall */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "bf16.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BW__)
#include "elementwise_avx512.h"
#include "extend_pack_bf16.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Linux hands AMX state to a process only once it asks; 1 when it may use the tiles. */
int extend_amx_init(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

static void configure_tiles(void) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    _tile_loadconfig(&cfg);
}

/* The online softmax over one key block's raw scores (16 x kb, float32, row stride kb): p (bf16,
 * row stride kb) the probabilities of the seen keys (0 for the rest), alpha the rescale of each
 * row's running output; rows past `rows` get p = 0 and alpha = 1. run_max is kept in scaled
 * units (scale > 0, so the maximum commutes with scaling) and each weight is
 * exp(fma(s, scale, -max)). All 16 rows' maxima first, then all their weights: one row at a
 * time left each exp waiting on its row's maximum (twice as slow). A block every row sees whole
 * skips the masks. */
static void softmax_block(float *s, uint16_t *p, int64_t kb, int rows, int64_t k0, int64_t len,
                          int64_t pos0, int64_t window, float scale, float *run_max,
                          float *run_sum, float *alpha) {
    const __m512 lane = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 ninf = _mm512_set1_ps(-INFINITY), vscale = _mm512_set1_ps(scale);
    float block_max[16], sums[16];
    int whole[16];
    for (int r = 0; r < 16; r++) {
        float *sr = s + r * kb;
        const int64_t pos = pos0 + r;  /* keys in [lo, hi) are seen */
        const int64_t hi = pos + 1 < len ? pos + 1 : len, lo = window > 0 ? pos - window + 1 : 0;
        whole[r] = k0 >= lo && k0 + kb <= hi;
        if (r >= rows || hi <= k0 || lo >= k0 + kb) {
            block_max[r] = -INFINITY;
            continue;
        }
        __m512 mx = ninf;
        for (int64_t j = 0; j < kb; j += 16) {
            __m512 v = _mm512_loadu_ps(sr + j);
            if (!whole[r]) {
                const __m512 key = _mm512_add_ps(_mm512_set1_ps((float)(k0 + j)), lane);
                const __mmask16 seen =
                    _mm512_cmp_ps_mask(key, _mm512_set1_ps((float)hi), _CMP_LT_OQ) &
                    _mm512_cmp_ps_mask(key, _mm512_set1_ps((float)lo), _CMP_GE_OQ);
                v = _mm512_mask_mov_ps(ninf, seen, v);
                _mm512_storeu_ps(sr + j, v);
            }
            mx = _mm512_max_ps(mx, v);
        }
        block_max[r] = _mm512_reduce_max_ps(mx) * scale;
    }
    /* Per row (lanes): the new maximum and the running output's rescale. */
    const __m512 m_old = _mm512_loadu_ps(run_max);
    const __m512 m_new = _mm512_max_ps(m_old, _mm512_loadu_ps(block_max));
    const __mmask16 seen = _mm512_cmp_ps_mask(_mm512_loadu_ps(block_max), ninf, _CMP_NEQ_OQ);
    const __mmask16 had = _mm512_cmp_ps_mask(m_old, ninf, _CMP_NEQ_OQ);
    __m512 a = _mm512_maskz_mov_ps(had, exp16(_mm512_sub_ps(m_old, m_new)));
    a = _mm512_mask_mov_ps(_mm512_set1_ps(1.0f), seen, a);  /* nothing new: output unchanged */
    _mm512_storeu_ps(alpha, a);
    float m_row[16];
    _mm512_storeu_ps(m_row, m_new);
    for (int r = 0; r < 16; r++) {
        const float *sr = s + r * kb;
        uint16_t *pr = p + r * kb;
        sums[r] = 0.0f;
        if (!(seen >> r & 1)) {
            memset(pr, 0, kb * 2);
            continue;
        }
        const __m512 vmax = _mm512_set1_ps(m_row[r]);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < kb; j += 16) {
            const __m512 x = _mm512_loadu_ps(sr + j);
            __m512 e = exp16(_mm512_fmsub_ps(x, vscale, vmax));
            if (!whole[r])  /* a masked key's weight is exactly 0 */
                e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ), e);
            sum = _mm512_add_ps(sum, e);
            _mm256_storeu_si256((__m256i *)(pr + j), bf16x16_pack(e));
        }
        sums[r] = _mm512_reduce_add_ps(sum);
    }
    const __m512 l = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(run_sum), a), _mm512_loadu_ps(sums));
    _mm512_storeu_ps(run_sum, _mm512_mask_mov_ps(_mm512_loadu_ps(run_sum), seen, l));
    _mm512_storeu_ps(run_max, m_new);
}

/* acc = acc * alpha + pv, row by row (16 x dim, float32). */
static void rescale_add(float *acc, const float *pv, const float *alpha, int64_t dim) {
    for (int r = 0; r < 16; r++) {
        const __m512 a = _mm512_set1_ps(alpha[r]);
        for (int64_t d = 0; d < dim; d += 16) {
            const __m512 x = _mm512_loadu_ps(acc + r * dim + d);
            _mm512_storeu_ps(acc + r * dim + d, _mm512_add_ps(_mm512_mul_ps(x, a),
                                                              _mm512_loadu_ps(pv + r * dim + d)));
        }
    }
}

/* S (tiles 2-5) = Q (tiles 0-1) K^T for 64 keys from key block b16 (in 16s); head dim 64. */
static inline void scores_d64(const uint32_t *kp, int64_t b16, float *s) {
    const uint32_t *kb = kp + b16 * 16 * 32;
#define SCORE(T, J)                                                        \
    _tile_zero(T);                                                         \
    _tile_loadd(6, kb + (J) * 16 * 32, 64);                                \
    _tile_dpbf16ps(T, 0, 6);                                               \
    _tile_loadd(6, kb + (J) * 16 * 32 + 16 * 16, 64);                      \
    _tile_dpbf16ps(T, 1, 6);                                               \
    _tile_stored(T, s + (J) * 16, 64 * 4);
    SCORE(2, 0) SCORE(3, 1) SCORE(4, 2) SCORE(5, 3)
#undef SCORE
}

/* PV (16 x 64) = P (tiles 0-1, 64 keys) V for the 32 key pairs from pair k2; head dim 64. */
static inline void values_d64(const uint16_t *p, const uint32_t *vp, int64_t k2, float *pv) {
    _tile_loadd(0, p, 64 * 2);
    _tile_loadd(1, p + 32, 64 * 2);
#define VALUE(T, C)                                                        \
    _tile_zero(T);                                                         \
    _tile_loadd(6, vp + k2 * 64 + (C) * 16, 64 * 4);                       \
    _tile_dpbf16ps(T, 0, 6);                                               \
    _tile_loadd(6, vp + (k2 + 16) * 64 + (C) * 16, 64 * 4);                \
    _tile_dpbf16ps(T, 1, 6);                                               \
    _tile_stored(T, pv + (C) * 16, 64 * 4);
    VALUE(2, 0) VALUE(3, 1) VALUE(4, 2) VALUE(5, 3)
#undef VALUE
}

/* S (tiles 4-5) = Q (tiles 0-3) K^T for 32 keys; head dim 128. */
static inline void scores_d128(const uint32_t *kp, int64_t b16, float *s) {
    const uint32_t *kb = kp + b16 * 16 * 64;
#define SCORE(T, J)                                                        \
    _tile_zero(T);                                                         \
    _tile_loadd(6, kb + (J) * 16 * 64, 64);                                \
    _tile_dpbf16ps(T, 0, 6);                                               \
    _tile_loadd(6, kb + (J) * 16 * 64 + 16 * 16, 64);                      \
    _tile_dpbf16ps(T, 1, 6);                                               \
    _tile_loadd(6, kb + (J) * 16 * 64 + 32 * 16, 64);                      \
    _tile_dpbf16ps(T, 2, 6);                                               \
    _tile_loadd(6, kb + (J) * 16 * 64 + 48 * 16, 64);                      \
    _tile_dpbf16ps(T, 3, 6);                                               \
    _tile_stored(T, s + (J) * 16, 32 * 4);
    SCORE(4, 0) SCORE(5, 1)
#undef SCORE
}

/* PV (16 x 128) = P (tile 0, 32 keys) V for the 16 key pairs from pair k2; head dim 128. */
static inline void values_d128(const uint16_t *p, const uint32_t *vp, int64_t k2, float *pv) {
    _tile_loadd(0, p, 32 * 2);
#define VALUE(T, C)                                                        \
    _tile_zero(T);                                                         \
    _tile_loadd(6, vp + k2 * 128 + (C) * 16, 128 * 4);                     \
    _tile_dpbf16ps(T, 0, 6);                                               \
    _tile_stored(T, pv + (C) * 16, 128 * 4);
    VALUE(1, 0) VALUE(2, 1) VALUE(3, 2) VALUE(4, 3) VALUE(5, 4) VALUE(7, 5)
    VALUE(1, 6) VALUE(2, 7)
#undef VALUE
}

static inline void load_queries(const uint16_t *q, int64_t stride_bytes, int64_t dim) {
    _tile_loadd(0, q, stride_bytes);
    _tile_loadd(1, q + 32, stride_bytes);
    if (dim == 128) {
        _tile_loadd(2, q + 64, stride_bytes);
        _tile_loadd(3, q + 96, stride_bytes);
    }
}

/* One task: query head h, query rows [r0, r0 + rows). */
static void extend_task(const uint16_t *q, int64_t q_stride, int64_t r0, int rows, int64_t h,
                        const uint32_t *kp, const uint32_t *vp, int64_t len, int64_t q_offset,
                        int64_t window, int64_t dim, float scale, uint16_t *out,
                        int64_t out_stride) {
    const int64_t kb = dim == 64 ? 64 : 32;
    uint16_t qbuf[16 * 128], pbuf[16 * 64];
    float s[16 * 64], pv[16 * 128], acc[16 * 128], run_max[16], run_sum[16], alpha[16];
    const uint16_t *qa = q + r0 * q_stride + h * dim;
    int64_t qa_stride = q_stride * 2;
    if (rows < 16) {  /* a tile reads 16 rows: copy the last few into a zeroed buffer */
        memset(qbuf, 0, sizeof qbuf);
        for (int r = 0; r < rows; r++) memcpy(qbuf + r * dim, qa + r * q_stride, dim * 2);
        qa = qbuf, qa_stride = dim * 2;
    }
    for (int r = 0; r < 16; r++) run_max[r] = -INFINITY, run_sum[r] = 0.0f;
    memset(acc, 0, 16 * dim * 4);
    const int64_t pos0 = q_offset + r0, last = pos0 + rows - 1;
    const int64_t hi = last + 1 < len ? last + 1 : len;
    int64_t k0 = window > 0 && pos0 - window + 1 > 0 ? pos0 - window + 1 : 0;
    for (k0 = k0 / kb * kb; k0 < hi; k0 += kb) {
        load_queries(qa, qa_stride, dim);
        if (dim == 64) scores_d64(kp, k0 / 16, s);
        else scores_d128(kp, k0 / 16, s);
        softmax_block(s, pbuf, kb, rows, k0, len, pos0, window, scale, run_max, run_sum, alpha);
        if (dim == 64) values_d64(pbuf, vp, k0 / 2, pv);
        else values_d128(pbuf, vp, k0 / 2, pv);
        rescale_add(acc, pv, alpha, dim);
    }
    for (int r = 0; r < rows; r++) {
        const __m512 inv = _mm512_set1_ps(run_sum[r] > 0.0f ? 1.0f / run_sum[r] : 0.0f);
        uint16_t *o = out + (r0 + r) * out_stride + h * dim;
        for (int64_t d = 0; d < dim; d += 16)
            bf16x16_store(o + d, _mm512_mul_ps(_mm512_loadu_ps(acc + r * dim + d), inv), 0xffff);
    }
}

/* q [q_len, heads, dim] with q_stride elements between tokens; k, v [len, kv_heads, dim] with
 * kv_stride; query row i sits at key position q_offset + i; window 0: none. out like q. */
int extend_attention_bf16(const uint16_t *q, int64_t q_stride, int64_t q_len, const uint16_t *k,
                          const uint16_t *v, int64_t kv_stride, int64_t len, int64_t heads,
                          int64_t kv_heads, int64_t dim, int64_t q_offset, int64_t window,
                          float scale, uint16_t *out, int64_t out_stride, int num_threads) {
    if ((dim != 64 && dim != 128) || heads % kv_heads != 0 || len <= 0 || q_len <= 0 ||
        !(scale > 0.0f))
        return 0;
    const int64_t kb = dim == 64 ? 64 : 32, padded = (len + kb - 1) / kb * kb;
    const int64_t head_words = padded * dim / 2, group = heads / kv_heads;
    uint32_t *kp = malloc(2 * kv_heads * head_words * 4);
    if (kp == NULL) return 0;
    uint32_t *vp = kp + kv_heads * head_words;
    const int64_t blocks = (q_len + 15) / 16;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t h = 0; h < 2 * kv_heads; h++) {
            const int64_t kvh = h % kv_heads;
            if (h < kv_heads) pack_keys(k + kvh * dim, kv_stride, len, padded, dim, kp + kvh * head_words);
            else pack_values(v + kvh * dim, kv_stride, len, padded, dim, vp + kvh * head_words);
        }
        configure_tiles();
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < heads * blocks; task++) {
            const int64_t h = task / blocks, b = blocks - 1 - task % blocks;  /* long rows first */
            const int rows = (int)(q_len - 16 * b < 16 ? q_len - 16 * b : 16);
            extend_task(q, q_stride, 16 * b, rows, h, kp + (h / group) * head_words,
                        vp + (h / group) * head_words, len, q_offset, window, dim, scale, out,
                        out_stride);
        }
        _tile_release();
    }
    free(kp);
    return 1;
}
#else
int extend_amx_init(void) { return 0; }
int extend_attention_bf16(const uint16_t *q, int64_t q_stride, int64_t q_len, const uint16_t *k,
                          const uint16_t *v, int64_t kv_stride, int64_t len, int64_t heads,
                          int64_t kv_heads, int64_t dim, int64_t q_offset, int64_t window,
                          float scale, uint16_t *out, int64_t out_stride, int num_threads) {
    (void)q, (void)q_stride, (void)q_len, (void)k, (void)v, (void)kv_stride, (void)len;
    (void)heads, (void)kv_heads, (void)dim, (void)q_offset, (void)window, (void)scale;
    (void)out, (void)out_stride, (void)num_threads;
    return 0;
}
#endif
