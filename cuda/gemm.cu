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
 * sampling loop or a training step makes no heuristic queries after its
 * first.  Each shape tries its epilogues from the most fused down, and
 * whatever the chosen algorithm does not do (bias, GELU) is left to a
 * kernel after it.  gemm_run is the general form (transposes, leading
 * dimensions, strided batches, beta): the trainer's GEMMs and its attention
 * go through it too, with `deterministic` set.  gemm_run_fused is the
 * trainer's way to the epilogues that do more than finish the product
 * (GELU_AUX_BIAS, DGELU, BGRADB): all of it in the GEMM, or nothing and
 * the caller's kernels, never a half that a kernel completes.
 */
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
    if (e->c) cublasLtMatrixLayoutDestroy(e->c);
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
    return e == CUBLASLT_EPILOGUE_BIAS || e == CUBLASLT_EPILOGUE_GELU_BIAS ||
           e == CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
}

/* What CUBLASLT_MATMUL_DESC_BIAS_POINTER holds under epilogue e: the bias
 * read, the bias gradient written, or nothing. */
static const void *bias_pointer(cublasLtEpilogue_t e, const gemm_call *k) {
    if (has_bias(e)) return k->bias;
    return e == CUBLASLT_EPILOGUE_BGRADB ? k->bgrad : NULL;
}

/* Whether k asks for one of gemm_run_fused's fusions. */
static int is_fused(const gemm_call *k) {
    return k->act == GEMM_ACT_GELU_AUX || k->act == GEMM_ACT_DGELU || k->bgrad != NULL;
}

/* The alignment (a power of two, at most DEVICE_ALIGN) that a pointer and
 * every matrix of its batch keep. */
static uint32_t alignment(const void *p, int batch, int64_t stride, size_t elem) {
    uintptr_t v = (uintptr_t)p | DEVICE_ALIGN;
    if (batch > 1) v |= (uintptr_t)stride * elem;
    return (uint32_t)(v & (~v + 1));
}

static lego_status set_batch(cublasLtMatrixLayout_t l, int batch, int64_t stride, lego_err *err) {
    if (batch <= 1) return LEGO_OK;
    int32_t count = batch;
    LT_TRY(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count,
                                            sizeof count));
    LT_TRY(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                            &stride, sizeof stride));
    return LEGO_OK;
}

/* The preference of a shape: the workspace, and the operands' alignment
 * where it is below the DEVICE_ALIGN the heuristic assumes by default (a
 * head's columns inside a token matrix). */
static cublasStatus_t make_preference(const gemm_ctx *g, const uint32_t align[4],
                                      cublasLtMatmulPreference_t *out) {
    static const cublasLtMatmulPreferenceAttributes_t align_attr[3] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES};
    cublasLtMatmulPreference_t pref = NULL;
    cublasStatus_t st = cublasLtMatmulPreferenceCreate(&pref);
    uint64_t ws = g->workspace_bytes;
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                  &ws, sizeof ws);
    for (int i = 0; i < 3 && st == CUBLAS_STATUS_SUCCESS; i++)
        if (align[i] < DEVICE_ALIGN)
            st = cublasLtMatmulPreferenceSetAttribute(pref, align_attr[i], &align[i],
                                                      sizeof align[i]);
    /* D is C (in place): the same alignment. */
    if (st == CUBLAS_STATUS_SUCCESS && align[2] < DEVICE_ALIGN)
        st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                  &align[2], sizeof align[2]);
    if (st != CUBLAS_STATUS_SUCCESS && pref) cublasLtMatmulPreferenceDestroy(pref);
    *out = st == CUBLAS_STATUS_SUCCESS ? pref : NULL;
    return st;
}

/* Fill entry `e` for call k: layouts, descriptor, and the first epilogue in
 * the list (GELU+bias, bias, none) for which the heuristic offers an
 * algorithm.  The bias pointer is a representative one (the heuristic
 * reads its alignment, not its contents). */
