/*
 * test_ops.c -- the CPU kernels (src/ops.h), the position embedding and the
 * brick's gather/scatter against straightforward double-precision reference
 * implementations written here.
 *
 *   kernels      op_linear, op_layernorm_modulate, op_gated_residual,
 *                op_gelu_tanh(_to, _grad), op_silu, op_attention, and the
 *                training pair op_attention_train / op_attention_backward
 *   pos_embed    sincos_pos_embed against the MAE formula
 *   brick        gather/scatter pinned by hand-set weights (whole-image
 *                coordinates, channel order, row-major patches, (h, w, p, q,
 *                c) unpatchify), then brick_forward with random weights
 *                everywhere against a full double-precision DiT brick.
 *
 * Needs nothing from ../shared.
 */
#define _POSIX_C_SOURCE 200809L
#include "testutil.h"

#include <stdint.h>

#include "brick.h"
#include "model.h"
#include "ops.h"

/* ------------------------------------------------------------------------ */
/* helpers                                                                  */
/* ------------------------------------------------------------------------ */

/* |got - want| <= abs + rel*|want| for every element; the first failure is
 * reported with its index. */
static void expect_close_d(const char *what, const float *got, const double *want, size_t n,
                           double abs_tol, double rel_tol) {
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - want[i]);
        ck_assert_msg(d <= abs_tol + rel_tol * fabs(want[i]),
                      "%s[%zu]: got %.9g, want %.9g (diff %.3g)", what, i, (double)got[i],
                      want[i], d);
    }
}

/* ---- reference kernels in double ---- */

static void ref_linear(const float *w, const float *b, int in, int out, const double *x,
                       size_t rows, double *y) {
    for (size_t r = 0; r < rows; r++)
        for (int o = 0; o < out; o++) {
            double s = b ? b[o] : 0;
            for (int i = 0; i < in; i++) s += (double)w[(size_t)o * in + i] * x[r * in + i];
            y[r * out + o] = s;
        }
}

/* LayerNorm (no affine, eps 1e-6) then x*(1+scale)+shift. */
static void ref_ln_mod(const double *x, int dim, const double *shift, const double *scale,
                       double *y) {
    double mean = 0, var = 0;
    for (int i = 0; i < dim; i++) mean += x[i];
    mean /= dim;
    for (int i = 0; i < dim; i++) var += (x[i] - mean) * (x[i] - mean);
    var /= dim;
    double rstd = 1.0 / sqrt(var + 1e-6);
    for (int i = 0; i < dim; i++) y[i] = (x[i] - mean) * rstd * (1 + scale[i]) + shift[i];
}

static double ref_gelu(double x) {
    return 0.5 * x * (1.0 + tanh(sqrt(2.0 / 3.14159265358979323846) * (x + 0.044715 * x * x * x)));
}

static double ref_silu(double x) { return x / (1.0 + exp(-x)); }

/* softmax(q k^T / sqrt(d)) v for one sequence, qkv rows [q | k | v], each
 * [heads][head_dim]. */
static void ref_attention(const double *qkv, int tokens, int heads, int hd, double *out) {
    int dim = heads * hd;
    double *s = malloc((size_t)tokens * sizeof *s);
    ck_assert(s);
    for (int h = 0; h < heads; h++)
        for (int t = 0; t < tokens; t++) {
            const double *q = qkv + (size_t)t * 3 * dim + (size_t)h * hd;
            double mx = -INFINITY, sum = 0;
            for (int j = 0; j < tokens; j++) {
                const double *k = qkv + (size_t)j * 3 * dim + dim + (size_t)h * hd;
                double dot = 0;
                for (int d = 0; d < hd; d++) dot += q[d] * k[d];
                s[j] = dot / sqrt((double)hd);
                if (s[j] > mx) mx = s[j];
            }
            for (int j = 0; j < tokens; j++) sum += (s[j] = exp(s[j] - mx));
            for (int d = 0; d < hd; d++) {
                double o = 0;
                for (int j = 0; j < tokens; j++)
                    o += s[j] / sum * qkv[(size_t)j * 3 * dim + 2 * dim + (size_t)h * hd + d];
                out[(size_t)t * dim + (size_t)h * hd + d] = o;
            }
        }
    free(s);
}

/* ------------------------------------------------------------------------ */
/* kernels                                                                  */
/* ------------------------------------------------------------------------ */

START_TEST(test_linear) {
    rng_seed(1);
    const int in = 37, out = 11;
    const size_t rows = 9;
    float *w = rand_floats((size_t)in * out, -1, 1), *b = rand_floats((size_t)out, -1, 1);
    float *x = rand_floats(rows * in, -2, 2), *y = malloc(rows * out * sizeof *y);
    double *xd = malloc(rows * in * sizeof *xd), *yd = malloc(rows * out * sizeof *yd);
    for (size_t i = 0; i < rows * in; i++) xd[i] = x[i];
    for (size_t i = 0; i < rows * out; i++) y[i] = NAN; /* output fully overwritten */
    linear l = {w, b, in, out};
    op_linear(&l, x, rows, y);
    ref_linear(w, b, in, out, xd, rows, yd);
    expect_close_d("linear", y, yd, rows * out, 1e-5, 1e-5);
    /* One row, and a 1x1 layer: y = w*x + b exactly. */
    linear one = {w, b, 1, 1};
    float x1 = 3.0f, y1 = 0;
    op_linear(&one, &x1, 1, &y1);
    ck_assert_float_eq_tol(y1, w[0] * 3.0f + b[0], 1e-6);
    free(w), free(b), free(x), free(y), free(xd), free(yd);
}
END_TEST

