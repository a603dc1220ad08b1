/*
 * sample.c -- lego_sample (the whole loop) and lego_step (one step).
 *
 * Every image has its own generator, seeded with its own seed, so an image
 * does not depend on the batch it is drawn in.  With the PyTorch generator
 * the draws happen in the reference generate.py order: latents (float32),
 * then the class label, then float64 churn noise at every step, used or
 * not.  With Philox each use has its own stream: 0 latents, 1 labels,
 * 2 + i churn noise of step i.
 *
 * A model on the CUDA backend runs the whole loop on the device
 * (cuda_backend_sample, cuda/sampler.cu): the host plans the steps
 * (solver_plan_step), draws the labels, and with the PyTorch generator
 * also the latents and every step's churn noise up front; Philox latents
 * and noise are drawn on the device.  lego_step stays on the host.
 */
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend_cuda.h"
#include "rng.h"
#include "sampler.h"

enum { STREAM_LATENTS = 0, STREAM_LABELS = 1, STREAM_CHURN = 2 };

LEGO_API void lego_sample_options_init(lego_sample_options *o) {
    if (!o) return;
    memset(o, 0, sizeof *o);
    o->size = sizeof *o;
    o->solver = LEGO_SOLVER_HEUN;
    o->steps = 18;
    o->sigma_min = 0.002;
    o->sigma_max = 80;
    o->rho = 7;
    o->s_churn = 0;
    o->s_min = 0;
    o->s_max = INFINITY;
    o->s_noise = 1;
    o->guidance = 1.0f;
    o->rng = LEGO_RNG_PHILOX;
}

LEGO_API void lego_sample_request_init(lego_sample_request *r) {
    if (!r) return;
    memset(r, 0, sizeof *r);
    r->size = sizeof *r;
}

LEGO_API void lego_sample_result_init(lego_sample_result *r) {
    if (!r) return;
    memset(r, 0, sizeof *r);
    r->size = sizeof *r;
}

LEGO_API void lego_step_request_init(lego_step_request *r) {
    if (!r) return;
    memset(r, 0, sizeof *r);
    r->size = sizeof *r;
}

static int round_up(int v, int mult) { return (v + mult - 1) / mult * mult; }

/* Bounded batch and image sizes, so that n * C * H * W fits comfortably. */
static lego_status check_batch(lego_model *m, int n, int h, int w) {
    lego_status s = lego_check_batch_size(&m->err, n);
    if (s != LEGO_OK) return s;
    size_t need;
    if (model_denoise_floats(m, n, h, w, 1, &need) != LEGO_OK)
        return lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY, "a batch of %d images of %dx%d is too large",
                         n, h, w);
    return LEGO_OK;
}

typedef struct sample_run {
    lego_model *m;
    lego_sample_options o;
    lego_sample_request r;
    int n, h, w;        /* the size sampled at (padded) */
    size_t chw;
    double *sigmas;     /* steps + 1 */
    lego_torch_gen *gens;
    int32_t *labels;    /* n, or NULL for unconditional models */
    float *label_vec;
    double *x, *noise;
    solver_ctx ctx;
    /* The device loop (cuda_backend_sample). */
    int device;
    solver_plan *plan;  /* steps */
    float *latents;     /* PyTorch generator: the drawn latents, n x chw */
    int noise_slots;    /* PyTorch generator: steps with churn noise in `noise` */
} sample_run;

static void run_free(sample_run *s) {
    free(s->sigmas);
    free(s->gens);
    free(s->labels);
    free(s->label_vec);
    free(s->x);
    free(s->noise);
    free(s->plan);
    free(s->latents);
    solver_ctx_free(&s->ctx);
}

static uint64_t seed_of(const sample_run *s, int i) {
    return s->r.seeds ? s->r.seeds[i] : (uint64_t)i;
}

