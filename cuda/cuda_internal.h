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
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

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

/* ---- activation types ------------------------------------------------------ */

/* A brick's GEMM inputs and the attention's operands are stored in the
 * handle's precision: float, bf16 or fp16 (T below).  The residual stream,
 * LayerNorm statistics, adaLN vectors and every accumulation stay fp32. */
typedef __nv_bfloat16 bf16;
typedef __half f16;

template <class T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<bf16>(bf16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float<f16>(f16 v) { return __half2float(v); }

template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ f16 from_float<f16>(float v) { return __float2half_rn(v); }

/* Two values as one word of two 16-bit T, the first in the low half (the
 * layout of MMA fragments and of paired stores). */
template <class T> __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    T a = from_float<T>(lo), b = from_float<T>(hi);
    uint16_t ua, ub;
    memcpy(&ua, &a, 2);
    memcpy(&ub, &b, 2);
    return (uint32_t)ua | (uint32_t)ub << 16;
}

/* The cuBLASLt type of T. */
template <class T> struct lt_type;
template <> struct lt_type<float> { static const cudaDataType value = CUDA_R_32F; };
template <> struct lt_type<bf16> { static const cudaDataType value = CUDA_R_16BF; };
template <> struct lt_type<f16> { static const cudaDataType value = CUDA_R_16F; };

static inline size_t dtype_bytes(cudaDataType t) { return t == CUDA_R_32F ? 4 : 2; }

/* Switch to `device` for the lifetime of the guard, then back. */
struct device_guard {
    int previous;
    bool switched;
    cudaError_t status;
    explicit device_guard(int device) : previous(0), switched(false), status(cudaSuccess) {
        status = cudaGetDevice(&previous);
        if (status == cudaSuccess && previous != device) {
            status = cudaSetDevice(device);
            switched = status == cudaSuccess;
        }
    }
    ~device_guard() {
        if (switched) cudaSetDevice(previous);
    }
    device_guard(const device_guard &) = delete;
    device_guard &operator=(const device_guard &) = delete;
};

/* ---- tensor-core MMA (device) --------------------------------------------- */

/* d += a b for one warp: a 16x16 (row-major fragments a[4]), b 16x8
 * (column-major fragments b[2]), d 16x8 fp32 (d[4]), the fragment layouts
 * of PTX's mma.m16n8k16: with g = lane / 4 and q = lane % 4, a[0] holds
 * A[g][2q..2q+1], a[1] A[g+8][2q..], a[2] A[g][2q+8..], a[3] A[g+8][2q+8..];
 * b[0] holds B[2q..2q+1][g], b[1] B[2q+8..2q+9][g]; d[0..1] are D[g][2q..],
 * d[2..3] D[g+8][2q..].  The lower half of a word is the lower column (or
 * row, for B).  The host emulation (tests/cuda-emu/) defines its own. */
#ifndef LEGO_EMU_MMA
template <class T> __device__ __forceinline__ void mma_16816(float d[4], const uint32_t a[4],
                                                             const uint32_t b[2]);
template <> __device__ __forceinline__ void mma_16816<bf16>(float d[4], const uint32_t a[4],
                                                            const uint32_t b[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma_16816<f16>(float d[4], const uint32_t a[4],
                                                           const uint32_t b[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

/* ldmatrix: the warp loads 8x8 matrices of 16-bit values from shared
 * memory, lanes 8m..8m+7 giving the addresses of the rows of matrix m (16
 * bytes each, 16-byte aligned).  r[m] of lane L holds row L/4, columns
 * 2(L%4) and 2(L%4)+1 of matrix m; with _trans, rows 2(L%4) and 2(L%4)+1
 * of column L/4 (the matrix transposed).  x4: four matrices, x2: two (the
 * addresses of lanes 0-15). */
__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr(row)));
}
/* cp.async: 16 bytes from global to shared memory without passing through
 * registers, zero-filled when !valid (src is then not read); a commit
 * closes a group of copies, cp_async_wait<N> waits until at most N groups
 * are in flight. */
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit(void) {
    asm volatile("cp.async.commit_group;\n" ::);
}
template <int N> __device__ __forceinline__ void cp_async_wait(void) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}
#endif

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

