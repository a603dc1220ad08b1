/*
 * model.c -- building a LEGO network: settings, bricks, the parameter table
 * and its views, the reference initialisation, and introspection.
 */
#define _POSIX_C_SOURCE 200809L
#include "model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend_cuda.h"
#include "rng.h"

/* Hard limits that keep every later size computation far from overflow. */
#define MAX_CHANNELS 4096
#define MAX_HIDDEN 65536
#define MAX_LABELS 1000000
#define MAX_BRICK_SIZE 65536

lego_model *model_new_failed(lego_status status, const char *msg) {
    lego_model *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    m->failed = 1;
    lego_fail(&m->err, status, "%s", msg);
    return m;
}

static int resolve_threads(int requested) {
    if (requested > 0) return requested;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

lego_status model_validate_config(const lego_model_config *c, lego_err *err) {
    if (c->img_channels < 1 || c->img_channels > MAX_CHANNELS)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                         "img_channels must be in [1, %d], got %d", MAX_CHANNELS, c->img_channels);
    if (c->label_dim < 0 || c->label_dim > MAX_LABELS)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                         "label_dim must be in [0, %d], got %d", MAX_LABELS, c->label_dim);
    if (c->hidden_size < 1 || c->hidden_size > MAX_HIDDEN)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                         "hidden_size must be in [1, %d], got %d", MAX_HIDDEN, c->hidden_size);
    if (c->hidden_size % 4 != 0)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                         "hidden_size must be a multiple of 4 (the 2-D sin-cos position "
                         "embedding), got %d", c->hidden_size);
    if (c->num_heads < 1 || c->hidden_size % c->num_heads != 0)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                         "num_heads (%d) must be positive and divide hidden_size (%d)",
                         c->num_heads, c->hidden_size);
    if (!(c->mlp_ratio > 0 && c->mlp_ratio * c->hidden_size <= 16.0 * MAX_HIDDEN))
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "mlp_ratio %g is out of range",
                         c->mlp_ratio);
    if ((int)(c->hidden_size * c->mlp_ratio) < 1)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "mlp_ratio %g gives an empty MLP",
                         c->mlp_ratio);
    if (c->frequency_embedding_size < 2 || c->frequency_embedding_size > MAX_HIDDEN ||
        c->frequency_embedding_size % 2 != 0)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                         "frequency_embedding_size must be even and in [2, %d], got %d",
                         MAX_HIDDEN, c->frequency_embedding_size);
    if (!(c->sigma_data > 0 && isfinite(c->sigma_data)))
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "sigma_data must be positive, got %g",
                         c->sigma_data);
    if (c->img_resolution < 0 || c->num_threads < 0 || c->num_threads > 4096)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                         "img_resolution and num_threads must be non-negative");
    if (c->precision != LEGO_PRECISION_FP32 && c->precision != LEGO_PRECISION_BF16 &&
        c->precision != LEGO_PRECISION_FP16)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "precision %d is not known to this liblego",
                         (int)c->precision);
    if (c->backend == LEGO_BACKEND_CUDA) {
#ifndef LEGO_HAVE_CUDA
        return lego_fail(err, LEGO_ERR_UNSUPPORTED,
                         "backend CUDA is not built into this liblego (CPU only; build with "
                         "make CUDA=1)");
#endif
        if (c->device < 0)
            return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                             "backend CUDA: device index must be non-negative, got %d", c->device);
    } else if (c->backend != LEGO_BACKEND_CPU) {
        return lego_fail(err, LEGO_ERR_UNSUPPORTED, "backend %d is not known to this liblego",
                         (int)c->backend);
    }
    return LEGO_OK;
}

