/*
 * train.cu -- training on the GPU: the training forward pass with its
 * activation cache, the backward pass of every layer, the EDM loss over
 * every brick, and the optimiser (gradient norm, clipping, Adam/AdamW,
 * EMA) on fp32 master weights on the device.  The C side (src/train.c)
 * reaches it through backend_cuda.h; the algorithm is src/backward_cpu.c
 * and src/train.c step for step.
 *
 * State.  A handle's training state (backend.cu's h->train, freed with the
 * handle) holds:
 *   - the activation workspace for one batch shape (n, h, w, precision),
 *     one allocation carved into 256-byte aligned buffers, kept between
 *     steps and regrown only for a larger shape;
 *   - the gradient, in the device layout of the weights (tensor i at
 *     doff[i], zero padding between tensors);
 *   - while a trainer is attached: Adam's moments, the EMA and a mask of
 *     trainable values, same layout.  The master weights are the handle's
 *     own fp32 device copy of the parameters (what lego_denoise on the
 *     device reads), so an evaluation after a step sees the new weights
 *     without a copy; the bf16/fp16 copy is reconverted before its next use.
 *
 * The batch's noise is drawn here (philox.cu, the CPU's stream); sigma,
 * dropout, flips and patch tables come from the host.
 *
 * Host copies.  After a device step, m->params and the trainer's host
 * arrays (ema, adam_m, adam_v) are stale; `ahead` says so.  They are
 * copied back lazily by cuda_backend_pull: on lego_trainer_save_state,
 * export_ema, lego_model_get_params, lego_model_save, a backend switch,
 * lego_brick_add.  If the host weights were rewritten meanwhile
 * (model_weights_changed: set_params, load_weights, init_weights, a state
 * loaded from a file), the host wins: the device copy is re-uploaded from
 * it and nothing is copied back over it.  One trainer is attached at a
 * time; attaching another first copies the previous one's state back to
 * its host arrays.
 *
 * Precision.  fp32: every GEMM fp32 (CUBLAS_COMPUTE_32F, no TF32).  bf16:
 * the GEMM operands of the bricks (patches, LayerNorm outputs, qkv,
 * attention output, GELU input and output, and the gradients that multiply
 * them) are bf16 with fp32 accumulation; master weights, gradients, Adam
 * moments, EMA, residual stream, LayerNorm statistics, adaLN vectors and
 * the conditioning are fp32.  fp16 precision trains in fp32 (no loss
 * scaling here).
 *
 * Attention keeps one log-sum-exp per (row, head) rather than the
 * probabilities: the backward pass recomputes P = exp(q.k scale - lse),
 * which costs one more q.k per pair but keeps the memory O(rows x heads)
 * for any sequence length (the probabilities of a 1024-token brick would
 * be 4 KiB per row and head).  Sequences of ATTN_LONG_TOKENS or more run,
 * in bf16, on the tensor-core flash kernels (k_attention_lse,
 * k_attention_bwd), else as cuBLASLt strided-batch GEMMs per head
 * (attn_fwd_gemm, attn_bwd_gemm) with S, dP and P in a bounded scratch;
 * shorter ones (a 4-token brick's) as CUDA-core kernels (attn_path).
 *
 * cuBLASLt's epilogues do what they can of the MLP and the bias gradients
 * (CUDA_OPT_TRAIN_EPILOGUES): fc1's GELU with GELU's input kept for the
 * backward pass, GELU' applied to fc2's input gradient, every bias
 * gradient in its weight gradient's GEMM; each falls back to a kernel of
 * train_kernels.cu where the heuristic offers no algorithm.
 *
 * Determinism: GEMMs use the heuristic's first algorithm (no timing, so no
 * choice that depends on the run), reductions have a fixed order (see
 * train_kernels.cu), no atomics.  A given GPU and library version give the
 * same bits on every run, so a resumed run continues bit for bit.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "train_internal.h"

/* Buffers of one brick. */
typedef struct block_dev {
    float *x, *mean1, *rstd1, *lse, *x2, *mean2, *rstd2;
    void *h1, *qkv, *att, *a, *h2, *u, *g, *f; /* of type T (a, f: proj's and fc2's outputs) */
} block_dev;

typedef struct brick_dev {
    tok_geom g;                /* this batch's rows (sampled patches or all) */
    int32_t *table_mem;        /* device room for a patch table, [n][patches] */
    const int32_t *table;      /* this batch's table: table_mem or NULL (all) */
    int used, total;           /* patches per image run / present */
    void *patches; /* T [R][c_in p p] */
    float *mods;   /* [depth][n][6D], then [n][2D] */
    block_dev blocks[LEGO_MAX_DEPTH];
    float *xf, *meanf, *rstdf;
    void *hf;
    float *out, *dF; /* n x chw each, slices of outs / douts */
} brick_dev;

typedef struct train_layout {
    /* Uploaded each step, one copy: c_noise [n], coef [n][TRAIN_COEF],
     * sigma [n], labels [n][L]. */
    float *stage;
    size_t stage_floats, labels_at;
    float *c_noise, *coef, *sigma, *labels;
    float *emb, *t_pre, *t_hid, *cond, *silu_c, *tmp, *dsilu, *dcond, *dhid;
    float *y, *noise, *x, *xin, *outs, *douts;
    float *fill;    /* n x chw: the clean-image context of patch sampling */
    double *fillc;  /* [n][2]: its coefficients */
    brick_dev bricks[LEGO_MAX_BRICKS];
    float *dx, *dh, *wideF, *dmods, *delta;
    void *dtT, *wideT;
    /* The GEMM attention's scratch for one head and a chunk of sequences:
     * S and dP fp32, P (or dS) of type T, each [chunk][T][T]. */
    float *att_s, *att_dp;
    void *att_p;
    double *partial, *partial2, *sums, *norm_partial, *norm;
    size_t bytes;
} train_layout;

typedef struct train_state {
    /* Activations for batches of n images of h x w, element size esize. */
    int n, h, w, esize, attn_mode;
    char *ws;
    size_t ws_bytes;
    train_layout L;
    float *stage;      /* host staging of L.stage */
    double *host_sums; /* [K][n] */
    size_t host_sums_count;
    double *host_fillc; /* [n][2] */

    float *grads; /* params_used floats */
    size_t grads_floats;
    float *opt;   /* adam_m | adam_v | ema, opt_floats each */
    size_t opt_floats;
    unsigned char *mask;

    /* The attached trainer and its host arrays. */
    const void *owner;
    float *h_ema, *h_m, *h_v;
    int *attached;
    int ahead;        /* the device holds newer weights/state than the host */
    uint64_t gen;     /* m->weights_gen when it became ahead */

    /* cuda_train_profile: wall time per cuda_train_part, the last mark. */
    int profile;
    double prof_ms[CUDA_TPROF_PARTS];
    double prof_last;
} train_state;

size_t train_state_bytes(const void *train) {
    const train_state *ts = (const train_state *)train;
    if (!ts) return 0;
    return ts->ws_bytes + ts->grads_floats * sizeof(float) + 3 * ts->opt_floats * sizeof(float) +
           (ts->mask ? ts->opt_floats : 0);
}

static void free_opt(train_state *ts) {
    if (ts->opt) cudaFree(ts->opt);
    if (ts->mask) cudaFree(ts->mask);
    ts->opt = NULL;
    ts->mask = NULL;
    ts->opt_floats = 0;
}

void train_state_free(void *train) {
    train_state *ts = (train_state *)train;
    if (!ts) return;
    if (ts->attached) *ts->attached = 0;
    if (ts->ws) cudaFree(ts->ws);
    if (ts->grads) cudaFree(ts->grads);
    free_opt(ts);
    free(ts->stage);
    free(ts->host_sums);
    free(ts->host_fillc);
    free(ts);
}

/* Everything one call works with. */
typedef struct tctx {
    lego_model *m;
    backend_view v;
    train_state *ts;
    cudaStream_t s;
    lego_err *err;
} tctx;

/* cuda_train_profile: charge the time since the last mark to `part` (-1:
 * just restart the clock) once the device has caught up. */
static void tmark(tctx *c, int part) {
    train_state *ts = c->ts;
    if (!ts || !ts->profile) return;
    cudaStreamSynchronize(c->s);
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    double now = (double)t.tv_sec * 1e3 + (double)t.tv_nsec * 1e-6;
    if (part >= 0) ts->prof_ms[part] += now - ts->prof_last;
    ts->prof_last = now;
}

/* LEGO_TRY, then the time so far goes to `part`. */
#define TP(part, call)                                                                        \
    do {                                                                                      \
        LEGO_TRY(call);                                                                       \
        tmark(c, part);                                                                       \
    } while (0)

/* The trainer's GEMMs, on the handle's cache: `deterministic` (see the
 * top) unless CUDA_OPT_TRAIN_AUTOTUNE lets the cache time the shape. */
