/*
 * kernels.cu -- the element-wise and row-wise kernels of a brick on the
 * GPU: conditioning, token gather and scatter, LayerNorm with adaLN
 * modulation (fused with the gated residual before it), activations,
 * guidance and EDM scaling.
 *
 * Each kernel computes the formula of its CPU twin (src/ops_cpu.c,
 * src/brick.c, src/denoise.c) in the same order; they differ only where
 * the GPU rounds differently (fused multiply-add, reduction order), far
 * below the golden tolerance.  Where the CPU result is exact and cheap to
 * reproduce bit for bit (the coordinate channels), the kernels use the
 * explicitly rounded intrinsics so that nvcc cannot contract them.
 */
#include <string.h>

#include "cuda_internal.h"

/* ---- conditioning ---------------------------------------------------------- */

__global__ void timestep_embedding_kernel(const float *c_noise, const float *freq, int nb,
                                          int half, float *emb) {
    size_t total = (size_t)nb * half;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        size_t i = idx / half;
        int j = (int)(idx % half);
        float arg = __fmul_rn(c_noise[i], freq[j]);
        emb[i * 2 * half + j] = (float)cos((double)arg);
        emb[i * 2 * half + half + j] = (float)sin((double)arg);
    }
}

lego_status k_timestep_embedding(cudaStream_t s, const float *c_noise, const float *freq, int nb,
                                 int fdim, float *emb, lego_err *err) {
    size_t total = (size_t)nb * (fdim / 2);
    LAUNCH(timestep_embedding_kernel, ew_blocks(total), EW_THREADS, 0, s)(c_noise, freq, nb,
                                                                       fdim / 2, emb);
    LAUNCH_CHECK("timestep_embedding");
    return LEGO_OK;
}

__global__ void silu_kernel(const float *x, size_t n, float *y) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = x[i];
        y[i] = v / (1.0f + expf(-v));
    }
}

lego_status k_silu(cudaStream_t s, const float *x, size_t n, float *y, lego_err *err) {
    LAUNCH(silu_kernel, ew_blocks(n), EW_THREADS, 0, s)(x, n, y);
    LAUNCH_CHECK("silu");
    return LEGO_OK;
}

/* tanh-GELU as ops_cpu.c writes it: x * sigmoid(2u), u = sqrt(2/pi) (x +
 * 0.044715 x^3), with the input clamped at -10 (where the result is below
 * 1e-36) so that exp cannot overflow; NaN passes through. */
__device__ __forceinline__ float gelu_tanh(float v) {
    v = v < -10.0f ? -10.0f : v;
    float u = 0.7978845608f * (v + 0.044715f * v * v * v);
    return v / (1.0f + expf(-2.0f * u));
}

template <class T> __global__ void gelu_kernel(T *x, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] = from_float<T>(gelu_tanh(to_float<T>(x[i])));
}

lego_status k_gelu(cudaStream_t s, void *x, cudaDataType type, size_t n, lego_err *err) {
    if (type == CUDA_R_32F) LAUNCH(gelu_kernel<float>, ew_blocks(n), EW_THREADS, 0, s)((float *)x, n);
    else if (type == CUDA_R_16BF) LAUNCH(gelu_kernel<bf16>, ew_blocks(n), EW_THREADS, 0, s)((bf16 *)x, n);
    else LAUNCH(gelu_kernel<f16>, ew_blocks(n), EW_THREADS, 0, s)((f16 *)x, n);
    LAUNCH_CHECK("gelu");
    return LEGO_OK;
}

__global__ void add_kernel(float *x, const float *y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] += y[i];
}

lego_status k_add(cudaStream_t s, float *x, const float *y, size_t n, lego_err *err) {
    LAUNCH(add_kernel, ew_blocks(n), EW_THREADS, 0, s)(x, y, n);
    LAUNCH_CHECK("add");
    return LEGO_OK;
}

template <class T> __global__ void add_bias_kernel(T *x, const T *bias, size_t rows, int dim) {
    size_t n = rows * (size_t)dim;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] = from_float<T>(to_float<T>(x[i]) + to_float<T>(bias[i % (size_t)dim]));
}

