/*
 * lego.h -- the public interface of liblego, a runtime for LEGO Diffusion
 * (stackable and skippable "LEGO bricks" for diffusion models, Zheng et al.,
 * ICLR 2024).
 *
 * This is the only header a program needs.  It is C11 and C++ compatible.
 *
 * Conventions
 *   - Every function that can fail returns a lego_status.  LEGO_OK is 0.
 *   - Objects are opaque handles.  A handle remembers a message describing its
 *     last failure: lego_model_error().  lego_status_string() names a code.
 *   - Option and request structs start with a `size` field.  Fill them with
 *     their *_init() function first, then change what you need; the library
 *     reads only the fields that existed in the caller's version of the struct,
 *     so old binaries keep working when fields are appended.
 *   - Tensors are float32, NCHW, row-major, owned by the caller.  The library
 *     never keeps a pointer to caller memory after a call returns.
 *   - Threading: the library keeps no mutable global state, so separate
 *     models (and datasets, and trainers of separate models) may be used
 *     from separate threads at the same time, with the results of using them
 *     one after the other, bit for bit.  One model takes one call at a time
 *     (it owns its scratch memory): it may move between threads, or be
 *     shared behind a lock.  lego_model_error() is the message of the
 *     model's last call, whichever thread made it: read it on that thread
 *     before the model's next call.  Read-only queries (lego_model_get_*,
 *     lego_model_num_*) may run beside each other, not beside other calls
 *     on the same model.  A call runs on the model's own worker threads
 *     (num_threads); OpenBLAS's thread count is process-wide (README).
 */
#ifndef LEGO_H
#define LEGO_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define LEGO_API
#elif defined(__GNUC__)
#define LEGO_API __attribute__((visibility("default")))
#else
#define LEGO_API
#endif

#define LEGO_VERSION_MAJOR 0
#define LEGO_VERSION_MINOR 1
#define LEGO_VERSION_PATCH 0
#define LEGO_VERSION_STRING "0.1.0"
#define LEGO_VERSION_NUMBER \
    (LEGO_VERSION_MAJOR * 10000 + LEGO_VERSION_MINOR * 100 + LEGO_VERSION_PATCH)

/* The most bricks one model may stack (skip masks are 32-bit). */
#define LEGO_MAX_BRICKS 32

typedef enum lego_status {
    LEGO_OK = 0,
    LEGO_ERR_INVALID_ARGUMENT = 1, /* NULL pointer, bad option, bad value     */
    LEGO_ERR_OUT_OF_MEMORY = 2,    /* an allocation failed                    */
    LEGO_ERR_IO = 3,               /* a file could not be opened/read/written */
    LEGO_ERR_FORMAT = 4,           /* a file is malformed or truncated        */
    LEGO_ERR_SHAPE = 5,            /* sizes that do not fit together          */
    LEGO_ERR_UNSUPPORTED = 6,      /* valid but not supported (dtype, backend)*/
    LEGO_ERR_CANCELLED = 7,        /* a progress callback asked to stop       */
    LEGO_ERR_BACKEND = 8,          /* the compute backend failed              */
    LEGO_ERR_STATE = 9             /* the handle is not usable for this call  */
} lego_status;

/* A static English description of a status code; never NULL. */
LEGO_API const char *lego_status_string(lego_status status);

/* The library's version string ("0.1.0") and number (LEGO_VERSION_NUMBER). */
LEGO_API const char *lego_version(void);
LEGO_API int lego_version_number(void);

/* ------------------------------------------------------------------------ */
/* Models                                                                   */
/* ------------------------------------------------------------------------ */

typedef struct lego_model lego_model;

typedef enum lego_backend {
    LEGO_BACKEND_CPU = 0,
    LEGO_BACKEND_CUDA = 1
} lego_backend;

/* Arithmetic of the network on a GPU.  FP32 is fp32 throughout (no TF32).
 * BF16 and FP16 store the GEMM operands and the attention's Q, K, V in
 * 16 bits and accumulate in fp32; the residual stream, LayerNorm
 * statistics, adaLN modulation, conditioning and the EDM scaling stay fp32.
 * The CPU backend always computes in fp32: the precision is what the model
 * uses whenever it is on a GPU. */
typedef enum lego_precision {
    LEGO_PRECISION_FP32 = 0,
    LEGO_PRECISION_BF16 = 1,
    LEGO_PRECISION_FP16 = 2
} lego_precision;

/* Global settings of a LEGO network (the "lego.config" JSON of a checkpoint). */
typedef struct lego_model_config {
    size_t size;                  /* sizeof(lego_model_config)               */
    int img_channels;             /* C, image or latent channels (default 3) */
    int img_resolution;           /* training resolution, informative (32)   */
    int label_dim;                /* classes; 0 = unconditional (0)          */
    int hidden_size;              /* D, token width of every brick (384)     */
    int num_heads;                /* attention heads, divides D (6)          */
    double mlp_ratio;             /* MLP hidden = D * ratio (4.0)            */
    int frequency_embedding_size; /* sinusoidal time embedding width (256)   */
    double sigma_data;            /* EDM sigma_data (0.5)                    */
    int num_threads;              /* CPU worker threads; 0 = all cores (0)   */
    lego_backend backend;         /* where to compute (LEGO_BACKEND_CPU)     */
    int device;                   /* CUDA device index (0)                   */
    lego_precision precision;     /* GPU arithmetic (LEGO_PRECISION_FP32)    */
} lego_model_config;

