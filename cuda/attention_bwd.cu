/*
 * attention_bwd.cu -- the backward pass of multi-head self-attention on the
 * tensor cores, for training in bf16/fp16 (train.cu).  With S = scale QK^T,
 * P = softmax(S) (recomputed from the forward's log-sum-exp per row),
 * dO the gradient of the output and delta = rowsum(dO o O):
 *
 *   dV = P^T dO,  dP = dO V^T,  dS = P o (dP - delta),
 *   dK = scale dS^T Q,  dQ = scale dS K.
 *
 * Nothing of size tokens x tokens leaves the multiprocessor, where the
 * GEMM formulation writes S, P and dP to memory and reads them back (some
 * 2 GB per block of a 256-token brick at batch 256).  Two kernels, so that
 * every gradient row is summed by one warp in a fixed order (no atomics:
 * a run is bitwise repeatable):
 *
 *  - attn_bwd_dkdv_kernel: a block of BW_WARPS warps owns BW_ROWS keys of
 *    one (sequence, head), a warp 16; queries and dO stream through shared
 *    memory in tiles of BW_TILE.  Per tile the warp makes S^T = K Q^T, P^T,
 *    dV += P^T dO, dP^T = V dO^T, dS^T, dK += dS^T Q, all in registers.
 *  - attn_bwd_dq_kernel: the mirror image, BW_ROWS queries per block and
 *    the keys and values streamed: S, P, dP = dO V^T, dS, dQ += dS K.
 *
 * Each recomputes S (and dP): 7 products of a tile instead of FlashAttention-
 * 2's 5, cheap at these lengths.  Fragment layouts and the accumulator-to-A
 * re-packing are attention.cu's forward kernel's (mma.m16n8k16, cuda_internal.h);
 * P and dS are rounded to the operand type before their products, as the
 * GEMM formulation rounds them, everything else is fp32.  head_dim is padded
 * to HDP, a multiple of 16, with zero columns (cp.async zero-fill), which
 * add nothing to any product.
 */
#include <limits.h>
#include <math.h>

#include "cuda_internal.h"
#include "mma_tile.h"

#define BW_WARPS 4
#define BW_ROWS (16 * BW_WARPS) /* keys (dK, dV) or queries (dQ) per block */
#define BW_TILE 64              /* queries or keys per streamed tile      */
#define LOG2E 1.4426950408889634f

/* Shared memory of both kernels: the block's own rows of two operands
 * [2][BW_ROWS][LD], two stages of the streamed pair [2][2][BW_TILE][LD],
 * then the tile's log-sum-exp and delta (dK/dV only). */
static size_t bwd_bytes(int hdp) {
    return (size_t)(2 * BW_ROWS + 4 * BW_TILE) * (hdp + MMA_PAD) * 2 + 2 * BW_TILE * sizeof(float);
}

/* The warp's 16 rows of a [rows][LD] tile as A fragments. */
template <class TT, int HDP>
__device__ __forceinline__ void load_a(uint32_t fa[HDP / 16][4], const TT *rows, int LD) {
    const int lane = threadIdx.x % 32, lm = lane / 8, lr = lane % 8;
    const TT *r = rows + ((lm % 2) * 8 + lr) * LD + (lm / 2) * 8;
#pragma unroll
    for (int kk = 0; kk < HDP / 16; kk++) ldmatrix_x4(fa[kk], r + kk * 16);
}

/* Rows t and t + 8 of the warp's accumulators (16 x HDP) into columns
 * `col` of the [rows][ld] matrix `dst`, times `mul`, rows past T skipped. */
template <class TT, int HDP>
__device__ __forceinline__ void store_rows(const float acc[HDP / 8][4], float mul, TT *dst,
                                           size_t ld, int t, int T, int hd) {
    const int q4 = (threadIdx.x % 32) % 4;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        if (t + 8 * h >= T) continue;
        TT *row = dst + (size_t)(t + 8 * h) * ld;
#pragma unroll
        for (int dt = 0; dt < HDP / 8; dt++) {
            int d = dt * 8 + 2 * q4;
            if (d < hd)
                *(uint32_t *)(row + d) = pack2<TT>(acc[dt][2 * h] * mul, acc[dt][2 * h + 1] * mul);
        }
    }
}

/* A block's (sequence, head) and its own BW_ROWS rows: blocks run
 * sequence-major, then head, then row block. */
template <class TT> struct bwd_job {
    size_t row0;   /* the sequence's first row         */
    size_t stride; /* qkv's row stride, 3D             */
    int head, D;
    int r0;        /* the block's first own row (key or query) */
    const TT *base, *gbase; /* the head's columns of qkv and of dO at row0 */
};

