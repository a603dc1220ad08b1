/*
 * lego.c -- the small parts of the public API: versions, status names,
 * option defaults, and request validation for lego_denoise.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "denoise.h"
#include "model.h"

LEGO_API const char *lego_version(void) { return LEGO_VERSION_STRING; }
LEGO_API int lego_version_number(void) { return LEGO_VERSION_NUMBER; }

LEGO_API const char *lego_status_string(lego_status status) {
    switch (status) {
    case LEGO_OK: return "success";
    case LEGO_ERR_INVALID_ARGUMENT: return "invalid argument";
    case LEGO_ERR_OUT_OF_MEMORY: return "out of memory";
    case LEGO_ERR_IO: return "input/output error";
    case LEGO_ERR_FORMAT: return "malformed file";
    case LEGO_ERR_SHAPE: return "shape mismatch";
    case LEGO_ERR_UNSUPPORTED: return "unsupported";
    case LEGO_ERR_CANCELLED: return "cancelled";
    case LEGO_ERR_BACKEND: return "backend failure";
    case LEGO_ERR_STATE: return "handle not usable";
    }
    return "unknown status";
}

LEGO_API void lego_model_config_init(lego_model_config *c) {
    if (!c) return;
    memset(c, 0, sizeof *c);
    c->size = sizeof *c;
    c->img_channels = 3;
    c->img_resolution = 32;
    c->label_dim = 0;
    c->hidden_size = 384;
    c->num_heads = 6;
    c->mlp_ratio = 4.0;
    c->frequency_embedding_size = 256;
    c->sigma_data = 0.5;
    c->num_threads = 0;
    c->backend = LEGO_BACKEND_CPU;
    c->device = 0;
    c->precision = LEGO_PRECISION_FP32;
}

LEGO_API void lego_brick_config_init(lego_brick_config *b) {
    if (!b) return;
    memset(b, 0, sizeof *b);
    b->size = sizeof *b;
    b->brick_size = 32;
    b->patch_size = 2;
    b->depth = 1;
}

LEGO_API void lego_load_options_init(lego_load_options *o) {
    if (!o) return;
    memset(o, 0, sizeof *o);
    o->size = sizeof *o;
    o->backend = LEGO_BACKEND_CPU;
}

LEGO_API void lego_denoise_request_init(lego_denoise_request *r) {
    if (!r) return;
    memset(r, 0, sizeof *r);
    r->size = sizeof *r;
    r->guidance = 1.0f;
}

LEGO_API lego_status lego_denoise(lego_model *m, const lego_denoise_request *request) {
    MODEL_CHECK(m);
    if (!request) return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "request is NULL");
    lego_denoise_request r;
    lego_denoise_request_init(&r);
    lego_copy_options(&r, sizeof r, request, request->size);

    if (m->num_bricks == 0) return lego_fail(&m->err, LEGO_ERR_STATE, "the model has no bricks");
    lego_status s = lego_check_batch_size(&m->err, r.n);
    if (s != LEGO_OK) return s;
    if ((s = lego_model_check_resolution(m, r.height, r.width)) != LEGO_OK) return s;
    if (!r.x || !r.sigma || !r.out)
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "x, sigma and out must not be NULL");
    if ((s = lego_check_sigmas(&m->err, r.sigma, r.n)) != LEGO_OK) return s;
    if (!(r.guidance >= 0) || !isfinite(r.guidance))
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT,
                         "guidance scale %g must be finite and non-negative", (double)r.guidance);
    if (r.labels && r.label_vectors)
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT,
                         "give labels or label_vectors, not both");
    int K = m->num_bricks;
    if (r.num_bricks < 0 || r.num_bricks > K)
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT,
                         "num_bricks %d is out of range [0, %d]", r.num_bricks, K);
    uint32_t all = K == 32 ? 0xffffffffu : ((1u << K) - 1);
    if (r.skip_mask & 1u)
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "the first brick cannot be skipped");
    if (r.skip_mask & ~all)
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT,
                         "skip_mask 0x%x names bricks the model does not have (%d bricks)",
                         (unsigned)r.skip_mask, K);
    uint32_t run = r.num_bricks ? (r.num_bricks == 32 ? all : (1u << r.num_bricks) - 1) : all;
    run &= ~r.skip_mask;

    int L = m->cfg.label_dim;
    /* n <= LEGO_MAX_BATCH and L <= 10^6: the one-hot rows' size fits. */
    size_t label_bytes = L > 0 && r.labels ? (size_t)r.n * (size_t)L * sizeof(float) : 0;
    s = denoise_memory_check(m, r.n, r.height, r.width, denoise_guided(m, r.guidance),
                             label_bytes);
    if (s != LEGO_OK) return s;
    float *vectors = NULL;
    if (L > 0 && r.labels) {
        if ((s = labels_to_rows(m, r.n, r.labels, &vectors)) != LEGO_OK) return s;
    } else if (L > 0 && r.label_vectors) {
        for (size_t i = 0; i < (size_t)r.n * (size_t)L; i++)
            if (!isfinite(r.label_vectors[i]))
                return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT,
                                 "label_vectors[%zu] is not finite", i);
    }

    denoise_args a = {
        .n = r.n, .h = r.height, .w = r.width, .x = r.x, .sigma = r.sigma,
        .label_vectors = vectors ? vectors : (L > 0 ? r.label_vectors : NULL),
        .guidance = r.guidance, .brick_mask = run, .out = r.out,
        .brick_outputs = r.brick_outputs, .cond_out = r.cond,
    };
    s = model_denoise(m, &a);
    free(vectors);
    return s;
}
