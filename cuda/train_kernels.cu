/*
 * train_kernels.cu -- the kernels of training on the GPU: the forward
 * pieces that keep what the backward pass reads (LayerNorm statistics,
 * attention log-sum-exps, pre-GELU values), the backward of every layer,
 * deterministic per-image column sums, the EDM loss, the gradient norm and
 * the optimiser.  Launched from train.cu (declarations in train_internal.h).
 *
 * Each kernel computes the formula of its CPU twin in src/backward_cpu.c
 * and src/train.c.  No floating-point atomics anywhere: every reduction
 * has a fixed assignment of elements to threads and a fixed order (column
 * sums over rows in chunks of TRAIN_SUM_CHUNK rows, then the chunks in
 * order, TRAIN_SUM_FAN at a time; block sums by a fixed tree), so one GPU
 * gives the same bits on every run.
 */
#include <math.h>

#include "train_internal.h"

#define GELU_C0 0.7978845608f /* sqrt(2/pi) */
#define GELU_C1 0.044715f

static unsigned blocks_for(size_t threads, unsigned per_block) {
    size_t b = (threads + per_block - 1) / per_block;
    if (b > 65535u * 16u) b = 65535u * 16u;
    return b ? (unsigned)b : 1u;
}

/* Grid-stride loop over [0, n). */
#define FOR_EACH(i, n)                                                                       \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n);                  \
         i += (size_t)gridDim.x * blockDim.x)

/* ---- small element-wise kernels ---------------------------------------- */

__global__ void zero_kernel(float *x, size_t n) {
    FOR_EACH(i, n) x[i] = 0.0f;
}

lego_status t_zero(cudaStream_t s, float *x, size_t n, lego_err *err) {
    LAUNCH(zero_kernel, ew_blocks(n), EW_THREADS, 0, s)(x, n);
    LAUNCH_CHECK("zero");
    return LEGO_OK;
}

/* x = y + sigma noise (rounded as the CPU's float code), xin = c_in x. */
__global__ void noisy_input_kernel(const float *y, const float *noise, const float *coef,
                                   const float *sigma, size_t chw, size_t total, float *x,
                                   float *xin) {
    FOR_EACH(i, total) {
        size_t img = i / chw;
        float v = __fadd_rn(y[i], __fmul_rn(sigma[img], noise[i]));
        x[i] = v;
        xin[i] = __fmul_rn(coef[TRAIN_COEF * img + 0], v);
    }
}

lego_status t_noisy_input(cudaStream_t s, const float *y, const float *noise, const float *coef,
                          const float *sigma, int n, size_t chw, float *x, float *xin,
                          lego_err *err) {
    size_t total = (size_t)n * chw;
    LAUNCH(noisy_input_kernel, ew_blocks(total), EW_THREADS, 0, s)(y, noise, coef, sigma, chw,
                                                                   total, x, xin);
    LAUNCH_CHECK("noisy_input");
    return LEGO_OK;
}

__device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

/* y = SiLU(x) */
__global__ void silu_fwd_kernel(const float *x, size_t n, float *y) {
    FOR_EACH(i, n) y[i] = x[i] * sigmoid_f(x[i]);
}

lego_status t_silu(cudaStream_t s, const float *x, size_t n, float *y, lego_err *err) {
    LAUNCH(silu_fwd_kernel, ew_blocks(n), EW_THREADS, 0, s)(x, n, y);
    LAUNCH_CHECK("silu");
    return LEGO_OK;
}

/* d = dy * SiLU'(z), SiLU'(z) = s (1 + z (1 - s)); d may be dy. */
__global__ void silu_bwd_kernel(const float *z, const float *dy, size_t n, float *d) {
    FOR_EACH(i, n) {
        float v = z[i], sg = sigmoid_f(v);
        d[i] = dy[i] * sg * (1.0f + v * (1.0f - sg));
    }
}

lego_status t_silu_bwd(cudaStream_t s, const float *z, const float *dy, size_t n, float *d,
                       lego_err *err) {
    LAUNCH(silu_bwd_kernel, ew_blocks(n), EW_THREADS, 0, s)(z, dy, n, d);
    LAUNCH_CHECK("silu_bwd");
    return LEGO_OK;
}

/* g = GELU_tanh(u), the CPU's formula (backward_cpu.c: gelu_fwd). */
template <class T> __global__ void gelu_fwd_kernel(const T *u, size_t n, T *g) {
    FOR_EACH(i, n) {
        float x = to_float<T>(u[i]);
        g[i] = from_float<T>(0.5f * x * (1.0f + tanhf(GELU_C0 * (x + GELU_C1 * x * x * x))));
    }
}

template <class T> lego_status t_gelu(cudaStream_t s, const T *u, size_t n, T *g, lego_err *err) {
    LAUNCH(gelu_fwd_kernel<T>, ew_blocks(n), EW_THREADS, 0, s)(u, n, g);
    LAUNCH_CHECK("gelu");
    return LEGO_OK;
}

/* du = dg GELU'(u); du may be dg (each element read, then written). */
template <class T> __global__ void gelu_bwd_kernel(const T *u, const T *dg, size_t n, T *du) {
    FOR_EACH(i, n) {
        float x = to_float<T>(u[i]), x2 = x * x;
        float t = tanhf(GELU_C0 * (x + GELU_C1 * x2 * x));
        float d =
            0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * GELU_C0 * (1.0f + 3.0f * GELU_C1 * x2);
        du[i] = from_float<T>(to_float<T>(dg[i]) * d);
    }
}

template <class T>
lego_status t_gelu_bwd(cudaStream_t s, const T *u, const T *dg, size_t n, T *du, lego_err *err) {
    LAUNCH(gelu_bwd_kernel<T>, ew_blocks(n), EW_THREADS, 0, s)(u, dg, n, du);
    LAUNCH_CHECK("gelu_bwd");
    return LEGO_OK;
}

/* ---- tokens and images ---------------------------------------------------- */

/* The final layer's rows [rows][p p C] (y, x, channel) to the image
 * (unpatchify), or, with to_image 0, the image's values back into rows of
 * type T (its adjoint: dL/drows from dL/dF). */
template <class T>
__global__ void rows_image_kernel(tok_geom g, const int32_t *table, const float *rows, T *drows,
                                  float *image, int to_image) {
    int C = g.C, width = g.p * g.p * C;
    size_t total = g.rows * (size_t)width, plane = (size_t)g.h * g.w;
    FOR_EACH(idx, total) {
        size_t img;
        int c, y, x;
        patch_pixel_hwc(g, table, idx / (size_t)width, (int)(idx % (size_t)width), &img, &c, &y,
                        &x);
        float *px = image + (img * C + (size_t)c) * plane + (size_t)y * g.w + (size_t)x;
        if (to_image) *px = rows[idx];
        else drows[idx] = from_float<T>(*px);
    }
}

lego_status t_rows_to_image(cudaStream_t s, const tok_geom *g, const int32_t *table,
                            const float *rows, float *image, lego_err *err) {
    size_t total = g->rows * (size_t)g->p * g->p * g->C;
    LAUNCH(rows_image_kernel<float>, ew_blocks(total), EW_THREADS, 0, s)
    (*g, table, rows, (float *)NULL, image, 1);
    LAUNCH_CHECK("rows_to_image");
    return LEGO_OK;
}