template <class TT>
__device__ __forceinline__ bwd_job<TT> bwd_job_of(const TT *qkv, const TT *dO, int T, int heads,
                                                  int hd, int rblocks) {
    bwd_job<TT> j;
    const size_t job = blockIdx.x / (unsigned)rblocks, seq = job / (size_t)heads;
    j.r0 = (int)(blockIdx.x % (unsigned)rblocks) * BW_ROWS;
    j.head = (int)(job % (size_t)heads);
    j.D = heads * hd;
    j.stride = 3 * (size_t)j.D;
    j.row0 = seq * (size_t)T;
    j.base = qkv + j.row0 * j.stride + (size_t)j.head * hd;
    j.gbase = dO + j.row0 * (size_t)j.D + (size_t)j.head * hd;
    return j;
}

/* Block: BW_ROWS keys [k0, k0 + BW_ROWS) of job (sequence, head); dK and dV
 * of those keys. */
template <class TT, int HDP>
__global__ void __launch_bounds__(32 * BW_WARPS, 2)
    attn_bwd_dkdv_kernel(const TT *__restrict__ qkv, const TT *__restrict__ dO,
                         const float *__restrict__ lse, const float *__restrict__ delta, int T,
                         int heads, int hd, int kblocks, float scale, TT *__restrict__ dqkv) {
    DYNAMIC_SMEM(float, smem);
    const int LD = HDP + MMA_PAD;
    TT *ks = (TT *)smem, *vs = ks + BW_ROWS * LD; /* the block's keys and values */
    TT *stream = vs + BW_ROWS * LD;               /* [stage][Q | dO][BW_TILE][LD] */
    float *lse_s = (float *)(stream + 4 * BW_TILE * LD), *delta_s = lse_s + BW_TILE;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q4 = lane % 4;
    const bwd_job<TT> jb = bwd_job_of(qkv, dO, T, heads, hd, kblocks);
    const int k0 = jb.r0, head = jb.head, D = jb.D;
    const size_t stride = jb.stride, row0 = jb.row0;
    const TT *base = jb.base, *gbase = jb.gbase;

    mma_load_tile_async<TT, HDP>(base, stride, D, k0, BW_ROWS, T, hd, ks, LD);
    mma_load_tile_async<TT, HDP>(base, stride, 2 * D, k0, BW_ROWS, T, hd, vs, LD);
    mma_load_tile_async<TT, HDP>(base, stride, 0, 0, BW_TILE, T, hd, stream, LD);
    mma_load_tile_async<TT, HDP>(gbase, D, 0, 0, BW_TILE, T, hd, stream + BW_TILE * LD, LD);
    cp_async_commit();

    float dk[HDP / 8][4], dv[HDP / 8][4];
#pragma unroll
    for (int dt = 0; dt < HDP / 8; dt++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[dt][e] = dv[dt][e] = 0.0f;

    const int ntiles = (T + BW_TILE - 1) / BW_TILE;
    for (int it = 0; it < ntiles; it++) {
        const int q0 = it * BW_TILE;
        if (it + 1 < ntiles) {
            TT *next = stream + ((it + 1) % 2) * 2 * BW_TILE * LD;
            mma_load_tile_async<TT, HDP>(base, stride, 0, q0 + BW_TILE, BW_TILE, T, hd, next, LD);
            mma_load_tile_async<TT, HDP>(gbase, D, 0, q0 + BW_TILE, BW_TILE, T, hd,
                                         next + BW_TILE * LD, LD);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        /* Queries past T get lse +inf: P = 0, so they add nothing. */
        for (int t = threadIdx.x; t < BW_TILE; t += blockDim.x) {
            const size_t r = (row0 + (size_t)(q0 + t)) * heads + (size_t)head;
            lse_s[t] = q0 + t < T ? lse[r] * LOG2E : INFINITY;
            delta_s[t] = q0 + t < T ? delta[r] : 0.0f;
        }
        __syncthreads();
        const TT *qs = stream + (it % 2) * 2 * BW_TILE * LD, *gs = qs + BW_TILE * LD;
        const float sl2 = scale * LOG2E;

        uint32_t fa[HDP / 16][4];
        float pt[BW_TILE / 8][4], dpt[BW_TILE / 8][4];
        load_a<TT, HDP>(fa, ks + warp * 16 * LD, LD);
        mma_rows<TT, HDP, BW_TILE>(pt, fa, qs, LD); /* S^T: keys x queries */
#pragma unroll
        for (int nt = 0; nt < BW_TILE / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                pt[nt][e] = exp2f(pt[nt][e] * sl2 - lse_s[nt * 8 + 2 * q4 + (e & 1)]);
        mma_acc_rows<TT, HDP, BW_TILE>(dv, pt, gs, LD); /* dV += P^T dO */
        load_a<TT, HDP>(fa, vs + warp * 16 * LD, LD);
        mma_rows<TT, HDP, BW_TILE>(dpt, fa, gs, LD); /* dP^T = V dO^T */
#pragma unroll
        for (int nt = 0; nt < BW_TILE / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                dpt[nt][e] = pt[nt][e] * (dpt[nt][e] - delta_s[nt * 8 + 2 * q4 + (e & 1)]);
        mma_acc_rows<TT, HDP, BW_TILE>(dk, dpt, qs, LD); /* dK += dS^T Q */
        __syncthreads(); /* the stage and lse_s are used up before they are refilled */
    }

    TT *out = dqkv + row0 * stride + (size_t)head * hd;
    const int t = k0 + warp * 16 + g;
    store_rows<TT, HDP>(dk, scale, out + D, stride, t, T, hd);
    store_rows<TT, HDP>(dv, 1.0f, out + 2 * (size_t)D, stride, t, T, hd);
}

/* Block: BW_ROWS queries [q0, q0 + BW_ROWS) of job (sequence, head); dQ of
 * those queries. */
template <class TT, int HDP>
__global__ void __launch_bounds__(32 * BW_WARPS, 2)
    attn_bwd_dq_kernel(const TT *__restrict__ qkv, const TT *__restrict__ dO,
                       const float *__restrict__ lse, const float *__restrict__ delta, int T,
                       int heads, int hd, int qblocks, float scale, TT *__restrict__ dqkv) {
    DYNAMIC_SMEM(float, smem);
    const int LD = HDP + MMA_PAD;
    TT *qs = (TT *)smem, *gs = qs + BW_ROWS * LD; /* the block's queries and dO rows */
    TT *stream = gs + BW_ROWS * LD;               /* [stage][K | V][BW_TILE][LD] */
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q4 = lane % 4;
    const bwd_job<TT> jb = bwd_job_of(qkv, dO, T, heads, hd, qblocks);
    const int q0 = jb.r0, head = jb.head, D = jb.D;
    const size_t stride = jb.stride, row0 = jb.row0;
    const TT *base = jb.base, *gbase = jb.gbase;

    mma_load_tile_async<TT, HDP>(base, stride, 0, q0, BW_ROWS, T, hd, qs, LD);
    mma_load_tile_async<TT, HDP>(gbase, D, 0, q0, BW_ROWS, T, hd, gs, LD);
    mma_load_tile_async<TT, HDP>(base, stride, D, 0, BW_TILE, T, hd, stream, LD);
    mma_load_tile_async<TT, HDP>(base, stride, 2 * D, 0, BW_TILE, T, hd, stream + BW_TILE * LD,
                                 LD);
    cp_async_commit();

    /* This thread's rows t and t + 8: log-sum-exp (log2 units) and delta. */
    const int t = q0 + warp * 16 + g;
    float l2[2], dl[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const size_t r = (row0 + (size_t)(t + 8 * h)) * heads + (size_t)head;
        l2[h] = t + 8 * h < T ? lse[r] * LOG2E : 0.0f;
        dl[h] = t + 8 * h < T ? delta[r] : 0.0f;
    }
    float dq[HDP / 8][4];
#pragma unroll
    for (int dt = 0; dt < HDP / 8; dt++) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.0f;

    const float sl2 = scale * LOG2E;
    const int ntiles = (T + BW_TILE - 1) / BW_TILE;
    for (int it = 0; it < ntiles; it++) {
        const int k0 = it * BW_TILE;
        if (it + 1 < ntiles) {
            TT *next = stream + ((it + 1) % 2) * 2 * BW_TILE * LD;
            mma_load_tile_async<TT, HDP>(base, stride, D, k0 + BW_TILE, BW_TILE, T, hd, next, LD);
            mma_load_tile_async<TT, HDP>(base, stride, 2 * D, k0 + BW_TILE, BW_TILE, T, hd,
                                         next + BW_TILE * LD, LD);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const TT *kt = stream + (it % 2) * 2 * BW_TILE * LD, *vt = kt + BW_TILE * LD;

        uint32_t fa[HDP / 16][4];
        float p[BW_TILE / 8][4], dp[BW_TILE / 8][4];
        load_a<TT, HDP>(fa, qs + warp * 16 * LD, LD);
        mma_rows<TT, HDP, BW_TILE>(p, fa, kt, LD); /* S = Q K^T */
        /* Keys past T are zero rows: their P is set to 0 here. */
#pragma unroll
        for (int nt = 0; nt < BW_TILE / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                p[nt][e] = k0 + nt * 8 + 2 * q4 + (e & 1) < T
                               ? exp2f(p[nt][e] * sl2 - l2[e / 2])
                               : 0.0f;
        load_a<TT, HDP>(fa, gs + warp * 16 * LD, LD);
        mma_rows<TT, HDP, BW_TILE>(dp, fa, vt, LD); /* dP = dO V^T */
#pragma unroll
        for (int nt = 0; nt < BW_TILE / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) dp[nt][e] = p[nt][e] * (dp[nt][e] - dl[e / 2]);
        mma_acc_rows<TT, HDP, BW_TILE>(dq, dp, kt, LD); /* dQ += dS K */
        __syncthreads(); /* the stage is used up before it is refilled */
    }

    store_rows<TT, HDP>(dq, scale, dqkv + row0 * stride + (size_t)head * hd, stride, t, T, hd);
}

template <class TT, int HDP>
static lego_status launch_bwd(cudaStream_t s, const TT *qkv, const TT *dO, const float *lse,
                              const float *delta, size_t seqs, int T, int heads, int hd,
                              TT *dqkv, lego_err *err) {
    const size_t smem = bwd_bytes(HDP);
    const size_t rblocks = ((size_t)T + BW_ROWS - 1) / BW_ROWS;
    const size_t blocks = seqs * (size_t)heads * rblocks;
    if (blocks > (size_t)INT_MAX)
        return lego_fail(err, LEGO_ERR_UNSUPPORTED, "attention: %zu sequences are too many", seqs);
    if (smem > 48 * 1024) {
        CU_TRY(cudaFuncSetAttribute(attn_bwd_dkdv_kernel<TT, HDP>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        CU_TRY(cudaFuncSetAttribute(attn_bwd_dq_kernel<TT, HDP>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    }
    const float scale = 1.0f / sqrtf((float)hd);
    LAUNCH((attn_bwd_dkdv_kernel<TT, HDP>), (unsigned)blocks, 32 * BW_WARPS, smem, s)(
        qkv, dO, lse, delta, T, heads, hd, (int)rblocks, scale, dqkv);
    LAUNCH_CHECK("attn_bwd_dkdv");
    LAUNCH((attn_bwd_dq_kernel<TT, HDP>), (unsigned)blocks, 32 * BW_WARPS, smem, s)(
        qkv, dO, lse, delta, T, heads, hd, (int)rblocks, scale, dqkv);
    LAUNCH_CHECK("attn_bwd_dq");
    return LEGO_OK;
}

template <class TT>
lego_status k_attention_bwd(cudaStream_t s, const TT *qkv, const TT *dO, const float *lse,
                            const float *delta, size_t seqs, int tokens, int heads, int head_dim,
                            TT *dqkv, lego_err *err) {
    if (head_dim % 8 == 0 && head_dim <= MMA_MAX_HEAD_DIM) {
#define BWD_CASE(n)                                                                           \
    case n / 16:                                                                              \
        return launch_bwd<TT, n>(s, qkv, dO, lse, delta, seqs, tokens, heads, head_dim, dqkv, err)
        switch ((head_dim + 15) / 16) {
            BWD_CASE(16);
            BWD_CASE(32);
            BWD_CASE(48);
            BWD_CASE(64);
            BWD_CASE(80);
            BWD_CASE(96);
            BWD_CASE(112);
            BWD_CASE(128);
        }
#undef BWD_CASE
    }
    return lego_fail(err, LEGO_ERR_UNSUPPORTED,
                     "attention backward: no tensor-core kernel for head_dim %d", head_dim);
}

template <>
lego_status k_attention_bwd<float>(cudaStream_t, const float *, const float *, const float *,
                                   const float *, size_t, int, int, int, float *, lego_err *err) {
    return lego_fail(err, LEGO_ERR_UNSUPPORTED,
                     "attention backward: the tensor-core kernels take bf16 or fp16");
}

template lego_status k_attention_bwd<bf16>(cudaStream_t, const bf16 *, const bf16 *,
                                           const float *, const float *, size_t, int, int, int,
                                           bf16 *, lego_err *);
template lego_status k_attention_bwd<f16>(cudaStream_t, const f16 *, const f16 *, const float *,
                                          const float *, size_t, int, int, int, f16 *, lego_err *);