START_TEST(test_layernorm_modulate) {
    rng_seed(2);
    const int dim = 37, per_image = 3, images = 3;
    const size_t rows = (size_t)per_image * images, stride = 5 * (size_t)dim; /* like adaLN 6D */
    float *x = rand_floats(rows * dim, -2, 4), *y = malloc(rows * dim * sizeof *y);
    float *mod = rand_floats(images * stride, -1, 1);
    /* Row 4 constant: LN gives 0, the output is exactly the shift. */
    for (int i = 0; i < dim; i++) x[4 * dim + i] = 2.0f;
    /* Row 7 with a large common offset. */
    for (int i = 0; i < dim; i++) x[7 * dim + i] += 50.0f;
    const size_t shift_at = 2 * (size_t)dim, scale_at = 3 * (size_t)dim;
    op_layernorm_modulate(x, rows, dim, per_image, mod + shift_at, mod + scale_at, stride, y, 2);
    double *want = malloc(rows * dim * sizeof *want), xr[64], sh[64], sc[64];
    for (size_t r = 0; r < rows; r++) {
        size_t img = r / per_image;
        for (int i = 0; i < dim; i++) {
            xr[i] = x[r * dim + i];
            sh[i] = mod[img * stride + shift_at + i];
            sc[i] = mod[img * stride + scale_at + i];
        }
        ref_ln_mod(xr, dim, sh, sc, want + r * dim);
    }
    expect_close_d("layernorm_modulate", y, want, rows * dim, 2e-5, 2e-5);
    for (int i = 0; i < dim; i++)
        ck_assert_float_eq(y[4 * dim + i], mod[1 * stride + shift_at + i]);
    free(x), free(y), free(mod), free(want);
}
END_TEST

START_TEST(test_gated_residual) {
    rng_seed(3);
    const int dim = 19, per_image = 4, images = 3;
    const size_t rows = (size_t)per_image * images, stride = 6 * (size_t)dim;
    float *x = rand_floats(rows * dim, -1, 1), *y = rand_floats(rows * dim, -1, 1);
    float *gate = rand_floats(images * stride, -2, 2);
    double *want = malloc(rows * dim * sizeof *want);
    const size_t gate_at = 5 * (size_t)dim;
    for (size_t r = 0; r < rows; r++)
        for (int i = 0; i < dim; i++)
            want[r * dim + i] = (double)x[r * dim + i] +
                                (double)gate[(r / per_image) * stride + gate_at + i] * y[r * dim + i];
    op_gated_residual(x, y, rows, dim, per_image, gate + gate_at, stride, 2);
    expect_close_d("gated_residual", x, want, rows * dim, 1e-6, 1e-6);
    free(x), free(y), free(gate), free(want);
}
END_TEST

START_TEST(test_gelu_tanh) {
    /* A dense sweep of [-12, 12], large magnitudes both ways (where the
     * cubic overflows float and exp saturates), and more values than one
     * 4096-element chunk so the threaded split is exercised. */
    const size_t dense = 12001;
    const float extra[] = {0.0f, -0.0f, 1e-8f, -1e-8f, 1e-30f, 20, -20, 30, -30, 87, -87, 100,
                           -100, 1e3f, -1e3f, 1e4f, -1e4f, 1e15f, -1e15f, 1e36f, -1e36f,
                           3e38f, -3e38f};
    const size_t ne = sizeof extra / sizeof extra[0], n = dense + ne;
    float *x = malloc(n * sizeof *x), *got = malloc(n * sizeof *got);
    double *want = malloc(n * sizeof *want);
    for (size_t i = 0; i < dense; i++) x[i] = (float)(-12.0 + 24.0 * (double)i / (dense - 1));
    memcpy(x + dense, extra, sizeof extra);
    for (size_t i = 0; i < n; i++) {
        want[i] = ref_gelu(x[i]);
        if (!isfinite(want[i])) want[i] = x[i] > 0 ? x[i] : 0.0; /* cubic overflowed */
    }
    memcpy(got, x, n * sizeof *x);
    op_gelu_tanh(got, n, 2);
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - want[i]);
        ck_assert_msg(isfinite(got[i]) && d <= 1e-6 * (1 + fabs(want[i])),
                      "gelu(%.9g) = %.9g, want %.9g (diff %.3g)", (double)x[i], (double)got[i],
                      want[i], d);
        if (d / (1 + fabs(want[i])) > worst) worst = d / (1 + fabs(want[i]));
    }
    printf("gelu_tanh: worst error %.2e (abs/(1+|want|))\n", worst);
    /* Exact landmarks. */
    ck_assert(got[dense] == 0.0f);
    free(x), free(got), free(want);
}
END_TEST

START_TEST(test_silu) {
    const size_t n = 4001;
    float *x = malloc(n * sizeof *x);
    double *want = malloc(n * sizeof *want);
    for (size_t i = 0; i < n; i++) {
        x[i] = (float)(-100.0 + 200.0 * (double)i / (n - 1));
        want[i] = ref_silu(x[i]);
    }
    op_silu(x, n);
    expect_close_d("silu", x, want, n, 1e-6, 1e-6);
    float z = 0.0f;
    op_silu(&z, 1);
    ck_assert(z == 0.0f);
    free(x), free(want);
}
END_TEST

/* Attention over several token counts and head counts, against a naive
 * softmax(QK^T/sqrt(d))V in double, with several sequences per call. */
START_TEST(test_attention) {
    static const int token_counts[] = {1, 4, 16, 64};
    const int head_dim = 8, seqs = 3, threads = 2;
    rng_seed(4);
    for (size_t ti = 0; ti < sizeof token_counts / sizeof token_counts[0]; ti++)
        for (int heads = 1; heads <= 4; heads++) {
            int tokens = token_counts[ti], dim = heads * head_dim;
            size_t nqkv = (size_t)seqs * tokens * 3 * dim, nout = (size_t)seqs * tokens * dim;
            float *qkv = rand_floats(nqkv, -1.5, 1.5), *out = malloc(nout * sizeof *out);
            float *scratch = malloc((size_t)threads * op_attention_scratch(tokens, head_dim) *
                                    sizeof *scratch);
            double *qd = malloc(nqkv * sizeof *qd), *want = malloc(nout * sizeof *want);
            for (size_t i = 0; i < nqkv; i++) qd[i] = qkv[i];
            for (size_t i = 0; i < nout; i++) out[i] = NAN;
            op_attention(qkv, (size_t)seqs, tokens, heads, head_dim, out, scratch, threads);
            for (int s = 0; s < seqs; s++)
                ref_attention(qd + (size_t)s * tokens * 3 * dim, tokens, heads, head_dim,
                              want + (size_t)s * tokens * dim);
            char what[64];
            snprintf(what, sizeof what, "attention T=%d heads=%d", tokens, heads);
            expect_close_d(what, out, want, nout, 2e-6, 1e-5);
            free(qkv), free(out), free(scratch), free(qd), free(want);
        }
}
END_TEST