static lego_status tg_run(tctx *c, const gemm_call *call) {
    gemm_call k = *call;
    k.deterministic = !c->v.train_tune;
    return gemm_run(c->v.gemm, &k, c->err);
}

/* The plain (unbatched, 256-byte aligned) GEMMs of the linear layers. */
static lego_status tg(tctx *c, int ta, int tb, uint64_t M, uint64_t N, uint64_t K, const void *A,
                      int64_t lda, const void *B, int64_t ldb, float beta, void *C, int64_t ldc,
                      cudaDataType ab, cudaDataType dt, const void *bias) {
    /* Fields in gemm_call's order. */
    gemm_call call = {ta, tb, M, N, K, A, B, C, lda, ldb, ldc, ab, dt, 1.0f, beta, bias,
                      GEMM_ACT_NONE, 1, 0, 0, 0, 1, NULL, 0, NULL};
    return tg_run(c, &call);
}

/* A call with one of cuBLASLt's training fusions (gemm_run_fused); *done
 * = 0 when CUDA_OPT_TRAIN_EPILOGUES is off or the heuristic offers none
 * for the shape, and the caller takes the plain GEMM and the kernels. */
static lego_status tg_fused(tctx *c, const gemm_call *call, int *done) {
    *done = 0;
    if (!c->v.train_epi) return LEGO_OK;
    gemm_call k = *call;
    k.deterministic = !c->v.train_tune;
    return gemm_run_fused(c->v.gemm, &k, done, c->err);
}

/* ---- weights and gradients by their host views ----------------------------------- */

static int param_index(const lego_model *m, const float *p) {
    size_t off = (size_t)(p - m->params);
    int lo = 0, hi = m->num_params - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        if (m->table[mid].offset == off) return mid;
        if (m->table[mid].offset < off) lo = mid + 1;
        else hi = mid - 1;
    }
    return -1;
}

/* The device copy of the tensor that host view p names, of type `type`
 * (fp32 master or the bf16 copy); NULL if p names none. */
static const void *dev_w(const tctx *c, const float *p, cudaDataType type) {
    int i = param_index(c->m, p);
    if (i < 0) return NULL;
    if (type == CUDA_R_32F) return c->v.params + c->v.doff[i];
    return c->v.lp ? (const void *)((const bf16 *)c->v.lp + c->v.doff[i]) : NULL;
}

static float *dev_g(const tctx *c, const float *p) {
    int i = param_index(c->m, p);
    return i < 0 ? NULL : c->ts->grads + c->v.doff[i];
}

/* y[rows][out] = x[rows][in] W^T + b: W in x's type, b in y's. */
static lego_status lin_fwd(tctx *c, const linear *l, const void *x, cudaDataType xt, size_t rows,
                           void *y, cudaDataType yt) {
    const void *w = dev_w(c, l->w, xt), *b = dev_w(c, l->b, yt);
    if (!w || !b)
        return lego_fail(c->err, LEGO_ERR_BACKEND, "internal: a weight is not on the device");
    TP(CUDA_TPROF_GEMM, tg(c, 1, 0, (uint64_t)l->out, rows, (uint64_t)l->in, w, l->in, x, l->in,
                           0.0f, y, l->out, xt, yt, b));
    return LEGO_OK;
}

/* fc1's forward: u = x W^T + b and g = GELU(u), both of type T, in one
 * GEMM (GELU_AUX_BIAS) where the GELU epilogue is the reference's. */
template <class T>
static lego_status lin_fwd_gelu(tctx *c, const linear *l, const T *x, size_t rows, T *u, T *g) {
    const cudaDataType t = lt_type<T>::value;
    int done = 0;
    if (c->v.gemm->gelu_epilogue) {
        const void *w = dev_w(c, l->w, t), *b = dev_w(c, l->b, t);
        if (!w || !b)
            return lego_fail(c->err, LEGO_ERR_BACKEND, "internal: a weight is not on the device");
        gemm_call call = {1, 0, (uint64_t)l->out, rows, (uint64_t)l->in, w, x, g, l->in, l->in,
                          l->out, t, t, 1.0f, 0.0f, b, GEMM_ACT_GELU_AUX, 1, 0, 0, 0, 1, u,
                          l->out, NULL};
        TP(CUDA_TPROF_GEMM, tg_fused(c, &call, &done));
    }
    if (done) return LEGO_OK;
    LEGO_TRY(lin_fwd(c, l, x, t, rows, u, t));
    TP(CUDA_TPROF_ROWS, t_gelu<T>(c->s, u, rows * (size_t)l->out, g, c->err));
    return LEGO_OK;
}

/* Backward of y = x W^T + b over rows: dW += dy^T x, db = column sums of
 * dy (written: every layer runs once per gradient, on zeros), and dx = dy
 * W (+ dx when beta is 1) when dx is not NULL.  x and dy of type T; dx
 * fp32, or of type T with dx_t (a GEMM operand next).  With gelu_in (x =
 * GELU(gelu_in), dx of type T): dx = (dy W) GELU'(gelu_in), the gradient
 * of the layer that made gelu_in. */
template <class T>
static lego_status lin_bwd(tctx *c, const linear *l, const T *x, const T *dy, size_t rows,
                           void *dx, float beta, cudaDataType dx_t = CUDA_R_32F,
                           const T *gelu_in = NULL) {
    const cudaDataType t = lt_type<T>::value;
    float *gw = dev_g(c, l->w), *gb = dev_g(c, l->b);
    const void *w = dev_w(c, l->w, t);
    if (!gw || !gb || !w)
        return lego_fail(c->err, LEGO_ERR_BACKEND, "internal: a weight is not on the device");
    gemm_call dw = {0, 1, (uint64_t)l->in, (uint64_t)l->out, rows, x, dy, gw, l->in, l->out,
                    l->in, t, CUDA_R_32F, 1.0f, 1.0f, NULL, GEMM_ACT_NONE, 1, 0, 0, 0, 1,
                    NULL, 0, gb};
    int done = 0;
    TP(CUDA_TPROF_GEMM, tg_fused(c, &dw, &done));
    if (!done) {
        dw.bgrad = NULL;
        TP(CUDA_TPROF_GEMM, tg_run(c, &dw));
        TP(CUDA_TPROF_SUMS, (t_colsum<T, float>(c->s, COLSUM_PLAIN, dy, NULL, NULL, NULL, rows,
                                                rows, l->out, gb, NULL, 0, c->ts->L.partial,
                                                c->err)));
        /* colsum adds: the gradient holds zeros before the backward pass. */
    }
    if (!dx) return LEGO_OK;
    gemm_call dxc = {0, 0, (uint64_t)l->in, rows, (uint64_t)l->out, w, dy, dx, l->in, l->out,
                     l->in, t, dx_t, 1.0f, beta, NULL, GEMM_ACT_NONE, 1, 0, 0, 0, 1, NULL, 0,
                     NULL};
    done = 0;
    if (gelu_in) {
        if (dx_t != t || beta != 0.0f)
            return lego_fail(c->err, LEGO_ERR_BACKEND, "internal: GELU' on a mixed-type dx");
        if (c->v.gemm->gelu_epilogue) {
            gemm_call fused = dxc;
            fused.act = GEMM_ACT_DGELU;
            fused.aux = (void *)gelu_in;
            fused.ldaux = l->in;
            TP(CUDA_TPROF_GEMM, tg_fused(c, &fused, &done));
        }
    }
    if (done) return LEGO_OK;
    TP(CUDA_TPROF_GEMM, tg_run(c, &dxc));
    if (gelu_in)
        TP(CUDA_TPROF_ROWS, t_gelu_bwd<T>(c->s, gelu_in, (const T *)dx, rows * (size_t)l->in,
                                          (T *)dx, c->err));
    return LEGO_OK;
}

/* ---- the workspace ---------------------------------------------------------------------- */

typedef struct carver {
    char *base; /* NULL while sizing */
    size_t used;
    int overflow;
} carver;

static void *carve(carver *cv, size_t n1, size_t n2, size_t elem) {
    size_t n, bytes, start, end;
    if (cv->overflow || !size_mul(n1, n2, &n) || !size_mul(n, elem, &bytes) ||
        !size_add(cv->used, DEVICE_ALIGN - 1, &start)) {
        cv->overflow = 1;
        return NULL;
    }
    start = start / DEVICE_ALIGN * DEVICE_ALIGN;
    if (!size_add(start, bytes ? bytes : 1, &end)) {
        cv->overflow = 1;
        return NULL;
    }
    cv->used = end;
    return cv->base ? cv->base + start : NULL;
}

/* How a brick's attention is trained (CUDA_OPT_TRAIN_ATTENTION chooses
 * among what applies):
 *  - ATT_FLASH: the tensor-core kernels (attention.cu's forward with its
 *    log-sum-exp, attention_bwd.cu): bf16 operands, head_dim a multiple of
 *    8 up to 128; nothing tokens x tokens in memory;
 *  - ATT_GEMM: cuBLASLt batched GEMMs with S, P and dP in a scratch; a
 *    head's columns must be 16-byte aligned;
 *  - ATT_KERNELS: the CUDA-core kernels of train_kernels.cu, any shape.
 * The default takes the kernels below ATTN_LONG_TOKENS tokens (the
 * 4-token bricks) and above it the first of FLASH, GEMM that applies. */
