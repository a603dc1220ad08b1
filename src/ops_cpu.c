/*
 * ops_cpu.c -- CPU kernels: GEMM through OpenBLAS, the rest in C threaded
 * with OpenMP over independent rows or sequences.
 *
 * The library is built for any x86-64, so the hot kernels (attention, GELU)
 * come twice: a plain C version and an AVX2+FMA version chosen at run time
 * from the CPU's feature bits.  Both compute the same formulas; they differ
 * only in rounding (FMA, summation order), far below the golden tolerance.
 */
#include "ops.h"

#include <cblas.h>
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* -DLEGO_NO_SIMD builds only the plain C kernels (to test them on x86). */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(LEGO_NO_SIMD)
#define LEGO_X86 1
#include <immintrin.h>
#else
#define LEGO_X86 0
#endif

/* Whether the AVX2+FMA kernels may run here.  libgcc fills the feature bits
 * before any constructor of ours can run, so this is a cheap read. */
static int have_avx2_fma(void) {
#if LEGO_X86
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* exp(x) for float without a libm call: x = n*ln2 + r with |r| <= ln2/2,
 * exp(r) by a degree-6 Taylor/Horner polynomial (relative error below 2e-7),
 * 2^n assembled in the exponent bits.  Inputs are clamped to the range where
 * the result is a normal float. */
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

/* tanh-GELU written as 0.5 x (1 + tanh(u)) = x * sigmoid(2u) = x / (1 + exp(-2u)).
 * Below -10 the result is below 1e-36 in magnitude, but exp(-2u) would
 * saturate and leave x / 1.7e38 (-0.006 at x = -1e36), so x is clamped
 * there first; NaN passes through. */
#define GELU_LOW (-10.0f)
static inline float gelu_tanh(float v) {
    v = v < GELU_LOW ? GELU_LOW : v;
    float u = 0.7978845608f * (v + 0.044715f * v * v * v);
    return v / (1.0f + fast_expf(-2.0f * u));
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

__attribute__((target("avx2,fma"))) static void gelu_avx2(float *x, size_t n) {
    const __m256 c0 = _mm256_set1_ps(0.7978845608f), c1 = _mm256_set1_ps(0.044715f);
    const __m256 one = _mm256_set1_ps(1.0f), m2 = _mm256_set1_ps(-2.0f);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        /* max(low, v) keeps a NaN v, as the scalar clamp does. */
        __m256 v = _mm256_max_ps(_mm256_set1_ps(GELU_LOW), _mm256_loadu_ps(x + i));
        __m256 u = _mm256_mul_ps(c0, _mm256_fmadd_ps(_mm256_mul_ps(c1, v), _mm256_mul_ps(v, v), v));
        __m256 e = exp8(_mm256_mul_ps(m2, u));
        _mm256_storeu_ps(x + i, _mm256_div_ps(v, _mm256_add_ps(one, e)));
    }
    for (; i < n; i++) x[i] = gelu_tanh(x[i]);
}
#endif

/* GELU over n floats on the calling thread. */
static void gelu_span(float *x, size_t n, int fast) {
#if LEGO_X86
    if (fast) {
        gelu_avx2(x, n);
        return;
    }
#endif
    (void)fast;
    for (size_t i = 0; i < n; i++) x[i] = gelu_tanh(x[i]);
}

static void fill_bias(const linear *l, size_t rows, float *y) {
    size_t out = (size_t)l->out;
    for (size_t r = 0; r < rows; r++) memcpy(y + r * out, l->b, out * sizeof *y);
}

/* y += x * W^T */
static void sgemm_acc(const linear *l, const float *x, size_t rows, float *y) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, l->out, l->in, 1.0f, x,
                l->in, l->w, l->in, 1.0f, y, l->out);
}

void op_linear(const linear *l, const float *x, size_t rows, float *y) {
    /* Pre-fill with the bias and accumulate (beta = 1): saves a pass. */
    fill_bias(l, rows, y);
    sgemm_acc(l, x, rows, y);
}

/* OpenBLAS's pthreads build with more than one thread hands every call to
 * its own workers: calls from two of our threads queue for them and the
 * cores are oversubscribed, so that case gets one whole GEMM at a time.
 * Any other BLAS is assumed to thread its calls itself. */
int op_blas_on_caller(void) {
#ifdef OPENBLAS_VERSION
    /* 0 sequential build, 1 pthreads, 2 OpenMP (serial inside our region). */
    return openblas_get_parallel() != 1 || openblas_get_num_threads() == 1;
#else
    return 0;
#endif
}