LEGO_API void lego_model_config_init(lego_model_config *config);

/* One brick: a DiT working on brick_size x brick_size image patches. */
typedef struct lego_brick_config {
    size_t size;    /* sizeof(lego_brick_config)                          */
    int brick_size; /* side of the image patch the brick sees (32)        */
    int patch_size; /* side of one token, divides brick_size (2)          */
    int depth;      /* DiT blocks (1)                                     */
} lego_brick_config;

LEGO_API void lego_brick_config_init(lego_brick_config *brick);

/*
 * Create an empty model (no bricks yet) from global settings.  On success *out
 * is a new model.  On failure *out is NULL only when even the handle could not
 * be allocated; otherwise it is a model in the failed state whose
 * lego_model_error() explains the failure and which must be freed.
 */
LEGO_API lego_status lego_model_create(const lego_model_config *config,
                                       lego_model **out);

/* Append a brick on top of the stack.  Weights of the new brick are zero
 * until lego_model_init_weights() or lego_model_load_weights(). */
LEGO_API lego_status lego_brick_add(lego_model *model,
                                    const lego_brick_config *brick);

/* Give every parameter the reference initialisation (DiT: Xavier-uniform
 * linears, zero adaLN and final layers, N(0, 0.02) embedders, fixed sin-cos
 * position embeddings), drawn from a generator seeded with `seed`. */
LEGO_API lego_status lego_model_init_weights(lego_model *model, uint64_t seed);

typedef struct lego_load_options {
    size_t size;             /* sizeof(lego_load_options)                     */
    const char *config_json; /* architecture for a plain state-dict file, in
                                the lego.config JSON form; NULL = read it from
                                the file's __metadata__["lego.config"] (NULL) */
    int num_threads;         /* as lego_model_config.num_threads (0)          */
    lego_backend backend;    /* (LEGO_BACKEND_CPU)                            */
    int device;              /* (0)                                           */
    lego_precision precision; /* (LEGO_PRECISION_FP32)                        */
} lego_load_options;

LEGO_API void lego_load_options_init(lego_load_options *options);

/*
 * Read a safetensors checkpoint with the reference PyTorch key names.  F32,
 * F16 and BF16 tensors are accepted and converted to float32.  `options` may
 * be NULL.  Failure is reported as for lego_model_create().
 */
LEGO_API lego_status lego_model_load(const char *path,
                                     const lego_load_options *options,
                                     lego_model **out);

/* Replace the weights of an existing model (built with lego_model_create and
 * lego_brick_add) with those of a safetensors file.  The file's architecture,
 * if it carries one, must match.  On failure the weights are unchanged. */
LEGO_API lego_status lego_model_load_weights(lego_model *model,
                                             const char *path);

/* Write the model as float32 safetensors with lego.config metadata. */
LEGO_API lego_status lego_model_save(lego_model *model, const char *path);

/* Free a model and everything it owns.  NULL is allowed. */
LEGO_API void lego_model_free(lego_model *model);

/* The message of the model's last failure ("" when none).  The string is
 * owned by the model and valid until its next call.  NULL model gives a
 * static message. */
LEGO_API const char *lego_model_error(const lego_model *model);

/* Introspection. */
LEGO_API lego_status lego_model_get_config(const lego_model *model,
                                           lego_model_config *config);
LEGO_API int lego_model_num_bricks(const lego_model *model);
LEGO_API lego_status lego_model_get_brick(const lego_model *model, int index,
                                          lego_brick_config *brick);
/* Number of scalars in all parameters, the fixed position embeddings
 * included (as PyTorch's parameters() counts them). */
LEGO_API int64_t lego_model_num_params(const lego_model *model);
/* H and W must be positive multiples of this (the least common multiple of
 * the brick sizes); 0 for a model with no bricks. */
LEGO_API int lego_model_resolution_multiple(const lego_model *model);
/* LEGO_OK if H x W images can be processed, else LEGO_ERR_SHAPE with a
 * message saying why. */
LEGO_API lego_status lego_model_check_resolution(lego_model *model, int height,
                                                 int width);
/* Change the number of CPU worker threads (0 = all cores). */
LEGO_API lego_status lego_model_set_threads(lego_model *model, int num_threads);

/* 1 if backend `b` can run here: always for LEGO_BACKEND_CPU; for
 * LEGO_BACKEND_CUDA when liblego was built with CUDA (make CUDA=1) and a
 * CUDA device is present.  0 otherwise. */
LEGO_API int lego_backend_available(lego_backend b);

/*
 * Move a model (e.g. one from lego_model_load) to another backend.  With
 * LEGO_BACKEND_CUDA the weights are copied to device `device` (its index
 * among the CUDA devices) and every later lego_denoise / lego_sample of the
 * model runs there; the model keeps its weights in host memory too, and the
 * device copy follows lego_model_load_weights and lego_model_init_weights.
 * Training (lego_train_loss, lego_trainer_step) runs there too; weights it
 * changes on the device come back to the host copy when it is read (see
 * the Training section) and before the move.
 * LEGO_BACKEND_CPU frees the device resources (`device` is ignored).
 * lego_model_config.backend/device and lego_load_options.backend/device do
 * the same at creation.  Errors: LEGO_ERR_UNSUPPORTED (not built with CUDA,
 * or no device), LEGO_ERR_INVALID_ARGUMENT (no such device),
 * LEGO_ERR_OUT_OF_MEMORY, LEGO_ERR_BACKEND (a CUDA failure); the model is
 * unchanged on failure.
 */