template <class T>
lego_status t_image_to_rows(cudaStream_t s, const tok_geom *g, const int32_t *table,
                            const float *image, T *rows, lego_err *err) {
    size_t total = g->rows * (size_t)g->p * g->p * g->C;
    LAUNCH(rows_image_kernel<T>, ew_blocks(total), EW_THREADS, 0, s)
    (*g, table, (const float *)NULL, rows, (float *)image, 0);
    LAUNCH_CHECK("image_to_rows");
    return LEGO_OK;
}

/* dbelow += the F_below channels of dpatches [rows][c_in p p].  Every
 * pixel belongs to one token at most: no two threads add to one value. */
__global__ void below_grad_kernel(tok_geom g, const int32_t *table, const float *dpatches,
                                  float *dbelow) {
    int pp = g.p * g.p, width = g.c_in * pp, C = g.C, cw = C * pp;
    size_t total = g.rows * (size_t)cw, plane = (size_t)g.h * g.w;
    FOR_EACH(idx, total) {
        size_t r = idx / (size_t)cw;
        int col = (int)(idx % (size_t)cw);
        size_t img;
        int ci, y, x;
        patch_pixel_chw(g, table, r, col, &img, &ci, &y, &x);
        dbelow[(img * C + (size_t)ci) * plane + (size_t)y * g.w + (size_t)x] +=
            dpatches[r * (size_t)width + (size_t)col];
    }
}

lego_status t_below_grad(cudaStream_t s, const tok_geom *g, const int32_t *table,
                         const float *dpatches, float *dbelow, lego_err *err) {
    size_t total = g->rows * (size_t)g->C * g->p * g->p;
    LAUNCH(below_grad_kernel, ew_blocks(total), EW_THREADS, 0, s)(*g, table, dpatches, dbelow);
    LAUNCH_CHECK("below_grad");
    return LEGO_OK;
}

/* ---- LayerNorm with adaLN modulation ---------------------------------------- */

#define ROWS_PER_BLOCK 8 /* one warp per row */

/* Row r of y = LN(x)(1 + scale) + shift for one warp, x's row in xr
 * (global memory, read three times: the CPU's two-pass statistics), and
 * its mean and 1/std. */
template <class T>
__device__ __forceinline__ void ln_fwd_row(const float *xr, size_t r, int D, size_t rpi,
                                           const float *mod, size_t stride, float *mean,
                                           float *rstd, T *y) {
    int lane = threadIdx.x % 32;
    float sum = 0;
    for (int i = lane; i < D; i += 32) sum += xr[i];
    float mu = warp_sum(sum) / (float)D, var = 0;
    for (int i = lane; i < D; i += 32) var += (xr[i] - mu) * (xr[i] - mu);
    float rs = 1.0f / sqrtf(warp_sum(var) / (float)D + TRAIN_LN_EPS);
    if (lane == 0) {
        mean[r] = mu;
        rstd[r] = rs;
    }
    const float *shift = mod + (r / rpi) * stride, *scale = shift + D;
    T *yr = y + r * (size_t)D;
    for (int i = lane; i < D; i += 32)
        yr[i] = from_float<T>((xr[i] - mu) * rs * (1.0f + scale[i]) + shift[i]);
}

/* (x += pos[r % tokens] when pos) then mean, 1/std and
 * y = LN(x) (1 + scale) + shift, the CPU's two-pass statistics. */
template <class T>
__global__ void ln_fwd_kernel(float *x, const float *pos, int tokens, size_t rows, int D,
                              size_t rpi, const float *mod, size_t stride, float *mean,
                              float *rstd, T *y) {
    int lane = threadIdx.x % 32;
    size_t r = blockIdx.x * (size_t)ROWS_PER_BLOCK + threadIdx.x / 32;
    for (; r < rows; r += (size_t)gridDim.x * ROWS_PER_BLOCK) {
        float *xr = x + r * (size_t)D;
        if (pos) {
            const float *pr = pos + (r % (size_t)tokens) * (size_t)D;
            for (int i = lane; i < D; i += 32) xr[i] += pr[i];
        }
        ln_fwd_row<T>(xr, r, D, rpi, mod, stride, mean, rstd, y);
    }
}

template <class T>
lego_status t_ln_fwd(cudaStream_t s, float *x, const float *pos, int tokens, size_t rows, int D,
                     size_t rpi, const float *mod, size_t stride, float *mean, float *rstd, T *y,
                     lego_err *err) {
    LAUNCH(ln_fwd_kernel<T>, blocks_for(rows, ROWS_PER_BLOCK), 32 * ROWS_PER_BLOCK, 0, s)(
        x, pos, tokens, rows, D, rpi, mod, stride, mean, rstd, y);
    LAUNCH_CHECK("ln_fwd");
    return LEGO_OK;
}

/* out = x + gate*y (the gate of image i at gate + i*gstride), then the
 * LayerNorm of out (t_ln_fwd), one warp per row: out is read back from L1
 * instead of from memory by a second kernel. */
template <class T>
__global__ void gated_ln_fwd_kernel(const float *x, const T *yb, size_t rows, int D,
                                    size_t rpi, const float *gate, size_t gstride, float *out,
                                    const float *mod, size_t stride, float *mean, float *rstd,
                                    T *y) {
    int lane = threadIdx.x % 32;
    size_t r = blockIdx.x * (size_t)ROWS_PER_BLOCK + threadIdx.x / 32;
    for (; r < rows; r += (size_t)gridDim.x * ROWS_PER_BLOCK) {
        const float *xr = x + r * (size_t)D, *g = gate + (r / rpi) * gstride;
        const T *br = yb + r * (size_t)D;
        float *orow = out + r * (size_t)D;
        for (int i = lane; i < D; i += 32) orow[i] = xr[i] + g[i] * to_float<T>(br[i]);
        ln_fwd_row<T>(orow, r, D, rpi, mod, stride, mean, rstd, y);
    }
}

template <class T>
lego_status t_gated_ln_fwd(cudaStream_t s, const float *x, const T *yb, size_t rows, int D,
                           size_t rpi, const float *gate, size_t gstride, float *out,
                           const float *mod, size_t stride, float *mean, float *rstd, T *y,
                           lego_err *err) {
    LAUNCH(gated_ln_fwd_kernel<T>, blocks_for(rows, ROWS_PER_BLOCK), 32 * ROWS_PER_BLOCK, 0, s)(
        x, yb, rows, D, rpi, gate, gstride, out, mod, stride, mean, rstd, y);
    LAUNCH_CHECK("gated_ln_fwd");
    return LEGO_OK;
}

/* The two row means of the LayerNorm backward (backward_cpu.c's
 * ln_mod_bwd), one warp per row: of dxh = dy (1 + scale) and of dxh xhat. */
__device__ __forceinline__ void ln_bwd_row_means(const float *xr, const float *dyr,
                                                 const float *scale, float mu, float rs, int D,
                                                 float *m1, float *m2) {
    float s1 = 0, s2 = 0;
    for (int i = threadIdx.x % 32; i < D; i += 32) {
        float dxh = dyr[i] * (1.0f + scale[i]);
        s1 += dxh;
        s2 += dxh * (xr[i] - mu) * rs;
    }
    *m1 = warp_sum(s1) / (float)D;
    *m2 = warp_sum(s2) / (float)D;
}

