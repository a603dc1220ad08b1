/*
 * train.c -- the LEGO training loss and a trainer around it.
 *
 * The loss (reference: every brick's output is denoised and supervised):
 *
 *   x      = y + sigma * noise
 *   D_k    = c_skip x + c_out F_k                     k = 0 .. K-1
 *   weight = (sigma^2 + sd^2) / (sigma sd)^2
 *   loss   = (1/n) sum_images sum_pixels (1/K) sum_k weight (D_k - y)^2
 *
 * so dloss/dF_k = 2 weight c_out (D_k - y) / (n K); backward_cpu.c takes it
 * from there.  A trainer step draws sigma (log-normal), noise, label
 * dropout and flips from Philox streams keyed by (seed, step), takes the
 * gradient, clips it, applies Adam or AdamW with linear warm-up, and moves
 * the EMA weights with EDM's half-life rule.  Its state file holds all of
 * that, so a resumed run continues bit for bit.
 */
#include "train.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend_cuda.h"
#include "rng.h"
#include "safetensors.h"

/* Element-wise loops shorter than this stay on the calling thread. */
#define PAR_MIN_WORK 32768

/* Philox streams of a step: high bit set so they never meet the streams
 * lego_model_init_weights uses (small numbers) under the same seed. */
#define STREAM_SIGMA 0
#define STREAM_NOISE 1
#define STREAM_DROPOUT 2
#define STREAM_FLIP 3
#define STREAM_PATCHES 4
static uint64_t step_stream(int64_t step, int kind) {
    return ((uint64_t)1 << 63) | ((uint64_t)step << 3) | (uint64_t)kind;
}

/* ------------------------------------------------------------------------ */
/* The parameter array as seen from outside                                 */
/* ------------------------------------------------------------------------ */

LEGO_API void lego_tensor_info_init(lego_tensor_info *info) {
    if (!info) return;
    memset(info, 0, sizeof *info);
    info->size = sizeof *info;
}

LEGO_API int lego_model_num_tensors(const lego_model *m) {
    return m && !m->failed ? m->num_params : 0;
}

LEGO_API lego_status lego_model_tensor_info(lego_model *m, int index, lego_tensor_info *info) {
    MODEL_CHECK(m);
    if (!info) return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "info is NULL");
    if (index < 0 || index >= m->num_params)
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT,
                         "tensor index %d is out of range [0, %d)", index, m->num_params);
    const lego_param *p = &m->table[index];
    lego_tensor_info t;
    lego_tensor_info_init(&t);
    t.name = p->name;
    t.rank = p->rank;
    for (int i = 0; i < p->rank; i++) t.shape[i] = p->shape[i];
    t.offset = (int64_t)p->offset;
    t.numel = (int64_t)p->numel;
    t.trainable = !p->fixed;
    lego_copy_options(info, info->size, &t, sizeof t);
    return LEGO_OK;
}

static lego_status check_count(lego_model *m, const void *ptr, int64_t count) {
    if (!ptr) return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "params is NULL");
    if (count != (int64_t)m->params_size)
        return lego_fail(&m->err, LEGO_ERR_SHAPE, "count %lld, the model has %zu parameters",
                         (long long)count, m->params_size);
    return LEGO_OK;
}

LEGO_API lego_status lego_model_get_params(lego_model *m, float *params, int64_t count) {
    MODEL_CHECK(m);
    lego_status s = check_count(m, params, count);
    if (s == LEGO_OK) s = cuda_backend_pull(m, &m->err); /* weights trained on the GPU */
    if (s == LEGO_OK) memcpy(params, m->params, m->params_size * sizeof *params);
    return s;
}

LEGO_API lego_status lego_model_set_params(lego_model *m, const float *params, int64_t count) {
    MODEL_CHECK(m);
    lego_status s = check_count(m, params, count);
    if (s == LEGO_OK) {
        memcpy(m->params, params, m->params_size * sizeof *params);
        model_weights_changed(m);
    }
    return s;
}

/* ------------------------------------------------------------------------ */
/* The loss                                                                 */
/* ------------------------------------------------------------------------ */

size_t train_scratch_floats(const lego_model *m, int n, int h, int w) {
    size_t dims[5] = {(size_t)m->num_bricks + 2, (size_t)n, (size_t)m->cfg.img_channels,
                      (size_t)h, (size_t)w};
    size_t f = size_prod(dims, 5);
    return f <= LEGO_MAX_ALLOC / sizeof(float) ? f : 0;
}

/* (1/K) sum_k weight (D_k - y)^2 over the pixels of brick k's sampled
 * patches of image i (all of them when it runs whole), scaled by
 * total/used so that it estimates the whole image's sum; df gets its
 * gradient there and 0 elsewhere. */
static double brick_image_loss(const lego_model *m, const net_cache *c, int k, size_t i,
                               const float *x, const float *y, float c_skip, float c_out,
                               float dscale, float *df) {
    const brick_acts *ba = &c->bricks[k];
    size_t plane = (size_t)c->h * c->w, chw = (size_t)m->cfg.img_channels * plane;
    const float *f = ba->out + i * chw, *xi = x + i * chw, *yi = y + i * chw;
    double sum = 0;
    if (!ba->patch_index) {
        for (size_t j = 0; j < chw; j++) {
            float diff = c_skip * xi[j] + c_out * f[j] - yi[j];
            sum += (double)diff * diff;
            df[j] = dscale * diff;
        }
        return sum;
    }
    float scale = (float)ba->patches_total / (float)ba->patches_used;
    int bs = m->bricks[k].cfg.brick_size;
    memset(df, 0, chw * sizeof *df);
    for (int slot = 0; slot < ba->patches_used; slot++) {
        int patch = ba->patch_index[i * (size_t)ba->patches_used + (size_t)slot];
        int y0 = patch / ba->patches_x * bs, x0 = patch % ba->patches_x * bs;
        for (int ch = 0; ch < m->cfg.img_channels; ch++)
            for (int r = y0; r < y0 + bs; r++) {
                size_t j = (size_t)ch * plane + (size_t)r * c->w + (size_t)x0;
                for (int q = 0; q < bs; q++, j++) {
                    float diff = c_skip * xi[j] + c_out * f[j] - yi[j];
                    sum += (double)diff * diff;
                    df[j] = scale * dscale * diff;
                }
            }
    }
    return scale * sum;
}

