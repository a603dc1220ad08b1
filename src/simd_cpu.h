/*
 * simd_cpu.h -- the arithmetic the CPU kernels share: a float exp without a
 * libm call, the tanh-GELU and its derivative built on it, and the same on
 * 8 AVX2 lanes.  Internal; static inline, so each kernel file gets its own
 * copy and the compiler can inline it into the hot loops.
 *
 * The library is built for any x86-64, so the AVX2+FMA versions are
 * compiled with a target attribute and chosen at run time by
 * simd_have_avx2_fma().  Scalar and vector versions compute the same
 * formulas; they differ only in rounding (FMA), far below the golden
 * tolerance.  -DLEGO_NO_SIMD builds only the scalar kernels (to test them
 * on x86).
 */
#ifndef LEGO_SIMD_CPU_H
#define LEGO_SIMD_CPU_H

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(LEGO_NO_SIMD)
#define LEGO_X86 1
#include <immintrin.h>
#else
#define LEGO_X86 0
#endif

#define GELU_C0 0.7978845608f /* sqrt(2/pi) */
#define GELU_C1 0.044715f
/* Below this GELU's value (and slope) is under 1e-36 in magnitude, but
 * exp(-2u) would saturate and leave x / 1.7e38 (-0.006 at x = -1e36), so
 * inputs are clamped here first; NaN passes through. */
#define GELU_LOW (-10.0f)
/* Above this GELU's slope is 1 in float (tanh(u) rounds to 1); the
 * derivative clamps there so that 1 + 3 C1 x^2 cannot overflow. */
#define GELU_HIGH 10.0f

/* Whether the AVX2+FMA kernels may run here.  libgcc fills the feature bits
 * before any constructor of ours can run, so this is a cheap read. */
static inline int simd_have_avx2_fma(void) {
#if LEGO_X86
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* exp(x) for float: x = n*ln2 + r with |r| <= ln2/2, exp(r) by a degree-6
 * Taylor/Horner polynomial (relative error below 2e-7), 2^n assembled in
 * the exponent bits.  Inputs are clamped to the range where the result is a
 * normal float. */
static inline float fast_expf(float x) {
    /* NaN (from NaN weights or inputs) would reach the float-to-int
     * conversion below, which is undefined for it: pass it through. */
    if (x != x) return x;
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = (float)(int)(x * 1.44269504f + (x >= 0 ? 0.5f : -0.5f));
    float r = x - n * 0.693145752f - n * 1.42860677e-6f; /* ln2 split in two */
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 +
                                     r * (1.0f / 120 + r * (1.0f / 720))))));
    union { float f; int i; } scale;
    scale.i = ((int)n + 127) << 23;
    return p * scale.f;
}

/* tanh-GELU written as 0.5 x (1 + tanh(u)) = x * sigmoid(2u) = x / (1 + exp(-2u)),
 * u = C0 (x + C1 x^3). */
static inline float gelu_tanh(float x) {
    x = x < GELU_LOW ? GELU_LOW : x;
    float u = GELU_C0 * (x + GELU_C1 * x * x * x);
    return x / (1.0f + fast_expf(-2.0f * u));
}

/* Its derivative: with s = sigmoid(2u) = 1 / (1 + e), e = exp(-2u),
 * 0.5 (1 + tanh u) = s and 1 - tanh(u)^2 = 4 s (1 - s) = 4 s^2 e, so
 * GELU'(x) = s + 2 x s^2 e C0 (1 + 3 C1 x^2).  (1 - s as e s keeps the
 * slope exact where s is close to 1.) */
static inline float gelu_tanh_grad(float x) {
    x = x < GELU_LOW ? GELU_LOW : (x > GELU_HIGH ? GELU_HIGH : x);
    float x2 = x * x, u = GELU_C0 * (x + GELU_C1 * x2 * x);
    float e = fast_expf(-2.0f * u), s = 1.0f / (1.0f + e);
    return s + 2.0f * x * s * (e * s) * GELU_C0 * (1.0f + 3.0f * GELU_C1 * x2);
}

#if LEGO_X86
/* fast_expf on 8 lanes (round-to-nearest-even for n; same polynomial). */
__attribute__((target("avx2,fma"))) static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    e = _mm256_slli_epi32(e, 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* exp(-2u) of 8 GELU inputs, already clamped. */
__attribute__((target("avx2,fma"))) static inline __m256 gelu_exp8(__m256 v) {
    __m256 c1v = _mm256_mul_ps(_mm256_set1_ps(GELU_C1), v);
    __m256 u = _mm256_mul_ps(_mm256_set1_ps(GELU_C0), _mm256_fmadd_ps(c1v, _mm256_mul_ps(v, v), v));
    return exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), u));
}

/* y[0..n) = GELU(x[0..n)); y may be x. */
__attribute__((target("avx2,fma"))) static inline void gelu8_span(const float *x, float *y,
                                                                  size_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        /* max(low, x) keeps a NaN x, as the scalar clamp does. */
        __m256 v = _mm256_max_ps(_mm256_set1_ps(GELU_LOW), _mm256_loadu_ps(x + i));
        __m256 e = gelu_exp8(v);
        _mm256_storeu_ps(y + i, _mm256_div_ps(v, _mm256_add_ps(one, e)));
    }
    for (; i < n; i++) y[i] = gelu_tanh(x[i]);
}

/* d[0..n) *= GELU'(x[0..n)). */
__attribute__((target("avx2,fma"))) static inline void gelu8_grad_span(const float *x, float *d,
                                                                       size_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), two_c0 = _mm256_set1_ps(2.0f * GELU_C0);
    const __m256 c3 = _mm256_set1_ps(3.0f * GELU_C1);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_max_ps(_mm256_set1_ps(GELU_LOW), _mm256_loadu_ps(x + i));
        v = _mm256_min_ps(_mm256_set1_ps(GELU_HIGH), v); /* NaN kept, as above */
        __m256 e = gelu_exp8(v);
        __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, e));
        __m256 poly = _mm256_fmadd_ps(c3, _mm256_mul_ps(v, v), one); /* 1 + 3 C1 x^2 */
        __m256 t = _mm256_mul_ps(_mm256_mul_ps(two_c0, v), _mm256_mul_ps(s, _mm256_mul_ps(e, s)));
        __m256 g = _mm256_fmadd_ps(t, poly, s);
        _mm256_storeu_ps(d + i, _mm256_mul_ps(_mm256_loadu_ps(d + i), g));
    }
    for (; i < n; i++) d[i] *= gelu_tanh_grad(x[i]);
}
#endif

#endif
