/*
 * attention_cpu.c -- multi-head self-attention on the CPU: the forward pass
 * for sampling, the forward pass that keeps its probabilities for training,
 * and the backward pass.
 *
 * Work is split over (sequence, head) pairs, one per worker at a time, each
 * with its own scratch.  A pair's matrices are small (T <= a few thousand
 * tokens, head_dim <= 256) and strided inside the qkv rows, so instead of a
 * BLAS call per product the AVX2 path packs what it reads into contiguous
 * panels and runs every product through one register tile: 6 rows x 16
 * columns, 12 accumulators.  That keeps the pairs independent of the BLAS's
 * own threads.  The plain C versions compute the same formulas and run
 * where AVX2+FMA is missing.
 *
 * Training (S = q k^T / sqrt(d), P = softmax(S), O = P v):
 *   dP = dO v^T;  dv = P^T dO;  dS = P (dP - rowsum(P dP)) / sqrt(d);
 *   dq = dS k;    dk = dS^T q.
 */
#include "ops.h"

#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "simd_cpu.h"

/* The register tile is ATT_ROWS rows by 16 columns; packed panels are
 * padded to a multiple of 16 columns. */
#define ATT_ROWS 6
#define ROUND16(x) (((size_t)(x) + 15) & ~(size_t)15)

/* ---- scratch sizes ------------------------------------------------------- */

size_t op_attention_scratch(int tokens, int head_dim) {
    /* Plain C: K transposed, V, one row of scores.
     * AVX2: K^T [head_dim][T16], V [tokens][hd16], scores [ROWS][T16],
     * output tile [ROWS][hd16]. */
    size_t plain = 2 * (size_t)tokens * head_dim + (size_t)tokens;
    size_t t16 = ROUND16(tokens), d16 = ROUND16(head_dim);
    size_t avx = (size_t)head_dim * t16 + (size_t)tokens * d16 + ATT_ROWS * (t16 + d16);
    return plain > avx ? plain : avx;
}

/* The backward pass's AVX2 panels: V^T [hd][T16]; dO, K and Q [T][hd16];
 * dS [T + ROWS - 1][T16] (a tail tile's duplicate rows land in the extra
 * rows); one tile of output [ROWS][hd16].  The plain C version needs one
 * row of dP. */
static size_t backward_scratch(int tokens, int head_dim) {
    size_t t = (size_t)tokens, t16 = ROUND16(tokens), d16 = ROUND16(head_dim), ts;
    if (!size_mul(t + ATT_ROWS - 1, t16, &ts)) return SIZE_MAX;
    size_t need = (size_t)head_dim * t16 + 3 * t * d16 + ATT_ROWS * d16;
    return size_add(need, ts, &need) ? need : SIZE_MAX;
}

size_t op_attention_train_scratch(int tokens, int head_dim) {
    size_t fwd = op_attention_scratch(tokens, head_dim), bwd = backward_scratch(tokens, head_dim);
    return fwd > bwd ? fwd : bwd;
}

/* ---- plain C ------------------------------------------------------------- */

/* One head of one sequence: out_t = sum_j softmax_j(q_t . k_j / sqrt(d)) v_j.
 * With `probs` (T x T) the normalised probabilities are kept there. */
static void attend_one(const float *qkv, int tokens, int dim, int head, int head_dim,
                       float *out, float *probs, float *scratch) {
    size_t stride = 3 * (size_t)dim;
    float *kt = scratch, *v = kt + (size_t)tokens * head_dim, *s = v + (size_t)tokens * head_dim;
    const float scale = 1.0f / sqrtf((float)head_dim);
    for (int j = 0; j < tokens; j++) {
        const float *kj = qkv + j * stride + dim + (size_t)head * head_dim;
        const float *vj = kj + dim;
        for (int d = 0; d < head_dim; d++) kt[(size_t)d * tokens + j] = kj[d];
        memcpy(v + (size_t)j * head_dim, vj, (size_t)head_dim * sizeof *v);
    }
    for (int t = 0; t < tokens; t++) {
        const float *q = qkv + t * stride + (size_t)head * head_dim;
        for (int j = 0; j < tokens; j++) s[j] = 0;
        for (int d = 0; d < head_dim; d++) {
            const float qd = q[d] * scale, *kd = kt + (size_t)d * tokens;
            for (int j = 0; j < tokens; j++) s[j] += qd * kd[j];
        }
        float mx = s[0];
        for (int j = 1; j < tokens; j++) mx = s[j] > mx ? s[j] : mx;
        float sum = 0;
        for (int j = 0; j < tokens; j++) {
            s[j] = fast_expf(s[j] - mx);
            sum += s[j];
        }
        float *o = out + (size_t)t * dim + (size_t)head * head_dim;
        float inv = 1.0f / sum;
        for (int d = 0; d < head_dim; d++) o[d] = 0;
        for (int j = 0; j < tokens; j++) {
            const float p = s[j] * inv, *vj = v + (size_t)j * head_dim;
            if (probs) probs[(size_t)t * tokens + j] = p;
            for (int d = 0; d < head_dim; d++) o[d] += p * vj[d];
        }
    }
}

