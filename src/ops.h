/*
 * ops.h -- the CPU kernels a brick is made of.  Internal.
 *
 * Activations are row-major token matrices: `rows` tokens of `dim` floats.
 * Rows of one image are contiguous, so per-image adaLN vectors are found as
 * row / rows_per_image.  Every kernel takes the worker count it may use.
 */
#ifndef LEGO_OPS_H
#define LEGO_OPS_H

#include <stddef.h>

#include "model.h"

/* y[rows][out] = x[rows][in] * W^T + b  (OpenBLAS sgemm). */
void op_linear(const linear *l, const float *x, size_t rows, float *y);

/* y = LayerNorm(x) * (1 + scale) + shift, LayerNorm without affine,
 * eps 1e-6.  shift/scale of image i are at mod + i*mod_stride (+ dim for
 * scale).  y may not alias x. */
void op_layernorm_modulate(const float *x, size_t rows, int dim, size_t rows_per_image,
                           const float *shift, const float *scale, size_t mod_stride,
                           float *y, int threads);

/* x += gate * y per image, gate of image i at gate + i*mod_stride. */
void op_gated_residual(float *x, const float *y, size_t rows, int dim, size_t rows_per_image,
                       const float *gate, size_t mod_stride, int threads);

/* x = GELU(x) with the tanh approximation, in place. */
void op_gelu_tanh(float *x, size_t n, int threads);

/* x = SiLU(x) = x * sigmoid(x), in place. */
void op_silu(float *x, size_t n);

/* Multi-head self-attention over `seqs` independent sequences of `tokens`
 * rows each.  qkv rows are [q | k | v], each [heads][head_dim]; out rows are
 * [heads][head_dim].  `scratch` holds op_attention_scratch(tokens, head_dim)
 * floats per worker. */
void op_attention(const float *qkv, size_t seqs, int tokens, int heads, int head_dim,
                  float *out, float *scratch, int threads);
size_t op_attention_scratch(int tokens, int head_dim);

#endif /* LEGO_OPS_H */