void train_loss_grads(const lego_model *m, net_cache *c, const float *y, const float *noise,
                      const float *sigma, const float *label_vectors, float *scratch,
                      double *loss, float *grads) {
    int n = c->n, K = m->num_bricks;
    size_t chw = (size_t)m->cfg.img_channels * c->h * c->w, img = (size_t)n * chw;
    float *x = scratch, *dF = scratch + img, *fill = NULL;
    double sd = m->cfg.sigma_data;
    for (int i = 0; i < n; i++)
        for (size_t j = 0; j < chw; j++)
            x[(size_t)i * chw + j] = y[(size_t)i * chw + j] + sigma[i] * noise[(size_t)i * chw + j];
    if (net_sampling_patches(m, c)) {
        /* Eq. 12: where the brick below did not run, its context is the
         * clean image.  Bricks pass raw outputs F, so that is the F that
         * denoises to y: (y - c_skip x)/c_out, written here in a form
         * that stays finite as sigma -> 0. */
        fill = scratch + (size_t)(K + 1) * img;
        for (int i = 0; i < n; i++) {
            double s = sigma[i], a = s / (sd * sqrt(s * s + sd * sd)), b = sd / sqrt(s * s + sd * sd);
            for (size_t j = 0; j < chw; j++) {
                size_t q = (size_t)i * chw + j;
                fill[q] = (float)(a * y[q] - b * noise[q]);
            }
        }
    }
    net_forward(m, c, x, sigma, label_vectors, fill);

    double total = 0;
    for (int i = 0; i < n; i++) {
        /* c_skip and c_out as denoise.c computes them. */
        double s = sigma[i], s2 = s * s;
        float c_skip = (float)(sd * sd / (s2 + sd * sd));
        float c_out = (float)(s * sd / sqrt(s2 + sd * sd));
        float weight = (float)((s2 + sd * sd) / (s * sd * s * sd));
        float dscale = (float)(2.0 * weight * c_out / ((double)n * K));
        for (int k = 0; k < K; k++)
            total += weight * brick_image_loss(m, c, k, (size_t)i, x, y, c_skip, c_out, dscale,
                                               dF + (size_t)k * img + (size_t)i * chw);
    }
    *loss = total / ((double)n * K);
    if (grads) {
        memset(grads, 0, m->params_size * sizeof *grads);
        net_backward(m, c, dF, grads);
    }
}

/* 0 and 1 both mean every patch; anything in between samples. */
static int valid_patch_fraction(double f) { return isfinite(f) && f >= 0 && f <= 1; }

/* The cache's patches for a batch: all, or a draw of (seed, stream). */
static void choose_patches(const lego_model *m, net_cache *c, double fraction, uint64_t seed,
                           uint64_t stream) {
    if (fraction > 0 && fraction < 1) net_sample_patches(m, c, fraction, seed, stream);
    else net_use_all_patches(m, c);
}

/* Checks shared by lego_train_loss and the trainer: values must be finite. */
static lego_status check_finite(lego_err *err, const char *what, const float *v, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(v[i]))
            return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "%s[%zu] = %g is not finite", what, i,
                             (double)v[i]);
    return LEGO_OK;
}

/* Class indices to one-hot rows (n x L, zero rows for -1). */
static lego_status labels_to_vectors(lego_err *err, const int32_t *labels, int n, int L,
                                     float *out) {
    memset(out, 0, (size_t)n * (size_t)L * sizeof *out);
    for (int i = 0; i < n; i++) {
        if (labels[i] < -1 || labels[i] >= L)
            return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "label[%d] = %d is out of range [-1, %d)",
                             i, labels[i], L);
        if (labels[i] >= 0) out[(size_t)i * L + (size_t)labels[i]] = 1.0f;
    }
    return LEGO_OK;
}

/* lego_train_loss for a model on the GPU (cuda/train.cu), batch validated. */
/* ---- training on the GPU (cuda/train.cu): what the C side prepares ---- */

/* The GPU's view of a batch; `tables` (may be NULL: every patch) gives
 * each brick's patches. */
static void gpu_batch(const lego_model *m, const net_cache *tables, int n, int h, int w,
                      const float *y, const float *noise, const float *sigma,
                      const float *label_vectors, cuda_train_batch *cb) {
    memset(cb, 0, sizeof *cb);
    cb->n = n;
    cb->h = h;
    cb->w = w;
    cb->y = y;
    cb->noise = noise;
    cb->sigma = sigma;
    cb->labels = label_vectors;
    for (int k = 0; tables && k < m->num_bricks; k++) {
        cb->table[k] = tables->bricks[k].patch_index;
        cb->used[k] = tables->bricks[k].patches_used;
    }
}