/* The training pair against double precision: op_attention_train's output
 * and probabilities, and op_attention_backward's dq, dk, dv for a random
 * dout, written out from the formulas
 *   dP = dO v^T, dv = P^T dO, dS = P (dP - rowsum(P dP)) / sqrt(d),
 *   dq = dS k, dk = dS^T q.
 * Token counts and head sizes off the kernels' 6 x 16 tiles, several
 * sequences and heads, two workers. */
static void ref_attention_backward(const double *qkv, const double *dout, int tokens, int heads,
                                   int hd, double *probs, double *dqkv) {
    size_t D = (size_t)heads * hd, D3 = 3 * D, T = (size_t)tokens;
    double *dp = malloc(T * sizeof *dp);
    ck_assert(dp);
    for (size_t i = 0; i < T * D3; i++) dqkv[i] = 0;
    for (int h = 0; h < heads; h++) {
        size_t off = (size_t)h * hd;
        double *P = probs + (size_t)h * T * T;
        for (size_t i = 0; i < T; i++) { /* probabilities */
            double mx = -INFINITY, sum = 0;
            for (size_t j = 0; j < T; j++) {
                double dot = 0;
                for (int e = 0; e < hd; e++) dot += qkv[i * D3 + off + e] * qkv[j * D3 + D + off + e];
                P[i * T + j] = dot / sqrt((double)hd);
                mx = fmax(mx, P[i * T + j]);
            }
            for (size_t j = 0; j < T; j++) sum += (P[i * T + j] = exp(P[i * T + j] - mx));
            for (size_t j = 0; j < T; j++) P[i * T + j] /= sum;
        }
        for (size_t i = 0; i < T; i++) {
            double rowdot = 0;
            for (size_t j = 0; j < T; j++) {
                double dot = 0;
                for (int e = 0; e < hd; e++) dot += dout[i * D + off + e] * qkv[j * D3 + 2 * D + off + e];
                dp[j] = dot;
                rowdot += P[i * T + j] * dot;
            }
            for (size_t j = 0; j < T; j++) {
                double ds = P[i * T + j] * (dp[j] - rowdot) / sqrt((double)hd);
                for (int e = 0; e < hd; e++) {
                    dqkv[i * D3 + off + e] += ds * qkv[j * D3 + D + off + e];
                    dqkv[j * D3 + D + off + e] += ds * qkv[i * D3 + off + e];
                    dqkv[j * D3 + 2 * D + off + e] += P[i * T + j] * dout[i * D + off + e];
                }
            }
        }
    }
    free(dp);
}

/* Largest |x| of n doubles (at least 1e-30). */
static double max_abs(const double *x, size_t n) {
    double m = 1e-30;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs(x[i]));
    return m;
}

START_TEST(test_attention_train) {
    static const struct { int tokens, heads, hd; } shapes[] = {
        {1, 2, 8}, {4, 2, 8}, {7, 3, 13}, {16, 1, 16}, {37, 2, 24}, {64, 2, 64}, {100, 1, 40},
    };
    const int seqs = 3, threads = 2;
    rng_seed(14);
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        int tokens = shapes[si].tokens, heads = shapes[si].heads, hd = shapes[si].hd;
        size_t dim = (size_t)heads * hd, T = (size_t)tokens;
        size_t nqkv = (size_t)seqs * T * 3 * dim, nout = (size_t)seqs * T * dim;
        size_t nprob = (size_t)seqs * heads * T * T;
        size_t per_worker = op_attention_train_scratch(tokens, hd);
        float *qkv = rand_floats(nqkv, -1.5, 1.5), *dout = rand_floats(nout, -1, 1);
        float *out = malloc(nout * sizeof *out), *sample_out = malloc(nout * sizeof *out);
        float *probs = malloc(nprob * sizeof *probs), *dqkv = malloc(nqkv * sizeof *dqkv);
        float *scratch = malloc((size_t)threads * per_worker * sizeof *scratch);
        float *sample_scratch = malloc((size_t)threads * op_attention_scratch(tokens, hd) *
                                       sizeof *sample_scratch);
        double *qd = malloc(nqkv * sizeof *qd), *gd = malloc(nout * sizeof *gd);
        double *want_out = malloc(nout * sizeof *want_out), *want_p = malloc(nprob * sizeof *want_p);
        double *want_d = malloc(nqkv * sizeof *want_d);
        ck_assert(out && sample_out && probs && dqkv && scratch && sample_scratch && qd && gd &&
                  want_out && want_p && want_d);
        ck_assert(per_worker >= op_attention_scratch(tokens, hd));
        for (size_t i = 0; i < nqkv; i++) qd[i] = qkv[i], dqkv[i] = NAN; /* fully overwritten */
        for (size_t i = 0; i < nout; i++) gd[i] = dout[i], out[i] = NAN;
        for (size_t i = 0; i < nprob; i++) probs[i] = NAN;

        op_attention_train(qkv, (size_t)seqs, tokens, heads, hd, probs, out, scratch, threads);
        op_attention_backward(qkv, probs, dout, (size_t)seqs, tokens, heads, hd, dqkv, scratch,
                              threads);
        op_attention(qkv, (size_t)seqs, tokens, heads, hd, sample_out, sample_scratch, threads);
        for (int s = 0; s < seqs; s++) {
            size_t in_at = (size_t)s * T * 3 * dim, out_at = (size_t)s * T * dim;
            ref_attention(qd + in_at, tokens, heads, hd, want_out + out_at);
            ref_attention_backward(qd + in_at, gd + out_at, tokens, heads, hd,
                                   want_p + (size_t)s * heads * T * T, want_d + in_at);
        }
        char what[96];
        snprintf(what, sizeof what, "train attention T=%d heads=%d hd=%d", tokens, heads, hd);
        expect_close_d(what, out, want_out, nout, 2e-6, 1e-5);
        expect_close_d(what, sample_out, want_out, nout, 2e-6, 1e-5);
        snprintf(what, sizeof what, "probabilities T=%d heads=%d hd=%d", tokens, heads, hd);
        expect_close_d(what, probs, want_p, nprob, 1e-6, 1e-5);
        /* Gradients: sums of T products, errors relative to their scale. */
        snprintf(what, sizeof what, "dqkv T=%d heads=%d hd=%d", tokens, heads, hd);
        expect_close_d(what, dqkv, want_d, nqkv, 2e-6 * max_abs(want_d, nqkv), 1e-5);
        free(qkv), free(dout), free(out), free(sample_out), free(probs), free(dqkv);
        free(scratch), free(sample_scratch), free(qd), free(gd), free(want_out), free(want_p);
        free(want_d);
    }
}
END_TEST