LEGO_API lego_status lego_model_set_backend(lego_model *model, lego_backend b, int device);

/* Change the model's GPU arithmetic (see lego_precision); it takes effect
 * at the next evaluation on a GPU (the 16-bit copy of the weights is made
 * then, once).  Errors: LEGO_ERR_INVALID_ARGUMENT for an unknown value. */
LEGO_API lego_status lego_model_set_precision(lego_model *model, lego_precision precision);

/* ------------------------------------------------------------------------ */
/* Memory budget                                                            */
/* ------------------------------------------------------------------------ */
/*
 * A cap on the host memory one model uses: what it holds (handle, weights,
 * scratch) plus what a lego_denoise, lego_sample or lego_step call allocates
 * while it runs.  A request that would pass it fails with
 * LEGO_ERR_OUT_OF_MEMORY before anything is allocated, and the message
 * names the bytes needed and allowed; a service facing untrusted request
 * sizes sets one.  GPU memory of a CUDA model is not counted.
 */

/* Set the budget in bytes; 0 = no limit (the default).  Fails with
 * LEGO_ERR_OUT_OF_MEMORY, the budget unchanged, when the model's weights
 * alone take more (the scratch is released first: it regrows on demand). */
LEGO_API lego_status lego_model_set_memory_budget(lego_model *model, size_t bytes);

/* Host bytes the model holds now (0 for NULL). */
LEGO_API size_t lego_model_memory_usage(const lego_model *model);

/*
 * The same for GPU memory.  A model on a CUDA device holds its weights (and
 * their 16-bit copy in bf16/fp16 precision), one request workspace sized
 * for the largest request so far, and cuBLASLt's workspace.  With a budget
 * set, an allocation that would take the model past it fails with
 * LEGO_ERR_OUT_OF_MEMORY (a message names the bytes) before it is made:
 * moving a model to the GPU, or a request needing a larger workspace.
 * 0 = no limit (the default).  The budget stays with the model across
 * lego_model_set_backend; setting one below what the model holds now
 * fails with LEGO_ERR_OUT_OF_MEMORY and leaves the budget unchanged.
 */
LEGO_API lego_status lego_model_set_device_memory_budget(lego_model *model, size_t bytes);

/* GPU bytes the model holds now (0 on the CPU, and for NULL). */
LEGO_API size_t lego_model_device_memory_usage(const lego_model *model);

/* ------------------------------------------------------------------------ */
/* The denoiser D(x; sigma)                                                 */
/* ------------------------------------------------------------------------ */

typedef struct lego_denoise_request {
    size_t size;          /* sizeof(lego_denoise_request)                    */
    int n;                /* batch size                                      */
    int height, width;    /* multiples of lego_model_resolution_multiple()   */
    const float *x;       /* noisy images, n x C x H x W                      */
    const float *sigma;   /* noise level of each image, n, finite and > 0    */
    /* Labels (conditional models; ignored with label_dim 0).  Give at most
     * one of the two; with neither, every image gets the null label. */
    const int32_t *labels;       /* n class indices, -1 = null label        */
    const float *label_vectors;  /* n x label_dim rows (one-hot; all-zero =
                                    null label)                              */
    float guidance;       /* classifier-free guidance scale, >= 0; 1 = plain
                             conditional output, no extra pass (1)          */
    int num_bricks;       /* run bricks 0..num_bricks-1; 0 = all (0)         */
    uint32_t skip_mask;   /* bit k set: skip brick k (k >= 1); the brick
                             above reads the output of the last brick run (0)*/
    float *out;           /* D(x; sigma), n x C x H x W                       */
    float *brick_outputs; /* optional: raw output F_k of every brick, laid
                             out [num_bricks_total][n][C][H][W]; slots of
                             bricks not run are left untouched (NULL)        */
    float *cond;          /* optional: conditioning vectors c, n x D (NULL)  */
} lego_denoise_request;

LEGO_API void lego_denoise_request_init(lego_denoise_request *request);

LEGO_API lego_status lego_denoise(lego_model *model,
                                  const lego_denoise_request *request);


/* ------------------------------------------------------------------------ */
/* Sampling                                                                 */
/* ------------------------------------------------------------------------ */

typedef enum lego_solver {
    LEGO_SOLVER_HEUN = 0,     /* EDM Heun, 2nd-order on all steps but the last */
    LEGO_SOLVER_EULER = 1,    /* EDM Euler (first order)                       */
    LEGO_SOLVER_DPMPP_2M = 2  /* DPM-Solver++(2M), deterministic, 1 eval/step  */
} lego_solver;

typedef enum lego_rng {
    LEGO_RNG_PHILOX = 0, /* Philox4x32-10: the same numbers on CPU and GPU      */
    LEGO_RNG_TORCH = 1   /* PyTorch's CPU generator (mt19937), one per image:
                            reproduces the reference generate.py pipeline      */
} lego_rng;

