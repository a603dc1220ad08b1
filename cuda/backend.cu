/*
 * backend.cu -- the CUDA backend's handle and the denoiser D(x; sigma) on
 * the device.  The C side sees only backend_cuda.h.
 *
 * A handle (one per model) owns:
 *   - a non-blocking stream on its device; everything is enqueued on it,
 *   - a cuBLASLt handle, its workspace and a cache of prepared GEMM shapes,
 *   - a device copy of the weights: every tensor of the parameter table on
 *     its own DEVICE_ALIGN boundary (cuBLASLt's heuristics want 256-byte
 *     aligned operands), refreshed when lego_model.weights_gen moves,
 *   - the request workspace: one allocation carved into the buffers of
 *     model_denoise, sized for the largest request seen so far, so repeated
 *     calls at one size (a sampling loop) allocate nothing,
 *   - a small host staging area for per-image values (c_noise, EDM
 *     coefficients, label rows).
 *
 * cuda_backend_denoise is model_denoise (src/denoise.c) and brick_forward
 * (src/brick.c) step for step, with every brick run as one chunk: the
 * conditioning, the brick stack with skipping, guidance as one batch of 2n,
 * and the EDM scaling.  Per-image scalars that the CPU computes in double
 * (c_in, c_skip, c_out) are computed here on the host with the same
 * expressions and uploaded, so they are bit-identical.
 *
 * Every call selects the handle's device for its duration and restores the
 * caller's current device afterwards.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda_internal.h"

/* ---- errors ----------------------------------------------------------------- */

lego_status cu_status(cudaError_t e, lego_err *err, const char *what) {
    if (e == cudaSuccess) return LEGO_OK;
    lego_status s = e == cudaErrorMemoryAllocation ? LEGO_ERR_OUT_OF_MEMORY : LEGO_ERR_BACKEND;
    return lego_fail(err, s, "CUDA: %s failed: %s (%s)", what, cudaGetErrorString(e),
                     cudaGetErrorName(e));
}

lego_status lt_status(cublasStatus_t st, lego_err *err, const char *what) {
    if (st == CUBLAS_STATUS_SUCCESS) return LEGO_OK;
    lego_status s = st == CUBLAS_STATUS_ALLOC_FAILED ? LEGO_ERR_OUT_OF_MEMORY : LEGO_ERR_BACKEND;
    return lego_fail(err, s, "cuBLASLt: %s failed: %s (%s)", what, cublasLtGetStatusString(st),
                     cublasLtGetStatusName(st));
}

/* ---- the handle --------------------------------------------------------------- */

/* Graphs kept per handle: a sampling loop needs one or two (guided or not,
 * a skipped top brick), a few sizes more fit. */
#define GRAPH_CACHE 8

/* Everything the captured work depends on besides the staged inputs: the
 * request's shape and options, the handle's settings, and every device
 * address a kernel or GEMM was given.  Zero-initialised, compared bytewise. */
typedef struct graph_key {
    int n, nb, hgt, wid, guided, label_rows;
    uint32_t brick_mask;
    float guidance;
    int precision, attn_mode, gelu_epilogue, ln_mode, residual;
    const void *ws, *params, *lp, *freq;
    int lp_type;
} graph_key;

/* Per attention shape, what runs it: 0 our kernels, 1 cuDNN. */
#define ATTN_CHOICES 32
typedef struct attn_choice {
    int used;
    attn_shape shape;
    int mode; /* the attn_mode it was decided under */
    int cudnn;
} attn_choice;

typedef struct graph_entry {
    cudaGraphExec_t exec; /* NULL with `failed`: the key could not be captured */
    graph_key key;
    int failed;
} graph_entry;

typedef struct cuda_handle {
    int device;
    cudaStream_t stream;
    gemm_ctx gemm;
    int gemm_ready;
    int attn_mode; /* attn_mode */
    int ln_mode;   /* LN_TILED or LN_PER_ROW (CUDA_OPT_LAYERNORM) */
    int residual;  /* CUDA_OPT_RESIDUAL: 1 the stream in the operand type */
    int precision; /* cuda_precision */
    int train_attn; /* CUDA_OPT_TRAIN_ATTENTION */
    int train_tune; /* CUDA_OPT_TRAIN_AUTOTUNE */
    int train_epi;  /* CUDA_OPT_TRAIN_EPILOGUES */
    int train_ln_sums; /* CUDA_OPT_TRAIN_LN_SUMS */
    uint64_t ada_stacked; /* brick evaluations with one adaLN GEMM */
    /* Brick k's adaLN weights back to back on the device (ada_back_to_back),
     * decided where the weights are placed. */
    unsigned char ada_flat[LEGO_MAX_BRICKS];

    /* Weights: tensor i of the model's table at params + doff[i], and in
     * bf16/fp16 precision also at lp + doff[i] (2-byte elements; doff is
     * a multiple of DEVICE_ALIGN/2 elements so both copies are aligned). */
    float *params;
    size_t params_capacity; /* floats */
    size_t params_used;     /* floats, padding included */
    void *lp;
    size_t lp_capacity;     /* elements */
    cudaDataType lp_type;   /* CUDA_R_32F: no low-precision copy yet */
    size_t *doff;
    int doff_count;
    int have_weights;
    uint64_t weights_gen;

    /* Time-embedding frequencies, fdim/2 floats, as the CPU computes them. */
    float *freq;
    size_t freq_bytes;

    /* The request workspace. */
    char *ws;
    size_t ws_bytes;

    /* Host staging for per-image values. */
    float *stage;
    size_t stage_floats;

    /* Instantiated graphs of whole network evaluations (see run_graph). */
    int use_graphs;
    graph_entry graphs[GRAPH_CACHE];
    int next_graph;

    uint64_t workspace_allocs, weight_uploads, graph_captures, graph_launches;
    /* Captures that failed (the request itself had run eagerly, so it
     * stands), the last one's message, and cuDNN runs in the capture under
     * way (capture_work drops cuDNN when they may be the cause). */
    uint64_t capture_failures;
    char capture_note[200];
    uint64_t cudnn_captured;

    /* Training on the device (train.cu): activations, gradients, optimiser
     * state; NULL until the first GPU training call. */
    void *train;
    /* The device sampling loop (sampler.cu): its state, and counters. */
    struct cuda_sampler *sampler;
    int device_loop; /* CUDA_OPT_DEVICE_LOOP */
    uint64_t host_copies, syncs, sample_runs, sample_host_copies, sample_syncs;

    /* Long-sequence attention: cuDNN (loaded when first wanted, NULL
     * before), and per shape which implementation runs it (run_attention). */
    struct cudnn_attn *cudnn;
    uint64_t cudnn_generation; /* cudnn_attn_generation when graphs were last valid */
    attn_choice choices[ATTN_CHOICES];
    int next_choice;
    uint64_t attn_tuned;

    /* CUDA_OPT_PROFILE: wall time per part, the clock at the last mark. */
    int profile;
    double profile_ms[CUDA_PROF_PARTS];
    double profile_last;
} cuda_handle;

/* CUDA_OPT_PROFILE: charge the time since the last mark to `part`, after
 * the device has caught up.  Nothing when not profiling. */
static double wall_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec * 1e-6;
}

static void mark(cuda_handle *h, int part) {
    if (!h->profile) return;
    cudaStreamSynchronize(h->stream);
    double now = wall_ms();
    if (part >= 0) h->profile_ms[part] += now - h->profile_last;
    h->profile_last = now;
}

extern "C" int cuda_device_count(void) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        cudaGetLastError(); /* no driver or no device: not an error to keep */
        return 0;
    }
    return count;
}

static void graphs_clear(cuda_handle *h);

static void handle_free(cuda_handle *h) {
    if (!h) return;
    graphs_clear(h);
    train_state_free(h->train);
    sampler_free(h->sampler);
    cudnn_attn_close(h->cudnn);
    if (h->gemm_ready) gemm_destroy(&h->gemm);
    if (h->ws) cudaFree(h->ws);
    if (h->params) cudaFree(h->params);
    if (h->lp) cudaFree(h->lp);
    if (h->freq) cudaFree(h->freq);
    if (h->stream) cudaStreamDestroy(h->stream);
    free(h->doff);
    free(h->stage);
    free(h);
}