/* Element i of a row's LayerNorm input gradient from the row means m1, m2
 * (xh the element's normalised input): added to dxr[i] (assign: stored
 * there), and dgr[i] = dx * gate (g NULL: dx) when dgr.  Returns dx. */
template <class T>
__device__ __forceinline__ float ln_bwd_elem(int i, float dy, float xh, float scale, float rs,
                                             float m1, float m2, int assign, float *dxr,
                                             const float *g, T *dgr) {
    float v = rs * (dy * (1.0f + scale) - m1 - xh * m2);
    v = assign ? v : dxr[i] + v;
    dxr[i] = v;
    if (dgr) dgr[i] = from_float<T>(g ? v * g[i] : v);
    return v;
}

/* dx (+)= dL/dx of y = LN(x)(1+scale)+shift given dy (backward_cpu.c's
 * ln_mod_bwd, the row part): added to dx, or stored with `assign` (the
 * first gradient of a row).  With dg, the kernel that would read the new
 * dx next is folded in: dg = dx * gate (the gate of image i at gate +
 * i*gstride; gate NULL: dg = dx) in the operand type. */
template <class T>
__global__ void ln_bwd_kernel(const float *x, const float *mean, const float *rstd,
                              const float *dy, size_t rows, int D, size_t rpi, const float *mod,
                              size_t stride, float *dx, int assign, const float *gate,
                              size_t gstride, T *dg) {
    int lane = threadIdx.x % 32;
    size_t r = blockIdx.x * (size_t)ROWS_PER_BLOCK + threadIdx.x / 32;
    for (; r < rows; r += (size_t)gridDim.x * ROWS_PER_BLOCK) {
        const float *xr = x + r * (size_t)D, *dyr = dy + r * (size_t)D;
        const float *scale = mod + (r / rpi) * stride + D;
        float mu = mean[r], rs = rstd[r], s1, s2;
        ln_bwd_row_means(xr, dyr, scale, mu, rs, D, &s1, &s2);
        float *dxr = dx + r * (size_t)D;
        const float *g = gate ? gate + (r / rpi) * gstride : NULL;
        T *dgr = dg ? dg + r * (size_t)D : NULL;
        for (int i = lane; i < D; i += 32)
            ln_bwd_elem<T>(i, dyr[i], (xr[i] - mu) * rs, scale[i], rs, s1, s2, assign, dxr, g,
                           dgr);
    }
}

template <class T>
lego_status t_ln_bwd(cudaStream_t s, const float *x, const float *mean, const float *rstd,
                     const float *dy, size_t rows, int D, size_t rpi, const float *mod,
                     size_t stride, float *dx, int assign, const float *gate, size_t gstride,
                     T *dg, lego_err *err) {
    LAUNCH(ln_bwd_kernel<T>, blocks_for(rows, ROWS_PER_BLOCK), 32 * ROWS_PER_BLOCK, 0, s)(
        x, mean, rstd, dy, rows, D, rpi, mod, stride, dx, assign, gate, gstride, dg);
    LAUNCH_CHECK("ln_bwd");
    return LEGO_OK;
}

/* t_ln_bwd with the column sums of the rows it reads folded in (see
 * t_ln_bwd_sums): one block of LN_SUM_WARPS warps per chunk of
 * TRAIN_SUM_CHUNK rows of one image, LN_SUM_ROWS consecutive rows per
 * warp.  A lane keeps its columns' sums over its warp's rows in registers
 * (float: eight terms), then the warps' sums are added in warp order, in
 * double, slice by slice through shared memory, into the chunk's entry of
 * the partial sums, which colsum_reduce finishes as t_colsum's. */
#define LN_SUM_WARPS 8
#define LN_SUM_ROWS (TRAIN_SUM_CHUNK / LN_SUM_WARPS)
#define LN_SUM_SLICE 128              /* columns per pass through shared memory */
#define LN_SUM_SMEM (LN_SUM_WARPS * LN_SUM_SLICE * 3 * sizeof(float))

static lego_status colsum_reduce(cudaStream_t s, int mode, double *partial, size_t groups,
                                 size_t chunks, int D, float *out0, float *out1, size_t stride,
                                 lego_err *err);

template <class T, int NC> /* NC: columns per lane, a multiple of 4 */
__global__ void __launch_bounds__(32 * LN_SUM_WARPS)
    ln_bwd_sums_kernel(const float *x, const float *mean, const float *rstd, const float *dy,
                       size_t rpi, size_t chunks, int D, const float *mod, size_t stride,
                       float *dx, int assign, const float *gate, size_t gstride, T *dg,
                       const T *branch, double *part_ln, double *part_gate) {
    DYNAMIC_SMEM(float, slice); /* [warp][column of the slice][sum] */
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    size_t grp = blockIdx.x / chunks, ch = blockIdx.x % chunks;
    size_t first = grp * rpi + ch * TRAIN_SUM_CHUNK, end = first + TRAIN_SUM_CHUNK;
    if (end > (grp + 1) * rpi) end = (grp + 1) * rpi;
    size_t r0 = first + (size_t)warp * LN_SUM_ROWS, r1 = r0 + LN_SUM_ROWS;
    if (r1 > end) r1 = end;
    const float *scale = mod + grp * stride + D;
    const float *g = gate ? gate + grp * gstride : NULL;
    float a0[NC], a1[NC], a2[NC];
#pragma unroll
    for (int k = 0; k < NC; k++) a0[k] = a1[k] = a2[k] = 0.0f;
    for (size_t r = r0; r < r1; r++) {
        const float *xr = x + r * (size_t)D, *dyr = dy + r * (size_t)D;
        float mu = mean[r], rs = rstd[r], s1, s2;
        ln_bwd_row_means(xr, dyr, scale, mu, rs, D, &s1, &s2);
        float *dxr = dx + r * (size_t)D;
        T *dgr = dg ? dg + r * (size_t)D : NULL;
        const T *br = branch ? branch + r * (size_t)D : NULL;
#pragma unroll
        for (int k = 0; k < NC; k++) {
            int i = lane + 32 * k;
            if (i < D) {
                float xh = (xr[i] - mu) * rs;
                float v = ln_bwd_elem<T>(i, dyr[i], xh, scale[i], rs, s1, s2, assign, dxr, g, dgr);
                a0[k] += dyr[i];
                a1[k] += dyr[i] * xh;
                if (br) a2[k] += v * to_float<T>(br[i]);
            }
        }
    }
    size_t base = (grp * chunks + ch) * (size_t)D;
#pragma unroll
    for (int sl = 0; sl < NC / 4; sl++) {
        if (sl * LN_SUM_SLICE >= D) break; /* the same for the whole block */
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            int k = 4 * sl + kk, c = lane + 32 * kk;
            float *at = slice + 3 * (warp * LN_SUM_SLICE + c);
            at[0] = a0[k];
            at[1] = a1[k];
            at[2] = a2[k];
        }
        __syncthreads();
        for (int t = threadIdx.x; t < 3 * LN_SUM_SLICE; t += blockDim.x) {
            int c = t / 3, q = t % 3, col = sl * LN_SUM_SLICE + c;
            if (col >= D || (q == 2 && !part_gate)) continue;
            double sum = 0;
            for (int w = 0; w < LN_SUM_WARPS; w++) sum += slice[3 * (w * LN_SUM_SLICE + c) + q];
            size_t at = 2 * (base + (size_t)col);
            if (q < 2) {
                part_ln[at + (size_t)q] = sum;
            } else {
                part_gate[at] = sum;
                part_gate[at + 1] = 0.0;
            }
        }
        __syncthreads();
    }
}

