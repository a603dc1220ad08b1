/*
 * philox_core.h -- one Philox4x32-10 block and its four normals, by the
 * formulas in rng.h, as plain arithmetic that compiles twice: as static
 * inline C for rng.c and as device functions for the CUDA kernels (through
 * cuda/philox_device.h).  One text, so that both sides run the same integer
 * and double operations in the same order.  Internal.
 */
#ifndef LEGO_PHILOX_CORE_H
#define LEGO_PHILOX_CORE_H

#include <math.h>
#include <stdint.h>

/* In this project C++ means CUDA (or its host emulation, tests/cuda-emu). */
#ifdef __cplusplus
#define PHILOX_FN __device__ __forceinline__
#else
#define PHILOX_FN static inline
#endif

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u
/* 2 pi, as torch's c10::pi<double> times two. */
#define LEGO_TWO_PI 6.283185307179586476925286766559

/* The ten rounds on counter c, in place, under key (k0, k1).  The 64-bit
 * products are exact on both sides: their halves are mulhi and mullo. */
PHILOX_FN void philox_rounds(uint32_t c[4], uint32_t k0, uint32_t k1) {
    for (int round = 0; round < 10; round++) {
        if (round > 0) { /* the key is bumped between rounds */
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        uint64_t p0 = (uint64_t)PHILOX_M0 * c[0];
        uint64_t p1 = (uint64_t)PHILOX_M1 * c[2];
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c[1] ^ k0;
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c[3] ^ k1;
        c[1] = (uint32_t)p1;
        c[3] = (uint32_t)p0;
        c[0] = n0;
        c[2] = n2;
    }
}

/* Block `block` of stream `stream` of generator `seed`: key and counter
 * laid out as in rng.h. */
PHILOX_FN void philox_block(uint64_t seed, uint64_t stream, uint64_t block, uint32_t w[4]) {
    w[0] = (uint32_t)block;
    w[1] = (uint32_t)(block >> 32);
    w[2] = (uint32_t)stream;
    w[3] = (uint32_t)(stream >> 32);
    philox_rounds(w, (uint32_t)seed, (uint32_t)(seed >> 32));
}

/* x + 1 needs 33 bits and the product is a power-of-two scaling, so the
 * uniform is exact in double on both sides. */
PHILOX_FN double philox_u01(uint32_t x) {
    return ((double)x + 1.0) * 0x1p-32;
}

/* The four normals of block `block` of (seed, stream), in double. */
PHILOX_FN void philox_normal4(uint64_t seed, uint64_t stream, uint64_t block, double z[4]) {
    uint32_t w[4];
    philox_block(seed, stream, block, w);
    for (int p = 0; p < 2; p++) {
        double r = sqrt(-2.0 * log(philox_u01(w[2 * p])));
        double t = LEGO_TWO_PI * philox_u01(w[2 * p + 1]);
        z[2 * p] = r * cos(t);
        z[2 * p + 1] = r * sin(t);
    }
}

#endif /* LEGO_PHILOX_CORE_H */