/* Backward of one head of one sequence; dp holds one row of dP. */
static void attend_backward_one(const float *qkv, const float *P, const float *dout, int tokens,
                                int dim, int head, int head_dim, float *dqkv, float *dp) {
    size_t D = (size_t)dim, D3 = 3 * D, t = (size_t)tokens, off = (size_t)head * head_dim;
    float scale = 1.0f / sqrtf((float)head_dim);
    for (size_t i = 0; i < t; i++)
        for (int part = 0; part < 3; part++)
            memset(dqkv + i * D3 + (size_t)part * D + off, 0, (size_t)head_dim * sizeof(float));
    for (size_t i = 0; i < t; i++) {
        const float *p = P + i * t, *go = dout + i * D + off, *q = qkv + i * D3 + off;
        float *dq = dqkv + i * D3 + off, rowdot = 0;
        for (size_t j = 0; j < t; j++) { /* dP = dO v^T, dv += P^T dO */
            const float *v = qkv + j * D3 + 2 * D + off;
            float *dv = dqkv + j * D3 + 2 * D + off, dot = 0;
            for (int e = 0; e < head_dim; e++) {
                dot += go[e] * v[e];
                dv[e] += p[j] * go[e];
            }
            dp[j] = dot;
            rowdot += p[j] * dot;
        }
        for (size_t j = 0; j < t; j++) { /* dS = P (dP - sum_j P dP) / sqrt(d) */
            float ds = p[j] * (dp[j] - rowdot) * scale;
            const float *k = qkv + j * D3 + D + off;
            float *dk = dqkv + j * D3 + D + off;
            for (int e = 0; e < head_dim; e++) {
                dq[e] += ds * k[e];
                dk[e] += ds * q[e];
            }
        }
    }
}

/* ---- AVX2 ---------------------------------------------------------------- */

#if LEGO_X86
/* c[r][0..15] = sum_k a[r][k * astep] * b[k][0..15] for ATT_ROWS rows: the
 * register tile of every product.  astep 1 reads rows of a; astep = a row
 * length reads columns (a transposed operand, without a transposed copy).
 * Rows of b are ldb apart. */