/* lego_train_loss for a model on the GPU, batch validated. */
static lego_status gpu_train_loss(lego_model *m, const lego_train_batch *b, float *loss,
                                  float *grads) {
    int L = m->cfg.label_dim;
    float *vectors = NULL;
    net_cache *tables = NULL;
    lego_status s = LEGO_OK;
    if (L > 0 && b->labels) {
        vectors = malloc((size_t)b->n * (size_t)L * sizeof *vectors);
        if (!vectors) return lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
        s = labels_to_vectors(&m->err, b->labels, b->n, L, vectors);
    }
    if (s == LEGO_OK && b->patch_fraction > 0 && b->patch_fraction < 1) {
        s = net_tables_create(m, b->n, b->height, b->width, &tables, &m->err);
        if (s == LEGO_OK) choose_patches(m, tables, b->patch_fraction, b->patch_seed, 0);
    }
    cuda_train_batch cb;
    gpu_batch(m, tables, b->n, b->height, b->width, b->y, b->noise, b->sigma,
              L > 0 ? (vectors ? vectors : b->label_vectors) : NULL, &cb);
    double l = 0;
    if (s == LEGO_OK) s = cuda_train_loss(m, &cb, &l, grads, &m->err);
    if (s == LEGO_OK) *loss = (float)l;
    free(vectors);
    net_cache_free(tables);
    return s;
}

LEGO_API void lego_train_batch_init(lego_train_batch *b) {
    if (!b) return;
    memset(b, 0, sizeof *b);
    b->size = sizeof *b;
}

LEGO_API lego_status lego_train_loss(lego_model *m, const lego_train_batch *batch, float *loss,
                                     float *grads) {
    MODEL_CHECK(m);
    if (!batch || !loss)
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "batch and loss must not be NULL");
    lego_train_batch b;
    lego_train_batch_init(&b);
    lego_copy_options(&b, sizeof b, batch, batch->size);
    if (m->num_bricks == 0) return lego_fail(&m->err, LEGO_ERR_STATE, "the model has no bricks");
    lego_status s = lego_check_batch_size(&m->err, b.n);
    if (s != LEGO_OK) return s;
    if ((s = lego_model_check_resolution(m, b.height, b.width)) != LEGO_OK) return s;
    if (!b.y || !b.noise || !b.sigma)
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "y, noise and sigma must not be NULL");
    if (b.labels && b.label_vectors)
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "give labels or label_vectors, not both");
    if (!valid_patch_fraction(b.patch_fraction))
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT,
                         "patch_fraction %g must be in [0, 1] (0 or 1: every patch)",
                         b.patch_fraction);
    if ((s = lego_check_sigmas(&m->err, b.sigma, b.n)) != LEGO_OK) return s;
    /* The size check first: it bounds img (below the scratch), which the
     * loops over the caller's arrays use. */
    size_t scratch_floats = train_scratch_floats(m, b.n, b.height, b.width);
    if (scratch_floats == 0)
        return lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY, "a batch of %d images of %dx%d is too large",
                         b.n, b.height, b.width);
    size_t img = (size_t)b.n * (size_t)m->cfg.img_channels * b.height * b.width;
    int L = m->cfg.label_dim;
    if ((s = check_finite(&m->err, "y", b.y, img)) != LEGO_OK ||
        (s = check_finite(&m->err, "noise", b.noise, img)) != LEGO_OK)
        return s;
    if (L > 0 && b.label_vectors &&
        (s = check_finite(&m->err, "label_vectors", b.label_vectors, (size_t)b.n * L)) != LEGO_OK)
        return s;

    if (m->cuda) return gpu_train_loss(m, &b, loss, grads);

    net_cache *c = NULL;
    float *scratch = NULL, *vectors = NULL;
    if ((s = net_cache_create(m, b.n, b.height, b.width, &c, &m->err)) != LEGO_OK) goto done;
    scratch = malloc(scratch_floats * sizeof *scratch);
    if (L > 0 && b.labels) vectors = malloc((size_t)b.n * (size_t)L * sizeof *vectors);
    if (!scratch || (L > 0 && b.labels && !vectors)) {
        s = lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
        goto done;
    }
    if (vectors && (s = labels_to_vectors(&m->err, b.labels, b.n, L, vectors)) != LEGO_OK) goto done;
    double l;
    choose_patches(m, c, b.patch_fraction, b.patch_seed, 0);
    train_loss_grads(m, c, b.y, b.noise, b.sigma, L > 0 ? (vectors ? vectors : b.label_vectors) : NULL,
                     scratch, &l, grads);
    *loss = (float)l;
done:
    free(vectors);
    free(scratch);
    net_cache_free(c);
    return s;
}

/* ------------------------------------------------------------------------ */
/* The trainer                                                              */
/* ------------------------------------------------------------------------ */

LEGO_API void lego_train_options_init(lego_train_options *o) {
    if (!o) return;
    memset(o, 0, sizeof *o);
    o->size = sizeof *o;
    o->optimizer = LEGO_OPTIMIZER_ADAMW;
    o->lr = 1e-4;
    o->beta1 = 0.9;
    o->beta2 = 0.999;
    o->eps = 1e-8;
    o->ema_halflife_kimg = 500;
    o->ema_rampup_ratio = 0.05;
    o->p_mean = -1.2;
    o->p_std = 1.2;
}

LEGO_API void lego_train_stats_init(lego_train_stats *s) {
    if (!s) return;
    memset(s, 0, sizeof *s);
    s->size = sizeof *s;
}