/* What follows the product.  GELU: GELU(C + bias), by the GELU_BIAS
 * epilogue or a kernel.  The training fusions, only through
 * gemm_run_fused: GELU_AUX, GELU(C + bias) with C + bias also stored in
 * aux (fc1's forward: GELU's input, which the backward pass reads);
 * DGELU, C times GELU'(aux) (fc2's input gradient becoming fc1's output
 * gradient). */
typedef enum gemm_act {
    GEMM_ACT_NONE = 0,
    GEMM_ACT_GELU = 1,
    GEMM_ACT_GELU_AUX = 2,
    GEMM_ACT_DGELU = 3
} gemm_act;

/* Algorithms the heuristic is asked for per shape; the first call of a
 * large enough shape outside graph capture times them and keeps the
 * fastest (unless the call asks for a deterministic choice). */
#define GEMM_CANDIDATES 8
#define GEMM_TUNE_MIN_FLOPS 1e8

/* One GEMM in cuBLASLt's column-major terms:
 *     C (M x N, ld ldc) = alpha op(A) op(B) + beta C  [+ bias per row of C]  [then GELU]
 * A is stored K x M when ta (else M x K), B N x K when tb (else K x N).
 * batch > 1: a strided batch, matrix i at A + i sa, B + i sb, C + i sc
 * (elements).  A and B of type ab, C and the bias of type dt; fp32
 * accumulation always (CUBLAS_COMPUTE_32F: no TF32 for fp32 operands). */
typedef struct gemm_call {
    int ta, tb;
    uint64_t M, N, K;
    const void *A, *B;
    void *C;
    int64_t lda, ldb, ldc;
    cudaDataType ab, dt;
    float alpha, beta;
    const void *bias; /* NULL: none */
    gemm_act act;
    int batch;
    int64_t sa, sb, sc;
    /* The heuristic's first algorithm, never a timed choice: the same bits
     * on every run (training, so that a resumed run continues exactly). */
    int deterministic;
    /* gemm_run_fused only.  aux: GELU_AUX's output or DGELU's input, of
     * type dt, M x N with leading dimension ldaux.  bgrad (fp32 C only,
     * act NONE): the column sums of op(B) over K, i.e. the bias gradient
     * of a weight-gradient GEMM dW = x^T dy, written (not added) there. */
    void *aux;
    int64_t ldaux;
    float *bgrad;
} gemm_call;

/* One prepared call shape: descriptors and the chosen algorithm, keyed by
 * everything of a gemm_call but its pointers and scalars, plus what the
 * pointers are aligned to and whether C is read (beta != 0). */
typedef struct gemm_entry {
    int used;
    gemm_call key;
    int beta_one, gelu_allowed;
    uint32_t align[4]; /* A, B, C, bias: the power of two each is aligned to */
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algo;   /* the one in use                     */
    cublasLtMatmulAlgo_t candidates[GEMM_CANDIDATES]; /* the heuristic's best few */
    int num_candidates;
    int tuned;                   /* the candidates were timed (or need not be) */
    cublasLtEpilogue_t epilogue; /* what the GEMM applies itself        */
    int post_bias, post_gelu;    /* what kernels must apply afterwards */
    int unavailable;             /* a fusion the heuristic does not offer */
} gemm_entry;

/* Inference uses a few tens of shapes, a training step about a hundred. */
#define GEMM_CACHE 256

typedef struct gemm_ctx {
    cublasLtHandle_t lt;
    cudaStream_t stream;
    void *workspace; /* cuBLASLt's workspace, allocated once */
    size_t workspace_bytes;
    int gelu_epilogue; /* fc1's GELU inside the GEMM (see gemm_probe_gelu) */
    char gelu_note[120]; /* what gemm_probe_gelu measured and decided      */
    int autotune;      /* time the candidates of large shapes (default 1) */
    uint64_t tuned_shapes;
    uint64_t fused_runs, fused_refused; /* gemm_run_fused's outcomes */
    /* Training's fusions checked per operand type (fp32, bf16, fp16) by
     * gemm_check_fusions at the first fused call: checked, and the
     * GEMM_FUSION_* bits that disagreed (those calls then decline, counted
     * in fused_rejected); the first disagreement in words. */
    unsigned char fusion_checked[3], fusion_bad[3];
    int fusion_checking;
    uint64_t fused_rejected;
    char fusion_note[200];
    gemm_entry cache[GEMM_CACHE];
    int next_evict;
} gemm_ctx;

