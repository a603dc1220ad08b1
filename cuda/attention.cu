/*
 * attention.cu -- multi-head self-attention of many independent short
 * sequences (one sequence = the tokens of one brick patch), fp32.
 *
 * Twin of op_attention (src/ops_cpu.c): for every sequence and head,
 *   out_t = sum_j softmax_j(q_t . k_j / sqrt(head_dim)) v_j
 * with qkv rows [q | k | v], each [heads][head_dim], and out rows
 * [heads][head_dim].  Two kernels:
 *
 *  - at most 4 tokens (the 4-token bricks of LEGO-PG/PR): one warp per
 *    (sequence, head), everything in registers (attention_tiny_kernel);
 *  - short sequences (tokens <= 32): one warp per (sequence, head).  Q, K, V of the head sit in shared
 *    memory; lane j computes score j, the softmax is two warp reductions,
 *    and each lane accumulates head_dim/32 output columns.
 *  - long sequences (64, 256, 1024 tokens): a simple flash-style kernel.
 *    A block of FLASH_WARPS warps takes FLASH_QB queries of one (sequence,
 *    head); it walks the keys in tiles of 32 (one per lane) through shared
 *    memory, keeping for each query a running maximum, a running sum and
 *    the un-normalised output (online softmax), all in fp32 registers.
 *
 *  - long sequences in bf16/fp16 with head_dim a multiple of 8 (<= 128):
 *    a flash-attention kernel on the tensor cores (mma.sync m16n8k16,
 *    fp32 accumulation).  A block of MMA_WARPS warps takes 128 queries of
 *    one (sequence, head), each warp 16; keys and values come in tiles of
 *    64 through shared memory, their MMA fragments read with ldmatrix
 *    (.trans for V); scores, the online softmax and the output stay in
 *    registers, and the probabilities are re-packed as the A operand of
 *    P V without leaving them.  attention_mma2_kernel does the same with
 *    4 warps of 32 query rows (two m16 tiles each), so that each K/V
 *    fragment read from shared memory feeds two MMAs (CUDA_OPT_ATTENTION
 *    = 3, ATTN_MMA32; to be timed against the first).
 *
 * The two CUDA-core kernels keep head_dim/32 (rounded up) output values
 * per lane in registers, a template parameter E <= 8, so head_dim <=
 * ATTN_MAX_HEAD_DIM.  Operands of type T (float, bf16, fp16) are widened
 * to fp32 on load.  Scores are computed as (q . k) * scale, the CPU's as
 * (q * scale) . k: the same up to rounding.  expf is the accurate one (no
 * --use_fast_math); the tensor-core kernel uses exp2f on log2e-scaled
 * scores, well inside bf16's rounding.
 */
#include <limits.h>
#include <math.h>
#include <string.h>

#include "cuda_internal.h"
#include "mma_tile.h"

#define SHORT_MAX_TOKENS ATTN_SHORT_MAX_TOKENS
/* Shared memory one block of the short kernel may use without opting in. */
#define SHORT_SMEM_LIMIT (48 * 1024)
#define SHORT_MAX_WARPS 8

#define FLASH_WARPS 4
#define FLASH_QPW 4 /* queries per warp */
#define FLASH_QB (FLASH_WARPS * FLASH_QPW)
#define FLASH_KT 32 /* keys per tile: one per lane */
#define DEFAULT_SMEM_LIMIT (48 * 1024)

/* Per warp: Q [T][hd], K [T][hd+1] (padded: lane j reads row j without
 * bank conflicts), V [T][hd]; the kernel carves the same. */
static size_t short_bytes_per_warp(int T, int hd) {
    return ((size_t)T * hd * 2 + (size_t)T * (hd + 1)) * sizeof(float);
}

/* Q [QB][hd], K tile [KT][hd+1], V tile [KT][hd]. */
static size_t flash_bytes(int hd) {
    return ((size_t)FLASH_QB * hd + (size_t)FLASH_KT * (hd + 1) + (size_t)FLASH_KT * hd) *
           sizeof(float);
}

template <class TT, int E>
__global__ void attention_short_kernel(const TT *__restrict__ qkv, TT *__restrict__ out,
                                       size_t jobs, int T, int heads, int hd, float scale) {
    DYNAMIC_SMEM(float, smem);
    const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const size_t job = (size_t)blockIdx.x * warps + warp;
    if (job >= jobs) return; /* warp-uniform: no shuffle is left half-empty */
    const size_t seq = job / (size_t)heads;
    const int head = (int)(job % (size_t)heads);
    const int D = heads * hd, kst = hd + 1;
    const size_t stride = 3 * (size_t)D;

    float *qs = smem + (size_t)warp * ((size_t)T * hd * 2 + (size_t)T * kst);
    float *ks = qs + (size_t)T * hd;
    float *vs = ks + (size_t)T * kst;
    const TT *base = qkv + seq * (size_t)T * stride + (size_t)head * hd;
    for (int idx = lane; idx < T * hd; idx += 32) {
        int t = idx / hd, d = idx % hd;
        const TT *row = base + (size_t)t * stride;
        qs[idx] = to_float<TT>(row[d]);
        ks[t * kst + d] = to_float<TT>(row[D + d]);
        vs[idx] = to_float<TT>(row[2 * D + d]);
    }
    __syncwarp();

    TT *obase = out + seq * (size_t)T * D + (size_t)head * hd;
    for (int t = 0; t < T; t++) {
        float s = -INFINITY;
        if (lane < T) {
            const float *q = qs + t * hd, *k = ks + lane * kst;
            float dot = 0.0f;
            for (int d = 0; d < hd; d++) dot += q[d] * k[d];
            s = dot * scale;
        }
        float mx = warp_max(s);
        float p = lane < T ? expf(s - mx) : 0.0f;
        float inv = 1.0f / warp_sum(p);
        float o[E];
#pragma unroll
        for (int e = 0; e < E; e++) o[e] = 0.0f;
        for (int j = 0; j < T; j++) {
            float pj = __shfl_sync(FULL_MASK, p, j);
#pragma unroll
            for (int e = 0; e < E; e++) {
                int d = lane + 32 * e;
                if (d < hd) o[e] += pj * vs[j * hd + d];
            }
        }
#pragma unroll
        for (int e = 0; e < E; e++) {
            int d = lane + 32 * e;
            if (d < hd) obase[(size_t)t * D + d] = from_float<TT>(o[e] * inv);
        }
    }
}