lego_status model_validate_brick(const lego_model *m, const lego_brick_config *b, lego_err *err) {
    if (m->num_bricks >= LEGO_MAX_BRICKS)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "a model holds at most %d bricks",
                         LEGO_MAX_BRICKS);
    if (b->brick_size < 1 || b->brick_size > MAX_BRICK_SIZE)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "brick_size must be in [1, %d], got %d",
                         MAX_BRICK_SIZE, b->brick_size);
    if (b->patch_size < 1 || b->brick_size % b->patch_size != 0)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                         "patch_size %d must be positive and divide brick_size %d",
                         b->patch_size, b->brick_size);
    if (b->depth < 1 || b->depth > LEGO_MAX_DEPTH)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "depth must be in [1, %d], got %d",
                         LEGO_MAX_DEPTH, b->depth);
    /* Everything per brick must stay within our allocation guard. */
    size_t grid = (size_t)(b->brick_size / b->patch_size), d = (size_t)m->cfg.hidden_size;
    size_t c_in = 2 * (size_t)m->cfg.img_channels + 2, pp = (size_t)b->patch_size * b->patch_size;
    size_t tmp;
    if (!size_mul(grid * grid, d, &tmp) || tmp > LEGO_MAX_ALLOC / 4 ||
        !size_mul(c_in * pp, d, &tmp) || tmp > LEGO_MAX_ALLOC / 4)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "brick %dx%d with patch %d is too large",
                         b->brick_size, b->brick_size, b->patch_size);
    return LEGO_OK;
}

/* ---- the parameter table ---- */

static lego_status add_param(lego_model *m, int fixed, int rank, const int64_t *shape,
                             const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 5, 6)))
#endif
    ;

static lego_status add_param(lego_model *m, int fixed, int rank, const int64_t *shape,
                             const char *fmt, ...) {
    if (m->num_params == m->cap_params) {
        int cap = m->cap_params ? 2 * m->cap_params : 64;
        lego_param *t = realloc(m->table, (size_t)cap * sizeof *t);
        if (!t) return lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
        m->table = t;
        m->cap_params = cap;
    }
    lego_param *p = &m->table[m->num_params++];
    memset(p, 0, sizeof *p);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->name, sizeof p->name, fmt, ap);
    va_end(ap);
    p->rank = rank;
    p->numel = 1;
    for (int i = 0; i < rank; i++) {
        p->shape[i] = shape[i];
        p->numel *= (size_t)shape[i];
    }
    p->offset = m->params_size;
    p->fixed = fixed;
    m->params_size += p->numel;
    return LEGO_OK;
}

/* Register a Linear(in -> out) as "<prefix>.weight" [out, in] and ".bias". */
static lego_status add_linear(lego_model *m, int in, int out, const char *prefix) {
    int64_t w[2] = {out, in}, b[1] = {out};
    lego_status s = add_param(m, 0, 2, w, "%s.weight", prefix);
    if (s == LEGO_OK) s = add_param(m, 0, 1, b, "%s.bias", prefix);
    return s;
}

static void bind_linear(lego_model *m, int *cursor, linear *l, int in, int out) {
    l->w = m->params + m->table[(*cursor)++].offset;
    l->b = m->params + m->table[(*cursor)++].offset;
    l->in = in;
    l->out = out;
}

static lego_status register_globals(lego_model *m) {
    int d = m->cfg.hidden_size;
    lego_status s = add_linear(m, m->cfg.frequency_embedding_size, d, "model.t_embedder.mlp.0");
    if (s == LEGO_OK) s = add_linear(m, d, d, "model.t_embedder.mlp.2");
    if (s == LEGO_OK && m->cfg.label_dim > 0)
        s = add_linear(m, m->cfg.label_dim, d, "model.y_embedder.embedding_table");
    return s;
}

static lego_status register_brick(lego_model *m, int k) {
    brick *b = &m->bricks[k];
    int d = m->cfg.hidden_size, p = b->cfg.patch_size, c = m->cfg.img_channels;
    char pre[96];
    lego_status s;

    b->first_param = m->num_params;
    int64_t pos[3] = {1, b->tokens, d};
    int64_t conv[4] = {d, b->c_in, p, p}, conv_b[1] = {d};
    if ((s = add_param(m, 1, 3, pos, "model.model.%d.pos_embed", k)) != LEGO_OK) return s;
    if ((s = add_param(m, 0, 4, conv, "model.model.%d.x_embedder.proj.weight", k)) != LEGO_OK) return s;
    if ((s = add_param(m, 0, 1, conv_b, "model.model.%d.x_embedder.proj.bias", k)) != LEGO_OK) return s;
    for (int j = 0; j < b->cfg.depth; j++) {
        const struct { const char *name; int in, out; } lin[] = {
            {"attn.qkv", d, 3 * d}, {"attn.proj", d, d}, {"mlp.fc1", d, m->mlp_hidden},
            {"mlp.fc2", m->mlp_hidden, d}, {"adaLN_modulation.1", d, 6 * d},
        };
        for (size_t i = 0; i < sizeof lin / sizeof lin[0]; i++) {
            snprintf(pre, sizeof pre, "model.model.%d.blocks.%d.%s", k, j, lin[i].name);
            if ((s = add_linear(m, lin[i].in, lin[i].out, pre)) != LEGO_OK) return s;
        }
    }
    snprintf(pre, sizeof pre, "model.model.%d.final_layer.linear", k);
    if ((s = add_linear(m, d, p * p * c, pre)) != LEGO_OK) return s;
    snprintf(pre, sizeof pre, "model.model.%d.final_layer.adaLN_modulation.1", k);
    return add_linear(m, d, 2 * d, pre);
}