__attribute__((target("avx2,fma"))) static inline void
tile_avx2(const float *const a[ATT_ROWS], size_t astep, int k_len, const float *b, size_t ldb,
          float *c, size_t ldc) {
    __m256 acc[ATT_ROWS][2];
    for (int r = 0; r < ATT_ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int k = 0; k < k_len; k++) {
        const float *bk = b + (size_t)k * ldb;
        __m256 b0 = _mm256_loadu_ps(bk), b1 = _mm256_loadu_ps(bk + 8);
        for (int r = 0; r < ATT_ROWS; r++) {
            __m256 ar = _mm256_broadcast_ss(a[r] + (size_t)k * astep);
            acc[r][0] = _mm256_fmadd_ps(ar, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(ar, b1, acc[r][1]);
        }
    }
    for (int r = 0; r < ATT_ROWS; r++) {
        _mm256_storeu_ps(c + r * ldc, acc[r][0]);
        _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
    }
}

/* Row pointers of a tile starting at row i0 of a matrix (row r at
 * base + r * row_step): tail tiles repeat the last row, whose duplicates
 * are computed and not stored. */
static inline int tile_rows(const float *base, size_t row_step, int i0, int n,
                            const float *rows[ATT_ROWS]) {
    int count = n - i0 < ATT_ROWS ? n - i0 : ATT_ROWS;
    for (int r = 0; r < ATT_ROWS; r++)
        rows[r] = base + (size_t)(i0 + (r < count ? r : count - 1)) * row_step;
    return count;
}

/* s[0..n) = exp(s - max s) in place; returns 1 / sum (normalising is left
 * to the caller). */
__attribute__((target("avx2,fma"))) static float softmax_row_avx2(float *s, int n) {
    __m256 mx8 = _mm256_set1_ps(-INFINITY);
    int j = 0;
    for (; j + 8 <= n; j += 8) mx8 = _mm256_max_ps(mx8, _mm256_loadu_ps(s + j));
    float lanes[8], mx = -INFINITY, sum = 0;
    _mm256_storeu_ps(lanes, mx8);
    for (int i = 0; i < 8; i++) mx = lanes[i] > mx ? lanes[i] : mx;
    for (int i = j; i < n; i++) mx = s[i] > mx ? s[i] : mx;

    __m256 sum8 = _mm256_setzero_ps(), m8 = _mm256_set1_ps(mx);
    for (j = 0; j + 8 <= n; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), m8));
        _mm256_storeu_ps(s + j, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    _mm256_storeu_ps(lanes, sum8);
    for (int i = 0; i < 8; i++) sum += lanes[i];
    for (; j < n; j++) {
        s[j] = fast_expf(s[j] - mx);
        sum += s[j];
    }
    return 1.0f / sum;
}

/* One head's panel, from rows `stride` floats apart: transposed,
 * [head_dim][t16] times `scale` and zero past the tokens (K^T, V^T), or
 * [tokens][d16] and zero past head_dim (pack_rows: V, K, Q, dO).  The zero
 * padding lets the tile compute whole 16-wide blocks. */
static void pack_transposed(const float *src, size_t stride, int tokens, int head_dim,
                            float scale, float *dst) {
    size_t t16 = ROUND16(tokens);
    for (int d = 0; d < head_dim; d++)
        for (size_t j = (size_t)tokens; j < t16; j++) dst[(size_t)d * t16 + j] = 0;
    for (int j = 0; j < tokens; j++)
        for (int d = 0; d < head_dim; d++) dst[(size_t)d * t16 + j] = src[j * stride + d] * scale;
}

static void pack_rows(const float *src, size_t stride, int tokens, int head_dim, float *dst) {
    size_t d16 = ROUND16(head_dim);
    for (int j = 0; j < tokens; j++) {
        float *row = dst + (size_t)j * d16;
        memcpy(row, src + j * stride, (size_t)head_dim * sizeof *row);
        for (size_t d = (size_t)head_dim; d < d16; d++) row[d] = 0;
    }
}

/* rows x hd16 tile of products, column block by column block, into the
 * tile buffer; then its first head_dim columns to dst rows (dst_step
 * apart), times `mul` per row when mul is not NULL. */
__attribute__((target("avx2,fma"))) static void
product_rows(const float *const a[ATT_ROWS], size_t astep, int k_len, const float *panel,
             int head_dim, float *tile, int rows, const float *mul, float *dst, size_t dst_step) {
    size_t d16 = ROUND16(head_dim);
    for (size_t d0 = 0; d0 < d16; d0 += 16) tile_avx2(a, astep, k_len, panel + d0, d16, tile + d0, d16);
    for (int r = 0; r < rows; r++) {
        float *out = dst + (size_t)r * dst_step;
        const float *src = tile + (size_t)r * d16;
        if (mul)
            for (int d = 0; d < head_dim; d++) out[d] = src[d] * mul[r];
        else
            memcpy(out, src, (size_t)head_dim * sizeof *out);
    }
}

/* attend_one with register-tiled products: S = Q K^T for ATT_ROWS queries
 * at a time, softmax in place, O = P V.  The scale 1/sqrt(d) is folded into
 * the packed K.  For sampling the normalisation is applied to the output,
 * which is narrower than a row of scores; with `probs` the rows are
 * normalised first and kept. */