template <class TT, int E>
__global__ void __launch_bounds__(32 * FLASH_WARPS)
    attention_flash_kernel(const TT *__restrict__ qkv, TT *__restrict__ out, int T,
                           int heads, int hd, int qblocks, float scale) {
    DYNAMIC_SMEM(float, smem);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const size_t job = blockIdx.x / (unsigned)qblocks;
    const int q0 = (int)(blockIdx.x % (unsigned)qblocks) * FLASH_QB;
    const size_t seq = job / (size_t)heads;
    const int head = (int)(job % (size_t)heads);
    const int D = heads * hd, kst = hd + 1;
    const size_t stride = 3 * (size_t)D;
    const TT *base = qkv + seq * (size_t)T * stride + (size_t)head * hd;

    float *qs = smem;                      /* [FLASH_QB][hd]   */
    float *ks = qs + FLASH_QB * hd;        /* [FLASH_KT][hd+1] */
    float *vs = ks + FLASH_KT * kst;       /* [FLASH_KT][hd]   */
    for (int idx = threadIdx.x; idx < FLASH_QB * hd; idx += blockDim.x) {
        int t = q0 + idx / hd, d = idx % hd;
        qs[idx] = t < T ? to_float<TT>(base[(size_t)t * stride + d]) : 0.0f;
    }

    float m[FLASH_QPW], l[FLASH_QPW], acc[FLASH_QPW][E];
#pragma unroll
    for (int i = 0; i < FLASH_QPW; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int e = 0; e < E; e++) acc[i][e] = 0.0f;
    }

    for (int k0 = 0; k0 < T; k0 += FLASH_KT) {
        __syncthreads(); /* the previous tile is used up (and Q is loaded) */
        for (int idx = threadIdx.x; idx < FLASH_KT * hd; idx += blockDim.x) {
            int j = idx / hd, d = idx % hd, t = k0 + j;
            const TT *row = base + (size_t)t * stride;
            ks[j * kst + d] = t < T ? to_float<TT>(row[D + d]) : 0.0f;
            vs[idx] = t < T ? to_float<TT>(row[2 * D + d]) : 0.0f;
        }
        __syncthreads();
        const int nk = T - k0 < FLASH_KT ? T - k0 : FLASH_KT;
#pragma unroll
        for (int i = 0; i < FLASH_QPW; i++) {
            /* Rows past T compute on zeros and are never stored. */
            const float *q = qs + (warp * FLASH_QPW + i) * hd;
            float s = -INFINITY;
            if (lane < nk) {
                const float *k = ks + lane * kst;
                float dot = 0.0f;
                for (int d = 0; d < hd; d++) dot += q[d] * k[d];
                s = dot * scale;
            }
            float m_new = fmaxf(m[i], warp_max(s)); /* finite: nk >= 1 */
            float corr = expf(m[i] - m_new);        /* 0 on the first tile */
            float p = lane < nk ? expf(s - m_new) : 0.0f;
            l[i] = l[i] * corr + warp_sum(p);
#pragma unroll
            for (int e = 0; e < E; e++) acc[i][e] *= corr;
            for (int j = 0; j < nk; j++) {
                float pj = __shfl_sync(FULL_MASK, p, j);
#pragma unroll
                for (int e = 0; e < E; e++) {
                    int d = lane + 32 * e;
                    if (d < hd) acc[i][e] += pj * vs[j * hd + d];
                }
            }
            m[i] = m_new;
        }
    }

#pragma unroll
    for (int i = 0; i < FLASH_QPW; i++) {
        int t = q0 + warp * FLASH_QPW + i;
        if (t >= T) continue;
        float inv = 1.0f / l[i];
        TT *o = out + (seq * (size_t)T + (size_t)t) * D + (size_t)head * hd;
#pragma unroll
        for (int e = 0; e < E; e++) {
            int d = lane + 32 * e;
            if (d < hd) o[d] = from_float<TT>(acc[i][e] * inv);
        }
    }
}

/* ---- sequences of at most 4 tokens ---------------------------------------------- */

