/*
 * gemm_check.cu -- what cuBLASLt's epilogues compute, checked at run time.
 *
 * The GEMM epilogues the backend uses beyond bias are known to us only from
 * NVIDIA's documentation: GELU (is it the reference's tanh approximation?)
 * and training's GELU_AUX_BIAS, DGELU and BGRADB (which buffer holds GELU's
 * input, which dimension the bias gradient sums over).  A wrong reading
 * would give wrong images or gradients, silently.  So before the backend
 * relies on one, it runs it on small operands whose exact results the host
 * knows and keeps it only if they agree; otherwise the kernels do that
 * work, as where the heuristic offers no algorithm.  Each check costs one
 * small allocation and one synchronisation, once per handle (per operand
 * type for the training fusions, at the first fused call).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"

static double gelu_tanh_ref(double x) {
    return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)));
}

static double gelu_tanh_grad_ref(double x) {
    const double k = 0.7978845608028654, t = tanh(k * (x + 0.044715 * x * x * x));
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x);
}

/* ---- does GELU_BIAS compute the tanh approximation? ---------------------- */

#define PROBE_OUT 256 /* GELU inputs: a ramp over [-8, 8) */
#define PROBE_IN 8
#define PROBE_ROWS 4

lego_status gemm_probe_gelu(gemm_ctx *g, int *is_tanh, lego_err *err) {
    *is_tanh = 0;
    /* W [OUT][IN] with column 0 the ramp, x [ROWS][IN] with column 0 = 1, so
     * y[r][o] = GELU(ramp[o] + bias[o]) with bias 0. */
    static const size_t w_n = PROBE_OUT * PROBE_IN, x_n = PROBE_ROWS * PROBE_IN;
    size_t w_off = 0, x_off = round_up_floats(w_n), b_off = x_off + round_up_floats(x_n);
    size_t y_off = b_off + round_up_floats(PROBE_OUT), total = y_off + PROBE_OUT * PROBE_ROWS;
    float *host = (float *)calloc(total, sizeof(float));
    if (!host) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    for (int o = 0; o < PROBE_OUT; o++)
        host[w_off + (size_t)o * PROBE_IN] = -8.0f + 16.0f * (float)o / PROBE_OUT;
    for (int r = 0; r < PROBE_ROWS; r++) host[x_off + (size_t)r * PROBE_IN] = 1.0f;

    float *dev = NULL;
    cublasLtEpilogue_t used = CUBLASLT_EPILOGUE_DEFAULT;
    lego_status s = cu_status(cudaMalloc(&dev, total * sizeof(float)), err, "cudaMalloc (probe)");
    if (s == LEGO_OK)
        s = cu_status(cudaMemcpyAsync(dev, host, total * sizeof(float), cudaMemcpyHostToDevice,
                                      g->stream),
                      err, "cudaMemcpyAsync (probe)");
    if (s == LEGO_OK) {
        /* Fields in gemm_call's order: gemm_linear's form, y = x W^T + b. */
        gemm_call k = {1, 0, PROBE_OUT, PROBE_ROWS, PROBE_IN, dev + w_off, dev + x_off,
                       dev + y_off, PROBE_IN, PROBE_IN, PROBE_OUT, CUDA_R_32F, CUDA_R_32F,
                       1.0f, 0.0f, dev + b_off, GEMM_ACT_GELU, 1, 0, 0, 0, 0, NULL, 0, NULL};
        s = gemm_run_ex(g, &k, 1, &used, err);
    }
    if (s == LEGO_OK)
        s = cu_status(cudaMemcpyAsync(host + y_off, dev + y_off,
                                      PROBE_OUT * PROBE_ROWS * sizeof(float),
                                      cudaMemcpyDeviceToHost, g->stream),
                      err, "cudaMemcpyAsync (probe)");
    if (s == LEGO_OK) s = cu_status(cudaStreamSynchronize(g->stream), err, "probe GEMM");
    if (s == LEGO_OK && used != CUBLASLT_EPILOGUE_GELU_BIAS)
        snprintf(g->gelu_note, sizeof g->gelu_note, "GELU_BIAS not offered: a separate kernel");
    if (s == LEGO_OK && used == CUBLASLT_EPILOGUE_GELU_BIAS) {
        /* The largest distance, relative to max(1, |value|), from the tanh
         * form and from the erf form (which differ by up to 4.7e-4 here):
         * recorded, so that a run shows how close the decision was. */
        double to_tanh = 0, to_erf = 0;
        for (int r = 0; r < PROBE_ROWS; r++)
            for (int o = 0; o < PROBE_OUT; o++) {
                double x = host[w_off + (size_t)o * PROBE_IN];
                double got = host[y_off + (size_t)r * PROBE_OUT + o];
                double t = gelu_tanh_ref(x), e = 0.5 * x * (1.0 + erf(x * 0.7071067811865476));
                double dt = fabs(got - t) / fmax(1.0, fabs(t));
                double de = fabs(got - e) / fmax(1.0, fabs(e));
                to_tanh = dt > to_tanh || dt != dt ? dt : to_tanh; /* NaN sticks */
                to_erf = de > to_erf || de != de ? de : to_erf;
            }
        *is_tanh = to_tanh <= 1e-5;
        snprintf(g->gelu_note, sizeof g->gelu_note,
                 "GELU_BIAS within %.2g of the tanh form, %.2g of the erf form: %s", to_tanh,
                 to_erf, *is_tanh ? "used" : "a separate kernel");
    }
    if (dev) cudaFree(dev);
    free(host);
    return s;
}

