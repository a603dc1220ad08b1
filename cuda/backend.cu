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
#include <stdlib.h>
#include <string.h>

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

typedef struct cuda_handle {
    int device;
    cudaStream_t stream;
    gemm_ctx gemm;
    int gemm_ready;
    int flash_only;
    int precision;

    /* Weights: tensor i of the model's table at params + doff[i]. */
    float *params;
    size_t params_capacity; /* floats */
    size_t *doff;
    int doff_count;
    int have_weights;
    uint64_t weights_gen;

    /* Time-embedding frequencies, fdim/2 floats, as the CPU computes them. */
    float *freq;

    /* The request workspace. */
    char *ws;
    size_t ws_bytes;

    /* Host staging for per-image values. */
    float *stage;
    size_t stage_floats;

    uint64_t workspace_allocs, weight_uploads;
} cuda_handle;

/* Switch to `device` for the lifetime of the guard, then back. */
struct device_guard {
    int previous;
    bool switched;
    cudaError_t status;
    explicit device_guard(int device) : previous(0), switched(false), status(cudaSuccess) {
        status = cudaGetDevice(&previous);
        if (status == cudaSuccess && previous != device) {
            status = cudaSetDevice(device);
            switched = status == cudaSuccess;
        }
    }
    ~device_guard() {
        if (switched) cudaSetDevice(previous);
    }
    device_guard(const device_guard &) = delete;
    device_guard &operator=(const device_guard &) = delete;
};

extern "C" int cuda_device_count(void) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        cudaGetLastError(); /* no driver or no device: not an error to keep */
        return 0;
    }
    return count;
}

static void handle_free(cuda_handle *h) {
    if (!h) return;
    if (h->gemm_ready) gemm_destroy(&h->gemm);
    if (h->ws) cudaFree(h->ws);
    if (h->params) cudaFree(h->params);
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

/* Copy the parameter array to the device if it changed since the last
 * upload: every tensor on its own aligned offset. */
static lego_status sync_weights(cuda_handle *h, const lego_model *m, lego_err *err) {
    if (h->have_weights && h->weights_gen == m->weights_gen && h->doff_count == m->num_params)
        return LEGO_OK;
    if (h->doff_count != m->num_params) {
        size_t *d = (size_t *)realloc(h->doff, (size_t)(m->num_params ? m->num_params : 1) *
                                                   sizeof *d);
        if (!d) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
        h->doff = d;
        h->doff_count = m->num_params;
    }
    size_t total = 0;
    for (int i = 0; i < m->num_params; i++) {
        h->doff[i] = total;
        total += round_up_floats(m->table[i].numel);
    }
    if (total == 0) total = ALIGN_FLOATS;
    h->have_weights = 0;
    if (total > h->params_capacity) {
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
    h->have_weights = 1;
    h->weights_gen = m->weights_gen;
    h->weight_uploads++;
    return LEGO_OK;
}

/* The device address of the tensor that host pointer `p` (a view into
 * m->params, always the start of a table entry) names. */
static const float *dev_param(const cuda_handle *h, const lego_model *m, const float *p) {
    size_t off = (size_t)(p - m->params);
    int lo = 0, hi = m->num_params - 1;
    while (lo <= hi) { /* the table is in increasing offset order */
        int mid = lo + (hi - lo) / 2;
        if (m->table[mid].offset == off) return h->params + h->doff[mid];
        if (m->table[mid].offset < off) lo = mid + 1;
        else hi = mid - 1;
    }
    return NULL;
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
    h->precision = CUDA_PRECISION_FP32;

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
    }
    if (s == LEGO_OK)
        s = cu_status(cudaMemcpy(h->freq, freq, (size_t)half * sizeof(float),
                                 cudaMemcpyHostToDevice),
                      err, "cudaMemcpy (frequencies)");
    free(freq);

    int is_tanh = 0;
    if (s == LEGO_OK) s = gemm_probe_gelu(&h->gemm, &is_tanh, err);
    h->gemm.gelu_epilogue = is_tanh;
    if (s == LEGO_OK) s = sync_weights(h, m, err);
    if (s != LEGO_OK) {
        if (h->stream) cudaStreamSynchronize(h->stream);
        handle_free(h);
        return s;
    }
    *out = h;
    return LEGO_OK;
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
    out->flash_only = h->flash_only;
    out->precision = h->precision;
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
        h->flash_only = value != 0;
        return LEGO_OK;
    case CUDA_OPT_PRECISION:
        if (value == CUDA_PRECISION_FP32) {
            h->precision = value;
            return LEGO_OK;
        }
        return lego_fail(&m->err, LEGO_ERR_UNSUPPORTED,
                         "backend CUDA: precision %d is not implemented (fp32 only)", value);
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
    float *tx, *th; /* rows x D: residual stream, LayerNorm output */
    float *wide;    /* rows x widest               */
    size_t bytes;
} ws_layout;

/* Widest activation of a brick, as brick.c's widest_activation. */
static size_t widest(const lego_model *m, const brick *b) {
    size_t p2 = (size_t)b->cfg.patch_size * b->cfg.patch_size;
    size_t wide = 3 * (size_t)m->cfg.hidden_size;
    if ((size_t)m->mlp_hidden > wide) wide = (size_t)m->mlp_hidden;
    if (b->c_in * p2 > wide) wide = b->c_in * p2;
    if (m->cfg.img_channels * p2 > wide) wide = m->cfg.img_channels * p2;
    return wide;
}

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
        if (rows * widest(m, b) > wide) wide = rows * widest(m, b);
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
    CARVE(wide, wide);
#undef CARVE
    l->bytes = used * sizeof(float);
}