/* The 4-token bricks of LEGO-PG/PR (patch 2 on 4x4, patch 8 on 16x16) run
 * hundreds of thousands of these per layer: one warp per (sequence, head),
 * each lane holding E columns (d = lane + 32 e) of every q, k and v in
 * registers, loaded coalesced straight from the qkv rows.  The T x T dot
 * products are warp sums of the lanes' partial products; softmax and the
 * output columns follow in registers.  Memory-bound: qkv is read once. */
#define TINY_MAX_TOKENS 4
#define TINY_WARPS 8

template <class TT, int E>
__global__ void __launch_bounds__(32 * TINY_WARPS)
    attention_tiny_kernel(const TT *__restrict__ qkv, TT *__restrict__ out, size_t jobs, int T,
                          int heads, int hd, float scale) {
    const int lane = threadIdx.x % 32;
    const size_t job = (size_t)blockIdx.x * TINY_WARPS + threadIdx.x / 32;
    if (job >= jobs) return; /* warp-uniform */
    const size_t seq = job / (size_t)heads;
    const int head = (int)(job % (size_t)heads);
    const int D = heads * hd;
    const size_t stride = 3 * (size_t)D;
    const TT *base = qkv + seq * (size_t)T * stride + (size_t)head * hd;

    float q[TINY_MAX_TOKENS][E], k[TINY_MAX_TOKENS][E], v[TINY_MAX_TOKENS][E];
#pragma unroll
    for (int t = 0; t < TINY_MAX_TOKENS; t++) {
#pragma unroll
        for (int e = 0; e < E; e++) {
            int d = lane + 32 * e;
            bool in = t < T && d < hd;
            const TT *row = base + (size_t)t * stride;
            q[t][e] = in ? to_float<TT>(row[d]) : 0.0f;
            k[t][e] = in ? to_float<TT>(row[D + d]) : 0.0f;
            v[t][e] = in ? to_float<TT>(row[2 * D + d]) : 0.0f;
        }
    }
    TT *obase = out + seq * (size_t)T * D + (size_t)head * hd;
#pragma unroll
    for (int t = 0; t < TINY_MAX_TOKENS; t++) {
        if (t >= T) break;
        float sc[TINY_MAX_TOKENS], mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < TINY_MAX_TOKENS; j++) {
            float part = 0.0f;
#pragma unroll
            for (int e = 0; e < E; e++) part += q[t][e] * k[j][e];
            sc[j] = j < T ? warp_sum(part) * scale : -INFINITY;
            mx = fmaxf(mx, sc[j]);
        }
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < TINY_MAX_TOKENS; j++) {
            sc[j] = j < T ? expf(sc[j] - mx) : 0.0f;
            sum += sc[j];
        }
        const float inv = 1.0f / sum;
#pragma unroll
        for (int e = 0; e < E; e++) {
            int d = lane + 32 * e;
            float o = 0.0f;
#pragma unroll
            for (int j = 0; j < TINY_MAX_TOKENS; j++) o += sc[j] * v[j][e];
            if (d < hd) obase[(size_t)t * D + d] = from_float<TT>(o * inv);
        }
    }
}

/* ---- tensor cores ------------------------------------------------------------ */

#define MMA_WARPS 8
#define MMA_QB (16 * MMA_WARPS) /* queries per block: 16 per warp */
#define MMA_KB 64               /* keys per tile                 */

/* Q [QB][HDP+PAD], K and V [2][KB][HDP+PAD] (two stages), 2-byte elements. */
static size_t mma_bytes(int hdp) {
    return (size_t)(MMA_QB + 4 * MMA_KB) * (hdp + MMA_PAD) * 2;
}

/* Two blocks (16 warps) per multiprocessor where the registers allow it
 * (head_dim <= 80: the LEGO models' 64 and 72), so that one block's loads
 * and barriers overlap the other's MMAs; one block above. */
#define MMA_MIN_BLOCKS(hdp) ((hdp) <= 80 ? 2 : 1)