/* ---- training's fusions --------------------------------------------------- */

/* The check's shapes: a linear layer of FC_IN -> FC_OUT over FC_ROWS rows,
 * each a multiple of 64, as the heuristic likes them. */
#define FC_IN 64
#define FC_OUT 128
#define FC_ROWS 64

/* Operands of the check: multiples of 1/16 in [-1/4, 1/4] (GELU inputs:
 * multiples of 1/4 in [-4, 4]).  Exact in bf16, and every product and
 * partial sum below is exact in fp32, whatever order a GEMM adds them in;
 * only the epilogue's arithmetic and the output's rounding remain. */
static float check_value(uint32_t i, uint32_t salt) {
    uint32_t h = (i + 1u) * 2654435761u ^ salt * 40503u;
    h *= 2246822519u;
    return (float)((int)((h >> 20) % 9u) - 4) / 16.0f;
}

static float check_gelu_input(uint32_t i) {
    uint32_t h = (i + 7u) * 2654435761u;
    return (float)((int)((h >> 20) % 33u) - 16) / 4.0f;
}

/* A buffer of the check, in elements of its type, carved on DEVICE_ALIGN. */
typedef struct check_buf {
    size_t off; /* bytes from the start */
    size_t n;
    cudaDataType type;
} check_buf;

static check_buf carve(size_t *bytes, size_t n, cudaDataType type) {
    check_buf b = {*bytes, n, type};
    *bytes += (n * dtype_bytes(type) + DEVICE_ALIGN - 1) / DEVICE_ALIGN * DEVICE_ALIGN;
    return b;
}

/* Values of the check are exact in either type, so the conversions (cuda_bf16.h's,
 * callable on the host) do not round. */
static void put(unsigned char *base, const check_buf *b, size_t i, float v) {
    unsigned char *p = base + b->off + i * dtype_bytes(b->type);
    if (b->type == CUDA_R_32F) {
        memcpy(p, &v, 4);
    } else {
        bf16 h = __float2bfloat16_rn(v);
        memcpy(p, &h, 2);
    }
}

static double get(const unsigned char *base, const check_buf *b, size_t i) {
    const unsigned char *p = base + b->off + i * dtype_bytes(b->type);
    if (b->type == CUDA_R_32F) {
        float v;
        memcpy(&v, p, 4);
        return v;
    }
    bf16 h;
    memcpy(&h, p, 2);
    return __bfloat162float(h);
}

static const char *type_name(cudaDataType t) {
    return t == CUDA_R_32F ? "fp32" : t == CUDA_R_16BF ? "bf16" : "fp16";
}

/* The fusions' results against the host's, one fusion at a time: the first
 * element out of tolerance goes into g->fusion_note and the fusion's bit
 * into *bad. */
typedef struct fusion_check {
    gemm_ctx *g;
    cudaDataType t;
    double tol; /* relative to max(1, |expected|) */
    const unsigned char *host;
    unsigned bad;
} fusion_check;

