/*
 * train_internal.h -- what cuda/train.cu and cuda/train_kernels.cu share:
 * the launchers of the training kernels.  CUDA C++, cuda/ only.
 *
 * Layouts are those of src/backward_cpu.c: token matrices row-major
 * [rows][width] in the order image, patch, token; adaLN vectors [n][6D]
 * per block; images NCHW.  T is the type of GEMM operands (float, or bf16
 * in bf16 precision); everything else is fp32.  Every launcher enqueues on
 * `s`, checks the launch and returns a status (message in err).
 */
#ifndef LEGO_CUDA_TRAIN_INTERNAL_H
#define LEGO_CUDA_TRAIN_INTERNAL_H

#include "cuda_internal.h"

#define TRAIN_LN_EPS 1e-6f
/* Per-image values uploaded each step: c_in, c_skip, c_out, dscale. */
#define TRAIN_COEF 4
/* Rows per chunk of the deterministic column sums, and chunks per sum of
 * each later pass (so that no thread adds more than this many in a row:
 * a bias over 65536 rows would leave 1024 chunks to one thread). */
#define TRAIN_SUM_CHUNK 64
#define TRAIN_SUM_FAN 32
/* Blocks of the gradient-norm reduction (a fixed count: a fixed order). */
#define TRAIN_NORM_BLOCKS 512

enum { COLSUM_PLAIN = 0, COLSUM_PROD = 1, COLSUM_LN = 2 };

/* One optimiser update (train.c's adam_update and ema_update). */
typedef struct train_adam {
    double lr, beta1, beta2, eps, weight_decay;
    double step_size; /* lr / (1 - beta1^t) */
    double sqrt_bc2;  /* sqrt(1 - beta2^t) */
    float gscale;     /* clipping factor */
    float ema_beta;
    int adamw;
} train_adam;

lego_status t_zero(cudaStream_t s, float *x, size_t n, lego_err *err);
lego_status t_noisy_input(cudaStream_t s, const float *y, const float *noise, const float *coef,
                          const float *sigma, int n, size_t chw, float *x, float *xin,
                          lego_err *err);
lego_status t_silu(cudaStream_t s, const float *x, size_t n, float *y, lego_err *err);
lego_status t_silu_bwd(cudaStream_t s, const float *z, const float *dy, size_t n, float *d,
                       lego_err *err);
template <class T> lego_status t_gelu(cudaStream_t s, const T *u, size_t n, T *g, lego_err *err);
template <class T>
lego_status t_gelu_bwd(cudaStream_t s, const T *u, const T *dg, size_t n, T *du, lego_err *err);

/* Tokens: `table` NULL = every patch of every image in order; else m
 * patch indices per image (rows_per_image = m * tokens); the gather is
 * k_gather (kernels.cu). */
lego_status t_rows_to_image(cudaStream_t s, const tok_geom *g, const int32_t *table,
                            const float *rows, float *image, lego_err *err);
template <class T>
lego_status t_image_to_rows(cudaStream_t s, const tok_geom *g, const int32_t *table,
                            const float *image, T *rows, lego_err *err);
lego_status t_below_grad(cudaStream_t s, const tok_geom *g, const int32_t *table,
                         const float *dpatches, float *dbelow, lego_err *err);

template <class T>
lego_status t_ln_fwd(cudaStream_t s, float *x, const float *pos, int tokens, size_t rows, int D,
                     size_t rpi, const float *mod, size_t stride, float *mean, float *rstd, T *y,
                     lego_err *err);
/* out = x + gate*y (y a GEMM output of type T, the gate of image i at
 * gate + i*gstride), then t_ln_fwd of out (no position embedding), in one
 * pass. */
template <class T>
lego_status t_gated_ln_fwd(cudaStream_t s, const float *x, const T *yb, size_t rows, int D,
                           size_t rpi, const float *gate, size_t gstride, float *out,
                           const float *mod, size_t stride, float *mean, float *rstd, T *y,
                           lego_err *err);
/* dx += (or, with assign, =) the LayerNorm's input gradient; with dg
 * (else NULL), also dg = dx * gate per image (gate NULL: dx) as type T,
 * the operand that the next layer's backward reads. */
template <class T>
lego_status t_ln_bwd(cudaStream_t s, const float *x, const float *mean, const float *rstd,
                     const float *dy, size_t rows, int D, size_t rpi, const float *mod,
                     size_t stride, float *dx, int assign, const float *gate, size_t gstride,
                     T *dg, lego_err *err);
