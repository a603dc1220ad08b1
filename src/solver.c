/*
 * solver.c -- EDM Heun and Euler (with stochastic churn) and
 * DPM-Solver++(2M), one step at a time.
 *
 * Heun/Euler follow the reference edm_sampler line for line:
 *   gamma  = min(S_churn/N, sqrt2 - 1) if S_min <= t_cur <= S_max else 0
 *   t_hat  = t_cur + gamma t_cur
 *   x_hat  = x + sqrt(t_hat^2 - t_cur^2) S_noise n
 *   d      = (x_hat - D(x_hat; t_hat)) / t_hat
 *   x'     = x_hat + (t_next - t_hat) d
 *   Heun, t_next > 0:  x' = x_hat + (t_next - t_hat)(d + d(x'; t_next)) / 2
 * DPM-Solver++(2M) (Lu et al. 2022) in log-sigma time lambda = -ln sigma,
 * with the second-order correction from the previous step's D.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sampler.h"

lego_status solver_validate(lego_model *m, const lego_sample_options *o) {
    if (o->solver != LEGO_SOLVER_HEUN && o->solver != LEGO_SOLVER_EULER &&
        o->solver != LEGO_SOLVER_DPMPP_2M)
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "unknown solver %d", (int)o->solver);
    if (o->rng != LEGO_RNG_PHILOX && o->rng != LEGO_RNG_TORCH)
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "unknown generator %d", (int)o->rng);
    if (o->steps < 1 || o->steps > SAMPLER_MAX_STEPS)
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "steps must be in [1, %d], got %d",
                         SAMPLER_MAX_STEPS, o->steps);
    if (!o->sigmas && (!(o->sigma_min > 0) || !(o->sigma_max > o->sigma_min) ||
                       !isfinite(o->sigma_max)))
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT,
                         "need 0 < sigma_min < sigma_max < inf, got sigma_min %g, sigma_max %g",
                         o->sigma_min, o->sigma_max);
    if (!o->sigmas && (!(o->rho > 0) || !isfinite(o->rho)))
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "rho must be positive, got %g", o->rho);
    if (o->sigmas)
        for (int i = 0; i < o->steps; i++)
            if (!(o->sigmas[i] > 0) || !isfinite(o->sigmas[i]) ||
                (i > 0 && !(o->sigmas[i] < o->sigmas[i - 1])))
                return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT,
                                 "sigmas must be finite, positive and strictly decreasing "
                                 "(sigmas[%d] = %g)", i, o->sigmas[i]);
    if (!(o->s_churn >= 0) || !isfinite(o->s_churn) || !(o->s_noise >= 0) ||
        !isfinite(o->s_noise) || isnan(o->s_min) || isnan(o->s_max))
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT,
                         "churn settings must be non-negative numbers");
    if (!(o->guidance >= 0) || !isfinite(o->guidance))
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT,
                         "guidance scale %g must be finite and non-negative", (double)o->guidance);
    if (o->skip) {
        for (int k = 0; k < m->num_bricks; k++)
            if (isnan(o->skip->sigma_min[k]) || isnan(o->skip->sigma_max[k]))
                return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT,
                                 "skip policy for brick %d has a NaN bound", k);
    }
    return LEGO_OK;
}

lego_status solver_ctx_init(solver_ctx *c, lego_model *m, int n, int h, int w,
                            const lego_sample_options *opt, const float *label_vectors) {
    memset(c, 0, sizeof *c);
    c->m = m;
    c->n = n;
    c->h = h;
    c->w = w;
    c->chw = (size_t)m->cfg.img_channels * h * w;
    c->opt = opt;
    c->label_vectors = label_vectors;
    size_t len = (size_t)n * c->chw; /* bounded by the caller's size checks */
    c->xf = malloc(len * sizeof *c->xf);
    c->den = malloc(len * sizeof *c->den);
    c->x_hat = malloc(len * sizeof *c->x_hat);
    c->d_cur = malloc(len * sizeof *c->d_cur);
    c->sigma = malloc((size_t)n * sizeof *c->sigma);
    c->old_den = opt->solver == LEGO_SOLVER_DPMPP_2M ? malloc(len * sizeof *c->old_den) : NULL;
    if (!c->xf || !c->den || !c->sigma || !c->x_hat || !c->d_cur ||
        (opt->solver == LEGO_SOLVER_DPMPP_2M && !c->old_den)) {
        solver_ctx_free(c);
        return lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY, "out of memory for %d images of %dx%d",
                         n, h, w);
    }
    return LEGO_OK;
}

size_t solver_ctx_bytes(int n, size_t chw, lego_solver solver) {
    size_t len = (size_t)n * chw;
    size_t per = 2 * sizeof(float) + 2 * sizeof(double); /* xf, den, x_hat, d_cur */
    if (solver == LEGO_SOLVER_DPMPP_2M) per += sizeof(double); /* old_den */
    return len * per + (size_t)n * sizeof(float);
}

void solver_ctx_free(solver_ctx *c) {
    free(c->xf);
    free(c->den);
    free(c->x_hat);
    free(c->d_cur);
    free(c->old_den);
    free(c->sigma);
    memset(c, 0, sizeof *c);
}