/* GELU's derivative against the double formula, and op_gelu_tanh_to
 * against the in-place op_gelu_tanh, bit for bit. */
START_TEST(test_gelu_tanh_grad) {
    const size_t dense = 12001;
    const float extra[] = {0.0f, -0.0f, 1e-8f, -1e-8f, 20, -20, 87, -87, 1e4f, -1e4f,
                           1e36f, -1e36f, 3e38f, -3e38f};
    const size_t ne = sizeof extra / sizeof extra[0], n = dense + ne;
    float *x = malloc(n * sizeof *x), *d = malloc(n * sizeof *d);
    float *g1 = malloc(n * sizeof *g1), *g2 = malloc(n * sizeof *g2);
    ck_assert(x && d && g1 && g2);
    for (size_t i = 0; i < dense; i++) x[i] = (float)(-12.0 + 24.0 * (double)i / (dense - 1));
    memcpy(x + dense, extra, sizeof extra);
    for (size_t i = 0; i < n; i++) d[i] = 1.0f + (float)(i % 3); /* d is scaled, not set */
    op_gelu_tanh_grad(x, d, n, 2);
    const double c0 = sqrt(2.0 / 3.14159265358979323846), c1 = 0.044715;
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double v = x[i], want;
        if (fabs(v) > 1e6) {
            want = v > 0 ? 1.0 : 0.0; /* the cubic overflows; the slope is 1 or 0 */
        } else {
            double t = tanh(c0 * (v + c1 * v * v * v));
            want = 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * c0 * (1 + 3 * c1 * v * v);
        }
        want *= 1.0 + (double)(i % 3);
        double err = fabs((double)d[i] - want);
        ck_assert_msg(isfinite(d[i]) && err <= 2e-6 * (1 + fabs(want)),
                      "gelu'(%.9g) = %.9g, want %.9g", v, (double)d[i], want);
        worst = fmax(worst, err / (1 + fabs(want)));
    }
    printf("gelu_tanh_grad: worst error %.2e (abs/(1+|want|))\n", worst);
    memcpy(g1, x, n * sizeof *x);
    op_gelu_tanh(g1, n, 2);
    op_gelu_tanh_to(x, g2, n, 2);
    ck_assert(memcmp(g1, g2, n * sizeof *g1) == 0);
    /* NaN in, NaN out (8 lanes, then the scalar tail). */
    float nx[11] = {NAN, 1, 2, 3, 4, 5, 6, 7, 8, NAN, 0.5f}, nd[11];
    for (int i = 0; i < 11; i++) nd[i] = 1.0f;
    op_gelu_tanh_grad(nx, nd, 11, 1);
    for (int i = 0; i < 11; i++) ck_assert(isnan(nd[i]) == (i == 0 || i == 9));
    free(x), free(d), free(g1), free(g2);
}
END_TEST

/* Large logits: the softmax must subtract the maximum (no overflow) and a
 * dominant key must get all the weight. */
START_TEST(test_attention_large_logits) {
    const int tokens = 16, heads = 2, hd = 4, dim = heads * hd;
    rng_seed(5);
    float *qkv = rand_floats((size_t)tokens * 3 * dim, -1, 1);
    for (int t = 0; t < tokens; t++)
        for (int d = 0; d < dim; d++) qkv[(size_t)t * 3 * dim + d] *= 60.0f; /* q */
    float *out = malloc((size_t)tokens * dim * sizeof *out);
    float *scratch = malloc(op_attention_scratch(tokens, hd) * sizeof *scratch);
    double *qd = malloc((size_t)tokens * 3 * dim * sizeof *qd), *want = malloc((size_t)tokens * dim * sizeof *want);
    for (int i = 0; i < tokens * 3 * dim; i++) qd[i] = qkv[i];
    op_attention(qkv, 1, tokens, heads, hd, out, scratch, 1);
    ref_attention(qd, tokens, heads, hd, want);
    expect_close_d("attention large logits", out, want, (size_t)tokens * dim, 1e-5, 1e-4);
    free(qkv), free(out), free(scratch), free(qd), free(want);
}
END_TEST

/* NaN (a checkpoint's NaN weights, NaN pixels) must come out as NaN and
 * stay inside what it touches: fast_expf once converted it to int, which
 * is undefined (found by tests/fuzz/fuzz_model_load, clang UBSan). */
