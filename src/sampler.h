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
