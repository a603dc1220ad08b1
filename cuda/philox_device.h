/*
 * philox_device.h -- Philox4x32-10 and its normals as device functions,
 * shared by philox.cu (the test entry points) and sampler.cu (latents and
 * churn noise of the device sampling loop).  The arithmetic is the CPU's
 * own text (src/philox_core.h, formulas in src/rng.h); see philox.cu for
 * how exactly the device matches the CPU.  CUDA C++, included only by .cu
 * files of cuda/ (after cuda_internal.h).
 */
#ifndef LEGO_PHILOX_DEVICE_H
#define LEGO_PHILOX_DEVICE_H

#include "philox_core.h"

#endif /* LEGO_PHILOX_DEVICE_H */