lego_status gemm_init(gemm_ctx *g, cudaStream_t stream, lego_err *err);
void gemm_destroy(gemm_ctx *g);

/* y[rows][out] = act(x[rows][in] * W^T + b), W row-major [out][in], all
 * pointers DEVICE_ALIGN-aligned device memory.  W and x are of ab_type, y
 * and b of d_type (CUDA_R_32F, CUDA_R_16BF or CUDA_R_16F); accumulation is
 * fp32 (CUBLAS_COMPUTE_32F: no TF32). */
lego_status gemm_linear(gemm_ctx *g, const void *w, const void *b, int in, int out,
                        const void *x, size_t rows, void *y, cudaDataType ab_type,
                        cudaDataType d_type, gemm_act act, lego_err *err);

/* Any GEMM of the form above, on g's stream, through g's cache of prepared
 * shapes.  Operands need only the alignment of their type (the heuristic is
 * told when they have less than DEVICE_ALIGN); the bias must have
 * DEVICE_ALIGN.  A bias or GELU the chosen algorithm does not apply itself
 * is applied by a kernel afterwards, which needs ldc == M and batch 1. */
lego_status gemm_run(gemm_ctx *g, const gemm_call *call, lego_err *err);

/* A call with a training fusion (act GELU_AUX or DGELU, or bgrad), all in
 * the GEMM's epilogue: *done = 1.  Where cuBLASLt offers no algorithm for
 * it (remembered per shape), or the fusion failed its check (the first
 * fused call of an operand type runs gemm_check_fusions), nothing runs and
 * *done = 0: the caller does the plain GEMM and the kernels instead. */
lego_status gemm_run_fused(gemm_ctx *g, const gemm_call *call, int *done, lego_err *err);

/* gemm_run with the GELU epilogue allowed or not; *used (may be NULL)
 * receives the epilogue the GEMM itself applied. */
lego_status gemm_run_ex(gemm_ctx *g, const gemm_call *call, int gelu_allowed,
                        cublasLtEpilogue_t *used, lego_err *err);

/* ---- what the epilogues compute (gemm_check.cu) --------------------------- */

/* Whether cuBLASLt's GELU_BIAS epilogue computes the tanh-approximated GELU
 * of the reference (to 1e-5 relative): runs it on a ramp of inputs and
 * compares with the formula.  *is_tanh = 0 also when the epilogue is not
 * available.  Uses (and frees) a small device buffer of its own. */
lego_status gemm_probe_gelu(gemm_ctx *g, int *is_tanh, lego_err *err);

/* Training's fusions, one bit each. */
#define GEMM_FUSION_GELU_AUX 1u /* GELU_AUX_BIAS: fc1's forward          */
#define GEMM_FUSION_DGELU 2u    /* DGELU: fc2's input gradient            */
#define GEMM_FUSION_BGRADB 4u   /* BGRADB: a weight gradient's bias sums  */

/* Runs each of training's fusions with operands of type t (as the trainer
 * calls them) on small operands whose results the host computes exactly,
 * and sets in *bad the bits of those that disagree or that the heuristic
 * does not offer there; the first disagreement goes into g->fusion_note.
 * Synchronises g's stream; uses (and frees) a small device buffer. */
lego_status gemm_check_fusions(gemm_ctx *g, cudaDataType t, unsigned *bad, lego_err *err);

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

/* The geometry of brick k for n images of h x w (every patch). */
static inline tok_geom brick_geometry(const lego_model *m, int k, int n, int h, int w) {
    const brick *b = &m->bricks[k];
    tok_geom g;
    g.C = m->cfg.img_channels;
    g.c_in = b->c_in;
    g.p = b->cfg.patch_size;
    g.bs = b->cfg.brick_size;
    g.grid = b->grid;
    g.tokens = b->tokens;
    g.patches_x = w / g.bs;
    g.h = h;
    g.w = w;
    g.rows_per_image = (size_t)(h / g.bs) * (size_t)g.patches_x * (size_t)b->tokens;
    g.rows = (size_t)n * g.rows_per_image;
    g.row_step = 2.0f / (float)(h - 1);
    g.col_step = 2.0f / (float)(w - 1);
    return g;
}