/* Latents, then labels, from each image's generator (in that order). */
static lego_status draw_start(sample_run *s) {
    lego_model *m = s->m;
    int L = m->cfg.label_dim;
    float *lat = malloc(s->chw * sizeof *lat);
    if (!lat) return lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    for (int i = 0; i < s->n; i++) {
        uint64_t seed = seed_of(s, i);
        const float *src = lat;
        if (s->r.latents) src = s->r.latents + (size_t)i * s->chw;
        else if (s->o.rng == LEGO_RNG_TORCH) torch_randn_f32(&s->gens[i], lat, s->chw);
        else philox_normal_f32(seed, STREAM_LATENTS, 0, s->chw, lat);
        double *x = s->x + (size_t)i * s->chw;
        for (size_t j = 0; j < s->chw; j++) x[j] = (double)src[j] * s->sigmas[0];
        if (L > 0 && !s->r.labels)
            s->labels[i] = (int32_t)(s->o.rng == LEGO_RNG_TORCH
                                         ? torch_randint(&s->gens[i], L)
                                         : philox_randint(seed, STREAM_LABELS, 0, L));
    }
    free(lat);
    return LEGO_OK;
}

/* Churn noise of step i; NULL where the step adds none.  The PyTorch
 * generator draws every step regardless, as the reference does. */
static const double *draw_noise(sample_run *s, int step) {
    const lego_sample_options *o = &s->o;
    double t = s->sigmas[step];
    int churn = o->solver != LEGO_SOLVER_DPMPP_2M && o->s_churn > 0 && o->s_min <= t && t <= o->s_max;
    if (o->rng == LEGO_RNG_TORCH && o->solver != LEGO_SOLVER_DPMPP_2M) {
        for (int i = 0; i < s->n; i++) torch_randn_f64(&s->gens[i], s->noise + (size_t)i * s->chw, s->chw);
        return s->noise;
    }
    if (!churn) return NULL;
    for (int i = 0; i < s->n; i++)
        philox_normal_f64(seed_of(s, i), STREAM_CHURN + (uint64_t)step, 0, s->chw,
                          s->noise + (size_t)i * s->chw);
    return s->noise;
}

/* Everything a run allocates, against the model's memory budget, before
 * any of it is allocated.  check_batch bounded n * chw far below 2^40, so
 * the sum cannot overflow. */
static lego_status sample_memory_check(sample_run *s, size_t len, size_t extra) {
    lego_model *m = s->m;
    size_t n = (size_t)s->n, L = (size_t)m->cfg.label_dim;
    size_t bytes = ((size_t)s->o.steps + 1) * sizeof *s->sigmas /* sigmas */
                   + extra;
    if (s->device)
        bytes += len * sizeof(double)                                /* x */
                 + (size_t)s->o.steps * sizeof(solver_plan)         /* plan */
                 + (s->o.rng == LEGO_RNG_TORCH ? len * sizeof(float) /* latents */
                                                     + s->chw * sizeof(double) : 0);
    else
        bytes += 2 * len * sizeof(double)  /* x, noise */
                 + s->chw * sizeof(float)  /* latents of one image */
                 + solver_ctx_bytes(s->n, s->chw, s->o.solver);
    if (s->o.rng == LEGO_RNG_TORCH) bytes += n * sizeof *s->gens;
    if (L > 0) bytes += n * sizeof *s->labels + n * L * sizeof(float); /* labels, one-hot rows */
    return denoise_memory_check(m, s->n, s->h, s->w, denoise_guided(m, s->o.guidance), bytes);
}

/* The device loop's part of prepare: every step planned, and what the host
 * draws (labels; with the PyTorch generator the latents and all churn
 * noise), each image's generator in the order of the host loop: latents,
 * label, the noise of step 0, 1, ... (drawn at every step, as the
 * reference does, kept only where the step adds it). */