/* Point every view at its slice of m->params (after the array moved). */
void model_bind_views(lego_model *m) {
    int d = m->cfg.hidden_size, cur = 0;
    bind_linear(m, &cur, &m->t_fc1, m->cfg.frequency_embedding_size, d);
    bind_linear(m, &cur, &m->t_fc2, d, d);
    if (m->cfg.label_dim > 0)
        bind_linear(m, &cur, &m->y_embed, m->cfg.label_dim, d);
    for (int k = 0; k < m->num_bricks; k++) {
        brick *b = &m->bricks[k];
        int p = b->cfg.patch_size;
        b->pos_embed = m->params + m->table[cur++].offset;
        bind_linear(m, &cur, &b->embed, b->c_in * p * p, d);
        for (int j = 0; j < b->cfg.depth; j++) {
            dit_block *blk = &b->blocks[j];
            bind_linear(m, &cur, &blk->qkv, d, 3 * d);
            bind_linear(m, &cur, &blk->proj, d, d);
            bind_linear(m, &cur, &blk->fc1, d, m->mlp_hidden);
            bind_linear(m, &cur, &blk->fc2, m->mlp_hidden, d);
            bind_linear(m, &cur, &blk->ada, d, 6 * d);
        }
        bind_linear(m, &cur, &b->final_out, d, p * p * m->cfg.img_channels);
        bind_linear(m, &cur, &b->final_ada, d, 2 * d);
    }
    model_weights_changed(m);
}

void model_weights_changed(lego_model *m) { m->weights_gen++; }

/* Grow the parameter array to the table's size; new entries start at zero
 * and old values keep their offsets (entries are only ever appended). */
static lego_status grow_params(lego_model *m, size_t old_size) {
    if (m->params_size > LEGO_MAX_ALLOC / sizeof(float))
        return lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY, "model would need %zu parameters",
                         m->params_size);
    if (m->table_only) return LEGO_OK;
    float *p = realloc(m->params, m->params_size * sizeof *p);
    if (!p) return lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY,
                             "out of memory for %zu parameters", m->params_size);
    memset(p + old_size, 0, (m->params_size - old_size) * sizeof *p);
    m->params = p;
    model_bind_views(m);
    return LEGO_OK;
}

/* Fill brick k's derived sizes from a validated configuration. */
static void setup_brick(lego_model *m, int k, const lego_brick_config *bc) {
    brick *b = &m->bricks[k];
    memset(b, 0, sizeof *b);
    b->cfg = *bc;
    b->c_in = (k == 0 ? 1 : 2) * m->cfg.img_channels + 2;
    b->grid = bc->brick_size / bc->patch_size;
    b->tokens = b->grid * b->grid;
}

/* Count by building the same parameter table lego_model_create and
 * lego_brick_add build, only never the array itself: the count cannot drift
 * from the real layout, and a 1.3 G-parameter model costs a few KiB. */