static lego_status validate_options(const lego_train_options *o, lego_err *err) {
#define FINITE_IN(v, lo, hi) (isfinite(v) && (v) >= (lo) && (v) <= (hi))
    if (o->optimizer != LEGO_OPTIMIZER_ADAMW && o->optimizer != LEGO_OPTIMIZER_ADAM)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "unknown optimizer %d", (int)o->optimizer);
    if (!(FINITE_IN(o->lr, 0, 1e6) && o->lr > 0))
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "lr %g must be positive and finite", o->lr);
    if (!FINITE_IN(o->beta1, 0, 1) || o->beta1 >= 1 || !FINITE_IN(o->beta2, 0, 1) || o->beta2 >= 1)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "betas (%g, %g) must be in [0, 1)",
                         o->beta1, o->beta2);
    if (!(FINITE_IN(o->eps, 0, 1e6) && o->eps > 0))
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "eps %g must be positive", o->eps);
    if (!FINITE_IN(o->weight_decay, 0, 1e6) || o->warmup_steps < 0 ||
        !FINITE_IN(o->grad_clip, 0, INFINITY))
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                         "weight_decay, warmup_steps and grad_clip must be non-negative");
    if (!FINITE_IN(o->ema_halflife_kimg, 0, INFINITY) || !FINITE_IN(o->ema_rampup_ratio, 0, INFINITY))
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                         "ema_halflife_kimg and ema_rampup_ratio must be non-negative");
    if (!FINITE_IN(o->p_mean, -50, 50) || !FINITE_IN(o->p_std, 0, 50))
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "p_mean %g / p_std %g out of range",
                         o->p_mean, o->p_std);
    if (!FINITE_IN(o->label_dropout, 0, 1))
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "label_dropout %g must be in [0, 1]",
                         o->label_dropout);
    if (!valid_patch_fraction(o->patch_fraction))
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                         "patch_fraction %g must be in [0, 1] (0 or 1: every patch)",
                         o->patch_fraction);
    if (o->hflip != 0 && o->hflip != 1)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "hflip must be 0 or 1");
    if (o->height < 0 || o->width < 0)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "height and width must be non-negative");
    return LEGO_OK;
#undef FINITE_IN
}

static lego_status trainer_fail(lego_trainer *t, lego_status s) {
    free(t->ema);
    free(t->adam_m);
    free(t->adam_v);
    free(t->grads);
    t->ema = t->adam_m = t->adam_v = t->grads = NULL;
    t->failed = 1;
    return s;
}

LEGO_API lego_status lego_trainer_create(lego_model *m, const lego_train_options *options,
                                         lego_trainer **out) {
    if (!out) return LEGO_ERR_INVALID_ARGUMENT;
    *out = NULL;
    lego_trainer *t = calloc(1, sizeof *t);
    if (!t) return LEGO_ERR_OUT_OF_MEMORY;
    *out = t;
    lego_train_options_init(&t->opt);
    lego_train_stats_init(&t->last);
    if (options) lego_copy_options(&t->opt, sizeof t->opt, options, options->size);
    t->opt.size = sizeof t->opt;
    if (!m) return trainer_fail(t, lego_fail(&t->err, LEGO_ERR_INVALID_ARGUMENT, "model is NULL"));
    if (m->failed)
        return trainer_fail(t, lego_fail(&t->err, LEGO_ERR_STATE, "the model is in a failed state"));
    lego_status s = validate_options(&t->opt, &t->err);
    if (s != LEGO_OK) return trainer_fail(t, s);
    t->m = m;
    t->height = t->opt.height ? t->opt.height : m->cfg.img_resolution;
    t->width = t->opt.width ? t->opt.width : m->cfg.img_resolution;
    if ((s = lego_model_check_resolution(m, t->height, t->width)) != LEGO_OK) {
        lego_fail(&t->err, s, "%s", m->err.msg);
        return trainer_fail(t, s);
    }
    t->num_values = m->params_size;
    t->num_bricks = m->num_bricks;
    size_t bytes = m->params_size * sizeof(float);
    t->ema = malloc(bytes);
    t->adam_m = calloc(m->params_size, sizeof(float));
    t->adam_v = calloc(m->params_size, sizeof(float));
    t->grads = malloc(bytes);
    if (!t->ema || !t->adam_m || !t->adam_v || !t->grads)
        return trainer_fail(t, lego_fail(&t->err, LEGO_ERR_OUT_OF_MEMORY,
                                         "out of memory for %zu parameters", m->params_size));
    memcpy(t->ema, m->params, bytes);
    t->seed = t->opt.seed;
    return LEGO_OK;
}

static void free_batch(lego_trainer *t) {
    net_cache_free(t->cache);
    free(t->y);
    free(t->noise);
    free(t->sigma);
    free(t->label_vectors);
    free(t->scratch);
    t->cache = NULL;
    t->y = t->noise = t->sigma = t->label_vectors = t->scratch = NULL;
    t->batch_n = 0;
}

LEGO_API void lego_trainer_free(lego_trainer *t) {
    if (!t) return;
    if (t->cuda_attached) cuda_train_detach(t->m, t); /* only while its model lives */
    free_batch(t);
    trainer_fail(t, LEGO_OK);
    free(t);
}

LEGO_API const char *lego_trainer_error(const lego_trainer *t) {
    if (!t) return "trainer handle is NULL (out of memory?)";
    return t->err.msg;
}

#define TRAINER_CHECK(t)                                                        \
    do {                                                                        \
        if (!(t)) return LEGO_ERR_INVALID_ARGUMENT;                             \
        if ((t)->failed) return LEGO_ERR_STATE;                                 \
        lego_err_clear(&(t)->err);                                              \
        if ((t)->m->failed || (t)->m->params_size != (t)->num_values ||         \
            (t)->m->num_bricks != (t)->num_bricks)                              \
            return lego_fail(&(t)->err, LEGO_ERR_STATE,                         \
                             "the model changed shape since the trainer was made"); \
    } while (0)

