/*
 * brick.h -- the forward pass of one brick on the CPU.  Internal.
 */
#ifndef LEGO_BRICK_H
#define LEGO_BRICK_H

#include "model.h"

/* Floats of scratch brick_forward needs for brick k on n images of h x w. */
size_t brick_scratch_floats(const lego_model *m, int k, int n, int h, int w);

/* F_k = brick k applied to n images of h x w.
 *   xin    c_in * x, n x C x h x w
 *   below  F_{k'} of the last brick run below (NULL for the first brick)
 *   silu_c SiLU(c), n x D
 *   out    n x C x h x w */
void brick_forward(lego_model *m, int k, int n, int h, int w, const float *xin,
                   const float *below, const float *silu_c, float *out, float *scratch);

#endif /* LEGO_BRICK_H */
