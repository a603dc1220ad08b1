/*
 * schedule.c -- noise levels and skip policies: which sigma each step
 * starts from and which bricks run there.
 */
#include <limits.h>
#include <math.h>
#include <string.h>

#include "sampler.h"

LEGO_API lego_status lego_karras_sigmas(int steps, double sigma_min, double sigma_max, double rho,
                                        double *sigmas) {
    if (!sigmas || steps < 1 || steps > SAMPLER_MAX_STEPS) return LEGO_ERR_INVALID_ARGUMENT;
    if (!(sigma_min > 0) || !(sigma_max > sigma_min) || !isfinite(sigma_max) || !(rho > 0) ||
        !isfinite(rho))
        return LEGO_ERR_INVALID_ARGUMENT;
    double a = pow(sigma_max, 1.0 / rho), b = pow(sigma_min, 1.0 / rho);
    for (int i = 0; i < steps; i++)
        sigmas[i] = steps == 1 ? sigma_max : pow(a + (double)i / (steps - 1) * (b - a), rho);
    sigmas[steps] = 0;
    return LEGO_OK;
}

LEGO_API void lego_skip_policy_init(lego_skip_policy *p) {
    if (!p) return;
    memset(p, 0, sizeof *p);
    p->size = sizeof *p;
    for (int k = 0; k < LEGO_MAX_BRICKS; k++) {
        p->sigma_min[k] = 0;
        p->sigma_max[k] = INFINITY;
        p->step_min[k] = 0;
        p->step_max[k] = INT_MAX;
    }
}

LEGO_API lego_status lego_skip_policy_preset(lego_skip_policy *p, const lego_model *m,
                                             lego_skip_rule rule, int steps, double fraction,
                                             double break_sigma) {
    if (!p || !m || m->failed) return LEGO_ERR_INVALID_ARGUMENT;
    int top = m->num_bricks - 1;
    if (top < 1) return LEGO_ERR_INVALID_ARGUMENT; /* brick 0 cannot be skipped */
    if (rule != LEGO_SKIP_TOP_AT_LOW_NOISE && rule != LEGO_SKIP_TOP_AT_HIGH_NOISE)
        return LEGO_ERR_INVALID_ARGUMENT;
    if (break_sigma > 0) {
        if (!isfinite(break_sigma)) return LEGO_ERR_INVALID_ARGUMENT;
        if (rule == LEGO_SKIP_TOP_AT_LOW_NOISE) p->sigma_min[top] = break_sigma;
        else p->sigma_max[top] = break_sigma;
        return LEGO_OK;
    }
    if (steps < 1 || steps > SAMPLER_MAX_STEPS || !(fraction >= 0 && fraction <= 1))
        return LEGO_ERR_INVALID_ARGUMENT;
    int at = (int)floor(fraction * steps);
    if (rule == LEGO_SKIP_TOP_AT_LOW_NOISE) p->step_max[top] = at;
    else p->step_min[top] = at;
    return LEGO_OK;
}

uint32_t skip_brick_mask(const lego_skip_policy *p, int num_bricks, int step, double t_cur) {
    uint32_t mask = 1u; /* brick 0 always runs */
    for (int k = 1; k < num_bricks; k++) {
        int runs = !p || (t_cur >= p->sigma_min[k] && t_cur <= p->sigma_max[k] &&
                          step >= p->step_min[k] && step <= p->step_max[k]);
        if (runs) mask |= 1u << k;
    }
    return mask;
}