/* EDM (Karras) noise levels: sigmas[i] = (smax^(1/rho) + i/(steps-1) *
 * (smin^(1/rho) - smax^(1/rho)))^rho for i < steps, then sigmas[steps] = 0.
 * `sigmas` holds steps + 1 values. */
LEGO_API lego_status lego_karras_sigmas(int steps, double sigma_min, double sigma_max,
                                        double rho, double *sigmas);

/*
 * When each brick runs.  At solver step i (noise level t_i, the level the
 * step starts from), brick k runs only if
 *     sigma_min[k] <= t_i <= sigma_max[k]  and  step_min[k] <= i <= step_max[k].
 * Both evaluations of a Heun step use the step's decision.  Brick 0 always
 * runs; a skipped brick's successor reads the output of the last brick run.
 */
typedef struct lego_skip_policy {
    size_t size;
    double sigma_min[LEGO_MAX_BRICKS]; /* (0)        */
    double sigma_max[LEGO_MAX_BRICKS]; /* (infinity) */
    int step_min[LEGO_MAX_BRICKS];     /* (0)        */
    int step_max[LEGO_MAX_BRICKS];     /* (INT_MAX)  */
} lego_skip_policy;

/* A policy that runs every brick at every step. */
LEGO_API void lego_skip_policy_init(lego_skip_policy *policy);

typedef enum lego_skip_rule {
    /* The paper's LEGO-PG rule: the top brick (the image-level one) runs
     * only at high noise and is dropped below the break point. */
    LEGO_SKIP_TOP_AT_LOW_NOISE = 0,
    /* The paper's LEGO-PR rule: the top brick (the small-patch one) is
     * dropped at high noise, above the break point. */
    LEGO_SKIP_TOP_AT_HIGH_NOISE = 1
} lego_skip_rule;

/* Apply a preset to the model's top brick.  The break point is a fraction
 * of the steps when break_sigma <= 0: with LOW_NOISE the top brick is
 * skipped on steps i > floor(fraction * steps), with HIGH_NOISE on steps
 * i < floor(fraction * steps).  When break_sigma > 0 it is a noise level
 * instead: LOW_NOISE skips while t_i < break_sigma, HIGH_NOISE while
 * t_i > break_sigma. */
LEGO_API lego_status lego_skip_policy_preset(lego_skip_policy *policy, const lego_model *model,
                                             lego_skip_rule rule, int steps, double fraction,
                                             double break_sigma);

/* Progress: called after each solver step with the steps done and the
 * total; a non-zero return cancels the run (LEGO_ERR_CANCELLED). */
typedef int (*lego_progress_fn)(int step, int total, void *user);

typedef struct lego_sample_options {
    size_t size;
    lego_solver solver;      /* (LEGO_SOLVER_HEUN)                           */
    int steps;               /* noise levels before the final 0 (18)         */
    double sigma_min;        /* (0.002)                                       */
    double sigma_max;        /* (80)                                          */
    double rho;              /* (7)                                           */
    const double *sigmas;    /* optional: `steps` strictly decreasing positive
                                levels to use instead of Karras'; a final 0 is
                                appended (NULL)                              */
    double s_churn;          /* stochastic churn, Heun and Euler only (0)     */
    double s_min;            /* churn only where s_min <= t <= s_max (0)      */
    double s_max;            /* (infinity)                                    */
    double s_noise;          /* (1)                                           */
    float guidance;          /* classifier-free guidance scale (1 = none)     */
    lego_rng rng;            /* (LEGO_RNG_PHILOX)                             */
    const lego_skip_policy *skip; /* NULL: every brick at every step (NULL)   */
    lego_progress_fn progress;    /* (NULL)                                   */
    void *progress_user;          /* (NULL)                                   */
} lego_sample_options;

LEGO_API void lego_sample_options_init(lego_sample_options *options);

typedef struct lego_sample_request {
    size_t size;
    int n;                  /* images                                          */
    int height, width;      /* image size                                      */
    const uint64_t *seeds;  /* n seeds, one generator each; NULL = 0..n-1      */
    const int32_t *labels;  /* n class indices, -1 = null label; NULL: random
                               labels from each image's generator
                               (conditional models)                            */
    const float *latents;   /* optional n x C x H x W standard-normal start; NULL:
                               drawn from each image's generator               */
    float *out;             /* n x C x H x W samples                            */
    int32_t *labels_out;    /* optional: the n labels used (NULL)              */
    int pad;                /* 0: H and W must be multiples of the brick sizes;
                               1: sample at the next multiples and crop the
                               centre (0)                                      */
} lego_sample_request;

LEGO_API void lego_sample_request_init(lego_sample_request *request);

typedef struct lego_sample_result {
    size_t size;
    int64_t network_evals;     /* denoiser evaluations per image               */
    int64_t brick_evals;       /* brick evaluations per image                  */
    int64_t brick_evals_saved; /* evaluations skipped: network_evals * bricks -
                                  brick_evals                                  */
} lego_sample_result;

LEGO_API void lego_sample_result_init(lego_sample_result *result);

/* Draw n images.  `options` may be NULL (defaults); `result` may be NULL. */
LEGO_API lego_status lego_sample(lego_model *model, const lego_sample_request *request,
                                 const lego_sample_options *options,
                                 lego_sample_result *result);

/* One solver step on a caller-owned batch, for callers driving their own
 * loop with the same solvers.  Uses options->solver, churn settings,
 * guidance and skip policy (with `step` as the step index). */