extern "C" void cuda_backend_destroy(void *handle) {
    cuda_handle *h = (cuda_handle *)handle;
    if (!h) return;
    device_guard guard(h->device);
    if (h->stream) cudaStreamSynchronize(h->stream);
    handle_free(h);
}

/* Device bytes the handle holds. */
static size_t handle_bytes(const cuda_handle *h) {
    return h->params_capacity * sizeof(float) + h->lp_capacity * 2 + h->ws_bytes +
           h->gemm.workspace_bytes + h->freq_bytes + train_state_bytes(h->train) +
           cudnn_attn_bytes(h->cudnn);
}

/* Whether replacing `old_bytes` of the handle's memory by `new_bytes` stays
 * within the model's device budget. */
static lego_status within_budget(const cuda_handle *h, size_t budget, size_t old_bytes,
                                 size_t new_bytes, const char *what, lego_err *err) {
    size_t held = handle_bytes(h) - old_bytes;
    if (budget == 0 || (new_bytes <= budget && held <= budget - new_bytes)) return LEGO_OK;
    return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY,
                     "backend CUDA: %s needs %zu bytes of GPU memory; with the %zu the model "
                     "keeps, that passes its budget of %zu (lego_model_set_device_memory_budget)",
                     what, new_bytes, held, budget);
}

/* The type of the brick activations (and of the weight copy they multiply)
 * for a precision. */
static cudaDataType precision_type(int precision) {
    return precision == CUDA_PRECISION_BF16   ? CUDA_R_16BF
           : precision == CUDA_PRECISION_FP16 ? CUDA_R_16F
                                              : CUDA_R_32F;
}

/* The bf16/fp16 copy of the weights, converted on the device from the fp32
 * copy, when the precision asks for one and it is missing or stale. */
static lego_status sync_low_precision(cuda_handle *h, const lego_model *m, lego_err *err) {
    cudaDataType want = precision_type(h->precision);
    if (want == CUDA_R_32F || h->lp_type == want) return LEGO_OK;
    h->lp_type = CUDA_R_32F;
    if (h->params_used > h->lp_capacity) {
        LEGO_TRY(within_budget(h, m->device_budget, h->lp_capacity * 2, h->params_used * 2,
                               "the 16-bit copy of the weights", err));
        if (h->lp) cudaFree(h->lp);
        h->lp = NULL;
        h->lp_capacity = 0;
        CU_TRY(cudaMalloc(&h->lp, h->params_used * 2));
        h->lp_capacity = h->params_used;
    }
    LEGO_TRY(k_convert(h->stream, h->params, h->params_used, h->lp, want, err));
    CU_TRY(cudaStreamSynchronize(h->stream));
    h->lp_type = want;
    return LEGO_OK;
}

/* The table entry whose values start at host pointer p (a view into
 * m->params), or -1. */
static int param_slot(const lego_model *m, const float *p) {
    size_t off = (size_t)(p - m->params);
    int lo = 0, hi = m->num_params - 1;
    while (lo <= hi) { /* the table is in increasing offset order */
        int mid = lo + (hi - lo) / 2;
        if (m->table[mid].offset == off) return mid;
        if (m->table[mid].offset < off) lo = mid + 1;
        else hi = mid - 1;
    }
    return -1;
}

/* Device offsets (h->doff) in multiples of `step` elements; returns the
 * total.  Each brick's adaLN linears come first, their weights back to
 * back and then their biases back to back (blocks in order, the final
 * layer's last), so that where no tensor needs padding one GEMM makes all
 * of the brick's modulation vectors (ada_back_to_back); then every other
 * tensor in table order. */
static size_t place_params(cuda_handle *h, const lego_model *m, size_t step,
                           unsigned char *placed) {
    size_t total = 0;
    auto place = [&](int i) {
        if (i < 0 || placed[i]) return;
        placed[i] = 1;
        h->doff[i] = total;
        total += (m->table[i].numel + step - 1) / step * step;
    };
    for (int k = 0; k < m->num_bricks; k++) {
        const brick *b = &m->bricks[k];
        for (int bias = 0; bias < 2; bias++) {
            for (int j = 0; j < b->cfg.depth; j++)
                place(param_slot(m, bias ? b->blocks[j].ada.b : b->blocks[j].ada.w));
            place(param_slot(m, bias ? b->final_ada.b : b->final_ada.w));
        }
    }
    for (int i = 0; i < m->num_params; i++) place(i);
    return total;
}

/* Whether brick b's adaLN linears lie back to back after place_params (no
 * tensor padded): then their weights are one [depth 6D + 2D][D] matrix
 * starting at block 0's, and their biases one vector starting at its. */
static int ada_back_to_back(const cuda_handle *h, const lego_model *m, const brick *b) {
    const size_t D = (size_t)m->cfg.hidden_size, ms = 6 * D;
    if (b->cfg.depth < 1) return 0;
    int w0 = param_slot(m, b->blocks[0].ada.w), b0 = param_slot(m, b->blocks[0].ada.b);
    if (w0 < 0 || b0 < 0) return 0;
    for (int j = 1; j <= b->cfg.depth; j++) {
        const linear *l = j < b->cfg.depth ? &b->blocks[j].ada : &b->final_ada;
        int wj = param_slot(m, l->w), bj = param_slot(m, l->b);
        if (wj < 0 || bj < 0 || h->doff[wj] != h->doff[w0] + (size_t)j * ms * D ||
            h->doff[bj] != h->doff[b0] + (size_t)j * ms)
            return 0;
    }
    return 1;
}

/* Copy the parameter array to the device if it changed since the last
 * upload: every tensor on its own aligned offset. */
static lego_status sync_weights(cuda_handle *h, const lego_model *m, lego_err *err) {
    if (h->have_weights && h->weights_gen == m->weights_gen && h->doff_count == m->num_params)
        return sync_low_precision(h, m, err);
    if (h->doff_count != m->num_params) {
        size_t *d = (size_t *)realloc(h->doff, (size_t)(m->num_params ? m->num_params : 1) *
                                                   sizeof *d);
        if (!d) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
        h->doff = d;
        h->doff_count = m->num_params;
    }
    /* Offsets in multiples of DEVICE_ALIGN / 2 elements: DEVICE_ALIGN bytes
     * apart in the 2-byte copy, twice that in the fp32 one. */
    const size_t step = DEVICE_ALIGN / 2;
    size_t count = (size_t)(m->num_params ? m->num_params : 1);
    unsigned char *placed = (unsigned char *)calloc(count, 1);
    if (!placed) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    size_t total = place_params(h, m, step, placed);
    free(placed);
    for (int k = 0; k < m->num_bricks; k++)
        h->ada_flat[k] = (unsigned char)ada_back_to_back(h, m, &m->bricks[k]);
    if (total == 0) total = step;
    h->have_weights = 0;
    h->lp_type = CUDA_R_32F;
    graphs_clear(h); /* the weights may move, or the model have changed shape */
    if (total > h->params_capacity) {
        LEGO_TRY(within_budget(h, m->device_budget, h->params_capacity * sizeof(float),
                               total * sizeof(float), "the weights", err));
        if (h->params) cudaFree(h->params);
        h->params = NULL;
        h->params_capacity = 0;
        CU_TRY(cudaMalloc(&h->params, total * sizeof(float)));
        h->params_capacity = total;
    }
    for (int i = 0; i < m->num_params; i++) {
        const lego_param *p = &m->table[i];
        CU_TRY(cudaMemcpyAsync(h->params + h->doff[i], m->params + p->offset,
                               p->numel * sizeof(float), cudaMemcpyHostToDevice, h->stream));
    }
    CU_TRY(cudaStreamSynchronize(h->stream));
    h->host_copies += (uint64_t)m->num_params;
    h->params_used = total;
    h->have_weights = 1;
    h->weights_gen = m->weights_gen;
    h->weight_uploads++;
    return sync_low_precision(h, m, err);
}

/* The device address, in the copy of type `type` (fp32 or the low-precision
 * one), of the tensor that host pointer `p` (a view into m->params, always
 * the start of a table entry) names. */
static const void *dev_param_as(const cuda_handle *h, const lego_model *m, const float *p,
                                cudaDataType type) {
    int i = param_slot(m, p);
    if (i < 0) return NULL;
    if (type == CUDA_R_32F) return h->params + h->doff[i];
    return type == h->lp_type ? (const char *)h->lp + h->doff[i] * 2 : NULL;
}

