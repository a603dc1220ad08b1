/*
 * backend_cuda.h -- the C interface between the model code in src/ and the
 * CUDA backend in cuda/.  Internal.
 *
 * Nothing here names a CUDA type: the backend's state is an opaque handle
 * (lego_model.cuda) that owns its stream, its cuBLASLt handle, a device
 * copy of the weights and a workspace planned per request size.  The CPU
 * weights in lego_model.params stay the source of truth; the backend copies
 * them to the device again whenever lego_model.weights_gen has moved on
 * since its last upload (model_weights_changed()).
 *
 * In a build without CUDA (no -DLEGO_HAVE_CUDA) every function below is an
 * inline stub: no device, LEGO_ERR_UNSUPPORTED.  Callers need no #ifdefs.
 *
 * Threading: as for the model: one model's handle must not be used by two
 * threads at once.  Every call selects the handle's device on the calling
 * thread first (cudaSetDevice), so models on different devices may be used
 * from one thread in turn.
 */
#ifndef LEGO_BACKEND_CUDA_H
#define LEGO_BACKEND_CUDA_H

#include <stdint.h>

#include "denoise.h"
#include "sampler.h"

#ifdef __cplusplus
extern "C" {
#endif

/* What the tests and benchmarks may ask a handle. */
typedef struct cuda_stats {
    int device;                /* CUDA device index                         */
    uint64_t workspace_allocs; /* cudaMalloc calls for the request workspace */
    uint64_t workspace_bytes;  /* its current size                          */
    uint64_t weight_uploads;   /* times the weights were copied to the device */
    int gelu_epilogue;         /* 1: fc1 uses cuBLASLt's GELU_BIAS epilogue  */
    int flash_only;            /* 1: short sequences use the tiled kernel too */
    int precision;             /* cuda_precision of the handle               */
    int attn_mode;             /* CUDA_OPT_ATTENTION's value                  */
    int graphs;                /* 1: plain evaluations replay CUDA graphs     */
    uint64_t graph_captures;   /* graphs captured and instantiated           */
    uint64_t graph_launches;   /* graph launches                             */
    /* Captures that failed: the request had run eagerly and stands; that
     * request (or sampler step kind) then stays eager, or is captured again
     * without cuDNN when cuDNN ran in it. */
    uint64_t capture_failures;
    char capture_note[200];
    uint64_t tuned_shapes;     /* GEMM shapes whose algorithms were timed    */
    double profile_ms[16];     /* CUDA_OPT_PROFILE: milliseconds per cuda_profile_part */
    /* The device sampling loop (cuda_backend_sample). */
    uint64_t host_copies;        /* host<->device copies the handle has made  */
    uint64_t sample_runs;        /* lego_sample calls run on the device       */
    uint64_t sample_host_copies; /* host<->device copies of the last of them  */
    uint64_t sample_syncs;       /* stream synchronisations of the last one   */
    uint64_t step_graph_captures; /* sampler step graphs captured             */
    uint64_t step_graph_launches; /* and launched                             */
    int device_loop;             /* CUDA_OPT_DEVICE_LOOP's value              */
    int ln_mode;                 /* CUDA_OPT_LAYERNORM's value                */
    /* Attention through cuDNN (cuda/cudnn_attention.cu), loaded when first
     * wanted: whether it was, its version, plans built and runs made, the
     * shapes decided (timed when CUDA_OPT_ATTENTION is 0) and how many of
     * them cuDNN runs, the graph of its last plan (1 SDPA operation, 2
     * composite), and why it, or the last shape it refused, is not used. */
    int cudnn_available;
    long cudnn_version;
    uint64_t cudnn_plans, cudnn_runs;
    uint64_t attn_decided, attn_timed, attn_cudnn_shapes;
    int cudnn_last_graph;
    char cudnn_note[200];
    int residual; /* CUDA_OPT_RESIDUAL's value */
    /* Training's GEMMs that asked for a cuBLASLt epilogue fusion
     * (CUDA_OPT_TRAIN_EPILOGUES): run fused, and run as plain GEMMs and
     * kernels because the heuristic offered no algorithm for it. */
    uint64_t fused_runs, fused_refused;
    /* Calls that declined because their fusion disagreed with the host in
     * the handle's check of it (cuda/gemm_check.cu), and the first
     * disagreement in words ("" when every checked fusion agreed). */
    uint64_t fused_rejected;
    char fusion_note[200];
    /* How far cuBLASLt's GELU_BIAS epilogue was from the tanh and the erf
     * forms of GELU in the handle's probe, and what the handle decided. */
    char gelu_note[120];
    /* Bricks evaluated with one GEMM for all their adaLN vectors (their
     * weights back to back on the device) rather than one per linear. */
    uint64_t ada_stacked;
} cuda_stats;

/* Per-handle settings, for tests and experiments. */
typedef enum cuda_option {
    /* fc1's tanh-GELU inside the GEMM (cuBLASLt GELU_BIAS epilogue) when 1,
     * as a separate kernel when 0.  The handle turns it on at creation only
     * if a probe shows that the epilogue computes the tanh approximation. */
    CUDA_OPT_GELU_EPILOGUE = 0,
    /* 1: every attention goes through the tiled (flash-style) kernel, even
     * sequences short enough for the one-warp-per-head kernel. */
    CUDA_OPT_FLASH_ONLY = 1,
    /* Arithmetic of the forward pass: a cuda_precision value. */
    CUDA_OPT_PRECISION = 2,
    /* Attention kernel choice: 0 automatic, 1 = CUDA_OPT_FLASH_ONLY, 2 never
     * the tensor-core kernel (bf16/fp16 then use the CUDA-core one), 3 as 0
     * but with the tensor-core kernel that gives each warp 32 query rows
     * (attention_mma2_kernel; an experiment to time against 0), 4 cuDNN's
     * fused attention for every sequence of more than 32 tokens it takes
     * (else as 0), 5 as 0 but never cuDNN.  Under 0 with CUDA_OPT_AUTOTUNE
     * on, such a sequence shape goes to cuDNN when, at its first use, it
     * timed faster than our kernel. */
    CUDA_OPT_ATTENTION = 3,
    /* 1 (the default): an evaluation without per-brick outputs or c runs
     * as one CUDA graph, captured at its first occurrence per request
     * shape and replayed after; 0: kernels are launched one by one. */
    CUDA_OPT_GRAPHS = 4,
    /* 1 (the default): time the heuristic's candidate algorithms of each
     * large GEMM shape at its first use and keep the fastest; and, under
     * CUDA_OPT_ATTENTION 0, our attention kernel against cuDNN's for each
     * long-sequence shape.  0: neither (reproducible from process to
     * process). */
    CUDA_OPT_AUTOTUNE = 5,
    /* 1: synchronise after every step of the network and add its wall time
     * to profile_ms (no graphs meanwhile); 2: the same after clearing the
     * counters.  For tools/cuda-profile, not for production. */
    CUDA_OPT_PROFILE = 6,
    /* 1 (the default): lego_sample runs its whole loop on the device
     * (cuda_backend_sample); 0: the host drives it, one evaluation at a
     * time through cuda_backend_denoise (as lego_step does). */
    CUDA_OPT_DEVICE_LOOP = 7,
    /* Attention in training (cuda/train.cu, attn_path): 0 (the default)
     * for sequences of at least 32 tokens the tensor-core flash kernels in
     * bf16 (head_dim a multiple of 8, <= 128), else cuBLASLt batched GEMMs
     * (a head's columns 16-byte aligned), the CUDA-core kernels below 32
     * tokens; 1 the kernels always; 2 the GEMMs whenever aligned, short
     * sequences too; 3 the flash kernels wherever they apply, short
     * sequences too; 4 the default before the flash kernels (GEMMs from 32
     * tokens), for timing. */
    CUDA_OPT_TRAIN_ATTENTION = 8,
    /* LayerNorm kernels for widths that are a multiple of 128: 0 (the
     * default) one warp per row, the adaLN vectors read from global memory
     * (L2) for every row; 1 one block per 64 rows of an image, with that
     * image's vectors staged in shared memory.  The same bits.  Tiles timed
     * no faster at batch 64 on an H200 (L-PG-64 9.23 against 9.21 ms of
     * LayerNorm, XL-U-32 6.52 against 5.99) and leave most of the GPU idle
     * at batch 1 (16 blocks for 1024 tokens), so they are for timing only. */
    CUDA_OPT_LAYERNORM = 9,
    /* The residual stream of an evaluation in bf16/fp16 precision: 0 (the
     * default) fp32; 1 the operand type: the LayerNorm kernels, which read
     * and write it once per block each, move 8 bytes per value instead of
     * 12.  The sums and statistics stay fp32.  A step beyond the
     * reference's autocast, whose stream most likely stays fp32 (the fp32
     * position embedding enters it, and bf16 + fp32 promotes to fp32).
     * For timing until a GPU has measured what it saves. */
    CUDA_OPT_RESIDUAL = 10,
    /* 1: training's GEMMs may be timed like the evaluations' (the fastest of
     * the heuristic's candidates per shape, chosen once per handle): the
     * same bits within a process, not across processes, so a resumed run
     * is no longer bit-identical.  0 (the default): the heuristic's first
     * choice.  For timing what the choice costs. */
    CUDA_OPT_TRAIN_AUTOTUNE = 11,
    /* 1 (the default): training's GEMMs take what cuBLASLt's epilogues can
     * do for them where the heuristic offers it: fc1's GELU with its input
     * kept (GELU_AUX_BIAS), GELU's derivative on fc2's input gradient
     * (DGELU), every bias gradient inside its weight gradient's GEMM
     * (BGRADB); the GELU ones only while CUDA_OPT_GELU_EPILOGUE is on (the
     * probe found the tanh approximation).  0: the kernels of
     * train_kernels.cu do those parts. */
    CUDA_OPT_TRAIN_EPILOGUES = 12,
    /* 1 (the default): each LayerNorm backward of training also makes the
     * column sums of the rows it reads (the modulation's gradients and
     * the gradient of the gate above it) in the same kernel, for widths
     * up to 512 (cuda/train_kernels.cu, t_ln_bwd_sums); 0: separate
     * column-sum passes that read the rows again. */
    CUDA_OPT_TRAIN_LN_SUMS = 13
} cuda_option;

/* The parts of an evaluation that CUDA_OPT_PROFILE times. */
typedef enum cuda_profile_part {
    CUDA_PROF_INPUT = 0, /* conditioning and input scaling   */
    CUDA_PROF_ADALN,     /* adaLN GEMMs                      */
    CUDA_PROF_GATHER,    /* token gather + patch embedding   */
    CUDA_PROF_LAYERNORM, /* LayerNorm kernels (with residual) */
    CUDA_PROF_QKV,
    CUDA_PROF_ATTENTION,
    CUDA_PROF_PROJ,
    CUDA_PROF_FC1,
    CUDA_PROF_FC2,
    CUDA_PROF_OUTPUT,    /* final linear, scatter, guidance, EDM */
    CUDA_PROF_PARTS
} cuda_profile_part;

typedef enum cuda_precision {
    CUDA_PRECISION_FP32 = 0, /* fp32 storage and accumulation, no TF32       */
    CUDA_PRECISION_BF16 = 1, /* bf16 GEMM operands and attention, fp32
                                accumulation, residual, LayerNorm, adaLN    */
    CUDA_PRECISION_FP16 = 2  /* the same with fp16                          */
} cuda_precision;


/* ---- training on the device (cuda/train.cu; docs/cuda.md) ---- */

/* One training batch, in host memory: y and noise n x C x h x w, sigma n,
 * labels n x label_dim one-hot rows or NULL (null labels).  Patch sampling
 * (paper eq. 12, backward.h): brick k runs on used[k] patches per image,
 * listed ascending in table[k] ([n][used[k]]), or on every patch when
 * table[k] is NULL. */
typedef struct cuda_train_batch {
    int n, h, w;
    const float *y, *noise, *sigma, *labels;
    /* noise NULL: drawn on the device, philox_normal_f32(noise_seed,
     * noise_stream, 0, ...) within a float ulp of the CPU's (rng.h). */
    uint64_t noise_seed, noise_stream;
    const int32_t *table[LEGO_MAX_BRICKS];
    int used[LEGO_MAX_BRICKS];
} cuda_train_batch;

/* A trainer as the device sees it: an identity, its host arrays in the
 * params layout (copied up when it attaches, back by cuda_backend_pull)
 * and a flag the device side sets while the trainer's state lives there
 * (cleared when the handle goes or another trainer attaches). */
typedef struct cuda_trainer_link {
    const void *owner;
    float *ema, *adam_m, *adam_v;
    int *attached;
} cuda_trainer_link;

/* Where training time goes (cuda_train_profile). */
typedef enum cuda_train_part {
    CUDA_TPROF_INPUT = 0, /* uploads, noise, fill, conditioning, the loss    */
    CUDA_TPROF_GEMM,      /* linear layers: forward, dW and dx GEMMs         */
    CUDA_TPROF_ATTENTION, /* attention forward and backward                  */
    CUDA_TPROF_ROWS,      /* LayerNorm (with its column sums when fused),
                             gated residuals, GELU, gather/scatter          */
    CUDA_TPROF_SUMS,      /* column-sum passes of their own (the fusions
                             leave none for widths up to 512)               */
    CUDA_TPROF_OPTIMIZER, /* gradient norm, Adam, EMA                       */
    CUDA_TPROF_PARTS
} cuda_train_part;

/* One optimiser update: train.c's adam_update then ema_update. */
typedef struct cuda_adam_step {
    double lr, beta1, beta2, eps, weight_decay;
    int adamw;
    int64_t adam_t;  /* updates applied, this one included */
    float gscale;    /* clipping factor */
    float ema_beta;
} cuda_adam_step;
/* A whole lego_sample run for the device loop.  The host plans every step
 * (solver_plan: the same scalars the CPU solver uses) and draws what only
 * it can draw (labels; with the PyTorch generator the latents and the
 * churn noise); the device keeps x in float64 and runs the rest. */
typedef struct cuda_sample_run {
    int n, h, w;                 /* the (padded) size sampled at             */
    lego_solver solver;
    int steps;
    const solver_plan *plan;     /* steps entries                            */
    double sigma0;               /* x starts as latents * sigma0             */
    float guidance;
    const float *label_vectors;  /* n x label_dim one-hot rows, or NULL      */
    const uint64_t *seeds;       /* n Philox seeds (NULL: 0 .. n-1): latents
                                    (stream 0) and the churn noise of step i
                                    (stream 2 + i)                          */
    const float *latents;        /* n x chw standard normals, or NULL: Philox
                                    on the device                           */
    const double *noise;         /* PyTorch generator: the churn noise of the
                                    steps that add it, [noise_slots][n][chw] in
                                    step order; NULL: Philox on the device   */
    int noise_slots;
    lego_progress_fn progress;   /* optional; called after each step (which
                                    then waits for the device)               */
    void *progress_user;
    double *x_out;               /* n x chw: the final x, host memory        */
} cuda_sample_run;

#ifdef LEGO_HAVE_CUDA

/* Number of usable CUDA devices; 0 when there is no driver or no device. */
int cuda_device_count(void);

/* A new handle on `device` for model `m` (which must have its parameter
 * array): stream, cuBLASLt handle, the weights uploaded.  On failure *out
 * is NULL and `err` says why: LEGO_ERR_UNSUPPORTED when there is no usable
 * device, LEGO_ERR_INVALID_ARGUMENT for a device index out of range,
 * LEGO_ERR_OUT_OF_MEMORY, LEGO_ERR_BACKEND for any other CUDA or cuBLAS
 * failure. */
lego_status cuda_backend_create(const lego_model *m, int device, void **out, lego_err *err);

/* Free a handle and everything on the device it owns.  NULL is allowed. */
void cuda_backend_destroy(void *handle);

/* model_denoise on the device: same arguments, same results (within float
 * rounding) as the CPU path.  Records failures in m->err. */
lego_status cuda_backend_denoise(lego_model *m, const denoise_args *a);

/* Whether lego_sample should run its loop on the device for m (a CUDA
 * model with CUDA_OPT_DEVICE_LOOP on). */
int cuda_backend_device_loop(const lego_model *m);

/* The sampling loop on the device: one upload of what the host drew and
 * planned, kernels only per step (no copy, no synchronisation unless a
 * progress callback asks), one download of x at the end.  Records
 * failures in m->err (LEGO_ERR_CANCELLED when the callback stops it). */
lego_status cuda_backend_sample(lego_model *m, const cuda_sample_run *r);

/* Device bytes m's handle holds (0 without one), and the check of a new
 * allocation against m->device_budget. */
size_t cuda_backend_memory(const lego_model *m);

/* Counters and settings of m's handle; LEGO_ERR_STATE without one. */
lego_status cuda_backend_stats(const lego_model *m, cuda_stats *out);

/* Change a setting of m's handle (see cuda_option). */
lego_status cuda_backend_set_option(lego_model *m, cuda_option option, int value);

/* philox_normal_f32 (rng.h) computed on `device`: n values from element
 * `first` of (seed, stream) into host memory `out`. */
lego_status cuda_philox_normal_f32(int device, uint64_t seed, uint64_t stream, uint64_t first,
                                   size_t n, float *out, lego_err *err);

/* philox4x32_10 on `device` for blocks first_block .. first_block+blocks-1
 * of (seed, stream), counters and key laid out as in rng.h; out holds
 * 4 * blocks words. */
lego_status cuda_philox_blocks(int device, uint64_t seed, uint64_t stream, uint64_t first_block,
                               size_t blocks, uint32_t *out, lego_err *err);

/* train_loss_grads on the device for a model on the CUDA backend: the loss
 * (the CPU's formula, summed on the host in its order) and, when grads is
 * not NULL, the gradient in the layout of m->params (fixed tensors zero). */
lego_status cuda_train_loss(lego_model *m, const cuda_train_batch *b, double *loss, float *grads,
                            lego_err *err);

/* A trainer step's first half on the device: attaches trainer t (uploading
 * its state if it is not the attached one), the loss and the gradient's
 * global L2 norm (the gradient stays on the device). */
lego_status cuda_train_grads(lego_model *m, const cuda_trainer_link *t,
                             const cuda_train_batch *b, double *loss, double *norm,
                             lego_err *err);

/* The second half: Adam/AdamW on the trainable values with the gradient
 * of the last cuda_train_grads scaled by gscale, then the EMA.  The device
 * weights are then ahead of m->params until cuda_backend_pull. */
lego_status cuda_train_update(lego_model *m, const cuda_trainer_link *t, const cuda_adam_step *a,
                              lego_err *err);

/* Copy weights trained on the device back to m->params (unless the host
 * rewrote them since) and the attached trainer's state to its host arrays.
 * LEGO_OK and nothing to do without a handle or when nothing is newer.
 * Call before reading m->params on the host. */
lego_status cuda_backend_pull(lego_model *m, lego_err *err);

/* Forget trainer `owner`'s device state without copying it back (its host
 * arrays were rewritten, or it is being freed).  Nothing if it is not
 * attached. */
void cuda_train_detach(lego_model *m, const void *owner);

/* Training profile, for tools/train_profile.c: enable 1 synchronises after
 * every part of a training call and adds its wall time to a counter per
 * cuda_train_part (cleared here); 0 stops.  ms (may be NULL) receives the
 * counters so far. */
lego_status cuda_train_profile(lego_model *m, int enable, double ms[CUDA_TPROF_PARTS]);

#else /* no CUDA in this build */

static inline int cuda_device_count(void) { return 0; }

static inline lego_status cuda_backend_create(const lego_model *m, int device, void **out,
                                              lego_err *err) {
    (void)m;
    (void)device;
    *out = NULL;
    return lego_fail(err, LEGO_ERR_UNSUPPORTED,
                     "backend CUDA: this liblego was built without CUDA (make CUDA=1)");
}

static inline void cuda_backend_destroy(void *handle) { (void)handle; }

static inline lego_status cuda_backend_denoise(lego_model *m, const denoise_args *a) {
    (void)a;
    return lego_fail(&m->err, LEGO_ERR_UNSUPPORTED,
                     "backend CUDA: this liblego was built without CUDA");
}

static inline int cuda_backend_device_loop(const lego_model *m) {
    (void)m;
    return 0;
}

static inline lego_status cuda_backend_sample(lego_model *m, const cuda_sample_run *r) {
    (void)r;
    return lego_fail(&m->err, LEGO_ERR_UNSUPPORTED,
                     "backend CUDA: this liblego was built without CUDA");
}

static inline size_t cuda_backend_memory(const lego_model *m) {
    (void)m;
    return 0;
}

static inline lego_status cuda_backend_stats(const lego_model *m, cuda_stats *out) {
    (void)m;
    (void)out;
    return LEGO_ERR_UNSUPPORTED;
}

static inline lego_status cuda_backend_set_option(lego_model *m, cuda_option option, int value) {
    (void)m;
    (void)option;
    (void)value;
    return LEGO_ERR_UNSUPPORTED;
}

static inline lego_status cuda_philox_normal_f32(int device, uint64_t seed, uint64_t stream,
                                                 uint64_t first, size_t n, float *out,
                                                 lego_err *err) {
    (void)device, (void)seed, (void)stream, (void)first, (void)n, (void)out;
    return lego_fail(err, LEGO_ERR_UNSUPPORTED, "this liblego was built without CUDA");
}

static inline lego_status cuda_philox_blocks(int device, uint64_t seed, uint64_t stream,
                                             uint64_t first_block, size_t blocks, uint32_t *out,
                                             lego_err *err) {
    (void)device, (void)seed, (void)stream, (void)first_block, (void)blocks, (void)out;
    return lego_fail(err, LEGO_ERR_UNSUPPORTED, "this liblego was built without CUDA");
}

static inline lego_status cuda_train_loss(lego_model *m, const cuda_train_batch *b, double *loss,
                                          float *grads, lego_err *err) {
    (void)m, (void)b, (void)loss, (void)grads;
    return lego_fail(err, LEGO_ERR_UNSUPPORTED, "this liblego was built without CUDA");
}

static inline lego_status cuda_train_grads(lego_model *m, const cuda_trainer_link *t,
                                           const cuda_train_batch *b, double *loss, double *norm,
                                           lego_err *err) {
    (void)m, (void)t, (void)b, (void)loss, (void)norm;
    return lego_fail(err, LEGO_ERR_UNSUPPORTED, "this liblego was built without CUDA");
}

static inline lego_status cuda_train_update(lego_model *m, const cuda_trainer_link *t,
                                            const cuda_adam_step *a, lego_err *err) {
    (void)m, (void)t, (void)a;
    return lego_fail(err, LEGO_ERR_UNSUPPORTED, "this liblego was built without CUDA");
}

static inline lego_status cuda_backend_pull(lego_model *m, lego_err *err) {
    (void)m, (void)err;
    return LEGO_OK;
}

static inline void cuda_train_detach(lego_model *m, const void *owner) { (void)m, (void)owner; }

static inline lego_status cuda_train_profile(lego_model *m, int enable,
                                             double ms[CUDA_TPROF_PARTS]) {
    (void)enable, (void)ms;
    return lego_fail(&m->err, LEGO_ERR_UNSUPPORTED, "this liblego was built without CUDA");
}

#endif /* LEGO_HAVE_CUDA */

#ifdef __cplusplus
}
#endif

#endif /* LEGO_BACKEND_CUDA_H */