lego_status model_count_params(const lego_model_config *config, const lego_brick_config *bricks,
                               int num_bricks, int64_t *count, lego_err *err) {
    lego_model *m = calloc(1, sizeof *m);
    if (!m) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    lego_model_config_init(&m->cfg);
    lego_copy_options(&m->cfg, sizeof m->cfg, config, config->size);
    m->cfg.size = sizeof m->cfg;
    m->cfg.backend = LEGO_BACKEND_CPU; /* counting needs no device */
    lego_status s = model_validate_config(&m->cfg, &m->err);
    if (s == LEGO_OK) {
        m->mlp_hidden = (int)(m->cfg.hidden_size * m->cfg.mlp_ratio);
        s = register_globals(m);
    }
    for (int k = 0; s == LEGO_OK && k < num_bricks; k++) {
        lego_brick_config bc;
        lego_brick_config_init(&bc);
        lego_copy_options(&bc, sizeof bc, &bricks[k], bricks[k].size);
        bc.size = sizeof bc;
        if ((s = model_validate_brick(m, &bc, &m->err)) != LEGO_OK) break;
        setup_brick(m, k, &bc);
        if ((s = register_brick(m, k)) == LEGO_OK) m->num_bricks++;
    }
    if (s == LEGO_OK) *count = (int64_t)m->params_size;
    else lego_fail(err, s, "%s", m->err.msg);
    free(m->table);
    free(m);
    return s;
}

LEGO_API lego_status lego_model_create(const lego_model_config *config, lego_model **out) {
    return model_create(config, 0, out);
}

lego_status model_create(const lego_model_config *config, int table_only, lego_model **out) {
    if (!out) return LEGO_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (!config) {
        *out = model_new_failed(LEGO_ERR_INVALID_ARGUMENT, "config is NULL");
        return LEGO_ERR_INVALID_ARGUMENT;
    }
    lego_model *m = calloc(1, sizeof *m);
    if (!m) return LEGO_ERR_OUT_OF_MEMORY;
    m->table_only = table_only;
    lego_model_config_init(&m->cfg);
    lego_copy_options(&m->cfg, sizeof m->cfg, config, config->size);
    m->cfg.size = sizeof m->cfg;
    lego_status s = model_validate_config(&m->cfg, &m->err);
    if (s == LEGO_OK) {
        m->mlp_hidden = (int)(m->cfg.hidden_size * m->cfg.mlp_ratio);
        m->threads = resolve_threads(m->cfg.num_threads);
        s = register_globals(m);
    }
    if (s == LEGO_OK) s = grow_params(m, 0);
    if (s == LEGO_OK && m->cfg.backend == LEGO_BACKEND_CUDA)
        s = cuda_backend_create(m, m->cfg.device, &m->cuda, &m->err);
    if (s != LEGO_OK) {
        /* Keep the message; drop everything else. */
        free(m->table);
        free(m->params);
        m->table = NULL;
        m->params = NULL;
        m->failed = 1;
    }
    *out = m;
    return s;
}

LEGO_API lego_status lego_brick_add(lego_model *m, const lego_brick_config *config) {
    MODEL_CHECK(m);
    if (!config) return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "brick config is NULL");
    lego_brick_config bc;
    lego_brick_config_init(&bc);
    lego_copy_options(&bc, sizeof bc, config, config->size);
    bc.size = sizeof bc;
    lego_status s = model_validate_brick(m, &bc, &m->err);
    if (s != LEGO_OK) return s;
    /* Weights trained on the GPU come back before the array grows. */
    if ((s = cuda_backend_pull(m, &m->err)) != LEGO_OK) return s;

    int k = m->num_bricks;
    brick *b = &m->bricks[k];
    setup_brick(m, k, &bc);

    int old_count = m->num_params;
    size_t old_size = m->params_size;
    s = register_brick(m, k);
    if (s == LEGO_OK) {
        m->num_bricks++;
        s = grow_params(m, old_size);
        if (s == LEGO_OK) {
            if (!m->table_only)
                sincos_pos_embed(m->params + m->table[b->first_param].offset, b->grid,
                                 m->cfg.hidden_size);
            return LEGO_OK;
        }
        m->num_bricks--;
    }
    m->num_params = old_count; /* roll back the half-added brick */
    m->params_size = old_size;
    return s;
}

LEGO_API void lego_model_free(lego_model *m) {
    if (!m) return;
    cuda_backend_destroy(m->cuda);
    free(m->table);
    free(m->params);
    free(m->work);
    free(m);
}

LEGO_API const char *lego_model_error(const lego_model *m) {
    if (!m) return "model handle is NULL (out of memory?)";
    return m->err.msg;
}

size_t model_work_growth(const lego_model *m, size_t floats) {
    return floats > m->work_size ? (floats - m->work_size) * sizeof(float) : 0;
}

