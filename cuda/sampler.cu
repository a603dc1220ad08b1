/*
 * sampler.cu -- lego_sample's loop on the device (cuda_backend_sample).
 *
 * The host (src/sample.c) plans every step with solver_plan_step, the same
 * scalars the CPU solver (src/solver.c) uses, and draws what only it can
 * draw: the labels, and with the PyTorch generator the latents and the
 * churn noise of the whole run.  Here:
 *
 *   1. one upload: a step counter, the seeds and the table of per-step
 *      values (solver scalars, c_noise and the EDM coefficients of each
 *      evaluation, computed on the host as cuda_backend_denoise does); the
 *      latents and the PyTorch noise when the host drew them; the label
 *      rows (cuda_eval_plan);
 *   2. x = latents * sigma_0 on the device, the latents drawn by Philox
 *      there unless given (stream 0 of each image's seed);
 *   3. per step, only launches: the step's kernels read their values from
 *      table[*counter] and the last one advances the counter, so every
 *      step of a kind (same bricks, churn or not, Heun correction or not,
 *      DPM-Solver++ order) is the same work.  With graphs on, the first
 *      step of a kind runs eagerly (which prepares its GEMMs) and is then
 *      captured; later steps of that kind, in this run or the next at the
 *      same size, replay it: one graph launch per step;
 *   4. one download of x (float64) at the end, and one synchronisation.
 *
 * x, x_hat and d (EDM) are float64 as in the CPU solver; the solver
 * arithmetic uses explicitly rounded operations (__dadd_rn ...), so no
 * multiply-add is fused and each step computes exactly what solver.c
 * computes from the same D.  Churn noise from Philox is the CPU's
 * philox_normal_f64 (stream 2 + step); the network sees x rounded to float.
 */
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"
#include "philox_device.h"

/* Step graphs kept per handle: a run needs a few kinds (first/last step,
 * churn range, a skipped brick). */
#define STEP_GRAPHS 8
#define TABLE_STEPS 128

/* The values of one step, read by its kernels from the device table. */
typedef struct dev_step {
    double t_hat, t_next, kick;               /* EDM                       */
    double ratio, weight, coef_d, coef_old;   /* DPM-Solver++(2M)          */
    uint64_t stream;                          /* Philox churn: 2 + step    */
    uint64_t noise_off;                       /* PyTorch churn: first value */
    float c_noise[2];                         /* per evaluation            */
    float coef[2][3];                         /* c_in, c_skip, c_out       */
} dev_step;

/* What a captured step depends on; zero-initialised, compared bytewise. */
typedef struct step_key {
    unsigned char net[CUDA_EVAL_KEY_BYTES]; /* the network evaluation       */
    int dpm, churn_mode, heun, dpm_mode;
    const void *counter, *seeds, *table, *x, *x_hat, *d_cur, *old_den, *noise;
} step_key;

typedef struct step_graph {
    cudaGraphExec_t exec; /* NULL with `failed`: this kind stays eager */
    step_key key;
    int failed;
} step_graph;

struct cuda_sampler {
    step_graph graphs[STEP_GRAPHS];
    int next_graph;
    uint64_t captures, launches;
    char *stage; /* host staging of the upload */
    size_t stage_bytes;
};

enum { CHURN_NONE = 0, CHURN_PHILOX = 1, CHURN_TORCH = 2 };
enum { DPM_FIRST = 0, DPM_SECOND = 1, DPM_LAST = 2 };

/* The loop's buffers in the workspace after the network's, each on
 * DEVICE_ALIGN.  The header (counter, seeds, table: contiguous) is one
 * upload. */
typedef struct samp_layout {
    uint32_t *counter;
    uint64_t *seeds;   /* n               */
    dev_step *table;   /* steps           */
    size_t head_bytes; /* counter .. table */
    double *x, *x_hat, *d_cur; /* n x chw */
    float *old_den;    /* n x chw, DPM    */
    float *latents;    /* n x chw, when uploaded */
    double *noise;     /* slots x n x chw, PyTorch churn */
    size_t bytes;
} samp_layout;