/* Buffers for batches of n images. */
static lego_status reserve_batch(lego_trainer *t, int n) {
    lego_model *m = t->m;
    int gpu = m->cuda != NULL; /* the GPU keeps its activations on the device */
    if (t->batch_n == n && t->batch_gpu == gpu) return LEGO_OK;
    free_batch(t);
    size_t img = (size_t)n * (size_t)m->cfg.img_channels * t->height * t->width;
    size_t scratch = train_scratch_floats(m, n, t->height, t->width);
    if (scratch == 0)
        return lego_fail(&t->err, LEGO_ERR_OUT_OF_MEMORY, "a batch of %d images is too large", n);
    if (gpu) scratch = 1;
    lego_status s = gpu ? net_tables_create(m, n, t->height, t->width, &t->cache, &t->err)
                        : net_cache_create(m, n, t->height, t->width, &t->cache, &t->err);
    if (s != LEGO_OK) return s;
    t->y = malloc(img * sizeof(float));
    t->noise = malloc(img * sizeof(float));
    t->sigma = malloc((size_t)n * sizeof(float));
    t->label_vectors = malloc(((size_t)n * (size_t)m->cfg.label_dim + 1) * sizeof(float));
    t->scratch = malloc(scratch * sizeof(float));
    if (!t->y || !t->noise || !t->sigma || !t->label_vectors || !t->scratch) {
        free_batch(t);
        return lego_fail(&t->err, LEGO_ERR_OUT_OF_MEMORY, "out of memory for a batch of %d", n);
    }
    t->batch_n = n;
    t->batch_gpu = gpu;
    return LEGO_OK;
}

void trainer_draw_batch(const lego_trainer *t, const float *images, const int32_t *labels, int n,
                        float *y, float *noise, float *sigma, float *label_vectors) {
    const lego_model *m = t->m;
    const lego_train_options *o = &t->opt;
    int L = m->cfg.label_dim, h = t->height, w = t->width, C = m->cfg.img_channels;
    size_t plane = (size_t)h * w, chw = (size_t)C * plane;

    /* sigma = exp(P_mean + P_std z), as EDM's loss draws it. */
    philox_normal_f32(t->seed, step_stream(t->step, STREAM_SIGMA), 0, (size_t)n, sigma);
    for (int i = 0; i < n; i++) sigma[i] = (float)exp(o->p_mean + o->p_std * sigma[i]);
    /* noise NULL: the GPU draws the same stream on the device. */
    if (noise) philox_normal_f32(t->seed, step_stream(t->step, STREAM_NOISE), 0, (size_t)n * chw, noise);

    for (int i = 0; i < n; i++) {
        int flip = o->hflip && philox_randint(t->seed, step_stream(t->step, STREAM_FLIP),
                                              (uint64_t)i, 2) == 1;
        const float *src = images + (size_t)i * chw;
        float *dst = y + (size_t)i * chw;
        for (size_t row = 0; row < (size_t)C * h; row++)
            for (int x = 0; x < w; x++)
                dst[row * w + (size_t)x] = src[row * w + (size_t)(flip ? w - 1 - x : x)];
    }

    if (L == 0) return;
    memset(label_vectors, 0, (size_t)n * (size_t)L * sizeof *label_vectors);
    for (int i = 0; i < n; i++) {
        int32_t lab = labels ? labels[i] : -1;
        /* Uniform in [0, 1) with 24 bits: below p drops the label. */
        double u = (double)philox_randint(t->seed, step_stream(t->step, STREAM_DROPOUT),
                                          (uint64_t)i, 1 << 24) / (double)(1 << 24);
        if (u < o->label_dropout) lab = -1;
        if (lab >= 0) label_vectors[(size_t)i * L + (size_t)lab] = 1.0f;
    }
}

/* Adam or AdamW on every trainable value, gradient already scaled. */
static void adam_update(lego_trainer *t, double lr, float gscale) {
    lego_model *m = t->m;
    const lego_train_options *o = &t->opt;
    double b1 = o->beta1, b2 = o->beta2, wd = o->weight_decay;
    double bc1 = 1.0 - pow(b1, (double)t->adam_t), bc2 = 1.0 - pow(b2, (double)t->adam_t);
    double step_size = lr / bc1, sqrt_bc2 = sqrt(bc2);
    int adamw = o->optimizer == LEGO_OPTIMIZER_ADAMW;
    for (int i = 0; i < m->num_params; i++) {
        const lego_param *p = &m->table[i];
        if (p->fixed) continue;
        float *w = m->params + p->offset, *mm = t->adam_m + p->offset, *vv = t->adam_v + p->offset;
        const float *g = t->grads + p->offset;
        #pragma omp parallel for num_threads(p->numel >= PAR_MIN_WORK ? m->threads : 1) \
            schedule(static)
        for (size_t j = 0; j < p->numel; j++) {
            double wj = w[j], gj = (double)g[j] * gscale;
            if (adamw) wj -= lr * wd * wj;
            else gj += wd * wj;
            double mj = b1 * mm[j] + (1.0 - b1) * gj;
            double vj = b2 * vv[j] + (1.0 - b2) * gj * gj;
            mm[j] = (float)mj;
            vv[j] = (float)vj;
            w[j] = (float)(wj - step_size * mj / (sqrt(vj) / sqrt_bc2 + o->eps));
        }
    }
}

