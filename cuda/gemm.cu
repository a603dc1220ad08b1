/*
 * gemm.cu -- every linear layer as one cuBLASLt matmul.
 *
 * Activations are row-major token matrices and weights row-major
 * [out][in], so y = x W^T + b.  cuBLASLt is column-major: a row-major
 * [rows][out] matrix is a column-major out x rows one, so we ask for
 *     Y (out x rows, ld out) = op(A) * B + bias
 * with A the weight buffer seen as in x out (ld in) and transposed, B the
 * activations seen as in x rows (ld in), not transposed.  The bias epilogue
 * broadcasts a vector of length out (the rows of Y) over the columns, which
 * is the per-feature bias we want.
 *
 * Operands: W and x fp32, bf16 or fp16 (the same type), y and the bias
 * fp32 or the operands' type.  Compute type CUBLAS_COMPUTE_32F: fp32
 * accumulation always, and no TF32 for fp32 operands (that would need
 * CUBLAS_COMPUTE_32F_FAST_TF32 and would not meet the golden tolerance).
 *
 * Descriptors and the heuristic's algorithm are prepared once per shape and
 * cached in the handle (GEMM_CACHE entries, evicted round-robin), so a
 * sampling loop makes no heuristic queries after its first step.  Each
 * shape tries its epilogues from the most fused down, and whatever the
 * chosen algorithm does not do (bias, GELU) is left to a kernel after it.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"

/* cuBLASLt's workspace: NVIDIA recommends 32 MiB on Hopper. */
#define LT_WORKSPACE_BYTES ((size_t)32 << 20)

lego_status gemm_init(gemm_ctx *g, cudaStream_t stream, lego_err *err) {
    memset(g, 0, sizeof *g);
    g->stream = stream;
    LT_TRY(cublasLtCreate(&g->lt));
    CU_TRY(cudaMalloc(&g->workspace, LT_WORKSPACE_BYTES));
    g->workspace_bytes = LT_WORKSPACE_BYTES;
    g->autotune = 1;
    return LEGO_OK;
}

static void entry_destroy(gemm_entry *e) {
    if (!e->used) return;
    if (e->a) cublasLtMatrixLayoutDestroy(e->a);
    if (e->b) cublasLtMatrixLayoutDestroy(e->b);
    if (e->d) cublasLtMatrixLayoutDestroy(e->d);
    if (e->desc) cublasLtMatmulDescDestroy(e->desc);
    memset(e, 0, sizeof *e);
}

void gemm_destroy(gemm_ctx *g) {
    for (int i = 0; i < GEMM_CACHE; i++) entry_destroy(&g->cache[i]);
    if (g->workspace) cudaFree(g->workspace);
    if (g->lt) cublasLtDestroy(g->lt);
    memset(g, 0, sizeof *g);
}

static int has_bias(cublasLtEpilogue_t e) {
    return e == CUBLASLT_EPILOGUE_BIAS || e == CUBLASLT_EPILOGUE_GELU_BIAS;
}

/* Fill entry `e` for the key (out, rows, in, act, gelu_allowed): layouts,
 * descriptor, and the first epilogue in the list for which the heuristic
 * offers an algorithm.  `bias` is a representative bias pointer (the
 * heuristic reads its alignment, not its contents). */