static const float *dev_param(const cuda_handle *h, const lego_model *m, const float *p) {
    return (const float *)dev_param_as(h, m, p, CUDA_R_32F);
}

extern "C" lego_status cuda_backend_create(const lego_model *m, int device, void **out,
                                           lego_err *err) {
    *out = NULL;
    int count = 0;
    cudaError_t ce = cudaGetDeviceCount(&count);
    if (ce != cudaSuccess || count == 0) {
        cudaGetLastError();
        return lego_fail(err, LEGO_ERR_UNSUPPORTED, "backend CUDA: no CUDA device is available%s%s",
                         ce != cudaSuccess ? ": " : "",
                         ce != cudaSuccess ? cudaGetErrorString(ce) : "");
    }
    if (device < 0 || device >= count)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                         "backend CUDA: device %d does not exist (%d present)", device, count);
    int head_dim = m->cfg.hidden_size / m->cfg.num_heads;
    if (head_dim > ATTN_MAX_HEAD_DIM)
        return lego_fail(err, LEGO_ERR_UNSUPPORTED,
                         "backend CUDA: head dimension %d is above the %d the attention kernels "
                         "take", head_dim, ATTN_MAX_HEAD_DIM);

    device_guard guard(device);
    CU_TRY(guard.status);
    cuda_handle *h = (cuda_handle *)calloc(1, sizeof *h);
    if (!h) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    h->device = device;
    /* lego_precision and cuda_precision number their values alike. */
    h->precision = (int)m->cfg.precision;
    h->use_graphs = 1;
    h->device_loop = 1;

    lego_status s = cu_status(cudaStreamCreateWithFlags(&h->stream, cudaStreamNonBlocking), err,
                              "cudaStreamCreateWithFlags");
    if (s == LEGO_OK) {
        s = gemm_init(&h->gemm, h->stream, err);
        h->gemm_ready = 1; /* gemm_destroy copes with a partial init */
    }

    /* f_i = exp(-ln(10000) i / half) exactly as denoise.c's float code. */
    int half = m->cfg.frequency_embedding_size / 2;
    float *freq = (float *)malloc((size_t)half * sizeof *freq);
    if (s == LEGO_OK && !freq) s = lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    if (s == LEGO_OK) {
        for (int i = 0; i < half; i++) freq[i] = expf(-9.21034037f * (float)i / (float)half);
        s = cu_status(cudaMalloc(&h->freq, (size_t)half * sizeof(float)), err, "cudaMalloc");
        if (s == LEGO_OK) h->freq_bytes = (size_t)half * sizeof(float);
    }
    if (s == LEGO_OK)
        s = cu_status(cudaMemcpy(h->freq, freq, (size_t)half * sizeof(float),
                                 cudaMemcpyHostToDevice),
                      err, "cudaMemcpy (frequencies)");
    free(freq);

    int is_tanh = 0;
    if (s == LEGO_OK) s = gemm_probe_gelu(&h->gemm, &is_tanh, err);
    h->gemm.gelu_epilogue = is_tanh;
    h->train_epi = 1;
    h->train_ln_sums = 1;
    if (s == LEGO_OK) s = sync_weights(h, m, err);
    if (s != LEGO_OK) {
        if (h->stream) cudaStreamSynchronize(h->stream);
        handle_free(h);
        return s;
    }
    *out = h;
    return LEGO_OK;
}

extern "C" size_t cuda_backend_memory(const lego_model *m) {
    const cuda_handle *h = m ? (const cuda_handle *)m->cuda : NULL;
    return h ? handle_bytes(h) : 0;
}

extern "C" lego_status cuda_backend_stats(const lego_model *m, cuda_stats *out) {
    if (!m || !out) return LEGO_ERR_INVALID_ARGUMENT;
    const cuda_handle *h = (const cuda_handle *)m->cuda;
    if (!h) return LEGO_ERR_STATE;
    memset(out, 0, sizeof *out);
    out->device = h->device;
    out->workspace_allocs = h->workspace_allocs;
    out->workspace_bytes = h->ws_bytes;
    out->weight_uploads = h->weight_uploads;
    out->gelu_epilogue = h->gemm.gelu_epilogue;
    out->flash_only = h->attn_mode == ATTN_FLASH_ONLY;
    out->attn_mode = h->attn_mode;
    out->graphs = h->use_graphs;
    out->graph_captures = h->graph_captures;
    out->graph_launches = h->graph_launches;
    out->capture_failures = h->capture_failures;
    memcpy(out->capture_note, h->capture_note, sizeof out->capture_note);
    out->tuned_shapes = h->gemm.tuned_shapes;
    for (int i = 0; i < CUDA_PROF_PARTS; i++) out->profile_ms[i] = h->profile_ms[i];
    out->precision = h->precision;
    out->host_copies = h->host_copies;
    out->sample_runs = h->sample_runs;
    out->sample_host_copies = h->sample_host_copies;
    out->sample_syncs = h->sample_syncs;
    sampler_graph_counts(h->sampler, &out->step_graph_captures, &out->step_graph_launches);
    out->device_loop = h->device_loop;
    out->ln_mode = h->ln_mode;
    out->residual = h->residual;
    out->fused_runs = h->gemm.fused_runs;
    out->fused_refused = h->gemm.fused_refused;
    out->fused_rejected = h->gemm.fused_rejected;
    memcpy(out->fusion_note, h->gemm.fusion_note, sizeof out->fusion_note);
    memcpy(out->gelu_note, h->gemm.gelu_note, sizeof out->gelu_note);
    out->ada_stacked = h->ada_stacked;
    cudnn_attn_info ci;
    cudnn_attn_get_info(h->cudnn, &ci);
    out->cudnn_available = ci.available;
    out->cudnn_version = ci.version;
    out->cudnn_plans = ci.plans;
    out->cudnn_runs = ci.runs;
    out->cudnn_last_graph = ci.last_graph;
    memcpy(out->cudnn_note, ci.note, sizeof out->cudnn_note);
    out->attn_timed = h->attn_tuned;
    for (int i = 0; i < ATTN_CHOICES; i++) {
        out->attn_decided += (uint64_t)h->choices[i].used;
        out->attn_cudnn_shapes += (uint64_t)(h->choices[i].used && h->choices[i].cudnn);
    }
    return LEGO_OK;
}

extern "C" lego_status cuda_backend_set_option(lego_model *m, cuda_option option, int value) {
    if (!m) return LEGO_ERR_INVALID_ARGUMENT;
    cuda_handle *h = (cuda_handle *)m->cuda;
    if (!h) return lego_fail(&m->err, LEGO_ERR_STATE, "the model is not on the CUDA backend");
    switch (option) {
    case CUDA_OPT_GELU_EPILOGUE:
        h->gemm.gelu_epilogue = value != 0;
        return LEGO_OK;
    case CUDA_OPT_FLASH_ONLY:
        h->attn_mode = value ? ATTN_FLASH_ONLY : ATTN_AUTO;
        return LEGO_OK;
    case CUDA_OPT_ATTENTION:
        if (value < ATTN_AUTO || value > ATTN_OWN)
            return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "unknown attention mode %d",
                             value);
        h->attn_mode = value;
        return LEGO_OK;
    case CUDA_OPT_GRAPHS:
        h->use_graphs = value != 0;
        return LEGO_OK;
    case CUDA_OPT_LAYERNORM:
        if (value != LN_TILED && value != LN_PER_ROW)
            return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "unknown LayerNorm mode %d",
                             value);
        h->ln_mode = value;
        return LEGO_OK;
    case CUDA_OPT_RESIDUAL:
        if (value != 0 && value != 1)
            return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "unknown residual mode %d",
                             value);
        h->residual = value;
        return LEGO_OK;
    case CUDA_OPT_TRAIN_AUTOTUNE:
        h->train_tune = value != 0;
        return LEGO_OK;
    case CUDA_OPT_TRAIN_EPILOGUES:
        h->train_epi = value != 0;
        return LEGO_OK;
    case CUDA_OPT_TRAIN_LN_SUMS:
        h->train_ln_sums = value != 0;
        return LEGO_OK;
    case CUDA_OPT_TRAIN_ATTENTION:
        if (value < 0 || value > 4)
            return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT,
                             "unknown training attention mode %d", value);
        h->train_attn = value;
        return LEGO_OK;
    case CUDA_OPT_AUTOTUNE:
        h->gemm.autotune = value != 0;
        return LEGO_OK;
    case CUDA_OPT_DEVICE_LOOP:
        h->device_loop = value != 0;
        return LEGO_OK;
    case CUDA_OPT_PROFILE:
        if (value == 2) memset(h->profile_ms, 0, sizeof h->profile_ms);
        h->profile = value != 0;
        return LEGO_OK;
    case CUDA_OPT_PRECISION:
        if (value != CUDA_PRECISION_FP32 && value != CUDA_PRECISION_BF16 &&
            value != CUDA_PRECISION_FP16)
            return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "unknown CUDA precision %d",
                             value);
        h->precision = value; /* the low-precision weights follow at the next call */
        return LEGO_OK;
    }
    return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT, "unknown CUDA option %d", (int)option);
}

