/*
 * fuzz_request.c -- libFuzzer harness for request validation: the input is
 * decoded into a lego_denoise, lego_sample or lego_step call on one of two
 * small models (sizes, noise levels with NaN / infinities / negatives,
 * labels, guidance, brick masks, skip policies, solver settings, memory
 * budgets).
 *
 * Mostly the decoding yields valid values, with a byte range reserved for
 * hostile ones, so both the checks and the code behind them run.  Caller
 * buffers are exactly as large as the request says; for a request too
 * large to back with memory they are a page nothing may touch, and the
 * model has a memory budget, so the library must refuse before reading or
 * writing them.  After every input a fixed request must give the same
 * output as at the start: a failed call leaves the model as it was.
 */
#include "fuzz_util.h"

#include <limits.h>
#include <math.h>

#define MAX_BATCH (1 << 20)
/* Requests up to this many floats get real buffers (and stay fast);
 * larger ones run under a budget of NO_ROOM bytes above what the model
 * holds, less than the 12 bytes per float of scratch any of them needs. */
#define REAL_FLOATS ((size_t)1 << 14)
#define NO_ROOM ((size_t)1 << 16)

static lego_model *models[2];
static int channels[2] = {1, 2}, label_dims[2] = {3, 0}, num_bricks[2] = {2, 1};
static float reference[16], ref_x[16];

static lego_model *make_model(int which) {
    lego_model_config c;
    lego_model_config_init(&c);
    c.img_channels = channels[which];
    c.label_dim = label_dims[which];
    c.hidden_size = 8;
    c.num_heads = which == 0 ? 2 : 1;
    c.mlp_ratio = 1.0;
    c.frequency_embedding_size = 8;
    c.num_threads = 1;
    lego_model *m = NULL;
    FUZZ_REQUIRE(lego_model_create(&c, &m) == LEGO_OK, "%s", lego_model_error(m));
    const int bricks[2][2] = {{2, 1}, {4, 2}};
    for (int k = 2 - num_bricks[which]; k < 2; k++) {
        lego_brick_config b;
        lego_brick_config_init(&b);
        b.brick_size = bricks[k][0];
        b.patch_size = bricks[k][1];
        FUZZ_REQUIRE(lego_brick_add(m, &b) == LEGO_OK, "%s", lego_model_error(m));
    }
    /* Non-zero everywhere (init leaves adaLN and final layers at zero),
     * so every path computes something. */
    int64_t np = lego_model_num_params(m);
    float *p = malloc((size_t)np * sizeof *p);
    FUZZ_REQUIRE(p && lego_model_get_params(m, p, np) == LEGO_OK, "get_params");
    for (int64_t i = 0; i < np; i++) p[i] = 0.3f * sinf(0.7f * (float)i + (float)which);
    FUZZ_REQUIRE(lego_model_set_params(m, p, np) == LEGO_OK, "set_params");
    free(p);
    return m;
}

/* The fixed request checked after every input: model 0, one 4x4 image. */
static void fixed_denoise(float *out) {
    float sigma = 0.8f;
    int32_t label = 1;
    lego_denoise_request q;
    lego_denoise_request_init(&q);
    q.n = 1;
    q.height = q.width = 4;
    q.x = ref_x;
    q.sigma = &sigma;
    q.labels = &label;
    q.guidance = 1.5f;
    q.out = out;
    FUZZ_REQUIRE(lego_denoise(models[0], &q) == LEGO_OK, "%s", lego_model_error(models[0]));
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    models[0] = make_model(0);
    models[1] = make_model(1);
    for (int i = 0; i < 16; i++) ref_x[i] = cosf((float)i);
    fixed_denoise(reference);
    return 0;
}

/* ---- decoding ---- */

static int decode_n(fuzz_reader *r) {
    static const int special[6] = {0, -1, INT_MIN, INT_MAX, MAX_BATCH + 1, MAX_BATCH};
    uint8_t b = fuzz_u8(r);
    return b < 250 ? 1 + b % 4 : special[b - 250];
}

static int decode_side(fuzz_reader *r) {
    static const int valid[6] = {4, 8, 4, 12, 16, 8};
    static const int special[16] = {0, -4, 1, 2, 3, 6, 65536, 262144, 262148, INT_MAX,
                                    INT_MIN, 8192, 5, 7, 1 << 17, 10};
    uint8_t b = fuzz_u8(r);
    return b < 240 ? valid[b % 6] : special[b - 240];
}

/* A positive level most of the time; raw bits (NaN, inf, <= 0) else. */
static float decode_sigma(fuzz_reader *r) {
    uint8_t b = fuzz_u8(r);
    return b < 200 ? 0.02f * (float)(b + 1) : fuzz_f32(r);
}