template <class TT, int HDP>
__global__ void __launch_bounds__(32 * MMA_WARPS, MMA_MIN_BLOCKS(HDP))
    attention_mma_kernel(const TT *__restrict__ qkv, TT *__restrict__ out,
                         float *__restrict__ lse, int T, int heads, int hd, int qblocks,
                         float scale_log2) {
    DYNAMIC_SMEM(float, smem);
    const int LD = HDP + MMA_PAD;
    TT *qs = (TT *)smem;              /* [MMA_QB][LD]    */
    TT *kbuf = qs + MMA_QB * LD;      /* [2][MMA_KB][LD] */
    TT *vbuf = kbuf + 2 * MMA_KB * LD; /* [2][MMA_KB][LD] */
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q4 = lane % 4;
    const size_t job = blockIdx.x / (unsigned)qblocks;
    const int q0 = (int)(blockIdx.x % (unsigned)qblocks) * MMA_QB;
    const size_t seq = job / (size_t)heads;
    const int head = (int)(job % (size_t)heads);
    const int D = heads * hd;
    const size_t stride = 3 * (size_t)D;
    const TT *base = qkv + seq * (size_t)T * stride + (size_t)head * hd;

    /* Copy groups: Q, then K/V tile 0 behind it. */
    mma_load_tile_async<TT, HDP>(base, stride, 0, q0, MMA_QB, T, hd, qs, LD);
    cp_async_commit();
    mma_load_tile_async<TT, HDP>(base, stride, D, 0, MMA_KB, T, hd, kbuf, LD);
    mma_load_tile_async<TT, HDP>(base, stride, 2 * D, 0, MMA_KB, T, hd, vbuf, LD);
    cp_async_commit();
    cp_async_wait<1>(); /* Q is in */
    __syncthreads();
    uint32_t qa[HDP / 16][4];
    const TT *q_lo = qs + (warp * 16 + g) * LD, *q_hi = q_lo + 8 * LD;
#pragma unroll
    for (int kk = 0; kk < HDP / 16; kk++) {
        qa[kk][0] = word_at(q_lo + kk * 16 + 2 * q4);
        qa[kk][1] = word_at(q_hi + kk * 16 + 2 * q4);
        qa[kk][2] = word_at(q_lo + kk * 16 + 8 + 2 * q4);
        qa[kk][3] = word_at(q_hi + kk * 16 + 8 + 2 * q4);
    }

    /* Rows g and g+8 of the warp's 16: running max (log2 units), this
     * thread's part of the running sum, and the output accumulators. */
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.0f, l_hi = 0.0f;
    float o[HDP / 8][4];
#pragma unroll
    for (int dt = 0; dt < HDP / 8; dt++) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;

    /* Two stages: tile it+1 is copied in while tile it is used. */
    const int ntiles = (T + MMA_KB - 1) / MMA_KB;
    for (int it = 0; it < ntiles; it++) {
        const int k0 = it * MMA_KB;
        const TT *ks = kbuf + (it % 2) * MMA_KB * LD, *vs = vbuf + (it % 2) * MMA_KB * LD;
        if (it + 1 < ntiles) {
            TT *kn = kbuf + ((it + 1) % 2) * MMA_KB * LD, *vn = vbuf + ((it + 1) % 2) * MMA_KB * LD;
            mma_load_tile_async<TT, HDP>(base, stride, D, k0 + MMA_KB, MMA_KB, T, hd, kn, LD);
            mma_load_tile_async<TT, HDP>(base, stride, 2 * D, k0 + MMA_KB, MMA_KB, T, hd, vn,
                                         LD);
            cp_async_commit();
            cp_async_wait<1>(); /* this tile's group is complete */
        } else {
            cp_async_wait<0>();
        }
        __syncthreads(); /* every thread's copies of this tile are visible */

        /* S = Q K^T */
        float sc[MMA_KB / 8][4];
        mma_rows<TT, HDP, MMA_KB>(sc, qa, ks, LD);
        float mx_lo = -INFINITY, mx_hi = -INFINITY;
        const bool full = k0 + MMA_KB <= T; /* no key to mask in this tile */
#pragma unroll
        for (int nt = 0; nt < MMA_KB / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = k0 + nt * 8 + 2 * q4 + (e & 1);
                sc[nt][e] = full || key < T ? sc[nt][e] * scale_log2 : -INFINITY;
            }
            mx_lo = fmaxf(mx_lo, fmaxf(sc[nt][0], sc[nt][1]));
            mx_hi = fmaxf(mx_hi, fmaxf(sc[nt][2], sc[nt][3]));
        }
        /* A row's 64 scores lie in the 4 threads of its quad. */
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(FULL_MASK, mx_lo, 1));
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(FULL_MASK, mx_lo, 2));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(FULL_MASK, mx_hi, 1));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(FULL_MASK, mx_hi, 2));
        const float new_lo = fmaxf(m_lo, mx_lo), new_hi = fmaxf(m_hi, mx_hi); /* finite */
        const float corr_lo = exp2f(m_lo - new_lo), corr_hi = exp2f(m_hi - new_hi);
        m_lo = new_lo;
        m_hi = new_hi;
        float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
        for (int nt = 0; nt < MMA_KB / 8; nt++) {
            sc[nt][0] = exp2f(sc[nt][0] - new_lo);
            sc[nt][1] = exp2f(sc[nt][1] - new_lo);
            sc[nt][2] = exp2f(sc[nt][2] - new_hi);
            sc[nt][3] = exp2f(sc[nt][3] - new_hi);
            sum_lo += sc[nt][0] + sc[nt][1];
            sum_hi += sc[nt][2] + sc[nt][3];
        }
        l_lo = l_lo * corr_lo + sum_lo;
        l_hi = l_hi * corr_hi + sum_hi;
#pragma unroll
        for (int dt = 0; dt < HDP / 8; dt++) {
            o[dt][0] *= corr_lo;
            o[dt][1] *= corr_lo;
            o[dt][2] *= corr_hi;
            o[dt][3] *= corr_hi;
        }
        /* O += P V (the probabilities never leave the registers). */
        mma_acc_rows<TT, HDP, MMA_KB>(o, sc, vs, LD);
        __syncthreads(); /* the stage is used up before it is refilled */
    }

    l_lo += __shfl_xor_sync(FULL_MASK, l_lo, 1);
    l_lo += __shfl_xor_sync(FULL_MASK, l_lo, 2);
    l_hi += __shfl_xor_sync(FULL_MASK, l_hi, 1);
    l_hi += __shfl_xor_sync(FULL_MASK, l_hi, 2);
    const float inv_lo = 1.0f / l_lo, inv_hi = 1.0f / l_hi;
    const int t_lo = q0 + warp * 16 + g, t_hi = t_lo + 8;
    if (lse && q4 == 0) { /* training: ln sum_j exp(scale q.k_j), per (row, head) */
        const float ln2 = 0.6931471805599453f;
        if (t_lo < T) lse[(seq * (size_t)T + (size_t)t_lo) * heads + (size_t)head] =
            (m_lo + log2f(l_lo)) * ln2;
        if (t_hi < T) lse[(seq * (size_t)T + (size_t)t_hi) * heads + (size_t)head] =
            (m_hi + log2f(l_hi)) * ln2;
    }
    TT *o_lo = out + (seq * (size_t)T + (size_t)t_lo) * D + (size_t)head * hd;
    TT *o_hi = o_lo + 8 * (size_t)D;