/* ---- the workspace ------------------------------------------------------------- */

/* The device buffers of one request (n images, nb = n or 2n with
 * guidance), each starting on DEVICE_ALIGN. */
typedef struct ws_layout {
    float *c_noise; /* nb                          */
    float *coef;    /* n x {c_in, c_skip, c_out}   */
    float *labels;  /* nb x L                      */
    float *emb;     /* nb x fdim                   */
    float *hid;     /* nb x D                      */
    float *cond;    /* nb x D                      */
    float *silu_c;  /* nb x D                      */
    float *x;       /* n x chw, the caller's x     */
    float *xin;     /* nb x chw, c_in * x          */
    float *fa, *fb; /* nb x chw, brick outputs     */
    float *mix;     /* n x chw, a guided output    */
    float *out;     /* n x chw, D(x; sigma)        */
    float *mods;    /* adaLN vectors, slots below  */
    size_t mod_slot;/* floats per (block or final layer) slot, aligned */
    float *tx;      /* rows x D: the residual stream (fp32, or T)   */
    float *th;      /* rows x D: LayerNorm / attention output (T)   */
    float *ty;      /* rows x D: proj and fc2 outputs (T)           */
    float *wide;    /* rows x widest: GEMM inputs and outputs (T or fp32) */
    size_t bytes;
} ws_layout;

static size_t brick_rows(const brick *b, int nb, int h, int w) {
    size_t per_image = (size_t)(h / b->cfg.brick_size) * (size_t)(w / b->cfg.brick_size) *
                       (size_t)b->tokens;
    return (size_t)nb * per_image;
}

/* The next buffer of `floats` (at least one) from `base` at *used
 * (NULL when only counting), and the count moved past it, aligned. */
static float *carve(float *base, size_t *used, size_t floats) {
    float *p = base ? base + *used : NULL;
    *used += round_up_floats(floats > 0 ? floats : 1);
    return p;
}

/* Carve the buffers out of `base` (NULL: only count).  Sizes are bounded by
 * model_denoise_floats, checked before. */
static void plan_layout(const lego_model *m, int n, int nb, int h, int w, char *base,
                        ws_layout *l) {
    size_t D = (size_t)m->cfg.hidden_size, L = (size_t)m->cfg.label_dim;
    size_t fdim = (size_t)m->cfg.frequency_embedding_size;
    size_t chw = (size_t)m->cfg.img_channels * (size_t)h * (size_t)w;
    size_t mod_slots = 0, tok = 0, wide = 0;
    for (int k = 0; k < m->num_bricks; k++) {
        const brick *b = &m->bricks[k];
        size_t rows = brick_rows(b, nb, h, w);
        if ((size_t)b->cfg.depth + 1 > mod_slots) mod_slots = (size_t)b->cfg.depth + 1;
        if (rows * D > tok) tok = rows * D;
        size_t row_wide = model_widest_activation(m, b);
        if (rows * row_wide > wide) wide = rows * row_wide;
    }
    l->mod_slot = round_up_floats((size_t)nb * 6 * D);
    size_t used = 0; /* floats */
    float *f = (float *)base;
#define CARVE(field, floats) l->field = carve(f, &used, (floats))
    CARVE(c_noise, (size_t)nb);
    CARVE(coef, 3 * (size_t)n);
    CARVE(labels, (size_t)nb * L);
    CARVE(emb, (size_t)nb * fdim);
    CARVE(hid, (size_t)nb * D);
    CARVE(cond, (size_t)nb * D);
    CARVE(silu_c, (size_t)nb * D);
    CARVE(x, (size_t)n * chw);
    CARVE(xin, (size_t)nb * chw);
    CARVE(fa, (size_t)nb * chw);
    CARVE(fb, (size_t)nb * chw);
    CARVE(mix, (size_t)n * chw);
    CARVE(out, (size_t)n * chw);
    CARVE(mods, mod_slots * l->mod_slot);
    CARVE(tx, tok);
    CARVE(th, tok);
    CARVE(ty, tok);
    CARVE(wide, wide);
#undef CARVE
    l->bytes = used * sizeof(float);
}

/* Grow the workspace to `bytes` if it is smaller; never shrinks. */
static lego_status reserve_workspace(cuda_handle *h, const lego_model *m, size_t bytes,
                                     lego_err *err) {
    if (bytes <= h->ws_bytes) return LEGO_OK;
    LEGO_TRY(within_budget(h, m->device_budget, h->ws_bytes, bytes, "the request's workspace",
                           err));
    if (h->ws) {
        /* Work queued on the old buffer must finish before it goes, and
         * the graphs that use it with it. */
        CU_TRY(cudaStreamSynchronize(h->stream));
        graphs_clear(h);
        cudaFree(h->ws);
    }
    h->ws = NULL;
    h->ws_bytes = 0;
    CU_TRY(cudaMalloc(&h->ws, bytes));
    h->ws_bytes = bytes;
    h->workspace_allocs++;
    return LEGO_OK;
}

static lego_status reserve_stage(cuda_handle *h, size_t floats, lego_err *err) {
    if (floats <= h->stage_floats) return LEGO_OK;
    float *s = (float *)realloc(h->stage, floats * sizeof *s);
    if (!s) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory for staging");
    h->stage = s;
    h->stage_floats = floats;
    return LEGO_OK;
}

/* ---- the forward pass ------------------------------------------------------------ */

/* y = x W^T + b for a linear layer: x (and so W) of type x_type, y (and so
 * the bias) of type y_type; the weights come from the matching copy. */
static lego_status linear_fwd(cuda_handle *h, const lego_model *m, const linear *l,
                              const void *x, cudaDataType x_type, size_t rows, void *y,
                              cudaDataType y_type, gemm_act act, lego_err *err) {
    const void *w = dev_param_as(h, m, l->w, x_type), *b = dev_param_as(h, m, l->b, y_type);
    if (!w || !b)
        return lego_fail(err, LEGO_ERR_BACKEND, "internal: a weight is not in the device table");
    return gemm_linear(&h->gemm, w, b, l->in, l->out, x, rows, y, x_type, y_type, act, err);
}

/* The same for the fp32 conditioning path. */
static lego_status linear_f32(cuda_handle *h, const lego_model *m, const linear *l,
                              const float *x, size_t rows, float *y, lego_err *err) {
    return linear_fwd(h, m, l, x, CUDA_R_32F, rows, y, CUDA_R_32F, GEMM_ACT_NONE, err);
}

/* ---- attention: our kernels or cuDNN ------------------------------------------- */

/* Milliseconds per call of `run` on the handle's stream: a warm-up, then
 * three runs between CUDA events.  A failed run gives *ms = -1. */
template <class F>
static lego_status time_runs(cuda_handle *h, F run, float *ms, lego_err *err) {
    *ms = -1.0f;
    cudaEvent_t start = NULL, stop = NULL;
    lego_status s = cu_status(cudaEventCreate(&start), err, "cudaEventCreate");
    if (s == LEGO_OK) s = cu_status(cudaEventCreate(&stop), err, "cudaEventCreate");
    bool ran = s == LEGO_OK;
    for (int i = 0; ran && i < 4; i++) {
        if (i == 1) s = cu_status(cudaEventRecord(start, h->stream), err, "cudaEventRecord");
        ran = s == LEGO_OK && run() == LEGO_OK;
    }
    if (ran) s = cu_status(cudaEventRecord(stop, h->stream), err, "cudaEventRecord");
    if (ran && s == LEGO_OK) s = cu_status(cudaEventSynchronize(stop), err, "attention being timed");
    if (ran && s == LEGO_OK) {
        s = cu_status(cudaEventElapsedTime(ms, start, stop), err, "cudaEventElapsedTime");
        *ms /= 3.0f;
    }
    if (start) cudaEventDestroy(start);
    if (stop) cudaEventDestroy(stop);
    return s;
}