/* EDM's EMA: half-life in images, ramped up over the first images seen. */
static double ema_beta(const lego_trainer *t, int n) {
    const lego_train_options *o = &t->opt;
    double halflife = o->ema_halflife_kimg * 1000.0;
    if (o->ema_rampup_ratio > 0) {
        double ramp = (double)t->images_seen * o->ema_rampup_ratio;
        if (ramp < halflife) halflife = ramp;
    }
    return pow(0.5, (double)n / (halflife > 1e-8 ? halflife : 1e-8));
}

static double ema_update(lego_trainer *t, int n) {
    double beta = ema_beta(t, n);
    float b = (float)beta;
    const float *w = t->m->params;
    #pragma omp parallel for num_threads(t->num_values >= PAR_MIN_WORK ? t->m->threads : 1) \
        schedule(static)
    for (size_t j = 0; j < t->num_values; j++) t->ema[j] = w[j] + b * (t->ema[j] - w[j]);
    return beta;
}

/* The counters where they live, the last step's figures from t->last, into
 * the caller's version of the struct. */
static void copy_stats(const lego_trainer *t, lego_train_stats *out) {
    lego_train_stats st = t->last;
    st.step = t->step;
    st.images_seen = t->images_seen;
    st.skipped_total = t->skipped;
    lego_copy_options(out, out->size, &st, sizeof st);
}

LEGO_API lego_status lego_trainer_step(lego_trainer *t, const float *images,
                                       const int32_t *labels, int n, lego_train_stats *stats) {
    TRAINER_CHECK(t);
    lego_model *m = t->m;
    lego_status s = lego_check_batch_size(&t->err, n);
    if (s != LEGO_OK) return s;
    if (!images) return lego_fail(&t->err, LEGO_ERR_INVALID_ARGUMENT, "images is NULL");
    size_t img;
    if (!size_mul((size_t)n * (size_t)m->cfg.img_channels, (size_t)t->height * t->width, &img))
        return lego_fail(&t->err, LEGO_ERR_OUT_OF_MEMORY, "a batch of %d images is too large", n);
    if ((s = check_finite(&t->err, "images", images, img)) != LEGO_OK) return s;
    if (labels && m->cfg.label_dim > 0)
        for (int i = 0; i < n; i++)
            if (labels[i] < -1 || labels[i] >= m->cfg.label_dim)
                return lego_fail(&t->err, LEGO_ERR_INVALID_ARGUMENT,
                                 "label[%d] = %d is out of range [-1, %d)", i, labels[i],
                                 m->cfg.label_dim);
    /* Counters from a state file may sit anywhere below INT64_MAX. */
    if (t->step == INT64_MAX || t->images_seen > INT64_MAX - n)
        return lego_fail(&t->err, LEGO_ERR_STATE,
                         "the step or image counter would overflow (step %lld, %lld images)",
                         (long long)t->step, (long long)t->images_seen);
    if ((s = reserve_batch(t, n)) != LEGO_OK) return s;

    /* On the GPU the noise (n x C x h x w normals, the bulk of the draws) is
     * drawn on the device from the same Philox stream. */
    trainer_draw_batch(t, images, labels, n, t->y, m->cuda ? NULL : t->noise, t->sigma,
                       t->label_vectors);
    double loss = 0, norm = 0;
    choose_patches(m, t->cache, t->opt.patch_fraction, t->seed,
                   step_stream(t->step, STREAM_PATCHES));
    if (m->cuda) {
        /* On the GPU (cuda/train.cu): the gradient stays there; t->cache
         * holds only the patch tables. */
        cuda_trainer_link link = {t, t->ema, t->adam_m, t->adam_v, &t->cuda_attached};
        cuda_train_batch cb;
        gpu_batch(m, t->cache, n, t->height, t->width, t->y, NULL, t->sigma,
                  m->cfg.label_dim > 0 ? t->label_vectors : NULL, &cb);
        cb.noise_seed = t->seed;
        cb.noise_stream = step_stream(t->step, STREAM_NOISE);
        if ((s = cuda_train_grads(m, &link, &cb, &loss, &norm, &t->err)) != LEGO_OK) return s;
    } else {
        train_loss_grads(m, t->cache, t->y, t->noise, t->sigma,
                         m->cfg.label_dim > 0 ? t->label_vectors : NULL, t->scratch, &loss,
                         t->grads);
        double sq = 0;
        for (int i = 0; i < m->num_params; i++) {
            const lego_param *p = &m->table[i];
            if (p->fixed) continue;
            for (size_t j = 0; j < p->numel; j++) {
                double g = t->grads[p->offset + j];
                sq += g * g;
            }
        }
        norm = sqrt(sq);
    }
    double lr = t->opt.lr, beta = 0;
    if (t->opt.warmup_steps > 0 && t->step + 1 < t->opt.warmup_steps)
        lr *= (double)(t->step + 1) / t->opt.warmup_steps;
    int skipped = !isfinite(norm) || !isfinite(loss);
    if (skipped) {
        t->skipped++;
    } else {
        /* torch's clip_grad_norm_: scale by max_norm / (norm + 1e-6). */
        float gscale = 1.0f;
        if (t->opt.grad_clip > 0 && norm > t->opt.grad_clip)
            gscale = (float)(t->opt.grad_clip / (norm + 1e-6));
        t->adam_t++;
        if (m->cuda) {
            cuda_trainer_link link = {t, t->ema, t->adam_m, t->adam_v, &t->cuda_attached};
            const lego_train_options *o = &t->opt;
            beta = ema_beta(t, n);
            cuda_adam_step a = {lr, o->beta1, o->beta2, o->eps, o->weight_decay,
                                o->optimizer == LEGO_OPTIMIZER_ADAMW, t->adam_t, gscale,
                                (float)beta};
            if ((s = cuda_train_update(m, &link, &a, &t->err)) != LEGO_OK) {
                t->adam_t--;
                return s;
            }
        } else {
            adam_update(t, lr, gscale);
            model_weights_changed(m);
            beta = ema_update(t, n);
        }
    }
    t->step++;
    t->images_seen += n;
    lego_train_stats *last = &t->last;
    last->loss = loss;
    last->grad_norm = norm;
    last->lr = lr;
    last->ema_beta = beta;
    last->skipped = skipped;
    if (stats) copy_stats(t, stats);
    return LEGO_OK;
}

