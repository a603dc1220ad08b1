/*
 * philox_device.h -- Philox4x32-10 and its normals as device functions,
 * shared by philox.cu (the test entry points) and sampler.cu (latents and
 * churn noise of the device sampling loop).  Formulas in src/rng.h; see
 * philox.cu for how exactly the device matches the CPU.  CUDA C++, included
 * only by .cu files of cuda/ (after cuda_internal.h).
 */
#ifndef LEGO_PHILOX_DEVICE_H
#define LEGO_PHILOX_DEVICE_H

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u
#define TWO_PI 6.283185307179586476925286766559

__device__ __forceinline__ void philox_block(uint64_t seed, uint64_t stream, uint64_t block,
                                             uint32_t w[4]) {
    uint32_t c0 = (uint32_t)block, c1 = (uint32_t)(block >> 32);
    uint32_t c2 = (uint32_t)stream, c3 = (uint32_t)(stream >> 32);
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int round = 0; round < 10; round++) {
        if (round > 0) { /* the key is bumped between rounds */
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        uint32_t hi0 = __umulhi(PHILOX_M0, c0), lo0 = PHILOX_M0 * c0;
        uint32_t hi1 = __umulhi(PHILOX_M1, c2), lo1 = PHILOX_M1 * c2;
        uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c1 = lo1;
        c3 = lo0;
        c0 = n0;
        c2 = n2;
    }
    w[0] = c0;
    w[1] = c1;
    w[2] = c2;
    w[3] = c3;
}

__device__ __forceinline__ double philox_u01(uint32_t x) {
    return ((double)x + 1.0) * 0x1p-32;
}

/* The four normals of block `block` of (seed, stream), in double. */
__device__ __forceinline__ void philox_normal4(uint64_t seed, uint64_t stream, uint64_t block,
                                               double z[4]) {
    uint32_t w[4];
    philox_block(seed, stream, block, w);
    for (int p = 0; p < 2; p++) {
        double r = sqrt(-2.0 * log(philox_u01(w[2 * p])));
        double t = TWO_PI * philox_u01(w[2 * p + 1]);
        z[2 * p] = r * cos(t);
        z[2 * p + 1] = r * sin(t);
    }
}

#endif /* LEGO_PHILOX_DEVICE_H */