int op_workers(int threads) {
    if (op_blas_on_caller()) return threads;
#ifdef OPENBLAS_VERSION
    int free_cores = threads - (openblas_get_num_threads() - 1);
    return free_cores > 1 ? free_cores : 1;
#else
    return threads;
#endif
}

/* Rows per worker below which splitting a GEMM costs more than it gains. */
#define MIN_SPLIT_ROWS 32

void op_linear_act(const linear *l, const float *x, size_t rows, float *y, op_act act,
                   int threads) {
    int fast = have_avx2_fma(), gelu = act == OP_ACT_GELU_TANH;
    size_t in = (size_t)l->in, out = (size_t)l->out;
    if (threads > 1 && rows >= 2 * MIN_SPLIT_ROWS && op_blas_on_caller()) {
        /* Each worker runs its rows start to finish: bias, GEMM, activation
         * while the block is still in its cache. */
        #pragma omp parallel num_threads(threads)
        {
            size_t r0 = 0, r1 = rows;
#ifdef _OPENMP
            size_t me = (size_t)omp_get_thread_num(), nt = (size_t)omp_get_num_threads();
            r0 = rows * me / nt;
            r1 = rows * (me + 1) / nt;
#endif
            if (r1 > r0) {
                fill_bias(l, r1 - r0, y + r0 * out);
                sgemm_acc(l, x + r0 * in, r1 - r0, y + r0 * out);
                if (gelu) gelu_span(y + r0 * out, (r1 - r0) * out, fast);
            }
        }
        return;
    }
    /* One GEMM, threaded by the BLAS; our workers fill and finish around it. */
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t r = 0; r < rows; r++) fill_bias(l, 1, y + r * out);
    sgemm_acc(l, x, rows, y);
    if (gelu) op_gelu_tanh(y, rows * out, threads);
}

/* One row of LayerNorm + modulation, two-pass variance as the reference. */
static inline void layernorm_row(const float *x, int dim, const float *shift, const float *scale,
                                 float *y) {
    float sum = 0;
    #pragma omp simd reduction(+ : sum)
    for (int i = 0; i < dim; i++) sum += x[i];
    float mean = sum / (float)dim, var = 0;
    #pragma omp simd reduction(+ : var)
    for (int i = 0; i < dim; i++) var += (x[i] - mean) * (x[i] - mean);
    float rstd = 1.0f / sqrtf(var / (float)dim + 1e-6f);
    #pragma omp simd
    for (int i = 0; i < dim; i++) y[i] = (x[i] - mean) * rstd * (1.0f + scale[i]) + shift[i];
}

void op_layernorm_modulate(const float *x, size_t rows, int dim, size_t rows_per_image,
                           const float *shift, const float *scale, size_t mod_stride,
                           float *y, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t r = 0; r < rows; r++) {
        size_t img = r / rows_per_image;
        layernorm_row(x + r * (size_t)dim, dim, shift + img * mod_stride,
                      scale + img * mod_stride, y + r * (size_t)dim);
    }
}

void op_gated_residual(float *x, const float *y, size_t rows, int dim, size_t rows_per_image,
                       const float *gate, size_t mod_stride, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t r = 0; r < rows; r++) {
        const float *g = gate + (r / rows_per_image) * mod_stride;
        float *xr = x + r * (size_t)dim;
        const float *yr = y + r * (size_t)dim;
        #pragma omp simd
        for (int i = 0; i < dim; i++) xr[i] += g[i] * yr[i];
    }
}

void op_gated_residual_layernorm(float *x, const float *y, size_t rows, int dim,
                                 size_t rows_per_image, const float *gate, size_t gate_stride,
                                 const float *shift, const float *scale, size_t mod_stride,
                                 float *out, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t r = 0; r < rows; r++) {
        size_t img = r / rows_per_image;
        const float *g = gate + img * gate_stride;
        float *xr = x + r * (size_t)dim;
        const float *yr = y + r * (size_t)dim;
        #pragma omp simd
        for (int i = 0; i < dim; i++) xr[i] += g[i] * yr[i];
        layernorm_row(xr, dim, shift + img * mod_stride, scale + img * mod_stride,
                      out + r * (size_t)dim);
    }
}

void op_gelu_tanh(float *x, size_t n, int threads) {
    const size_t chunk = 4096;
    size_t nchunks = (n + chunk - 1) / chunk;
    int fast = have_avx2_fma();
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t c = 0; c < nchunks; c++) {
        size_t begin = c * chunk, len = begin + chunk < n ? chunk : n - begin;
        gelu_span(x + begin, len, fast);
    }
}

void op_silu(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = x[i] / (1.0f + expf(-x[i]));
}