LEGO_API lego_status lego_trainer_get_stats(lego_trainer *t, lego_train_stats *stats) {
    TRAINER_CHECK(t);
    if (!stats) return lego_fail(&t->err, LEGO_ERR_INVALID_ARGUMENT, "stats is NULL");
    copy_stats(t, stats);
    return LEGO_OK;
}

/* ------------------------------------------------------------------------ */
/* State files                                                              */
/* ------------------------------------------------------------------------ */

/* Counters go into an F32 tensor as 16-bit pieces, each exact in float. */
#define NUM_COUNTERS 5
#define COUNTERS_NAME "trainer.counters"

static void counters_pack(const lego_trainer *t, float out[NUM_COUNTERS * 4]) {
    uint64_t v[NUM_COUNTERS] = {(uint64_t)t->step, (uint64_t)t->adam_t, (uint64_t)t->images_seen,
                                (uint64_t)t->skipped, t->seed};
    for (int i = 0; i < NUM_COUNTERS; i++)
        for (int j = 0; j < 4; j++) out[i * 4 + j] = (float)((v[i] >> (16 * j)) & 0xffff);
}

static int counters_unpack(const float in[NUM_COUNTERS * 4], uint64_t v[NUM_COUNTERS]) {
    for (int i = 0; i < NUM_COUNTERS; i++) {
        v[i] = 0;
        for (int j = 0; j < 4; j++) {
            float f = in[i * 4 + j];
            if (!(f >= 0 && f <= 65535 && f == floorf(f))) return 0;
            v[i] |= (uint64_t)f << (16 * j);
        }
    }
    /* step, adam_t, images_seen and skipped are int64 counts. */
    for (int i = 0; i < 4; i++)
        if (v[i] > (uint64_t)INT64_MAX) return 0;
    return v[1] <= v[0] && v[3] <= v[0];
}

/* The state's tensors: weights under their own names, then "ema.",
 * "adam_m." and "adam_v." copies (the moments of trainable ones only). */
static const char *const state_prefix[4] = {"", "ema.", "adam_m.", "adam_v."};

static float *state_array(lego_trainer *t, int which) {
    float *a[4] = {t->m->params, t->ema, t->adam_m, t->adam_v};
    return a[which];
}

#define STATE_NAME 112 /* room for a prefix and a 96-byte key */