/* t_ln_bwd and, from the same reads, the LayerNorm's modulation gradients
 * (dshift += sum dy, dscale += sum dy*xhat per image, at stride dstride
 * between images) and, with branch (the output of the residual branch
 * that `gate` scales), the gate's gradient dgate += sum dx*branch (laid
 * out as gate, at stride gstride): the
 * t_colsum passes COLSUM_LN and COLSUM_PROD over these rows, without
 * reading them again.  D <= LN_SUM_MAX_D; partial and partial2 each hold
 * t_colsum_doubles(rows, rpi, D) doubles. */
#define LN_SUM_MAX_D 512
template <class T>
lego_status t_ln_bwd_sums(cudaStream_t s, const float *x, const float *mean, const float *rstd,
                          const float *dy, size_t rows, int D, size_t rpi, const float *mod,
                          size_t stride, float *dx, int assign, const float *gate,
                          size_t gstride, T *dg, float *dshift, float *dscale, size_t dstride,
                          const T *branch, float *dgate, double *partial, double *partial2,
                          lego_err *err);

/* Column sums per group of rpi rows (see train_kernels.cu); `partial`
 * holds t_colsum_doubles(rows, rpi, D) doubles. */
template <class TA, class TB = float>
lego_status t_colsum(cudaStream_t s, int mode, const TA *a, const TB *b, const float *mean,
                     const float *rstd, size_t rows, size_t rpi, int D, float *out0, float *out1,
                     size_t stride, double *partial, lego_err *err);
size_t t_colsum_doubles(size_t rows, size_t rpi, int D);

/* Attention keeping one log-sum-exp per (row, head): lse [rows][heads];
 * the backward recomputes the probabilities from it.  delta: [rows][heads]
 * scratch. */
template <class T>
lego_status t_attn_fwd(cudaStream_t s, const T *qkv, size_t seqs, int tokens, int heads, int hd,
                       T *out, float *lse, lego_err *err);
template <class T>
lego_status t_attn_bwd(cudaStream_t s, const T *qkv, const T *out, const float *lse,
                       const float *dout, size_t seqs, int tokens, int heads, int hd,
                       float *delta, T *dqkv, lego_err *err);

/* Per brick, the patches the loss covers: table (device, [n][used]) or
 * NULL for the whole image; scale = total / used as float. */
typedef struct train_loss_tables {
    const int32_t *table[LEGO_MAX_BRICKS];
    int used[LEGO_MAX_BRICKS], bs[LEGO_MAX_BRICKS], patches_x[LEGO_MAX_BRICKS];
    float scale[LEGO_MAX_BRICKS];
} train_loss_tables;

/* The GEMM formulation of attention (train.cu): softmax rows of S (fp32
 * [rows][Tn], scaled scores of one head for a chunk of sequences whose
 * first row is row0) into P (type T) and lse; P recomputed (dP NULL) or
 * dS = P (dP - delta) scale; delta [rows][heads] = dout . out. */
template <class T>
lego_status t_softmax_rows(cudaStream_t s, const float *S, size_t rows, int Tn, int heads,
                           int head, size_t row0, T *P, float *lse, lego_err *err);
template <class T>
lego_status t_attn_probs(cudaStream_t s, const float *S, const float *dP, size_t rows, int Tn,
                         int heads, int head, size_t row0, const float *lse, const float *delta,
                         float scale, T *out, lego_err *err);
/* delta = rowsum(dout o out) per (row, head); with dout_t (else NULL),
 * dout converted to T on the way. */
template <class T>
lego_status t_attn_delta(cudaStream_t s, const float *dout, const T *out, size_t rows, int heads,
                         int hd, float *delta, T *dout_t, lego_err *err);

/* The loss: dF [K][n][chw] and sums [K][n] (double) from x, y and the brick
 * outputs F [K][n][chw]; coef [n][TRAIN_COEF]; images C x ? x w. */
lego_status t_loss(cudaStream_t s, const float *x, const float *y, const float *F,
                   const float *coef, int n, int K, int C, int w, size_t chw,
                   const train_loss_tables *tb, float *dF, double *sums, lego_err *err);
/* fill = a_i y - b_i noise (double arithmetic), ab = {a_i, b_i}. */
lego_status t_fill(cudaStream_t s, const float *y, const float *noise, const double *ab, int n,
                   size_t chw, float *fill, lego_err *err);
lego_status t_copy(cudaStream_t s, const float *src, size_t n, float *dst, lego_err *err);
/* *out = sum of g^2; partial holds TRAIN_NORM_BLOCKS doubles. */
lego_status t_sumsq(cudaStream_t s, const float *g, size_t n, double *partial, double *out,
                    lego_err *err);
lego_status t_adam(cudaStream_t s, float *w, const float *g, float *mm, float *vv, float *ema,
                   const unsigned char *mask, size_t n, const train_adam *a, lego_err *err);

#endif /* LEGO_CUDA_TRAIN_INTERNAL_H */