static size_t align_up(size_t v) { return (v + DEVICE_ALIGN - 1) / DEVICE_ALIGN * DEVICE_ALIGN; }

/* Byte offsets from `base` (NULL: only count).  Sizes were bounded by
 * lego_sample's checks (n x chw far below 2^40). */
static void *take(char *base, size_t *used, size_t bytes) {
    void *p = base ? base + *used : NULL;
    *used += align_up(bytes ? bytes : 1);
    return p;
}

static void plan_buffers(const cuda_sample_run *r, size_t len, char *base, samp_layout *l) {
    size_t used = 0;
    int dpm = r->solver == LEGO_SOLVER_DPMPP_2M;
    /* What the step graphs use first, at addresses that do not depend on
     * the number of steps (so runs of other lengths replay them too). */
    l->x = (double *)take(base, &used, len * sizeof(double));
    l->x_hat = dpm ? NULL : (double *)take(base, &used, len * sizeof(double));
    l->d_cur = dpm ? NULL : (double *)take(base, &used, len * sizeof(double));
    l->old_den = dpm ? (float *)take(base, &used, len * sizeof(float)) : NULL;
    size_t head = used;
    l->counter = (uint32_t *)take(base, &used, sizeof(uint32_t));
    l->seeds = (uint64_t *)take(base, &used, (size_t)r->n * sizeof(uint64_t));
    /* Room for TABLE_STEPS-step multiples: runs of other lengths mostly
     * fit without growing the workspace (which would drop the graphs). */
    size_t table_steps = ((size_t)r->steps + TABLE_STEPS - 1) / TABLE_STEPS * TABLE_STEPS;
    l->table = (dev_step *)take(base, &used, table_steps * sizeof(dev_step));
    l->head_bytes = used - head;
    l->latents = r->latents ? (float *)take(base, &used, len * sizeof(float)) : NULL;
    l->noise = r->noise && r->noise_slots > 0
                   ? (double *)take(base, &used, (size_t)r->noise_slots * len * sizeof(double))
                   : NULL;
    l->bytes = used;
}

/* ---- kernels ------------------------------------------------------------------ */

/* Rounded separately: no fused multiply-add, as the CPU computes. */
__device__ __forceinline__ double rn_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double rn_sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double rn_mul(double a, double b) { return __dmul_rn(a, b); }

__device__ __forceinline__ size_t thread_index(void) {
    return blockIdx.x * (size_t)blockDim.x + threadIdx.x;
}
__device__ __forceinline__ size_t thread_stride(void) {
    return (size_t)gridDim.x * blockDim.x;
}

/* The network's per-image values of evaluation `ev` of the current step. */
__device__ __forceinline__ void stage_eval(const dev_step *st, int ev, int n, int nb,
                                           float *c_noise, float *coef) {
    for (size_t i = thread_index(); i < (size_t)nb; i += thread_stride()) {
        c_noise[i] = st->c_noise[ev];
        if (i < (size_t)n)
            for (int j = 0; j < 3; j++) coef[3 * i + j] = st->coef[ev][j];
    }
}

/* x = latents * sigma0; one thread per Philox block of 4 values of an
 * image (the latents of image i are stream 0 of seed i, from element 0). */
__global__ void init_x_kernel(const float *latents, const uint64_t *seeds, int n, size_t chw,
                              double sigma0, double *x) {
    size_t per = (chw + 3) / 4, total = (size_t)n * per;
    for (size_t t = thread_index(); t < total; t += thread_stride()) {
        size_t i = t / per, b = t % per;
        double z[4] = {0, 0, 0, 0};
        if (!latents) philox_normal4(seeds[i], 0, b, z);
        for (int lane = 0; lane < 4; lane++) {
            size_t j = 4 * b + (size_t)lane;
            if (j >= chw) break;
            size_t at = i * chw + j;
            float v = latents ? latents[at] : (float)z[lane];
            x[at] = rn_mul((double)v, sigma0);
        }
    }
}