enum { ATT_KERNELS, ATT_GEMM, ATT_FLASH };
#define ATTN_LONG_TOKENS 32
/* The most bytes of S, dP and P one chunk of sequences takes. */
#define ATTN_SCRATCH_BYTES ((size_t)256 << 20)

static int attn_path(int mode, int tokens, int head_dim, size_t es) {
    int flash = es == 2 && head_dim % 8 == 0 && head_dim <= 128;
    int gemm = (size_t)head_dim * es % 16 == 0;
    switch (mode) {
    case 1: return ATT_KERNELS;
    case 2: return gemm ? ATT_GEMM : ATT_KERNELS;
    case 3:
        if (flash) return ATT_FLASH;
        break;
    case 4: return tokens >= ATTN_LONG_TOKENS && gemm ? ATT_GEMM : ATT_KERNELS;
    }
    if (tokens < ATTN_LONG_TOKENS) return ATT_KERNELS;
    return flash ? ATT_FLASH : gemm ? ATT_GEMM : ATT_KERNELS;
}

/* Sequences per GEMM batch: as many as fit the scratch, at least one. */
static size_t attn_chunk(size_t seqs, int tokens, size_t es) {
    size_t per = (size_t)tokens * (size_t)tokens * (8 + es), chunk = ATTN_SCRATCH_BYTES / per;
    if (chunk < 1) chunk = 1;
    return chunk < seqs ? chunk : seqs;
}

static void layout(const lego_model *m, int n, int h, int w, size_t es, int attn_mode,
                   carver *cv, train_layout *L) {
    size_t N = (size_t)n, d = (size_t)m->cfg.hidden_size, hm = (size_t)m->mlp_hidden;
    size_t heads = (size_t)m->cfg.num_heads, Lb = (size_t)m->cfg.label_dim;
    size_t K = (size_t)m->num_bricks, chw = (size_t)m->cfg.img_channels * h * w, img = 0;
    if (!size_mul(N, chw, &img)) cv->overflow = 1;
    /* The label rows are a GEMM operand: on their own aligned offset. */
    L->labels_at = round_up_floats(N * (2 + TRAIN_COEF));
    L->stage_floats = L->labels_at + N * Lb;
    L->stage = (float *)carve(cv, L->stage_floats, 1, sizeof(float));
    L->c_noise = L->stage;
    L->coef = L->stage ? L->stage + N : NULL;
    L->sigma = L->stage ? L->coef + TRAIN_COEF * N : NULL;
    L->labels = L->stage ? L->stage + L->labels_at : NULL;
    L->emb = (float *)carve(cv, N, (size_t)m->cfg.frequency_embedding_size, sizeof(float));
    float **nd[] = {&L->t_pre, &L->t_hid, &L->cond, &L->silu_c, &L->tmp, &L->dsilu, &L->dcond,
                    &L->dhid};
    for (size_t i = 0; i < sizeof nd / sizeof nd[0]; i++)
        *nd[i] = (float *)carve(cv, N, d, sizeof(float));
    L->y = (float *)carve(cv, img, 1, sizeof(float));
    L->noise = (float *)carve(cv, img, 1, sizeof(float));
    L->x = (float *)carve(cv, img, 1, sizeof(float));
    L->xin = (float *)carve(cv, img, 1, sizeof(float));
    L->outs = (float *)carve(cv, K, img, sizeof(float));
    L->douts = (float *)carve(cv, K, img, sizeof(float));
    L->fill = (float *)carve(cv, img, 1, sizeof(float));
    L->fillc = (double *)carve(cv, N, 2, sizeof(double));
    L->sums = (double *)carve(cv, K, N, sizeof(double));
    L->norm_partial = (double *)carve(cv, TRAIN_NORM_BLOCKS, 1, sizeof(double));
    L->norm = (double *)carve(cv, 1, 1, sizeof(double));

    size_t rmax = 0, wmax = 0, mmax = 0, pmax = 0, p2max = 0, smax = 0;
    for (int k = 0; k < m->num_bricks && !cv->overflow; k++) {
        const brick *b = &m->bricks[k];
        brick_dev *bd = &L->bricks[k];
        bd->g = brick_geometry(m, k, n, h, w);
        bd->total = (int)(bd->g.rows_per_image / (size_t)b->tokens);
        bd->table_mem = (int32_t *)carve(cv, N, (size_t)bd->total, sizeof(int32_t));
        size_t R = bd->g.rows, depth = (size_t)b->cfg.depth;
        size_t pw = (size_t)b->c_in * b->cfg.patch_size * b->cfg.patch_size;
        bd->patches = carve(cv, R, pw, es);
        bd->mods = (float *)carve(cv, N, depth * 6 * d + 2 * d, sizeof(float));
        for (size_t j = 0; j < depth; j++) {
            block_dev *A = &bd->blocks[j];
            A->x = (float *)carve(cv, R, d, sizeof(float));
            A->mean1 = (float *)carve(cv, R, 1, sizeof(float));
            A->rstd1 = (float *)carve(cv, R, 1, sizeof(float));
            A->h1 = carve(cv, R, d, es);
            A->qkv = carve(cv, R, 3 * d, es);
            A->att = carve(cv, R, d, es);
            A->lse = (float *)carve(cv, R, heads, sizeof(float));
            A->a = carve(cv, R, d, es);
            A->x2 = (float *)carve(cv, R, d, sizeof(float));
            A->mean2 = (float *)carve(cv, R, 1, sizeof(float));
            A->rstd2 = (float *)carve(cv, R, 1, sizeof(float));
            A->h2 = carve(cv, R, d, es);
            A->u = carve(cv, R, hm, es);
            A->g = carve(cv, R, hm, es);
            A->f = carve(cv, R, d, es);
        }
        bd->xf = (float *)carve(cv, R, d, sizeof(float));
        bd->meanf = (float *)carve(cv, R, 1, sizeof(float));
        bd->rstdf = (float *)carve(cv, R, 1, sizeof(float));
        bd->hf = carve(cv, R, d, es);
        bd->out = L->outs ? L->outs + (size_t)k * img : NULL;
        bd->dF = L->douts ? L->douts + (size_t)k * img : NULL;
        if (R > rmax) rmax = R;
        if (model_widest_activation(m, b) > wmax) wmax = model_widest_activation(m, b);
        if (attn_path(attn_mode, b->tokens, m->cfg.hidden_size / m->cfg.num_heads, es) ==
            ATT_GEMM) {
            size_t seqs = R / (size_t)b->tokens, sq;
            if (!size_mul(attn_chunk(seqs, b->tokens, es), (size_t)b->tokens * b->tokens, &sq))
                cv->overflow = 1;
            else if (sq > smax) smax = sq;
        }
        if (depth * 6 * d + 2 * d > mmax) mmax = depth * 6 * d + 2 * d;
        /* Column sums: over all rows (biases, widest output) or per image. */
        size_t pc = t_colsum_doubles(R, R, (int)wmax);
        if (pc > pmax) pmax = pc;
        pc = t_colsum_doubles(R, bd->g.rows_per_image, (int)d);
        if (pc > pmax) pmax = pc;
        if (pc > p2max) p2max = pc;
    }
    size_t pn = t_colsum_doubles(N, N, (int)(6 * d > d ? 6 * d : d));
    if (pn > pmax) pmax = pn;
    L->dx = (float *)carve(cv, rmax, d, sizeof(float));
    L->dh = (float *)carve(cv, rmax, d, sizeof(float));
    L->dtT = carve(cv, rmax, d, es);
    L->wideT = carve(cv, rmax, wmax, es);
    L->wideF = (float *)carve(cv, rmax, wmax, sizeof(float));
    L->dmods = (float *)carve(cv, N, mmax, sizeof(float));
    L->delta = (float *)carve(cv, rmax, heads, sizeof(float));
    L->partial = (double *)carve(cv, pmax, 1, sizeof(double));
    L->partial2 = (double *)carve(cv, p2max, 1, sizeof(double)); /* t_ln_bwd_sums' gate */
    L->att_s = smax ? (float *)carve(cv, smax, 1, sizeof(float)) : NULL;
    L->att_dp = smax ? (float *)carve(cv, smax, 1, sizeof(float)) : NULL;
    L->att_p = smax ? carve(cv, smax, 1, es) : NULL;
    L->bytes = cv->used;
}