lego_status k_add_bias(cudaStream_t s, void *x, const void *bias, cudaDataType type, size_t rows,
                       int dim, lego_err *err) {
    unsigned blocks = ew_blocks(rows * (size_t)dim);
    if (type == CUDA_R_32F)
        LAUNCH(add_bias_kernel<float>, blocks, EW_THREADS, 0, s)((float *)x, (const float *)bias,
                                                                 rows, dim);
    else if (type == CUDA_R_16BF)
        LAUNCH(add_bias_kernel<bf16>, blocks, EW_THREADS, 0, s)((bf16 *)x, (const bf16 *)bias,
                                                                rows, dim);
    else
        LAUNCH(add_bias_kernel<f16>, blocks, EW_THREADS, 0, s)((f16 *)x, (const f16 *)bias, rows,
                                                               dim);
    LAUNCH_CHECK("add_bias");
    return LEGO_OK;
}

template <class T> __global__ void convert_kernel(const float *src, size_t n, T *dst) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = from_float<T>(src[i]);
}

lego_status k_convert(cudaStream_t s, const float *src, size_t n, void *dst, cudaDataType type,
                      lego_err *err) {
    if (type == CUDA_R_16BF)
        LAUNCH(convert_kernel<bf16>, ew_blocks(n), EW_THREADS, 0, s)(src, n, (bf16 *)dst);
    else if (type == CUDA_R_16F)
        LAUNCH(convert_kernel<f16>, ew_blocks(n), EW_THREADS, 0, s)(src, n, (f16 *)dst);
    else
        return lego_fail(err, LEGO_ERR_BACKEND, "internal: conversion to type %d", (int)type);
    LAUNCH_CHECK("convert");
    return LEGO_OK;
}

/* ---- images ------------------------------------------------------------------ */

__global__ void scale_inputs_kernel(const float *x, const float *coef, int n, size_t chw,
                                    size_t total, float *xin) {
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        size_t img = (idx / chw) % (size_t)n, j = idx % chw;
        xin[idx] = coef[3 * img] * x[img * chw + j];
    }
}

lego_status k_scale_inputs(cudaStream_t s, const float *x, const float *coef, int n, int nb,
                           size_t chw, float *xin, lego_err *err) {
    size_t total = (size_t)nb * chw;
    LAUNCH(scale_inputs_kernel, ew_blocks(total), EW_THREADS, 0, s)(x, coef, n, chw, total, xin);
    LAUNCH_CHECK("scale_inputs");
    return LEGO_OK;
}

/* One thread per value of the [rows][c_in*p*p] token matrix, columns in the
 * (channel, y, x) order of the patch-embedding weight [D, c_in, p, p];
 * channels [F_below], c_in*x, row coordinate, column coordinate.  `table`:
 * see token_origin (NULL at inference). */
template <class T>
__global__ void gather_kernel(tok_geom g, const int32_t *table, const float *xin,
                              const float *below, T *dst) {
    int pp = g.p * g.p, width = g.c_in * pp, C = g.C;
    size_t total = g.rows * (size_t)width, plane = (size_t)g.h * g.w;
    int first_x = below ? C : 0, first_coord = below ? 2 * C : C;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        size_t img;
        int ci, y, x;
        patch_pixel_chw(g, table, idx / (size_t)width, (int)(idx % (size_t)width), &img, &ci, &y,
                        &x);
        size_t pix = (size_t)y * g.w + (size_t)x;
        float v;
        if (ci < first_x) v = below[(img * C + (size_t)ci) * plane + pix];
        else if (ci < first_coord) v = xin[(img * C + (size_t)(ci - first_x)) * plane + pix];
        else if (ci == first_coord) v = __fadd_rn(__fmul_rn((float)y, g.row_step), -1.0f);
        else v = __fadd_rn(__fmul_rn((float)x, g.col_step), -1.0f);
        dst[idx] = from_float<T>(v);
    }
}

