/*
 * ops_cpu.c -- CPU kernels: GEMM through OpenBLAS, the rest in plain C
 * written so the compiler vectorises the inner loops, threaded with OpenMP
 * over independent rows or sequences.
 */
#include "ops.h"

#include <cblas.h>
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* exp(x) for float, vectorisable (no libm call): x = n*ln2 + r with
 * |r| <= ln2/2, exp(r) by a degree-6 Taylor/Horner polynomial (relative
 * error below 2e-7), 2^n assembled in the exponent bits.  Inputs are
 * clamped to the range where the result is a normal float. */
static inline float fast_expf(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = (float)(int)(x * 1.44269504f + (x >= 0 ? 0.5f : -0.5f));
    float r = x - n * 0.693145752f - n * 1.42860677e-6f; /* ln2 split in two */
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 +
                                     r * (1.0f / 120 + r * (1.0f / 720))))));
    union { float f; int i; } scale;
    scale.i = ((int)n + 127) << 23;
    return p * scale.f;
}

void op_linear(const linear *l, const float *x, size_t rows, float *y) {
    /* Pre-fill with the bias and accumulate (beta = 1): saves a pass. */
    for (size_t r = 0; r < rows; r++) memcpy(y + r * (size_t)l->out, l->b, (size_t)l->out * sizeof *y);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, l->out, l->in, 1.0f, x,
                l->in, l->w, l->in, 1.0f, y, l->out);
}

void op_layernorm_modulate(const float *x, size_t rows, int dim, size_t rows_per_image,
                           const float *shift, const float *scale, size_t mod_stride,
                           float *y, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * (size_t)dim;
        float *yr = y + r * (size_t)dim;
        size_t img = r / rows_per_image;
        const float *sh = shift + img * mod_stride, *sc = scale + img * mod_stride;
        float sum = 0;
        for (int i = 0; i < dim; i++) sum += xr[i];
        float mean = sum / (float)dim, var = 0;
        for (int i = 0; i < dim; i++) {
            float d = xr[i] - mean;
            var += d * d;
        }
        float rstd = 1.0f / sqrtf(var / (float)dim + 1e-6f);
        for (int i = 0; i < dim; i++)
            yr[i] = (xr[i] - mean) * rstd * (1.0f + sc[i]) + sh[i];
    }
}

void op_gated_residual(float *x, const float *y, size_t rows, int dim, size_t rows_per_image,
                       const float *gate, size_t mod_stride, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t r = 0; r < rows; r++) {
        const float *g = gate + (r / rows_per_image) * mod_stride;
        float *xr = x + r * (size_t)dim;
        const float *yr = y + r * (size_t)dim;
        for (int i = 0; i < dim; i++) xr[i] += g[i] * yr[i];
    }
}

void op_gelu_tanh(float *x, size_t n, int threads) {
    /* 0.5 x (1 + tanh(u)) = x * sigmoid(2u) = x / (1 + exp(-2u)). */
    const size_t chunk = 4096;
    size_t nchunks = (n + chunk - 1) / chunk;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (size_t c = 0; c < nchunks; c++) {
        size_t end = (c + 1) * chunk < n ? (c + 1) * chunk : n;
        for (size_t i = c * chunk; i < end; i++) {
            float v = x[i];
            float u = 0.7978845608f * (v + 0.044715f * v * v * v);
            x[i] = v / (1.0f + fast_expf(-2.0f * u));
        }
    }
}

void op_silu(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = x[i] / (1.0f + expf(-x[i]));
}

size_t op_attention_scratch(int tokens, int head_dim) {
    /* K transposed, V, one row of scores. */
    return 2 * (size_t)tokens * head_dim + (size_t)tokens;
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

void op_attention(const float *qkv, size_t seqs, int tokens, int heads, int head_dim,
                  float *out, float *scratch, int threads) {
    int dim = heads * head_dim;
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
            attend_one(qkv + seq * tokens * 3 * (size_t)dim, tokens, dim, head, head_dim,
                       out + seq * tokens * (size_t)dim, mine);
        }
    }
}