/* Grow the workspace to `bytes` if it is smaller; never shrinks. */
static lego_status reserve_workspace(cuda_handle *h, size_t bytes, lego_err *err) {
    if (bytes <= h->ws_bytes) return LEGO_OK;
    if (h->ws) {
        /* Work queued on the old buffer must finish before it goes. */
        CU_TRY(cudaStreamSynchronize(h->stream));
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

/* Device views of a linear layer. */
static lego_status dev_linear(const cuda_handle *h, const lego_model *m, const linear *l,
                              const float **w, const float **b, lego_err *err) {
    *w = dev_param(h, m, l->w);
    *b = dev_param(h, m, l->b);
    if (!*w || !*b)
        return lego_fail(err, LEGO_ERR_BACKEND, "internal: a weight is not in the device table");
    return LEGO_OK;
}

static lego_status linear_fwd(cuda_handle *h, const lego_model *m, const linear *l,
                              const float *x, size_t rows, float *y, gemm_act act, lego_err *err) {
    const float *w, *b;
    LEGO_TRY(dev_linear(h, m, l, &w, &b, err));
    return gemm_linear(&h->gemm, w, b, l->in, l->out, x, rows, y, act, err);
}

/* F_k for nb images: brick.c's brick_forward with the whole batch as one
 * chunk. */
static lego_status brick_fwd(cuda_handle *h, const lego_model *m, int k, int nb, int hgt, int wid,
                             const ws_layout *l, const float *below, float *out, lego_err *err) {
    const brick *b = &m->bricks[k];
    cudaStream_t s = h->stream;
    int D = m->cfg.hidden_size, heads = m->cfg.num_heads;
    size_t d = (size_t)D, ms = 6 * d, depth = (size_t)b->cfg.depth;

    tok_geom g;
    g.C = m->cfg.img_channels;
    g.c_in = b->c_in;
    g.p = b->cfg.patch_size;
    g.bs = b->cfg.brick_size;
    g.grid = b->grid;
    g.tokens = b->tokens;
    g.patches_x = wid / g.bs;
    g.h = hgt;
    g.w = wid;
    g.rows_per_image = (size_t)(hgt / g.bs) * (size_t)g.patches_x * (size_t)b->tokens;
    g.rows = (size_t)nb * g.rows_per_image;
    g.row_step = 2.0f / (float)(hgt - 1);
    g.col_step = 2.0f / (float)(wid - 1);
    size_t rows = g.rows, rpi = g.rows_per_image;

    /* adaLN vectors per image: block j in slot j ([nb][6D]: shift_msa
     * scale_msa gate_msa shift_mlp scale_mlp gate_mlp), the final layer's
     * ([nb][2D]: shift scale) in slot depth. */
    for (size_t j = 0; j < depth; j++)
        LEGO_TRY(linear_fwd(h, m, &b->blocks[j].ada, l->silu_c, (size_t)nb,
                            l->mods + j * l->mod_slot, GEMM_ACT_NONE, err));
    float *final_mod = l->mods + depth * l->mod_slot;
    LEGO_TRY(linear_fwd(h, m, &b->final_ada, l->silu_c, (size_t)nb, final_mod, GEMM_ACT_NONE,
                        err));

    /* Patch embedding; the position embedding is added by the first
     * LayerNorm, which reads the row anyway. */
    LEGO_TRY(k_gather(s, &g, l->xin, below, l->wide, err));
    LEGO_TRY(linear_fwd(h, m, &b->embed, l->wide, rows, l->tx, GEMM_ACT_NONE, err));
    const float *pos = dev_param(h, m, b->pos_embed);
    if (!pos) return lego_fail(err, LEGO_ERR_BACKEND, "internal: pos_embed not on the device");
    LEGO_TRY(k_layernorm_modulate(s, l->tx, pos, b->tokens, rows, D, rpi, l->mods, l->mods + d,
                                  ms, l->th, err));

    for (size_t j = 0; j < depth; j++) {
        const dit_block *blk = &b->blocks[j];
        const float *mod = l->mods + j * l->mod_slot;
        LEGO_TRY(linear_fwd(h, m, &blk->qkv, l->th, rows, l->wide, GEMM_ACT_NONE, err));
        LEGO_TRY(k_attention(s, l->wide, rows / (size_t)b->tokens, b->tokens, heads, D / heads,
                             l->th, h->flash_only, err));
        LEGO_TRY(linear_fwd(h, m, &blk->proj, l->th, rows, l->wide, GEMM_ACT_NONE, err));
        LEGO_TRY(k_gated_residual_layernorm(s, l->tx, l->wide, rows, D, rpi, mod + 2 * d, ms,
                                            mod + 3 * d, mod + 4 * d, ms, l->th, err));
        LEGO_TRY(linear_fwd(h, m, &blk->fc1, l->th, rows, l->wide, GEMM_ACT_GELU, err));
        LEGO_TRY(linear_fwd(h, m, &blk->fc2, l->wide, rows, l->th, GEMM_ACT_NONE, err));
        /* The LayerNorm that follows: the next block's first, or the final one. */
        const float *next = j + 1 < depth ? l->mods + (j + 1) * l->mod_slot : final_mod;
        size_t next_stride = j + 1 < depth ? ms : 2 * d;
        LEGO_TRY(k_gated_residual_layernorm(s, l->tx, l->th, rows, D, rpi, mod + 5 * d, ms, next,
                                            next + d, next_stride, l->th, err));
    }

    LEGO_TRY(linear_fwd(h, m, &b->final_out, l->th, rows, l->wide, GEMM_ACT_NONE, err));
    return k_scatter(s, &g, l->wide, out, err);
}

/* c for nb images from the staged c_noise and label rows (denoise.c's
 * conditioning). */
static lego_status conditioning(cuda_handle *h, const lego_model *m, int nb, int label_rows,
                                const ws_layout *l, lego_err *err) {
    cudaStream_t s = h->stream;
    int D = m->cfg.hidden_size, fdim = m->cfg.frequency_embedding_size;
    LEGO_TRY(k_timestep_embedding(s, l->c_noise, h->freq, nb, fdim, l->emb, err));
    LEGO_TRY(linear_fwd(h, m, &m->t_fc1, l->emb, (size_t)nb, l->hid, GEMM_ACT_NONE, err));
    LEGO_TRY(k_silu(s, l->hid, (size_t)nb * D, l->hid, err));
    LEGO_TRY(linear_fwd(h, m, &m->t_fc2, l->hid, (size_t)nb, l->cond, GEMM_ACT_NONE, err));
    if (m->cfg.label_dim > 0) {
        if (label_rows) {
            LEGO_TRY(linear_fwd(h, m, &m->y_embed, l->labels, (size_t)nb, l->hid, GEMM_ACT_NONE,
                                err));
            LEGO_TRY(k_add(s, l->cond, l->hid, (size_t)nb * D, err));
        } else {
            /* The null label's embedding is the bias alone. */
            const float *yb = dev_param(h, m, m->y_embed.b);
            if (!yb)
                return lego_fail(err, LEGO_ERR_BACKEND, "internal: y_embedder not on the device");
            LEGO_TRY(k_add_bias(s, l->cond, yb, (size_t)nb, D, err));
        }
    }
    return k_silu(s, l->cond, (size_t)nb * D, l->silu_c, err);
}

static lego_status denoise_on_device(cuda_handle *h, lego_model *m, const denoise_args *a,
                                     lego_err *err) {
    int n = a->n, hgt = a->h, wid = a->w, C = m->cfg.img_channels, D = m->cfg.hidden_size;
    int L = m->cfg.label_dim;
    int guided = L > 0 && a->guidance != 1.0f && a->guidance != 0.0f;
    int nb = guided ? 2 * n : n;
    size_t chw = (size_t)C * hgt * wid;
    cudaStream_t s = h->stream;

    size_t bound;
    if (model_denoise_floats(m, n, hgt, wid, guided, &bound) != LEGO_OK)
        return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "a batch of %d images of %dx%d is too large",
                         n, hgt, wid);
    LEGO_TRY(sync_weights(h, m, err));
    ws_layout l;
    plan_layout(m, n, nb, hgt, wid, NULL, &l);
    LEGO_TRY(reserve_workspace(h, l.bytes, err));
    plan_layout(m, n, nb, hgt, wid, h->ws, &l);

    /* Per-image values, staged: c_noise (nb), coefficients (3n), labels. */
    int label_rows = L > 0 && a->label_vectors && a->guidance != 0.0f;
    size_t stage = (size_t)nb + 3 * (size_t)n + (label_rows ? (size_t)nb * L : 0);
    LEGO_TRY(reserve_stage(h, stage, err));
    float *c_noise = h->stage, *coef = c_noise + nb, *labels = coef + 3 * (size_t)n;
    double sd = m->cfg.sigma_data, sd2 = sd * sd;
    for (int i = 0; i < nb; i++) c_noise[i] = logf(a->sigma[i % n]) / 4.0f;
    for (int i = 0; i < n; i++) {
        /* The expressions of denoise.c, in double, rounded once. */
        double sig = (double)a->sigma[i], s2 = sig * sig;
        coef[3 * i] = (float)(1.0 / sqrt(sig * a->sigma[i] + sd2));
        coef[3 * i + 1] = (float)(sd2 / (s2 + sd2));
        coef[3 * i + 2] = (float)(sig * sd / sqrt(s2 + sd2));
    }
    if (label_rows) {
        memcpy(labels, a->label_vectors, (size_t)n * L * sizeof *labels);
        if (guided) memset(labels + (size_t)n * L, 0, (size_t)n * L * sizeof *labels);
    }
    CU_TRY(cudaMemcpyAsync(l.c_noise, c_noise, (size_t)nb * sizeof(float), cudaMemcpyHostToDevice,
                           s));
    CU_TRY(cudaMemcpyAsync(l.coef, coef, 3 * (size_t)n * sizeof(float), cudaMemcpyHostToDevice,
                           s));
    if (label_rows)
        CU_TRY(cudaMemcpyAsync(l.labels, labels, (size_t)nb * L * sizeof(float),
                               cudaMemcpyHostToDevice, s));
    CU_TRY(cudaMemcpyAsync(l.x, a->x, (size_t)n * chw * sizeof(float), cudaMemcpyHostToDevice, s));

    LEGO_TRY(conditioning(h, m, nb, label_rows, &l, err));
    if (a->cond_out)
        CU_TRY(cudaMemcpyAsync(a->cond_out, l.cond, (size_t)n * D * sizeof(float),
                               cudaMemcpyDeviceToHost, s));
    LEGO_TRY(k_scale_inputs(s, l.x, l.coef, n, nb, chw, l.xin, err));

    const float *below = NULL;
    float *cur = l.fa;
    for (int k = 0; k < m->num_bricks; k++) {
        if (!(a->brick_mask >> k & 1u)) continue;
        LEGO_TRY(brick_fwd(h, m, k, nb, hgt, wid, &l, below, cur, err));
        if (a->brick_outputs) {
            /* Each pass feeds its own output upwards; only what is reported
             * is mixed. */
            const float *rep = cur;
            if (guided) {
                LEGO_TRY(k_guide(s, cur, n, chw, a->guidance, l.mix, err));
                rep = l.mix;
            }
            CU_TRY(cudaMemcpyAsync(a->brick_outputs + (size_t)k * n * chw, rep,
                                   (size_t)n * chw * sizeof(float), cudaMemcpyDeviceToHost, s));
        }
        below = cur;
        cur = cur == l.fa ? l.fb : l.fa;
    }

    /* D = c_skip x + c_out F, F guided. */
    const float *f = below;
    if (guided) {
        LEGO_TRY(k_guide(s, below, n, chw, a->guidance, l.mix, err));
        f = l.mix;
    }
    LEGO_TRY(k_edm(s, l.x, f, l.coef, n, chw, l.out, err));
    CU_TRY(cudaMemcpyAsync(a->out, l.out, (size_t)n * chw * sizeof(float), cudaMemcpyDeviceToHost,
                           s));
    CU_TRY(cudaStreamSynchronize(s));
    return LEGO_OK;
}

extern "C" lego_status cuda_backend_denoise(lego_model *m, const denoise_args *a) {
    cuda_handle *h = (cuda_handle *)m->cuda;
    lego_err *err = &m->err;
    if (!h) return lego_fail(err, LEGO_ERR_STATE, "the model is not on the CUDA backend");
    if (h->precision != CUDA_PRECISION_FP32)
        return lego_fail(err, LEGO_ERR_UNSUPPORTED, "backend CUDA: only fp32 is implemented");
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