typedef struct lego_step_request {
    size_t size;
    int n, height, width;
    float *x;              /* in: x at t_cur; out: x at t_next                 */
    double t_cur, t_next;  /* t_cur > t_next >= 0                              */
    double t_prev;         /* DPM-Solver++(2M): the previous step's level, or 0
                              on the first step                                */
    int step;              /* step index i (skip policy, churn)                */
    const int32_t *labels; /* n class indices or NULL (null labels)            */
    const float *noise;    /* churn noise n x C x H x W, standard normal; NULL:
                              no churn                                         */
    float *denoised;       /* optional, n x C x H x W: out, the last D this step
                              evaluated (DPM-Solver++(2M): D(x; t_cur)); in,
                              for DPM-Solver++(2M) with t_prev > 0, the
                              previous step's D                                */
} lego_step_request;

LEGO_API void lego_step_request_init(lego_step_request *request);

LEGO_API lego_status lego_step(lego_model *model, const lego_step_request *request,
                               const lego_sample_options *options);

/* ------------------------------------------------------------------------ */
/* Training                                                                 */
/* ------------------------------------------------------------------------ */
/* The loss is the LEGO training loss of the reference (EDM preconditioning,
 * every brick supervised):  x = y + sigma*noise,  D_k = c_skip x + c_out F_k,
 * weight = (sigma^2 + sd^2) / (sigma sd)^2 with sd = sigma_data,
 *     loss = (1/n) sum_images sum_pixels (1/K) sum_k weight (D_k - y)^2.
 * Gradients use the layout of the model's parameters: one flat float array
 * of lego_model_num_params() values, tensor after tensor in checkpoint
 * order (lego_model_tensor_info says where each one lies).
 *
 * Patch-sampled training (the paper's eq. 12) trains each brick on a random
 * subset of its patches: with fraction f, a brick with P patches per image
 * runs on ceil(f P) of them, drawn per image (an image brick, P = 1, always
 * runs whole).  Where the brick below did not run, the brick above reads
 * the clean image in its place, as the F that denoises to it:
 * (y - c_skip x) / c_out.  Each brick's loss covers its sampled pixels,
 * scaled by P / ceil(f P) to estimate the whole image's.  Time per step
 * falls with the patch bricks' share of the work.
 *
 * Training runs on the model's backend.  On the GPU (LEGO_BACKEND_CUDA) the
 * forward and backward passes, the loss, the gradient norm, clipping and the
 * Adam/AdamW and EMA updates all run on the device, with fp32 master
 * weights, gradients, moments and EMA there (bf16 precision: bf16 GEMM
 * operands with fp32 accumulation).  The trained weights stay on the device
 * between steps (lego_denoise / lego_sample on the model use them at once)
 * and come back to the host copy when something reads it:
 * lego_model_get_params, lego_model_save, lego_trainer_save_state,
 * lego_trainer_export_ema, lego_model_set_backend, lego_brick_add.  State
 * files are the same on both backends: a CPU trainer's state resumes on the
 * GPU and the other way round.  A given GPU gives the same bits on every
 * run, so a resumed GPU run continues bit for bit. */

/* One tensor of the flat parameter array. */
typedef struct lego_tensor_info {
    size_t size;      /* sizeof(lego_tensor_info)                           */
    const char *name; /* reference key ("model.t_embedder.mlp.0.weight"),
                         owned by the model, valid until it changes         */
    int rank;
    int64_t shape[4];
    int64_t offset;   /* first value in the flat array                      */
    int64_t numel;
    int trainable;    /* 0 for the fixed position embeddings                */
} lego_tensor_info;

LEGO_API void lego_tensor_info_init(lego_tensor_info *info);

/* Number of tensors (0 for NULL or failed models). */
LEGO_API int lego_model_num_tensors(const lego_model *model);
LEGO_API lego_status lego_model_tensor_info(lego_model *model, int index,
                                            lego_tensor_info *info);

/* Copy the flat parameter array out of / into the model; `count` must be
 * lego_model_num_params(). */
LEGO_API lego_status lego_model_get_params(lego_model *model, float *params,
                                           int64_t count);
LEGO_API lego_status lego_model_set_params(lego_model *model,
                                           const float *params, int64_t count);

/* One batch with everything random already drawn. */
typedef struct lego_train_batch {
    size_t size;
    int n;                       /* images                                   */
    int height, width;           /* multiples of lego_model_resolution_multiple() */
    const float *y;              /* clean images, n x C x H x W              */
    const float *noise;          /* standard normal, n x C x H x W           */
    const float *sigma;          /* n noise levels, finite and > 0           */
    /* Labels as in lego_denoise_request: at most one of the two; with
     * neither (or label_dim 0) every image gets the null label. */
    const int32_t *labels;       /* n class indices, -1 = null label         */
    const float *label_vectors;  /* n x label_dim                            */
    /* Patch-sampled training (see below): 0 or 1 = every patch. */
    double patch_fraction;
    uint64_t patch_seed;         /* which patches are drawn                  */
} lego_train_batch;

LEGO_API void lego_train_batch_init(lego_train_batch *batch);

/* The loss of one batch and, when `grads` is not NULL, its gradient with
 * respect to every parameter (lego_model_num_params() floats, overwritten;
 * fixed parameters get 0).  Allocates its activations for the call; a
 * trainer keeps them between steps instead. */
