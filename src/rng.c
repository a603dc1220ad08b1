/*
 * rng.c -- PyTorch's CPU generator and the Philox4x32-10 counter-based
 * generator.  See rng.h for the contracts and the exact Philox formulas.
 */
#include "rng.h"

#include <math.h>

#include "philox_core.h"

/* ------------------------------------------------------------------------ */
/* mt19937, seeded the way at::mt19937::init_with_uint32 does               */
/* ------------------------------------------------------------------------ */

#define MT_M 397
#define MT_MATRIX_A 0x9908b0dfu
#define MT_UPPER 0x80000000u
#define MT_LOWER 0x7fffffffu

void torch_gen_seed(lego_torch_gen *g, uint64_t seed) {
    g->state[0] = (uint32_t)(seed & 0xffffffffu);
    for (int j = 1; j < LEGO_MT_N; j++) {
        uint32_t prev = g->state[j - 1];
        g->state[j] = 1812433253u * (prev ^ (prev >> 30)) + (uint32_t)j;
    }
    g->next = LEGO_MT_N; /* the first draw regenerates the whole state */
    g->has_next_normal = 0;
    g->next_normal = 0.0;
    g->has_next_float_normal = 0;
    g->next_float_normal = 0.0f;
}

static uint32_t mt_twist(uint32_t u, uint32_t v) {
    uint32_t y = (u & MT_UPPER) | (v & MT_LOWER);
    return (y >> 1) ^ ((v & 1u) ? MT_MATRIX_A : 0u);
}

static void mt_regenerate(uint32_t *s) {
    int k;
    for (k = 0; k < LEGO_MT_N - MT_M; k++)
        s[k] = s[k + MT_M] ^ mt_twist(s[k], s[k + 1]);
    for (; k < LEGO_MT_N - 1; k++)
        s[k] = s[k + MT_M - LEGO_MT_N] ^ mt_twist(s[k], s[k + 1]);
    s[k] = s[MT_M - 1] ^ mt_twist(s[k], s[0]);
}