#pragma unroll
    for (int dt = 0; dt < HDP / 8; dt++) {
        int d = dt * 8 + 2 * q4;
        if (d >= hd) continue;
        if (t_lo < T) *(uint32_t *)(o_lo + d) = pack2<TT>(o[dt][0] * inv_lo, o[dt][1] * inv_lo);
        if (t_hi < T) *(uint32_t *)(o_hi + d) = pack2<TT>(o[dt][2] * inv_hi, o[dt][3] * inv_hi);
    }
}

/* ---- tensor cores, 32 query rows per warp ------------------------------------ */

/* The same flash attention with half the shared-memory reads per MMA: a
 * block of MMA2_WARPS warps takes the same 128 queries, each warp two
 * m16 tiles (32 rows), so every K fragment and every V fragment that
 * ldmatrix brings into registers feeds two MMAs instead of one.  Tiles,
 * padding and the double buffering are attention_mma_kernel's; the score
 * and output accumulators are doubled.  The softmax scale is folded into
 * the exponent (one FFMA: s * scale_log2 - m, m kept in scaled log2
 * units).  Q's fragments stay in registers for head_dim <= 64; above,
 * they do not fit beside the doubled accumulators (255 registers), so
 * they are re-read from shared memory with ldmatrix once per key tile
 * (fewer reads than the tile's K fragments). */
#define MMA2_WARPS 4
#define MMA2_ROWS 32 /* query rows per warp: two m16 tiles */
#if MMA2_WARPS * MMA2_ROWS != MMA_QB
#error "the 32-row kernel takes the 16-row kernel's query block"
#endif
#define MMA2_QREG(hdp) ((hdp) <= 64)
/* Blocks per multiprocessor asked of ptxas (registers <= 65536 / (128 x
 * this)): ptxas -v (sm_90, nvcc 13) gives 139 registers for HDP 16, 177
 * for 32, 202 for 48, 244 for 64, 255 for 80, 251 for 96, none spilled;
 * 255 with 76/92 bytes spilled for 112/128.  A lower cap spills. */
#define MMA2_MIN_BLOCKS(hdp) ((hdp) <= 16 ? 3 : 2)

template <class TT, int HDP>
__global__ void __launch_bounds__(32 * MMA2_WARPS, MMA2_MIN_BLOCKS(HDP))
    attention_mma2_kernel(const TT *__restrict__ qkv, TT *__restrict__ out, int T, int heads,
                          int hd, int qblocks, float scale_log2) {
    constexpr bool QREG = MMA2_QREG(HDP);
    constexpr int KS = HDP / 16; /* k-steps of Q K^T */
    DYNAMIC_SMEM(float, smem);
    const int LD = HDP + MMA_PAD;
    TT *qs = (TT *)smem;               /* [MMA_QB][LD]    */
    TT *kbuf = qs + MMA_QB * LD;       /* [2][MMA_KB][LD] */
    TT *vbuf = kbuf + 2 * MMA_KB * LD; /* [2][MMA_KB][LD] */
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q4 = lane % 4;
    const size_t job = blockIdx.x / (unsigned)qblocks;
    const int q0 = (int)(blockIdx.x % (unsigned)qblocks) * MMA_QB;
    const size_t seq = job / (size_t)heads;
    const int head = (int)(job % (size_t)heads);
    const int D = heads * hd;
    const size_t stride = 3 * (size_t)D;
    const TT *base = qkv + seq * (size_t)T * stride + (size_t)head * hd;

    mma_load_tile_async<TT, HDP>(base, stride, 0, q0, MMA_QB, T, hd, qs, LD);
    cp_async_commit();
    mma_load_tile_async<TT, HDP>(base, stride, D, 0, MMA_KB, T, hd, kbuf, LD);
    mma_load_tile_async<TT, HDP>(base, stride, 2 * D, 0, MMA_KB, T, hd, vbuf, LD);
    cp_async_commit();
    cp_async_wait<1>(); /* Q is in */
    __syncthreads();

    /* ldmatrix row addresses: lane L gives row L%8 of matrix L/8.  For an
     * A fragment (Q) and V's .trans B fragments the four matrices are
     * (rows 0-7 | 8-15) x (columns 0-7 | 8-15), rows first. */
    const int lm = lane / 8, lr = lane % 8;
    const TT *qrow = qs + (warp * MMA2_ROWS + (lm % 2) * 8 + lr) * LD + (lm / 2) * 8;
    uint32_t qa[2][QREG ? KS : 1][4];
    if constexpr (QREG) {
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int kk = 0; kk < KS; kk++) ldmatrix_x4(qa[mt][kk], qrow + mt * 16 * LD + kk * 16);
    }

    /* Per m16 tile mt and half h (rows g and g+8): running max (scaled,
     * log2 units), this thread's part of the running sum, the output. */
    float m_run[2][2], l_run[2][2];
    float o[2][HDP / 8][4];