template <class T>
lego_status t_ln_bwd_sums(cudaStream_t s, const float *x, const float *mean, const float *rstd,
                          const float *dy, size_t rows, int D, size_t rpi, const float *mod,
                          size_t stride, float *dx, int assign, const float *gate,
                          size_t gstride, T *dg, float *dshift, float *dscale, size_t dstride,
                          const T *branch, float *dgate, double *partial, double *partial2,
                          lego_err *err) {
    if (D > LN_SUM_MAX_D || (branch && (!gate || !dgate)))
        return lego_fail(err, LEGO_ERR_BACKEND, "internal: t_ln_bwd_sums of width %d", D);
    size_t groups = rows / rpi, chunks = (rpi + TRAIN_SUM_CHUNK - 1) / TRAIN_SUM_CHUNK;
    /* Registers for the columns the width needs: 100 at 16 per lane. */
    double *part_gate = branch ? partial2 : NULL;
    unsigned grid = (unsigned)(groups * chunks), block = 32 * LN_SUM_WARPS;
    if (D <= 128)
        LAUNCH((ln_bwd_sums_kernel<T, 4>), grid, block, LN_SUM_SMEM, s)(
            x, mean, rstd, dy, rpi, chunks, D, mod, stride, dx, assign, gate, gstride, dg, branch,
            partial, part_gate);
    else if (D <= 256)
        LAUNCH((ln_bwd_sums_kernel<T, 8>), grid, block, LN_SUM_SMEM, s)(
            x, mean, rstd, dy, rpi, chunks, D, mod, stride, dx, assign, gate, gstride, dg, branch,
            partial, part_gate);
    else
        LAUNCH((ln_bwd_sums_kernel<T, LN_SUM_MAX_D / 32>), grid, block, LN_SUM_SMEM, s)(
            x, mean, rstd, dy, rpi, chunks, D, mod, stride, dx, assign, gate, gstride, dg, branch,
            partial, part_gate);
    LAUNCH_CHECK("ln_bwd_sums");
    LEGO_TRY(colsum_reduce(s, COLSUM_LN, partial, groups, chunks, D, dshift, dscale, dstride,
                           err));
    if (branch)
        LEGO_TRY(colsum_reduce(s, COLSUM_PROD, partial2, groups, chunks, D, dgate, NULL,
                               gstride, err));
    return LEGO_OK;
}

/* ---- deterministic column sums ------------------------------------------------ */

/* Per group of `rpi` rows (an image, or all rows), per column c:
 *   COLSUM_PLAIN: out0 += sum a
 *   COLSUM_PROD:  out0 += sum a*b
 *   COLSUM_LN:    out0 += sum a, out1 += sum a*(b - mean)*rstd
 * in double, as the CPU.  Pass 1: one thread per (group, chunk of
 * TRAIN_SUM_CHUNK rows, column) sums its chunk in row order into
 * `partial`; while a group has more than TRAIN_SUM_FAN chunks, a fold
 * pass adds them TRAIN_SUM_FAN at a time, in order, into the other half
 * of `partial`; the last pass, one thread per (group, column), adds what
 * is left in order and adds the total (rounded to float once) to out.
 * A thread's chain of dependent loads stays short: with one thread per
 * column over 1024 chunks (a bias of a 65536-row batch) the last pass
 * alone took a good part of a millisecond on a few multiprocessors. */
template <class TA, class TB>
__global__ void colsum_partial_kernel(int mode, const TA *a, const TB *b, const float *mean,
                                      const float *rstd, size_t groups, size_t rpi, int D,
                                      size_t chunks, double *partial) {
    size_t total = groups * chunks * (size_t)D;
    FOR_EACH(idx, total) {
        int c = (int)(idx % (size_t)D);
        size_t gc = idx / (size_t)D, grp = gc / chunks, ch = gc % chunks;
        size_t r0 = grp * rpi + ch * TRAIN_SUM_CHUNK, r1 = r0 + TRAIN_SUM_CHUNK;
        if (r1 > (grp + 1) * rpi) r1 = (grp + 1) * rpi;
        double s0 = 0, s1 = 0;
        for (size_t r = r0; r < r1; r++) {
            size_t k = r * (size_t)D + (size_t)c;
            double av = to_float<TA>(a[k]);
            if (mode == COLSUM_PLAIN) {
                s0 += av;
            } else if (mode == COLSUM_PROD) {
                s0 += av * (double)to_float<TB>(b[k]);
            } else {
                s0 += av;
                s1 += av * (double)((to_float<TB>(b[k]) - mean[r]) * rstd[r]);
            }
        }
        partial[2 * idx] = s0;
        partial[2 * idx + 1] = s1;
    }
}

__global__ void colsum_fold_kernel(const double *in, size_t groups, size_t chunks, int D,
                                   size_t folded, double *out) {
    size_t total = groups * folded * (size_t)D;
    FOR_EACH(idx, total) {
        int c = (int)(idx % (size_t)D);
        size_t gf = idx / (size_t)D, grp = gf / folded, f = gf % folded;
        size_t ch1 = (f + 1) * TRAIN_SUM_FAN < chunks ? (f + 1) * TRAIN_SUM_FAN : chunks;
        double s0 = 0, s1 = 0;
        for (size_t ch = f * TRAIN_SUM_FAN; ch < ch1; ch++) {
            size_t k = (grp * chunks + ch) * (size_t)D + (size_t)c;
            s0 += in[2 * k];
            s1 += in[2 * k + 1];
        }
        out[2 * idx] = s0;
        out[2 * idx + 1] = s1;
    }
}

__global__ void colsum_finish_kernel(int mode, const double *partial, size_t groups, int D,
                                     size_t chunks, float *out0, float *out1, size_t stride) {
    size_t total = groups * (size_t)D;
    FOR_EACH(idx, total) {
        int c = (int)(idx % (size_t)D);
        size_t grp = idx / (size_t)D;
        double s0 = 0, s1 = 0;
        for (size_t ch = 0; ch < chunks; ch++) {
            size_t k = (grp * chunks + ch) * (size_t)D + (size_t)c;
            s0 += partial[2 * k];
            s1 += partial[2 * k + 1];
        }
        out0[grp * stride + (size_t)c] += (float)s0;
        if (mode == COLSUM_LN) out1[grp * stride + (size_t)c] += (float)s1;
    }
}

/* The passes after the first: the chunk sums in `partial` (pairs, [group]
 * [chunk][column]) folded and added to out0 (and out1 for COLSUM_LN). */
static lego_status colsum_reduce(cudaStream_t s, int mode, double *partial, size_t groups,
                                 size_t chunks, int D, float *out0, float *out1, size_t stride,
                                 lego_err *err) {
    /* Ping-pong between the first-pass half and the rest of `partial`. */
    double *cur = partial, *spare = partial + 2 * groups * chunks * (size_t)D;
    while (chunks > TRAIN_SUM_FAN) {
        size_t folded = (chunks + TRAIN_SUM_FAN - 1) / TRAIN_SUM_FAN;
        LAUNCH(colsum_fold_kernel, ew_blocks(groups * folded * (size_t)D), EW_THREADS, 0, s)(
            cur, groups, chunks, D, folded, spare);
        LAUNCH_CHECK("colsum_fold");
        double *t = cur;
        cur = spare;
        spare = t;
        chunks = folded;
    }
    LAUNCH(colsum_finish_kernel, ew_blocks(groups * (size_t)D), EW_THREADS, 0, s)(
        mode, cur, groups, D, chunks, out0, out1, stride);
    LAUNCH_CHECK("colsum_finish");
    return LEGO_OK;
}