static lego_status prepare_device(sample_run *s) {
    lego_model *m = s->m;
    int L = m->cfg.label_dim, steps = s->o.steps;
    int torch = s->o.rng == LEGO_RNG_TORCH, churn_draws = torch && s->o.solver != LEGO_SOLVER_DPMPP_2M;
    size_t len = (size_t)s->n * s->chw;
    s->plan = malloc((size_t)steps * sizeof *s->plan);
    if (!s->plan) return lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    for (int i = 0; i < steps; i++) {
        solver_plan *p = &s->plan[i];
        solver_plan_step(&s->o, m->num_bricks, i, i > 0 ? s->sigmas[i - 1] : 0, s->sigmas[i],
                         s->sigmas[i + 1], i > 0, p);
        s->ctx.evals += p->evals;
        s->ctx.brick_evals += (int64_t)p->evals * __builtin_popcount(p->mask);
        if (churn_draws && p->churn) s->noise_slots++;
    }
    double *scratch = NULL;
    if (torch) {
        lego_status st;
        size_t noise_bytes = (size_t)s->noise_slots * len * sizeof(double);
        if (s->noise_slots > 0 && (st = sample_memory_check(s, len, noise_bytes)) != LEGO_OK)
            return st;
        if (!s->r.latents) s->latents = malloc(len * sizeof *s->latents);
        if (s->noise_slots > 0) s->noise = malloc(noise_bytes);
        if (churn_draws) scratch = malloc(s->chw * sizeof *scratch);
        if ((!s->r.latents && !s->latents) || (s->noise_slots > 0 && !s->noise) ||
            (churn_draws && !scratch)) {
            free(scratch);
            return lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY, "out of memory for %d images", s->n);
        }
    }
    for (int i = 0; i < s->n; i++) {
        if (!torch) {
            if (L > 0 && !s->r.labels)
                s->labels[i] = (int32_t)philox_randint(seed_of(s, i), STREAM_LABELS, 0, L);
            continue;
        }
        lego_torch_gen *g = &s->gens[i];
        if (!s->r.latents) torch_randn_f32(g, s->latents + (size_t)i * s->chw, s->chw);
        if (L > 0 && !s->r.labels) s->labels[i] = (int32_t)torch_randint(g, L);
        for (int k = 0, slot = 0; churn_draws && k < steps; k++) {
            double *dst = scratch;
            if (s->plan[k].churn) dst = s->noise + ((size_t)slot++ * s->n + (size_t)i) * s->chw;
            torch_randn_f64(g, dst, s->chw);
        }
    }
    free(scratch);
    return labels_to_rows(m, s->n, s->labels, &s->label_vec);
}

/* The whole loop on the device; x comes back in s->x. */
static lego_status sample_on_device(sample_run *s) {
    cuda_sample_run run;
    memset(&run, 0, sizeof run);
    run.n = s->n;
    run.h = s->h;
    run.w = s->w;
    run.solver = s->o.solver;
    run.steps = s->o.steps;
    run.plan = s->plan;
    run.sigma0 = s->sigmas[0];
    run.guidance = s->o.guidance;
    run.label_vectors = s->label_vec;
    run.seeds = s->r.seeds;
    run.latents = s->r.latents ? s->r.latents : s->latents;
    run.noise = s->noise;
    run.noise_slots = s->noise_slots;
    run.progress = s->o.progress;
    run.progress_user = s->o.progress_user;
    run.x_out = s->x;
    return cuda_backend_sample(s->m, &run);
}