template <class T>
lego_status k_gather(cudaStream_t s, const tok_geom *g, const int32_t *table, const float *xin,
                     const float *below, T *dst, lego_err *err) {
    size_t total = g->rows * (size_t)g->c_in * g->p * g->p;
    LAUNCH(gather_kernel<T>, ew_blocks(total), EW_THREADS, 0, s)(*g, table, xin, below, dst);
    LAUNCH_CHECK("gather");
    return LEGO_OK;
}
template lego_status k_gather<float>(cudaStream_t, const tok_geom *, const int32_t *,
                                    const float *, const float *, float *, lego_err *);
template lego_status k_gather<bf16>(cudaStream_t, const tok_geom *, const int32_t *,
                                    const float *, const float *, bf16 *, lego_err *);
template lego_status k_gather<f16>(cudaStream_t, const tok_geom *, const int32_t *,
                                    const float *, const float *, f16 *, lego_err *);

/* One thread per value of the [rows][p*p*C] output rows, laid out
 * (y, x, channel) as the final linear produces them (unpatchify). */
__global__ void scatter_kernel(tok_geom g, const float *src, float *out) {
    int C = g.C, width = g.p * g.p * C;
    size_t total = g.rows * (size_t)width, plane = (size_t)g.h * g.w;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        size_t img;
        int c, y, x;
        patch_pixel_hwc(g, NULL, idx / (size_t)width, (int)(idx % (size_t)width), &img, &c, &y, &x);
        out[(img * C + (size_t)c) * plane + (size_t)y * g.w + (size_t)x] = src[idx];
    }
}

lego_status k_scatter(cudaStream_t s, const tok_geom *g, const float *src, float *out,
                      lego_err *err) {
    size_t total = g->rows * (size_t)g->p * g->p * g->C;
    LAUNCH(scatter_kernel, ew_blocks(total), EW_THREADS, 0, s)(*g, src, out);
    LAUNCH_CHECK("scatter");
    return LEGO_OK;
}

/* ---- LayerNorm + adaLN ------------------------------------------------------ */

/* One warp per row; ROWS_PER_BLOCK rows per block.  Two-pass variance as
 * the CPU (mean first, then the mean of squared deviations).  A lane
 * reads and writes the same columns of x in every pass, so the row it
 * wrote in the first pass is what it reads in the next ones. */
#define LN_ROWS_PER_BLOCK 8

static unsigned ln_blocks(size_t rows) {
    size_t b = (rows + LN_ROWS_PER_BLOCK - 1) / LN_ROWS_PER_BLOCK;
    if (b == 0) b = 1;
    return b > 65535u * 16u ? 65535u * 16u : (unsigned)b;
}

template <class T>
__device__ __forceinline__ void modulate_row(const float *xr, int dim, float mean, int lane,
                                             const float *shift, const float *scale, T *yr) {
    float var = 0.0f;
    for (int i = lane; i < dim; i += 32) {
        float d = xr[i] - mean;
        var += d * d;
    }
    var = warp_sum(var);
    float rstd = 1.0f / sqrtf(var / (float)dim + 1e-6f);
    for (int i = lane; i < dim; i += 32)
        yr[i] = from_float<T>((xr[i] - mean) * rstd * (1.0f + scale[i]) + shift[i]);
}

template <class T>
__global__ void layernorm_modulate_kernel(float *x, const float *pos, int tokens, size_t rows,
                                          int dim, size_t rows_per_image, const float *shift,
                                          const float *scale, size_t mod_stride, T *y) {
    int lane = threadIdx.x % 32;
    /* r is the same for the whole warp, so the shuffles see every lane. */
    for (size_t r = (size_t)blockIdx.x * LN_ROWS_PER_BLOCK + threadIdx.x / 32; r < rows;
         r += (size_t)gridDim.x * LN_ROWS_PER_BLOCK) {
        float *xr = x + r * (size_t)dim;
        const float *pe = pos ? pos + (r % (size_t)tokens) * (size_t)dim : NULL;
        float sum = 0.0f;
        for (int i = lane; i < dim; i += 32) {
            float v = xr[i];
            if (pe) {
                v += pe[i];
                xr[i] = v;
            }
            sum += v;
        }
        float mean = warp_sum(sum) / (float)dim;
        size_t img = r / rows_per_image;
        modulate_row(xr, dim, mean, lane, shift + img * mod_stride, scale + img * mod_stride,
                     y + r * (size_t)dim);
    }
}