lego_status model_reserve_work(lego_model *m, size_t floats) {
    if (floats <= m->work_size) return LEGO_OK;
    if (floats > LEGO_MAX_ALLOC / sizeof(float))
        return lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY, "request needs %zu floats of scratch",
                         floats);
    lego_status s = model_memory_check(m, model_work_growth(m, floats));
    if (s != LEGO_OK) return s;
    /* The old contents are not needed: free first, so the old and the new
     * scratch are never held together. */
    free(m->work);
    m->work = NULL;
    m->work_size = 0;
    float *w = malloc(floats * sizeof *w);
    if (!w) return lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY,
                             "out of memory for %zu MiB of scratch", floats * 4 >> 20);
    m->work = w;
    m->work_size = floats;
    return LEGO_OK;
}

/* ---- the memory budget ---- */

size_t model_memory_usage(const lego_model *m) {
    /* Each term is an allocation that succeeded, so the sum fits.  A failed
     * handle has only the handle. */
    return sizeof *m + (m->table ? (size_t)m->cap_params * sizeof *m->table : 0) +
           (m->params ? m->params_size * sizeof *m->params : 0) +
           (m->work ? m->work_size * sizeof *m->work : 0);
}

lego_status model_memory_check(lego_model *m, size_t extra_bytes) {
    size_t held = model_memory_usage(m), total;
    if (m->mem_budget == 0) return LEGO_OK;
    if (size_add(held, extra_bytes, &total) && total <= m->mem_budget) return LEGO_OK;
    return lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY,
                     "the request needs %zu bytes more than the model's %zu, but the memory "
                     "budget allows %zu in all (lego_model_set_memory_budget)",
                     extra_bytes, held, m->mem_budget);
}

LEGO_API lego_status lego_model_set_memory_budget(lego_model *m, size_t bytes) {
    MODEL_CHECK(m);
    if (bytes != 0 && model_memory_usage(m) > bytes) {
        /* The scratch regrows on demand; give it back before refusing. */
        free(m->work);
        m->work = NULL;
        m->work_size = 0;
        if (model_memory_usage(m) > bytes)
            return lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY,
                             "the model's weights alone take %zu bytes, more than a budget of "
                             "%zu", model_memory_usage(m), bytes);
    }
    m->mem_budget = bytes;
    return LEGO_OK;
}

LEGO_API size_t lego_model_memory_usage(const lego_model *m) {
    return m ? model_memory_usage(m) : 0;
}

LEGO_API lego_status lego_model_set_device_memory_budget(lego_model *m, size_t bytes) {
    MODEL_CHECK(m);
    size_t held = cuda_backend_memory(m);
    if (bytes != 0 && held > bytes)
        return lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY,
                         "the model holds %zu bytes of GPU memory, more than a budget of %zu",
                         held, bytes);
    m->device_budget = bytes;
    return LEGO_OK;
}

LEGO_API size_t lego_model_device_memory_usage(const lego_model *m) {
    return m ? cuda_backend_memory(m) : 0;
}

/* ---- the fixed 2-D sin-cos position embedding (MAE / DiT layout) ---- */

/* Half the channels encode the column, half the row; within each half,
 * sin then cos of pos * omega_i with omega_i = 1/10000^(i/(dim/4)).  The
 * reference computes it in float64 and stores float32. */
static void sincos_1d(float *out, int stride, int dim, double pos) {
    int half = dim / 2;
    for (int i = 0; i < half; i++) {
        double omega = 1.0 / pow(10000.0, (double)i / half);
        out[i * stride] = (float)sin(pos * omega);
        out[(half + i) * stride] = (float)cos(pos * omega);
    }
}

void sincos_pos_embed(float *out, int grid, int dim) {
    int half = dim / 2;
    for (int r = 0; r < grid; r++)
        for (int c = 0; c < grid; c++) {
            float *row = out + ((size_t)r * grid + c) * dim;
            memset(row, 0, (size_t)dim * sizeof *row);
            /* MAE uses meshgrid(w, h): the first half embeds the column. */
            sincos_1d(row, 1, half, c);
            sincos_1d(row + half, 1, half, r);
        }
}

/* ---- initialisation ---- */