static lego_status prepare(sample_run *s) {
    lego_model *m = s->m;
    lego_status st;
    if ((st = solver_validate(m, &s->o)) != LEGO_OK) return st;
    if (!s->r.out) return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "out must not be NULL");
    if (s->r.pad != 0 && s->r.pad != 1)
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "pad must be 0 or 1");
    s->h = s->r.height;
    s->w = s->r.width;
    s->n = s->r.n;
    int mult = lego_model_resolution_multiple(m);
    if (s->r.pad && mult > 0 && s->h > 0 && s->w > 0 && s->h <= INT_MAX - mult &&
        s->w <= INT_MAX - mult) {
        s->h = round_up(s->h, mult);
        s->w = round_up(s->w, mult);
        if (s->r.latents && (s->h != s->r.height || s->w != s->r.width))
            return lego_fail(&m->err, LEGO_ERR_SHAPE,
                             "latents must have the padded size %dx%d", s->h, s->w);
    }
    if ((st = lego_model_check_resolution(m, s->h, s->w)) != LEGO_OK) return st;
    if ((st = check_batch(m, s->n, s->h, s->w)) != LEGO_OK) return st;
    s->chw = (size_t)m->cfg.img_channels * s->h * s->w;

    size_t len = (size_t)s->n * s->chw;
    s->device = cuda_backend_device_loop(m);
    if ((st = sample_memory_check(s, len, 0)) != LEGO_OK) return st;
    s->sigmas = malloc(((size_t)s->o.steps + 1) * sizeof *s->sigmas);
    s->x = malloc(len * sizeof *s->x);
    if (!s->device) s->noise = malloc(len * sizeof *s->noise);
    if (s->o.rng == LEGO_RNG_TORCH) s->gens = malloc((size_t)s->n * sizeof *s->gens);
    if (m->cfg.label_dim > 0) s->labels = malloc((size_t)s->n * sizeof *s->labels);
    if (!s->sigmas || !s->x || (!s->device && !s->noise) ||
        (s->o.rng == LEGO_RNG_TORCH && !s->gens) ||
        (m->cfg.label_dim > 0 && !s->labels))
        return lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY, "out of memory for %d images", s->n);

    if (s->o.sigmas) {
        memcpy(s->sigmas, s->o.sigmas, (size_t)s->o.steps * sizeof *s->sigmas);
        s->sigmas[s->o.steps] = 0;
    } else {
        lego_karras_sigmas(s->o.steps, s->o.sigma_min, s->o.sigma_max, s->o.rho, s->sigmas);
    }
    if (s->gens)
        for (int i = 0; i < s->n; i++) torch_gen_seed(&s->gens[i], seed_of(s, i));
    if (s->labels && s->r.labels) memcpy(s->labels, s->r.labels, (size_t)s->n * sizeof *s->labels);
    if (s->device) return prepare_device(s);
    if ((st = draw_start(s)) != LEGO_OK) return st;
    if ((st = labels_to_rows(m, s->n, s->labels, &s->label_vec)) != LEGO_OK) return st;
    return solver_ctx_init(&s->ctx, m, s->n, s->h, s->w, &s->o, s->label_vec);
}

/* Copy the (centre of the) sampled images to the caller's buffer. */
static void crop_out(const sample_run *s) {
    int C = s->m->cfg.img_channels, H = s->r.height, W = s->r.width;
    int y0 = (s->h - H) / 2, x0 = (s->w - W) / 2;
    for (int i = 0; i < s->n; i++)
        for (int c = 0; c < C; c++)
            for (int y = 0; y < H; y++) {
                const double *src = s->x + (((size_t)i * C + c) * s->h + (size_t)(y + y0)) * s->w + x0;
                float *dst = s->r.out + (((size_t)i * C + c) * H + (size_t)y) * W;
                for (int x = 0; x < W; x++) dst[x] = (float)src[x];
            }
}

LEGO_API lego_status lego_sample(lego_model *m, const lego_sample_request *request,
                                 const lego_sample_options *options, lego_sample_result *result) {
    MODEL_CHECK(m);
    if (!request) return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "request is NULL");
    sample_run s;
    memset(&s, 0, sizeof s);
    s.m = m;
    lego_sample_options_init(&s.o);
    if (options) lego_copy_options(&s.o, sizeof s.o, options, options->size);
    lego_sample_request_init(&s.r);
    lego_copy_options(&s.r, sizeof s.r, request, request->size);
    if (m->num_bricks == 0) return lego_fail(&m->err, LEGO_ERR_STATE, "the model has no bricks");

    lego_status st = prepare(&s);
    if (st == LEGO_OK && s.device) st = sample_on_device(&s);
    for (int i = 0; st == LEGO_OK && !s.device && i < s.o.steps; i++) {
        const double *noise = draw_noise(&s, i);
        st = solver_step(&s.ctx, s.x, i, i > 0 ? s.sigmas[i - 1] : 0, s.sigmas[i], s.sigmas[i + 1],
                         noise);
        if (st == LEGO_OK && s.o.progress && s.o.progress(i + 1, s.o.steps, s.o.progress_user))
            st = lego_fail(&m->err, LEGO_ERR_CANCELLED, "cancelled by the progress callback at step %d",
                           i + 1);
    }
    if (st == LEGO_OK) {
        crop_out(&s);
        if (s.r.labels_out)
            for (int i = 0; i < s.n; i++) s.r.labels_out[i] = s.labels ? s.labels[i] : -1;
        if (result) {
            lego_sample_result res;
            lego_sample_result_init(&res);
            res.network_evals = s.ctx.evals;
            res.brick_evals = s.ctx.brick_evals;
            res.brick_evals_saved = s.ctx.evals * m->num_bricks - s.ctx.brick_evals;
            lego_copy_options(result, result->size, &res, sizeof res);
        }
    }
    run_free(&s);
    return st;
}

