/*
 * model.h -- the in-memory LEGO network: configuration, the parameter
 * table, and the per-brick views into it.  Internal.
 *
 * All parameters live in one float32 array (`params`) described by a table
 * of named entries in a fixed order (time embedder, label embedder, then
 * brick by brick).  The order is the reference state dict's, so loading,
 * saving, initialising and (later) optimising are simple walks of the table.
 */
#ifndef LEGO_MODEL_H
#define LEGO_MODEL_H

#include "common.h"

typedef struct lego_param {
    char name[96];     /* reference PyTorch key, e.g. model.model.0.pos_embed */
    int rank;
    int64_t shape[4];
    size_t offset;     /* into model->params */
    size_t numel;
    int fixed;         /* not trained (position embeddings) */
} lego_param;

/* Views into the parameter array; rebound whenever it moves. */
typedef struct linear {
    const float *w; /* [out][in] */
    const float *b; /* [out] */
    int in, out;
} linear;

typedef struct dit_block {
    linear qkv, proj, fc1, fc2, ada;
} dit_block;

typedef struct brick {
    lego_brick_config cfg;
    int c_in;        /* input channels: C+2 for brick 0, 2C+2 above it */
    int grid;        /* tokens per side of one brick patch: brick/patch */
    int tokens;      /* grid^2 */
    const float *pos_embed; /* [tokens][D] */
    linear embed;    /* patch embedding as a linear over c_in*p*p */
    dit_block blocks[64];
    linear final_ada, final_out;
    int first_param; /* index of the brick's first entry in the table */
} brick;

/* The largest depth a brick may have (blocks[] above). */
#define LEGO_MAX_DEPTH 64

struct lego_model {
    lego_err err;
    int failed;          /* creation or loading failed: only free/error work */
    lego_model_config cfg;
    int mlp_hidden;      /* int(D * mlp_ratio) as the reference computes it */
    int threads;         /* resolved worker count, >= 1 */

    brick bricks[LEGO_MAX_BRICKS];
    int num_bricks;
    linear t_fc1, t_fc2, y_embed; /* y_embed.w is NULL when unconditional */

    lego_param *table;
    int num_params, cap_params;
    float *params;
    size_t params_size; /* floats */
    /* A model being loaded: the table is built but `params` stays NULL
     * until the file has shown it holds every tensor (read_weights), so a
     * small file cannot make the loader allocate what its config claims. */
    int table_only;

    /* Scratch for the forward pass, grown on demand and kept between calls
     * so the sampling loop does not allocate. */
    float *work;
    size_t work_size; /* floats */
    /* lego_model_set_memory_budget: the most host bytes the model may hold
     * plus what one call allocates while it runs; 0 = no limit. */
    size_t mem_budget;
    /* lego_model_set_device_memory_budget: the most GPU bytes the model's
     * CUDA handle may hold; 0 = no limit. */
    size_t device_budget;

    /* Bumped whenever the values in `params` change (model_weights_changed):
     * a device copy of the weights is stale when its generation differs. */
    uint64_t weights_gen;
    /* The CUDA backend's handle (backend_cuda.h) when cfg.backend is
     * LEGO_BACKEND_CUDA, else NULL.  Owned by the model. */
    void *cuda;
};

/* Allocate a blank handle carrying `status` and a message: what a failed
 * constructor hands back (NULL if even that fails). */
lego_model *model_new_failed(lego_status status, const char *msg);

/* lego_model_create; with table_only, a model whose parameter array is
 * left for the loader to allocate (see lego_model.table_only). */
lego_status model_create(const lego_model_config *config, int table_only, lego_model **out);

/* Check global settings; fills a message in `err` on failure. */
lego_status model_validate_config(const lego_model_config *cfg, lego_err *err);
lego_status model_validate_brick(const lego_model *m, const lego_brick_config *b, lego_err *err);

/* The number of parameters lego_model_create + lego_brick_add would give
 * this architecture, without allocating them.  Validates as they do. */
lego_status model_count_params(const lego_model_config *cfg, const lego_brick_config *bricks,
                               int num_bricks, int64_t *count, lego_err *err);

/* Point the linear views at their slices of m->params (also counts as
 * model_weights_changed). */
void model_bind_views(lego_model *m);

/* Say that values in m->params changed in place (initialisation, an
 * optimiser step, lego_model_set_params): a device copy is refreshed
 * before its next use.  Anything that writes m->params must call it. */
void model_weights_changed(lego_model *m);

/* Ensure m->work holds at least `floats` floats (within the budget). */
lego_status model_reserve_work(lego_model *m, size_t floats);

/* Host bytes the model holds now: the handle, the parameter table and
 * array, the scratch. */
size_t model_memory_usage(const lego_model *m);

/* LEGO_OK when a call may allocate `extra_bytes` more than the model holds
 * without passing its memory budget; else LEGO_ERR_OUT_OF_MEMORY with a
 * message naming the bytes needed and allowed.  Every path that allocates
 * for a request (the CPU forward pass, the samplers, another backend's host
 * buffers) asks before it allocates. */
lego_status model_memory_check(lego_model *m, size_t extra_bytes);

/* Bytes by which model_reserve_work(m, floats) would grow the scratch. */
size_t model_work_growth(const lego_model *m, size_t floats);

/* The lego.config JSON of a model (malloc'd), and its parser. */
char *config_to_json(const lego_model *m);
lego_status config_from_json(const char *json, lego_model_config *cfg,
                             lego_brick_config *bricks, int *num_bricks, lego_err *err);

/* Fill a brick's fixed 2-D sin-cos position embedding, [grid*grid][D]. */
void sincos_pos_embed(float *out, int grid, int dim);

/* Floats in the widest row of any activation of brick b: qkv, the MLP
 * hidden layer, or the patch rows in and out.  One definition for the CPU
 * forward and backward passes and the CUDA workspace. */
size_t model_widest_activation(const lego_model *m, const brick *b);

/* Hand every entry point the same prologue: a usable, non-failed model. */
#define MODEL_CHECK(m)                                                         \
    do {                                                                       \
        if (!(m)) return LEGO_ERR_INVALID_ARGUMENT;                            \
        if ((m)->failed)                                                       \
            return LEGO_ERR_STATE;                                             \
        lego_err_clear(&(m)->err);                                             \
    } while (0)

#endif /* LEGO_MODEL_H */