static lego_status entry_prepare(gemm_ctx *g, gemm_entry *e, const gemm_call *k, int beta_one,
                                 int gelu_allowed, const uint32_t align[4], lego_err *err) {
    memset(e, 0, sizeof *e);
    e->used = 1; /* from here on entry_destroy frees what exists */
    e->key = *k;
    e->beta_one = beta_one;
    e->gelu_allowed = gelu_allowed;
    memcpy(e->align, align, sizeof e->align);
    LT_TRY(cublasLtMatrixLayoutCreate(&e->a, k->ab, k->ta ? k->K : k->M, k->ta ? k->M : k->K,
                                      k->lda));
    LT_TRY(cublasLtMatrixLayoutCreate(&e->b, k->ab, k->tb ? k->N : k->K, k->tb ? k->K : k->N,
                                      k->ldb));
    LT_TRY(cublasLtMatrixLayoutCreate(&e->c, k->dt, k->M, k->N, k->ldc));
    LEGO_TRY(set_batch(e->a, k->batch, k->sa, err));
    LEGO_TRY(set_batch(e->b, k->batch, k->sb, err));
    LEGO_TRY(set_batch(e->c, k->batch, k->sc, err));
    LT_TRY(cublasLtMatmulDescCreate(&e->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t opa = k->ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasOperation_t opb = k->tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    LT_TRY(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa));
    LT_TRY(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb));

    cublasLtMatmulPreference_t pref = NULL;
    cublasStatus_t st = make_preference(g, align, &pref);
    if (st != CUBLAS_STATUS_SUCCESS) return lt_status(st, err, "cuBLASLt GEMM preference");

    /* A fusion has its one epilogue (no bias with DGELU or BGRADB: a
     * weight gradient's GEMM reads none); the rest go from the most fused
     * down to what kernels can complete. */
    cublasLtEpilogue_t tries[3];
    int ntries = 0;
    if (k->act == GEMM_ACT_GELU_AUX && k->bias && k->aux) {
        tries[ntries++] = CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
    } else if (k->act == GEMM_ACT_DGELU && k->aux && !k->bias && !k->bgrad) {
        tries[ntries++] = CUBLASLT_EPILOGUE_DGELU;
    } else if (k->bgrad && k->act == GEMM_ACT_NONE && !k->bias && k->dt == CUDA_R_32F) {
        tries[ntries++] = CUBLASLT_EPILOGUE_BGRADB;
    } else if (is_fused(k)) {
        cublasLtMatmulPreferenceDestroy(pref);
        return lego_fail(err, LEGO_ERR_BACKEND, "internal: a GEMM fusion of no known form");
    } else {
        if (k->bias && k->act == GEMM_ACT_GELU && gelu_allowed)
            tries[ntries++] = CUBLASLT_EPILOGUE_GELU_BIAS;
        if (k->bias) tries[ntries++] = CUBLASLT_EPILOGUE_BIAS;
        tries[ntries++] = CUBLASLT_EPILOGUE_DEFAULT;
    }
    if (k->aux) {
        st = cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                                            &k->aux, sizeof k->aux);
        if (st == CUBLAS_STATUS_SUCCESS)
            st = cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                                                &k->ldaux, sizeof k->ldaux);
        if (st != CUBLAS_STATUS_SUCCESS) {
            cublasLtMatmulPreferenceDestroy(pref);
            return lt_status(st, err, "cublasLtMatmulDescSetAttribute (aux)");
        }
    }
    cublasStatus_t last = CUBLAS_STATUS_NOT_SUPPORTED;
    int found = 0;
    for (int i = 0; i < ntries && !found; i++) {
        cublasLtEpilogue_t epi = tries[i];
        const void *bp = bias_pointer(epi, k);
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
        st = cublasLtMatmulAlgoGetHeuristic(g->lt, e->desc, e->a, e->b, e->c, e->c, pref,
                                            GEMM_CANDIDATES, res, &count);
        e->num_candidates = 0;
        for (int c = 0; st == CUBLAS_STATUS_SUCCESS && c < count; c++)
            if (res[c].state == CUBLAS_STATUS_SUCCESS && res[c].workspaceSize <= g->workspace_bytes)
                e->candidates[e->num_candidates++] = res[c].algo;
        if (e->num_candidates > 0) {
            e->algo = e->candidates[0];
            e->epilogue = epi;
            e->post_bias = k->bias && !has_bias(epi);
            e->post_gelu = k->act == GEMM_ACT_GELU && epi != CUBLASLT_EPILOGUE_GELU_BIAS;
            found = 1;
        } else if (st != CUBLAS_STATUS_SUCCESS) {
            last = st;
        }
    }
    cublasLtMatmulPreferenceDestroy(pref);
    if (!found && is_fused(k)) {
        e->unavailable = 1;
        return LEGO_OK;
    }
    if (!found)
        return lego_fail(err, LEGO_ERR_BACKEND,
                         "cuBLASLt offers no algorithm for a %llu x %llu x %llu GEMM (ops %d%d, "
                         "types %d -> %d, batch %d): %s",
                         (unsigned long long)k->M, (unsigned long long)k->N,
                         (unsigned long long)k->K, k->ta, k->tb, (int)k->ab, (int)k->dt, k->batch,
                         cublasLtGetStatusString(last));
    if ((e->post_bias || e->post_gelu) && (k->ldc != (int64_t)k->M || k->batch > 1))
        return lego_fail(err, LEGO_ERR_BACKEND,
                         "internal: a GEMM whose bias or GELU needs a kernel writes a strided C");
    return LEGO_OK;
}