/* Decide, at a shape's first use (never during capture), whether cuDNN
 * runs it: under ATTN_CUDNN whenever cuDNN takes the shape; under ATTN_AUTO
 * when it also measured faster than our kernel on these very operands (both
 * write the same output, which the caller's run overwrites). */
template <class T>
static lego_status attn_decide(cuda_handle *h, const lego_model *m, const attn_shape *sh,
                               const T *qkv, T *out, attn_choice *c, lego_err *err) {
    memset(c, 0, sizeof *c);
    c->shape = *sh;
    c->mode = h->attn_mode;
    if (!h->cudnn) LEGO_TRY(cudnn_attn_open(h->stream, &h->cudnn, err));
    size_t held = handle_bytes(h), budget = m->device_budget;
    size_t room = budget == 0 ? SIZE_MAX : budget > held ? budget - held : 0;
    int ok = cudnn_attn_prepare(h->cudnn, sh, room);
    if (cudnn_attn_generation(h->cudnn) != h->cudnn_generation) {
        graphs_clear(h); /* they may replay a dropped plan or a moved workspace */
        h->cudnn_generation = cudnn_attn_generation(h->cudnn);
    }
    c->cudnn = ok;
    if (ok && h->attn_mode == ATTN_AUTO) {
        lego_err scratch = {LEGO_OK, ""}; /* a failing cuDNN run only rules it out */
        float ms_own = 0.0f, ms_cudnn = 0.0f;
        LEGO_TRY(time_runs(h, [&] {
            return k_attention<T>(h->stream, qkv, sh->seqs, sh->tokens, sh->heads, sh->head_dim,
                                  out, ATTN_AUTO, err);
        }, &ms_own, err));
        LEGO_TRY(time_runs(h, [&] {
            return cudnn_attn_run(h->cudnn, sh, qkv, out, &scratch);
        }, &ms_cudnn, err));
        c->cudnn = ms_cudnn >= 0.0f && ms_cudnn < ms_own;
        h->attn_tuned++;
    }
    c->used = 1;
    return LEGO_OK;
}

/* One block's attention (the k_attention contract).  Sequences longer than
 * the short kernels take may go to cuDNN: under ATTN_CUDNN, or under
 * ATTN_AUTO with tuning on (CUDA_OPT_AUTOTUNE) where it measured faster.
 * The choice is made once per shape, so captured graphs repeat it. */
template <class T>
static lego_status run_attention(cuda_handle *h, const lego_model *m, const T *qkv, size_t seqs,
                                 int tokens, int heads, int head_dim, T *out, lego_err *err) {
    const attn_shape sh = {seqs, tokens, heads, head_dim, lt_type<T>::value};
    const int mode = h->attn_mode;
    const bool candidate = (mode == ATTN_CUDNN || (mode == ATTN_AUTO && h->gemm.autotune)) &&
                           tokens > ATTN_SHORT_MAX_TOKENS && cudnn_attn_supports(&sh);
    const attn_choice *c = NULL;
    for (int i = 0; candidate && i < ATTN_CHOICES && !c; i++)
        if (h->choices[i].used && h->choices[i].mode == mode &&
            attn_shape_equal(&h->choices[i].shape, &sh))
            c = &h->choices[i];
    if (candidate && !c) {
        cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
        CU_TRY(cudaStreamIsCapturing(h->stream, &cs));
        if (cs == cudaStreamCaptureStatusNone) {
            attn_choice *slot = &h->choices[h->next_choice];
            h->next_choice = (h->next_choice + 1) % ATTN_CHOICES;
            LEGO_TRY(attn_decide<T>(h, m, &sh, qkv, out, slot, err));
            c = slot;
        }
    }
    if (c && c->cudnn) {
        h->cudnn_captured++; /* counted while capturing only: reset at each capture */
        return cudnn_attn_run(h->cudnn, &sh, qkv, out, err);
    }
    return k_attention<T>(h->stream, qkv, seqs, tokens, heads, head_dim, out, mode, err);
}

/* F_k for nb images: brick.c's brick_forward with the whole batch as one
 * chunk.  T is the type of the GEMM inputs and outputs inside the blocks
 * and of the attention operands (as under the reference's autocast); R
 * the residual stream's (fp32, or T with CUDA_OPT_RESIDUAL); LayerNorm
 * statistics and adaLN vectors are fp32. */
template <class T, class R>
static lego_status brick_fwd(cuda_handle *h, const lego_model *m, int k, int nb, int hgt, int wid,
                             const ws_layout *l, const float *below, float *out, lego_err *err) {
    const cudaDataType tt = lt_type<T>::value, f32 = CUDA_R_32F;
    const brick *b = &m->bricks[k];
    cudaStream_t s = h->stream;
    int D = m->cfg.hidden_size, heads = m->cfg.num_heads;
    size_t d = (size_t)D, ms = 6 * d, depth = (size_t)b->cfg.depth;

    tok_geom g = brick_geometry(m, k, nb, hgt, wid);
    size_t rows = g.rows, rpi = g.rows_per_image;

    /* adaLN vectors per image, block j's 6D (shift_msa scale_msa gate_msa
     * shift_mlp scale_mlp gate_mlp) at mods + j * slot, the final layer's
     * 2D (shift scale) at final_mod, image i's mstride (fstride) floats
     * further: one GEMM for them all where the weights lie back to back
     * ([nb][depth 6D + 2D]), else a GEMM per linear into slots. */
    mark(h, -1);
    size_t mstride = ms, fstride = 2 * d, slot = l->mod_slot;
    if (h->ada_flat[k]) {
        const float *ada_w = dev_param(h, m, b->blocks[0].ada.w);
        const float *ada_b = dev_param(h, m, b->blocks[0].ada.b);
        if (!ada_w || !ada_b)
            return lego_fail(err, LEGO_ERR_BACKEND, "internal: adaLN weights not on the device");
        mstride = fstride = depth * ms + 2 * d;
        slot = ms;
        LEGO_TRY(gemm_linear(&h->gemm, ada_w, ada_b, D, (int)mstride, l->silu_c, (size_t)nb,
                             l->mods, f32, f32, GEMM_ACT_NONE, err));
        h->ada_stacked++;
    } else {
        for (size_t j = 0; j < depth; j++)
            LEGO_TRY(linear_f32(h, m, &b->blocks[j].ada, l->silu_c, (size_t)nb,
                                l->mods + j * slot, err));
        LEGO_TRY(linear_f32(h, m, &b->final_ada, l->silu_c, (size_t)nb, l->mods + depth * slot,
                            err));
    }
    float *final_mod = l->mods + depth * slot;
    mark(h, CUDA_PROF_ADALN);

    /* Patch embedding; the position embedding is added by the first
     * LayerNorm, which reads the row anyway. */
    T *th = (T *)l->th, *ty = (T *)l->ty, *wide = (T *)l->wide;
    LEGO_TRY(k_gather<T>(s, &g, NULL, l->xin, below, wide, err));
    R *tx = (R *)l->tx;
    LEGO_TRY(linear_fwd(h, m, &b->embed, wide, tt, rows, tx, lt_type<R>::value, GEMM_ACT_NONE,
                        err));
    mark(h, CUDA_PROF_GATHER);
    const float *pos = dev_param(h, m, b->pos_embed);
    if (!pos) return lego_fail(err, LEGO_ERR_BACKEND, "internal: pos_embed not on the device");
    LEGO_TRY((k_layernorm_modulate<T, R>)(s, tx, pos, b->tokens, rows, D, rpi, l->mods,
                                     l->mods + d, mstride, th, h->ln_mode, err));
    mark(h, CUDA_PROF_LAYERNORM);

    for (size_t j = 0; j < depth; j++) {
        const dit_block *blk = &b->blocks[j];
        const float *mod = l->mods + j * slot;
        LEGO_TRY(linear_fwd(h, m, &blk->qkv, th, tt, rows, wide, tt, GEMM_ACT_NONE, err));
        mark(h, CUDA_PROF_QKV);
        LEGO_TRY(run_attention<T>(h, m, wide, rows / (size_t)b->tokens, b->tokens, heads,
                                  D / heads, th, err));
        mark(h, CUDA_PROF_ATTENTION);
        LEGO_TRY(linear_fwd(h, m, &blk->proj, th, tt, rows, ty, tt, GEMM_ACT_NONE, err));
        mark(h, CUDA_PROF_PROJ);
        LEGO_TRY((k_gated_residual_layernorm<T, R>)(s, tx, ty, rows, D, rpi, mod + 2 * d,
                                               mstride, mod + 3 * d, mod + 4 * d, mstride, th,
                                               h->ln_mode, err));
        mark(h, CUDA_PROF_LAYERNORM);
        LEGO_TRY(linear_fwd(h, m, &blk->fc1, th, tt, rows, wide, tt, GEMM_ACT_GELU, err));
        mark(h, CUDA_PROF_FC1);
        LEGO_TRY(linear_fwd(h, m, &blk->fc2, wide, tt, rows, ty, tt, GEMM_ACT_NONE, err));
        mark(h, CUDA_PROF_FC2);
        /* The LayerNorm that follows: the next block's first, or the final one. */
        const float *next = j + 1 < depth ? mod + slot : final_mod;
        size_t next_stride = j + 1 < depth ? mstride : fstride;
        LEGO_TRY((k_gated_residual_layernorm<T, R>)(s, tx, ty, rows, D, rpi, mod + 5 * d,
                                               mstride, next, next + d, next_stride, th,
                                               h->ln_mode, err));
        mark(h, CUDA_PROF_LAYERNORM);
    }

    LEGO_TRY(linear_fwd(h, m, &b->final_out, th, tt, rows, l->wide, f32, GEMM_ACT_NONE, err));
    LEGO_TRY(k_scatter(s, &g, l->wide, out, err));
    mark(h, CUDA_PROF_OUTPUT);
    return LEGO_OK;
}