uint32_t torch_gen_random(lego_torch_gen *g) {
    /* Also catches a corrupted index instead of reading out of bounds. */
    if (g->next < 0 || g->next >= LEGO_MT_N) {
        mt_regenerate(g->state);
        g->next = 0;
    }
    uint32_t y = g->state[g->next++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

uint64_t torch_gen_random64(lego_torch_gen *g) {
    uint64_t hi = torch_gen_random(g);
    uint64_t lo = torch_gen_random(g);
    return (hi << 32) | lo;
}

/* at::uniform_real_distribution<T>(0, 1): the low 24 (float) or 53 (double)
 * bits of a draw, scaled into [0, 1). */
static float uniform_f32(lego_torch_gen *g) {
    return (float)(torch_gen_random(g) & 0xffffffu) * 0x1p-24f;
}

static double uniform_f64(lego_torch_gen *g) {
    return (double)(torch_gen_random64(g) & ((UINT64_C(1) << 53) - 1)) *
           0x1p-53;
}

/* at::normal_distribution<double>: Box-Muller on two double uniforms; the
 * sine half is cached in the generator for the next scalar draw. */
static double normal_scalar(lego_torch_gen *g) {
    if (g->has_next_normal) {
        g->has_next_normal = 0;
        return g->next_normal;
    }
    double u1 = uniform_f64(g);
    double u2 = uniform_f64(g);
    double r = sqrt(-2.0 * log1p(-u2)); /* 1 - u2 is in (0, 1] */
    double theta = LEGO_TWO_PI * u1;
    g->next_normal = r * sin(theta);
    g->has_next_normal = 1;
    return r * cos(theta);
}

/* torch's normal_fill_16: 16 uniforms become 16 normals, pairing element j
 * with j + 8.  The float version computes in float, as torch does. */
static void fill16_f32(float *d) {
    for (int j = 0; j < 8; j++) {
        float u1 = 1.0f - d[j];
        float u2 = d[j + 8];
        float radius = sqrtf(-2.0f * logf(u1));
        float theta = (float)(LEGO_TWO_PI * u2);
        d[j] = radius * cosf(theta);
        d[j + 8] = radius * sinf(theta);
    }
}

static void fill16_f64(double *d) {
    for (int j = 0; j < 8; j++) {
        double u1 = 1.0 - d[j];
        double u2 = d[j + 8];
        double radius = sqrt(-2.0 * log(u1));
        double theta = LEGO_TWO_PI * u2;
        d[j] = radius * cos(theta);
        d[j + 8] = radius * sin(theta);
    }
}

/* torch's normal_fill for n >= 16: uniforms for the whole buffer, then
 * Box-Muller per 16; a ragged tail is covered by redrawing (fresh uniforms)
 * and transforming the last 16 elements, overlapping the previous chunk. */
void torch_randn_f32(lego_torch_gen *g, float *out, size_t n) {
    if (n < 16) {
        for (size_t i = 0; i < n; i++) out[i] = (float)normal_scalar(g);
        return;
    }
    for (size_t i = 0; i < n; i++) out[i] = uniform_f32(g);
    for (size_t i = 0; i + 16 <= n; i += 16) fill16_f32(out + i);
    if (n % 16 != 0) {
        float *tail = out + n - 16;
        for (int i = 0; i < 16; i++) tail[i] = uniform_f32(g);
        fill16_f32(tail);
    }
}

void torch_randn_f64(lego_torch_gen *g, double *out, size_t n) {
    if (n < 16) {
        for (size_t i = 0; i < n; i++) out[i] = normal_scalar(g);
        return;
    }
    for (size_t i = 0; i < n; i++) out[i] = uniform_f64(g);
    for (size_t i = 0; i + 16 <= n; i += 16) fill16_f64(out + i);
    if (n % 16 != 0) {
        double *tail = out + n - 16;
        for (int i = 0; i < 16; i++) tail[i] = uniform_f64(g);
        fill16_f64(tail);
    }
}

/* at::uniform_int_from_to_distribution with base 0: one 32-bit draw unless
 * the range needs 64 bits; plain modulo, bias and all, as torch does. */
int64_t torch_randint(lego_torch_gen *g, int64_t high) {
    if (high < 1) return -1;
    uint64_t range = (uint64_t)high;
    uint64_t x = range >= (UINT64_C(1) << 32) ? torch_gen_random64(g)
                                               : torch_gen_random(g);
    return (int64_t)(x % range);
}

/* ------------------------------------------------------------------------ */
/* Philox4x32-10                                                            */
/* ------------------------------------------------------------------------ */

/* The arithmetic is philox_core.h's, shared with the CUDA kernels. */
void philox4x32_10(const uint32_t ctr[4], const uint32_t key[2],
                   uint32_t out[4]) {
    for (int j = 0; j < 4; j++) out[j] = ctr[j];
    philox_rounds(out, key[0], key[1]);
}

/* Walk the blocks covering [first, first + n), copying the wanted lanes
 * into out64 or, rounded to float once, into out32 (the other is NULL);
 * the first and last blocks may be partial. */
static void philox_normal_walk(uint64_t seed, uint64_t stream, uint64_t first,
                               size_t n, double *out64, float *out32) {
    size_t done = 0;
    while (done < n) {
        uint64_t e = first + done;
        double z[4];
        philox_normal4(seed, stream, e / 4, z);
        for (unsigned lane = (unsigned)(e % 4); lane < 4 && done < n; lane++, done++) {
            if (out64) out64[done] = z[lane];
            else out32[done] = (float)z[lane];
        }
    }
}

void philox_normal_f64(uint64_t seed, uint64_t stream, uint64_t first,
                       size_t n, double *out) {
    philox_normal_walk(seed, stream, first, n, out, NULL);
}

void philox_normal_f32(uint64_t seed, uint64_t stream, uint64_t first,
                       size_t n, float *out) {
    philox_normal_walk(seed, stream, first, n, NULL, out);
}

int64_t philox_randint(uint64_t seed, uint64_t stream, uint64_t index,
                       int64_t high) {
    uint32_t w[4];
    if (high < 1) return -1;
    philox_block(seed, stream, index, w);
    uint64_t x = ((uint64_t)w[0] << 32) | w[1];
    return (int64_t)(x % (uint64_t)high);
}
