/*
 * attention.cu -- multi-head self-attention of many independent short
 * sequences (one sequence = the tokens of one brick patch), fp32.
 *
 * Twin of op_attention (src/ops_cpu.c): for every sequence and head,
 *   out_t = sum_j softmax_j(q_t . k_j / sqrt(head_dim)) v_j
 * with qkv rows [q | k | v], each [heads][head_dim], and out rows
 * [heads][head_dim].  Two kernels:
 *
 *  - short sequences (tokens <= 32, the 4-token bricks of LEGO-PG/PR):
 *    one warp per (sequence, head).  Q, K, V of the head sit in shared
 *    memory; lane j computes score j, the softmax is two warp reductions,
 *    and each lane accumulates head_dim/32 output columns.
 *  - long sequences (64, 256, 1024 tokens): a simple flash-style kernel.
 *    A block of FLASH_WARPS warps takes FLASH_QB queries of one (sequence,
 *    head); it walks the keys in tiles of 32 (one per lane) through shared
 *    memory, keeping for each query a running maximum, a running sum and
 *    the un-normalised output (online softmax), all in fp32 registers.
 *
 * Both keep head_dim/32 (rounded up) output values per lane in registers,
 * a template parameter E <= 8, so head_dim <= ATTN_MAX_HEAD_DIM.  Scores
 * are computed as (q . k) * scale, the CPU's as (q * scale) . k: the same
 * up to rounding.  expf is the accurate one (no --use_fast_math).
 */
#include <limits.h>
#include <math.h>

#include "cuda_internal.h"

#define SHORT_MAX_TOKENS 32
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

template <int E>
__global__ void attention_short_kernel(const float *__restrict__ qkv, float *__restrict__ out,
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
    const float *base = qkv + seq * (size_t)T * stride + (size_t)head * hd;
    for (int idx = lane; idx < T * hd; idx += 32) {
        int t = idx / hd, d = idx % hd;
        const float *row = base + (size_t)t * stride;
        qs[idx] = row[d];
        ks[t * kst + d] = row[D + d];
        vs[idx] = row[2 * D + d];
    }
    __syncwarp();

    float *obase = out + seq * (size_t)T * D + (size_t)head * hd;
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
            if (d < hd) obase[(size_t)t * D + d] = o[e] * inv;
        }
    }
}

template <int E>
__global__ void __launch_bounds__(32 * FLASH_WARPS)
    attention_flash_kernel(const float *__restrict__ qkv, float *__restrict__ out, int T,
                           int heads, int hd, int qblocks, float scale) {
    DYNAMIC_SMEM(float, smem);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const size_t job = blockIdx.x / (unsigned)qblocks;
    const int q0 = (int)(blockIdx.x % (unsigned)qblocks) * FLASH_QB;
    const size_t seq = job / (size_t)heads;
    const int head = (int)(job % (size_t)heads);
    const int D = heads * hd, kst = hd + 1;
    const size_t stride = 3 * (size_t)D;
    const float *base = qkv + seq * (size_t)T * stride + (size_t)head * hd;

    float *qs = smem;                      /* [FLASH_QB][hd]   */
    float *ks = qs + FLASH_QB * hd;        /* [FLASH_KT][hd+1] */
    float *vs = ks + FLASH_KT * kst;       /* [FLASH_KT][hd]   */
    for (int idx = threadIdx.x; idx < FLASH_QB * hd; idx += blockDim.x) {
        int t = q0 + idx / hd, d = idx % hd;
        qs[idx] = t < T ? base[(size_t)t * stride + d] : 0.0f;
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
            const float *row = base + (size_t)t * stride;
            ks[j * kst + d] = t < T ? row[D + d] : 0.0f;
            vs[idx] = t < T ? row[2 * D + d] : 0.0f;
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
        float *o = out + (seq * (size_t)T + (size_t)t) * D + (size_t)head * hd;
#pragma unroll
        for (int e = 0; e < E; e++) {
            int d = lane + 32 * e;
            if (d < hd) o[d] = acc[i][e] * inv;
        }
    }
}

template <int E>
static lego_status launch_attention(cudaStream_t s, const float *qkv, size_t seqs, int T,
                                    int heads, int hd, float *out, int flash_only, lego_err *err) {
    const float scale = 1.0f / sqrtf((float)hd);
    const size_t jobs = seqs * (size_t)heads;
    const size_t per_warp = short_bytes_per_warp(T, hd);
    if (!flash_only && T <= SHORT_MAX_TOKENS && per_warp <= SHORT_SMEM_LIMIT) {
        size_t warps = SHORT_SMEM_LIMIT / per_warp;
        if (warps > SHORT_MAX_WARPS) warps = SHORT_MAX_WARPS;
        size_t blocks = (jobs + warps - 1) / warps;
        if (blocks > (size_t)INT_MAX)
            return lego_fail(err, LEGO_ERR_UNSUPPORTED, "attention: %zu sequences are too many",
                             seqs);
        LAUNCH(attention_short_kernel<E>, (unsigned)blocks, (unsigned)(32 * warps),
               warps * per_warp, s)(qkv, out, jobs, T, heads, hd, scale);
        LAUNCH_CHECK("attention_short");
        return LEGO_OK;
    }
    const size_t smem = flash_bytes(hd);
    if (smem > DEFAULT_SMEM_LIMIT)
        CU_TRY(cudaFuncSetAttribute(attention_flash_kernel<E>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    const size_t qblocks = ((size_t)T + FLASH_QB - 1) / FLASH_QB, blocks = jobs * qblocks;
    if (blocks > (size_t)INT_MAX)
        return lego_fail(err, LEGO_ERR_UNSUPPORTED, "attention: %zu sequences are too many", seqs);
    LAUNCH(attention_flash_kernel<E>, (unsigned)blocks, 32 * FLASH_WARPS, smem, s)(
        qkv, out, T, heads, hd, (int)qblocks, scale);
    LAUNCH_CHECK("attention_flash");
    return LEGO_OK;
}

lego_status k_attention(cudaStream_t s, const float *qkv, size_t seqs, int tokens, int heads,
                        int head_dim, float *out, int flash_only, lego_err *err) {
    switch ((head_dim + 31) / 32) {
    case 1: return launch_attention<1>(s, qkv, seqs, tokens, heads, head_dim, out, flash_only, err);
    case 2: return launch_attention<2>(s, qkv, seqs, tokens, heads, head_dim, out, flash_only, err);
    case 3: return launch_attention<3>(s, qkv, seqs, tokens, heads, head_dim, out, flash_only, err);
    case 4: return launch_attention<4>(s, qkv, seqs, tokens, heads, head_dim, out, flash_only, err);
    case 5: return launch_attention<5>(s, qkv, seqs, tokens, heads, head_dim, out, flash_only, err);
    case 6: return launch_attention<6>(s, qkv, seqs, tokens, heads, head_dim, out, flash_only, err);
    case 7: return launch_attention<7>(s, qkv, seqs, tokens, heads, head_dim, out, flash_only, err);
    case 8: return launch_attention<8>(s, qkv, seqs, tokens, heads, head_dim, out, flash_only, err);
    default:
        return lego_fail(err, LEGO_ERR_UNSUPPORTED,
                         "attention: head_dim %d is not supported on CUDA (1..%d)", head_dim,
                         ATTN_MAX_HEAD_DIM);
    }
}