static lego_status brick_forward(cuda_handle *h, const lego_model *m, int k, int nb, int hgt,
                                 int wid, const ws_layout *l, const float *below, float *out,
                                 lego_err *err) {
    const int low = h->residual; /* the stream in the operand type */
    switch (h->precision) {
    case CUDA_PRECISION_BF16:
        return low ? brick_fwd<bf16, bf16>(h, m, k, nb, hgt, wid, l, below, out, err)
                   : brick_fwd<bf16, float>(h, m, k, nb, hgt, wid, l, below, out, err);
    case CUDA_PRECISION_FP16:
        return low ? brick_fwd<f16, f16>(h, m, k, nb, hgt, wid, l, below, out, err)
                   : brick_fwd<f16, float>(h, m, k, nb, hgt, wid, l, below, out, err);
    default: return brick_fwd<float, float>(h, m, k, nb, hgt, wid, l, below, out, err);
    }
}

/* c for nb images from the staged c_noise and label rows (denoise.c's
 * conditioning). */
static lego_status conditioning(cuda_handle *h, const lego_model *m, int nb, int label_rows,
                                const ws_layout *l, lego_err *err) {
    cudaStream_t s = h->stream;
    int D = m->cfg.hidden_size, fdim = m->cfg.frequency_embedding_size;
    LEGO_TRY(k_timestep_embedding(s, l->c_noise, h->freq, nb, fdim, l->emb, err));
    LEGO_TRY(linear_f32(h, m, &m->t_fc1, l->emb, (size_t)nb, l->hid, err));
    LEGO_TRY(k_silu(s, l->hid, (size_t)nb * D, l->hid, err));
    LEGO_TRY(linear_f32(h, m, &m->t_fc2, l->hid, (size_t)nb, l->cond, err));
    if (m->cfg.label_dim > 0) {
        if (label_rows) {
            LEGO_TRY(linear_f32(h, m, &m->y_embed, l->labels, (size_t)nb, l->hid, err));
            LEGO_TRY(k_add(s, l->cond, l->hid, (size_t)nb * D, err));
        } else {
            /* The null label's embedding is the bias alone. */
            const float *yb = dev_param(h, m, m->y_embed.b);
            if (!yb)
                return lego_fail(err, LEGO_ERR_BACKEND, "internal: y_embedder not on the device");
            LEGO_TRY(k_add_bias(s, l->cond, yb, CUDA_R_32F, (size_t)nb, D, err));
        }
    }
    return k_silu(s, l->cond, (size_t)nb * D, l->silu_c, err);
}

/* What one request enqueues, once the inputs are on the device. */
typedef struct request_plan {
    int n, nb, hgt, wid, guided, label_rows;
    size_t chw;
} request_plan;

/* The device work of D(x; sigma) after the inputs are staged: the
 * conditioning, the bricks, guidance and the EDM scaling into l->out.
 * Copies brick outputs and c to the caller's host memory only when asked
 * (never while a graph is captured). */
static lego_status enqueue_network(cuda_handle *h, const lego_model *m, const denoise_args *a,
                                   const request_plan *p, const ws_layout *l, lego_err *err) {
    cudaStream_t s = h->stream;
    int n = p->n, D = m->cfg.hidden_size;
    size_t chw = p->chw;
    mark(h, -1);
    LEGO_TRY(conditioning(h, m, p->nb, p->label_rows, l, err));
    if (a->cond_out)
        CU_TRY(cudaMemcpyAsync(a->cond_out, l->cond, (size_t)n * D * sizeof(float),
                               cudaMemcpyDeviceToHost, s));
    LEGO_TRY(k_scale_inputs(s, l->x, l->coef, n, p->nb, chw, l->xin, err));
    mark(h, CUDA_PROF_INPUT);

    const float *below = NULL;
    float *cur = l->fa;
    for (int k = 0; k < m->num_bricks; k++) {
        if (!(a->brick_mask >> k & 1u)) continue;
        LEGO_TRY(brick_forward(h, m, k, p->nb, p->hgt, p->wid, l, below, cur, err));
        if (a->brick_outputs) {
            /* Each pass feeds its own output upwards; only what is reported
             * is mixed. */
            const float *rep = cur;
            if (p->guided) {
                LEGO_TRY(k_guide(s, cur, n, chw, a->guidance, l->mix, err));
                rep = l->mix;
            }
            CU_TRY(cudaMemcpyAsync(a->brick_outputs + (size_t)k * n * chw, rep,
                                   (size_t)n * chw * sizeof(float), cudaMemcpyDeviceToHost, s));
        }
        below = cur;
        cur = cur == l->fa ? l->fb : l->fa;
    }

    /* D = c_skip x + c_out F, F guided. */
    const float *f = below;
    if (p->guided) {
        LEGO_TRY(k_guide(s, below, n, chw, a->guidance, l->mix, err));
        f = l->mix;
    }
    LEGO_TRY(k_edm(s, l->x, f, l->coef, n, chw, l->out, err));
    mark(h, CUDA_PROF_OUTPUT);
    return LEGO_OK;
}

/* ---- CUDA graphs ------------------------------------------------------------------ */

static graph_key key_for(const cuda_handle *h, const denoise_args *a, const request_plan *p) {
    graph_key k;
    memset(&k, 0, sizeof k);
    k.n = p->n;
    k.nb = p->nb;
    k.hgt = p->hgt;
    k.wid = p->wid;
    k.guided = p->guided;
    k.label_rows = p->label_rows;
    k.brick_mask = a->brick_mask;
    k.guidance = p->guided ? a->guidance : 0.0f;
    k.precision = h->precision;
    k.attn_mode = h->attn_mode;
    k.gelu_epilogue = h->gemm.gelu_epilogue;
    k.ln_mode = h->ln_mode;
    k.residual = h->residual;
    k.ws = h->ws;
    k.params = h->params;
    k.lp = h->lp;
    k.freq = h->freq;
    k.lp_type = (int)h->lp_type;
    return k;
}

static void graphs_clear(cuda_handle *h) {
    for (int i = 0; i < GRAPH_CACHE; i++) {
        if (h->graphs[i].exec) cudaGraphExecDestroy(h->graphs[i].exec);
        memset(&h->graphs[i], 0, sizeof h->graphs[i]);
    }
    sampler_clear_graphs(h->sampler);
}