/* Token row r's image and top-left pixel, as brick.c finds them.  With a
 * patch table (m patches per image, their indices at table[img * m ...],
 * rows_per_image = m * tokens) the row's patch comes from it; without,
 * rows cover every patch in order. */
__device__ __forceinline__ void token_origin(const tok_geom &g, const int32_t *table, size_t r,
                                             size_t *img, int *y0, int *x0) {
    size_t in_img = r % g.rows_per_image;
    int slot = (int)(in_img / (size_t)g.tokens), tok = (int)(in_img % (size_t)g.tokens);
    *img = r / g.rows_per_image;
    int patch = table ? table[*img * (g.rows_per_image / (size_t)g.tokens) + (size_t)slot] : slot;
    *y0 = (patch / g.patches_x) * g.bs + (tok / g.grid) * g.p;
    *x0 = (patch % g.patches_x) * g.bs + (tok % g.grid) * g.p;
}

/* Column col of token row r, in a row laid out (channel, y, x) as the
 * patch embedding reads it: its image, channel and pixel (y, x). */
__device__ __forceinline__ void patch_pixel_chw(const tok_geom &g, const int32_t *table, size_t r,
                                                int col, size_t *img, int *channel, int *y,
                                                int *x) {
    int pp = g.p * g.p, y0, x0;
    token_origin(g, table, r, img, &y0, &x0);
    *channel = col / pp;
    *y = y0 + (col % pp) / g.p;
    *x = x0 + col % g.p;
}

/* The same for a row laid out (y, x, channel), as the final layer
 * writes it. */
__device__ __forceinline__ void patch_pixel_hwc(const tok_geom &g, const int32_t *table, size_t r,
                                                int col, size_t *img, int *channel, int *y,
                                                int *x) {
    int y0, x0;
    token_origin(g, table, r, img, &y0, &x0);
    *channel = col % g.C;
    *y = y0 + col / (g.p * g.C);
    *x = x0 + (col / g.C) % g.p;
}

/* emb[i] = [cos(c_noise[i] * freq) | sin(c_noise[i] * freq)], freq of
 * fdim/2 entries (float products, cos/sin in double as the CPU). */
lego_status k_timestep_embedding(cudaStream_t s, const float *c_noise, const float *freq, int nb,
                                 int fdim, float *emb, lego_err *err);
/* y = SiLU(x); y may be x. */
lego_status k_silu(cudaStream_t s, const float *x, size_t n, float *y, lego_err *err);
/* x = GELU_tanh(x), the CPU's formula; x of type `type`. */
lego_status k_gelu(cudaStream_t s, void *x, cudaDataType type, size_t n, lego_err *err);
/* x += y. */
lego_status k_add(cudaStream_t s, float *x, const float *y, size_t n, lego_err *err);
/* x[r][i] += bias[i]; x and bias of type `type`. */
lego_status k_add_bias(cudaStream_t s, void *x, const void *bias, cudaDataType type, size_t rows,
                       int dim, lego_err *err);
/* dst[i] = (T)src[i], for the low-precision copy of the weights. */
lego_status k_convert(cudaStream_t s, const float *src, size_t n, void *dst, cudaDataType type,
                      lego_err *err);
/* xin[i] = coef[3*(i%n)] * x[i%n] for the nb images of chw floats. */
lego_status k_scale_inputs(cudaStream_t s, const float *x, const float *coef, int n, int nb,
                           size_t chw, float *xin, lego_err *err);
/* Token rows [rows][c_in*p*p] (of type T) from [below], xin and the
 * coordinates. */
template <class T>
lego_status k_gather(cudaStream_t s, const tok_geom *g, const int32_t *table, const float *xin,
                     const float *below, T *dst, lego_err *err);
/* Token rows [rows][p*p*C] back into n x C x h x w. */
lego_status k_scatter(cudaStream_t s, const tok_geom *g, const float *src, float *out,
                      lego_err *err);