/* EDM, the start of a step: x_hat = x (+ kick * noise), the network's
 * input, and the first evaluation's values. */
__global__ void edm_begin_kernel(const dev_step *table, const uint32_t *counter, int churn,
                                 const uint64_t *seeds, const double *noise, int n, int nb,
                                 size_t chw, const double *x, double *x_hat, float *xf,
                                 float *c_noise, float *coef) {
    const dev_step *st = &table[*counter];
    stage_eval(st, 0, n, nb, c_noise, coef);
    double kick = st->kick;
    size_t per = (chw + 3) / 4, total = (size_t)n * per;
    for (size_t t = thread_index(); t < total; t += thread_stride()) {
        size_t i = t / per, b = t % per;
        double z[4] = {0, 0, 0, 0};
        if (churn == CHURN_PHILOX) philox_normal4(seeds[i], st->stream, b, z);
        for (int lane = 0; lane < 4; lane++) {
            size_t j = 4 * b + (size_t)lane;
            if (j >= chw) break;
            size_t at = i * chw + j;
            double v = x[at];
            if (churn == CHURN_PHILOX) v = rn_add(v, rn_mul(kick, z[lane]));
            else if (churn == CHURN_TORCH) v = rn_add(v, rn_mul(kick, noise[st->noise_off + at]));
            x_hat[at] = v;
            xf[at] = (float)v;
        }
    }
}

/* EDM, after D(x_hat; t_hat): the Euler step; with Heun also d kept and
 * the second evaluation's input and values. */
__global__ void edm_euler_kernel(const dev_step *table, const uint32_t *counter, int heun, int n,
                                 int nb, size_t len, const float *den, const double *x_hat,
                                 double *d_cur, double *x, float *xf, float *c_noise,
                                 float *coef) {
    const dev_step *st = &table[*counter];
    if (heun) stage_eval(st, 1, n, nb, c_noise, coef);
    double t_hat = st->t_hat, step = rn_sub(st->t_next, st->t_hat);
    for (size_t i = thread_index(); i < len; i += thread_stride()) {
        double d = rn_sub(x_hat[i], (double)den[i]) / t_hat;
        double v = rn_add(x_hat[i], rn_mul(step, d));
        x[i] = v;
        if (heun) {
            d_cur[i] = d;
            xf[i] = (float)v;
        }
    }
}

/* EDM, after D(x; t_next): the second-order correction. */
__global__ void edm_heun_kernel(const dev_step *table, const uint32_t *counter, size_t len,
                                const float *den, const double *x_hat, const double *d_cur,
                                double *x) {
    const dev_step *st = &table[*counter];
    double t_next = st->t_next, step = rn_sub(st->t_next, st->t_hat);
    for (size_t i = thread_index(); i < len; i += thread_stride()) {
        double d_prime = rn_sub(x[i], (double)den[i]) / t_next;
        x[i] = rn_add(x_hat[i], rn_mul(step, rn_add(rn_mul(0.5, d_cur[i]), rn_mul(0.5, d_prime))));
    }
}

/* DPM-Solver++(2M), the start of a step: the network's input and values. */
__global__ void dpm_begin_kernel(const dev_step *table, const uint32_t *counter, int n, int nb,
                                 size_t len, const double *x, float *xf, float *c_noise,
                                 float *coef) {
    const dev_step *st = &table[*counter];
    stage_eval(st, 0, n, nb, c_noise, coef);
    for (size_t i = thread_index(); i < len; i += thread_stride()) xf[i] = (float)x[i];
}