/* Record enqueue(ctx, err) on the handle's stream into an instantiated
 * graph.  The caller has just run the same work eagerly, so a capture that
 * fails is not an error of its request: *exec stays NULL, the failure is
 * counted and kept in capture_note, and the result says what next.  If
 * cuDNN ran inside the failed capture it may not be capturable here: every
 * attention shape goes back to our kernels and the work is worth
 * capturing again (CAPTURE_RETRY); otherwise it stays eager (CAPTURE_EAGER). */
static capture_result capture_work(cuda_handle *h, capture_fn enqueue, void *ctx,
                                   cudaGraphExec_t *exec) {
    *exec = NULL;
    lego_err why = {LEGO_OK, ""};
    lego_err *err = &why;
    h->cudnn_captured = 0;
    lego_status st = cu_status(cudaStreamBeginCapture(h->stream, cudaStreamCaptureModeThreadLocal),
                               err, "cudaStreamBeginCapture");
    if (st == LEGO_OK) {
        st = enqueue(ctx, err);
        cudaGraph_t graph = NULL;
        cudaError_t e = cudaStreamEndCapture(h->stream, &graph); /* always: leave capture */
        if (st == LEGO_OK) st = cu_status(e, err, "cudaStreamEndCapture");
        if (st == LEGO_OK)
            st = cu_status(cudaGraphInstantiate(exec, graph, 0), err, "cudaGraphInstantiate");
        if (graph) cudaGraphDestroy(graph);
    }
    if (st == LEGO_OK) return CAPTURED;
    *exec = NULL;
    cudaGetLastError(); /* the failed capture's error is not the request's */
    h->capture_failures++;
    snprintf(h->capture_note, sizeof h->capture_note, "%.*s", (int)sizeof h->capture_note - 1,
             why.msg);
    if (!h->cudnn_captured) return CAPTURE_EAGER;
    for (int i = 0; i < ATTN_CHOICES; i++) h->choices[i].cudnn = 0;
    return CAPTURE_RETRY;
}

/* enqueue_network's arguments, for capture_work. */
typedef struct network_work {
    cuda_handle *h;
    const lego_model *m;
    const denoise_args *a;
    const request_plan *p;
    const ws_layout *l;
} network_work;

static lego_status enqueue_network_work(void *ctx, lego_err *err) {
    const network_work *w = (const network_work *)ctx;
    return enqueue_network(w->h, w->m, w->a, w->p, w->l, err);
}

/* Launch the graph for this request, capturing it first if it is new. */
static lego_status run_graph(cuda_handle *h, const lego_model *m, const denoise_args *a,
                             const request_plan *p, const ws_layout *l, lego_err *err) {
    graph_key key = key_for(h, a, p);
    for (int i = 0; i < GRAPH_CACHE; i++) {
        const graph_entry *g = &h->graphs[i];
        if ((g->exec || g->failed) && memcmp(&g->key, &key, sizeof key) == 0) {
            if (g->failed) return enqueue_network(h, m, a, p, l, err);
            CU_TRY(cudaGraphLaunch(g->exec, h->stream));
            h->graph_launches++;
            return LEGO_OK;
        }
    }
    /* A new request: run it as it is, which also prepares (and tunes)
     * every GEMM outside the capture, then record it for the next time. */
    LEGO_TRY(enqueue_network(h, m, a, p, l, err));
    network_work w = {h, m, a, p, l};
    cudaGraphExec_t exec = NULL;
    capture_result r = capture_work(h, enqueue_network_work, &w, &exec);
    if (r == CAPTURE_RETRY) return LEGO_OK; /* captured next time, without cuDNN */
    graph_entry *slot = &h->graphs[h->next_graph];
    h->next_graph = (h->next_graph + 1) % GRAPH_CACHE;
    if (slot->exec) cudaGraphExecDestroy(slot->exec);
    slot->exec = exec;
    slot->key = key;
    slot->failed = r == CAPTURE_EAGER; /* then this request stays eager */
    if (r == CAPTURED) h->graph_captures++;
    return LEGO_OK;
}

static lego_status denoise_on_device(cuda_handle *h, lego_model *m, const denoise_args *a,
                                     lego_err *err) {
    request_plan p;
    int L = m->cfg.label_dim;
    p.n = a->n;
    p.hgt = a->h;
    p.wid = a->w;
    p.guided = L > 0 && a->guidance != 1.0f && a->guidance != 0.0f;
    p.nb = p.guided ? 2 * p.n : p.n;
    p.label_rows = L > 0 && a->label_vectors && a->guidance != 0.0f;
    p.chw = (size_t)m->cfg.img_channels * p.hgt * p.wid;
    int n = p.n, nb = p.nb;
    cudaStream_t s = h->stream;

    size_t bound;
    if (model_denoise_floats(m, n, p.hgt, p.wid, p.guided, &bound) != LEGO_OK)
        return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "a batch of %d images of %dx%d is too large",
                         n, p.hgt, p.wid);
    LEGO_TRY(sync_weights(h, m, err));
    ws_layout l;
    plan_layout(m, n, nb, p.hgt, p.wid, NULL, &l);
    LEGO_TRY(reserve_workspace(h, m, l.bytes, err));
    plan_layout(m, n, nb, p.hgt, p.wid, h->ws, &l);

    /* Per-image values, staged in the workspace's own layout (c_noise,
     * coefficients and label rows are its first buffers) so that one copy
     * per evaluation moves them all. */
    size_t coef_at = (size_t)(l.coef - l.c_noise), labels_at = (size_t)(l.labels - l.c_noise);
    size_t span = p.label_rows ? labels_at + (size_t)nb * L : coef_at + 3 * (size_t)n;
    LEGO_TRY(reserve_stage(h, span, err));
    float *c_noise = h->stage, *coef = h->stage + coef_at, *labels = h->stage + labels_at;
    for (int i = 0; i < n; i++) cuda_eval_coefs(m, a->sigma[i], &c_noise[i], &coef[3 * i]);
    for (int i = n; i < nb; i++) c_noise[i] = c_noise[i - n];
    if (p.label_rows) {
        memcpy(labels, a->label_vectors, (size_t)n * L * sizeof *labels);
        if (p.guided) memset(labels + (size_t)n * L, 0, (size_t)n * L * sizeof *labels);
    }
    CU_TRY(cudaMemcpyAsync(l.c_noise, h->stage, span * sizeof(float), cudaMemcpyHostToDevice, s));
    CU_TRY(cudaMemcpyAsync(l.x, a->x, (size_t)n * p.chw * sizeof(float), cudaMemcpyHostToDevice,
                           s));
    h->host_copies += 3; /* these two and D(x) back */

    /* A graph replays the whole network in one launch: what the sampling
     * loop asks for (no per-brick outputs, no c), at one size after the
     * first step. */
    if (h->use_graphs && !h->profile && !a->brick_outputs && !a->cond_out)
        LEGO_TRY(run_graph(h, m, a, &p, &l, err));
    else
        LEGO_TRY(enqueue_network(h, m, a, &p, &l, err));
    CU_TRY(cudaMemcpyAsync(a->out, l.out, (size_t)n * p.chw * sizeof(float),
                           cudaMemcpyDeviceToHost, s));
    CU_TRY(cudaStreamSynchronize(s));
    return LEGO_OK;
}

extern "C" lego_status cuda_backend_denoise(lego_model *m, const denoise_args *a) {
    cuda_handle *h = (cuda_handle *)m->cuda;
    lego_err *err = &m->err;
    if (!h) return lego_fail(err, LEGO_ERR_STATE, "the model is not on the CUDA backend");
    device_guard guard(h->device);
    CU_TRY(guard.status);
    lego_status s = denoise_on_device(h, m, a, err);
    if (s != LEGO_OK) {
        /* Leave nothing in flight that reads the caller's buffers or ours.
         * The stream error (if any) is already in the message. */
        cudaStreamSynchronize(h->stream);
    }
    return s;
}

/* ---- what train.cu sees of the handle ----------------------------------------- */

lego_status backend_view_sync(lego_model *m, backend_view *v, lego_err *err) {
    cuda_handle *h = (cuda_handle *)m->cuda;
    if (!h) return lego_fail(err, LEGO_ERR_STATE, "the model is not on the CUDA backend");
    LEGO_TRY(sync_weights(h, m, err));
    return backend_view_peek(m, v, err);
}