static double decode_level(fuzz_reader *r, double usual) {
    uint8_t b = fuzz_u8(r);
    return b < 200 ? usual : b < 230 ? usual * (b - 199) : fuzz_f64(r);
}

static int32_t decode_label(fuzz_reader *r) {
    uint8_t b = fuzz_u8(r);
    return b < 200 ? (int32_t)(b % 5) - 1 : (int32_t)fuzz_u32(r);
}

static float decode_guidance(fuzz_reader *r) {
    static const float usual[4] = {1.0f, 0.0f, 2.5f, 1.0f};
    uint8_t b = fuzz_u8(r);
    return b < 240 ? usual[b % 4] : fuzz_f32(r);
}

/* What the caller must provide: count values, or the guard page when the
 * request cannot be backed (the library must refuse it untouched). */
static void *buffer(int real, size_t count, size_t elem) {
    if (!real) return fuzz_guard_page();
    void *p = calloc(count ? count : 1, elem);
    FUZZ_REQUIRE(p, "out of memory in the harness");
    return p;
}

static void release(void *p) {
    if (p != fuzz_guard_page()) free(p);
}

typedef struct shape {
    int n, h, w, c, L, K;
    int n_ok;       /* 1 <= n <= MAX_BATCH: per-image arrays are real */
    int real;       /* image buffers are real */
    size_t img;     /* n*c*h*w when real */
} shape;

static shape decode_shape(fuzz_reader *r, int which) {
    shape s;
    s.n = decode_n(r);
    s.h = decode_side(r);
    s.w = decode_side(r);
    s.c = channels[which];
    s.L = label_dims[which];
    s.K = num_bricks[which];
    s.n_ok = s.n >= 1 && s.n <= MAX_BATCH;
    uint64_t prod = s.n_ok && s.h > 0 && s.w > 0
                        ? (uint64_t)s.n * (uint64_t)s.c * (uint64_t)s.h * (uint64_t)s.w
                        : UINT64_MAX;
    s.real = prod <= REAL_FLOATS;
    s.img = s.real ? (size_t)prod : 0;
    return s;
}

static void check_status(lego_model *m, lego_status s) {
    FUZZ_REQUIRE(fuzz_known_status(s), "status %d", (int)s);
    if (s != LEGO_OK) FUZZ_REQUIRE(lego_model_error(m)[0] != '\0', "failure %d, no message", (int)s);
}

/* ---- the three calls ---- */

static void run_denoise(fuzz_reader *r, lego_model *m, shape s) {
    lego_denoise_request q;
    lego_denoise_request_init(&q);
    q.n = s.n;
    q.height = s.h;
    q.width = s.w;
    float *x = buffer(s.real, s.img, sizeof(float)), *out = buffer(s.real, s.img, sizeof(float));
    float *sigma = buffer(s.n_ok, (size_t)s.n, sizeof(float));
    for (size_t i = 0; s.real && i < s.img; i++) x[i] = sinf((float)i);
    for (int i = 0; s.n_ok && i < s.n && i < 64; i++) sigma[i] = decode_sigma(r);
    for (int i = 64; s.n_ok && i < s.n; i++) sigma[i] = 1.0f;
    int32_t *labels = NULL;
    float *vectors = NULL, *bricks = NULL, *cond = NULL;
    uint8_t which_labels = fuzz_u8(r) % 4;
    if (which_labels & 1) {
        labels = buffer(s.n_ok, (size_t)s.n, sizeof *labels);
        for (int i = 0; s.n_ok && i < s.n && i < 64; i++) labels[i] = decode_label(r);
    }
    if (which_labels & 2) {
        size_t len = s.n_ok ? (size_t)s.n * (size_t)(s.L > 0 ? s.L : 1) : 0;
        vectors = buffer(s.n_ok, len, sizeof *vectors);
        for (size_t i = 0; s.n_ok && i < len && i < 64; i++) {
            uint8_t b = fuzz_u8(r);
            vectors[i] = b < 200 ? (float)(b % 2) : fuzz_f32(r);
        }
    }
    q.guidance = decode_guidance(r);
    q.num_bricks = (int)(fuzz_u8(r) % 5) - 1;
    uint8_t mb = fuzz_u8(r);
    q.skip_mask = mb < 240 ? (uint32_t)(mb % 8) : fuzz_u32(r);
    uint8_t extra = fuzz_u8(r);
    if (extra & 1) bricks = buffer(s.real, s.img * (size_t)s.K, sizeof(float));
    if (extra & 2) cond = buffer(s.real, (size_t)(s.real ? s.n : 0) * 8, sizeof(float));
    q.x = x;
    q.sigma = sigma;
    q.labels = labels;
    q.label_vectors = vectors;
    q.out = out;
    q.brick_outputs = bricks;
    q.cond = cond;
    if (extra & 4) q.x = NULL;
    check_status(m, lego_denoise(m, &q));
    release(x);
    release(out);
    release(sigma);
    if (labels) release(labels);
    if (vectors) release(vectors);
    if (bricks) release(bricks);
    if (cond) release(cond);
}