LEGO_API lego_status lego_train_loss(lego_model *model,
                                     const lego_train_batch *batch,
                                     float *loss, float *grads);

typedef struct lego_trainer lego_trainer;

typedef enum lego_optimizer {
    LEGO_OPTIMIZER_ADAMW = 0, /* decoupled weight decay: p -= lr*wd*p      */
    LEGO_OPTIMIZER_ADAM = 1   /* L2 weight decay: g += wd*p (torch Adam)   */
} lego_optimizer;

typedef struct lego_train_options {
    size_t size;
    lego_optimizer optimizer; /* (LEGO_OPTIMIZER_ADAMW)                      */
    double lr;                /* learning rate after warm-up (1e-4)          */
    double beta1, beta2;      /* (0.9, 0.999)                                */
    double eps;               /* (1e-8)                                      */
    double weight_decay;      /* (0)                                         */
    int warmup_steps;         /* lr ramps linearly over the first steps:
                                 lr * min(1, (step+1)/warmup_steps) (0)     */
    double grad_clip;         /* clip the global L2 norm to this; 0 = off (0) */
    double ema_halflife_kimg; /* EMA half-life in thousands of images (500) */
    double ema_rampup_ratio;  /* as EDM: half-life at most images_seen*ratio;
                                 0 = off (0.05)                             */
    double p_mean, p_std;     /* ln(sigma) ~ N(p_mean, p_std^2) (-1.2, 1.2)  */
    double label_dropout;     /* probability of replacing a label by the
                                 null label, for guidance (0)               */
    int hflip;                /* 1: mirror each image left-right with
                                 probability 1/2 (0)                        */
    int height, width;        /* image size; 0 = the model's img_resolution */
    uint64_t seed;            /* sigma, noise, dropout and flips (0)         */
    double patch_fraction;    /* patch-sampled brick training: the fraction
                                 of each brick's patches trained per image
                                 and step, in (0, 1]; 0 or 1 = every patch,
                                 the reference's joint training (0)         */
} lego_train_options;

LEGO_API void lego_train_options_init(lego_train_options *options);

typedef struct lego_train_stats {
    size_t size;
    int64_t step;          /* steps taken, this one included                */
    int64_t images_seen;   /* images over all steps, this one included      */
    double loss;           /* this step's loss (as lego_train_loss)         */
    double grad_norm;      /* global L2 norm before clipping                */
    double lr;             /* learning rate used                            */
    double ema_beta;       /* EMA decay used                                */
    int skipped;           /* 1: the gradient was not finite; nothing was
                              updated                                       */
    int64_t skipped_total; /* such steps so far                             */
} lego_train_stats;

LEGO_API void lego_train_stats_init(lego_train_stats *stats);

/*
 * A trainer updates `model`'s weights in place and keeps the EMA weights,
 * the optimiser's moments and the step counter.  It borrows the model: the
 * model must outlive it, keep its bricks, and not be used by another thread
 * during a step.  `options` may be NULL (defaults).  Failure is reported as
 * for lego_model_create(): a failed handle carries the message.
 */
LEGO_API lego_status lego_trainer_create(lego_model *model,
                                         const lego_train_options *options,
                                         lego_trainer **out);

/* One optimiser step on n images (n x C x H x W) with their class labels
 * (n indices, -1 = null; NULL = all null).  Draws sigma, noise, label
 * dropout and flips from Philox streams keyed by the seed and the step
 * number, so a run is reproducible and resumes exactly.  A non-finite
 * gradient skips the update (counted in the stats).  `stats` may be NULL. */
LEGO_API lego_status lego_trainer_step(lego_trainer *trainer,
                                       const float *images,
                                       const int32_t *labels, int n,
                                       lego_train_stats *stats);

/* Where the trainer stands: the counters (step, images_seen, skipped_total)
 * and the last step's loss, grad_norm, lr, ema_beta and skipped, which are
 * 0 before this handle's first step and after lego_trainer_load_state.
 * What a program resuming from a state file reads to know its step. */
LEGO_API lego_status lego_trainer_get_stats(lego_trainer *trainer, lego_train_stats *stats);

/* Everything needed to resume bit-exactly (weights, EMA, Adam moments,
 * counters, seed) as safetensors.  Options are not stored: resume with the
 * same ones.  load_state needs a trainer on a model of the same
 * architecture, and refuses a state with a non-finite value or a negative
 * second moment (LEGO_ERR_FORMAT); on failure nothing changes. */
LEGO_API lego_status lego_trainer_save_state(lego_trainer *trainer, const char *path);
LEGO_API lego_status lego_trainer_load_state(lego_trainer *trainer, const char *path);

/* The EMA weights as a checkpoint lego_model_load() reads. */
LEGO_API lego_status lego_trainer_export_ema(lego_trainer *trainer, const char *path);

LEGO_API void lego_trainer_free(lego_trainer *trainer);

/* The message of the trainer's last failure ("" when none). */
LEGO_API const char *lego_trainer_error(const lego_trainer *trainer);

/* ------------------------------------------------------------------------ */
/* Image output                                                             */
/* ------------------------------------------------------------------------ */
/* These functions take no handle; where `errmsg` is not NULL, a failure
 * writes a message of at most errmsg_size bytes (NUL included) there. */