#pragma unroll
    for (int mt = 0; mt < 2; mt++) {
        m_run[mt][0] = m_run[mt][1] = -INFINITY;
        l_run[mt][0] = l_run[mt][1] = 0.0f;
#pragma unroll
        for (int dt = 0; dt < HDP / 8; dt++)
            o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.0f;
    }

    const int ntiles = (T + MMA_KB - 1) / MMA_KB;
    for (int it = 0; it < ntiles; it++) {
        const int k0 = it * MMA_KB;
        const TT *ks = kbuf + (it % 2) * MMA_KB * LD, *vs = vbuf + (it % 2) * MMA_KB * LD;
        if (it + 1 < ntiles) {
            TT *kn = kbuf + ((it + 1) % 2) * MMA_KB * LD, *vn = vbuf + ((it + 1) % 2) * MMA_KB * LD;
            mma_load_tile_async<TT, HDP>(base, stride, D, k0 + MMA_KB, MMA_KB, T, hd, kn, LD);
            mma_load_tile_async<TT, HDP>(base, stride, 2 * D, k0 + MMA_KB, MMA_KB, T, hd, vn,
                                         LD);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        /* S = Q K^T, k-steps outermost: a pair of k-steps' Q fragments
         * (registers or one ldmatrix each), then per 8-key tile one x4 of
         * K for four MMAs. */
        float sc[2][MMA_KB / 8][4];
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int nt = 0; nt < MMA_KB / 8; nt++)
                sc[mt][nt][0] = sc[mt][nt][1] = sc[mt][nt][2] = sc[mt][nt][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KS; kk += 2) {
            const bool pair = kk + 1 < KS;
            uint32_t a[2][2][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    if (j == 1 && !pair) break;
                    if constexpr (QREG) {
                        a[mt][j][0] = qa[mt][kk + j][0];
                        a[mt][j][1] = qa[mt][kk + j][1];
                        a[mt][j][2] = qa[mt][kk + j][2];
                        a[mt][j][3] = qa[mt][kk + j][3];
                    } else {
                        ldmatrix_x4(a[mt][j], qrow + mt * 16 * LD + (kk + j) * 16);
                    }
                }
#pragma unroll
            for (int nt = 0; nt < MMA_KB / 8; nt++) {
                if (pair) {
                    uint32_t b[4];
                    ldmatrix_x4(b, ks + (nt * 8 + lr) * LD + lm * 8 + kk * 16);
#pragma unroll
                    for (int mt = 0; mt < 2; mt++) {
                        mma_16816<TT>(sc[mt][nt], a[mt][0], b);
                        mma_16816<TT>(sc[mt][nt], a[mt][1], b + 2);
                    }
                } else {
                    uint32_t b[2];
                    ldmatrix_x2(b, ks + (nt * 8 + lr) * LD + (lm % 2) * 8 + kk * 16);
#pragma unroll
                    for (int mt = 0; mt < 2; mt++) mma_16816<TT>(sc[mt][nt], a[mt][0], b);
                }
            }
        }

        /* Online softmax on raw scores: the scale is positive, so the
         * row maximum of s * scale_log2 is scale_log2 * max s. */
        const bool full = k0 + MMA_KB <= T;
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
            float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int nt = 0; nt < MMA_KB / 8; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int key = k0 + nt * 8 + 2 * q4 + (e & 1);
                    if (!full && key >= T) sc[mt][nt][e] = -INFINITY;
                    mx[e / 2] = fmaxf(mx[e / 2], sc[mt][nt][e]);
                }
            }
            float corr[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
            for (int h = 0; h < 2; h++) {
                /* A row's 64 scores lie in the 4 threads of its quad. */
                mx[h] = fmaxf(mx[h], __shfl_xor_sync(FULL_MASK, mx[h], 1));
                mx[h] = fmaxf(mx[h], __shfl_xor_sync(FULL_MASK, mx[h], 2));
                const float m_new = fmaxf(m_run[mt][h], mx[h] * scale_log2); /* finite */
                corr[h] = exp2f(m_run[mt][h] - m_new);
                m_run[mt][h] = m_new;
            }
#pragma unroll
            for (int nt = 0; nt < MMA_KB / 8; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    sc[mt][nt][e] = exp2f(fmaf(sc[mt][nt][e], scale_log2, -m_run[mt][e / 2]));
                    sum[e / 2] += sc[mt][nt][e];
                }
            }
#pragma unroll
            for (int h = 0; h < 2; h++) l_run[mt][h] = l_run[mt][h] * corr[h] + sum[h];
#pragma unroll
            for (int dt = 0; dt < HDP / 8; dt++) {
                o[mt][dt][0] *= corr[0];
                o[mt][dt][1] *= corr[0];
                o[mt][dt][2] *= corr[1];
                o[mt][dt][3] *= corr[1];
            }
        }

        /* O += P V: one ldmatrix.trans x4 of V (two 8-column tiles) for
         * four MMAs. */