/* How the LayerNorm kernels for dim a multiple of 128 take their rows
 * (CUDA_OPT_LAYERNORM; the same bits either way). */
enum { LN_PER_ROW = 0, LN_TILED = 1 };
/* (x += pos[r % tokens] when pos) then y = LN(x)*(1+scale)+shift, y of
 * type T, the residual stream x of type R (fp32, or T: CUDA_OPT_RESIDUAL),
 * the arithmetic fp32.  mode: LN_TILED or LN_PER_ROW. */
template <class T, class R>
lego_status k_layernorm_modulate(cudaStream_t s, R *x, const float *pos, int tokens,
                                 size_t rows, int dim, size_t rows_per_image, const float *shift,
                                 const float *scale, size_t mod_stride, T *y, int mode,
                                 lego_err *err);
/* x += gate*y, out = LN(x)*(1+scale)+shift; y (a GEMM output) and out of
 * type T, x of type R (the sum in fp32, rounded to R once, and the
 * statistics of the rounded row); out must not overlap y. */
template <class T, class R>
lego_status k_gated_residual_layernorm(cudaStream_t s, R *x, const T *y, size_t rows,
                                       int dim, size_t rows_per_image, const float *gate,
                                       size_t gate_stride, const float *shift,
                                       const float *scale, size_t mod_stride, T *out, int mode,
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

/* How k_attention may choose its kernel (tests force each one). */
typedef enum attn_mode {
    ATTN_AUTO = 0,       /* short kernel for <= 32 tokens, else the best tiled one */
    ATTN_FLASH_ONLY = 1, /* the tiled kernels even for short sequences      */
    ATTN_NO_MMA = 2,     /* never the tensor-core kernel                    */
    ATTN_MMA32 = 3,      /* as ATTN_AUTO with the 32-rows-per-warp tensor-core kernel */
    ATTN_CUDNN = 4,      /* cuDNN's fused attention wherever it takes the shape */
    ATTN_OWN = 5         /* as ATTN_AUTO but never cuDNN (nothing timed) */
} attn_mode;

/* Sequences at most this long stay on the one-warp-per-head kernels. */
#define ATTN_SHORT_MAX_TOKENS 32

/* Multi-head self-attention of `seqs` sequences of `tokens` rows each, qkv
 * rows [q | k | v] each [heads][head_dim], out rows [heads][head_dim] (as
 * op_attention), both of type T, fp32 arithmetic.  Short sequences take
 * the one-warp-per-head kernel; longer ones a flash-style kernel, on the
 * tensor cores for bf16/fp16 when head_dim is a multiple of 8 (<= 128). */
template <class T>
lego_status k_attention(cudaStream_t s, const T *qkv, size_t seqs, int tokens, int heads,
                        int head_dim, T *out, int mode, lego_err *err);

/* ---- attention through cuDNN (cudnn_attention.cu) --------------------------- */

/* Training's attention on the tensor cores (bf16/fp16, head_dim a multiple
 * of 8 up to 128; LEGO_ERR_UNSUPPORTED otherwise, fp32 included).
 * k_attention_lse is k_attention's tensor-core kernel that also writes
 * lse[row * heads + head] = ln sum_j exp(scale q.k_j); k_attention_bwd
 * (attention_bwd.cu) writes every element of dqkv ([rows][3D], the layout
 * of qkv) from dO (the output's gradient, type T), lse and
 * delta[row * heads + head] = dO . O over the head. */
template <class T>
lego_status k_attention_lse(cudaStream_t s, const T *qkv, size_t seqs, int tokens, int heads,
                            int head_dim, T *out, float *lse, lego_err *err);
template <class T>
lego_status k_attention_bwd(cudaStream_t s, const T *qkv, const T *dO, const float *lse,
                            const float *delta, size_t seqs, int tokens, int heads, int head_dim,
                            T *dqkv, lego_err *err);

/* One attention call's shape, as k_attention takes it. */
typedef struct attn_shape {
    size_t seqs;
    int tokens, heads, head_dim;
    cudaDataType type; /* of qkv and out */
} attn_shape;

static inline int attn_shape_equal(const attn_shape *a, const attn_shape *b) {
    return a->seqs == b->seqs && a->tokens == b->tokens && a->heads == b->heads &&
           a->head_dim == b->head_dim && a->type == b->type;
}

/* Which operation graph a plan was built from. */
enum { CUDNN_GRAPH_SDPA = 1, CUDNN_GRAPH_COMPOSITE = 2 };

typedef struct cudnn_attn_info {
    int available;       /* the library was loaded and a cuDNN handle made */
    long version;        /* cudnnGetVersion(), 0 when not loaded           */
    uint64_t plans, runs;
    int last_graph;      /* CUDNN_GRAPH_* of the last plan built           */
    char note[200];      /* why cuDNN, or the last shape it refused, is not used */
} cudnn_attn_info;

/* A handle's cuDNN: loaded with dlopen when first wanted; never an error
 * when the library is absent (the result is then simply not available). */
struct cudnn_attn;
lego_status cudnn_attn_open(cudaStream_t stream, struct cudnn_attn **out, lego_err *err);
void cudnn_attn_close(struct cudnn_attn *c);
/* Device bytes held (the workspace). */
size_t cudnn_attn_bytes(const struct cudnn_attn *c);
/* Moves whenever a plan is dropped or the workspace moves: CUDA graphs that
 * captured earlier runs must not be replayed after that. */
uint64_t cudnn_attn_generation(const struct cudnn_attn *c);
void cudnn_attn_get_info(const struct cudnn_attn *c, cudnn_attn_info *out);
/* Whether the shape is one cuDNN's fused attention may take at all
 * (bf16/fp16, head_dim a multiple of 8 up to 128). */
int cudnn_attn_supports(const attn_shape *sh);
/* Build (once) the plan and workspace of a shape: 1 when cuDNN takes it,
 * 0 when it does not (no engine, no library, or the workspace would grow
 * by more than `room` bytes or cannot be allocated: the note says which).
 * Never an error of the request.  Not while the stream is being captured. */
int cudnn_attn_prepare(struct cudnn_attn *c, const attn_shape *sh, size_t room);
/* Enqueue a prepared shape's attention (capturable): the k_attention
 * contract. */
lego_status cudnn_attn_run(struct cudnn_attn *c, const attn_shape *sh, const void *qkv, void *out,
                           lego_err *err);

/* ---- the handle as train.cu sees it (backend.cu) --------------------------- */

typedef struct backend_view {
    int device;
    cudaStream_t stream;
    gemm_ctx *gemm;
    int precision;       /* cuda_precision */
    int train_attn;      /* CUDA_OPT_TRAIN_ATTENTION */
    int train_tune;      /* CUDA_OPT_TRAIN_AUTOTUNE  */
    int train_epi;       /* CUDA_OPT_TRAIN_EPILOGUES */
    int train_ln_sums;   /* CUDA_OPT_TRAIN_LN_SUMS   */
    float *params;       /* fp32 weights: table entry i at params + doff[i] */
    void *lp;            /* their bf16/fp16 copy at the same offsets, NULL if none */
    const size_t *doff;
    int doff_count;      /* table entries doff describes */
    size_t params_used;  /* floats, padding between tensors included */
    const float *freq;   /* time-embedding frequencies */
    void **train;        /* the handle's training state (train.cu), owned by it */
} backend_view;

/* Bring the device weights up to date (as an evaluation does: re-uploaded
 * when m->weights_gen moved, the 16-bit copy reconverted when stale) and
 * describe the handle.  The caller selects the device. */
lego_status backend_view_sync(lego_model *m, backend_view *v, lego_err *err);
/* The same without bringing the weights up to date (to copy them back). */
lego_status backend_view_peek(lego_model *m, backend_view *v, lego_err *err);
/* The fp32 device weights were changed on the device (an optimiser step):
 * the 16-bit copy is reconverted before its next use. */
void backend_weights_written(lego_model *m);
/* Whether replacing old_bytes of the handle's device memory by new_bytes
 * stays within the model's device budget. */
lego_status backend_budget(const lego_model *m, size_t old_bytes, size_t new_bytes,
                           const char *what, lego_err *err);
/* The handle's device, -1 without one. */
int backend_device(const lego_model *m);
/* philox_normal_f32 (rng.h) into device memory, enqueued on `s`
 * (philox.cu). */
lego_status k_philox_normal(cudaStream_t s, uint64_t seed, uint64_t stream, uint64_t first,
                            size_t n, float *out, lego_err *err);
/* train.cu: device bytes and release of a handle's training state. */
size_t train_state_bytes(const void *train);
void train_state_free(void *train);

/* ---- the network as the device sampling loop drives it (backend.cu) ---- */

/* The bytes a CUDA graph of one evaluation depends on (backend.cu's
 * graph_key: shape, options, kernel choices, every device address). */
#define CUDA_EVAL_KEY_BYTES 96

/* One network evaluation planned in the handle's workspace.  The caller
 * writes x (the network's float input), c_noise and coef (nb and 3n per
 * image values: c_in, c_skip, c_out), enqueues, and reads out; the label
 * rows were staged once by cuda_eval_plan. */
typedef struct cuda_eval {
    cudaStream_t stream;
    int n, nb, h, w, guided, label_rows;
    float guidance;
    size_t chw;
    float *x, *c_noise, *coef, *out;
    char *extra;     /* extra_bytes of the workspace for the caller, aligned */
    int graphs;      /* graphs allowed (CUDA_OPT_GRAPHS, not profiling)     */
} cuda_eval;

/* Plan evaluations of n images of h x w with `guidance` and label rows
 * (n x label_dim, or NULL) for a sampling run: refresh the weights, grow
 * the workspace by extra_bytes for the caller (within the device budget),
 * upload the label rows.  Failures into m->err. */
lego_status cuda_eval_plan(lego_model *m, int n, int h, int w, float guidance,
                           const float *label_vectors, size_t extra_bytes, cuda_eval *e);
/* Enqueue D(x; sigma) with bricks `mask`: kernels and GEMMs only, no copy,
 * no synchronisation (so it may be captured). */
lego_status cuda_eval_enqueue(lego_model *m, const cuda_eval *e, uint32_t mask);
/* The graph key of that evaluation, zero-padded to CUDA_EVAL_KEY_BYTES. */
void cuda_eval_key(const lego_model *m, const cuda_eval *e, uint32_t mask,
                   unsigned char key[CUDA_EVAL_KEY_BYTES]);
/* c_noise and {c_in, c_skip, c_out} of noise level `sigma`, as
 * cuda_backend_denoise (and the CPU's model_denoise) compute them. */
void cuda_eval_coefs(const lego_model *m, float sigma, float *c_noise, float coef[3]);
/* cudaMemcpyAsync between the host and the device on the handle's
 * stream, counted in cuda_stats.host_copies. */
lego_status cuda_eval_copy(lego_model *m, void *dst, const void *src, size_t bytes,
                           cudaMemcpyKind kind);
/* cudaStreamSynchronize of the handle's stream, counted for sample_syncs. */
lego_status cuda_eval_sync(lego_model *m);
/* Capture enqueue(ctx, err) on the handle's stream into *exec, after the
 * caller ran the same work eagerly (backend.cu's capture_work): a failed
 * capture is not an error of the request.  CAPTURED: *exec is the graph;
 * CAPTURE_EAGER: keep this work eager; CAPTURE_RETRY: cuDNN ran in it and
 * was dropped, capture it again next time. */
typedef enum capture_result { CAPTURED, CAPTURE_EAGER, CAPTURE_RETRY } capture_result;
typedef lego_status (*capture_fn)(void *ctx, lego_err *err);
capture_result cuda_eval_capture(lego_model *m, capture_fn enqueue, void *ctx,
                                 cudaGraphExec_t *exec);

/* ---- the device sampling loop (sampler.cu) -------------------------------- */

/* The loop's own state, owned by the handle (h->sampler): its step graphs. */
struct cuda_sampler;
/* The run itself, called by cuda_backend_sample with the device selected. */
lego_status sampler_run(lego_model *m, struct cuda_sampler **state, const cuda_sample_run *r);
void sampler_free(struct cuda_sampler *s);
/* Drop the step graphs (the weights or the workspace moved). */
void sampler_clear_graphs(struct cuda_sampler *s);
void sampler_graph_counts(const struct cuda_sampler *s, uint64_t *captures, uint64_t *launches);

#endif /* LEGO_CUDA_INTERNAL_H */
