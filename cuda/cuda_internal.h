/*
 * cuda_internal.h -- what the files of the CUDA backend share: error
 * conversion, the cuBLASLt GEMM wrapper, and the launchers of every kernel.
 * CUDA C++; included only by the .cu files of cuda/.
 *
 * Layouts are the CPU's (src/brick.c, src/ops.h): activations are row-major
 * token matrices, rows = tokens of all patches of all images in the order
 * image, patch row, patch column, token row, token column; images are NCHW.
 * Every launcher enqueues on the given stream, checks the launch, records
 * a message in `err` on failure and returns a lego_status.  None allocates.
 */
#ifndef LEGO_CUDA_INTERNAL_H
#define LEGO_CUDA_INTERNAL_H

#include <cublasLt.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

extern "C" {
#include "denoise.h"
#include "model.h"
}
#include "backend_cuda.h"

/* Kernel launches and dynamic shared memory go through these two macros so
 * that the host emulation in tests/cuda-emu/ can run the same sources without a
 * GPU (its cuda_runtime.h defines its own versions; docs/cuda.md). */
#ifndef LAUNCH
#define LAUNCH(kernel, grid, block, smem, stream) kernel<<<(grid), (block), (smem), (stream)>>>
#define DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#endif

/* ---- errors ------------------------------------------------------------ */

/* LEGO_OK for cudaSuccess; else a message naming `what` in err and
 * LEGO_ERR_OUT_OF_MEMORY (device allocation) or LEGO_ERR_BACKEND. */
lego_status cu_status(cudaError_t e, lego_err *err, const char *what);
/* The same for cuBLAS / cuBLASLt status codes. */
lego_status lt_status(cublasStatus_t s, lego_err *err, const char *what);