#pragma unroll
        for (int ks16 = 0; ks16 < MMA_KB / 16; ks16++) {
            uint32_t pa[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                pa[mt][0] = pack2<TT>(sc[mt][2 * ks16][0], sc[mt][2 * ks16][1]);
                pa[mt][1] = pack2<TT>(sc[mt][2 * ks16][2], sc[mt][2 * ks16][3]);
                pa[mt][2] = pack2<TT>(sc[mt][2 * ks16 + 1][0], sc[mt][2 * ks16 + 1][1]);
                pa[mt][3] = pack2<TT>(sc[mt][2 * ks16 + 1][2], sc[mt][2 * ks16 + 1][3]);
            }
            const TT *vrow = vs + (ks16 * 16 + (lm % 2) * 8 + lr) * LD + (lm / 2) * 8;
#pragma unroll
            for (int dt = 0; dt < HDP / 8; dt += 2) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, vrow + dt * 8);
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    mma_16816<TT>(o[mt][dt], pa[mt], b);
                    mma_16816<TT>(o[mt][dt + 1], pa[mt], b + 2);
                }
            }
        }
        __syncthreads(); /* the stage is used up before it is refilled */
    }

#pragma unroll
    for (int mt = 0; mt < 2; mt++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            float l = l_run[mt][h];
            l += __shfl_xor_sync(FULL_MASK, l, 1);
            l += __shfl_xor_sync(FULL_MASK, l, 2);
            const float inv = 1.0f / l;
            const int t = q0 + warp * MMA2_ROWS + mt * 16 + h * 8 + g;
            if (t >= T) continue; /* after the shuffles: every lane took part */
            TT *orow = out + (seq * (size_t)T + (size_t)t) * D + (size_t)head * hd;
#pragma unroll
            for (int dt = 0; dt < HDP / 8; dt++) {
                int d = dt * 8 + 2 * q4;
                if (d < hd)
                    *(uint32_t *)(orow + d) =
                        pack2<TT>(o[mt][dt][2 * h] * inv, o[mt][dt][2 * h + 1] * inv);
            }
        }
    }
}

