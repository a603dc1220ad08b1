/*
 * denoise.h -- D(x; sigma) on validated arguments, shared by lego_denoise
 * and the samplers.  Internal.
 */
#ifndef LEGO_DENOISE_H
#define LEGO_DENOISE_H

#include "model.h"

typedef struct denoise_args {
    int n, h, w;
    const float *x;             /* n x C x h x w */
    const float *sigma;         /* n, finite, > 0 */
    const float *label_vectors; /* n x label_dim, or NULL = null labels */
    float guidance;             /* >= 0; 1 = none, 0 = unconditional */
    uint32_t brick_mask;        /* bit k: run brick k; bit 0 always set */
    float *out;                 /* n x C x h x w */
    float *brick_outputs;       /* optional [K][n][C][h][w] */
    float *cond_out;            /* optional n x D */
} denoise_args;

lego_status model_denoise(lego_model *m, const denoise_args *a);

/* Class indices (-1 = null) to one-hot rows, malloc'd, n x label_dim; NULL
 * for unconditional models or NULL labels.  Fails on out-of-range labels. */
lego_status labels_to_rows(lego_model *m, int n, const int32_t *labels, float **out);

/* Scratch floats model_denoise needs; fails on absurd sizes. */
lego_status model_denoise_floats(const lego_model *m, int n, int h, int w, int guided,
                                 size_t *floats);

/* Sinusoidal embedding of c_noise into out[0 .. dim-1], [cos | sin], as
 * the reference computes it in float32: f_i = exp(-ln(10000) * i / half).
 * One definition for inference and training, so both see the same bits. */
void denoise_timestep_embedding(float c_noise, int dim, float *out);

/* Whether a guidance scale makes model_denoise run the unconditional half. */
int denoise_guided(const lego_model *m, float guidance);

/* The memory-budget check of a request that evaluates D on n images of
 * h x w: the scratch it would add plus `temp_bytes` the caller allocates
 * for the call.  Message into m->err. */
lego_status denoise_memory_check(lego_model *m, int n, int h, int w, int guided,
                                 size_t temp_bytes);

#endif /* LEGO_DENOISE_H */