LEGO_API lego_status lego_step(lego_model *m, const lego_step_request *request,
                               const lego_sample_options *options) {
    MODEL_CHECK(m);
    if (!request) return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "request is NULL");
    lego_step_request r;
    lego_step_request_init(&r);
    lego_copy_options(&r, sizeof r, request, request->size);
    lego_sample_options o;
    lego_sample_options_init(&o);
    if (options) lego_copy_options(&o, sizeof o, options, options->size);
    if (m->num_bricks == 0) return lego_fail(&m->err, LEGO_ERR_STATE, "the model has no bricks");

    lego_status st = solver_validate(m, &o);
    if (st != LEGO_OK) return st;
    if (!r.x) return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "x must not be NULL");
    if (!(r.t_cur > 0) || !isfinite(r.t_cur) || !(r.t_next >= 0) || !(r.t_next < r.t_cur) ||
        !(r.t_prev >= 0) || !isfinite(r.t_prev))
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT,
                         "need t_cur > t_next >= 0 and t_prev >= 0, got t_cur %g, t_next %g, t_prev %g",
                         r.t_cur, r.t_next, r.t_prev);
    if ((st = lego_model_check_resolution(m, r.height, r.width)) != LEGO_OK) return st;
    if ((st = check_batch(m, r.n, r.height, r.width)) != LEGO_OK) return st;

    size_t len = (size_t)r.n * m->cfg.img_channels * r.height * r.width;
    size_t chw = len / (size_t)r.n, L = (size_t)m->cfg.label_dim;
    size_t bytes = len * sizeof(double) * (r.noise ? 2 : 1) + /* x, noise */
                   solver_ctx_bytes(r.n, chw, o.solver) +
                   (L > 0 && r.labels ? (size_t)r.n * L * sizeof(float) : 0);
    if ((st = denoise_memory_check(m, r.n, r.height, r.width, denoise_guided(m, o.guidance),
                                   bytes)) != LEGO_OK)
        return st;
    float *vec = NULL;
    double *x = malloc(len * sizeof *x), *noise = r.noise ? malloc(len * sizeof *noise) : NULL;
    solver_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    if (!x || (r.noise && !noise)) {
        st = lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
        goto done;
    }
    if ((st = labels_to_rows(m, r.n, r.labels, &vec)) != LEGO_OK) goto done;
    if ((st = solver_ctx_init(&ctx, m, r.n, r.height, r.width, &o, vec)) != LEGO_OK) goto done;
    for (size_t i = 0; i < len; i++) x[i] = r.x[i];
    for (size_t i = 0; noise && i < len; i++) noise[i] = r.noise[i];
    if (o.solver == LEGO_SOLVER_DPMPP_2M && r.t_prev > 0 && r.denoised) {
        for (size_t i = 0; i < len; i++) ctx.old_den[i] = r.denoised[i];
        ctx.have_old_den = 1;
    }
    if ((st = solver_step(&ctx, x, r.step, r.t_prev, r.t_cur, r.t_next, noise)) != LEGO_OK) goto done;
    for (size_t i = 0; i < len; i++) r.x[i] = (float)x[i];
    if (r.denoised) memcpy(r.denoised, ctx.den, len * sizeof *r.denoised);
done:
    solver_ctx_free(&ctx);
    free(vec);
    free(x);
    free(noise);
    return st;
}