/* DPM-Solver++(2M), after D(x; t_cur). */
__global__ void dpm_update_kernel(const dev_step *table, const uint32_t *counter, int mode,
                                  size_t len, const float *den, float *old_den, double *x) {
    const dev_step *st = &table[*counter];
    for (size_t i = thread_index(); i < len; i += thread_stride()) {
        if (mode == DPM_LAST) {
            x[i] = (double)den[i];
            continue;
        }
        double d = (double)den[i];
        if (mode == DPM_SECOND) d = rn_sub(rn_mul(st->coef_d, d), rn_mul(st->coef_old, (double)old_den[i]));
        x[i] = rn_add(rn_mul(st->ratio, x[i]), rn_mul(st->weight, d));
        old_den[i] = den[i];
    }
}

/* The next step's values. */
__global__ void advance_kernel(uint32_t *counter) {
    if (thread_index() == 0) *counter += 1;
}

/* ---- one step -------------------------------------------------------------------- */

/* The structure of a step: what its kernels are given besides the table. */
typedef struct step_kind {
    int dpm, churn, heun, dpm_mode;
    uint32_t mask;
} step_kind;

static step_kind kind_of(const cuda_sample_run *r, int i) {
    const solver_plan *p = &r->plan[i];
    step_kind k;
    memset(&k, 0, sizeof k);
    k.mask = p->mask;
    k.dpm = r->solver == LEGO_SOLVER_DPMPP_2M;
    if (k.dpm) {
        k.dpm_mode = p->dpm_last ? DPM_LAST : p->dpm_second ? DPM_SECOND : DPM_FIRST;
    } else {
        k.churn = !p->churn ? CHURN_NONE : r->noise ? CHURN_TORCH : CHURN_PHILOX;
        k.heun = p->heun;
    }
    return k;
}

/* Enqueue one step: launches only (capturable). */
static lego_status enqueue_step(lego_model *m, const cuda_eval *e, const samp_layout *l,
                                const step_kind *k) {
    lego_err *err = &m->err;
    cudaStream_t s = e->stream;
    size_t len = (size_t)e->n * e->chw;
    if (k->dpm) {
        LAUNCH(dpm_begin_kernel, ew_blocks(len), EW_THREADS, 0, s)(
            l->table, l->counter, e->n, e->nb, len, l->x, e->x, e->c_noise, e->coef);
        LAUNCH_CHECK("dpm_begin_kernel");
        LEGO_TRY(cuda_eval_enqueue(m, e, k->mask));
        LAUNCH(dpm_update_kernel, ew_blocks(len), EW_THREADS, 0, s)(
            l->table, l->counter, k->dpm_mode, len, e->out, l->old_den, l->x);
        LAUNCH_CHECK("dpm_update_kernel");
    } else {
        size_t blocks = (size_t)e->n * ((e->chw + 3) / 4);
        LAUNCH(edm_begin_kernel, ew_blocks(blocks), EW_THREADS, 0, s)(
            l->table, l->counter, k->churn, l->seeds, l->noise, e->n, e->nb, e->chw, l->x,
            l->x_hat, e->x, e->c_noise, e->coef);
        LAUNCH_CHECK("edm_begin_kernel");
        LEGO_TRY(cuda_eval_enqueue(m, e, k->mask));
        LAUNCH(edm_euler_kernel, ew_blocks(len), EW_THREADS, 0, s)(
            l->table, l->counter, k->heun, e->n, e->nb, len, e->out, l->x_hat, l->d_cur, l->x,
            e->x, e->c_noise, e->coef);
        LAUNCH_CHECK("edm_euler_kernel");
        if (k->heun) {
            LEGO_TRY(cuda_eval_enqueue(m, e, k->mask));
            LAUNCH(edm_heun_kernel, ew_blocks(len), EW_THREADS, 0, s)(
                l->table, l->counter, len, e->out, l->x_hat, l->d_cur, l->x);
            LAUNCH_CHECK("edm_heun_kernel");
        }
    }
    LAUNCH(advance_kernel, 1, 32, 0, s)(l->counter);
    LAUNCH_CHECK("advance_kernel");
    return LEGO_OK;
}

