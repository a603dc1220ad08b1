/*
 * backward.h -- the LEGO network's forward pass with an activation cache,
 * and its backward pass, on the CPU.  Internal; used by train.c.
 *
 * The forward here computes the same F_k as brick.c but keeps every
 * intermediate the backward pass reads (LayerNorm statistics, attention
 * probabilities, pre-GELU values, ...).  All of it lives in one arena sized
 * for a batch shape (n images of h x w); a trainer keeps one and reuses it.
 *
 * Shapes: R = tokens of a brick over the whole batch (n*h*w/p^2), D the
 * hidden size, Hm the MLP width, T tokens per brick patch, heads the
 * attention heads.  Token order as in brick.c: image, patch row, patch
 * column, token row, token column.
 */
#ifndef LEGO_BACKWARD_H
#define LEGO_BACKWARD_H

#include "model.h"

/* What one DiT block keeps from the forward pass. */
typedef struct block_acts {
    float *x;            /* [R][D] block input (residual stream)           */
    float *mean1, *rstd1;/* [R] statistics of the first LayerNorm           */
    float *h1;           /* [R][D] modulated LayerNorm: the qkv input       */
    float *qkv;          /* [R][3D]                                          */
    float *probs;        /* [R/T][heads][T][T] softmax probabilities         */
    float *att;          /* [R][D] attention output: the proj input          */
    float *a;            /* [R][D] proj output, gated into the residual      */
    float *x2;           /* [R][D] residual stream after attention           */
    float *mean2, *rstd2;
    float *h2;           /* [R][D] the fc1 input                             */
    float *u;            /* [R][Hm] fc1 output before GELU                   */
    float *g;            /* [R][Hm] GELU(u): the fc2 input                   */
    float *f;            /* [R][D] fc2 output, gated into the residual       */
} block_acts;

/* What one brick keeps. */
typedef struct brick_acts {
    size_t rows;            /* R */
    size_t rows_per_image;
    int patches_x;          /* brick patches per image row */
    /* Patch sampling (paper eq. 12): this pass runs patches_used of the
     * brick's patches_total patches per image, those listed ascending in
     * patch_index[img * patches_used + slot]; NULL = all of them. */
    int patches_total;
    int patches_used;
    int32_t *patch_index;   /* [n][patches_total] room                     */
    float *patches;         /* [R][c_in*p*p] gathered inputs                */
    float *mods;            /* adaLN vectors: [depth][n][6D], then [n][2D]  */
    block_acts blocks[LEGO_MAX_DEPTH];
    float *xf;              /* [R][D] input of the final layer              */
    float *meanf, *rstdf;
    float *hf;              /* [R][D] the final linear's input              */
    float *out;             /* F_k, n x C x h x w                           */
} brick_acts;

typedef struct net_cache {
    int n, h, w;
    float *mem;             /* the arena everything below points into */
    size_t floats;

    /* Conditioning */
    float *emb;             /* [n][fdim] sinusoidal embedding of c_noise    */
    float *t_pre;           /* [n][D] t_embedder first linear, before SiLU  */
    float *t_hid;           /* [n][D] SiLU(t_pre)                           */
    float *cond;            /* [n][D] c                                     */
    float *silu_c;          /* [n][D] SiLU(c): the adaLN input              */
    float *labels;          /* [n][label_dim] one-hot rows (zeros = null)   */
    float *xin;             /* [n][C][h][w] c_in * x                        */
    brick_acts *bricks;     /* one per brick (separate allocation)          */

    /* Backward scratch, sized for the widest brick. */
    float *dx, *dh, *dt;    /* [R][D] each                                  */
    float *wide;            /* [R][max(3D, Hm, c_in p^2, p^2 C)]            */
    float *dmods;           /* [n][depth*6D + 2D] of one brick              */
    float *dsilu;           /* [n][D] dL/dSiLU(c), summed over bricks       */
    float *dcond;           /* [n][D]                                       */
    float *dhid;            /* [n][D]                                       */
    float *att_scratch;     /* threads x T                                  */
    int threads;            /* workers att_scratch has rows for: the model's
                               count when the cache was made (it may change) */
    int32_t *index_mem;     /* every brick's patch_index                    */
} net_cache;

/* A cache for n images of h x w (h, w already checked against the model).
 * Fails with LEGO_ERR_OUT_OF_MEMORY, message in `err`, on absurd sizes. */
lego_status net_cache_create(const lego_model *m, int n, int h, int w, net_cache **out,
                             lego_err *err);
void net_cache_free(net_cache *c);

/* A cache with the patch tables alone (no activations): what a model on
 * the GPU, which keeps its activations on the device, needs of it. */
lego_status net_tables_create(const lego_model *m, int n, int h, int w, net_cache **out,
                              lego_err *err);

/* Every brick on every patch (the joint training of the reference); the
 * state of a new cache. */
void net_use_all_patches(const lego_model *m, net_cache *c);

/* Patch-sampled training (paper eq. 12): each brick runs on
 * net_patches_kept(total, fraction) of its patches per image, drawn
 * without replacement, independently per image and brick, from Philox
 * (seed, stream).  A brick with one patch per image (an image brick)
 * always runs whole.  fraction is in (0, 1]. */
void net_sample_patches(const lego_model *m, net_cache *c, double fraction, uint64_t seed,
                        uint64_t stream);
int net_patches_kept(int total, double fraction);

/* 1 when some brick runs on a subset of its patches. */
int net_sampling_patches(const lego_model *m, const net_cache *c);

/* Conditioning and every brick on the noisy images x (n x C x h x w) at
 * noise levels sigma (n, > 0).  label_vectors: n x label_dim, or NULL for
 * null labels.  F_k lands in c->bricks[k].out.  When bricks run on subsets
 * of their patches, `fill` (n x C x h x w) gives F_k at the pixels brick k
 * does not compute: the context the brick above reads there.  It may be
 * NULL when every brick runs whole. */
void net_forward(const lego_model *m, net_cache *c, const float *x, const float *sigma,
                 const float *label_vectors, const float *fill);

/* Backpropagate after net_forward.  dF: [K][n][C][h][w], on entry dL/dF_k
 * as the loss sees each brick's output directly; clobbered (the gradient
 * each brick passes to the one below is added in).  grads: the layout of
 * m->params, accumulated into (the caller zeroes it); fixed parameters
 * (position embeddings) receive nothing. */
void net_backward(const lego_model *m, net_cache *c, float *dF, float *grads);

#endif /* LEGO_BACKWARD_H */