__attribute__((target("avx2,fma"))) static void
attend_one_avx2(const float *qkv, int tokens, int dim, int head, int head_dim, float *out,
                float *probs, float *scratch) {
    size_t stride = 3 * (size_t)dim, t16 = ROUND16(tokens), d16 = ROUND16(head_dim);
    const float *q0 = qkv + (size_t)head * head_dim;
    float *kt = scratch, *v = kt + (size_t)head_dim * t16;
    float *s = v + (size_t)tokens * d16, *o = s + ATT_ROWS * t16;
    pack_transposed(q0 + dim, stride, tokens, head_dim, 1.0f / sqrtf((float)head_dim), kt);
    pack_rows(q0 + 2 * (size_t)dim, stride, tokens, head_dim, v);

    for (int t0 = 0; t0 < tokens; t0 += ATT_ROWS) {
        const float *q[ATT_ROWS], *p[ATT_ROWS];
        int rows = tile_rows(q0, stride, t0, tokens, q);
        tile_rows(s, t16, 0, rows, p);
        /* Padding columns of K^T are zero, so whole 16-wide tiles are safe. */
        for (size_t j0 = 0; j0 < t16; j0 += 16) tile_avx2(q, 1, head_dim, kt + j0, t16, s + j0, t16);

        float inv[ATT_ROWS];
        for (int r = 0; r < rows; r++) {
            float *sr = s + (size_t)r * t16;
            inv[r] = softmax_row_avx2(sr, tokens);
            if (!probs) continue;
            for (int j = 0; j < tokens; j++) sr[j] *= inv[r];
            memcpy(probs + (size_t)(t0 + r) * tokens, sr, (size_t)tokens * sizeof *sr);
        }
        product_rows(p, 1, tokens, v, head_dim, o, rows, probs ? NULL : inv,
                     out + (size_t)t0 * dim + (size_t)head * head_dim, (size_t)dim);
    }
}

/* dS row i from its dP row (in place, dp -> dS) and P row:
 * dS_j = P_j (dP_j - sum_k P_k dP_k) * scale. */
__attribute__((target("avx2,fma"))) static void softmax_grad_row(const float *p, float *dp, int n,
                                                                 float scale) {
    __m256 acc = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= n; j += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(p + j), _mm256_loadu_ps(dp + j), acc);
    float lanes[8], dot = 0;
    _mm256_storeu_ps(lanes, acc);
    for (int i = 0; i < 8; i++) dot += lanes[i];
    for (int i = j; i < n; i++) dot += p[i] * dp[i];
    __m256 dot8 = _mm256_set1_ps(dot), scale8 = _mm256_set1_ps(scale);
    for (j = 0; j + 8 <= n; j += 8) {
        __m256 g = _mm256_sub_ps(_mm256_loadu_ps(dp + j), dot8);
        _mm256_storeu_ps(dp + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(p + j), g), scale8));
    }
    for (; j < n; j++) dp[j] = p[j] * (dp[j] - dot) * scale;
}

/* Backward of one head of one sequence: dq (by query tiles), then dv and
 * dk (by key tiles, reading P and dS by columns). */
__attribute__((target("avx2,fma"))) static void
attend_backward_avx2(const float *qkv, const float *P, const float *dout, int tokens, int dim,
                     int head, int head_dim, float *dqkv, float *scratch) {
    size_t D = (size_t)dim, stride = 3 * D, t = (size_t)tokens, off = (size_t)head * head_dim;
    size_t t16 = ROUND16(tokens), d16 = ROUND16(head_dim);
    float *vt = scratch, *gop = vt + (size_t)head_dim * t16, *kp = gop + t * d16;
    float *qp = kp + t * d16, *ds = qp + t * d16, *tile = ds + (t + ATT_ROWS - 1) * t16;
    const float *q0 = qkv + off, *go0 = dout + off;
    pack_transposed(q0 + 2 * D, stride, tokens, head_dim, 1.0f, vt);
    pack_rows(go0, D, tokens, head_dim, gop);
    pack_rows(q0 + D, stride, tokens, head_dim, kp);
    pack_rows(q0, stride, tokens, head_dim, qp);
    float scale = 1.0f / sqrtf((float)head_dim);

    for (int i0 = 0; i0 < tokens; i0 += ATT_ROWS) {
        const float *a[ATT_ROWS];
        int rows = tile_rows(go0, D, i0, tokens, a);
        float *dsi = ds + (size_t)i0 * t16;
        /* dP = dO V^T straight into dS's rows, then dS in place. */
        for (size_t j0 = 0; j0 < t16; j0 += 16)
            tile_avx2(a, 1, head_dim, vt + j0, t16, dsi + j0, t16);
        for (int r = 0; r < rows; r++)
            softmax_grad_row(P + (size_t)(i0 + r) * t, dsi + (size_t)r * t16, tokens, scale);
        tile_rows(dsi, t16, 0, rows, a);
        product_rows(a, 1, tokens, kp, head_dim, tile, rows, NULL, dqkv + (size_t)i0 * stride + off,
                     stride);
    }
    for (int j0 = 0; j0 < tokens; j0 += ATT_ROWS) {
        const float *a[ATT_ROWS];
        int rows = tile_rows(P, 1, j0, tokens, a); /* columns j0.. of P */
        float *dst = dqkv + (size_t)j0 * stride + off;
        product_rows(a, t, tokens, gop, head_dim, tile, rows, NULL, dst + 2 * D, stride);
        tile_rows(ds, 1, j0, tokens, a); /* columns j0.. of dS */
        product_rows(a, t16, tokens, qp, head_dim, tile, rows, NULL, dst + D, stride);
    }
}
#endif