/* The workspace for n images of h x w at element size es. */
static lego_status reserve(tctx *c, int n, int h, int w, size_t es) {
    train_state *ts = c->ts;
    lego_err *err = c->err;
    const lego_model *m = c->m;
    int mode = c->v.train_attn;
    if (ts->ws && ts->n == n && ts->h == h && ts->w == w && ts->esize == (int)es &&
        ts->attn_mode == mode)
        return LEGO_OK;
    carver cv = {NULL, 0, 0};
    train_layout L;
    memset(&L, 0, sizeof L);
    layout(m, n, h, w, es, mode, &cv, &L);
    if (cv.overflow || cv.used > LEGO_MAX_ALLOC)
        return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY,
                         "a training batch of %d images of %dx%d is too large", n, h, w);
    size_t bytes = cv.used;
    size_t sums = (size_t)m->num_bricks * (size_t)n;
    if (sums > ts->host_sums_count) {
        double *p = (double *)realloc(ts->host_sums, sums * sizeof *p);
        if (!p) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
        ts->host_sums = p;
        ts->host_sums_count = sums;
    }
    float *stage = (float *)realloc(ts->stage, L.stage_floats * sizeof(float));
    if (!stage) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    ts->stage = stage;
    double *fillc = (double *)realloc(ts->host_fillc, 2 * (size_t)n * sizeof *fillc);
    if (!fillc) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    ts->host_fillc = fillc;
    if (bytes > ts->ws_bytes) {
        LEGO_TRY(backend_budget(m, ts->ws_bytes, bytes, "the training activations", err));
        CU_TRY(cudaStreamSynchronize(c->s));
        if (ts->ws) cudaFree(ts->ws);
        ts->ws = NULL;
        ts->ws_bytes = 0;
        CU_TRY(cudaMalloc(&ts->ws, bytes));
        ts->ws_bytes = bytes;
    }
    cv = (carver){ts->ws, 0, 0};
    memset(&ts->L, 0, sizeof ts->L);
    layout(m, n, h, w, es, mode, &cv, &ts->L);
    ts->attn_mode = mode;
    ts->n = n;
    ts->h = h;
    ts->w = w;
    ts->esize = (int)es;
    return LEGO_OK;
}

/* ---- forward ------------------------------------------------------------------------------ */

static lego_status conditioning_fwd(tctx *c, int n) {
    const lego_model *m = c->m;
    train_layout *L = &c->ts->L;
    lego_err *err = c->err;
    const cudaDataType f32 = CUDA_R_32F;
    size_t nd = (size_t)n * m->cfg.hidden_size;
    LEGO_TRY(k_timestep_embedding(c->s, L->c_noise, c->v.freq, n, m->cfg.frequency_embedding_size,
                                  L->emb, err));
    LEGO_TRY(lin_fwd(c, &m->t_fc1, L->emb, f32, (size_t)n, L->t_pre, f32));
    LEGO_TRY(t_silu(c->s, L->t_pre, nd, L->t_hid, err));
    LEGO_TRY(lin_fwd(c, &m->t_fc2, L->t_hid, f32, (size_t)n, L->cond, f32));
    if (m->cfg.label_dim > 0) {
        LEGO_TRY(lin_fwd(c, &m->y_embed, L->labels, f32, (size_t)n, L->tmp, f32));
        LEGO_TRY(k_add(c->s, L->cond, L->tmp, nd, err));
    }
    return t_silu(c->s, L->cond, nd, L->silu_c, err);
}

/* ---- attention as batched GEMMs ------------------------------------------------------------ */

/* One head's operands for a chunk of sequences: everything in the token
 * matrices' own layout (qkv [R][3D], att and dout [R][D]), one strided
 * batch per head with a sequence per matrix.  Column-major views: a head's
 * Q of one sequence is hd x T with ld 3D; S is T x T with S(j, i) = scale
 * q_i.k_j, i.e. row-major [i][j]. */
typedef struct attn_geom {
    int T, hd, heads;
    size_t D;
    cudaDataType tt;
} attn_geom;

static gemm_call attn_call(const attn_geom *a, int ta, int tb, uint64_t M, uint64_t N,
                           uint64_t K, const void *A, int64_t lda, int64_t sa, const void *B,
                           int64_t ldb, int64_t sb, void *C, int64_t ldc, int64_t sc,
                           cudaDataType dt, float alpha, size_t batch) {
    /* Fields in gemm_call's order. */
    gemm_call call = {ta, tb, M, N, K, A, B, C, lda, ldb, ldc, a->tt, dt, alpha, 0.0f, NULL,
                      GEMM_ACT_NONE, (int)batch, sa, sb, sc, 1, NULL, 0, NULL};
    return call;
}

/* S = scale Q K^T for sequences [s0, s0 + cs) of head h into att_s. */
template <class T>
static lego_status attn_scores(tctx *c, const attn_geom *a, const T *qkv, int h, size_t s0,
                               size_t cs) {
    size_t T3 = (size_t)a->T * 3 * a->D;
    const T *q = qkv + s0 * T3 + (size_t)h * a->hd, *k = q + a->D;
    float scale = 1.0f / sqrtf((float)a->hd);
    gemm_call call = attn_call(a, 1, 0, a->T, a->T, a->hd, k, 3 * a->D, T3, q, 3 * a->D, T3,
                             c->ts->L.att_s, a->T, (int64_t)a->T * a->T, CUDA_R_32F, scale, cs);
    return tg_run(c, &call);
}

template <class T>
static lego_status attn_fwd_gemm(tctx *c, const T *qkv, size_t seqs, int tokens, int heads,
                                 int hd, T *out, float *lse) {
    train_layout *L = &c->ts->L;
    attn_geom a = {tokens, hd, heads, (size_t)heads * hd, lt_type<T>::value};
    size_t chunk = attn_chunk(seqs, tokens, sizeof(T)), T3 = (size_t)tokens * 3 * a.D;
    int64_t TT = (int64_t)tokens * tokens;
    for (int h = 0; h < heads; h++)
        for (size_t s0 = 0; s0 < seqs; s0 += chunk) {
            size_t cs = seqs - s0 < chunk ? seqs - s0 : chunk, rows = cs * (size_t)tokens;
            LEGO_TRY(attn_scores<T>(c, &a, qkv, h, s0, cs));
            LEGO_TRY(t_softmax_rows<T>(c->s, L->att_s, rows, tokens, heads, h, s0 * tokens,
                                       (T *)L->att_p, lse, c->err));
            /* O (hd x T per sequence, into out's columns of head h) = V P^T */
            const T *v = qkv + s0 * T3 + 2 * a.D + (size_t)h * hd;
            gemm_call call = attn_call(&a, 0, 0, hd, tokens, tokens, v, 3 * a.D, T3, L->att_p,
                                     tokens, TT, out + s0 * tokens * a.D + (size_t)h * hd,
                                     a.D, (int64_t)tokens * a.D, a.tt, 1.0f, cs);
            LEGO_TRY(tg_run(c, &call));
        }
    return LEGO_OK;
}

/* dqkv from dout (of type T: dO) with the same GEMMs: P recomputed from S
 * and lse, dV = dO^T P, dP = dO V^T, dS = P (dP - delta) scale, dQ = dS K,
 * dK = dS^T Q.  Every element of dqkv is written by one GEMM. */
template <class T>
static lego_status attn_bwd_gemm(tctx *c, const T *qkv, const T *dO, const float *lse,
                                 const float *delta, size_t seqs, int tokens, int heads, int hd,
                                 T *dqkv) {
    train_layout *L = &c->ts->L;
    attn_geom a = {tokens, hd, heads, (size_t)heads * hd, lt_type<T>::value};
    size_t chunk = attn_chunk(seqs, tokens, sizeof(T)), D = a.D, T3 = (size_t)tokens * 3 * D;
    int64_t TT = (int64_t)tokens * tokens, TD = (int64_t)tokens * D;
    float scale = 1.0f / sqrtf((float)hd);
    T *P = (T *)L->att_p;
    for (int h = 0; h < heads; h++)
        for (size_t s0 = 0; s0 < seqs; s0 += chunk) {
            size_t cs = seqs - s0 < chunk ? seqs - s0 : chunk, rows = cs * (size_t)tokens;
            size_t off3 = s0 * T3 + (size_t)h * hd;
            const T *q = qkv + off3, *k = q + D, *v = q + 2 * D;
            const T *go = dO + s0 * tokens * D + (size_t)h * hd;
            T *dq = dqkv + off3, *dk = dq + D, *dv = dq + 2 * D;
            LEGO_TRY(attn_scores<T>(c, &a, qkv, h, s0, cs));
            LEGO_TRY(t_attn_probs<T>(c->s, L->att_s, NULL, rows, tokens, heads, h, s0 * tokens, lse,
                                     delta, scale, P, c->err));
            gemm_call dv_call = attn_call(&a, 0, 1, hd, tokens, tokens, go, D, TD, P, tokens, TT, dv,
                                        3 * D, T3, a.tt, 1.0f, cs);
            LEGO_TRY(tg_run(c, &dv_call));
            gemm_call dp_call = attn_call(&a, 1, 0, tokens, tokens, hd, v, 3 * D, T3, go, D, TD,
                                        L->att_dp, tokens, TT, CUDA_R_32F, 1.0f, cs);
            LEGO_TRY(tg_run(c, &dp_call));
            LEGO_TRY(t_attn_probs<T>(c->s, L->att_s, L->att_dp, rows, tokens, heads, h,
                                     s0 * tokens, lse, delta, scale, P, c->err));
            gemm_call dq_call = attn_call(&a, 0, 0, hd, tokens, tokens, k, 3 * D, T3, P, tokens, TT,
                                        dq, 3 * D, T3, a.tt, 1.0f, cs);
            LEGO_TRY(tg_run(c, &dq_call));
            gemm_call dk_call = attn_call(&a, 0, 1, hd, tokens, tokens, q, 3 * D, T3, P, tokens, TT,
                                        dk, 3 * D, T3, a.tt, 1.0f, cs);
            LEGO_TRY(tg_run(c, &dk_call));
        }
    return LEGO_OK;
}