static step_key key_for_step(const lego_model *m, const cuda_eval *e, const samp_layout *l,
                             const step_kind *k) {
    step_key key;
    memset(&key, 0, sizeof key);
    cuda_eval_key(m, e, k->mask, key.net);
    key.dpm = k->dpm;
    key.churn_mode = k->churn;
    key.heun = k->heun;
    key.dpm_mode = k->dpm_mode;
    key.counter = l->counter;
    key.seeds = l->seeds;
    key.table = l->table;
    key.x = l->x;
    key.x_hat = l->x_hat;
    key.d_cur = l->d_cur;
    key.old_den = l->old_den;
    key.noise = l->noise;
    return key;
}

/* enqueue_step's arguments, for cuda_eval_capture. */
typedef struct step_work {
    lego_model *m;
    const cuda_eval *e;
    const samp_layout *l;
    const step_kind *k;
} step_work;

static lego_status enqueue_step_work(void *ctx, lego_err *err) {
    const step_work *w = (const step_work *)ctx;
    lego_status st = enqueue_step(w->m, w->e, w->l, w->k);
    if (st != LEGO_OK) *err = w->m->err; /* enqueue_step reports into the model's record */
    return st;
}

/* Run one step: replay its graph, or run it and capture it for next time. */
static lego_status run_step(lego_model *m, cuda_sampler *S, const cuda_eval *e,
                            const samp_layout *l, const step_kind *k) {
    lego_err *err = &m->err;
    if (!e->graphs) return enqueue_step(m, e, l, k);
    step_key key = key_for_step(m, e, l, k);
    for (int i = 0; i < STEP_GRAPHS; i++) {
        step_graph *g = &S->graphs[i];
        if ((g->exec || g->failed) && memcmp(&g->key, &key, sizeof key) == 0) {
            if (g->failed) return enqueue_step(m, e, l, k);
            CU_TRY(cudaGraphLaunch(g->exec, e->stream));
            S->launches++;
            return LEGO_OK;
        }
    }
    LEGO_TRY(enqueue_step(m, e, l, k));
    /* The step has run; a capture that fails costs only the replays. */
    step_work w = {m, e, l, k};
    cudaGraphExec_t exec = NULL;
    capture_result r = cuda_eval_capture(m, enqueue_step_work, &w, &exec);
    if (r == CAPTURE_RETRY) return LEGO_OK; /* captured next time, without cuDNN */
    step_graph *slot = &S->graphs[S->next_graph];
    S->next_graph = (S->next_graph + 1) % STEP_GRAPHS;
    if (slot->exec) cudaGraphExecDestroy(slot->exec);
    slot->exec = exec;
    slot->key = key;
    slot->failed = r == CAPTURE_EAGER;
    if (r == CAPTURED) S->captures++;
    return LEGO_OK;
}

/* ---- the run ----------------------------------------------------------------------- */

/* The header upload (counter, seeds, table) in host memory. */
static lego_status fill_header(lego_model *m, cuda_sampler *S, const cuda_sample_run *r,
                               const samp_layout *l, size_t len) {
    if (l->head_bytes > S->stage_bytes) {
        char *p = (char *)realloc(S->stage, l->head_bytes);
        if (!p) return lego_fail(&m->err, LEGO_ERR_OUT_OF_MEMORY, "out of memory for staging");
        S->stage = p;
        S->stage_bytes = l->head_bytes;
    }
    char *base = (char *)l->counter; /* device offsets relative to the header */
    memset(S->stage, 0, l->head_bytes);
    uint64_t *seeds = (uint64_t *)(S->stage + ((char *)l->seeds - base));
    dev_step *table = (dev_step *)(S->stage + ((char *)l->table - base));
    for (int i = 0; i < r->n; i++) seeds[i] = r->seeds ? r->seeds[i] : (uint64_t)i;
    int slot = 0;
    for (int i = 0; i < r->steps; i++) {
        const solver_plan *p = &r->plan[i];
        dev_step *d = &table[i];
        d->t_hat = p->t_hat;
        d->t_next = p->t_next;
        d->kick = p->kick;
        d->ratio = p->ratio;
        d->weight = p->weight;
        d->coef_d = p->coef_d;
        d->coef_old = p->coef_old;
        d->stream = 2 + (uint64_t)i;
        if (p->churn && r->noise) d->noise_off = (uint64_t)slot++ * len;
        for (int ev = 0; ev < p->evals; ev++)
            cuda_eval_coefs(m, (float)p->t_eval[ev], &d->c_noise[ev], d->coef[ev]);
    }
    if (r->noise && slot != r->noise_slots)
        return lego_fail(&m->err, LEGO_ERR_INVALID_ARGUMENT,
                         "internal: %d churn steps for %d noise slots", slot, r->noise_slots);
    return LEGO_OK;
}

