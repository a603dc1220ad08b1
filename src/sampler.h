/*
 * sampler.h -- the solvers behind lego_sample and lego_step.  Internal.
 *
 * The state x is kept in float64 as the reference sampler does; the
 * network sees it rounded to float32.
 */
#ifndef LEGO_SAMPLER_H
#define LEGO_SAMPLER_H

#include "denoise.h"
#include "model.h"

#define SAMPLER_MAX_STEPS 100000

/* Which bricks run at step `step` starting from noise level t_cur. */
uint32_t skip_brick_mask(const lego_skip_policy *p, int num_bricks, int step, double t_cur);

/* The scalars of one solver step, all decided before x is seen: the CPU
 * solver (solver_step) and the device loop (cuda/sampler.cu) both follow
 * it, so the two compute the same expressions.
 *   EDM (Heun, Euler): x_hat = x + kick n (churn only), D at t_hat,
 *     d = (x_hat - D) / t_hat, x = x_hat + (t_next - t_hat) d; with heun,
 *     D at t_next and x = x_hat + (t_next - t_hat)(d/2 + d'/2).
 *   DPM-Solver++(2M): D at t_cur; dpm_last: x = D; else
 *     x = ratio x + weight D', D' = D, or coef_d D - coef_old D_prev with
 *     dpm_second. */
typedef struct solver_plan {
    uint32_t mask;      /* bricks that run                              */
    int evals;          /* network evaluations: 1 or 2                  */
    double t_eval[2];   /* their noise levels                           */
    double t_next;
    /* EDM */
    int churn;          /* noise is drawn and added (S_churn > 0, in range) */
    int heun;           /* the second-order correction follows          */
    double t_hat, kick;
    /* DPM-Solver++(2M) */
    int dpm_last, dpm_second;
    double ratio, weight, coef_d, coef_old;
} solver_plan;

/* Plan step `step` from t_cur to t_next (t_prev: the previous level, 0 on
 * the first step; have_old_den: DPM-Solver++ has the previous D). */
void solver_plan_step(const lego_sample_options *o, int num_bricks, int step, double t_prev,
                      double t_cur, double t_next, int have_old_den, solver_plan *p);

/* Everything one solver step needs besides x. */
typedef struct solver_ctx {
    lego_model *m;
    int n, h, w;
    size_t chw;
    const lego_sample_options *opt;
    const float *label_vectors; /* n x label_dim or NULL */
    /* scratch, n*chw each */
    float *xf, *den, *sigma;
    double *x_hat, *d_cur, *old_den;
    int have_old_den;           /* DPM-Solver++(2M): old_den holds the last D */
    int64_t evals, brick_evals; /* accounting, per image */
} solver_ctx;

lego_status solver_ctx_init(solver_ctx *c, lego_model *m, int n, int h, int w,
                            const lego_sample_options *opt, const float *label_vectors);
/* Bytes solver_ctx_init allocates for n images of chw values (sizes
 * already bounded by the caller). */
size_t solver_ctx_bytes(int n, size_t chw, lego_solver solver);
void solver_ctx_free(solver_ctx *c);

/* Check solver options; message into m->err. */
lego_status solver_validate(lego_model *m, const lego_sample_options *o);

/* One step of x (float64, n x chw) from t_cur to t_next.  `noise` is the
 * standard-normal churn draw (n x chw) or NULL; t_prev is the previous
 * level (DPM-Solver++), 0 on the first step. */
lego_status solver_step(solver_ctx *c, double *x, int step, double t_prev, double t_cur,
                        double t_next, const double *noise);

#endif /* LEGO_SAMPLER_H */