/* ---- attention ---------------------------------------------------------- */

/* The AVX2 kernel works on tiles of ATT_ROWS queries and 16 columns; the
 * packed K^T and V are padded to a multiple of 16 columns. */
#define ATT_ROWS 6
#define ROUND16(x) (((size_t)(x) + 15) & ~(size_t)15)

size_t op_attention_scratch(int tokens, int head_dim) {
    /* Plain C: K transposed, V, one row of scores.
     * AVX2: K^T [head_dim][T16], V [tokens][hd16], scores [ROWS][T16],
     * output tile [ROWS][hd16]. */
    size_t plain = 2 * (size_t)tokens * head_dim + (size_t)tokens;
    size_t t16 = ROUND16(tokens), d16 = ROUND16(head_dim);
    size_t avx = (size_t)head_dim * t16 + (size_t)tokens * d16 + ATT_ROWS * (t16 + d16);
    return plain > avx ? plain : avx;
}

/* One head of one sequence: out_t = sum_j softmax_j(q_t . k_j / sqrt(d)) v_j. */
static void attend_one(const float *qkv, int tokens, int dim, int head, int head_dim,
                       float *out, float *scratch) {
    size_t stride = 3 * (size_t)dim;
    float *kt = scratch, *v = kt + (size_t)tokens * head_dim, *s = v + (size_t)tokens * head_dim;
    const float scale = 1.0f / sqrtf((float)head_dim);
    for (int j = 0; j < tokens; j++) {
        const float *kj = qkv + j * stride + dim + (size_t)head * head_dim;
        const float *vj = kj + dim;
        for (int d = 0; d < head_dim; d++) kt[(size_t)d * tokens + j] = kj[d];
        memcpy(v + (size_t)j * head_dim, vj, (size_t)head_dim * sizeof *v);
    }
    for (int t = 0; t < tokens; t++) {
        const float *q = qkv + t * stride + (size_t)head * head_dim;
        for (int j = 0; j < tokens; j++) s[j] = 0;
        for (int d = 0; d < head_dim; d++) {
            const float qd = q[d] * scale, *kd = kt + (size_t)d * tokens;
            for (int j = 0; j < tokens; j++) s[j] += qd * kd[j];
        }
        float mx = s[0];
        for (int j = 1; j < tokens; j++) mx = s[j] > mx ? s[j] : mx;
        float sum = 0;
        for (int j = 0; j < tokens; j++) {
            s[j] = fast_expf(s[j] - mx);
            sum += s[j];
        }
        float *o = out + (size_t)t * dim + (size_t)head * head_dim;
        float inv = 1.0f / sum;
        for (int d = 0; d < head_dim; d++) o[d] = 0;
        for (int j = 0; j < tokens; j++) {
            const float p = s[j] * inv, *vj = v + (size_t)j * head_dim;
            for (int d = 0; d < head_dim; d++) o[d] += p * vj[d];
        }
    }
}

#if LEGO_X86
/* c[r][0..15] = sum_k a[r][k] * b[k][0..15] for ATT_ROWS rows: the register
 * tile (12 accumulators) of both attention products.  Rows of a are unit
 * stride in k; rows of b are ldb apart. */
__attribute__((target("avx2,fma"))) static inline void
tile_avx2(const float *const a[ATT_ROWS], int k_len, const float *b, size_t ldb, float *c,
          size_t ldc) {
    __m256 acc[ATT_ROWS][2];
    for (int r = 0; r < ATT_ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int k = 0; k < k_len; k++) {
        const float *bk = b + (size_t)k * ldb;
        __m256 b0 = _mm256_loadu_ps(bk), b1 = _mm256_loadu_ps(bk + 8);
        for (int r = 0; r < ATT_ROWS; r++) {
            __m256 ar = _mm256_broadcast_ss(a[r] + k);
            acc[r][0] = _mm256_fmadd_ps(ar, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(ar, b1, acc[r][1]);
        }
    }
    for (int r = 0; r < ATT_ROWS; r++) {
        _mm256_storeu_ps(c + r * ldc, acc[r][0]);
        _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
    }
}

/* s[0..n) = exp(s - max s) in place; returns 1 / sum (normalising is left
 * to the output, which is narrower than a row of scores). */
__attribute__((target("avx2,fma"))) static float softmax_row_avx2(float *s, int n) {
    __m256 mx8 = _mm256_set1_ps(-INFINITY);
    int j = 0;
    for (; j + 8 <= n; j += 8) mx8 = _mm256_max_ps(mx8, _mm256_loadu_ps(s + j));
    float lanes[8], mx = -INFINITY, sum = 0;
    _mm256_storeu_ps(lanes, mx8);
    for (int i = 0; i < 8; i++) mx = lanes[i] > mx ? lanes[i] : mx;
    for (int i = j; i < n; i++) mx = s[i] > mx ? s[i] : mx;

    __m256 sum8 = _mm256_setzero_ps(), m8 = _mm256_set1_ps(mx);
    for (j = 0; j + 8 <= n; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), m8));
        _mm256_storeu_ps(s + j, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    _mm256_storeu_ps(lanes, sum8);
    for (int i = 0; i < 8; i++) sum += lanes[i];
    for (; j < n; j++) {
        s[j] = fast_expf(s[j] - mx);
        sum += s[j];
    }
    return 1.0f / sum;
}

