/*
 * ops_cpu.c -- CPU kernels: GEMM through OpenBLAS, the rest in C threaded
 * with OpenMP over independent rows.  Attention has its own file
 * (attention_cpu.c); the exp and GELU arithmetic both use is in simd_cpu.h.
 *
 * GELU comes twice: plain C and AVX2+FMA, chosen at run time from the CPU's
 * feature bits.  Both compute the same formulas; they differ only in
 * rounding, far below the golden tolerance.
 */
#include "ops.h"

#include <cblas.h>
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "simd_cpu.h"

/* y[0..n) = GELU(x[0..n)) on the calling thread; y may be x. */
static void gelu_span(const float *x, float *y, size_t n, int fast) {
#if LEGO_X86
    if (fast) {
        gelu8_span(x, y, n);
        return;
    }
#endif
    (void)fast;
    for (size_t i = 0; i < n; i++) y[i] = gelu_tanh(x[i]);
}

/* d[0..n) *= GELU'(x[0..n)) on the calling thread. */
static void gelu_grad_span(const float *x, float *d, size_t n, int fast) {
#if LEGO_X86
    if (fast) {
        gelu8_grad_span(x, d, n);
        return;
    }
#endif
    (void)fast;
    for (size_t i = 0; i < n; i++) d[i] *= gelu_tanh_grad(x[i]);
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
    int fast = simd_have_avx2_fma(), gelu = act == OP_ACT_GELU_TANH;
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
                if (gelu) gelu_span(y + r0 * out, y + r0 * out, (r1 - r0) * out, fast);
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

/* Floats per chunk of element-wise work. */
#define ELEMENT_CHUNK 4096

/* fn over n floats in chunks of ELEMENT_CHUNK, one chunk per worker at a
 * time. */
static void over_chunks(void (*fn)(const float *, float *, size_t, int), const float *x,
                        float *y, size_t n, int threads) {
    size_t nchunks = (n + ELEMENT_CHUNK - 1) / ELEMENT_CHUNK;
    int fast = simd_have_avx2_fma();
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t c = 0; c < nchunks; c++) {
        size_t begin = c * ELEMENT_CHUNK, len = n - begin < ELEMENT_CHUNK ? n - begin : ELEMENT_CHUNK;
        fn(x + begin, y + begin, len, fast);
    }
}

void op_gelu_tanh_to(const float *x, float *y, size_t n, int threads) {
    over_chunks(gelu_span, x, y, n, threads);
}

void op_gelu_tanh(float *x, size_t n, int threads) { over_chunks(gelu_span, x, x, n, threads); }

void op_gelu_tanh_grad(const float *x, float *d, size_t n, int threads) {
    over_chunks(gelu_grad_span, x, d, n, threads);
}

void op_silu(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = x[i] / (1.0f + expf(-x[i]));
}
