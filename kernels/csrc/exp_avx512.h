/* exp on 16 float32 lanes, shared by the AVX-512 kernels in this folder (decode_grouped.h,
 * elementwise_avx512.h, extend_amx.c). */
#ifndef PAGEWIRE_EXP_AVX512_H
#define PAGEWIRE_EXP_AVX512_H
#include <immintrin.h>

/* exp(x): 2^n p(r), n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts) in
 * [-ln 2 / 2, ln 2 / 2], p the degree-6 Taylor polynomial (1.2e-7 relative). x is clamped to
 * [-87.3, 89]: below, the result stays at the smallest normal (beside 1 it is 0 anyway);
 * above, 2^n overflows to inf as exp does. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(89.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693145751953125f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.42860682030941723e-6f), r);
    __m512 p = _mm512_set1_ps(1.f / 720.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}
#endif