/* c->den = D(x; t) for every image, with the step's bricks. */
static lego_status evaluate(solver_ctx *c, const double *x, double t, uint32_t mask) {
    size_t len = (size_t)c->n * c->chw;
    for (size_t i = 0; i < len; i++) c->xf[i] = (float)x[i];
    for (int i = 0; i < c->n; i++) c->sigma[i] = (float)t;
    denoise_args a = {
        .n = c->n, .h = c->h, .w = c->w, .x = c->xf, .sigma = c->sigma,
        .label_vectors = c->label_vectors, .guidance = c->opt->guidance,
        .brick_mask = mask, .out = c->den,
    };
    lego_status s = model_denoise(c->m, &a);
    c->evals++;
    c->brick_evals += __builtin_popcount(mask);
    return s;
}

void solver_plan_step(const lego_sample_options *o, int num_bricks, int step, double t_prev,
                      double t_cur, double t_next, int have_old_den, solver_plan *p) {
    memset(p, 0, sizeof *p);
    p->mask = skip_brick_mask(o->skip, num_bricks, step, t_cur);
    p->t_next = t_next;
    p->evals = 1;
    if (o->solver == LEGO_SOLVER_DPMPP_2M) {
        p->t_eval[0] = t_cur;
        if (t_next <= 0) { /* the last step lands on D itself */
            p->dpm_last = 1;
            return;
        }
        double lam = -log(t_cur), lam_next = -log(t_next), h = lam_next - lam;
        p->ratio = t_next / t_cur;
        p->weight = -expm1(-h);
        p->dpm_second = have_old_den && t_prev > t_cur;
        if (p->dpm_second) {
            double r = (lam - (-log(t_prev))) / h;
            p->coef_d = 1 + 1 / (2 * r);
            p->coef_old = 1 / (2 * r);
        }
        return;
    }
    double gamma = 0;
    int in_range = o->s_min <= t_cur && t_cur <= o->s_max;
    if (in_range) {
        gamma = o->s_churn / o->steps;
        if (gamma > sqrt(2.0) - 1) gamma = sqrt(2.0) - 1;
    }
    p->churn = o->s_churn > 0 && in_range;
    p->t_hat = t_cur + gamma * t_cur;
    p->kick = sqrt(p->t_hat * p->t_hat - t_cur * t_cur) * o->s_noise;
    p->t_eval[0] = p->t_hat;
    p->heun = o->solver == LEGO_SOLVER_HEUN && t_next > 0;
    if (p->heun) {
        p->t_eval[1] = t_next;
        p->evals = 2;
    }
}

static lego_status step_edm(solver_ctx *c, double *x, const solver_plan *p, const double *noise) {
    size_t len = (size_t)c->n * c->chw;
    double t_hat = p->t_hat, t_next = p->t_next;
    for (size_t i = 0; i < len; i++) c->x_hat[i] = x[i] + (noise ? p->kick * noise[i] : 0.0);

    lego_status s = evaluate(c, c->x_hat, t_hat, p->mask);
    if (s != LEGO_OK) return s;
    for (size_t i = 0; i < len; i++) {
        c->d_cur[i] = (c->x_hat[i] - (double)c->den[i]) / t_hat;
        x[i] = c->x_hat[i] + (t_next - t_hat) * c->d_cur[i];
    }
    if (!p->heun) return LEGO_OK;

    s = evaluate(c, x, t_next, p->mask);
    if (s != LEGO_OK) return s;
    for (size_t i = 0; i < len; i++) {
        double d_prime = (x[i] - (double)c->den[i]) / t_next;
        x[i] = c->x_hat[i] + (t_next - t_hat) * (0.5 * c->d_cur[i] + 0.5 * d_prime);
    }
    return LEGO_OK;
}

static lego_status step_dpmpp_2m(solver_ctx *c, double *x, const solver_plan *p) {
    size_t len = (size_t)c->n * c->chw;
    lego_status s = evaluate(c, x, p->t_eval[0], p->mask);
    if (s != LEGO_OK) return s;
    if (p->dpm_last) {
        for (size_t i = 0; i < len; i++) x[i] = c->den[i];
        return LEGO_OK;
    }
    for (size_t i = 0; i < len; i++) {
        double d = c->den[i];
        if (p->dpm_second) d = p->coef_d * d - p->coef_old * c->old_den[i];
        x[i] = p->ratio * x[i] + p->weight * d; /* e^-h x + (1 - e^-h) D */
        c->old_den[i] = c->den[i];
    }
    c->have_old_den = 1;
    return LEGO_OK;
}

lego_status solver_step(solver_ctx *c, double *x, int step, double t_prev, double t_cur,
                        double t_next, const double *noise) {
    solver_plan p;
    solver_plan_step(c->opt, c->m->num_bricks, step, t_prev, t_cur, t_next, c->have_old_den, &p);
    if (c->opt->solver == LEGO_SOLVER_DPMPP_2M) return step_dpmpp_2m(c, x, &p);
    return step_edm(c, x, &p, noise);
}
