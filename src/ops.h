/*
 * ops.h -- the CPU kernels a brick is made of.  Internal.
 *
 * Activations are row-major token matrices: `rows` tokens of `dim` floats.
 * Rows of one image are contiguous, so per-image adaLN vectors are found as
 * row / rows_per_image.  Every kernel takes the worker count it may use.
 *
 * Threading: GEMMs go to OpenBLAS.  When OpenBLAS runs each call on the
 * calling thread (OPENBLAS_NUM_THREADS=1, or its sequential or OpenMP
 * builds), op_linear_act splits the rows over our own OpenMP workers, so
 * only one set of threads ever runs: the fast setting.  Otherwise it makes
 * one call and lets OpenBLAS's threads share the GEMM, and op_workers()
 * keeps our pool off the cores OpenBLAS's pool occupies.
 */
#ifndef LEGO_OPS_H
#define LEGO_OPS_H

#include <stddef.h>

#include "model.h"

/* y[rows][out] = x[rows][in] * W^T + b  (one OpenBLAS sgemm, single caller). */
void op_linear(const linear *l, const float *x, size_t rows, float *y);

/* 1 when cblas_sgemm runs each call on the calling thread only, so that
 * op_linear_act spreads GEMMs over our workers; 0 when the BLAS threads
 * them itself. */
int op_blas_on_caller(void);

/* How many of `threads` workers our kernels should use between GEMMs: all
 * of them when the BLAS runs on the caller, else only the cores OpenBLAS's
 * own threads leave free (at least the caller).  Both pools spin while they
 * wait, so more would oversubscribe the cores and stall both. */
int op_workers(int threads);

/* What op_linear_act applies to its output. */
typedef enum op_act {
    OP_ACT_NONE,
    OP_ACT_GELU_TANH
} op_act;

/* y = act(x * W^T + b) over `threads` workers (see the note above). */
void op_linear_act(const linear *l, const float *x, size_t rows, float *y, op_act act,
                   int threads);

/* y = LayerNorm(x) * (1 + scale) + shift, LayerNorm without affine,
 * eps 1e-6.  shift/scale of image i are at mod + i*mod_stride (+ dim for
 * scale).  y may not alias x. */
void op_layernorm_modulate(const float *x, size_t rows, int dim, size_t rows_per_image,
                           const float *shift, const float *scale, size_t mod_stride,
                           float *y, int threads);

/* x += gate * y per image, gate of image i at gate + i*mod_stride. */
void op_gated_residual(float *x, const float *y, size_t rows, int dim, size_t rows_per_image,
                       const float *gate, size_t mod_stride, int threads);

/* The two above fused, one pass per row: x += gate * y, then
 * out = LayerNorm(x) * (1 + scale) + shift.  Image i's gate is at
 * gate + i*gate_stride, its shift and scale mod_stride apart (the next
 * LayerNorm may belong to another table).  out may alias y (each row of y
 * is read before that row of out is written), not x. */
void op_gated_residual_layernorm(float *x, const float *y, size_t rows, int dim,
                                 size_t rows_per_image, const float *gate, size_t gate_stride,
                                 const float *shift, const float *scale, size_t mod_stride,
                                 float *out, int threads);

/* x = GELU(x) with the tanh approximation, in place. */
void op_gelu_tanh(float *x, size_t n, int threads);

/* y = GELU(x); y may be x. */
void op_gelu_tanh_to(const float *x, float *y, size_t n, int threads);

/* d *= GELU'(x): the backward pass of op_gelu_tanh_to, x its input. */
void op_gelu_tanh_grad(const float *x, float *d, size_t n, int threads);

/* x = SiLU(x) = x * sigmoid(x), in place. */
void op_silu(float *x, size_t n);

/* Multi-head self-attention over `seqs` independent sequences of `tokens`
 * rows each.  qkv rows are [q | k | v], each [heads][head_dim]; out rows are
 * [heads][head_dim].  `scratch` holds op_attention_scratch(tokens, head_dim)
 * floats per worker. */
void op_attention(const float *qkv, size_t seqs, int tokens, int heads, int head_dim,
                  float *out, float *scratch, int threads);
size_t op_attention_scratch(int tokens, int head_dim);

/* op_attention for training: also keeps the softmax probabilities of
 * sequence s, head h at probs + (s*heads + h)*tokens*tokens, row-major
 * [query][key], for the backward pass. */
void op_attention_train(const float *qkv, size_t seqs, int tokens, int heads, int head_dim,
                        float *probs, float *out, float *scratch, int threads);

/* Backward of op_attention_train: dqkv (rows like qkv, overwritten) from
 * dout (rows like out), given the forward pass's qkv and probs. */
void op_attention_backward(const float *qkv, const float *probs, const float *dout, size_t seqs,
                           int tokens, int heads, int head_dim, float *dqkv, float *scratch,
                           int threads);

/* Scratch floats per worker for both training passes (SIZE_MAX when the
 * count overflows). */
size_t op_attention_train_scratch(int tokens, int head_dim);

#endif /* LEGO_OPS_H */