/* The same two kernels with the row in registers: for dim a multiple of
 * 128 up to 32 * 4 * LN_MAX_VEC, each lane holds dim/128 float4 of its
 * row, so x, y and the modulation vectors are read once with 16-byte
 * loads and the statistics need no second pass over memory.  The
 * arithmetic is the generic kernels' (two-pass variance, same formulas);
 * only the order of the partial sums differs. */
#define LN_MAX_VEC 16

__device__ __forceinline__ float4 ld4(const float *p) { return *(const float4 *)p; }
__device__ __forceinline__ void st4(float *p, float4 v) { *(float4 *)p = v; }

template <class T> __device__ __forceinline__ void store4(T *p, float a, float b, float c, float d);
template <> __device__ __forceinline__ void store4<float>(float *p, float a, float b, float c,
                                                          float d) {
    *(float4 *)p = make_float4(a, b, c, d);
}
template <> __device__ __forceinline__ void store4<bf16>(bf16 *p, float a, float b, float c,
                                                         float d) {
    *(uint2 *)p = make_uint2(pack2<bf16>(a, b), pack2<bf16>(c, d));
}
template <> __device__ __forceinline__ void store4<f16>(f16 *p, float a, float b, float c,
                                                        float d) {
    *(uint2 *)p = make_uint2(pack2<f16>(a, b), pack2<f16>(c, d));
}

/* Four consecutive values of type T as floats (8- or 16-byte load). */
template <class T> __device__ __forceinline__ float4 load4(const T *p);
template <> __device__ __forceinline__ float4 load4<float>(const float *p) { return ld4(p); }
template <class T> __device__ __forceinline__ float4 unpack4(uint2 w) {
    T e[4];
    memcpy(e, &w, sizeof e);
    return make_float4(to_float<T>(e[0]), to_float<T>(e[1]), to_float<T>(e[2]),
                       to_float<T>(e[3]));
}
template <> __device__ __forceinline__ float4 load4<bf16>(const bf16 *p) {
    return unpack4<bf16>(*(const uint2 *)p);
}
template <> __device__ __forceinline__ float4 load4<f16>(const f16 *p) {
    return unpack4<f16>(*(const uint2 *)p);
}

/* Mean and variance of the lane's values, then the modulated row out. */
template <class T>
__device__ __forceinline__ void modulate_vec(const float4 *v, int nv, int dim, float sum,
                                             int lane, const float *shift, const float *scale,
                                             T *yr) {
    const float mean = warp_sum(sum) / (float)dim;
    float var = 0.0f;
#pragma unroll
    for (int j = 0; j < LN_MAX_VEC; j++) {
        if (j >= nv) break;
        float a = v[j].x - mean, b = v[j].y - mean, c = v[j].z - mean, d = v[j].w - mean;
        var += a * a + b * b + c * c + d * d;
    }
    var = warp_sum(var);
    const float rstd = 1.0f / sqrtf(var / (float)dim + 1e-6f);
#pragma unroll
    for (int j = 0; j < LN_MAX_VEC; j++) {
        if (j >= nv) break;
        int i = (lane + 32 * j) * 4;
        float4 sc = ld4(scale + i), sh = ld4(shift + i);
        store4<T>(yr + i, (v[j].x - mean) * rstd * (1.0f + sc.x) + sh.x,
                  (v[j].y - mean) * rstd * (1.0f + sc.y) + sh.y,
                  (v[j].z - mean) * rstd * (1.0f + sc.z) + sh.z,
                  (v[j].w - mean) * rstd * (1.0f + sc.w) + sh.w);
    }
}