static int cancel_at;
static int progress(int step, int total, void *user) {
    (void)user;
    FUZZ_REQUIRE(step >= 1 && step <= total, "progress %d of %d", step, total);
    return cancel_at > 0 && step >= cancel_at;
}

/* Solver options shared by sample and step; `steps` decides whether a
 * custom sigma array can be read. */
static void decode_options(fuzz_reader *r, lego_sample_options *o, lego_skip_policy *skip,
                           double *sigmas, const lego_model *m) {
    static const int special_steps[5] = {0, -1, 100001, INT_MAX, INT_MIN};
    uint8_t b = fuzz_u8(r);
    o->steps = b < 240 ? 1 + b % 6 : special_steps[(b - 240) % 5];
    b = fuzz_u8(r);
    o->solver = b % 4 < 3 ? (lego_solver)(b % 4) : (lego_solver)(int)fuzz_u32(r);
    b = fuzz_u8(r);
    o->rng = b % 3 < 2 ? (lego_rng)(b % 3) : (lego_rng)(int)fuzz_u32(r);
    uint8_t flags = fuzz_u8(r);
    if (flags & 1) {
        o->sigma_min = decode_level(r, 0.002);
        o->sigma_max = decode_level(r, 80);
        o->rho = decode_level(r, 7);
    }
    if ((flags & 2) && o->steps >= 1 && o->steps <= 6) {
        double t = 50;
        for (int i = 0; i < o->steps; i++) {
            uint8_t v = fuzz_u8(r);
            t = v < 220 ? t * (0.1 + 0.8 * v / 220.0) : fuzz_f64(r);
            sigmas[i] = t;
        }
        o->sigmas = sigmas;
    }
    if (flags & 4) {
        o->s_churn = decode_level(r, 10);
        o->s_min = decode_level(r, 0.05);
        o->s_max = decode_level(r, 50);
        o->s_noise = decode_level(r, 1.003);
    }
    o->guidance = decode_guidance(r);
    if (flags & 8) {
        lego_skip_policy_init(skip);
        for (int k = 0; k < 2; k++) {
            skip->sigma_min[k] = decode_level(r, 0.5 * k);
            skip->sigma_max[k] = decode_level(r, 20);
            uint8_t v = fuzz_u8(r);
            skip->step_min[k] = v < 200 ? v % 4 : (int)fuzz_u32(r);
            v = fuzz_u8(r);
            skip->step_max[k] = v < 200 ? v % 8 : (int)fuzz_u32(r);
        }
        if (flags & 16) {
            b = fuzz_u8(r);
            lego_skip_rule rule = b % 3 < 2 ? (lego_skip_rule)(b % 3) : (lego_skip_rule)7;
            int steps = (int)(fuzz_u8(r) % 30) - 2;
            double fraction = decode_level(r, 0.5), brk = decode_level(r, 0);
            lego_status s = lego_skip_policy_preset(skip, m, rule, steps, fraction, brk);
            FUZZ_REQUIRE(fuzz_known_status(s), "preset status %d", (int)s);
        }
        o->skip = skip;
    }
    if (flags & 32) {
        o->progress = progress;
        cancel_at = fuzz_u8(r) % 4;
    }
}