static lego_status entry_prepare(gemm_ctx *g, gemm_entry *e, uint64_t out, uint64_t rows,
                                 uint64_t in, cudaDataType ab_type, cudaDataType d_type,
                                 gemm_act act, int gelu_allowed, const void *bias,
                                 lego_err *err) {
    memset(e, 0, sizeof *e);
    e->used = 1; /* from here on entry_destroy frees what exists */
    e->out = out;
    e->rows = rows;
    e->in = in;
    e->ab_type = ab_type;
    e->d_type = d_type;
    e->act = act;
    e->gelu_allowed = gelu_allowed;
    LT_TRY(cublasLtMatrixLayoutCreate(&e->a, ab_type, in, out, (int64_t)in));
    LT_TRY(cublasLtMatrixLayoutCreate(&e->b, ab_type, in, rows, (int64_t)in));
    LT_TRY(cublasLtMatrixLayoutCreate(&e->d, d_type, out, rows, (int64_t)out));
    LT_TRY(cublasLtMatmulDescCreate(&e->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    LT_TRY(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    LT_TRY(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));

    cublasLtMatmulPreference_t pref = NULL;
    LT_TRY(cublasLtMatmulPreferenceCreate(&pref));
    uint64_t ws = g->workspace_bytes;
    cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    if (st != CUBLAS_STATUS_SUCCESS) {
        cublasLtMatmulPreferenceDestroy(pref);
        return lt_status(st, err, "cublasLtMatmulPreferenceSetAttribute");
    }

    cublasLtEpilogue_t tries[3];
    int ntries = 0;
    if (act == GEMM_ACT_GELU && gelu_allowed) tries[ntries++] = CUBLASLT_EPILOGUE_GELU_BIAS;
    tries[ntries++] = CUBLASLT_EPILOGUE_BIAS;
    tries[ntries++] = CUBLASLT_EPILOGUE_DEFAULT;
    cublasStatus_t last = CUBLAS_STATUS_NOT_SUPPORTED;
    int found = 0;
    for (int i = 0; i < ntries && !found; i++) {
        cublasLtEpilogue_t epi = tries[i];
        const void *bp = has_bias(epi) ? (const void *)bias : NULL;
        st = cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi,
                                            sizeof epi);
        if (st == CUBLAS_STATUS_SUCCESS)
            st = cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp,
                                                sizeof bp);
        if (st != CUBLAS_STATUS_SUCCESS) {
            cublasLtMatmulPreferenceDestroy(pref);
            return lt_status(st, err, "cublasLtMatmulDescSetAttribute");
        }
        cublasLtMatmulHeuristicResult_t res[GEMM_CANDIDATES];
        int count = 0;
        memset(res, 0, sizeof res);
        st = cublasLtMatmulAlgoGetHeuristic(g->lt, e->desc, e->a, e->b, e->d, e->d, pref,
                                            GEMM_CANDIDATES, res, &count);
        e->num_candidates = 0;
        for (int c = 0; st == CUBLAS_STATUS_SUCCESS && c < count; c++)
            if (res[c].state == CUBLAS_STATUS_SUCCESS && res[c].workspaceSize <= g->workspace_bytes)
                e->candidates[e->num_candidates++] = res[c].algo;
        if (e->num_candidates > 0) {
            e->algo = e->candidates[0];
            e->epilogue = epi;
            e->post_bias = !has_bias(epi);
            e->post_gelu = act == GEMM_ACT_GELU && epi != CUBLASLT_EPILOGUE_GELU_BIAS;
            found = 1;
        } else if (st != CUBLAS_STATUS_SUCCESS) {
            last = st;
        }
    }
    cublasLtMatmulPreferenceDestroy(pref);
    if (!found)
        return lego_fail(err, LEGO_ERR_BACKEND,
                         "cuBLASLt offers no algorithm for a %llu x %llu x %llu GEMM of types "
                         "%d -> %d (%s)",
                         (unsigned long long)rows, (unsigned long long)out,
                         (unsigned long long)in, (int)ab_type, (int)d_type,
                         cublasLtGetStatusString(last));
    return LEGO_OK;
}

static int misaligned(const void *p) { return p && (uintptr_t)p % DEVICE_ALIGN != 0; }

/* The cached entry for a key, preparing it (and evicting another) if new. */
static lego_status entry_for(gemm_ctx *g, uint64_t out, uint64_t rows, uint64_t in,
                             cudaDataType ab_type, cudaDataType d_type, gemm_act act,
                             int gelu_allowed, const void *bias, gemm_entry **found,
                             lego_err *err) {
    for (int i = 0; i < GEMM_CACHE; i++) {
        gemm_entry *e = &g->cache[i];
        if (e->used && e->out == out && e->rows == rows && e->in == in && e->act == (int)act &&
            e->gelu_allowed == gelu_allowed && e->ab_type == ab_type && e->d_type == d_type) {
            *found = e;
            return LEGO_OK;
        }
    }
    gemm_entry *e = NULL;
    for (int i = 0; i < GEMM_CACHE && !e; i++)
        if (!g->cache[i].used) e = &g->cache[i];
    if (!e) {
        e = &g->cache[g->next_evict];
        g->next_evict = (g->next_evict + 1) % GEMM_CACHE;
        entry_destroy(e);
    }
    lego_status s = entry_prepare(g, e, out, rows, in, ab_type, d_type, act, gelu_allowed, bias,
                                  err);
    if (s != LEGO_OK) {
        entry_destroy(e);
        return s;
    }
    *found = e;
    return LEGO_OK;
}

/* Time every candidate of `e` on the call's own operands (a warm-up and
 * three runs each, CUDA events) and keep the fastest.  Any candidate that
 * fails to launch is passed over; the outputs are overwritten by the call
 * that follows anyway. */
static lego_status tune_entry(gemm_ctx *g, gemm_entry *e, const void *w, const void *x, void *y,
                              lego_err *err) {
    cudaEvent_t start = NULL, stop = NULL;
    lego_status s = cu_status(cudaEventCreate(&start), err, "cudaEventCreate");
    if (s == LEGO_OK) s = cu_status(cudaEventCreate(&stop), err, "cudaEventCreate");
    const float alpha = 1.0f, beta = 0.0f;
    float best_ms = 0.0f;
    int best = -1;
    for (int c = 0; s == LEGO_OK && c < e->num_candidates; c++) {
        cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
        for (int run = 0; run < 4 && st == CUBLAS_STATUS_SUCCESS; run++) {
            if (run == 1) cudaEventRecord(start, g->stream);
            st = cublasLtMatmul(g->lt, e->desc, &alpha, w, e->a, x, e->b, &beta, y, e->d, y, e->d,
                                &e->candidates[c], g->workspace, g->workspace_bytes, g->stream);
        }
        if (st != CUBLAS_STATUS_SUCCESS) continue;
        s = cu_status(cudaEventRecord(stop, g->stream), err, "cudaEventRecord");
        if (s == LEGO_OK) s = cu_status(cudaEventSynchronize(stop), err, "a GEMM being timed");
        float ms = 0.0f;
        if (s == LEGO_OK) s = cu_status(cudaEventElapsedTime(&ms, start, stop), err,
                                        "cudaEventElapsedTime");
        if (s == LEGO_OK && (best < 0 || ms < best_ms)) {
            best = c;
            best_ms = ms;
        }
    }
    if (start) cudaEventDestroy(start);
    if (stop) cudaEventDestroy(stop);
    if (s == LEGO_OK && best >= 0) e->algo = e->candidates[best];
    return s;
}