/* A stream of uniforms in [0, 1) for initialisation: Philox blocks keyed by
 * the caller's seed, one stream per parameter so the result does not depend
 * on how many draws earlier tensors took. */
static void fill_uniform(float *out, size_t n, uint64_t seed, uint64_t stream, float lo, float hi) {
    uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)}, r[4];
    for (size_t i = 0; i < n; i++) {
        if (i % 4 == 0) {
            uint64_t blk = i / 4;
            uint32_t ctr[4] = {(uint32_t)blk, (uint32_t)(blk >> 32), (uint32_t)stream,
                               (uint32_t)(stream >> 32)};
            philox4x32_10(ctr, key, r);
        }
        double u = (r[i % 4] >> 8) * (1.0 / 16777216.0);
        out[i] = (float)(lo + (hi - lo) * u);
    }
}

LEGO_API lego_status lego_model_init_weights(lego_model *m, uint64_t seed) {
    MODEL_CHECK(m);
    memset(m->params, 0, m->params_size * sizeof *m->params);
    for (int i = 0; i < m->num_params; i++) {
        const lego_param *p = &m->table[i];
        float *v = m->params + p->offset;
        const char *n = p->name;
        size_t len = strlen(n);
        int is_weight = len > 7 && strcmp(n + len - 7, ".weight") == 0;
        if (!is_weight) continue; /* biases stay zero; pos_embed set below */
        if (strstr(n, "adaLN_modulation") || strstr(n, "final_layer.linear")) continue;
        if (strstr(n, "t_embedder") || strstr(n, "y_embedder")) {
            /* N(0, 0.02) by Box-Muller over the Philox stream. */
            philox_normal_f32(seed, (uint64_t)i + 1, 0, p->numel, v);
            for (size_t j = 0; j < p->numel; j++) v[j] *= 0.02f;
            continue;
        }
        /* Xavier-uniform over (fan_out, fan_in); the patch embedding is
         * treated as a linear over its flattened C_in*p*p inputs as DiT does. */
        double fan_out = (double)p->shape[0], fan_in = (double)(p->numel / (size_t)p->shape[0]);
        float a = (float)sqrt(6.0 / (fan_in + fan_out));
        fill_uniform(v, p->numel, seed, (uint64_t)i + 1, -a, a);
    }
    for (int k = 0; k < m->num_bricks; k++)
        sincos_pos_embed(m->params + m->table[m->bricks[k].first_param].offset,
                         m->bricks[k].grid, m->cfg.hidden_size);
    model_weights_changed(m);
    return LEGO_OK;
}

/* ---- introspection ---- */

LEGO_API lego_status lego_model_get_config(const lego_model *m, lego_model_config *config) {
    if (!m || !config) return LEGO_ERR_INVALID_ARGUMENT;
    if (m->failed) return LEGO_ERR_STATE;
    lego_copy_options(config, config->size, &m->cfg, sizeof m->cfg);
    return LEGO_OK;
}

LEGO_API int lego_model_num_bricks(const lego_model *m) {
    return m && !m->failed ? m->num_bricks : 0;
}

LEGO_API lego_status lego_model_get_brick(const lego_model *m, int index, lego_brick_config *out) {
    if (!m || !out) return LEGO_ERR_INVALID_ARGUMENT;
    if (m->failed) return LEGO_ERR_STATE;
    if (index < 0 || index >= m->num_bricks) return LEGO_ERR_INVALID_ARGUMENT;
    lego_copy_options(out, out->size, &m->bricks[index].cfg, sizeof(lego_brick_config));
    return LEGO_OK;
}

LEGO_API int64_t lego_model_num_params(const lego_model *m) {
    return m && !m->failed ? (int64_t)m->params_size : 0;
}

static int gcd(int a, int b) {
    while (b) {
        int t = a % b;
        a = b;
        b = t;
    }
    return a;
}

LEGO_API int lego_model_resolution_multiple(const lego_model *m) {
    if (!m || m->failed || m->num_bricks == 0) return 0;
    long l = 1;
    for (int k = 0; k < m->num_bricks; k++) {
        int s = m->bricks[k].cfg.brick_size;
        l = l / gcd((int)l, s) * s;
        if (l > MAX_BRICK_SIZE) return 0; /* no image could satisfy it */
    }
    return (int)l;
}