static void run_sample(fuzz_reader *r, lego_model *m, shape s) {
    lego_sample_options o;
    lego_sample_options_init(&o);
    lego_skip_policy skip;
    double sigmas[6];
    decode_options(r, &o, &skip, sigmas, m);
    lego_sample_request q;
    lego_sample_request_init(&q);
    q.n = s.n;
    q.height = s.h;
    q.width = s.w;
    uint8_t b = fuzz_u8(r);
    q.pad = b % 4 < 2 ? b % 4 : (b % 4 == 2 ? -1 : 7);
    uint8_t flags = fuzz_u8(r);
    uint64_t *seeds = NULL;
    int32_t *labels = NULL, *labels_out = NULL;
    float *latents = NULL;
    int small = s.n_ok && s.n <= 4;
    if (flags & 1) {
        seeds = buffer(small, (size_t)s.n, sizeof *seeds);
        for (int i = 0; small && i < s.n; i++) seeds[i] = fuzz_u64(r);
    }
    if (flags & 2) {
        labels = buffer(small, (size_t)s.n, sizeof *labels);
        for (int i = 0; small && i < s.n; i++) labels[i] = decode_label(r);
    }
    if (flags & 4) {
        latents = buffer(s.real, s.img, sizeof *latents);
        for (size_t i = 0; s.real && i < s.img; i++) latents[i] = cosf(0.1f * (float)i);
    }
    if (flags & 8) labels_out = buffer(small, (size_t)s.n, sizeof *labels_out);
    float *out = buffer(s.real, s.img, sizeof(float));
    q.seeds = seeds;
    q.labels = labels;
    q.latents = latents;
    q.labels_out = labels_out;
    q.out = flags & 16 ? NULL : out;
    lego_sample_result res;
    lego_sample_result_init(&res);
    lego_status st = lego_sample(m, &q, &o, flags & 32 ? &res : NULL);
    check_status(m, st);
    if (st == LEGO_OK && (flags & 32))
        FUZZ_REQUIRE(res.network_evals >= o.steps && res.brick_evals <= res.network_evals * s.K &&
                         res.brick_evals_saved == res.network_evals * s.K - res.brick_evals,
                     "sample accounting %lld %lld %lld", (long long)res.network_evals,
                     (long long)res.brick_evals, (long long)res.brick_evals_saved);
    if (st == LEGO_OK && labels_out)
        for (int i = 0; i < s.n; i++)
            FUZZ_REQUIRE(labels_out[i] >= -1 && labels_out[i] < (s.L > 0 ? s.L : 0),
                         "labels_out[%d] = %d", i, labels_out[i]);
    release(out);
    if (seeds) release(seeds);
    if (labels) release(labels);
    if (latents) release(latents);
    if (labels_out) release(labels_out);
}

static void run_step(fuzz_reader *r, lego_model *m, shape s) {
    lego_sample_options o;
    lego_sample_options_init(&o);
    lego_skip_policy skip;
    double sigmas[6];
    decode_options(r, &o, &skip, sigmas, m);
    lego_step_request q;
    lego_step_request_init(&q);
    q.n = s.n;
    q.height = s.h;
    q.width = s.w;
    q.t_cur = decode_level(r, 2.0);
    q.t_next = decode_level(r, 1.0);
    q.t_prev = fuzz_u8(r) < 128 ? 0.0 : decode_level(r, 3.0);
    uint8_t b = fuzz_u8(r);
    q.step = b < 240 ? b % 8 : (int)fuzz_u32(r);
    uint8_t flags = fuzz_u8(r);
    float *x = buffer(s.real, s.img, sizeof(float));
    for (size_t i = 0; s.real && i < s.img; i++) x[i] = sinf(0.3f * (float)i);
    float *noise = NULL, *den = NULL;
    int32_t *labels = NULL;
    int small = s.n_ok && s.n <= 4;
    if (flags & 1) {
        noise = buffer(s.real, s.img, sizeof(float));
        for (size_t i = 0; s.real && i < s.img; i++) noise[i] = cosf((float)i);
    }
    if (flags & 2) den = buffer(s.real, s.img, sizeof(float));
    if (flags & 4) {
        labels = buffer(small, (size_t)s.n, sizeof *labels);
        for (int i = 0; small && i < s.n; i++) labels[i] = decode_label(r);
    }
    q.x = flags & 8 ? NULL : x;
    q.noise = noise;
    q.denoised = den;
    q.labels = labels;
    check_status(m, lego_step(m, &q, &o));
    release(x);
    if (noise) release(noise);
    if (den) release(den);
    if (labels) release(labels);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_reader r = {data, size};
    int op = fuzz_u8(&r) % 3, which = fuzz_u8(&r) % 2;
    lego_model *m = models[which];
    shape s = decode_shape(&r, which);
    /* Labels beyond 64 images and batches of more than 4 are filled with
     * defaults: the decoding stays short.  A request without real buffers
     * always runs under a budget that cannot hold it. */
    size_t held = lego_model_memory_usage(m);
    uint8_t b = fuzz_u8(&r) % 4;
    size_t budget = !s.real ? held + NO_ROOM
                    : b == 0 ? 0
                    : b == 1 ? held + ((size_t)4 << 20)
                    : b == 2 ? held + 1024 : held + 65536;
    /* A budget below the scratch already held gives it back first. */
    FUZZ_REQUIRE(lego_model_set_memory_budget(m, budget) == LEGO_OK, "%s", lego_model_error(m));
    if (op == 0) run_denoise(&r, m, s);
    else if (op == 1) run_sample(&r, m, s);
    else run_step(&r, m, s);

    /* The models are as they were. */
    FUZZ_REQUIRE(lego_model_set_memory_budget(m, 0) == LEGO_OK, "%s", lego_model_error(m));
    float again[16];
    fixed_denoise(again);
    FUZZ_REQUIRE(memcmp(again, reference, sizeof again) == 0, "the fixed request changed");
    return 0;
}