/* gemm_linear with the epilogue choice spelled out; *used (may be NULL)
 * receives the epilogue the GEMM itself applied. */
static lego_status gemm_linear_ex(gemm_ctx *g, const void *w, const void *b, int in, int out,
                                  const void *x, size_t rows, void *y, cudaDataType ab_type,
                                  cudaDataType d_type, gemm_act act, int gelu_allowed,
                                  cublasLtEpilogue_t *used, lego_err *err) {
    if (misaligned(w) || misaligned(b) || misaligned(x) || misaligned(y))
        return lego_fail(err, LEGO_ERR_BACKEND,
                         "internal: a GEMM operand is not %d-byte aligned", DEVICE_ALIGN);
    gemm_entry *e = NULL;
    LEGO_TRY(entry_for(g, (uint64_t)out, (uint64_t)rows, (uint64_t)in, ab_type, d_type, act,
                       gelu_allowed, b, &e, err));
    if (has_bias(e->epilogue)) {
        const void *bp = b;
        LT_TRY(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp,
                                              sizeof bp));
    }
    if (!e->tuned) {
        /* Not while a graph is being captured: nothing runs then. */
        cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
        CU_TRY(cudaStreamIsCapturing(g->stream, &cs));
        if (cs == cudaStreamCaptureStatusNone) {
            double flops = 2.0 * (double)rows * out * in;
            if (g->autotune && e->num_candidates > 1 && flops >= GEMM_TUNE_MIN_FLOPS) {
                LEGO_TRY(tune_entry(g, e, w, x, y, err));
                g->tuned_shapes++;
            }
            e->tuned = 1;
        }
    }
    const float alpha = 1.0f, beta = 0.0f;
    LT_TRY(cublasLtMatmul(g->lt, e->desc, &alpha, w, e->a, x, e->b, &beta, y, e->d, y, e->d,
                          &e->algo, g->workspace, g->workspace_bytes, g->stream));
    if (e->post_bias) LEGO_TRY(k_add_bias(g->stream, y, b, d_type, rows, out, err));
    if (e->post_gelu) LEGO_TRY(k_gelu(g->stream, y, d_type, rows * (size_t)out, err));
    if (used) *used = e->epilogue;
    return LEGO_OK;
}

lego_status gemm_linear(gemm_ctx *g, const void *w, const void *b, int in, int out,
                        const void *x, size_t rows, void *y, cudaDataType ab_type,
                        cudaDataType d_type, gemm_act act, lego_err *err) {
    return gemm_linear_ex(g, w, b, in, out, x, rows, y, ab_type, d_type, act,
                          act == GEMM_ACT_GELU ? g->gelu_epilogue : 0, NULL, err);
}

/* ---- does GELU_BIAS compute the tanh approximation? ---------------------- */

#define PROBE_OUT 256 /* GELU inputs: a ramp over [-8, 8) */
#define PROBE_IN 8
#define PROBE_ROWS 4

static double gelu_tanh_ref(double x) {
    return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)));
}

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
    if (s == LEGO_OK)
        s = gemm_linear_ex(g, dev + w_off, dev + b_off, PROBE_IN, PROBE_OUT, dev + x_off,
                           PROBE_ROWS, dev + y_off, CUDA_R_32F, CUDA_R_32F, GEMM_ACT_GELU, 1,
                           &used, err);
    if (s == LEGO_OK)
        s = cu_status(cudaMemcpyAsync(host + y_off, dev + y_off,
                                      PROBE_OUT * PROBE_ROWS * sizeof(float),
                                      cudaMemcpyDeviceToHost, g->stream),
                      err, "cudaMemcpyAsync (probe)");
    if (s == LEGO_OK) s = cu_status(cudaStreamSynchronize(g->stream), err, "probe GEMM");
    if (s == LEGO_OK && used == CUBLASLT_EPILOGUE_GELU_BIAS) {
        int ok = 1;
        for (int r = 0; r < PROBE_ROWS && ok; r++)
            for (int o = 0; o < PROBE_OUT && ok; o++) {
                double x = host[w_off + (size_t)o * PROBE_IN];
                double want = gelu_tanh_ref(x), got = host[y_off + (size_t)r * PROBE_OUT + o];
                ok = fabs(got - want) <= 1e-5 * fmax(1.0, fabs(want));
            }
        *is_tanh = ok;
    }
    if (dev) cudaFree(dev);
    free(host);
    return s;
}