lego_status backend_view_peek(lego_model *m, backend_view *v, lego_err *err) {
    cuda_handle *h = (cuda_handle *)m->cuda;
    if (!h) return lego_fail(err, LEGO_ERR_STATE, "the model is not on the CUDA backend");
    v->device = h->device;
    v->stream = h->stream;
    v->gemm = &h->gemm;
    v->precision = h->precision;
    v->train_attn = h->train_attn;
    v->train_tune = h->train_tune;
    v->train_epi = h->train_epi;
    v->train_ln_sums = h->train_ln_sums;
    v->params = h->params;
    v->lp = h->lp_type == precision_type(h->precision) ? h->lp : NULL;
    v->doff = h->doff;
    v->doff_count = h->doff_count;
    v->params_used = h->params_used;
    v->freq = h->freq;
    v->train = &h->train;
    return LEGO_OK;
}

void backend_weights_written(lego_model *m) {
    cuda_handle *h = (cuda_handle *)m->cuda;
    if (h) h->lp_type = CUDA_R_32F; /* reconverted before its next use */
}

lego_status backend_budget(const lego_model *m, size_t old_bytes, size_t new_bytes,
                           const char *what, lego_err *err) {
    const cuda_handle *h = (const cuda_handle *)m->cuda;
    if (!h) return lego_fail(err, LEGO_ERR_STATE, "the model is not on the CUDA backend");
    return within_budget(h, m->device_budget, old_bytes, new_bytes, what, err);
}

int backend_device(const lego_model *m) {
    const cuda_handle *h = (const cuda_handle *)m->cuda;
    return h ? h->device : -1;
}

/* ---- the network for the device sampling loop (sampler.cu) --------------------------- */

capture_result cuda_eval_capture(lego_model *m, capture_fn enqueue, void *ctx,
                                 cudaGraphExec_t *exec) {
    return capture_work((cuda_handle *)m->cuda, enqueue, ctx, exec);
}

static_assert(sizeof(graph_key) <= CUDA_EVAL_KEY_BYTES, "CUDA_EVAL_KEY_BYTES is too small");

void cuda_eval_coefs(const lego_model *m, float sigma, float *c_noise, float coef[3]) {
    /* The expressions of denoise.c, in double, rounded once. */
    double sd = m->cfg.sigma_data, sd2 = sd * sd, sig = (double)sigma, s2 = sig * sig;
    *c_noise = logf(sigma) / 4.0f;
    coef[0] = (float)(1.0 / sqrt(sig * sigma + sd2));
    coef[1] = (float)(sd2 / (s2 + sd2));
    coef[2] = (float)(sig * sd / sqrt(s2 + sd2));
}

/* The request plan of an evaluation (as denoise_on_device makes it). */
static request_plan eval_request(const lego_model *m, const cuda_eval *e) {
    request_plan p;
    p.n = e->n;
    p.nb = e->nb;
    p.hgt = e->h;
    p.wid = e->w;
    p.guided = e->guided;
    p.label_rows = e->label_rows;
    p.chw = e->chw;
    (void)m;
    return p;
}

static denoise_args eval_args(const cuda_eval *e, uint32_t mask) {
    denoise_args a;
    memset(&a, 0, sizeof a);
    a.n = e->n;
    a.h = e->h;
    a.w = e->w;
    a.guidance = e->guidance;
    a.brick_mask = mask;
    return a;
}

lego_status cuda_eval_plan(lego_model *m, int n, int hgt, int wid, float guidance,
                           const float *label_vectors, size_t extra_bytes, cuda_eval *e) {
    cuda_handle *h = (cuda_handle *)m->cuda;
    lego_err *err = &m->err;
    int L = m->cfg.label_dim;
    memset(e, 0, sizeof *e);
    e->stream = h->stream;
    e->n = n;
    e->h = hgt;
    e->w = wid;
    e->guidance = guidance;
    e->guided = L > 0 && guidance != 1.0f && guidance != 0.0f;
    e->nb = e->guided ? 2 * n : n;
    e->label_rows = L > 0 && label_vectors && guidance != 0.0f;
    e->chw = (size_t)m->cfg.img_channels * hgt * wid;
    e->graphs = h->use_graphs && !h->profile;

    size_t bound;
    if (model_denoise_floats(m, n, hgt, wid, e->guided, &bound) != LEGO_OK)
        return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "a batch of %d images of %dx%d is too large",
                         n, hgt, wid);
    LEGO_TRY(sync_weights(h, m, err));
    ws_layout l;
    plan_layout(m, n, e->nb, hgt, wid, NULL, &l);
    size_t net_bytes = l.bytes;
    if (extra_bytes > SIZE_MAX - net_bytes)
        return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "the sampler's buffers are too large");
    LEGO_TRY(reserve_workspace(h, m, net_bytes + extra_bytes, err));
    plan_layout(m, n, e->nb, hgt, wid, h->ws, &l);
    e->x = l.x;
    e->c_noise = l.c_noise;
    e->coef = l.coef;
    e->out = l.out;
    e->extra = h->ws + net_bytes; /* net_bytes is a multiple of DEVICE_ALIGN */

    /* The label rows stay for the whole run: conditional, then null. */
    if (e->label_rows) {
        size_t rows = (size_t)n * L;
        LEGO_TRY(reserve_stage(h, (size_t)e->nb * L, err));
        memcpy(h->stage, label_vectors, rows * sizeof(float));
        if (e->guided) memset(h->stage + rows, 0, rows * sizeof(float));
        /* From pageable memory: the call returns once the source has been
         * read, so the staging buffer is free again. */
        LEGO_TRY(cuda_eval_copy(m, l.labels, h->stage, (size_t)e->nb * L * sizeof(float),
                                cudaMemcpyHostToDevice));
    }
    return LEGO_OK;
}

lego_status cuda_eval_enqueue(lego_model *m, const cuda_eval *e, uint32_t mask) {
    cuda_handle *h = (cuda_handle *)m->cuda;
    ws_layout l;
    plan_layout(m, e->n, e->nb, e->h, e->w, h->ws, &l);
    request_plan p = eval_request(m, e);
    denoise_args a = eval_args(e, mask);
    return enqueue_network(h, m, &a, &p, &l, &m->err);
}

void cuda_eval_key(const lego_model *m, const cuda_eval *e, uint32_t mask,
                   unsigned char key[CUDA_EVAL_KEY_BYTES]) {
    const cuda_handle *h = (const cuda_handle *)m->cuda;
    request_plan p = eval_request(m, e);
    denoise_args a = eval_args(e, mask);
    graph_key k = key_for(h, &a, &p);
    memset(key, 0, CUDA_EVAL_KEY_BYTES);
    memcpy(key, &k, sizeof k);
}

lego_status cuda_eval_copy(lego_model *m, void *dst, const void *src, size_t bytes,
                           cudaMemcpyKind kind) {
    cuda_handle *h = (cuda_handle *)m->cuda;
    lego_err *err = &m->err;
    CU_TRY(cudaMemcpyAsync(dst, src, bytes, kind, h->stream));
    h->host_copies++;
    return LEGO_OK;
}

lego_status cuda_eval_sync(lego_model *m) {
    cuda_handle *h = (cuda_handle *)m->cuda;
    lego_err *err = &m->err;
    h->syncs++;
    CU_TRY(cudaStreamSynchronize(h->stream));
    return LEGO_OK;
}

extern "C" int cuda_backend_device_loop(const lego_model *m) {
    const cuda_handle *h = m ? (const cuda_handle *)m->cuda : NULL;
    return h && h->device_loop;
}

extern "C" lego_status cuda_backend_sample(lego_model *m, const cuda_sample_run *r) {
    cuda_handle *h = (cuda_handle *)m->cuda;
    lego_err *err = &m->err;
    if (!h) return lego_fail(err, LEGO_ERR_STATE, "the model is not on the CUDA backend");
    device_guard guard(h->device);
    CU_TRY(guard.status);
    uint64_t copies = h->host_copies, syncs = h->syncs;
    lego_status s = sampler_run(m, &h->sampler, r);
    if (s != LEGO_OK) cudaStreamSynchronize(h->stream); /* nothing left in flight */
    h->sample_runs++;
    h->sample_host_copies = h->host_copies - copies;
    h->sample_syncs = h->syncs - syncs;
    return s;
}