static void expect(fusion_check *c, unsigned fusion, const char *what, const check_buf *b,
                   size_t i, size_t cols, double want) {
    if (c->bad & fusion) return;
    double got = get(c->host, b, i);
    if (fabs(got - want) <= c->tol * fmax(1.0, fabs(want))) return; /* NaN fails too */
    c->bad |= fusion;
    if (c->g->fusion_note[0]) return;
    char where[48];
    if (cols > 1) snprintf(where, sizeof where, "%s[%zu][%zu]", what, i / cols, i % cols);
    else snprintf(where, sizeof where, "%s[%zu]", what, i);
    snprintf(c->g->fusion_note, sizeof c->g->fusion_note,
             "%s %s: %s is %.6g where %.6g was expected; using kernels instead", type_name(c->t),
             fusion == GEMM_FUSION_GELU_AUX ? "GELU_AUX_BIAS"
             : fusion == GEMM_FUSION_DGELU  ? "DGELU"
                                            : "BGRADB",
             where, got, want);
}

lego_status gemm_check_fusions(gemm_ctx *g, cudaDataType t, unsigned *bad, lego_err *err) {
    *bad = 0;
    size_t bytes = 0;
    /* Names as in the trainer (train.cu: lin_fwd_gelu, lin_bwd): W [out][in],
     * x [rows][in], b [out]; u, g [rows][out] (GELU's input and output); dy
     * [rows][out]; a [rows][in] (GELU's input of the layer below), dx
     * [rows][in]; gw [out][in] and gb [out] in fp32. */
    check_buf w = carve(&bytes, FC_OUT * FC_IN, t), x = carve(&bytes, FC_ROWS * FC_IN, t);
    check_buf b = carve(&bytes, FC_OUT, t), u = carve(&bytes, FC_ROWS * FC_OUT, t);
    check_buf y = carve(&bytes, FC_ROWS * FC_OUT, t), dy = carve(&bytes, FC_ROWS * FC_OUT, t);
    check_buf a = carve(&bytes, FC_ROWS * FC_IN, t), dx = carve(&bytes, FC_ROWS * FC_IN, t);
    check_buf gw = carve(&bytes, FC_OUT * FC_IN, CUDA_R_32F);
    check_buf gb = carve(&bytes, FC_OUT, CUDA_R_32F);

    unsigned char *host = (unsigned char *)calloc(bytes, 1), *dev = NULL;
    if (!host) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    for (size_t i = 0; i < w.n; i++) put(host, &w, i, check_value((uint32_t)i, 1));
    for (size_t i = 0; i < x.n; i++) put(host, &x, i, check_value((uint32_t)i, 2));
    for (size_t i = 0; i < b.n; i++) put(host, &b, i, check_value((uint32_t)i, 3));
    for (size_t i = 0; i < dy.n; i++) put(host, &dy, i, check_value((uint32_t)i, 4));
    for (size_t i = 0; i < a.n; i++) put(host, &a, i, check_gelu_input((uint32_t)i));
    for (size_t i = 0; i < gw.n; i++) put(host, &gw, i, check_value((uint32_t)i, 5));

    /* The probe's GEMMs are not the model's: its counters stay as they were. */
    uint64_t runs = g->fused_runs, refused = g->fused_refused;
    int done[3] = {0, 0, 0};
    lego_status s = cu_status(cudaMalloc(&dev, bytes), err, "cudaMalloc (fusion check)");
    if (s == LEGO_OK)
        s = cu_status(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, g->stream), err,
                      "cudaMemcpyAsync (fusion check)");
    /* Fields in gemm_call's order; each call in the trainer's form. */
    if (s == LEGO_OK) { /* fc1's forward: y = GELU(x W^T + b), u = x W^T + b */
        gemm_call k = {1, 0, FC_OUT, FC_ROWS, FC_IN, dev + w.off, dev + x.off, dev + y.off, FC_IN,
                       FC_IN, FC_OUT, t, t, 1.0f, 0.0f, dev + b.off, GEMM_ACT_GELU_AUX, 1, 0, 0,
                       0, 1, dev + u.off, FC_OUT, NULL};
        s = gemm_run_fused(g, &k, &done[0], err);
    }
    if (s == LEGO_OK) { /* the input gradient through GELU: dx = (dy W) GELU'(a) */
        gemm_call k = {0, 0, FC_IN, FC_ROWS, FC_OUT, dev + w.off, dev + dy.off, dev + dx.off,
                       FC_IN, FC_OUT, FC_IN, t, t, 1.0f, 0.0f, NULL, GEMM_ACT_DGELU, 1, 0, 0, 0,
                       1, dev + a.off, FC_IN, NULL};
        s = gemm_run_fused(g, &k, &done[1], err);
    }
    if (s == LEGO_OK) { /* the weight gradient: gw += x^T dy, gb = column sums of dy */
        gemm_call k = {0, 1, FC_IN, FC_OUT, FC_ROWS, dev + x.off, dev + dy.off, dev + gw.off,
                       FC_IN, FC_OUT, FC_IN, t, CUDA_R_32F, 1.0f, 1.0f, NULL, GEMM_ACT_NONE, 1,
                       0, 0, 0, 1, NULL, 0, (float *)(void *)(dev + gb.off)};
        s = gemm_run_fused(g, &k, &done[2], err);
    }
    g->fused_runs = runs;
    g->fused_refused = refused;

    if (s == LEGO_OK)
        s = cu_status(cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDeviceToHost, g->stream), err,
                      "cudaMemcpyAsync (fusion check)");
    if (s == LEGO_OK) s = cu_status(cudaStreamSynchronize(g->stream), err, "fusion check");

    if (s == LEGO_OK) {
        /* bf16 outputs carry one rounding of their own (2^-9 relative) on
         * top of the epilogue's fp32 arithmetic; fp32 ones only the latter.
         * Either bound is far below what a misread epilogue gives, and the
         * fp32 one below the gap between the tanh and erf forms of GELU'
         * (up to 8.7e-4). */
        fusion_check c = {g, t, t == CUDA_R_32F ? 1e-4 : 1.6e-2, host, 0};
        static const unsigned fusion[3] = {GEMM_FUSION_GELU_AUX, GEMM_FUSION_DGELU,
                                           GEMM_FUSION_BGRADB};
        for (int f = 0; f < 3; f++)
            if (!done[f]) {
                c.bad |= fusion[f];
                if (!g->fusion_note[0])
                    snprintf(g->fusion_note, sizeof g->fusion_note,
                             "%s: the heuristic offers no algorithm for a fusion's check",
                             type_name(t));
            }
        for (size_t r = 0; r < FC_ROWS; r++)
            for (size_t o = 0; o < FC_OUT; o++) {
                double sum = get(host, &b, o);
                for (size_t i = 0; i < FC_IN; i++)
                    sum += get(host, &x, r * FC_IN + i) * get(host, &w, o * FC_IN + i);
                expect(&c, GEMM_FUSION_GELU_AUX, "u", &u, r * FC_OUT + o, FC_OUT, sum);
                expect(&c, GEMM_FUSION_GELU_AUX, "y", &y, r * FC_OUT + o, FC_OUT,
                       gelu_tanh_ref(sum));
            }
        for (size_t r = 0; r < FC_ROWS; r++)
            for (size_t i = 0; i < FC_IN; i++) {
                double sum = 0;
                for (size_t o = 0; o < FC_OUT; o++)
                    sum += get(host, &dy, r * FC_OUT + o) * get(host, &w, o * FC_IN + i);
                double want = sum * gelu_tanh_grad_ref(get(host, &a, r * FC_IN + i));
                expect(&c, GEMM_FUSION_DGELU, "dx", &dx, r * FC_IN + i, FC_IN, want);
            }
        for (size_t o = 0; o < FC_OUT; o++) {
            double col = 0;
            for (size_t r = 0; r < FC_ROWS; r++) col += get(host, &dy, r * FC_OUT + o);
            expect(&c, GEMM_FUSION_BGRADB, "gb", &gb, o, 1, col);
            for (size_t i = 0; i < FC_IN; i++) {
                double sum = check_value((uint32_t)(o * FC_IN + i), 5); /* gw before */
                for (size_t r = 0; r < FC_ROWS; r++)
                    sum += get(host, &x, r * FC_IN + i) * get(host, &dy, r * FC_OUT + o);
                expect(&c, GEMM_FUSION_BGRADB, "gw", &gw, o * FC_IN + i, FC_IN, sum);
            }
        }
        *bad = c.bad;
    }
    if (dev) cudaFree(dev);
    free(host);
    return s;
}