template <class T>
__global__ void layernorm_modulate_vec_kernel(float *x, const float *pos, int tokens, size_t rows,
                                              int dim, size_t rows_per_image, const float *shift,
                                              const float *scale, size_t mod_stride, T *y) {
    const int lane = threadIdx.x % 32, nv = dim / 128;
    for (size_t r = (size_t)blockIdx.x * LN_ROWS_PER_BLOCK + threadIdx.x / 32; r < rows;
         r += (size_t)gridDim.x * LN_ROWS_PER_BLOCK) {
        float *xr = x + r * (size_t)dim;
        const float *pe = pos ? pos + (r % (size_t)tokens) * (size_t)dim : NULL;
        float4 v[LN_MAX_VEC];
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < LN_MAX_VEC; j++) {
            if (j >= nv) break;
            int i = (lane + 32 * j) * 4;
            float4 a = ld4(xr + i);
            if (pe) {
                float4 p = ld4(pe + i);
                a.x += p.x, a.y += p.y, a.z += p.z, a.w += p.w;
                st4(xr + i, a);
            }
            v[j] = a;
            sum += a.x + a.y + a.z + a.w;
        }
        size_t img = r / rows_per_image;
        modulate_vec<T>(v, nv, dim, sum, lane, shift + img * mod_stride, scale + img * mod_stride,
                        y + r * (size_t)dim);
    }
}

template <class T>
__global__ void gated_residual_layernorm_vec_kernel(float *x, const T *y, size_t rows, int dim,
                                                    size_t rows_per_image, const float *gate,
                                                    size_t gate_stride, const float *shift,
                                                    const float *scale, size_t mod_stride,
                                                    T *out) {
    const int lane = threadIdx.x % 32, nv = dim / 128;
    for (size_t r = (size_t)blockIdx.x * LN_ROWS_PER_BLOCK + threadIdx.x / 32; r < rows;
         r += (size_t)gridDim.x * LN_ROWS_PER_BLOCK) {
        size_t img = r / rows_per_image;
        const float *g = gate + img * gate_stride;
        const T *yr = y + r * (size_t)dim;
        float *xr = x + r * (size_t)dim;
        float4 v[LN_MAX_VEC];
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < LN_MAX_VEC; j++) {
            if (j >= nv) break;
            int i = (lane + 32 * j) * 4;
            float4 a = ld4(xr + i), b = load4<T>(yr + i), gg = ld4(g + i);
            a.x += gg.x * b.x, a.y += gg.y * b.y, a.z += gg.z * b.z, a.w += gg.w * b.w;
            st4(xr + i, a);
            v[j] = a;
            sum += a.x + a.y + a.z + a.w;
        }
        modulate_vec<T>(v, nv, dim, sum, lane, shift + img * mod_stride, scale + img * mod_stride,
                        out + r * (size_t)dim);
    }
}

/* Whether the register kernels take a row of `dim`, given where the
 * vectors start (16-byte loads need 16-byte aligned rows). */
static bool ln_vec_ok(int dim, size_t mod_stride, size_t gate_stride) {
    return dim % 128 == 0 && dim / 128 <= LN_MAX_VEC && mod_stride % 4 == 0 &&
           gate_stride % 4 == 0;
}

template <class T>
lego_status k_layernorm_modulate(cudaStream_t s, float *x, const float *pos, int tokens,
                                 size_t rows, int dim, size_t rows_per_image, const float *shift,
                                 const float *scale, size_t mod_stride, T *y, lego_err *err) {
    if (ln_vec_ok(dim, mod_stride, 4))
        LAUNCH(layernorm_modulate_vec_kernel<T>, ln_blocks(rows), 32 * LN_ROWS_PER_BLOCK, 0, s)(
            x, pos, tokens, rows, dim, rows_per_image, shift, scale, mod_stride, y);
    else
        LAUNCH(layernorm_modulate_kernel<T>, ln_blocks(rows), 32 * LN_ROWS_PER_BLOCK, 0, s)(
            x, pos, tokens, rows, dim, rows_per_image, shift, scale, mod_stride, y);
    LAUNCH_CHECK("layernorm_modulate");
    return LEGO_OK;
}

