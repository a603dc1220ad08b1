/*
 * cuda_fp16.h (emulation) -- IEEE half storage and the two conversions the
 * backend uses (round to nearest even, overflow to infinity, subnormals).
 */
#ifndef LEGO_EMU_CUDA_FP16_H
#define LEGO_EMU_CUDA_FP16_H

#include <math.h>
#include <stdint.h>
#include <string.h>

struct __half {
    uint16_t bits;
};

static inline float __half2float(__half v) {
    uint32_t sign = (uint32_t)(v.bits & 0x8000u) << 16, e = (v.bits >> 10) & 0x1fu,
             m = v.bits & 0x3ffu;
    if (e == 0) {
        float f = ldexpf((float)m, -24);
        return sign ? -f : f;
    }
    uint32_t u = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112u) << 23) | (m << 13));
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline __half __float2half_rn(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return __half{(uint16_t)(sign | 0x7e00u)};
    if (a >= 0x477ff000u) return __half{(uint16_t)(sign | 0x7c00u)}; /* >= 65520: inf */
    if (a < 0x38800000u) { /* below 2^-14: a subnormal, in units of 2^-24 */
        float mag;
        memcpy(&mag, &a, 4);
        return __half{(uint16_t)(sign | (uint16_t)nearbyintf(mag * 16777216.0f))};
    }
    a += 0xfffu + ((a >> 13) & 1u);
    return __half{(uint16_t)(sign | ((a - 0x38000000u) >> 13))};
}

static inline float emu_to_float(__half v) { return __half2float(v); }

#endif