lego_status sampler_run(lego_model *m, cuda_sampler **state, const cuda_sample_run *r) {
    lego_err *err = &m->err;
    if (!*state) {
        *state = (cuda_sampler *)calloc(1, sizeof **state);
        if (!*state) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    }
    cuda_sampler *S = *state;
    size_t chw = (size_t)m->cfg.img_channels * r->h * r->w, len = (size_t)r->n * chw;

    samp_layout l;
    plan_buffers(r, len, NULL, &l);
    cuda_eval e;
    LEGO_TRY(cuda_eval_plan(m, r->n, r->h, r->w, r->guidance, r->label_vectors, l.bytes, &e));
    plan_buffers(r, len, e.extra, &l);

    /* What the host planned and drew, in (at most) three copies. */
    LEGO_TRY(fill_header(m, S, r, &l, len));
    LEGO_TRY(cuda_eval_copy(m, l.counter, S->stage, l.head_bytes, cudaMemcpyHostToDevice));
    if (l.latents)
        LEGO_TRY(cuda_eval_copy(m, l.latents, r->latents, len * sizeof(float),
                                cudaMemcpyHostToDevice));
    if (l.noise)
        LEGO_TRY(cuda_eval_copy(m, l.noise, r->noise,
                                (size_t)r->noise_slots * len * sizeof(double),
                                cudaMemcpyHostToDevice));

    size_t blocks = (size_t)r->n * ((chw + 3) / 4);
    LAUNCH(init_x_kernel, ew_blocks(blocks), EW_THREADS, 0, e.stream)(l.latents, l.seeds, r->n,
                                                                      chw, r->sigma0, l.x);
    LAUNCH_CHECK("init_x_kernel");

    for (int i = 0; i < r->steps; i++) {
        step_kind k = kind_of(r, i);
        LEGO_TRY(run_step(m, S, &e, &l, &k));
        if (r->progress) {
            /* The caller asked to hear after each step: wait for it. */
            LEGO_TRY(cuda_eval_sync(m));
            if (r->progress(i + 1, r->steps, r->progress_user))
                return lego_fail(err, LEGO_ERR_CANCELLED,
                                 "cancelled by the progress callback at step %d", i + 1);
        }
    }
    LEGO_TRY(cuda_eval_copy(m, r->x_out, l.x, len * sizeof(double), cudaMemcpyDeviceToHost));
    return cuda_eval_sync(m);
}

void sampler_clear_graphs(cuda_sampler *s) {
    if (!s) return;
    for (int i = 0; i < STEP_GRAPHS; i++) {
        if (s->graphs[i].exec) cudaGraphExecDestroy(s->graphs[i].exec);
        memset(&s->graphs[i], 0, sizeof s->graphs[i]);
    }
}

void sampler_free(cuda_sampler *s) {
    if (!s) return;
    sampler_clear_graphs(s);
    free(s->stage);
    free(s);
}

void sampler_graph_counts(const cuda_sampler *s, uint64_t *captures, uint64_t *launches) {
    *captures = s ? s->captures : 0;
    *launches = s ? s->launches : 0;
}