template <class T>
static lego_status brick_fwd(tctx *c, int k, int n, const float *below) {
    const lego_model *m = c->m;
    const brick *b = &m->bricks[k];
    brick_dev *bd = &c->ts->L.bricks[k];
    const int32_t *table = bd->table;
    train_layout *L = &c->ts->L;
    lego_err *err = c->err;
    cudaStream_t s = c->s;
    const cudaDataType tt = lt_type<T>::value, f32 = CUDA_R_32F;
    int D = m->cfg.hidden_size, heads = m->cfg.num_heads, hd = D / heads;
    size_t d = (size_t)D, ms = 6 * d, depth = (size_t)b->cfg.depth, N = (size_t)n;
    size_t R = bd->g.rows, rpi = bd->g.rows_per_image;
    const int path = attn_path(c->ts->attn_mode, b->tokens, hd, sizeof(T));

    for (size_t j = 0; j < depth; j++)
        LEGO_TRY(lin_fwd(c, &b->blocks[j].ada, L->silu_c, f32, N, bd->mods + j * N * ms, f32));
    float *final_mod = bd->mods + depth * N * ms;
    LEGO_TRY(lin_fwd(c, &b->final_ada, L->silu_c, f32, N, final_mod, f32));

    TP(CUDA_TPROF_ROWS, k_gather<T>(s, &bd->g, table, L->xin, below, (T *)bd->patches, err));
    float *x0 = depth ? bd->blocks[0].x : bd->xf;
    LEGO_TRY(lin_fwd(c, &b->embed, bd->patches, tt, R, x0, f32));
    const float *pos = (const float *)dev_w(c, b->pos_embed, f32);
    if (!pos) return lego_fail(err, LEGO_ERR_BACKEND, "internal: pos_embed not on the device");

    for (size_t j = 0; j < depth; j++) {
        block_dev *A = &bd->blocks[j];
        const dit_block *blk = &b->blocks[j];
        const float *mod = bd->mods + j * N * ms;
        /* Later blocks' first LayerNorm came with the residual before them. */
        if (j == 0)
            TP(CUDA_TPROF_ROWS, t_ln_fwd<T>(s, A->x, pos, b->tokens, R, D, rpi, mod, ms, A->mean1,
                                            A->rstd1, (T *)A->h1, err));
        LEGO_TRY(lin_fwd(c, &blk->qkv, A->h1, tt, R, A->qkv, tt));
        if (path == ATT_FLASH)
            TP(CUDA_TPROF_ATTENTION,
               k_attention_lse<T>(s, (const T *)A->qkv, R / (size_t)b->tokens, b->tokens, heads, hd,
                                  (T *)A->att, A->lse, err));
        else if (path == ATT_GEMM)
            TP(CUDA_TPROF_ATTENTION, attn_fwd_gemm<T>(c, (const T *)A->qkv, R / (size_t)b->tokens,
                                                      b->tokens, heads, hd, (T *)A->att, A->lse));
        else
            TP(CUDA_TPROF_ATTENTION, t_attn_fwd<T>(s, (const T *)A->qkv, R / (size_t)b->tokens,
                                                   b->tokens, heads, hd, (T *)A->att, A->lse, err));
        LEGO_TRY(lin_fwd(c, &blk->proj, A->att, tt, R, A->a, tt));
        TP(CUDA_TPROF_ROWS,
           t_gated_ln_fwd<T>(s, A->x, (const T *)A->a, R, D, rpi, mod + 2 * d, ms, A->x2,
                             mod + 3 * d, ms, A->mean2, A->rstd2, (T *)A->h2, err));
        LEGO_TRY(lin_fwd_gelu<T>(c, &blk->fc1, (const T *)A->h2, R, (T *)A->u, (T *)A->g));
        LEGO_TRY(lin_fwd(c, &blk->fc2, A->g, tt, R, A->f, tt));
        /* x' = x2 + gate2 f, and the next LayerNorm of x': the next
         * block's first or the final layer's. */
        if (j + 1 < depth) {
            block_dev *B = &bd->blocks[j + 1];
            TP(CUDA_TPROF_ROWS,
               t_gated_ln_fwd<T>(s, A->x2, (const T *)A->f, R, D, rpi, mod + 5 * d, ms, B->x,
                                 mod + N * ms, ms, B->mean1, B->rstd1, (T *)B->h1, err));
        } else {
            TP(CUDA_TPROF_ROWS,
               t_gated_ln_fwd<T>(s, A->x2, (const T *)A->f, R, D, rpi, mod + 5 * d, ms, bd->xf,
                                 final_mod, 2 * d, bd->meanf, bd->rstdf, (T *)bd->hf, err));
        }
    }
    if (depth == 0)
        TP(CUDA_TPROF_ROWS, t_ln_fwd<T>(s, bd->xf, pos, b->tokens, R, D, rpi, final_mod, 2 * d,
                                        bd->meanf, bd->rstdf, (T *)bd->hf, err));
    LEGO_TRY(lin_fwd(c, &b->final_out, bd->hf, tt, R, L->wideF, f32));
    /* Pixels outside the sampled patches keep the fill: the context the
     * brick above reads there (eq. 12). */
    if (table)
        TP(CUDA_TPROF_ROWS,
           t_copy(s, L->fill, N * m->cfg.img_channels * bd->g.h * bd->g.w, bd->out, err));
    TP(CUDA_TPROF_ROWS, t_rows_to_image(s, &bd->g, table, L->wideF, bd->out, err));
    return LEGO_OK;
}

/* ---- backward ------------------------------------------------------------------------------ */

/* The backward of a LayerNorm with adaLN modulation at the rows of a
 * brick, its gradient dy in L->dh: L->dx (+)= its input gradient (assign:
 * =), dg = dx * gate in the operand type (see t_ln_bwd), the modulation's
 * gradients (dmod: shift, dmod + D: scale, per image at stride dstride),
 * and with branch, the gradient of `gate`, which scaled branch into the
 * residual stream that dx is the gradient of: dgate = sum dx * branch
 * (a block's adaLN vector like gate: stride 6D).
 * One kernel that sums what it reads where the width allows
 * (t_ln_bwd_sums), else the row kernel and column-sum passes. */
template <class T>
static lego_status ln_backward(tctx *c, const tok_geom *g, const float *x, const float *mean,
                               const float *rstd, const float *mod, size_t stride, int assign,
                               const float *gate, T *dg, float *dmod, size_t dstride,
                               const T *branch, float *dgate) {
    train_layout *L = &c->ts->L;
    int D = c->m->cfg.hidden_size;
    size_t R = g->rows, rpi = g->rows_per_image, ms = 6 * (size_t)D;
    if (c->v.train_ln_sums && D <= LN_SUM_MAX_D) {
        TP(CUDA_TPROF_ROWS, t_ln_bwd_sums<T>(c->s, x, mean, rstd, L->dh, R, D, rpi, mod, stride,
                                             L->dx, assign, gate, ms, dg, dmod, dmod + D,
                                             dstride, branch, dgate, L->partial, L->partial2,
                                             c->err));
        return LEGO_OK;
    }
    TP(CUDA_TPROF_ROWS, t_ln_bwd<T>(c->s, x, mean, rstd, L->dh, R, D, rpi, mod, stride, L->dx,
                                    assign, gate, ms, dg, c->err));
    TP(CUDA_TPROF_SUMS, t_colsum<float>(c->s, COLSUM_LN, L->dh, x, mean, rstd, R, rpi, D, dmod,
                                        dmod + D, dstride, L->partial, c->err));
    if (branch)
        TP(CUDA_TPROF_SUMS, (t_colsum<float, T>(c->s, COLSUM_PROD, L->dx, branch, NULL, NULL, R,
                                                 rpi, D, dgate, NULL, ms, L->partial, c->err)));
    return LEGO_OK;
}