START_TEST(test_nan_passes_through) {
    float g[11] = {NAN, 1.0f, -NAN, 0.5f, NAN, 2.0f, -1.0f, 3.0f, NAN, 0.25f, -2.0f};
    float want1 = (float)ref_gelu(1.0f);
    op_gelu_tanh(g, 11, 1); /* 8 lanes, then the scalar tail */
    for (int i = 0; i < 11; i++)
        ck_assert_msg(isnan(g[i]) == (i == 0 || i == 2 || i == 4 || i == 8),
                      "gelu: element %d is %g", i, (double)g[i]);
    ck_assert(fabsf(g[1] - want1) <= 1e-6f);

    /* Two sequences; a NaN key in the first: its outputs are NaN, the
     * second's are untouched. */
    const int tokens = 4, heads = 1, hd = 4, dim = heads * hd;
    rng_seed(6);
    size_t per = (size_t)tokens * 3 * dim, nout = (size_t)tokens * dim;
    float *qkv = rand_floats(2 * per, -1, 1), *out = malloc(2 * nout * sizeof *out);
    float *scratch = malloc(op_attention_scratch(tokens, hd) * sizeof *scratch);
    double *qd = malloc(per * sizeof *qd), *want = malloc(nout * sizeof *want);
    qkv[dim + 1] = NAN; /* token 0, key element 1 */
    for (size_t i = 0; i < per; i++) qd[i] = qkv[per + i];
    op_attention(qkv, 2, tokens, heads, hd, out, scratch, 1);
    ref_attention(qd, tokens, heads, hd, want);
    for (size_t i = 0; i < nout; i++) ck_assert_msg(isnan(out[i]), "out[%zu] = %g", i, (double)out[i]);
    expect_close_d("attention beside a NaN sequence", out + nout, want, nout, 2e-6, 1e-5);
    free(qkv), free(out), free(scratch), free(qd), free(want);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* position embedding                                                       */
/* ------------------------------------------------------------------------ */

/* MAE get_2d_sincos_pos_embed: grid = meshgrid(w, h); the first half of the
 * channels embeds grid[0] (the column), the second half the row; a 1-D
 * embedding of width E is [sin(pos*omega), cos(pos*omega)] with
 * omega_i = 1 / 10000^(i/(E/2)), i < E/2. */
static double mae_1d(int e, double pos, int ch) {
    int half = e / 2;
    int i = ch < half ? ch : ch - half;
    double omega = 1.0 / pow(10000.0, (double)i / ((double)e / 2.0));
    return ch < half ? sin(pos * omega) : cos(pos * omega);
}

START_TEST(test_sincos_pos_embed) {
    static const int grids[] = {1, 2, 4, 8};
    static const int dims[] = {4, 16, 32, 64};
    for (size_t gi = 0; gi < 4; gi++)
        for (size_t di = 0; di < 4; di++) {
            int grid = grids[gi], dim = dims[di];
            size_t n = (size_t)grid * grid * dim;
            float *pe = malloc(n * sizeof *pe);
            double *want = malloc(n * sizeof *want);
            for (size_t i = 0; i < n; i++) pe[i] = NAN;
            sincos_pos_embed(pe, grid, dim);
            for (int r = 0; r < grid; r++)
                for (int c = 0; c < grid; c++)
                    for (int ch = 0; ch < dim; ch++) {
                        size_t at = ((size_t)r * grid + c) * dim + ch;
                        want[at] = ch < dim / 2 ? mae_1d(dim / 2, c, ch)
                                                : mae_1d(dim / 2, r, ch - dim / 2);
                    }
            char what[64];
            snprintf(what, sizeof what, "pos_embed grid=%d dim=%d", grid, dim);
            expect_close_d(what, pe, want, n, 1e-7, 1e-7);
            free(pe), free(want);
        }
    /* Landmarks spelled out: token (row 1, col 2) of a 4x4 grid, D = 16. */
    float pe[4 * 4 * 16];
    sincos_pos_embed(pe, 4, 16);
    const float *t = pe + (1 * 4 + 2) * 16;
    ck_assert_float_eq_tol(t[0], (float)sin(2.0), 1e-7);   /* column, sin, omega 1 */
    ck_assert_float_eq_tol(t[4], (float)cos(2.0), 1e-7);   /* column, cos, omega 1 */
    ck_assert_float_eq_tol(t[1], (float)sin(0.2), 1e-7);   /* omega = 10000^-(1/4) */
    ck_assert_float_eq_tol(t[8], (float)sin(1.0), 1e-7);   /* row, sin */
    ck_assert_float_eq_tol(t[12], (float)cos(1.0), 1e-7);  /* row, cos */
    /* Token 0 is sin(0)=0 / cos(0)=1. */
    for (int ch = 0; ch < 16; ch++) ck_assert_float_eq(pe[ch], (ch % 8) < 4 ? 0.0f : 1.0f);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* bricks: gather / scatter / full forward                                  */
/* ------------------------------------------------------------------------ */

static float *param(lego_model *m, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
static float *param(lego_model *m, const char *fmt, ...) {
    char name[128];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    for (int i = 0; i < m->num_params; i++)
        if (strcmp(m->table[i].name, name) == 0) return m->params + m->table[i].offset;
    ck_abort_msg("no parameter %s", name);
    return NULL;
}

static lego_model *make_model(int C, int D, int heads, double mlp_ratio,
                              const int (*bricks)[3], int nb, int threads) {
    lego_model_config cfg;
    lego_model_config_init(&cfg);
    cfg.img_channels = C;
    cfg.hidden_size = D;
    cfg.num_heads = heads;
    cfg.mlp_ratio = mlp_ratio;
    cfg.frequency_embedding_size = 16;
    cfg.num_threads = threads;
    return model_with_bricks(&cfg, bricks, nb);
}

static float *run_brick(lego_model *m, int k, int n, int h, int w, const float *xin,
                        const float *below, const float *silu_c) {
    size_t img = (size_t)n * m->cfg.img_channels * h * w;
    float *out = malloc(img * sizeof *out);
    float *scratch = malloc(brick_scratch_floats(m, k, n, h, w) * sizeof *scratch);
    ck_assert(out && scratch);
    for (size_t i = 0; i < img; i++) out[i] = NAN; /* every pixel must be written */
    brick_forward(m, k, n, h, w, xin, below, silu_c, out, scratch);
    free(scratch);
    return out;
}

/*
 * A brick wired so that its output reads back one input channel exactly.
 * All parameters zero (so the DiT blocks are the identity: zero adaLN means
 * zero gates; the final adaLN gives shift = scale = 0) except:
 *   - the patch embedding puts +v and -v of input channel `sel` at pixel
 *     (i, j) of the token into token channels 2q and 2q+1 (q = i*p + j), and
 *     its bias puts the anchor +1, -1 into channels 2p^2 and 2p^2+1.  The
 *     token mean is 0, so LayerNorm divides everything by one s > 0.
 *   - the final linear sends channel 2q (v/s) to output (i, j, c=0) and the
 *     anchor (1/s) to output (i, j, c=1), in the (p, q, c) order of the
 *     reference unpatchify.
 * So output channel 0 / channel 1 at every pixel equals input channel `sel`
 * at that pixel, whatever LayerNorm's scale.  Needs C = 2.
 */
static void wire_readout(lego_model *m, int k, int sel) {
    brick *b = &m->bricks[k];
    int D = m->cfg.hidden_size, p = b->cfg.patch_size, c_in = b->c_in, C = m->cfg.img_channels;
    ck_assert(C == 2 && D >= 2 * p * p + 2);
    /* Zero the whole brick, position embedding included. */
    const lego_param *first = &m->table[b->first_param];
    int last = k + 1 < m->num_bricks ? m->bricks[k + 1].first_param : m->num_params;
    size_t end = m->table[last - 1].offset + m->table[last - 1].numel;
    memset(m->params + first->offset, 0, (end - first->offset) * sizeof(float));
    float *ew = param(m, "model.model.%d.x_embedder.proj.weight", k); /* [D][c_in][p][p] */
    float *eb = param(m, "model.model.%d.x_embedder.proj.bias", k);
    for (int i = 0; i < p; i++)
        for (int j = 0; j < p; j++) {
            int q = i * p + j;
            ew[(((size_t)(2 * q) * c_in + sel) * p + i) * p + j] = 1.0f;
            ew[(((size_t)(2 * q + 1) * c_in + sel) * p + i) * p + j] = -1.0f;
        }
    eb[2 * p * p] = 1.0f;
    eb[2 * p * p + 1] = -1.0f;
    float *fw = param(m, "model.model.%d.final_layer.linear.weight", k); /* [p*p*C][D] */
    for (int q = 0; q < p * p; q++) {
        fw[(size_t)(q * C + 0) * D + 2 * q] = 1.0f;
        fw[(size_t)(q * C + 1) * D + 2 * p * p] = 1.0f;
    }
}

/* Check out[img][0]/out[img][1] == want(img, y, x) at every pixel. */
typedef double (*pixel_fn)(int img, int y, int x, int h, int w, const float *data);

static void expect_readout(const char *what, const float *out, int n, int h, int w,
                           pixel_fn want, const float *data) {
    size_t plane = (size_t)h * w;
    for (int img = 0; img < n; img++)
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++) {
                double a = out[((size_t)img * 2 + 0) * plane + (size_t)y * w + x];
                double s = out[((size_t)img * 2 + 1) * plane + (size_t)y * w + x];
                double got = a / s, ref = want(img, y, x, h, w, data);
                ck_assert_msg(s > 0 && fabs(got - ref) <= 1e-5,
                              "%s: image %d pixel (%d, %d): read %.7g, want %.7g", what, img, y,
                              x, got, ref);
            }
}

static double want_row(int img, int y, int x, int h, int w, const float *d) {
    (void)img, (void)x, (void)w, (void)d;
    return 2.0 * y / (h - 1) - 1.0;
}
static double want_col(int img, int y, int x, int h, int w, const float *d) {
    (void)img, (void)y, (void)h, (void)d;
    return 2.0 * x / (w - 1) - 1.0;
}
static int plane_channel; /* which channel of `data` want_plane reads */
static double want_plane(int img, int y, int x, int h, int w, const float *d) {
    return d[(((size_t)img * 2 + plane_channel) * h + y) * w + x];
}

/* Brick 0 reads [c_in*x (C), row, column]; brick 1 reads [F_below (C),
 * c_in*x (C), row, column].  Coordinates span the whole (non-square) image,
 * not each patch; patches are row-major; outputs land where they came from. */
START_TEST(test_brick_input_channels) {
    /* brick 0: 4x4 patches of 2x2 tokens; brick 1: 8x8 patches of 4x4
     * tokens (so a token's pixels are not a brick patch's). */
    const int spec[][3] = {{4, 2, 1}, {8, 4, 2}};
    lego_model *m = make_model(2, 40, 2, 1.0, spec, 2, 2);
    const int n = 2, h = 8, w = 24;
    size_t img = (size_t)n * 2 * h * w;
    rng_seed(6);
    float *xin = rand_floats(img, -1, 1), *below = rand_floats(img, -1, 1);
    float *silu_c = rand_floats((size_t)n * 40, -1, 1); /* ignored: adaLN is zero */

    /* brick 0: channels 0, 1 = c_in*x; 2 = row; 3 = column. */
    for (int sel = 0; sel < 4; sel++) {
        wire_readout(m, 0, sel);
        float *out = run_brick(m, 0, n, h, w, xin, NULL, silu_c);
        char what[64];
        snprintf(what, sizeof what, "brick 0 input channel %d", sel);
        plane_channel = sel;
        expect_readout(what, out, n, h, w, sel < 2 ? want_plane : sel == 2 ? want_row : want_col,
                       xin);
        free(out);
    }
    /* brick 1: 0, 1 = F_below; 2, 3 = c_in*x; 4 = row; 5 = column. */
    for (int sel = 0; sel < 6; sel++) {
        wire_readout(m, 1, sel);
        float *out = run_brick(m, 1, n, h, w, xin, below, silu_c);
        char what[64];
        snprintf(what, sizeof what, "brick 1 input channel %d", sel);
        plane_channel = sel % 2;
        pixel_fn f = sel < 4 ? want_plane : sel == 4 ? want_row : want_col;
        expect_readout(what, out, n, h, w, f, sel < 2 ? below : xin);
        free(out);
    }
    free(xin), free(below), free(silu_c);
    lego_model_free(m);
}
END_TEST

/* With every weight zero the output is the final linear's bias, laid out
 * (p, q, c) within each token: out[c][y][x] = bias[((y%p)*p + x%p)*C + c]. */
START_TEST(test_brick_unpatchify_order) {
    const int spec[][3] = {{6, 3, 1}};
    lego_model *m = make_model(3, 16, 2, 2.0, spec, 1, 1);
    float *fb = param(m, "model.model.0.final_layer.linear.bias");
    for (int i = 0; i < 3 * 3 * 3; i++) fb[i] = (float)(i + 1);
    const int n = 1, h = 12, w = 6, C = 3;
    float *xin = calloc((size_t)n * C * h * w, sizeof *xin), *silu = calloc(16, sizeof *silu);
    float *out = run_brick(m, 0, n, h, w, xin, NULL, silu);
    for (int c = 0; c < C; c++)
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++) {
                float want = (float)(((y % 3) * 3 + x % 3) * C + c + 1);
                ck_assert_msg(out[((size_t)c * h + y) * w + x] == want,
                              "pixel c=%d y=%d x=%d: %g, want %g", c, y, x,
                              (double)out[((size_t)c * h + y) * w + x], (double)want);
            }
    free(xin), free(silu), free(out);
    lego_model_free(m);
}
END_TEST

/* ---- a whole brick in double precision ---- */

typedef struct ref_ctx {
    lego_model *m;
    int k, n, h, w;
    const float *xin, *below, *silu_c;
} ref_ctx;

/* Input channel ci of image img at (y, x), as the reference builds it. */
static double ref_input(const ref_ctx *r, int img, int ci, int y, int x) {
    int C = r->m->cfg.img_channels;
    size_t plane = (size_t)r->h * r->w;
    if (r->below) {
        if (ci < C) return r->below[((size_t)img * C + ci) * plane + (size_t)y * r->w + x];
        ci -= C;
    }
    if (ci < C) return r->xin[((size_t)img * C + ci) * plane + (size_t)y * r->w + x];
    if (ci == C) return 2.0 * y / (r->h - 1) - 1.0;
    return 2.0 * x / (r->w - 1) - 1.0;
}

static void ref_brick(const ref_ctx *r, double *out) {
    lego_model *m = r->m;
    const brick *b = &m->bricks[r->k];
    int k = r->k, D = m->cfg.hidden_size, heads = m->cfg.num_heads, hd = D / heads;
    int p = b->cfg.patch_size, bs = b->cfg.brick_size, grid = bs / p, T = grid * grid;
    int C = m->cfg.img_channels, c_in = b->c_in, H = m->mlp_hidden;
    size_t plane = (size_t)r->h * r->w;
    double *x = malloc((size_t)T * D * sizeof *x), *hb = malloc((size_t)T * D * sizeof *hb);
    double *qkv = malloc((size_t)T * 3 * D * sizeof *qkv), *att = malloc((size_t)T * D * sizeof *att);
    double *mlp = malloc((size_t)T * H * sizeof *mlp), *tmp = malloc((size_t)T * D * sizeof *tmp);
    double *o = malloc((size_t)T * p * p * C * sizeof *o), sc[1024], mod[6 * 256];
    ck_assert(D <= 256);
    const float *pe = param(m, "model.model.%d.pos_embed", k);
    const float *ew = param(m, "model.model.%d.x_embedder.proj.weight", k);
    const float *eb = param(m, "model.model.%d.x_embedder.proj.bias", k);
    for (int img = 0; img < r->n; img++) {
        for (int i = 0; i < D; i++) sc[i] = r->silu_c[(size_t)img * D + i];
        for (int py = 0; py < r->h / bs; py++)
            for (int px = 0; px < r->w / bs; px++) {
                /* patch embedding: a stride-p convolution */
                for (int t = 0; t < T; t++) {
                    int y0 = py * bs + (t / grid) * p, x0 = px * bs + (t % grid) * p;
                    for (int d = 0; d < D; d++) {
                        double s = eb[d] + pe[(size_t)t * D + d];
                        for (int ci = 0; ci < c_in; ci++)
                            for (int i = 0; i < p; i++)
                                for (int j = 0; j < p; j++)
                                    s += (double)ew[(((size_t)d * c_in + ci) * p + i) * p + j] *
                                         ref_input(r, img, ci, y0 + i, x0 + j);
                        x[(size_t)t * D + d] = s;
                    }
                }
                for (int j = 0; j < b->cfg.depth; j++) {
                    ref_linear(param(m, "model.model.%d.blocks.%d.adaLN_modulation.1.weight", k, j),
                               param(m, "model.model.%d.blocks.%d.adaLN_modulation.1.bias", k, j),
                               D, 6 * D, sc, 1, mod);
                    for (int t = 0; t < T; t++)
                        ref_ln_mod(x + (size_t)t * D, D, mod, mod + D, hb + (size_t)t * D);
                    ref_linear(param(m, "model.model.%d.blocks.%d.attn.qkv.weight", k, j),
                               param(m, "model.model.%d.blocks.%d.attn.qkv.bias", k, j), D, 3 * D,
                               hb, (size_t)T, qkv);
                    ref_attention(qkv, T, heads, hd, att);
                    ref_linear(param(m, "model.model.%d.blocks.%d.attn.proj.weight", k, j),
                               param(m, "model.model.%d.blocks.%d.attn.proj.bias", k, j), D, D,
                               att, (size_t)T, tmp);
                    for (size_t i = 0; i < (size_t)T * D; i++) x[i] += mod[2 * D + i % D] * tmp[i];
                    for (int t = 0; t < T; t++)
                        ref_ln_mod(x + (size_t)t * D, D, mod + 3 * D, mod + 4 * D, hb + (size_t)t * D);
                    ref_linear(param(m, "model.model.%d.blocks.%d.mlp.fc1.weight", k, j),
                               param(m, "model.model.%d.blocks.%d.mlp.fc1.bias", k, j), D, H, hb,
                               (size_t)T, mlp);
                    for (size_t i = 0; i < (size_t)T * H; i++) mlp[i] = ref_gelu(mlp[i]);
                    ref_linear(param(m, "model.model.%d.blocks.%d.mlp.fc2.weight", k, j),
                               param(m, "model.model.%d.blocks.%d.mlp.fc2.bias", k, j), H, D, mlp,
                               (size_t)T, tmp);
                    for (size_t i = 0; i < (size_t)T * D; i++) x[i] += mod[5 * D + i % D] * tmp[i];
                }
                ref_linear(param(m, "model.model.%d.final_layer.adaLN_modulation.1.weight", k),
                           param(m, "model.model.%d.final_layer.adaLN_modulation.1.bias", k), D,
                           2 * D, sc, 1, mod);
                for (int t = 0; t < T; t++)
                    ref_ln_mod(x + (size_t)t * D, D, mod, mod + D, hb + (size_t)t * D);
                ref_linear(param(m, "model.model.%d.final_layer.linear.weight", k),
                           param(m, "model.model.%d.final_layer.linear.bias", k), D, p * p * C, hb,
                           (size_t)T, o);
                /* unpatchify: token t's row is (i, j, c) */
                for (int t = 0; t < T; t++) {
                    int y0 = py * bs + (t / grid) * p, x0 = px * bs + (t % grid) * p;
                    for (int i = 0; i < p; i++)
                        for (int jj = 0; jj < p; jj++)
                            for (int c = 0; c < C; c++)
                                out[((size_t)img * C + c) * plane + (size_t)(y0 + i) * r->w + x0 + jj] =
                                    o[(size_t)t * p * p * C + ((size_t)i * p + jj) * C + c];
                }
            }
    }
    free(x), free(hb), free(qkv), free(att), free(mlp), free(tmp), free(o);
}

/* Random values in every trainable parameter (adaLN and final layers too,
 * so nothing is an identity), scaled ~1/sqrt(fan_in). */
static void randomize(lego_model *m, uint64_t seed) {
    rng_seed(seed);
    for (int i = 0; i < m->num_params; i++) {
        const lego_param *p = &m->table[i];
        if (p->fixed) continue;
        double fan_in = p->rank >= 2 ? (double)(p->numel / (size_t)p->shape[0]) : 4.0;
        double a = 1.0 / sqrt(fan_in);
        for (size_t j = 0; j < p->numel; j++) m->params[p->offset + j] = (float)urand(-a, a);
    }
}

START_TEST(test_brick_forward_reference) {
    /* brick 0: 4x4 patch 2 depth 1; brick 1: 8x8 patch 2 depth 2 (16
     * tokens); brick 2: 8x8 patch 8 (one token per patch). */
    const int spec[][3] = {{4, 2, 1}, {8, 2, 2}, {8, 8, 1}};
    lego_model *m = make_model(2, 16, 2, 2.0, spec, 3, 2);
    randomize(m, 7);
    const int n = 2, h = 8, w = 16, D = 16;
    size_t img = (size_t)n * 2 * h * w;
    float *xin = rand_floats(img, -1, 1), *below = rand_floats(img, -1, 1);
    float *silu_c = rand_floats((size_t)n * D, -1, 1);
    double *want = malloc(img * sizeof *want);
    for (int k = 0; k < 3; k++) {
        ref_ctx r = {m, k, n, h, w, xin, k ? below : NULL, silu_c};
        ref_brick(&r, want);
        float *got = run_brick(m, k, n, h, w, xin, k ? below : NULL, silu_c);
        double top = 1, err = 0;
        for (size_t i = 0; i < img; i++) {
            top = fmax(top, fabs(want[i]));
            err = fmax(err, fabs(got[i] - want[i]));
            ck_assert(isfinite(got[i]));
        }
        printf("brick_forward brick %d: scaled error %.2e vs double reference\n", k, err / top);
        ck_assert_msg(err / top < 2e-5, "brick %d: scaled error %g", k, err / top);
        /* Threads do not change the result beyond rounding. */
        lego_model_set_threads(m, 1);
        float *one = run_brick(m, k, n, h, w, xin, k ? below : NULL, silu_c);
        lego_model_set_threads(m, 2);
        ck_assert(scaled_error(one, got, img) < 1e-6);
        free(one);
        free(got);
    }
    free(xin), free(below), free(silu_c), free(want);
    lego_model_free(m);
}
END_TEST

int main(void) {
    Suite *s = suite_create("ops");
    TCase *k = tcase_create("kernels");
    tcase_set_timeout(k, 60);
    tcase_add_test(k, test_linear);
    tcase_add_test(k, test_layernorm_modulate);
    tcase_add_test(k, test_gated_residual);
    tcase_add_test(k, test_gelu_tanh);
    tcase_add_test(k, test_silu);
    tcase_add_test(k, test_attention);
    tcase_add_test(k, test_attention_large_logits);
    tcase_add_test(k, test_attention_train);
    tcase_add_test(k, test_gelu_tanh_grad);
    tcase_add_test(k, test_nan_passes_through);
    suite_add_tcase(s, k);
    TCase *p = tcase_create("pos_embed");
    tcase_add_test(p, test_sincos_pos_embed);
    suite_add_tcase(s, p);
    TCase *b = tcase_create("brick");
    tcase_set_timeout(b, 60);
    tcase_add_test(b, test_brick_input_channels);
    tcase_add_test(b, test_brick_unpatchify_order);
    tcase_add_test(b, test_brick_forward_reference);
    suite_add_tcase(s, b);
    return run_suite(s);
}
