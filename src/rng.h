/*
 * rng.h -- the two random number generators of liblego.
 *
 * 1. lego_torch_gen: PyTorch's CPU generator (mt19937 plus the normal-sample
 *    cache), so that a seed gives the same latents and labels as
 *    torch.randn / torch.randint on CPU with torch.Generator().manual_seed().
 *    Sequential: every draw advances the caller-owned struct.
 *
 * 2. Philox4x32-10: counter based and stateless.  Every output is a pure
 *    function of (seed, stream, index), so a CUDA kernel computes any element
 *    on its own and matches the CPU bit for bit.  This is the default.
 *
 * Nothing here allocates or keeps global state; all functions are thread
 * safe as long as two threads do not share one lego_torch_gen.
 */
#ifndef LEGO_RNG_H
#define LEGO_RNG_H

#include <stddef.h>
#include <stdint.h>

/* ------------------------------------------------------------------------ */
/* PyTorch CPU generator (at::CPUGeneratorImpl)                             */
/* ------------------------------------------------------------------------ */

#define LEGO_MT_N 624

typedef struct lego_torch_gen {
    uint32_t state[LEGO_MT_N]; /* mt19937 state words                     */
    int next;                  /* index of the next state word to temper;
                                  LEGO_MT_N means "regenerate first"      */
    int has_next_normal;       /* torch's next_double_normal_sample: the  */
    double next_normal;        /* spare Box-Muller value of the scalar path */
    int has_next_float_normal; /* next_float_normal_sample: kept for      */
    float next_float_normal;   /* fidelity; no function here fills it     */
} lego_torch_gen;

/* torch.Generator().manual_seed(seed): only the low 32 bits seed mt19937
 * (as in torch); both normal caches are cleared. */
void torch_gen_seed(lego_torch_gen *g, uint64_t seed);

/* One tempered mt19937 draw (CPUGeneratorImpl::random). */
uint32_t torch_gen_random(lego_torch_gen *g);

/* Two draws, the first one the high word (CPUGeneratorImpl::random64). */
uint64_t torch_gen_random64(lego_torch_gen *g);

/* torch.randn(n) into out[0..n-1], float32 and float64.  n >= 16 takes
 * torch's vectorised normal_fill path, n < 16 its scalar path that uses and
 * refills the generator's cached normal.  n == 0 draws nothing. */
void torch_randn_f32(lego_torch_gen *g, float *out, size_t n);
void torch_randn_f64(lego_torch_gen *g, double *out, size_t n);

/* torch.randint(high, ()): one int64 in [0, high).  Returns -1 (drawing
 * nothing) when high < 1, where torch would raise. */
int64_t torch_randint(lego_torch_gen *g, int64_t high);

/* ------------------------------------------------------------------------ */
/* Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, */
/* 3", SC 2011; constants and known answers from Random123)                 */
/* ------------------------------------------------------------------------ */

/* One Philox4x32-10 block: out = philox(ctr, key). */
void philox4x32_10(const uint32_t ctr[4], const uint32_t key[2],
                   uint32_t out[4]);

/*
 * Standard normal deviates number first .. first+n-1 of stream `stream` of
 * generator `seed`.  Element e depends only on (seed, stream, e):
 *
 *   key = { seed & 0xffffffff, seed >> 32 }
 *   b   = e / 4,  ctr = { b & 0xffffffff, b >> 32,
 *                         stream & 0xffffffff, stream >> 32 }
 *   w[0..3] = philox4x32_10(ctr, key)
 *   u(x) = ((double)x + 1.0) * 2^-32           in (0, 1], exact in double
 *   r0 = sqrt(-2 log u(w0)),  t0 = 2 pi u(w1)  (double precision throughout)
 *   r1 = sqrt(-2 log u(w2)),  t1 = 2 pi u(w3)
 *   normal[4b+0] = r0 cos t0,  normal[4b+1] = r0 sin t0
 *   normal[4b+2] = r1 cos t1,  normal[4b+3] = r1 sin t1
 *
 * The f32 variant rounds those doubles to float once at the end.
 */
void philox_normal_f32(uint64_t seed, uint64_t stream, uint64_t first,
                       size_t n, float *out);
void philox_normal_f64(uint64_t seed, uint64_t stream, uint64_t first,
                       size_t n, double *out);

/*
 * Uniform integer in [0, high), number `index` of stream `stream`:
 *
 *   ctr = { index & 0xffffffff, index >> 32,
 *           stream & 0xffffffff, stream >> 32 },  key as above
 *   w = philox4x32_10(ctr, key)
 *   result = (((uint64_t)w0 << 32) | w1) % high
 *
 * (bias below high / 2^64).  It shares counters with philox_normal_* of the
 * same (seed, stream), so give labels a stream of their own.  Returns -1
 * when high < 1.
 */
int64_t philox_randint(uint64_t seed, uint64_t stream, uint64_t index,
                       int64_t high);

#endif /* LEGO_RNG_H */