template <class T>
static lego_status brick_bwd(tctx *c, int k, int n, float *dbelow) {
    const lego_model *m = c->m;
    const brick *b = &m->bricks[k];
    brick_dev *bd = &c->ts->L.bricks[k];
    const int32_t *table = bd->table;
    train_layout *L = &c->ts->L;
    lego_err *err = c->err;
    cudaStream_t s = c->s;
    int D = m->cfg.hidden_size, heads = m->cfg.num_heads, hd = D / heads;
    size_t d = (size_t)D, ms = 6 * d, depth = (size_t)b->cfg.depth, N = (size_t)n;
    size_t R = bd->g.rows;
    T *dtT = (T *)L->dtT, *wideT = (T *)L->wideT;
    const int path = attn_path(c->ts->attn_mode, b->tokens, hd, sizeof(T));

    TP(CUDA_TPROF_ROWS, t_zero(s, L->dmods, N * (depth * ms + 2 * d), err));
    const float *final_mod = bd->mods + depth * N * ms;
    float *dfinal = L->dmods + depth * N * ms;

    /* Final layer: F = unpatchify(LN(xf)(1+scale)+shift) Wo^T + bo */
    TP(CUDA_TPROF_ROWS, t_image_to_rows<T>(s, &bd->g, table, bd->dF, wideT, err));
    LEGO_TRY(lin_bwd<T>(c, &b->final_out, (const T *)bd->hf, wideT, R, L->dh, 0.0f));
    /* Each LayerNorm backward finishes dx for the layer below it and writes
     * what that layer's backward reads first: dx times the gate of the
     * block's residual branch (dtT), or below the first block, dx in the
     * operand type (bf16; fp32 reads dx itself). */
    /* Each LayerNorm's backward also gives the gradient of the gate of
     * the residual branch above it (gate2 of the block below, or gate1 of
     * its own block), whose dx it has just finished. */
    T *below_dx = sizeof(T) != sizeof(float) ? dtT : NULL;
    const float *gate = depth ? bd->mods + (depth - 1) * N * ms + 5 * d : NULL;
    const T *branch = depth ? (const T *)bd->blocks[depth - 1].f : NULL;
    float *dgate = depth ? L->dmods + (depth - 1) * N * ms + 5 * d : NULL;
    LEGO_TRY(ln_backward<T>(c, &bd->g, bd->xf, bd->meanf, bd->rstdf, final_mod, 2 * d, 1, gate,
                            depth ? dtT : below_dx, dfinal, 2 * d, branch, dgate));

    for (int j = (int)depth - 1; j >= 0; j--) {
        const block_dev *A = &bd->blocks[j];
        const dit_block *blk = &b->blocks[j];
        const float *mod = bd->mods + (size_t)j * N * ms;
        float *dmod = L->dmods + (size_t)j * N * ms;
        /* MLP branch: x' = x2 + gate2 fc2(GELU(fc1(h2))); dtT = dx gate2
         * (gate2's gradient came with dx). */
        /* dL/du = (dL/dg) GELU'(u) in the operand type (half the bytes in
         * bf16), in fc2's input-gradient GEMM where cuBLASLt can. */
        LEGO_TRY(lin_bwd<T>(c, &blk->fc2, (const T *)A->g, dtT, R, wideT, 0.0f, lt_type<T>::value,
                            (const T *)A->u));
        LEGO_TRY(lin_bwd<T>(c, &blk->fc1, (const T *)A->h2, wideT, R, L->dh, 0.0f));
        LEGO_TRY(ln_backward<T>(c, &bd->g, A->x2, A->mean2, A->rstd2, mod + 3 * d, ms, 0,
                                mod + 2 * d, dtT, dmod + 3 * d, ms, (const T *)A->a,
                                dmod + 2 * d));
        /* Attention branch: x2 = x + gate1 proj(attention(qkv(h1))); dtT =
         * dx gate1. */
        LEGO_TRY(lin_bwd<T>(c, &blk->proj, (const T *)A->att, dtT, R, L->dh, 0.0f));
        if (path != ATT_KERNELS) {
            /* dO as an operand, converted by the delta kernel (dtT is free
             * again after proj's backward). */
            T *dO_t = sizeof(T) != sizeof(float) ? dtT : NULL;
            const T *dO = dO_t ? dO_t : (const T *)L->dh;
            TP(CUDA_TPROF_ATTENTION,
               t_attn_delta<T>(s, L->dh, (const T *)A->att, R, heads, hd, L->delta, dO_t, err));
            if (path == ATT_FLASH)
                TP(CUDA_TPROF_ATTENTION,
                   k_attention_bwd<T>(s, (const T *)A->qkv, dO, A->lse, L->delta,
                                      R / (size_t)b->tokens, b->tokens, heads, hd, wideT, err));
            else
                TP(CUDA_TPROF_ATTENTION,
                   attn_bwd_gemm<T>(c, (const T *)A->qkv, dO, A->lse, L->delta,
                                    R / (size_t)b->tokens, b->tokens, heads, hd, wideT));
        } else {
            TP(CUDA_TPROF_ATTENTION,
               t_attn_bwd<T>(s, (const T *)A->qkv, (const T *)A->att, A->lse, L->dh,
                             R / (size_t)b->tokens, b->tokens, heads, hd, L->delta, wideT, err));
        }
        LEGO_TRY(lin_bwd<T>(c, &blk->qkv, (const T *)A->h1, wideT, R, L->dh, 0.0f));
        gate = j > 0 ? mod - N * ms + 5 * d : NULL;
        branch = j > 0 ? (const T *)bd->blocks[j - 1].f : NULL;
        dgate = j > 0 ? dmod - N * ms + 5 * d : NULL;
        LEGO_TRY(ln_backward<T>(c, &bd->g, A->x, A->mean1, A->rstd1, mod, ms, 0, gate,
                                j > 0 ? dtT : below_dx, dmod, ms, branch, dgate));
    }

    /* Patch embedding (the position embedding is fixed). */
    const T *dxT = below_dx ? below_dx : (const T *)L->dx;
    LEGO_TRY(lin_bwd<T>(c, &b->embed, (const T *)bd->patches, dxT, R, dbelow ? L->wideF : NULL,
                        0.0f));
    if (dbelow) TP(CUDA_TPROF_ROWS, t_below_grad(s, &bd->g, table, L->wideF, dbelow, err));

    /* The adaLN linears all read SiLU(c). */
    for (size_t j = 0; j < depth; j++)
        LEGO_TRY(lin_bwd<float>(c, &b->blocks[j].ada, L->silu_c, L->dmods + j * N * ms, N,
                                L->dsilu, 1.0f));
    return lin_bwd<float>(c, &b->final_ada, L->silu_c, dfinal, N, L->dsilu, 1.0f);
}

static lego_status conditioning_bwd(tctx *c, int n) {
    const lego_model *m = c->m;
    train_layout *L = &c->ts->L;
    lego_err *err = c->err;
    size_t nd = (size_t)n * m->cfg.hidden_size, N = (size_t)n;
    LEGO_TRY(t_silu_bwd(c->s, L->cond, L->dsilu, nd, L->dcond, err));
    LEGO_TRY(lin_bwd<float>(c, &m->t_fc2, L->t_hid, L->dcond, N, L->dhid, 0.0f));
    LEGO_TRY(t_silu_bwd(c->s, L->t_pre, L->dhid, nd, L->dhid, err));
    LEGO_TRY(lin_bwd<float>(c, &m->t_fc1, L->emb, L->dhid, N, NULL, 0.0f));
    if (m->cfg.label_dim > 0)
        LEGO_TRY(lin_bwd<float>(c, &m->y_embed, L->labels, L->dcond, N, NULL, 0.0f));
    return LEGO_OK;
}

/* ---- one loss (and gradient) ------------------------------------------------------------------
 */

/* The handle's view and training state (created on first use). */
static lego_status open_ctx(lego_model *m, tctx *c, lego_err *err) {
    memset(c, 0, sizeof *c);
    c->m = m;
    c->err = err;
    LEGO_TRY(backend_view_sync(m, &c->v, err));
    c->s = c->v.stream;
    if (!*c->v.train) {
        train_state *ts = (train_state *)calloc(1, sizeof *ts);
        if (!ts) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
        *c->v.train = ts;
    }
    c->ts = (train_state *)*c->v.train;
    if (c->ts->grads_floats != c->v.params_used) {
        train_state *ts = c->ts;
        LEGO_TRY(backend_budget(m, ts->grads_floats * sizeof(float),
                                c->v.params_used * sizeof(float), "the gradient", err));
        CU_TRY(cudaStreamSynchronize(c->s));
        if (ts->grads) cudaFree(ts->grads);
        ts->grads = NULL;
        ts->grads_floats = 0;
        CU_TRY(cudaMalloc(&ts->grads, c->v.params_used * sizeof(float)));
        ts->grads_floats = c->v.params_used;
    }
    return LEGO_OK;
}

/* The loss of batch b on the device, and with `grads` the gradient in
 * ts->grads. */