/* attend_one with register-tiled products: S = Q K^T for ATT_ROWS queries
 * at a time, softmax in place, O = P V, normalised on the way out.  The
 * scale 1/sqrt(d) is folded into the packed K. */
__attribute__((target("avx2,fma"))) static void
attend_one_avx2(const float *qkv, int tokens, int dim, int head, int head_dim, float *out,
                float *scratch) {
    size_t stride = 3 * (size_t)dim, t16 = ROUND16(tokens), d16 = ROUND16(head_dim);
    float *kt = scratch, *v = kt + (size_t)head_dim * t16;
    float *s = v + (size_t)tokens * d16, *o = s + ATT_ROWS * t16;
    const float scale = 1.0f / sqrtf((float)head_dim);

    /* Padding columns stay zero, so whole 16-wide tiles are safe to compute. */
    for (int d = 0; d < head_dim; d++)
        for (size_t j = (size_t)tokens; j < t16; j++) kt[(size_t)d * t16 + j] = 0;
    for (int j = 0; j < tokens; j++) {
        const float *kj = qkv + j * stride + dim + (size_t)head * head_dim, *vj = kj + dim;
        float *vr = v + (size_t)j * d16;
        for (int d = 0; d < head_dim; d++) kt[(size_t)d * t16 + j] = kj[d] * scale;
        memcpy(vr, vj, (size_t)head_dim * sizeof *v);
        for (size_t d = (size_t)head_dim; d < d16; d++) vr[d] = 0;
    }

    for (int t0 = 0; t0 < tokens; t0 += ATT_ROWS) {
        int rows = tokens - t0 < ATT_ROWS ? tokens - t0 : ATT_ROWS;
        /* Tail tiles repeat the last row; its duplicates are not stored. */
        const float *q[ATT_ROWS], *p[ATT_ROWS];
        for (int r = 0; r < ATT_ROWS; r++) {
            int t = t0 + (r < rows ? r : rows - 1);
            q[r] = qkv + (size_t)t * stride + (size_t)head * head_dim;
            p[r] = s + (size_t)(r < rows ? r : rows - 1) * t16;
        }
        for (size_t j0 = 0; j0 < t16; j0 += 16) tile_avx2(q, head_dim, kt + j0, t16, s + j0, t16);

        float inv[ATT_ROWS];
        for (int r = 0; r < rows; r++) inv[r] = softmax_row_avx2(s + (size_t)r * t16, tokens);

        for (size_t d0 = 0; d0 < d16; d0 += 16) tile_avx2(p, tokens, v + d0, d16, o + d0, d16);
        for (int r = 0; r < rows; r++) {
            float *dst = out + (size_t)(t0 + r) * dim + (size_t)head * head_dim;
            const float *src = o + (size_t)r * d16;
            for (int d = 0; d < head_dim; d++) dst[d] = src[d] * inv[r];
        }
    }
}
#endif

void op_attention(const float *qkv, size_t seqs, int tokens, int heads, int head_dim,
                  float *out, float *scratch, int threads) {
    int dim = heads * head_dim, fast = have_avx2_fma();
    size_t per_worker = op_attention_scratch(tokens, head_dim);
    size_t jobs = seqs * (size_t)heads;
    #pragma omp parallel num_threads(threads)
    {
        int me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        float *mine = scratch + (size_t)me * per_worker;
        #pragma omp for schedule(static)
        for (size_t job = 0; job < jobs; job++) {
            size_t seq = job / (size_t)heads;
            int head = (int)(job % (size_t)heads);
            const float *in = qkv + seq * tokens * 3 * (size_t)dim;
            float *o = out + seq * tokens * (size_t)dim;
#if LEGO_X86
            if (fast) {
                attend_one_avx2(in, tokens, dim, head, head_dim, o, mine);
                continue;
            }
#endif
            attend_one(in, tokens, dim, head, head_dim, o, mine);
        }
    }
    (void)fast;
}