LEGO_API lego_status lego_model_check_resolution(lego_model *m, int height, int width) {
    MODEL_CHECK(m);
    if (m->num_bricks == 0)
        return lego_fail(&m->err, LEGO_ERR_STATE, "the model has no bricks");
    int mult = lego_model_resolution_multiple(m);
    if (mult == 0)
        return lego_fail(&m->err, LEGO_ERR_SHAPE, "the brick sizes have no usable common multiple");
    if (height < 1 || width < 1 || height > MAX_BRICK_SIZE * 4 || width > MAX_BRICK_SIZE * 4)
        return lego_fail(&m->err, LEGO_ERR_SHAPE, "image size %dx%d is out of range", height, width);
    if (height % mult || width % mult)
        return lego_fail(&m->err, LEGO_ERR_SHAPE,
                         "image size %dx%d is not a multiple of %d (the brick sizes)",
                         height, width, mult);
    if (height < 2 || width < 2)
        return lego_fail(&m->err, LEGO_ERR_SHAPE, "images must be at least 2x2");
    return LEGO_OK;
}

LEGO_API lego_status lego_model_set_threads(lego_model *m, int num_threads) {
    MODEL_CHECK(m);
    if (num_threads < 0 || num_threads > 4096)
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "num_threads %d is out of range",
                         num_threads);
    m->cfg.num_threads = num_threads;
    m->threads = resolve_threads(num_threads);
    return LEGO_OK;
}

/* ---- backends ---- */

LEGO_API int lego_backend_available(lego_backend b) {
    if (b == LEGO_BACKEND_CPU) return 1;
    if (b == LEGO_BACKEND_CUDA) return cuda_device_count() > 0;
    return 0;
}

LEGO_API lego_status lego_model_set_backend(lego_model *m, lego_backend b, int device) {
    MODEL_CHECK(m);
    /* Weights (and a trainer's state) trained on the GPU come back first:
     * the handle that holds them may go. */
    lego_status ps = cuda_backend_pull(m, &m->err);
    if (ps != LEGO_OK) return ps;
    if (b == LEGO_BACKEND_CPU) {
        cuda_backend_destroy(m->cuda);
        m->cuda = NULL;
        m->cfg.backend = LEGO_BACKEND_CPU;
        m->cfg.device = 0;
        return LEGO_OK;
    }
    if (b != LEGO_BACKEND_CUDA)
        return lego_fail(&m->err, LEGO_ERR_UNSUPPORTED, "backend %d is not known to this liblego",
                         (int)b);
    if (device < 0)
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT,
                         "backend CUDA: device index must be non-negative, got %d", device);
    if (m->cuda && m->cfg.device == device) return LEGO_OK;
    /* The new handle first, so that a failure leaves the model as it was. */
    void *h = NULL;
    lego_status s = cuda_backend_create(m, device, &h, &m->err);
    if (s != LEGO_OK) return s;
    cuda_backend_destroy(m->cuda);
    m->cuda = h;
    m->cfg.backend = LEGO_BACKEND_CUDA;
    m->cfg.device = device;
    return LEGO_OK;
}

LEGO_API lego_status lego_model_set_precision(lego_model *m, lego_precision p) {
    MODEL_CHECK(m);
    if (p != LEGO_PRECISION_FP32 && p != LEGO_PRECISION_BF16 && p != LEGO_PRECISION_FP16)
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT,
                         "precision %d is not known to this liblego", (int)p);
    if (m->cuda) {
        lego_status s = cuda_backend_set_option(m, CUDA_OPT_PRECISION, (int)p);
        if (s != LEGO_OK) return s;
    }
    m->cfg.precision = p;
    return LEGO_OK;
}

size_t model_widest_activation(const lego_model *m, const brick *b) {
    size_t p2 = (size_t)b->cfg.patch_size * b->cfg.patch_size;
    size_t wide = 3 * (size_t)m->cfg.hidden_size;
    if ((size_t)m->mlp_hidden > wide) wide = (size_t)m->mlp_hidden;
    if ((size_t)b->c_in * p2 > wide) wide = (size_t)b->c_in * p2;
    if ((size_t)m->cfg.img_channels * p2 > wide) wide = (size_t)m->cfg.img_channels * p2;
    return wide;
}