template <class T>
static lego_status loss_grads(tctx *c, const cuda_train_batch *b, int grads, double *loss) {
    lego_model *m = c->m;
    train_state *ts = c->ts;
    lego_err *err = c->err;
    cudaStream_t s = c->s;
    int n = b->n, K = m->num_bricks, L = m->cfg.label_dim;
    LEGO_TRY(reserve(c, n, b->h, b->w, sizeof(T)));
    tmark(c, -1); /* uploads, noise and conditioning count as input */
    train_layout *Lo = &ts->L;
    size_t chw = (size_t)m->cfg.img_channels * b->h * b->w, img = (size_t)n * chw;

    /* Per-image values as the CPU computes them (train.c, backward_cpu.c). */
    float *c_noise = ts->stage, *coef = c_noise + n, *sigma = coef + TRAIN_COEF * (size_t)n;
    float *labels = ts->stage + Lo->labels_at;
    double sd = m->cfg.sigma_data, sd2 = sd * sd;
    for (int i = 0; i < n; i++) {
        double sg = b->sigma[i], s2 = sg * sg;
        c_noise[i] = logf(b->sigma[i]) / 4.0f;
        float c_out = (float)(sg * sd / sqrt(s2 + sd2));
        float weight = (float)((s2 + sd2) / (sg * sd * sg * sd));
        coef[TRAIN_COEF * i] = (float)(1.0 / sqrt((double)b->sigma[i] * b->sigma[i] + sd2));
        coef[TRAIN_COEF * i + 1] = (float)(sd2 / (s2 + sd2));
        coef[TRAIN_COEF * i + 2] = c_out;
        coef[TRAIN_COEF * i + 3] = (float)(2.0 * weight * c_out / ((double)n * K));
        sigma[i] = b->sigma[i];
    }
    if (L > 0) {
        size_t nl = (size_t)n * L;
        if (b->labels) memcpy(labels, b->labels, nl * sizeof *labels);
        else memset(labels, 0, nl * sizeof *labels);
    }
    CU_TRY(cudaMemcpyAsync(Lo->stage, ts->stage, Lo->stage_floats * sizeof(float),
                           cudaMemcpyHostToDevice, s));
    CU_TRY(cudaMemcpyAsync(Lo->y, b->y, img * sizeof(float), cudaMemcpyHostToDevice, s));
    if (b->noise)
        CU_TRY(cudaMemcpyAsync(Lo->noise, b->noise, img * sizeof(float), cudaMemcpyHostToDevice,
                               s));
    else
        LEGO_TRY(k_philox_normal(s, b->noise_seed, b->noise_stream, 0, img, Lo->noise, err));

    /* Each brick's patches this batch (eq. 12), and the fill where some
     * brick skips some. */
    train_loss_tables tb;
    memset(&tb, 0, sizeof tb);
    int sampling = 0;
    for (int k = 0; k < K; k++) {
        brick_dev *bd = &Lo->bricks[k];
        bd->g = brick_geometry(m, k, n, b->h, b->w);
        bd->table = NULL;
        bd->used = bd->total;
        if (b->table[k]) {
            if (b->used[k] < 1 || b->used[k] > bd->total)
                return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                                 "internal: brick %d runs %d of %d patches", k, b->used[k],
                                 bd->total);
            bd->used = b->used[k];
            bd->g.rows_per_image = (size_t)bd->used * (size_t)m->bricks[k].tokens;
            bd->g.rows = (size_t)n * bd->g.rows_per_image;
            CU_TRY(cudaMemcpyAsync(bd->table_mem, b->table[k],
                                   (size_t)n * bd->used * sizeof(int32_t), cudaMemcpyHostToDevice,
                                   s));
            bd->table = bd->table_mem;
            sampling = 1;
        }
        tb.table[k] = bd->table;
        tb.used[k] = bd->used;
        tb.bs[k] = m->bricks[k].cfg.brick_size;
        tb.patches_x[k] = bd->g.patches_x;
        tb.scale[k] = (float)bd->total / (float)bd->used;
    }
    LEGO_TRY(t_noisy_input(s, Lo->y, Lo->noise, Lo->coef, Lo->sigma, n, chw, Lo->x, Lo->xin, err));
    if (sampling) {
        /* The F that denoises to the clean image (train.c's fill). */
        for (int i = 0; i < n; i++) {
            double sg = b->sigma[i], r = sqrt(sg * sg + sd * sd);
            ts->host_fillc[2 * i] = sg / (sd * r);
            ts->host_fillc[2 * i + 1] = sd / r;
        }
        CU_TRY(cudaMemcpyAsync(Lo->fillc, ts->host_fillc, 2 * (size_t)n * sizeof(double),
                               cudaMemcpyHostToDevice, s));
        LEGO_TRY(t_fill(s, Lo->y, Lo->noise, Lo->fillc, n, chw, Lo->fill, err));
    }
    TP(CUDA_TPROF_INPUT, conditioning_fwd(c, n));
    for (int k = 0; k < K; k++)
        LEGO_TRY(brick_fwd<T>(c, k, n, k > 0 ? Lo->bricks[k - 1].out : NULL));
    TP(CUDA_TPROF_INPUT, t_loss(s, Lo->x, Lo->y, Lo->outs, Lo->coef, n, K, m->cfg.img_channels,
                                b->w, chw, &tb, Lo->douts, Lo->sums, err));
    CU_TRY(cudaMemcpyAsync(ts->host_sums, Lo->sums, (size_t)K * n * sizeof(double),
                           cudaMemcpyDeviceToHost, s));
    if (grads) {
        LEGO_TRY(t_zero(s, ts->grads, ts->grads_floats, err));
        LEGO_TRY(t_zero(s, Lo->dsilu, (size_t)n * m->cfg.hidden_size, err));
        for (int k = K - 1; k >= 0; k--)
            LEGO_TRY(brick_bwd<T>(c, k, n, k > 0 ? Lo->bricks[k - 1].dF : NULL));
        TP(CUDA_TPROF_INPUT, conditioning_bwd(c, n));
    }
    CU_TRY(cudaStreamSynchronize(s));
    double total = 0;
    for (int i = 0; i < n; i++) {
        double sg = b->sigma[i], s2 = sg * sg;
        float weight = (float)((s2 + sd2) / (sg * sd * sg * sd));
        for (int k = 0; k < K; k++)
            total += weight * ((double)tb.scale[k] * ts->host_sums[(size_t)k * n + i]);
    }
    *loss = total / ((double)n * K);
    (void)img;
    return LEGO_OK;
}

static lego_status run_loss(tctx *c, const cuda_train_batch *b, int grads, double *loss) {
    if (c->v.precision == CUDA_PRECISION_BF16) return loss_grads<bf16>(c, b, grads, loss);
    return loss_grads<float>(c, b, grads, loss);
}

/* Copy a device buffer in the weights' layout to a host array in the
 * params layout, tensor by tensor. */
static lego_status download(tctx *c, const float *dev, float *host) {
    lego_err *err = c->err;
    const lego_model *m = c->m;
    for (int i = 0; i < m->num_params; i++) {
        const lego_param *p = &m->table[i];
        CU_TRY(cudaMemcpyAsync(host + p->offset, dev + c->v.doff[i], p->numel * sizeof(float),
                               cudaMemcpyDeviceToHost, c->s));
    }
    return LEGO_OK;
}

static lego_status upload(tctx *c, const float *host, float *dev) {
    lego_err *err = c->err;
    const lego_model *m = c->m;
    for (int i = 0; i < m->num_params; i++) {
        const lego_param *p = &m->table[i];
        CU_TRY(cudaMemcpyAsync(dev + c->v.doff[i], host + p->offset, p->numel * sizeof(float),
                               cudaMemcpyHostToDevice, c->s));
    }
    return LEGO_OK;
}

extern "C" lego_status cuda_train_loss(lego_model *m, const cuda_train_batch *b, double *loss,
                                       float *grads, lego_err *err) {
    int device = backend_device(m);
    if (device < 0) return lego_fail(err, LEGO_ERR_STATE, "the model is not on the CUDA backend");
    device_guard guard(device);
    CU_TRY(guard.status);
    tctx c;
    lego_status s = open_ctx(m, &c, err);
    if (s == LEGO_OK) s = run_loss(&c, b, grads != NULL, loss);
    if (s == LEGO_OK && grads) {
        /* Fixed tensors and the padding hold zeros: the host gets the
         * CPU's layout with zeros for the fixed ones. */
        s = download(&c, c.ts->grads, grads);
        if (s == LEGO_OK) s = cu_status(cudaStreamSynchronize(c.s), err, "gradient download");
    }
    if (s != LEGO_OK && c.s) cudaStreamSynchronize(c.s);
    return s;
}

/* ---- the trainer ------------------------------------------------------------------------------
 */

/* Copy the attached trainer's state (and the weights, unless the host
 * moved on) back to the host. */
