/*
 * cuda_bf16.h (emulation) -- bfloat16 storage and the two conversions the
 * backend uses, rounding to nearest even as the GPU does.
 */
#ifndef LEGO_EMU_CUDA_BF16_H
#define LEGO_EMU_CUDA_BF16_H

#include <stdint.h>
#include <string.h>

struct __nv_bfloat16 {
    uint16_t bits;
};

static inline float __bfloat162float(__nv_bfloat16 v) {
    uint32_t u = (uint32_t)v.bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}

static inline float emu_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

#endif