template <class T>
__global__ void gated_residual_layernorm_kernel(float *x, const T *y, size_t rows, int dim,
                                                size_t rows_per_image, const float *gate,
                                                size_t gate_stride, const float *shift,
                                                const float *scale, size_t mod_stride, T *out) {
    int lane = threadIdx.x % 32;
    for (size_t r = (size_t)blockIdx.x * LN_ROWS_PER_BLOCK + threadIdx.x / 32; r < rows;
         r += (size_t)gridDim.x * LN_ROWS_PER_BLOCK) {
        size_t img = r / rows_per_image;
        const float *g = gate + img * gate_stride;
        const T *yr = y + r * (size_t)dim;
        float *xr = x + r * (size_t)dim;
        float sum = 0.0f;
        for (int i = lane; i < dim; i += 32) {
            float v = xr[i] + g[i] * to_float<T>(yr[i]);
            xr[i] = v;
            sum += v;
        }
        float mean = warp_sum(sum) / (float)dim;
        modulate_row(xr, dim, mean, lane, shift + img * mod_stride, scale + img * mod_stride,
                     out + r * (size_t)dim);
    }
}

template <class T>
lego_status k_gated_residual_layernorm(cudaStream_t s, float *x, const T *y, size_t rows,
                                       int dim, size_t rows_per_image, const float *gate,
                                       size_t gate_stride, const float *shift,
                                       const float *scale, size_t mod_stride, T *out,
                                       lego_err *err) {
    if (ln_vec_ok(dim, mod_stride, gate_stride))
        LAUNCH(gated_residual_layernorm_vec_kernel<T>, ln_blocks(rows), 32 * LN_ROWS_PER_BLOCK, 0,
               s)(x, y, rows, dim, rows_per_image, gate, gate_stride, shift, scale, mod_stride,
                  out);
    else
        LAUNCH(gated_residual_layernorm_kernel<T>, ln_blocks(rows), 32 * LN_ROWS_PER_BLOCK, 0, s)(
            x, y, rows, dim, rows_per_image, gate, gate_stride, shift, scale, mod_stride, out);
    LAUNCH_CHECK("gated_residual_layernorm");
    return LEGO_OK;
}

#define LN_INSTANTIATE(T)                                                                 \
    template lego_status k_layernorm_modulate<T>(cudaStream_t, float *, const float *, int, \
                                                 size_t, int, size_t, const float *,       \
                                                 const float *, size_t, T *, lego_err *);  \
    template lego_status k_gated_residual_layernorm<T>(                                    \
        cudaStream_t, float *, const T *, size_t, int, size_t, const float *, size_t,      \
        const float *, const float *, size_t, T *, lego_err *);
LN_INSTANTIATE(float)
LN_INSTANTIATE(bf16)
LN_INSTANTIATE(f16)

/* ---- guidance and EDM ------------------------------------------------------- */

__global__ void guide_kernel(const float *f, size_t len, float g, float *out) {
    for (size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x; j < len;
         j += (size_t)gridDim.x * blockDim.x)
        out[j] = f[len + j] + g * (f[j] - f[len + j]);
}

lego_status k_guide(cudaStream_t s, const float *f, int n, size_t chw, float g, float *out,
                    lego_err *err) {
    size_t len = (size_t)n * chw;
    LAUNCH(guide_kernel, ew_blocks(len), EW_THREADS, 0, s)(f, len, g, out);
    LAUNCH_CHECK("guide");
    return LEGO_OK;
}

__global__ void edm_kernel(const float *x, const float *f, const float *coef, size_t chw,
                           size_t total, float *out) {
    for (size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x; j < total;
         j += (size_t)gridDim.x * blockDim.x) {
        size_t img = j / chw;
        out[j] = coef[3 * img + 1] * x[j] + coef[3 * img + 2] * f[j];
    }
}

lego_status k_edm(cudaStream_t s, const float *x, const float *f, const float *coef, int n,
                  size_t chw, float *out, lego_err *err) {
    size_t total = (size_t)n * chw;
    LAUNCH(edm_kernel, ew_blocks(total), EW_THREADS, 0, s)(x, f, coef, chw, total, out);
    LAUNCH_CHECK("edm");
    return LEGO_OK;
}