static lego_status pull(tctx *c) {
    train_state *ts = c->ts;
    lego_err *err = c->err;
    if (!ts->ahead) return LEGO_OK;
    if (c->m->weights_gen == ts->gen) LEGO_TRY(download(c, c->v.params, c->m->params));
    if (ts->owner && ts->opt) {
        LEGO_TRY(download(c, ts->opt, ts->h_m));
        LEGO_TRY(download(c, ts->opt + ts->opt_floats, ts->h_v));
        LEGO_TRY(download(c, ts->opt + 2 * ts->opt_floats, ts->h_ema));
    }
    CU_TRY(cudaStreamSynchronize(c->s));
    ts->ahead = 0;
    return LEGO_OK;
}

/* Make `t` the attached trainer: its host state uploaded. */
static lego_status attach(tctx *c, const cuda_trainer_link *t) {
    train_state *ts = c->ts;
    lego_err *err = c->err;
    const lego_model *m = c->m;
    if (ts->owner == t->owner && ts->opt && ts->opt_floats == c->v.params_used) return LEGO_OK;
    LEGO_TRY(pull(c));
    if (ts->attached) *ts->attached = 0;
    ts->owner = NULL;
    ts->attached = NULL;
    if (ts->opt_floats != c->v.params_used) {
        size_t old = 3 * ts->opt_floats * sizeof(float) + (ts->mask ? ts->opt_floats : 0);
        size_t want = c->v.params_used * (3 * sizeof(float) + 1);
        LEGO_TRY(backend_budget(m, old, want, "the optimiser state", err));
        CU_TRY(cudaStreamSynchronize(c->s));
        free_opt(ts);
        CU_TRY(cudaMalloc(&ts->opt, 3 * c->v.params_used * sizeof(float)));
        CU_TRY(cudaMalloc(&ts->mask, c->v.params_used));
        ts->opt_floats = c->v.params_used;
    }
    size_t nf = ts->opt_floats;
    unsigned char *mask = (unsigned char *)calloc(nf, 1);
    if (!mask) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    for (int i = 0; i < m->num_params; i++)
        if (!m->table[i].fixed) memset(mask + c->v.doff[i], 1, m->table[i].numel);
    lego_status s = cu_status(cudaMemcpyAsync(ts->mask, mask, nf, cudaMemcpyHostToDevice, c->s),
                              err, "cudaMemcpyAsync (mask)");
    if (s == LEGO_OK) s = cu_status(cudaStreamSynchronize(c->s), err, "mask upload");
    free(mask);
    LEGO_TRY(s);
    /* Zero padding, then the tensors. */
    LEGO_TRY(t_zero(c->s, ts->opt, 3 * nf, err));
    LEGO_TRY(upload(c, t->adam_m, ts->opt));
    LEGO_TRY(upload(c, t->adam_v, ts->opt + nf));
    LEGO_TRY(upload(c, t->ema, ts->opt + 2 * nf));
    CU_TRY(cudaStreamSynchronize(c->s));
    ts->owner = t->owner;
    ts->h_m = t->adam_m;
    ts->h_v = t->adam_v;
    ts->h_ema = t->ema;
    ts->attached = t->attached;
    *ts->attached = 1;
    return LEGO_OK;
}

extern "C" lego_status cuda_train_grads(lego_model *m, const cuda_trainer_link *t,
                                        const cuda_train_batch *b, double *loss, double *norm,
                                        lego_err *err) {
    int device = backend_device(m);
    if (device < 0) return lego_fail(err, LEGO_ERR_STATE, "the model is not on the CUDA backend");
    device_guard guard(device);
    CU_TRY(guard.status);
    tctx c;
    lego_status s = open_ctx(m, &c, err);
    if (s == LEGO_OK) s = attach(&c, t);
    if (s == LEGO_OK) s = run_loss(&c, b, 1, loss);
    if (s == LEGO_OK)
        s = t_sumsq(c.s, c.ts->grads, c.ts->grads_floats, c.ts->L.norm_partial, c.ts->L.norm, err);
    if (s == LEGO_OK) tmark(&c, CUDA_TPROF_OPTIMIZER);
    double sq = 0;
    if (s == LEGO_OK)
        s = cu_status(cudaMemcpyAsync(&sq, c.ts->L.norm, sizeof sq, cudaMemcpyDeviceToHost, c.s),
                      err, "cudaMemcpyAsync (norm)");
    if (s == LEGO_OK) s = cu_status(cudaStreamSynchronize(c.s), err, "gradient norm");
    if (s == LEGO_OK) *norm = sqrt(sq);
    if (s != LEGO_OK && c.s) cudaStreamSynchronize(c.s);
    return s;
}

extern "C" lego_status cuda_train_update(lego_model *m, const cuda_trainer_link *t,
                                         const cuda_adam_step *a, lego_err *err) {
    int device = backend_device(m);
    if (device < 0) return lego_fail(err, LEGO_ERR_STATE, "the model is not on the CUDA backend");
    device_guard guard(device);
    CU_TRY(guard.status);
    tctx c;
    LEGO_TRY(open_ctx(m, &c, err));
    train_state *ts = c.ts;
    if (ts->owner != t->owner || !ts->opt)
        return lego_fail(err, LEGO_ERR_STATE, "internal: the trainer is not on the device");
    train_adam ad;
    ad.lr = a->lr;
    ad.beta1 = a->beta1;
    ad.beta2 = a->beta2;
    ad.eps = a->eps;
    ad.weight_decay = a->weight_decay;
    double bc1 = 1.0 - pow(a->beta1, (double)a->adam_t),
           bc2 = 1.0 - pow(a->beta2, (double)a->adam_t);
    ad.step_size = a->lr / bc1;
    ad.sqrt_bc2 = sqrt(bc2);
    ad.gscale = a->gscale;
    ad.ema_beta = a->ema_beta;
    ad.adamw = a->adamw;
    size_t nf = ts->opt_floats;
    tmark(&c, -1);
    lego_status s = t_adam(c.s, c.v.params, ts->grads, ts->opt, ts->opt + nf, ts->opt + 2 * nf,
                           ts->mask, nf, &ad, err);
    if (s == LEGO_OK) s = cu_status(cudaStreamSynchronize(c.s), err, "optimiser step");
    if (s == LEGO_OK) tmark(&c, CUDA_TPROF_OPTIMIZER);
    if (s != LEGO_OK) {
        cudaStreamSynchronize(c.s);
        return s;
    }
    /* The device weights are now the host's generation plus this update
     * (open_ctx re-uploaded them if the host had moved on). */
    ts->gen = m->weights_gen;
    ts->ahead = 1;
    backend_weights_written(m);
    return LEGO_OK;
}

extern "C" lego_status cuda_backend_pull(lego_model *m, lego_err *err) {
    int device = backend_device(m);
    if (device < 0) return LEGO_OK;
    device_guard guard(device);
    CU_TRY(guard.status);
    tctx c;
    memset(&c, 0, sizeof c);
    c.m = m;
    c.err = err;
    /* No sync of the weights here: that would upload the stale host copy. */
    lego_status s = backend_view_peek(m, &c.v, err);
    if (s != LEGO_OK || !*c.v.train) return s;
    c.s = c.v.stream;
    c.ts = (train_state *)*c.v.train;
    if (c.ts->ahead && m->weights_gen == c.ts->gen && c.v.params_used != (size_t)0) {
        /* The layout the device copy was made with must still be the model's. */
        if (c.v.doff_count != m->num_params)
            return lego_fail(err, LEGO_ERR_STATE, "the model changed shape since its last step");
    }
    return pull(&c);
}

extern "C" void cuda_train_detach(lego_model *m, const void *owner) {
    if (!m || backend_device(m) < 0) return;
    device_guard guard(backend_device(m));
    backend_view v;
    lego_err err;
    if (backend_view_peek(m, &v, &err) != LEGO_OK || !*v.train) return;
    train_state *ts = (train_state *)*v.train;
    if (ts->owner != owner) return;
    if (ts->attached) *ts->attached = 0;
    ts->owner = NULL;
    ts->attached = NULL;
    ts->h_m = ts->h_v = ts->h_ema = NULL;
    /* The weights stay as they are; the model's copy is still pulled on
     * demand. */
}

extern "C" lego_status cuda_train_profile(lego_model *m, int enable, double ms[CUDA_TPROF_PARTS]) {
    int device = backend_device(m);
    if (device < 0)
        return lego_fail(&m->err, LEGO_ERR_STATE, "the model is not on the CUDA backend");
    device_guard guard(device);
    lego_err *err = &m->err;
    CU_TRY(guard.status);
    tctx c;
    LEGO_TRY(open_ctx(m, &c, err));
    train_state *ts = c.ts;
    if (ms) memcpy(ms, ts->prof_ms, sizeof ts->prof_ms);
    if (enable && !ts->profile) memset(ts->prof_ms, 0, sizeof ts->prof_ms);
    ts->profile = enable != 0;
    return LEGO_OK;
}