template <class TA, class TB>
lego_status t_colsum(cudaStream_t s, int mode, const TA *a, const TB *b, const float *mean,
                     const float *rstd, size_t rows, size_t rpi, int D, float *out0, float *out1,
                     size_t stride, double *partial, lego_err *err) {
    size_t groups = rows / rpi, chunks = (rpi + TRAIN_SUM_CHUNK - 1) / TRAIN_SUM_CHUNK;
    LAUNCH((colsum_partial_kernel<TA, TB>), ew_blocks(groups * chunks * (size_t)D), EW_THREADS, 0,
           s)(mode, a, b, mean, rstd, groups, rpi, D, chunks, partial);
    LAUNCH_CHECK("colsum_partial");
    return colsum_reduce(s, mode, partial, groups, chunks, D, out0, out1, stride, err);
}

/* The first pass's partial sums, then room for the second's (the later
 * ones fit in the first's room again). */
size_t t_colsum_doubles(size_t rows, size_t rpi, int D) {
    size_t groups = rows / rpi, chunks = (rpi + TRAIN_SUM_CHUNK - 1) / TRAIN_SUM_CHUNK;
    size_t folded = chunks > TRAIN_SUM_FAN ? (chunks + TRAIN_SUM_FAN - 1) / TRAIN_SUM_FAN : 0;
    return 2 * groups * (chunks + folded) * (size_t)D;
}

/* ---- attention ----------------------------------------------------------------- */

/* G lanes per (row, head) work item, 32/G items per warp: lane `sub` of a
 * group holds elements sub, sub+G, ... of the head's vectors (at most
 * ATTN_LANE_REGS each), dot products are reduced over the group by
 * log2(G) shuffles.  G is the smallest power of two that keeps
 * ceil(head_dim/G) <= ATTN_LANE_REGS: head_dim 64 takes groups of 4, so a
 * warp works on 8 rows at once and each shuffle serves 16 products.  All
 * lanes of a warp run the same loops (rows past the end are clamped and
 * write nothing), as the full-mask shuffles require. */
#define ATTN_LANE_REGS 16

