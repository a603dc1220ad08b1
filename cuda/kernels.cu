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

#include <type_traits>

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

/* v as the residual stream of type R stores it (identity for fp32). */
template <class R> __device__ __forceinline__ float residual_round(float v) {
    return to_float<R>(from_float<R>(v));
}

template <class T, class R>
__device__ __forceinline__ void modulate_row(const R *xr, int dim, float mean, int lane,
                                             const float *shift, const float *scale, T *yr) {
    float var = 0.0f;
    for (int i = lane; i < dim; i += 32) {
        float d = to_float<R>(xr[i]) - mean;
        var += d * d;
    }
    var = warp_sum(var);
    float rstd = 1.0f / sqrtf(var / (float)dim + 1e-6f);
    for (int i = lane; i < dim; i += 32)
        yr[i] = from_float<T>((to_float<R>(xr[i]) - mean) * rstd * (1.0f + scale[i]) + shift[i]);
}

template <class T, class R>
__global__ void layernorm_modulate_kernel(R *x, const float *pos, int tokens, size_t rows,
                                          int dim, size_t rows_per_image, const float *shift,
                                          const float *scale, size_t mod_stride, T *y) {
    int lane = threadIdx.x % 32;
    /* r is the same for the whole warp, so the shuffles see every lane. */
    for (size_t r = (size_t)blockIdx.x * LN_ROWS_PER_BLOCK + threadIdx.x / 32; r < rows;
         r += (size_t)gridDim.x * LN_ROWS_PER_BLOCK) {
        R *xr = x + r * (size_t)dim;
        const float *pe = pos ? pos + (r % (size_t)tokens) * (size_t)dim : NULL;
        float sum = 0.0f;
        for (int i = lane; i < dim; i += 32) {
            float v = to_float<R>(xr[i]);
            if (pe) {
                v = residual_round<R>(v + pe[i]);
                xr[i] = from_float<R>(v);
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
 * only the order of the partial sums differs.  The row array is sized by
 * a compile-time bound MAXV >= dim/128 (ln_bound): sized for the widest
 * row, it held registers that narrower rows never use (94 per thread at
 * width 1024 with 16, ptxas sm_90), and fewer registers let more warps
 * keep loads in flight in these memory-bound kernels. */
#define LN_MAX_VEC 16

/* The kernel instance for a row of nv float4 per lane: the smallest bound
 * of {2, 4, 8, 9, 12, 16} that holds it (exact for the widths of the LEGO
 * and DiT presets: 256, 1024, 1152; 384 and 768 take 4 and 8). */
static int ln_bound(int nv) {
    static const int bounds[] = {2, 4, 8, 9, 12, LN_MAX_VEC};
    for (int b : bounds)
        if (nv <= b) return b;
    return 0;
}

/* f(std::integral_constant<int, ln_bound(nv)>()): the kernel instance as a
 * template argument. */
template <class F> static void with_ln_bound(int nv, F f) {
    switch (ln_bound(nv)) {
    case 2: f(std::integral_constant<int, 2>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 8: f(std::integral_constant<int, 8>()); break;
    case 9: f(std::integral_constant<int, 9>()); break;
    case 12: f(std::integral_constant<int, 12>()); break;
    default: f(std::integral_constant<int, LN_MAX_VEC>()); break;
    }
}

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

/* Mean and variance of the lane's values, then the modulated row out.
 * MAXV bounds nv at compile time (see ln_bound). */
template <class T, int MAXV>
__device__ __forceinline__ void modulate_vec(const float4 *v, int nv, int dim, float sum,
                                             int lane, const float *shift, const float *scale,
                                             T *yr) {
    const float mean = warp_sum(sum) / (float)dim;
    float var = 0.0f;
#pragma unroll
    for (int j = 0; j < MAXV; j++) {
        if (j >= nv) break;
        float a = v[j].x - mean, b = v[j].y - mean, c = v[j].z - mean, d = v[j].w - mean;
        var += a * a + b * b + c * c + d * d;
    }
    var = warp_sum(var);
    const float rstd = 1.0f / sqrtf(var / (float)dim + 1e-6f);
#pragma unroll
    for (int j = 0; j < MAXV; j++) {
        if (j >= nv) break;
        int i = (lane + 32 * j) * 4;
        float4 sc = ld4(scale + i), sh = ld4(shift + i);
        store4<T>(yr + i, (v[j].x - mean) * rstd * (1.0f + sc.x) + sh.x,
                  (v[j].y - mean) * rstd * (1.0f + sc.y) + sh.y,
                  (v[j].z - mean) * rstd * (1.0f + sc.z) + sh.z,
                  (v[j].w - mean) * rstd * (1.0f + sc.w) + sh.w);
    }
}

/* Which rows a warp of the register kernels takes.  Per row (TILED
 * false): LN_ROWS_PER_BLOCK warps per block stride over the matrix, each
 * reading its row's modulation vectors from global memory (L2).  Tiled: a
 * block takes LN_TILE_ROWS consecutive rows of one image and first copies
 * that image's vectors to shared memory, so they are read from L2 once per
 * tile instead of once per row.  The arithmetic per row is the same, so
 * the two give the same bits. */
#define LN_TILE_ROWS 64

struct ln_rows {
    size_t first, end, step;
    size_t img; /* tiled: the block's image */
};

template <bool TILED> __device__ __forceinline__ ln_rows ln_warp_rows(size_t rows, size_t rpi) {
    const size_t warp = threadIdx.x / 32;
    if (!TILED)
        return ln_rows{(size_t)blockIdx.x * LN_ROWS_PER_BLOCK + warp, rows,
                       (size_t)gridDim.x * LN_ROWS_PER_BLOCK, 0};
    const size_t tiles = (rpi + LN_TILE_ROWS - 1) / LN_TILE_ROWS, img = blockIdx.x / tiles;
    const size_t first = img * rpi + (blockIdx.x % tiles) * LN_TILE_ROWS;
    const size_t end = first + LN_TILE_ROWS < (img + 1) * rpi ? first + LN_TILE_ROWS
                                                               : (img + 1) * rpi;
    return ln_rows{first + warp, end, blockDim.x / 32, img};
}

/* Tiled kernels: `count` vectors of dim floats (the block's image's) one
 * after the other into shared memory, before any warp reads them. */
__device__ __forceinline__ void ln_stage(float *staged, const float *const *src, int count,
                                         int dim) {
    for (int v = 0; v < count; v++)
        for (int i = threadIdx.x * 4; i < dim; i += blockDim.x * 4)
            st4(staged + (size_t)v * dim + i, ld4(src[v] + i));
    __syncthreads();
}

/* Four values as the residual stream of type R stores them. */
template <class R> __device__ __forceinline__ float4 residual_round4(float4 a) {
    return make_float4(residual_round<R>(a.x), residual_round<R>(a.y), residual_round<R>(a.z),
                       residual_round<R>(a.w));
}
template <> __device__ __forceinline__ float4 residual_round4<float>(float4 a) { return a; }

template <class T, class R, bool TILED, int MAXV>
__global__ void layernorm_modulate_vec_kernel(R *x, const float *pos, int tokens, size_t rows,
                                              int dim, size_t rows_per_image, const float *shift,
                                              const float *scale, size_t mod_stride, T *y) {
    DYNAMIC_SMEM(float, staged); /* tiled: [shift | scale] of the block's image */
    const int lane = threadIdx.x % 32, nv = dim / 128;
    const ln_rows w = ln_warp_rows<TILED>(rows, rows_per_image);
    if (TILED) {
        const float *src[2] = {shift + w.img * mod_stride, scale + w.img * mod_stride};
        ln_stage(staged, src, 2, dim);
    }
    for (size_t r = w.first; r < w.end; r += w.step) {
        R *xr = x + r * (size_t)dim;
        const float *pe = pos ? pos + (r % (size_t)tokens) * (size_t)dim : NULL;
        float4 v[MAXV];
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < MAXV; j++) {
            if (j >= nv) break;
            int i = (lane + 32 * j) * 4;
            float4 a = load4<R>(xr + i);
            if (pe) {
                float4 p = ld4(pe + i);
                a.x += p.x, a.y += p.y, a.z += p.z, a.w += p.w;
                a = residual_round4<R>(a);
                store4<R>(xr + i, a.x, a.y, a.z, a.w);
            }
            v[j] = a;
            sum += a.x + a.y + a.z + a.w;
        }
        size_t img = r / rows_per_image;
        modulate_vec<T, MAXV>(v, nv, dim, sum, lane, TILED ? staged : shift + img * mod_stride,
                        TILED ? staged + dim : scale + img * mod_stride, y + r * (size_t)dim);
    }
}

template <class T, class R, bool TILED, int MAXV>
__global__ void gated_residual_layernorm_vec_kernel(R *x, const T *y, size_t rows, int dim,
                                                    size_t rows_per_image, const float *gate,
                                                    size_t gate_stride, const float *shift,
                                                    const float *scale, size_t mod_stride,
                                                    T *out) {
    DYNAMIC_SMEM(float, staged); /* tiled: [gate | shift | scale] of the block's image */
    const int lane = threadIdx.x % 32, nv = dim / 128;
    const ln_rows w = ln_warp_rows<TILED>(rows, rows_per_image);
    if (TILED) {
        const float *src[3] = {gate + w.img * gate_stride, shift + w.img * mod_stride,
                               scale + w.img * mod_stride};
        ln_stage(staged, src, 3, dim);
    }
    for (size_t r = w.first; r < w.end; r += w.step) {
        size_t img = r / rows_per_image;
        const float *g = TILED ? staged : gate + img * gate_stride;
        const T *yr = y + r * (size_t)dim;
        R *xr = x + r * (size_t)dim;
        float4 v[MAXV];
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < MAXV; j++) {
            if (j >= nv) break;
            int i = (lane + 32 * j) * 4;
            float4 a = load4<R>(xr + i), b = load4<T>(yr + i), gg = ld4(g + i);
            a.x += gg.x * b.x, a.y += gg.y * b.y, a.z += gg.z * b.z, a.w += gg.w * b.w;
            a = residual_round4<R>(a);
            store4<R>(xr + i, a.x, a.y, a.z, a.w);
            v[j] = a;
            sum += a.x + a.y + a.z + a.w;
        }
        modulate_vec<T, MAXV>(v, nv, dim, sum, lane, TILED ? staged + dim : shift + img * mod_stride,
                        TILED ? staged + 2 * (size_t)dim : scale + img * mod_stride,
                        out + r * (size_t)dim);
    }
}

/* Whether the register kernels take a row of `dim`, given where the
 * vectors start (16-byte loads need 16-byte aligned rows). */
static bool ln_vec_ok(int dim, size_t mod_stride, size_t gate_stride) {
    return dim % 128 == 0 && dim / 128 <= LN_MAX_VEC && mod_stride % 4 == 0 &&
           gate_stride % 4 == 0;
}

/* The tiled kernels' grid (images x tiles per image), or 0 when they do
 * not apply: per-row mode, or rows not whole images. */
static unsigned ln_tiles(int mode, size_t rows, size_t rows_per_image) {
    if (mode != LN_TILED || rows_per_image == 0 || rows % rows_per_image != 0) return 0;
    size_t tiles = (rows_per_image + LN_TILE_ROWS - 1) / LN_TILE_ROWS;
    size_t blocks = rows / rows_per_image * tiles; /* <= rows */
    return blocks > 0 && blocks <= 2147483647u ? (unsigned)blocks : 0;
}

/* One launch of a register kernel: tiled (grid `tiled`, `vectors` staged
 * vectors of dim floats in shared memory) or per row. */
typedef struct ln_launch {
    cudaStream_t s;
    unsigned tiled;
    size_t rows;
    int dim;
    size_t rows_per_image;
    int vectors;
} ln_launch;

template <class T, class R, int MAXV>
static void launch_ln_vec(const ln_launch &L, R *x, const float *pos, int tokens,
                          const float *shift, const float *scale, size_t mod_stride, T *y) {
    /* One name each: LAUNCH is a macro. */
    auto tiled_kernel = layernorm_modulate_vec_kernel<T, R, true, MAXV>;
    auto row_kernel = layernorm_modulate_vec_kernel<T, R, false, MAXV>;
    if (L.tiled)
        LAUNCH(tiled_kernel, L.tiled, 32 * LN_ROWS_PER_BLOCK,
               (size_t)L.vectors * L.dim * sizeof(float), L.s)(
            x, pos, tokens, L.rows, L.dim, L.rows_per_image, shift, scale, mod_stride, y);
    else
        LAUNCH(row_kernel, ln_blocks(L.rows), 32 * LN_ROWS_PER_BLOCK, 0, L.s)(
            x, pos, tokens, L.rows, L.dim, L.rows_per_image, shift, scale, mod_stride, y);
}

template <class T, class R, int MAXV>
static void launch_gated_vec(const ln_launch &L, R *x, const T *y, const float *gate,
                             size_t gate_stride, const float *shift, const float *scale,
                             size_t mod_stride, T *out) {
    auto tiled_kernel = gated_residual_layernorm_vec_kernel<T, R, true, MAXV>;
    auto row_kernel = gated_residual_layernorm_vec_kernel<T, R, false, MAXV>;
    if (L.tiled)
        LAUNCH(tiled_kernel, L.tiled, 32 * LN_ROWS_PER_BLOCK,
               (size_t)L.vectors * L.dim * sizeof(float), L.s)(
            x, y, L.rows, L.dim, L.rows_per_image, gate, gate_stride, shift, scale, mod_stride,
            out);
    else
        LAUNCH(row_kernel, ln_blocks(L.rows), 32 * LN_ROWS_PER_BLOCK, 0, L.s)(
            x, y, L.rows, L.dim, L.rows_per_image, gate, gate_stride, shift, scale, mod_stride,
            out);
}

template <class T, class R>
lego_status k_layernorm_modulate(cudaStream_t s, R *x, const float *pos, int tokens,
                                 size_t rows, int dim, size_t rows_per_image, const float *shift,
                                 const float *scale, size_t mod_stride, T *y, int mode,
                                 lego_err *err) {
    const bool vec = ln_vec_ok(dim, mod_stride, 4);
    const unsigned tiled = vec ? ln_tiles(mode, rows, rows_per_image) : 0;
    if (vec) {
        const ln_launch L = {s, tiled, rows, dim, rows_per_image, 2};
        with_ln_bound(dim / 128, [&](auto bound) {
            launch_ln_vec<T, R, decltype(bound)::value>(L, x, pos, tokens, shift, scale,
                                                        mod_stride, y);
        });
    } else
        LAUNCH((layernorm_modulate_kernel<T, R>), ln_blocks(rows), 32 * LN_ROWS_PER_BLOCK, 0, s)(
            x, pos, tokens, rows, dim, rows_per_image, shift, scale, mod_stride, y);
    LAUNCH_CHECK("layernorm_modulate");
    return LEGO_OK;
}

template <class T, class R>
__global__ void gated_residual_layernorm_kernel(R *x, const T *y, size_t rows, int dim,
                                                size_t rows_per_image, const float *gate,
                                                size_t gate_stride, const float *shift,
                                                const float *scale, size_t mod_stride, T *out) {
    int lane = threadIdx.x % 32;
    for (size_t r = (size_t)blockIdx.x * LN_ROWS_PER_BLOCK + threadIdx.x / 32; r < rows;
         r += (size_t)gridDim.x * LN_ROWS_PER_BLOCK) {
        size_t img = r / rows_per_image;
        const float *g = gate + img * gate_stride;
        const T *yr = y + r * (size_t)dim;
        R *xr = x + r * (size_t)dim;
        float sum = 0.0f;
        for (int i = lane; i < dim; i += 32) {
            float v = residual_round<R>(to_float<R>(xr[i]) + g[i] * to_float<T>(yr[i]));
            xr[i] = from_float<R>(v);
            sum += v;
        }
        float mean = warp_sum(sum) / (float)dim;
        modulate_row(xr, dim, mean, lane, shift + img * mod_stride, scale + img * mod_stride,
                     out + r * (size_t)dim);
    }
}

template <class T, class R>
lego_status k_gated_residual_layernorm(cudaStream_t s, R *x, const T *y, size_t rows,
                                       int dim, size_t rows_per_image, const float *gate,
                                       size_t gate_stride, const float *shift,
                                       const float *scale, size_t mod_stride, T *out,
                                       int mode, lego_err *err) {
    const bool vec = ln_vec_ok(dim, mod_stride, gate_stride);
    const unsigned tiled = vec ? ln_tiles(mode, rows, rows_per_image) : 0;
    if (vec) {
        const ln_launch L = {s, tiled, rows, dim, rows_per_image, 3};
        with_ln_bound(dim / 128, [&](auto bound) {
            launch_gated_vec<T, R, decltype(bound)::value>(L, x, y, gate, gate_stride, shift,
                                                           scale, mod_stride, out);
        });
    } else
        LAUNCH((gated_residual_layernorm_kernel<T, R>), ln_blocks(rows), 32 * LN_ROWS_PER_BLOCK, 0,
               s)(
            x, y, rows, dim, rows_per_image, gate, gate_stride, shift, scale, mod_stride, out);
    LAUNCH_CHECK("gated_residual_layernorm");
    return LEGO_OK;
}

#define LN_INSTANTIATE(T, R)                                                                 \
    template lego_status k_layernorm_modulate<T, R>(cudaStream_t, R *, const float *, int,  \
                                                    size_t, int, size_t, const float *,     \
                                                    const float *, size_t, T *, int,        \
                                                    lego_err *);                            \
    template lego_status k_gated_residual_layernorm<T, R>(                                  \
        cudaStream_t, R *, const T *, size_t, int, size_t, const float *, size_t,           \
        const float *, const float *, size_t, T *, int, lego_err *);
LN_INSTANTIATE(float, float)
LN_INSTANTIATE(bf16, float)
LN_INSTANTIATE(f16, float)
LN_INSTANTIATE(bf16, bf16)
LN_INSTANTIATE(f16, f16)

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
