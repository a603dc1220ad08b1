/*
 * train.h -- the training loss and the trainer (Adam/AdamW, EMA, sigma and
 * noise draws, state files).  Internal; the public side is the "Training"
 * section of lego.h.  Tests reach the pieces below directly.
 */
#ifndef LEGO_TRAIN_H
#define LEGO_TRAIN_H

#include "backward.h"
#include "model.h"

struct lego_trainer {
    lego_err err;
    int failed;               /* creation failed: only free/error work */
    lego_model *m;            /* borrowed */
    lego_train_options opt;
    int height, width;
    /* The model's shape when the trainer was made: a model that grew a
     * brick since cannot be trained with these buffers. */
    size_t num_values;
    int num_bricks;

    float *ema, *adam_m, *adam_v, *grads; /* each num_values, params layout */
    int64_t step;             /* steps taken, skipped ones included */
    int64_t adam_t;           /* updates applied (Adam's bias correction) */
    int64_t images_seen;
    int64_t skipped;
    uint64_t seed;
    /* The last step's loss, grad_norm, lr, ema_beta and skipped (zeros
     * before a step and after a load); get_stats adds the counters. */
    lego_train_stats last;

    /* Activations and batch buffers for `batch_n` images, rebuilt when a
     * step brings another batch size. */
    int batch_n;
    int batch_gpu;            /* the batch buffers are the GPU path's (no cache) */
    int cuda_attached;        /* its state lives on the model's GPU (cuda/train.cu) */
    net_cache *cache;
    float *y, *noise, *sigma, *label_vectors, *scratch;
};

/* Floats of scratch train_loss_grads needs for n images of h x w (x, one
 * gradient image per brick, the fill of patch sampling); 0 on overflow. */
size_t train_scratch_floats(const lego_model *m, int n, int h, int w);

/* The training loss of a batch already validated, on a cache made for its
 * shape; with `grads` (zeroed here) also its gradient.  label_vectors may
 * be NULL (null labels).  The bricks run on the patches the cache says
 * (net_use_all_patches or net_sample_patches). */
void train_loss_grads(const lego_model *m, net_cache *c, const float *y, const float *noise,
                      const float *sigma, const float *label_vectors, float *scratch,
                      double *loss, float *grads);

/* The batch step number t->step trains on: flipped images, noise, sigma
 * and one-hot labels after dropout, from the trainer's Philox streams.
 * Arguments as lego_trainer_step, already validated; noise may be NULL (not
 * drawn: a model on the GPU draws it there). */
void trainer_draw_batch(const lego_trainer *t, const float *images, const int32_t *labels, int n,
                        float *y, float *noise, float *sigma, float *label_vectors);

#endif /* LEGO_TRAIN_H */