template <int G> __device__ __forceinline__ float group_sum(float v) {
    for (int o = G / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

/* Work item w = (seq, head, i) of `items`. */
__device__ __forceinline__ void attn_coords(size_t w, int T, int heads, size_t *seq, int *head,
                                            int *i) {
    *i = (int)(w % (size_t)T);
    *head = (int)((w / (size_t)T) % (size_t)heads);
    *seq = w / ((size_t)T * heads);
}

/* Work items go to warps in batches of 32/G, so that every lane of a warp
 * runs the same loops: the first batch of this warp and the stride. */
template <int G> __device__ __forceinline__ size_t attn_first(void) {
    return (blockIdx.x * (size_t)(blockDim.x / 32) + threadIdx.x / 32) * (size_t)(32 / G);
}
template <int G> __device__ __forceinline__ size_t attn_stride(void) {
    return (size_t)gridDim.x * (blockDim.x / 32) * (size_t)(32 / G);
}

/* This lane's work item in `batch`.  Past the end it is clamped to the
 * last item: it computes, as the full-mask shuffles need, and writes
 * nothing (*valid false). */
template <int G>
__device__ __forceinline__ size_t attn_lane_item(size_t batch, size_t items, bool *valid) {
    size_t w = batch + (threadIdx.x % 32) / G;
    *valid = w < items;
    return *valid ? w : items - 1;
}

/* out = softmax(q k^T / sqrt(hd)) v with an online softmax, and the row's
 * log-sum-exp of the scaled scores (what the backward pass recomputes the
 * probabilities from). */
template <class T, int G>
__global__ void attn_fwd_kernel(const T *qkv, size_t items, int Tn, int heads, int hd, float scale,
                                T *out, float *lse) {
    int sub = threadIdx.x % G; /* elements sub + G c, c < ATTN_LANE_REGS */
    size_t D = (size_t)heads * hd, D3 = 3 * D;
    for (size_t batch = attn_first<G>(); batch < items; batch += attn_stride<G>()) {
        bool valid;
        size_t seq;
        int head, i;
        attn_coords(attn_lane_item<G>(batch, items, &valid), Tn, heads, &seq, &head, &i);
        const T *base = qkv + seq * (size_t)Tn * D3 + (size_t)head * hd;
        float q[ATTN_LANE_REGS], o[ATTN_LANE_REGS];
        #pragma unroll
        for (int c = 0; c < ATTN_LANE_REGS; c++) { /* c >= hc: e >= hd, skipped */
            int e = sub + G * c;
            q[c] = e < hd ? to_float<T>(base[(size_t)i * D3 + e]) : 0.0f;
            o[c] = 0.0f;
        }
        float mx = -INFINITY, l = 0.0f;
        for (int j = 0; j < Tn; j++) {
            const T *k = base + (size_t)j * D3 + D, *v = base + (size_t)j * D3 + 2 * D;
            float dot = 0.0f;
            #pragma unroll
            for (int c = 0; c < ATTN_LANE_REGS; c++) { /* c >= hc: e >= hd, skipped */
                int e = sub + G * c;
                if (e < hd) dot += q[c] * to_float<T>(k[e]);
            }
            float sc = group_sum<G>(dot) * scale;
            float mnew = fmaxf(mx, sc), alpha = expf(mx - mnew), p = expf(sc - mnew);
            l = l * alpha + p;
            #pragma unroll
            for (int c = 0; c < ATTN_LANE_REGS; c++) { /* c >= hc: e >= hd, skipped */
                int e = sub + G * c;
                if (e < hd) o[c] = o[c] * alpha + p * to_float<T>(v[e]);
            }
            mx = mnew;
        }
        if (!valid) continue;
        float inv = 1.0f / l;
        T *orow = out + (seq * (size_t)Tn + (size_t)i) * D + (size_t)head * hd;
        #pragma unroll
        for (int c = 0; c < ATTN_LANE_REGS; c++) { /* c >= hc: e >= hd, skipped */
            int e = sub + G * c;
            if (e < hd) orow[e] = from_float<T>(o[c] * inv);
        }
        if (sub == 0) lse[(seq * (size_t)Tn + (size_t)i) * heads + (size_t)head] = mx + logf(l);
    }
}

/* delta[row][head] = dout . out over the head's elements; with dout_t,
 * dout in the operand type too (the flash and GEMM backward read it so). */
template <class T, int G>
__global__ void attn_delta_kernel(const float *dout, const T *out, size_t items, int heads, int hd,
                                  float *delta, T *dout_t) {
    int sub = threadIdx.x % G;
    size_t D = (size_t)heads * hd;
    for (size_t batch = attn_first<G>(); batch < items; batch += attn_stride<G>()) {
        bool valid;
        size_t w = attn_lane_item<G>(batch, items, &valid);
        size_t row = w / (size_t)heads, head = w % (size_t)heads;
        const float *g = dout + row * D + head * (size_t)hd;
        const T *o = out + row * D + head * (size_t)hd;
        T *gt = dout_t && valid ? dout_t + row * D + head * (size_t)hd : NULL;
        float s = 0.0f;
        for (int e = sub; e < hd; e += G) {
            s += g[e] * to_float<T>(o[e]);
            if (gt) gt[e] = from_float<T>(g[e]);
        }
        s = group_sum<G>(s);
        if (valid && sub == 0) delta[w] = s;
    }
}

/* dq for one query row (queries = 1), or dk and dv for one key row
 * (queries = 0): P and dP recomputed from q, k, v and the log-sum-exp;
 * dS = P (dP - delta); dq = scale sum_j dS k_j, dk = scale sum_i dS q_i,
 * dv = sum_i P dout_i.  Each row's sums run in a fixed order: no atomics. */
template <class T, int G>
__global__ void attn_bwd_kernel(const T *qkv, const float *dout, const float *lse,
                                const float *delta, size_t items, int Tn, int heads, int hd,
                                float scale, int queries, T *dqkv) {
    int sub = threadIdx.x % G; /* elements sub + G c, c < ATTN_LANE_REGS */
    size_t D = (size_t)heads * hd, D3 = 3 * D;
    for (size_t batch = attn_first<G>(); batch < items; batch += attn_stride<G>()) {
        bool valid;
        size_t seq;
        int head, me;
        attn_coords(attn_lane_item<G>(batch, items, &valid), Tn, heads, &seq, &head, &me);
        const T *base = qkv + seq * (size_t)Tn * D3 + (size_t)head * hd;
        const float *gbase = dout + seq * (size_t)Tn * D + (size_t)head * hd;
        size_t rbase = seq * (size_t)Tn;
        float a[ATTN_LANE_REGS], b[ATTN_LANE_REGS], acc0[ATTN_LANE_REGS], acc1[ATTN_LANE_REGS];
        #pragma unroll
        for (int c = 0; c < ATTN_LANE_REGS; c++) { /* c >= hc: e >= hd, skipped */
            int e = sub + G * c;
            acc0[c] = acc1[c] = 0.0f;
            if (e >= hd) {
                a[c] = b[c] = 0.0f;
            } else if (queries) { /* q_i and dout_i */
                a[c] = to_float<T>(base[(size_t)me * D3 + e]);
                b[c] = gbase[(size_t)me * D + e];
            } else { /* k_j and v_j */
                a[c] = to_float<T>(base[(size_t)me * D3 + D + e]);
                b[c] = to_float<T>(base[(size_t)me * D3 + 2 * D + e]);
            }
        }
        for (int o = 0; o < Tn; o++) {
            int qi = queries ? me : o, kj = queries ? o : me;
            float s = 0.0f, dp = 0.0f;
            #pragma unroll
            for (int c = 0; c < ATTN_LANE_REGS; c++) { /* c >= hc: e >= hd, skipped */
                int e = sub + G * c;
                if (e >= hd) continue;
                if (queries) {
                    s += a[c] * to_float<T>(base[(size_t)kj * D3 + D + e]);
                    dp += b[c] * to_float<T>(base[(size_t)kj * D3 + 2 * D + e]);
                } else {
                    s += to_float<T>(base[(size_t)qi * D3 + e]) * a[c];
                    dp += gbase[(size_t)qi * D + e] * b[c];
                }
            }
            s = group_sum<G>(s);
            dp = group_sum<G>(dp);
            size_t lrow = (rbase + (size_t)qi) * heads + (size_t)head;
            float p = expf(s * scale - lse[lrow]);
            float ds = p * (dp - delta[lrow]) * scale;
            #pragma unroll
            for (int c = 0; c < ATTN_LANE_REGS; c++) { /* c >= hc: e >= hd, skipped */
                int e = sub + G * c;
                if (e >= hd) continue;
                if (queries) {
                    acc0[c] += ds * to_float<T>(base[(size_t)kj * D3 + D + e]);
                } else {
                    acc0[c] += ds * to_float<T>(base[(size_t)qi * D3 + e]);
                    acc1[c] += p * gbase[(size_t)qi * D + e];
                }
            }
        }
        if (!valid) continue;
        T *drow = dqkv + (rbase + (size_t)me) * D3 + (size_t)head * hd;
        #pragma unroll
        for (int c = 0; c < ATTN_LANE_REGS; c++) { /* c >= hc: e >= hd, skipped */
            int e = sub + G * c;
            if (e >= hd) continue;
            if (queries) {
                drow[e] = from_float<T>(acc0[c]);
            } else {
                drow[D + e] = from_float<T>(acc0[c]);
                drow[2 * D + e] = from_float<T>(acc1[c]);
            }
        }
    }
}

/* The GEMM formulation (train.cu): S = scale Q K^T for a chunk of
 * sequences of one head comes from cuBLASLt as [rows][Tn] fp32; one warp
 * per row makes P = softmax(S) (type T, the P V GEMM's operand) and the
 * row's log-sum-exp, lse[(row0 + r) heads + head]. */
template <class T>
__global__ void softmax_rows_kernel(const float *S, size_t rows, int Tn, int heads, int head,
                                    size_t row0, T *P, float *lse) {
    int lane = threadIdx.x % 32;
    size_t r = blockIdx.x * (size_t)ROWS_PER_BLOCK + threadIdx.x / 32;
    for (; r < rows; r += (size_t)gridDim.x * ROWS_PER_BLOCK) {
        const float *sr = S + r * (size_t)Tn;
        float mx = -INFINITY, sum = 0.0f;
        for (int j = lane; j < Tn; j += 32) mx = fmaxf(mx, sr[j]);
        mx = warp_max(mx);
        for (int j = lane; j < Tn; j += 32) sum += expf(sr[j] - mx);
        float l = mx + logf(warp_sum(sum));
        if (lane == 0) lse[(row0 + r) * (size_t)heads + (size_t)head] = l;
        T *pr = P + r * (size_t)Tn;
        for (int j = lane; j < Tn; j += 32) pr[j] = from_float<T>(expf(sr[j] - l));
    }
}

template <class T>
lego_status t_softmax_rows(cudaStream_t s, const float *S, size_t rows, int Tn, int heads,
                           int head, size_t row0, T *P, float *lse, lego_err *err) {
    LAUNCH(softmax_rows_kernel<T>, blocks_for(rows, ROWS_PER_BLOCK), 32 * ROWS_PER_BLOCK, 0, s)(
        S, rows, Tn, heads, head, row0, P, lse);
    LAUNCH_CHECK("softmax_rows");
    return LEGO_OK;
}

/* Backward, element-wise over [rows][Tn]: P = exp(S - lse) recomputed as
 * the forward made it; with dP (ds != 0) dS = P (dP - delta) scale
 * instead.  Output of type T (the next GEMMs' operand). */
template <class T>
__global__ void attn_probs_kernel(const float *S, const float *dP, size_t rows, int Tn,
                                  int heads, int head, size_t row0, const float *lse,
                                  const float *delta, float scale, T *out) {
    size_t total = rows * (size_t)Tn;
    FOR_EACH(idx, total) {
        size_t g = (row0 + idx / (size_t)Tn) * (size_t)heads + (size_t)head;
        float p = expf(S[idx] - lse[g]);
        out[idx] = from_float<T>(dP ? p * (dP[idx] - delta[g]) * scale : p);
    }
}

template <class T>
lego_status t_attn_probs(cudaStream_t s, const float *S, const float *dP, size_t rows, int Tn,
                         int heads, int head, size_t row0, const float *lse, const float *delta,
                         float scale, T *out, lego_err *err) {
    LAUNCH(attn_probs_kernel<T>, ew_blocks(rows * (size_t)Tn), EW_THREADS, 0, s)(
        S, dP, rows, Tn, heads, head, row0, lse, delta, scale, out);
    LAUNCH_CHECK("attn_probs");
    return LEGO_OK;
}

template <class T>
lego_status t_attn_delta(cudaStream_t s, const float *dout, const T *out, size_t rows, int heads,
                         int hd, float *delta, T *dout_t, lego_err *err);

#define ATTN_WARPS 4 /* warps per block */

/* Lanes per work item for a head size (see ATTN_LANE_REGS). */
static int attn_group(int hd) {
    int g = 1;
    while ((hd + g - 1) / g > ATTN_LANE_REGS) g *= 2;
    return g;
}

static unsigned attn_blocks(size_t items, int g) {
    return blocks_for((items + (size_t)(32 / g) - 1) / (size_t)(32 / g), ATTN_WARPS);
}

/* Launch kernel<T, G> for the G that head_dim hd needs. */
#define ATTN_DISPATCH(kernel, T, hd, items, ...)                                              \
    do {                                                                                      \
        int g_ = attn_group(hd);                                                              \
        unsigned nb_ = attn_blocks(items, g_);                                                \
        switch (g_) {                                                                         \
        case 1: LAUNCH((kernel<T, 1>), nb_, 32 * ATTN_WARPS, 0, s)(__VA_ARGS__); break;       \
        case 2: LAUNCH((kernel<T, 2>), nb_, 32 * ATTN_WARPS, 0, s)(__VA_ARGS__); break;       \
        case 4: LAUNCH((kernel<T, 4>), nb_, 32 * ATTN_WARPS, 0, s)(__VA_ARGS__); break;       \
        case 8: LAUNCH((kernel<T, 8>), nb_, 32 * ATTN_WARPS, 0, s)(__VA_ARGS__); break;       \
        case 16: LAUNCH((kernel<T, 16>), nb_, 32 * ATTN_WARPS, 0, s)(__VA_ARGS__); break;     \
        default: return lego_fail(err, LEGO_ERR_UNSUPPORTED, "head dimension %d", hd);       \
        }                                                                                     \
    } while (0)

template <class T>
lego_status t_attn_fwd(cudaStream_t s, const T *qkv, size_t seqs, int tokens, int heads, int hd,
                       T *out, float *lse, lego_err *err) {
    size_t items = seqs * (size_t)heads * tokens;
    float scale = 1.0f / sqrtf((float)hd);
    ATTN_DISPATCH(attn_fwd_kernel, T, hd, items, qkv, items, tokens, heads, hd, scale, out, lse);
    LAUNCH_CHECK("attn_fwd");
    return LEGO_OK;
}

template <class T>
lego_status t_attn_delta(cudaStream_t s, const float *dout, const T *out, size_t rows, int heads,
                         int hd, float *delta, T *dout_t, lego_err *err) {
    size_t items = rows * (size_t)heads;
    ATTN_DISPATCH(attn_delta_kernel, T, hd, items, dout, out, items, heads, hd, delta, dout_t);
    LAUNCH_CHECK("attn_delta");
    return LEGO_OK;
}

template <class T>
lego_status t_attn_bwd(cudaStream_t s, const T *qkv, const T *out, const float *lse,
                       const float *dout, size_t seqs, int tokens, int heads, int hd,
                       float *delta, T *dqkv, lego_err *err) {
    size_t rows = seqs * (size_t)tokens, items = rows * (size_t)heads;
    float scale = 1.0f / sqrtf((float)hd);
    LEGO_TRY(t_attn_delta<T>(s, dout, out, rows, heads, hd, delta, (T *)NULL, err));
    for (int queries = 1; queries >= 0; queries--) {
        ATTN_DISPATCH(attn_bwd_kernel, T, hd, items, qkv, dout, lse, delta, items, tokens, heads,
                      hd, scale, queries, dqkv);
        LAUNCH_CHECK("attn_bwd");
    }
    return LEGO_OK;
}

/* ---- the loss ----------------------------------------------------------------------- */

#define LOSS_THREADS 256

/* One block per (brick k, image i): diff = c_skip x + c_out F - y,
 * dF = dscale diff, and the image's sum of diff^2 (double, a fixed tree)
 * into sums[k n + i].  coef per image: c_in, c_skip, c_out, dscale.  A
 * brick on sampled patches (train.c's brick_image_loss): only their pixels,
 * dF = (scale dscale) diff there and 0 elsewhere; the host scales the sum. */
__global__ void loss_kernel(const float *x, const float *y, const float *F, const float *coef,
                            int n, int C, int w, size_t chw, train_loss_tables tb, float *dF,
                            double *sums) {
    DYNAMIC_SMEM(double, red);
    size_t ki = blockIdx.x, i = ki % (size_t)n, k = ki / (size_t)n;
    const float *xi = x + i * chw, *yi = y + i * chw, *f = F + ki * chw;
    float *df = dF + ki * chw;
    float c_skip = coef[TRAIN_COEF * i + 1], c_out = coef[TRAIN_COEF * i + 2];
    float dscale = coef[TRAIN_COEF * i + 3];
    double sum = 0;
    const int32_t *table = tb.table[k];
    if (!table) {
        for (size_t j = threadIdx.x; j < chw; j += blockDim.x) {
            float diff = __fadd_rn(__fadd_rn(__fmul_rn(c_skip, xi[j]), __fmul_rn(c_out, f[j])),
                                   -yi[j]);
            sum += (double)diff * diff;
            df[j] = __fmul_rn(dscale, diff);
        }
    } else {
        for (size_t j = threadIdx.x; j < chw; j += blockDim.x) df[j] = 0.0f;
        __syncthreads();
        int used = tb.used[k], bs = tb.bs[k], px = tb.patches_x[k];
        size_t per = (size_t)C * bs * bs, plane = chw / (size_t)C;
        float sds = __fmul_rn(tb.scale[k], dscale);
        for (size_t idx = threadIdx.x; idx < (size_t)used * per; idx += blockDim.x) {
            int slot = (int)(idx / per), rem = (int)(idx % per);
            int ch = rem / (bs * bs), r = (rem / bs) % bs, q = rem % bs;
            int patch = table[i * (size_t)used + (size_t)slot];
            size_t j = (size_t)ch * plane + (size_t)(patch / px * bs + r) * w +
                       (size_t)(patch % px * bs + q);
            float diff = __fadd_rn(__fadd_rn(__fmul_rn(c_skip, xi[j]), __fmul_rn(c_out, f[j])),
                                   -yi[j]);
            sum += (double)diff * diff;
            df[j] = __fmul_rn(sds, diff);
        }
    }
    red[threadIdx.x] = sum;
    __syncthreads();
    for (unsigned o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) red[threadIdx.x] += red[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) sums[ki] = red[0];
}

lego_status t_loss(cudaStream_t s, const float *x, const float *y, const float *F,
                   const float *coef, int n, int K, int C, int w, size_t chw,
                   const train_loss_tables *tb, float *dF, double *sums, lego_err *err) {
    LAUNCH(loss_kernel, (size_t)n * K, LOSS_THREADS, LOSS_THREADS * sizeof(double), s)(
        x, y, F, coef, n, C, w, chw, *tb, dF, sums);
    LAUNCH_CHECK("loss");
    return LEGO_OK;
}

/* fill = a y - b noise per image in double (train.c's clean-image context
 * of patch sampling), ab = {a, b} per image. */
__global__ void fill_kernel(const float *y, const float *noise, const double *ab, size_t chw,
                            size_t total, float *fill) {
    FOR_EACH(q, total) {
        size_t i = q / chw;
        fill[q] = (float)(ab[2 * i] * y[q] - ab[2 * i + 1] * noise[q]);
    }
}

lego_status t_fill(cudaStream_t s, const float *y, const float *noise, const double *ab, int n,
                   size_t chw, float *fill, lego_err *err) {
    size_t total = (size_t)n * chw;
    LAUNCH(fill_kernel, ew_blocks(total), EW_THREADS, 0, s)(y, noise, ab, chw, total, fill);
    LAUNCH_CHECK("fill");
    return LEGO_OK;
}

__global__ void copy_kernel(const float *src, size_t n, float *dst) {
    FOR_EACH(i, n) dst[i] = src[i];
}

lego_status t_copy(cudaStream_t s, const float *src, size_t n, float *dst, lego_err *err) {
    LAUNCH(copy_kernel, ew_blocks(n), EW_THREADS, 0, s)(src, n, dst);
    LAUNCH_CHECK("copy");
    return LEGO_OK;
}

/* ---- the optimiser -------------------------------------------------------------- */

/* Sum of squares of g in double: NORM_BLOCKS blocks, each over a fixed
 * stride of elements, a fixed tree per block, then one block over the
 * block sums in order. */
__global__ void sumsq_kernel(const float *g, size_t n, double *partial) {
    DYNAMIC_SMEM(double, red);
    double s = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        s += (double)g[i] * g[i];
    red[threadIdx.x] = s;
    __syncthreads();
    for (unsigned o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) red[threadIdx.x] += red[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = red[0];
}

__global__ void sum_partials_kernel(const double *partial, int count, double *out) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    double s = 0;
    for (int i = 0; i < count; i++) s += partial[i];
    *out = s;
}

lego_status t_sumsq(cudaStream_t s, const float *g, size_t n, double *partial, double *out,
                    lego_err *err) {
    LAUNCH(sumsq_kernel, TRAIN_NORM_BLOCKS, LOSS_THREADS, LOSS_THREADS * sizeof(double), s)(
        g, n, partial);
    LAUNCH_CHECK("sumsq");
    LAUNCH(sum_partials_kernel, 1, 32, 0, s)(partial, TRAIN_NORM_BLOCKS, out);
    LAUNCH_CHECK("sum_partials");
    return LEGO_OK;
}

/* Adam or AdamW on every value whose mask is set (train.c: adam_update),
 * then the EMA on every value (train.c: ema_update). */
__global__ void adam_kernel(float *w, const float *g, float *mm, float *vv, float *ema,
                            const unsigned char *mask, size_t n, train_adam a) {
    FOR_EACH(j, n) {
        if (mask[j]) {
            double wj = w[j], gj = (double)g[j] * a.gscale;
            if (a.adamw) wj -= a.lr * a.weight_decay * wj;
            else gj += a.weight_decay * wj;
            double mj = a.beta1 * mm[j] + (1.0 - a.beta1) * gj;
            double vj = a.beta2 * vv[j] + (1.0 - a.beta2) * gj * gj;
            mm[j] = (float)mj;
            vv[j] = (float)vj;
            w[j] = (float)(wj - a.step_size * mj / (sqrt(vj) / a.sqrt_bc2 + a.eps));
        }
        float wv = w[j];
        ema[j] = __fadd_rn(wv, __fmul_rn(a.ema_beta, __fadd_rn(ema[j], -wv)));
    }
}

lego_status t_adam(cudaStream_t s, float *w, const float *g, float *mm, float *vv, float *ema,
                   const unsigned char *mask, size_t n, const train_adam *a, lego_err *err) {
    LAUNCH(adam_kernel, ew_blocks(n), EW_THREADS, 0, s)(w, g, mm, vv, ema, mask, n, *a);
    LAUNCH_CHECK("adam");
    return LEGO_OK;
}

/* ---- instantiations ------------------------------------------------------------------ */

#define TRAIN_INSTANTIATE(T)                                                                  \
    template lego_status t_gelu<T>(cudaStream_t, const T *, size_t, T *, lego_err *);         \
    template lego_status t_gelu_bwd<T>(cudaStream_t, const T *, const T *, size_t, T *,       \
                                       lego_err *);                                           \
    template lego_status t_image_to_rows<T>(cudaStream_t, const tok_geom *, const int32_t *,  \
                                            const float *, T *, lego_err *);                  \
    template lego_status t_ln_fwd<T>(cudaStream_t, float *, const float *, int, size_t, int,  \
                                     size_t, const float *, size_t, float *, float *, T *,    \
                                     lego_err *);                                             \
    template lego_status t_ln_bwd<T>(cudaStream_t, const float *, const float *, const float *, \
                                     const float *, size_t, int, size_t, const float *, size_t, \
                                     float *, int, const float *, size_t, T *, lego_err *);     \
    template lego_status t_ln_bwd_sums<T>(cudaStream_t, const float *, const float *,         \
                                          const float *, const float *, size_t, int, size_t,  \
                                          const float *, size_t, float *, int, const float *, \
                                          size_t, T *, float *, float *, size_t, const T *,   \
                                          float *, double *, double *, lego_err *);           \
    template lego_status t_gated_ln_fwd<T>(cudaStream_t, const float *, const T *, size_t,      \
                                           int, size_t, const float *, size_t, float *,         \
                                           const float *, size_t, float *, float *, T *,        \
                                           lego_err *);                                         \
    template lego_status t_colsum<T, float>(cudaStream_t, int, const T *, const float *,      \
                                            const float *, const float *, size_t, size_t, int, \
                                            float *, float *, size_t, double *, lego_err *);   \
    template lego_status t_attn_fwd<T>(cudaStream_t, const T *, size_t, int, int, int, T *,   \
                                       float *, lego_err *);                                  \
    template lego_status t_attn_bwd<T>(cudaStream_t, const T *, const T *, const float *,     \
                                       const float *, size_t, int, int, int, float *, T *,    \
                                       lego_err *);                                           \
    template lego_status t_attn_delta<T>(cudaStream_t, const float *, const T *, size_t, int, \
                                         int, float *, T *, lego_err *);                           \
    template lego_status t_softmax_rows<T>(cudaStream_t, const float *, size_t, int, int, int,\
                                           size_t, T *, float *, lego_err *);                 \
    template lego_status t_attn_probs<T>(cudaStream_t, const float *, const float *, size_t,  \
                                         int, int, int, size_t, const float *, const float *, \
                                         float, T *, lego_err *);

TRAIN_INSTANTIATE(float)
TRAIN_INSTANTIATE(bf16)
/* Sums of dx times a bf16 branch output (the gates' gradients). */
template lego_status t_colsum<float, bf16>(cudaStream_t, int, const float *, const bf16 *,
                                           const float *, const float *, size_t, size_t, int,
                                           float *, float *, size_t, double *, lego_err *);