/* Convert float images (n x C x H x W, nominally [-1, 1]) to uint8 in
 * N x H x W x C order exactly as the reference does: x*127.5+128, clipped
 * to [0, 255], truncated.  NaN becomes 0. */
LEGO_API lego_status lego_images_to_u8(const float *images, int n,
                                       int channels, int height, int width,
                                       uint8_t *out);

/* One image (H x W x C uint8; C = 1 grey, 3 RGB, 4 RGBA) as a PNG file. */
LEGO_API lego_status lego_write_png(const char *path, const uint8_t *pixels,
                                    int height, int width, int channels,
                                    char *errmsg, size_t errmsg_size);

/* n images (N x H x W x C) tiled in a grid of `columns` columns (0 = about
 * square) with `padding` pixels of black between and around them. */
LEGO_API lego_status lego_write_png_grid(const char *path,
                                         const uint8_t *images, int n,
                                         int height, int width, int channels,
                                         int columns, int padding,
                                         char *errmsg, size_t errmsg_size);

/* An ADM-style .npz archive readable by numpy.load: "arr_0" holds the
 * images as uint8 N x H x W x C and, when `labels` is not NULL, "labels"
 * holds the n class indices as int64. */
LEGO_API lego_status lego_write_npz(const char *path, const uint8_t *images,
                                    int n, int height, int width,
                                    int channels, const int32_t *labels,
                                    char *errmsg, size_t errmsg_size);

/* ------------------------------------------------------------------------ */
/* Datasets                                                                 */
/* ------------------------------------------------------------------------ */
/*
 * Training images, read from
 *   - an idx file of MNIST / Fashion-MNIST, gzip-compressed or plain
 *     ("train-images-idx3-ubyte.gz"); labels come from the file beside it
 *     with "images" -> "labels" and "idx3" -> "idx1" in its name
 *     ("train-labels-idx1-ubyte.gz", with or without ".gz"), or from
 *     lego_dataset_options.labels_path; without one the set is unlabelled;
 *   - a folder of PNG images (8-bit grey or RGB; palettes and 1/2/4-bit
 *     grey are expanded), searched recursively, names sorted byte-wise
 *     ("00000/img00000000.png");
 *   - an EDM/StyleGAN-style zip of such PNGs (stored or deflated entries;
 *     no ZIP64, no encryption).
 * A folder or zip may hold a dataset.json at its top level:
 * {"labels": [["00000/img00000000.png", 6], ...]} gives every image a class
 * index (every image needs one; "labels": null means unlabelled).  Hidden
 * files, "__MACOSX/" and links to folders are ignored; other image formats
 * (.jpg, .webp, ...) are refused.  label_dim is the largest label + 1 over
 * the whole set (max_images included), as EDM computes it.
 *
 * Every image must have the same size and channels.  The whole set is
 * decoded when it is opened and kept as uint8; lego_dataset_get converts
 * one image to float32 CHW, x / 127.5 - 1 (so [-1, 1]), and pads it,
 * centred, to the requested resolution (28 x 28 -> 32 x 32 puts 2 pixels
 * of pad_value on every side; an odd margin leaves the extra pixel at the
 * bottom / right).  Images are never resized or cropped.
 *
 * Threading: one dataset may be read (count, shape, get, get_batch) from
 * several threads at once; calls that succeed write nothing to it, calls
 * that fail record their message in it.
 */
typedef struct lego_dataset lego_dataset;

typedef struct lego_dataset_options {
    size_t size;             /* sizeof(lego_dataset_options)                 */
    int resolution;          /* pad images to resolution x resolution,
                                centred; 0 = native size (0).  Fashion-MNIST
                                as the reference trains it: 32              */
    float pad_value;         /* value of the padding, in the [-1, 1] scale
                                of the output (-1: black)                    */
    uint64_t max_bytes;      /* the most bytes of decoded pixels to keep, and
                                the most any one file or archive member may
                                hold or decompress to (2 GiB)                */
    int64_t max_images;      /* keep only the first max_images images, in
                                file / name order; 0 = all (0)               */
    const char *labels_path; /* idx only: the labels file; NULL = look beside
                                the images file (NULL)                       */
} lego_dataset_options;

LEGO_API void lego_dataset_options_init(lego_dataset_options *options);

/*
 * Open a dataset: `path` is an idx file, a folder or a zip (recognised by
 * what it is and by its first bytes).  `options` may be NULL (defaults).
 * Failure is reported as for lego_model_create(): *out is NULL only when
 * even the handle could not be allocated; otherwise it is a dataset in the
 * failed state whose lego_dataset_error() explains the failure, which
 * refuses every call with LEGO_ERR_STATE and which must be freed.
 * LEGO_ERR_FORMAT: a malformed, truncated or inconsistent file;
 * LEGO_ERR_SHAPE: images of different sizes, a labels file that does not
 * match, images larger than `resolution`; LEGO_ERR_UNSUPPORTED: ZIP64,
 * encryption, 16-bit or transparent PNGs, vector labels, other image
 * formats; LEGO_ERR_OUT_OF_MEMORY: more than max_bytes, or malloc failed.
 */
LEGO_API lego_status lego_dataset_open(const char *path,
                                       const lego_dataset_options *options,
                                       lego_dataset **out);