LEGO_API lego_status lego_trainer_save_state(lego_trainer *t, const char *path) {
    TRAINER_CHECK(t);
    if (!path) return lego_fail(&t->err, LEGO_ERR_INVALID_ARGUMENT, "path is NULL");
    lego_model *m = t->m;
    lego_status ps = cuda_backend_pull(m, &t->err); /* the state trained on the GPU */
    if (ps != LEGO_OK) return ps;
    /* The table has at most a few tens of thousands of entries (bricks x
     * depth), so these counts are small. */
    size_t max_items = 4 * (size_t)m->num_params + 1;
    st_write_item *items = calloc(max_items, sizeof *items);
    char *names = malloc(max_items * STATE_NAME);
    char *json = config_to_json(m);
    float counters[NUM_COUNTERS * 4];
    lego_status s = LEGO_OK;
    if (!items || !names || !json) {
        s = lego_fail(&t->err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
        goto done;
    }
    int n = 0;
    for (int which = 0; which < 4; which++)
        for (int i = 0; i < m->num_params; i++) {
            const lego_param *p = &m->table[i];
            if (which >= 2 && p->fixed) continue;
            char *name = names + (size_t)n * STATE_NAME;
            snprintf(name, STATE_NAME, "%s%s", state_prefix[which], p->name);
            items[n].name = name;
            items[n].rank = p->rank;
            memcpy(items[n].shape, p->shape, sizeof p->shape);
            items[n].data = state_array(t, which) + p->offset;
            n++;
        }
    counters_pack(t, counters);
    items[n].name = COUNTERS_NAME;
    items[n].rank = 2;
    items[n].shape[0] = NUM_COUNTERS;
    items[n].shape[1] = 4;
    items[n].data = counters;
    n++;
    s = st_write_f32(path, items, n, json, &t->err);
done:
    free(items);
    free(names);
    free(json);
    return s;
}

/* An F32 tensor `name` of exactly `rank` x `shape`, or a message. */
static lego_status find_f32(lego_err *err, const st_file *f, const char *name, int rank,
                            const int64_t *shape, const st_tensor **out) {
    const st_tensor *tt = st_find(f, name);
    if (!tt) return lego_fail(err, LEGO_ERR_SHAPE, "missing tensor '%s'", name);
    int same = tt->rank == rank && tt->dtype == ST_F32;
    for (int d = 0; same && d < rank; d++) same = tt->shape[d] == shape[d];
    if (!same)
        return lego_fail(err, LEGO_ERR_SHAPE, "tensor '%s' has the wrong shape or dtype", name);
    *out = tt;
    return LEGO_OK;
}

/* A step with a non-finite gradient changes nothing, so a healthy run never
 * saves a non-finite value or a negative second moment: a state that holds
 * one is damaged, and resuming from it would only spread NaN. */
static lego_status check_state_values(const lego_model *m, lego_err *err, const float *fresh,
                                     size_t nv) {
    for (int which = 0; which < 4; which++)
        for (int i = 0; i < m->num_params; i++) {
            const lego_param *p = &m->table[i];
            const float *a = fresh + (size_t)which * nv + p->offset;
            for (size_t j = 0; j < p->numel; j++)
                if (!isfinite(a[j]) || (which == 3 && a[j] < 0))
                    return lego_fail(err, LEGO_ERR_FORMAT,
                                     "'%s%s' holds %g at %zu: a state to resume from has finite "
                                     "values and second moments >= 0",
                                     state_prefix[which], p->name, (double)a[j], j);
        }
    return LEGO_OK;
}

LEGO_API lego_status lego_trainer_load_state(lego_trainer *t, const char *path) {
    TRAINER_CHECK(t);
    if (!path) return lego_fail(&t->err, LEGO_ERR_INVALID_ARGUMENT, "path is NULL");
    lego_model *m = t->m;
    st_file *f = NULL;
    float *fresh = NULL;
    char *json = NULL;
    lego_status s = st_open(path, &f, &t->err);
    if (s != LEGO_OK) return s;
    json = config_to_json(m);
    size_t nv = t->num_values, all;
    if (size_mul(nv, 4 * sizeof *fresh, &all)) fresh = malloc(all); /* params, ema, m, v */
    if (!json || !fresh) {
        s = lego_fail(&t->err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
        goto done;
    }
    if (!f->metadata_config || strcmp(f->metadata_config, json) != 0) {
        s = lego_fail(&t->err, LEGO_ERR_SHAPE, "its architecture %s differs from the model's %s",
                      f->metadata_config ? f->metadata_config : "(none)", json);
        goto done;
    }
    memset(fresh, 0, all);
    int expected = 1;
    for (int which = 0; which < 4; which++)
        for (int i = 0; i < m->num_params; i++) {
            const lego_param *p = &m->table[i];
            if (which >= 2 && p->fixed) continue;
            char name[STATE_NAME];
            const st_tensor *tt;
            snprintf(name, sizeof name, "%s%s", state_prefix[which], p->name);
            if ((s = find_f32(&t->err, f, name, p->rank, p->shape, &tt)) != LEGO_OK) goto done;
            st_to_f32(tt, fresh + (size_t)which * nv + p->offset, &t->err);
            expected++;
        }
    const st_tensor *ct;
    const int64_t cshape[2] = {NUM_COUNTERS, 4};
    float counters[NUM_COUNTERS * 4];
    uint64_t v[NUM_COUNTERS];
    if ((s = find_f32(&t->err, f, COUNTERS_NAME, 2, cshape, &ct)) != LEGO_OK) goto done;
    st_to_f32(ct, counters, &t->err);
    if (!counters_unpack(counters, v)) {
        s = lego_fail(&t->err, LEGO_ERR_FORMAT, "'%s' holds invalid counters", COUNTERS_NAME);
        goto done;
    }
    if (f->num_tensors != expected) {
        s = lego_fail(&t->err, LEGO_ERR_FORMAT, "%d tensors, a trainer state has %d",
                      f->num_tensors, expected);
        goto done;
    }
    if ((s = check_state_values(m, &t->err, fresh, nv)) != LEGO_OK) goto done;
    /* All checked: commit. */
    memcpy(m->params, fresh, nv * sizeof *fresh);
    model_weights_changed(m);
    memcpy(t->ema, fresh + nv, nv * sizeof *fresh);
    memcpy(t->adam_m, fresh + 2 * nv, nv * sizeof *fresh);
    memcpy(t->adam_v, fresh + 3 * nv, nv * sizeof *fresh);
    cuda_train_detach(m, t); /* its device state is stale: uploaded again at the next step */
    t->step = (int64_t)v[0];
    t->adam_t = (int64_t)v[1];
    t->images_seen = (int64_t)v[2];
    t->skipped = (int64_t)v[3];
    t->seed = v[4];
    lego_train_stats_init(&t->last); /* no step taken by this handle since */
done:
    if (s != LEGO_OK) lego_err_prefix(&t->err, "%s", path);
    free(fresh);
    free(json);
    st_close(f);
    return s;
}

LEGO_API lego_status lego_trainer_export_ema(lego_trainer *t, const char *path) {
    TRAINER_CHECK(t);
    if (!path) return lego_fail(&t->err, LEGO_ERR_INVALID_ARGUMENT, "path is NULL");
    lego_model *m = t->m;
    lego_status ps = cuda_backend_pull(m, &t->err); /* the EMA trained on the GPU */
    if (ps != LEGO_OK) return ps;
    st_write_item *items = calloc((size_t)m->num_params, sizeof *items);
    char *json = config_to_json(m);
    lego_status s = LEGO_OK;
    if (!items || !json) {
        s = lego_fail(&t->err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    } else {
        for (int i = 0; i < m->num_params; i++) {
            const lego_param *p = &m->table[i];
            items[i].name = p->name;
            items[i].rank = p->rank;
            memcpy(items[i].shape, p->shape, sizeof p->shape);
            items[i].data = t->ema + p->offset;
        }
        s = st_write_f32(path, items, m->num_params, json, &t->err);
    }
    free(items);
    free(json);
    return s;
}
