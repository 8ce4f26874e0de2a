/* bfloat16 K and V of one KV head packed for products over pairs (AMX tiles, AVX-512 BF16 dot
 * products: each 32-bit word holds two bfloat16s that are multiplied with another word's two
 * and summed), shared by extend_amx.c and extend_avx512bf16.c. */
#ifndef PAGEWIRE_EXTEND_PACK_BF16_H
#define PAGEWIRE_EXTEND_PACK_BF16_H
#include <stdint.h>
#include <string.h>

/* K of one KV head as the score product's B operand: per 16 keys, D/2 rows of (16 keys x a dim
 * pair). kp has room for `padded` keys; keys past `len` are 0. */
static void pack_keys(const uint16_t *k, int64_t stride, int64_t len, int64_t padded, int64_t dim,
                      uint32_t *kp) {
    const int64_t pairs = dim / 2;
    memset(kp + (len / 16) * 16 * pairs, 0, (padded - (len / 16) * 16) * pairs * 4);
    for (int64_t t = 0; t < len; t++) {
        const uint32_t *src = (const uint32_t *)(k + t * stride);
        uint32_t *dst = kp + (t / 16) * 16 * pairs + t % 16;
        for (int64_t p = 0; p < pairs; p++) dst[p * 16] = src[p];
    }
}

/* V of one KV head as the output product's B operand: rows of key pairs, (v[2i][d], v[2i+1][d])
 * for every d. vp has room for `padded` keys; keys past `len` are 0. */
static void pack_values(const uint16_t *v, int64_t stride, int64_t len, int64_t padded,
                        int64_t dim, uint32_t *vp) {
    for (int64_t i = 0; i < padded / 2; i++) {
        const int64_t t0 = 2 * i, t1 = 2 * i + 1;
        uint32_t *dst = vp + i * dim;
        for (int64_t d = 0; d < dim; d++) {
            const uint32_t lo = t0 < len ? v[t0 * stride + d] : 0;
            const uint32_t hi = t1 < len ? v[t1 * stride + d] : 0;
            dst[d] = lo | hi << 16;
        }
    }
}
#endif