/* Early-return helpers; they expect `lego_err *err` in scope. */
#define CU_TRY(call)                                                           \
    do {                                                                       \
        lego_status cu_s_ = cu_status((call), err, #call);                     \
        if (cu_s_ != LEGO_OK) return cu_s_;                                    \
    } while (0)
#define LT_TRY(call)                                                           \
    do {                                                                       \
        lego_status lt_s_ = lt_status((call), err, #call);                     \
        if (lt_s_ != LEGO_OK) return lt_s_;                                    \
    } while (0)
#define LEGO_TRY(call)                                                         \
    do {                                                                       \
        lego_status lg_s_ = (call);                                            \
        if (lg_s_ != LEGO_OK) return lg_s_;                                    \
    } while (0)

/* Kernels are launched, then this checks the launch (configuration errors;
 * faults inside a kernel surface at the next synchronisation). */
#define LAUNCH_CHECK(name) CU_TRY(cudaGetLastError())

/* Every device buffer handed to cuBLASLt starts on this many bytes (its
 * heuristics assume 256 by default); the weights and the workspace are laid
 * out so that every tensor and every buffer does. */
#define DEVICE_ALIGN 256
#define ALIGN_FLOATS (DEVICE_ALIGN / sizeof(float))

static inline size_t round_up_floats(size_t n) {
    return (n + ALIGN_FLOATS - 1) / ALIGN_FLOATS * ALIGN_FLOATS;
}

/* Threads per block for the simple element-wise kernels, and a grid for
 * `total` elements with a grid-stride loop beyond that. */
#define EW_THREADS 256
static inline unsigned ew_blocks(size_t total) {
    size_t b = (total + EW_THREADS - 1) / EW_THREADS;
    if (b > 65535u * 8u) b = 65535u * 8u;
    return b ? (unsigned)b : 1u;
}

/* ---- warp reductions (device) ------------------------------------------- */

#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

/* ---- GEMM (gemm.cu) ------------------------------------------------------ */

typedef enum gemm_act { GEMM_ACT_NONE = 0, GEMM_ACT_GELU = 1 } gemm_act;

/* One prepared cuBLASLt call shape: descriptors and the algorithm the
 * heuristic chose, keyed by (out, rows, in, act, epilogue allowed). */
typedef struct gemm_entry {
    int used;
    uint64_t out, rows, in;
    int act, gelu_allowed;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, d;
    cublasLtMatmulAlgo_t algo;
    cublasLtEpilogue_t epilogue; /* what the GEMM applies itself        */
    int post_bias, post_gelu;    /* what kernels must apply afterwards */
} gemm_entry;

#define GEMM_CACHE 128

typedef struct gemm_ctx {
    cublasLtHandle_t lt;
    cudaStream_t stream;
    void *workspace; /* cuBLASLt's workspace, allocated once */
    size_t workspace_bytes;
    int gelu_epilogue; /* fc1's GELU inside the GEMM (see gemm_probe_gelu) */
    gemm_entry cache[GEMM_CACHE];
    int next_evict;
} gemm_ctx;

lego_status gemm_init(gemm_ctx *g, cudaStream_t stream, lego_err *err);
void gemm_destroy(gemm_ctx *g);

/* y[rows][out] = act(x[rows][in] * W^T + b), W row-major [out][in], all
 * pointers DEVICE_ALIGN-aligned device memory.  fp32 in and out, fp32
 * accumulation (CUBLAS_COMPUTE_32F: no TF32). */
lego_status gemm_linear(gemm_ctx *g, const float *w, const float *b, int in, int out,
                        const float *x, size_t rows, float *y, gemm_act act, lego_err *err);

/* Whether cuBLASLt's GELU_BIAS epilogue computes the tanh-approximated GELU
 * of the reference (to 1e-5 relative): runs it on a ramp of inputs and
 * compares with the formula.  *is_tanh = 0 also when the epilogue is not
 * available.  Uses (and frees) a small device buffer of its own. */
lego_status gemm_probe_gelu(gemm_ctx *g, int *is_tanh, lego_err *err);

/* ---- kernels (kernels.cu) ------------------------------------------------ */

/* Where the tokens of a brick lie in the images (brick.c's geometry). */
typedef struct tok_geom {
    int C;          /* image channels                          */
    int c_in;       /* brick input channels                    */
    int p;          /* patch (token) side                      */
    int bs;         /* brick side                              */
    int grid;       /* tokens per brick side                   */
    int tokens;     /* grid^2                                  */
    int patches_x;  /* brick patches per image row             */
    int h, w;       /* image size                              */
    size_t rows_per_image;
    size_t rows;    /* all tokens of the batch                 */
    float row_step, col_step; /* 2/(h-1), 2/(w-1), rounded as the CPU */
} tok_geom;

/* emb[i] = [cos(c_noise[i] * freq) | sin(c_noise[i] * freq)], freq of
 * fdim/2 entries (float products, cos/sin in double as the CPU). */
lego_status k_timestep_embedding(cudaStream_t s, const float *c_noise, const float *freq, int nb,
                                 int fdim, float *emb, lego_err *err);
/* y = SiLU(x); y may be x. */
lego_status k_silu(cudaStream_t s, const float *x, size_t n, float *y, lego_err *err);
/* x = GELU_tanh(x), the CPU's formula. */
lego_status k_gelu(cudaStream_t s, float *x, size_t n, lego_err *err);
/* x += y. */
lego_status k_add(cudaStream_t s, float *x, const float *y, size_t n, lego_err *err);
/* x[r][i] += bias[i]. */
lego_status k_add_bias(cudaStream_t s, float *x, const float *bias, size_t rows, int dim,
                       lego_err *err);
/* xin[i] = coef[3*(i%n)] * x[i%n] for the nb images of chw floats. */
lego_status k_scale_inputs(cudaStream_t s, const float *x, const float *coef, int n, int nb,
                           size_t chw, float *xin, lego_err *err);
/* Token rows [rows][c_in*p*p] from [below], xin and the coordinates. */
lego_status k_gather(cudaStream_t s, const tok_geom *g, const float *xin, const float *below,
                     float *dst, lego_err *err);
/* Token rows [rows][p*p*C] back into n x C x h x w. */
lego_status k_scatter(cudaStream_t s, const tok_geom *g, const float *src, float *out,
                      lego_err *err);
/* (x += pos[r % tokens] when pos) then y = LN(x)*(1+scale)+shift. */
lego_status k_layernorm_modulate(cudaStream_t s, float *x, const float *pos, int tokens,
                                 size_t rows, int dim, size_t rows_per_image, const float *shift,
                                 const float *scale, size_t mod_stride, float *y, lego_err *err);
/* x += gate*y, out = LN(x)*(1+scale)+shift; out may alias y. */
lego_status k_gated_residual_layernorm(cudaStream_t s, float *x, const float *y, size_t rows,
                                       int dim, size_t rows_per_image, const float *gate,
                                       size_t gate_stride, const float *shift,
                                       const float *scale, size_t mod_stride, float *out,
                                       lego_err *err);
/* out = f[n..2n) + g (f[0..n) - f[n..2n)) over n images of chw floats. */
lego_status k_guide(cudaStream_t s, const float *f, int n, size_t chw, float g, float *out,
                    lego_err *err);
/* out = coef[3i+1] x + coef[3i+2] f per image i. */
lego_status k_edm(cudaStream_t s, const float *x, const float *f, const float *coef, int n,
                  size_t chw, float *out, lego_err *err);

/* ---- attention (attention.cu) -------------------------------------------- */

/* The largest head_dim the kernels take (8 values per lane of a warp). */
#define ATTN_MAX_HEAD_DIM 256

/* Multi-head self-attention of `seqs` sequences of `tokens` rows each, qkv
 * rows [q | k | v] each [heads][head_dim], out rows [heads][head_dim] (as
 * op_attention).  Short sequences take the one-warp-per-head kernel unless
 * flash_only; the rest the tiled online-softmax kernel. */
lego_status k_attention(cudaStream_t s, const float *qkv, size_t seqs, int tokens, int heads,
                        int head_dim, float *out, int flash_only, lego_err *err);

#endif /* LEGO_CUDA_INTERNAL_H */