/* Free a dataset.  NULL is allowed. */
LEGO_API void lego_dataset_free(lego_dataset *dataset);

/* The message of the dataset's last failure ("" when none).  Owned by the
 * dataset.  NULL gives a static message. */
LEGO_API const char *lego_dataset_error(const lego_dataset *dataset);

/* Number of images (0 for NULL or a failed dataset). */
LEGO_API int64_t lego_dataset_count(const lego_dataset *dataset);

/* Shape of the images lego_dataset_get writes: channels (1 or 3) and the
 * padded height and width.  Any output pointer may be NULL. */
LEGO_API lego_status lego_dataset_shape(const lego_dataset *dataset,
                                        int *channels, int *height,
                                        int *width);

/* Number of classes: the largest label + 1; 0 when unlabelled. */
LEGO_API int lego_dataset_label_dim(const lego_dataset *dataset);

/* Image `index` (0 <= index < count) as float32 C x H x W in [-1, 1] into
 * chw_out (channels * height * width floats, lego_dataset_shape), and its
 * label into *label_out (-1 when unlabelled; label_out may be NULL). */
LEGO_API lego_status lego_dataset_get(lego_dataset *dataset, int64_t index,
                                      float *chw_out, int32_t *label_out);

/* n images at once: out is n x C x H x W, labels_out (may be NULL) n
 * labels.  Every index is checked before anything is written. */
LEGO_API lego_status lego_dataset_get_batch(lego_dataset *dataset,
                                            const int64_t *indices, int n,
                                            float *out, int32_t *labels_out);

/* ------------------------------------------------------------------------ */
/* Presets                                                                  */
/* ------------------------------------------------------------------------ */
/*
 * The architectures of the reference code (lego_models.py of
 * JegZheng/LEGODiffusion) by name, brick lists bottom brick first:
 *   lego_S_PG_64  lego_S_PR_64  lego_S_U_32   lego_S_U_64      (D 384, 6 heads)
 *   lego_L_PG_32  lego_L_PG_64  lego_L_PR_32  lego_L_PR_64
 *   lego_L_U_32   lego_L_U_64   lego_L_PG_64_old  lego_L_PR_64_old
 *                                                              (D 1024, 16 heads)
 *   lego_XL_PG_32 lego_XL_PG_64 lego_XL_PR_32 lego_XL_PR_64
 *   lego_XL_U_32  lego_XL_U_64                                 (D 1152, 16 heads)
 * the DiT baselines of the same widths as one-brick models
 *   dit_S2_64 (64/2 x 12)  dit_L2_64 (64/2 x 24)  dit_XL2_32 (32/2 x 28)
 * and fmnist_lego_pg32, the Fashion-MNIST model (D 256, 4 heads, 1 channel,
 * 10 classes).  A preset's own data: 3 channels at 64x64 (ImageNet pixels)
 * for the S and L *_64 models and dit_S2_64 / dit_L2_64, 4 channels
 * (latents) otherwise; 1000 classes.  Names are case-sensitive.
 */
typedef struct lego_preset_options {
    size_t size;          /* sizeof(lego_preset_options)                     */
    int img_channels;     /* 0 = the preset's (0)                            */
    int img_resolution;   /* 0 = the preset's (0)                            */
    int label_dim;        /* classes; 0 = unconditional; -1 = the preset's (-1) */
    int num_threads;      /* as lego_model_config.num_threads (0)            */
    lego_backend backend; /* (LEGO_BACKEND_CPU)                              */
    int device;           /* (0)                                             */
    lego_precision precision; /* GPU arithmetic (LEGO_PRECISION_FP32)        */
} lego_preset_options;

LEGO_API void lego_preset_options_init(lego_preset_options *options);

/* Number of presets, and the name of preset `index` (0 <= index < count;
 * NULL otherwise).  Names are static strings. */
LEGO_API int lego_preset_count(void);
LEGO_API const char *lego_preset_name(int index);

/* The global settings of preset `name` with `options` applied (NULL =
 * defaults).  LEGO_ERR_INVALID_ARGUMENT for an unknown name, a NULL
 * pointer or a negative option.  Allocates nothing. */
LEGO_API lego_status lego_preset_config(const char *name,
                                        const lego_preset_options *options,
                                        lego_model_config *config);
/* Its number of bricks (0 for an unknown name) and brick `index`, bottom
 * brick first. */
LEGO_API int lego_preset_num_bricks(const char *name);
LEGO_API lego_status lego_preset_get_brick(const char *name, int index,
                                           lego_brick_config *brick);

/* The number of parameters lego_model_num_params() would report for the
 * preset built with `options`, without allocating them (the large presets
 * hold gigabytes). */
LEGO_API lego_status lego_preset_num_params(const char *name,
                                            const lego_preset_options *options,
                                            int64_t *count);

/* Create the preset's model (lego_model_create + lego_brick_add), weights
 * zero: follow with lego_model_init_weights() or lego_model_load_weights().
 * Failure is reported as for lego_model_create(); an unknown name gives
 * LEGO_ERR_INVALID_ARGUMENT and a handle whose message lists the presets. */
LEGO_API lego_status lego_model_create_preset(const char *name,
                                              const lego_preset_options *options,
                                              lego_model **out);

#ifdef __cplusplus
}
#endif

#endif /* LEGO_H */