template <class TT, int HDP>
static lego_status launch_mma(cudaStream_t s, const TT *qkv, size_t seqs, int T, int heads,
                              int hd, TT *out, float *lse, bool rows32, lego_err *err) {
    const size_t smem = mma_bytes(HDP); /* the same block of queries and tiles in both */
    if (smem > DEFAULT_SMEM_LIMIT && rows32)
        CU_TRY(cudaFuncSetAttribute(attention_mma2_kernel<TT, HDP>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    else if (smem > DEFAULT_SMEM_LIMIT)
        CU_TRY(cudaFuncSetAttribute(attention_mma_kernel<TT, HDP>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    const size_t qblocks = ((size_t)T + MMA_QB - 1) / MMA_QB;
    const size_t blocks = seqs * (size_t)heads * qblocks;
    if (blocks > (size_t)INT_MAX)
        return lego_fail(err, LEGO_ERR_UNSUPPORTED, "attention: %zu sequences are too many", seqs);
    const float scale_log2 = 1.4426950408889634f / sqrtf((float)hd);
    if (rows32)
        LAUNCH((attention_mma2_kernel<TT, HDP>), (unsigned)blocks, 32 * MMA2_WARPS, smem, s)(
            qkv, out, T, heads, hd, (int)qblocks, scale_log2);
    else
        LAUNCH((attention_mma_kernel<TT, HDP>), (unsigned)blocks, 32 * MMA_WARPS, smem, s)(
            qkv, out, lse, T, heads, hd, (int)qblocks, scale_log2);
    LAUNCH_CHECK(rows32 ? "attention_mma2" : "attention_mma");
    return LEGO_OK;
}

/* The tensor-core kernel for (TT, head_dim), if there is one: 1 = launched.
 * rows32: attention_mma2_kernel (32 query rows per warp). */
template <class TT>
static int try_mma(cudaStream_t s, const TT *qkv, size_t seqs, int T, int heads, int hd, TT *out,
                   float *lse, bool rows32, lego_status *st, lego_err *err) {
    if (hd % 8 != 0 || hd > MMA_MAX_HEAD_DIM) return 0;
#define MMA_CASE(n)                                                                           \
    case n / 16:                                                                              \
        *st = launch_mma<TT, n>(s, qkv, seqs, T, heads, hd, out, lse, rows32, err);           \
        return 1
    switch ((hd + 15) / 16) {
        MMA_CASE(16);
        MMA_CASE(32);
        MMA_CASE(48);
        MMA_CASE(64);
        MMA_CASE(80);
        MMA_CASE(96);
        MMA_CASE(112);
        MMA_CASE(128);
    }
#undef MMA_CASE
    return 0;
}
template <>
int try_mma<float>(cudaStream_t, const float *, size_t, int, int, int, float *, float *, bool,
                   lego_status *, lego_err *) {
    return 0; /* fp32 stays on the CUDA cores: no TF32 */
}

/* Training's forward (train.cu): the 16-row tensor-core kernel, which also
 * writes each row's log-sum-exp for attention_bwd.cu. */
template <class TT>
lego_status k_attention_lse(cudaStream_t s, const TT *qkv, size_t seqs, int tokens, int heads,
                            int head_dim, TT *out, float *lse, lego_err *err) {
    lego_status st = LEGO_OK;
    if (!try_mma<TT>(s, qkv, seqs, tokens, heads, head_dim, out, lse, false, &st, err))
        return lego_fail(err, LEGO_ERR_UNSUPPORTED,
                         "attention: no tensor-core kernel for head_dim %d at this precision",
                         head_dim);
    return st;
}

template lego_status k_attention_lse<float>(cudaStream_t, const float *, size_t, int, int, int,
                                            float *, float *, lego_err *);
template lego_status k_attention_lse<bf16>(cudaStream_t, const bf16 *, size_t, int, int, int,
                                           bf16 *, float *, lego_err *);
template lego_status k_attention_lse<f16>(cudaStream_t, const f16 *, size_t, int, int, int, f16 *,
                                          float *, lego_err *);

/* ---- dispatch ------------------------------------------------------------------ */

template <class TT, int E>
static lego_status launch_attention(cudaStream_t s, const TT *qkv, size_t seqs, int T, int heads,
                                    int hd, TT *out, int mode, lego_err *err) {
    const float scale = 1.0f / sqrtf((float)hd);
    const size_t jobs = seqs * (size_t)heads;
    const size_t per_warp = short_bytes_per_warp(T, hd);
    if (mode != ATTN_FLASH_ONLY && T <= TINY_MAX_TOKENS) {
        size_t blocks = (jobs + TINY_WARPS - 1) / TINY_WARPS;
        if (blocks > (size_t)INT_MAX)
            return lego_fail(err, LEGO_ERR_UNSUPPORTED, "attention: %zu sequences are too many",
                             seqs);
        auto kernel = attention_tiny_kernel<TT, E>;
        LAUNCH(kernel, (unsigned)blocks, 32 * TINY_WARPS, 0, s)(qkv, out, jobs, T, heads, hd,
                                                                scale);
        LAUNCH_CHECK("attention_tiny");
        return LEGO_OK;
    }
    if (mode != ATTN_FLASH_ONLY && T <= SHORT_MAX_TOKENS && per_warp <= SHORT_SMEM_LIMIT) {
        size_t warps = SHORT_SMEM_LIMIT / per_warp;
        if (warps > SHORT_MAX_WARPS) warps = SHORT_MAX_WARPS;
        size_t blocks = (jobs + warps - 1) / warps;
        if (blocks > (size_t)INT_MAX)
            return lego_fail(err, LEGO_ERR_UNSUPPORTED, "attention: %zu sequences are too many",
                             seqs);
        auto kernel = attention_short_kernel<TT, E>;
        LAUNCH(kernel, (unsigned)blocks, (unsigned)(32 * warps), warps * per_warp, s)(
            qkv, out, jobs, T, heads, hd, scale);
        LAUNCH_CHECK("attention_short");
        return LEGO_OK;
    }
    lego_status st = LEGO_OK;
    if (mode != ATTN_NO_MMA &&
        try_mma<TT>(s, qkv, seqs, T, heads, hd, out, NULL, mode == ATTN_MMA32, &st, err))
        return st;
    const size_t smem = flash_bytes(hd);
    auto kernel = attention_flash_kernel<TT, E>;
    if (smem > DEFAULT_SMEM_LIMIT)
        CU_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)smem));
    const size_t qblocks = ((size_t)T + FLASH_QB - 1) / FLASH_QB, blocks = jobs * qblocks;
    if (blocks > (size_t)INT_MAX)
        return lego_fail(err, LEGO_ERR_UNSUPPORTED, "attention: %zu sequences are too many", seqs);
    LAUNCH(kernel, (unsigned)blocks, 32 * FLASH_WARPS, smem, s)(
        qkv, out, T, heads, hd, (int)qblocks, scale);
    LAUNCH_CHECK("attention_flash");
    return LEGO_OK;
}

template <class TT>
lego_status k_attention(cudaStream_t s, const TT *qkv, size_t seqs, int tokens, int heads,
                        int head_dim, TT *out, int mode, lego_err *err) {
    switch ((head_dim + 31) / 32) {
    case 1: return launch_attention<TT, 1>(s, qkv, seqs, tokens, heads, head_dim, out, mode, err);
    case 2: return launch_attention<TT, 2>(s, qkv, seqs, tokens, heads, head_dim, out, mode, err);
    case 3: return launch_attention<TT, 3>(s, qkv, seqs, tokens, heads, head_dim, out, mode, err);
    case 4: return launch_attention<TT, 4>(s, qkv, seqs, tokens, heads, head_dim, out, mode, err);
    case 5: return launch_attention<TT, 5>(s, qkv, seqs, tokens, heads, head_dim, out, mode, err);
    case 6: return launch_attention<TT, 6>(s, qkv, seqs, tokens, heads, head_dim, out, mode, err);
    case 7: return launch_attention<TT, 7>(s, qkv, seqs, tokens, heads, head_dim, out, mode, err);
    case 8: return launch_attention<TT, 8>(s, qkv, seqs, tokens, heads, head_dim, out, mode, err);
    default:
        return lego_fail(err, LEGO_ERR_UNSUPPORTED,
                         "attention: head_dim %d is not supported on CUDA (1..%d)", head_dim,
                         ATTN_MAX_HEAD_DIM);
    }
}

template lego_status k_attention<float>(cudaStream_t, const float *, size_t, int, int, int,
                                        float *, int, lego_err *);
template lego_status k_attention<bf16>(cudaStream_t, const bf16 *, size_t, int, int, int, bf16 *,
                                       int, lego_err *);
template lego_status k_attention<f16>(cudaStream_t, const f16 *, size_t, int, int, int, f16 *,
                                      int, lego_err *);