/* Whether two calls have one shape (pointers and scalars aside). */
static int same_shape(const gemm_call *x, const gemm_call *y) {
    return x->ta == y->ta && x->tb == y->tb && x->M == y->M && x->N == y->N && x->K == y->K &&
           x->lda == y->lda && x->ldb == y->ldb && x->ldc == y->ldc && x->ab == y->ab &&
           x->dt == y->dt && (x->bias != NULL) == (y->bias != NULL) && x->act == y->act &&
           x->batch == y->batch && x->sa == y->sa && x->sb == y->sb && x->sc == y->sc &&
           x->deterministic == y->deterministic && (x->aux != NULL) == (y->aux != NULL) &&
           x->ldaux == y->ldaux && (x->bgrad != NULL) == (y->bgrad != NULL);
}

/* The cached entry for a call, preparing it (and evicting another) if new. */
static lego_status entry_for(gemm_ctx *g, const gemm_call *k, int gelu_allowed,
                             gemm_entry **found, lego_err *err) {
    uint32_t align[4];
    align[0] = alignment(k->A, k->batch, k->sa, dtype_bytes(k->ab));
    align[1] = alignment(k->B, k->batch, k->sb, dtype_bytes(k->ab));
    align[2] = alignment(k->C, k->batch, k->sc, dtype_bytes(k->dt));
    align[3] = k->bias ? alignment(k->bias, 1, 0, dtype_bytes(k->dt)) : DEVICE_ALIGN;
    if (align[3] < DEVICE_ALIGN || alignment(k->aux, 1, 0, 1) < DEVICE_ALIGN ||
        alignment(k->bgrad, 1, 0, 1) < DEVICE_ALIGN)
        return lego_fail(err, LEGO_ERR_BACKEND,
                         "internal: a GEMM bias or epilogue buffer is not %d-byte aligned",
                         DEVICE_ALIGN);
    int beta_one = k->beta != 0.0f;
    for (int i = 0; i < GEMM_CACHE; i++) {
        gemm_entry *e = &g->cache[i];
        if (e->used && e->beta_one == beta_one && e->gelu_allowed == gelu_allowed &&
            same_shape(&e->key, k) && !memcmp(e->align, align, sizeof align)) {
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
    lego_status s = entry_prepare(g, e, k, beta_one, gelu_allowed, align, err);
    if (s != LEGO_OK) {
        entry_destroy(e);
        return s;
    }
    *found = e;
    return LEGO_OK;
}

/* Time every candidate of `e` on the call's own operands (a warm-up and
 * three runs each, CUDA events) and keep the fastest.  Only for beta 0: the
 * output is overwritten by the call that follows anyway.  A candidate that
 * fails to launch is passed over. */
static lego_status tune_entry(gemm_ctx *g, gemm_entry *e, const gemm_call *k, lego_err *err) {
    cudaEvent_t start = NULL, stop = NULL;
    lego_status s = cu_status(cudaEventCreate(&start), err, "cudaEventCreate");
    if (s == LEGO_OK) s = cu_status(cudaEventCreate(&stop), err, "cudaEventCreate");
    const float beta = 0.0f;
    float best_ms = 0.0f;
    int best = -1;
    for (int c = 0; s == LEGO_OK && c < e->num_candidates; c++) {
        cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
        for (int run = 0; run < 4 && st == CUBLAS_STATUS_SUCCESS; run++) {
            if (run == 1) cudaEventRecord(start, g->stream);
            st = cublasLtMatmul(g->lt, e->desc, &k->alpha, k->A, e->a, k->B, e->b, &beta, k->C,
                                e->c, k->C, e->c, &e->candidates[c], g->workspace,
                                g->workspace_bytes, g->stream);
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

/* Run call k on its prepared entry e: this call's epilogue pointers, the
 * first call's timing where it applies, the matmul. */
static lego_status entry_run(gemm_ctx *g, gemm_entry *e, const gemm_call *k, lego_err *err) {
    const void *bp = bias_pointer(e->epilogue, k);
    if (bp)
        LT_TRY(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp,
                                              sizeof bp));
    if (k->aux)
        LT_TRY(cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                                              &k->aux, sizeof k->aux));
    if (!e->tuned) {
        /* Not while a graph is being captured: nothing runs then. */
        cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
        CU_TRY(cudaStreamIsCapturing(g->stream, &cs));
        if (cs == cudaStreamCaptureStatusNone) {
            double flops = 2.0 * (double)k->M * k->N * k->K * (k->batch > 1 ? k->batch : 1);
            if (g->autotune && !k->deterministic && k->beta == 0.0f && e->num_candidates > 1 &&
                flops >= GEMM_TUNE_MIN_FLOPS) {
                LEGO_TRY(tune_entry(g, e, k, err));
                g->tuned_shapes++;
            }
            e->tuned = 1;
        }
    }
    LT_TRY(cublasLtMatmul(g->lt, e->desc, &k->alpha, k->A, e->a, k->B, e->b, &k->beta, k->C, e->c,
                          k->C, e->c, &e->algo, g->workspace, g->workspace_bytes, g->stream));
    return LEGO_OK;
}

lego_status gemm_run_ex(gemm_ctx *g, const gemm_call *k, int gelu_allowed,
                        cublasLtEpilogue_t *used, lego_err *err) {
    if (is_fused(k))
        return lego_fail(err, LEGO_ERR_BACKEND, "internal: a GEMM fusion outside gemm_run_fused");
    gemm_entry *e = NULL;
    LEGO_TRY(entry_for(g, k, gelu_allowed, &e, err));
    LEGO_TRY(entry_run(g, e, k, err));
    if (e->post_bias)
        LEGO_TRY(k_add_bias(g->stream, k->C, k->bias, k->dt, k->N, (int)k->M, err));
    if (e->post_gelu) LEGO_TRY(k_gelu(g->stream, k->C, k->dt, k->N * k->M, err));
    if (used) *used = e->epilogue;
    return LEGO_OK;
}

lego_status gemm_run(gemm_ctx *g, const gemm_call *k, lego_err *err) {
    return gemm_run_ex(g, k, k->act == GEMM_ACT_GELU ? g->gelu_epilogue : 0, NULL, err);
}

/* Which of training's fusions k asks for (GEMM_FUSION_*). */
static unsigned fusion_of(const gemm_call *k) {
    if (k->act == GEMM_ACT_GELU_AUX) return GEMM_FUSION_GELU_AUX;
    return k->act == GEMM_ACT_DGELU ? GEMM_FUSION_DGELU : GEMM_FUSION_BGRADB;
}

lego_status gemm_run_fused(gemm_ctx *g, const gemm_call *k, int *done, lego_err *err) {
    *done = 0;
    if (!is_fused(k)) return lego_fail(err, LEGO_ERR_BACKEND, "internal: no GEMM fusion asked");
    /* The first fused call of an operand type checks the fusions on known
     * operands (gemm_check.cu), unless this is that check's own call. */
    const int ti = k->ab == CUDA_R_32F ? 0 : k->ab == CUDA_R_16BF ? 1 : 2;
    if (!g->fusion_checked[ti] && !g->fusion_checking) {
        /* A check synchronises: none inside a graph capture; until one has
         * run, the kernels do the work. */
        cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
        CU_TRY(cudaStreamIsCapturing(g->stream, &cs));
        if (cs != cudaStreamCaptureStatusNone) {
            g->fused_rejected++;
            return LEGO_OK;
        }
        unsigned bad = 0;
        g->fusion_checking = 1;
        lego_status s = gemm_check_fusions(g, k->ab, &bad, err);
        g->fusion_checking = 0;
        LEGO_TRY(s);
        g->fusion_bad[ti] = (unsigned char)bad;
        g->fusion_checked[ti] = 1;
    }
    if (g->fusion_bad[ti] & fusion_of(k)) {
        g->fused_rejected++;
        return LEGO_OK;
    }
    gemm_entry *e = NULL;
    LEGO_TRY(entry_for(g, k, 0, &e, err));
    if (e->unavailable) {
        g->fused_refused++;
        return LEGO_OK;
    }
    LEGO_TRY(entry_run(g, e, k, err));
    g->fused_runs++;
    *done = 1;
    return LEGO_OK;
}

/* y[rows][out] = x W^T + b as a column-major out x rows C = W^T x. */
static gemm_call linear_call(const void *w, const void *b, int in, int out, const void *x,
                             size_t rows, void *y, cudaDataType ab_type, cudaDataType d_type,
                             gemm_act act) {
    /* Fields in gemm_call's order. */
    gemm_call k = {1, 0, (uint64_t)out, (uint64_t)rows, (uint64_t)in, w, x, y, in, in, out,
                   ab_type, d_type, 1.0f, 0.0f, b, act, 1, 0, 0, 0, 0, NULL, 0, NULL};
    return k;
}

static int misaligned(const void *p) { return p && (uintptr_t)p % DEVICE_ALIGN != 0; }

lego_status gemm_linear(gemm_ctx *g, const void *w, const void *b, int in, int out,
                        const void *x, size_t rows, void *y, cudaDataType ab_type,
                        cudaDataType d_type, gemm_act act, lego_err *err) {
    /* The inference workspace keeps every operand on DEVICE_ALIGN: anything
     * else is a planning bug, not a slower GEMM to accept. */
    if (misaligned(w) || misaligned(b) || misaligned(x) || misaligned(y))
        return lego_fail(err, LEGO_ERR_BACKEND,
                         "internal: a GEMM operand is not %d-byte aligned", DEVICE_ALIGN);
    gemm_call k = linear_call(w, b, in, out, x, rows, y, ab_type, d_type, act);
    return gemm_run(g, &k, err);
}