/* ---- over sequences and heads --------------------------------------------- */

typedef enum pass { PASS_SAMPLE, PASS_TRAIN, PASS_BACKWARD } pass;

static void run_pairs(pass which, const float *qkv, const float *probs_in, float *probs,
                      const float *dout, size_t seqs, int tokens, int heads, int head_dim,
                      float *out, float *scratch, size_t per_worker, int threads) {
    int dim = heads * head_dim, fast = simd_have_avx2_fma();
    size_t pairs = seqs * (size_t)heads, tt = (size_t)tokens * tokens;
    size_t seq_in = (size_t)tokens * 3 * dim, seq_out = (size_t)tokens * dim;
    #pragma omp parallel num_threads(threads)
    {
        int me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        float *mine = scratch + (size_t)me * per_worker;
        #pragma omp for schedule(static)
        for (size_t pair = 0; pair < pairs; pair++) {
            size_t seq = pair / (size_t)heads;
            int head = (int)(pair % (size_t)heads);
            const float *in = qkv + seq * seq_in;
            if (which == PASS_BACKWARD) {
                const float *P = probs_in + pair * tt, *go = dout + seq * seq_out;
                float *dq = out + seq * seq_in;
#if LEGO_X86
                if (fast) {
                    attend_backward_avx2(in, P, go, tokens, dim, head, head_dim, dq, mine);
                    continue;
                }
#endif
                attend_backward_one(in, P, go, tokens, dim, head, head_dim, dq, mine);
                continue;
            }
            float *o = out + seq * seq_out, *keep = which == PASS_TRAIN ? probs + pair * tt : NULL;
#if LEGO_X86
            if (fast) {
                attend_one_avx2(in, tokens, dim, head, head_dim, o, keep, mine);
                continue;
            }
#endif
            attend_one(in, tokens, dim, head, head_dim, o, keep, mine);
        }
    }
    (void)fast;
}

void op_attention(const float *qkv, size_t seqs, int tokens, int heads, int head_dim,
                  float *out, float *scratch, int threads) {
    run_pairs(PASS_SAMPLE, qkv, NULL, NULL, NULL, seqs, tokens, heads, head_dim, out, scratch,
              op_attention_scratch(tokens, head_dim), threads);
}

void op_attention_train(const float *qkv, size_t seqs, int tokens, int heads, int head_dim,
                        float *probs, float *out, float *scratch, int threads) {
    run_pairs(PASS_TRAIN, qkv, NULL, probs, NULL, seqs, tokens, heads, head_dim, out, scratch,
              op_attention_train_scratch(tokens, head_dim), threads);
}

void op_attention_backward(const float *qkv, const float *probs, const float *dout, size_t seqs,
                           int tokens, int heads, int head_dim, float *dqkv, float *scratch,
                           int threads) {
    run_pairs(PASS_BACKWARD, qkv, probs, NULL, dout, seqs, tokens, heads, head_dim, dqkv, scratch,
              op_attention_train_scratch(tokens, head_dim), threads);
}
