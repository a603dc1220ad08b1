/*
 * test_api.c -- the public API (include/lego.h) as a caller sees it:
 *
 *   basics       versions, status strings, option defaults, the `size`
 *                field contract (older and newer callers)
 *   create       bad configurations and bricks; failed handles refuse
 *                every call with LEGO_ERR_STATE and keep their message
 *   introspect   brick list, exact parameter counts, resolution multiple
 *   weights      init determinism and the reference's zero layers; save and
 *                load round trips (F32, F16, BF16); every load failure
 *                (missing file, truncation, no lego.config, missing / extra /
 *                wrongly shaped tensors, F64); load_weights
 *   denoise      every bad request; skipping, num_bricks, guidance, labels,
 *                conditioning, batch invariance; threads: two models denoising
 *                and sampling at once give the sequential results bit for
 *                bit, messages stay with their model, one model shared under
 *                a lock
 *   golden       ../shared/models/fmnist_lego_pg32.safetensors loads
 *                (skipped when ../shared is absent)
 *
 * Small models (hidden 16, 8x8 images) keep it fast under valgrind.
 */
#define _POSIX_C_SOURCE 200809L
#include "testutil.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <pthread.h>
#include <stdint.h>

#include "model.h"

/* ------------------------------------------------------------------------ */
/* helpers                                                                  */
/* ------------------------------------------------------------------------ */

/* The small configuration most tests use: C = 2, 10 classes, D = 16. */
static lego_model_config small_config(void) {
    lego_model_config c;
    lego_model_config_init(&c);
    c.img_channels = 2;
    c.img_resolution = 8;
    c.label_dim = 10;
    c.hidden_size = 16;
    c.num_heads = 2;
    c.mlp_ratio = 2.0;
    c.frequency_embedding_size = 32;
    c.num_threads = 2;
    return c;
}

/* The standard test model: bricks 4/2, 8/4, 8/2, all trainable parameters
 * random (adaLN and final layers too, so every brick does something). */
static const int std_bricks[][3] = {{4, 2, 1}, {8, 4, 1}, {8, 2, 1}};

static void randomize(lego_model *m, uint64_t seed) {
    rng_seed(seed);
    for (int i = 0; i < m->num_params; i++) {
        const lego_param *p = &m->table[i];
        if (p->fixed) continue;
        double fan_in = p->rank >= 2 ? (double)(p->numel / (size_t)p->shape[0]) : 4.0;
        double a = 1.5 / sqrt(fan_in);
        for (size_t j = 0; j < p->numel; j++) m->params[p->offset + j] = (float)urand(-a, a);
    }
}

static lego_model *std_model(uint64_t seed) {
    lego_model_config c = small_config();
    lego_model *m = model_with_bricks(&c, std_bricks, 3);
    randomize(m, seed);
    return m;
}

static const lego_param *find_param(const lego_model *m, const char *name) {
    for (int i = 0; i < m->num_params; i++)
        if (strcmp(m->table[i].name, name) == 0) return &m->table[i];
    return NULL;
}

/* Test inputs: n images of C x h x w, sigmas across the range. */
typedef struct inputs {
    int n, C, h, w;
    float *x, *sigma;
    size_t img; /* floats in one batch */
} inputs;

static inputs make_inputs(int n, int C, int h, int w, uint64_t seed) {
    inputs in = {n, C, h, w, NULL, NULL, (size_t)n * C * h * w};
    rng_seed(seed);
    in.x = rand_floats(in.img, -2, 2);
    in.sigma = malloc((size_t)n * sizeof *in.sigma);
    static const float sig[] = {0.7f, 0.05f, 12.0f, 2.5f, 0.3f, 80.0f};
    for (int i = 0; i < n; i++) in.sigma[i] = sig[i % 6];
    return in;
}
static void free_inputs(inputs *in) {
    free(in->x);
    free(in->sigma);
}

static void request(lego_denoise_request *r, const inputs *in, float *out) {
    lego_denoise_request_init(r);
    r->n = in->n;
    r->height = in->h;
    r->width = in->w;
    r->x = in->x;
    r->sigma = in->sigma;
    r->out = out;
}

static float *alloc_out(size_t n) {
    float *p = malloc(n * sizeof *p);
    ck_assert(p);
    for (size_t i = 0; i < n; i++) p[i] = 12345.0f; /* sentinel */
    return p;
}

static void denoise_ok(lego_model *m, const lego_denoise_request *r) {
    lego_status s = lego_denoise(m, r);
    ck_assert_msg(s == LEGO_OK, "denoise: %s (%s)", lego_status_string(s), lego_model_error(m));
    ck_assert_str_eq(lego_model_error(m), "");
}

static double max_abs_diff(const float *a, const float *b, size_t n) {
    double d = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - b[i]);
        if (!(e <= d)) d = e;
    }
    return d;
}

/* ---- temporary files ---- */

static char tmpdir[64];
static char tmppath_buf[8][160];
static int tmppath_next;

static void make_tmpdir(void) {
    strcpy(tmpdir, "/tmp/lego_api_XXXXXX");
    ck_assert(mkdtemp(tmpdir) != NULL);
    tmppath_next = 0;
}
static const char *tmppath(const char *name) {
    char *p = tmppath_buf[tmppath_next++ % 8];
    snprintf(p, sizeof tmppath_buf[0], "%s/%s", tmpdir, name);
    return p;
}
static void remove_tmpdir(void) {
    DIR *d = opendir(tmpdir);
    if (!d) return;
    struct dirent *e;
    char path[sizeof tmpdir + 260];
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "%s/%s", tmpdir, e->d_name);
        remove(path);
    }
    closedir(d);
    ck_assert_msg(rmdir(tmpdir) == 0, "temp dir not empty");
}


/* Write the model's tensors as F32 safetensors, optionally with lego.config,
 * leaving out `skip`, adding an extra tensor `extra`, or giving tensor
 * `reshape` a wrong shape (by flattening it). */
static void write_variant(const lego_model *m, const char *path, int with_config,
                          const char *skip, const char *extra, const char *reshape) {
    st_write_item *items = calloc((size_t)m->num_params + 1, sizeof *items);
    int n = 0;
    for (int i = 0; i < m->num_params; i++) {
        const lego_param *p = &m->table[i];
        if (skip && strcmp(p->name, skip) == 0) continue;
        items[n].name = p->name;
        items[n].rank = p->rank;
        for (int d = 0; d < p->rank; d++) items[n].shape[d] = p->shape[d];
        if (reshape && strcmp(p->name, reshape) == 0) {
            items[n].rank = 1;
            items[n].shape[0] = (int64_t)p->numel;
        }
        items[n].data = m->params + p->offset;
        n++;
    }
    static const float extra_data[3] = {1, 2, 3};
    if (extra) {
        items[n].name = extra;
        items[n].rank = 1;
        items[n].shape[0] = 3;
        items[n].data = extra_data;
        n++;
    }
    char *json = with_config ? config_to_json(m) : NULL;
    lego_err err;
    ck_assert_msg(st_write_f32(path, items, n, json, &err) == LEGO_OK, "%s", err.msg);
    free(json);
    free(items);
}

/* Every call on a failed handle refuses with LEGO_ERR_STATE and leaves its
 * message alone. */
static void expect_failed_handle(lego_model *m, const char *needle) {
    ck_assert(m != NULL);
    char msg[600];
    snprintf(msg, sizeof msg, "%s", lego_model_error(m));
    ck_assert_msg(msg[0] != '\0', "failed handle has no message");
    if (needle) ck_assert_msg(strstr(msg, needle), "message '%s' lacks '%s'", msg, needle);

    lego_brick_config b;
    lego_brick_config_init(&b);
    lego_model_config c;
    lego_model_config_init(&c);
    float x[4] = {0}, sigma[1] = {1}, out[4];
    lego_denoise_request r;
    lego_denoise_request_init(&r);
    r.n = 1;
    r.height = r.width = 2;
    r.x = x;
    r.sigma = sigma;
    r.out = out;
    ck_assert_int_eq(lego_brick_add(m, &b), LEGO_ERR_STATE);
    ck_assert_int_eq(lego_model_init_weights(m, 1), LEGO_ERR_STATE);
    ck_assert_int_eq(lego_model_load_weights(m, "/nonexistent/x.safetensors"), LEGO_ERR_STATE);
    ck_assert_int_eq(lego_model_save(m, "/nonexistent/x.safetensors"), LEGO_ERR_STATE);
    ck_assert_int_eq(lego_model_get_config(m, &c), LEGO_ERR_STATE);
    ck_assert_int_eq(lego_model_get_brick(m, 0, &b), LEGO_ERR_STATE);
    ck_assert_int_eq(lego_model_check_resolution(m, 32, 32), LEGO_ERR_STATE);
    ck_assert_int_eq(lego_model_set_threads(m, 1), LEGO_ERR_STATE);
    ck_assert_int_eq(lego_denoise(m, &r), LEGO_ERR_STATE);
    ck_assert_int_eq(lego_model_num_bricks(m), 0);
    ck_assert(lego_model_num_params(m) == 0);
    ck_assert_int_eq(lego_model_resolution_multiple(m), 0);
    ck_assert_str_eq(lego_model_error(m), msg);
}

/* Parameter count of a config by the reference's layer list. */
static int64_t expected_params(const lego_model_config *c, const int (*bricks)[3], int nb) {
    int64_t D = c->hidden_size, F = c->frequency_embedding_size, L = c->label_dim;
    int64_t C = c->img_channels, H = (int64_t)(c->hidden_size * c->mlp_ratio);
    int64_t n = F * D + D + D * D + D; /* t_embedder.mlp.0, .2 */
    if (L > 0) n += L * D + D;         /* y_embedder */
    for (int k = 0; k < nb; k++) {
        int64_t bs = bricks[k][0], p = bricks[k][1], depth = bricks[k][2];
        int64_t T = (bs / p) * (bs / p), c_in = (k == 0 ? C : 2 * C) + 2;
        n += T * D;                      /* pos_embed */
        n += D * c_in * p * p + D;       /* x_embedder */
        n += depth * ((D * 3 * D + 3 * D) + (D * D + D) + (D * H + H) + (H * D + D) +
                      (D * 6 * D + 6 * D));
        n += D * p * p * C + p * p * C;  /* final_layer.linear */
        n += D * 2 * D + 2 * D;          /* final_layer.adaLN_modulation.1 */
    }
    return n;
}

/* ------------------------------------------------------------------------ */
/* basics                                                                   */
/* ------------------------------------------------------------------------ */

START_TEST(test_version) {
    char want[32];
    snprintf(want, sizeof want, "%d.%d.%d", LEGO_VERSION_MAJOR, LEGO_VERSION_MINOR,
             LEGO_VERSION_PATCH);
    ck_assert_str_eq(lego_version(), want);
    ck_assert_str_eq(lego_version(), LEGO_VERSION_STRING);
    ck_assert_int_eq(lego_version_number(), LEGO_VERSION_NUMBER);
    ck_assert_int_eq(LEGO_VERSION_NUMBER,
                     LEGO_VERSION_MAJOR * 10000 + LEGO_VERSION_MINOR * 100 + LEGO_VERSION_PATCH);
}
END_TEST

START_TEST(test_status_strings) {
    const lego_status all[] = {LEGO_OK, LEGO_ERR_INVALID_ARGUMENT, LEGO_ERR_OUT_OF_MEMORY,
                               LEGO_ERR_IO, LEGO_ERR_FORMAT, LEGO_ERR_SHAPE,
                               LEGO_ERR_UNSUPPORTED, LEGO_ERR_CANCELLED, LEGO_ERR_BACKEND,
                               LEGO_ERR_STATE};
    const int n = (int)(sizeof all / sizeof all[0]);
    for (int i = 0; i < n; i++) {
        ck_assert_int_eq((int)all[i], i); /* the ABI values */
        const char *s = lego_status_string(all[i]);
        ck_assert_msg(s && s[0], "status %d has no string", i);
        for (int j = 0; j < i; j++)
            ck_assert_msg(strcmp(s, lego_status_string(all[j])) != 0, "%d and %d share '%s'", i,
                          j, s);
    }
    const char *unknown = lego_status_string((lego_status)99);
    ck_assert(unknown && unknown[0]);
    for (int i = 0; i < n; i++) ck_assert(strcmp(unknown, lego_status_string(all[i])) != 0);
    ck_assert(lego_status_string((lego_status)-1) != NULL);
    ck_assert(lego_model_error(NULL) != NULL && lego_model_error(NULL)[0]);
}
END_TEST

START_TEST(test_option_defaults) {
    lego_model_config c;
    memset(&c, 0xA5, sizeof c);
    lego_model_config_init(&c);
    ck_assert(c.size == sizeof c);
    ck_assert_int_eq(c.img_channels, 3);
    ck_assert_int_eq(c.img_resolution, 32);
    ck_assert_int_eq(c.label_dim, 0);
    ck_assert_int_eq(c.hidden_size, 384);
    ck_assert_int_eq(c.num_heads, 6);
    ck_assert(c.mlp_ratio == 4.0);
    ck_assert_int_eq(c.frequency_embedding_size, 256);
    ck_assert(c.sigma_data == 0.5);
    ck_assert_int_eq(c.num_threads, 0);
    ck_assert_int_eq(c.backend, LEGO_BACKEND_CPU);
    ck_assert_int_eq(c.device, 0);

    lego_brick_config b;
    memset(&b, 0xA5, sizeof b);
    lego_brick_config_init(&b);
    ck_assert(b.size == sizeof b);
    ck_assert_int_eq(b.brick_size, 32);
    ck_assert_int_eq(b.patch_size, 2);
    ck_assert_int_eq(b.depth, 1);

    lego_load_options o;
    memset(&o, 0xA5, sizeof o);
    lego_load_options_init(&o);
    ck_assert(o.size == sizeof o);
    ck_assert(o.config_json == NULL);
    ck_assert_int_eq(o.num_threads, 0);
    ck_assert_int_eq(o.backend, LEGO_BACKEND_CPU);
    ck_assert_int_eq(o.device, 0);

    lego_denoise_request r;
    memset(&r, 0xA5, sizeof r);
    lego_denoise_request_init(&r);
    ck_assert(r.size == sizeof r);
    ck_assert(r.n == 0 && r.height == 0 && r.width == 0);
    ck_assert(!r.x && !r.sigma && !r.labels && !r.label_vectors && !r.out && !r.brick_outputs &&
              !r.cond);
    ck_assert(r.guidance == 1.0f);
    ck_assert(r.num_bricks == 0 && r.skip_mask == 0);

    /* NULL is ignored. */
    lego_model_config_init(NULL);
    lego_brick_config_init(NULL);
    lego_load_options_init(NULL);
    lego_denoise_request_init(NULL);
    lego_model_free(NULL);
}
END_TEST

/* Older callers (a smaller `size`) are read only up to their size; newer
 * callers (a larger one) work too. */
START_TEST(test_size_contract) {
    /* A config from before num_threads/backend/device: garbage there is
     * never read. */
    lego_model_config c = small_config();
    c.size = offsetof(lego_model_config, num_threads);
    c.num_threads = -7;
    c.backend = (lego_backend)99;
    c.device = -3;
    lego_model *m = NULL;
    ck_assert_msg(lego_model_create(&c, &m) == LEGO_OK, "%s", lego_model_error(m));

    /* A brick config from before `depth`: default depth 1. */
    lego_brick_config b;
    lego_brick_config_init(&b);
    b.brick_size = 4;
    b.patch_size = 2;
    b.depth = 0;
    b.size = offsetof(lego_brick_config, depth);
    ck_assert_msg(lego_brick_add(m, &b) == LEGO_OK, "%s", lego_model_error(m));
    lego_brick_config got;
    lego_brick_config_init(&got);
    ck_assert(lego_model_get_brick(m, 0, &got) == LEGO_OK);
    ck_assert_int_eq(got.brick_size, 4);
    ck_assert_int_eq(got.patch_size, 2);
    ck_assert_int_eq(got.depth, 1);

    /* Introspection writes only what an older struct has. */
    lego_brick_config old_b;
    lego_brick_config_init(&old_b);
    old_b.size = offsetof(lego_brick_config, depth);
    old_b.depth = -99;
    ck_assert(lego_model_get_brick(m, 0, &old_b) == LEGO_OK);
    ck_assert_int_eq(old_b.brick_size, 4);
    ck_assert_int_eq(old_b.depth, -99);
    ck_assert(old_b.size == offsetof(lego_brick_config, depth));

    lego_model_config old_c;
    memset(&old_c, 0, sizeof old_c);
    old_c.size = offsetof(lego_model_config, num_threads);
    old_c.num_threads = -99;
    old_c.backend = (lego_backend)-99;
    ck_assert(lego_model_get_config(m, &old_c) == LEGO_OK);
    ck_assert_int_eq(old_c.hidden_size, 16);
    ck_assert_int_eq(old_c.label_dim, 10);
    ck_assert(old_c.sigma_data == 0.5);
    ck_assert_int_eq(old_c.num_threads, -99);
    ck_assert_int_eq((int)old_c.backend, -99);
    lego_model_config full;
    lego_model_config_init(&full);
    ck_assert(lego_model_get_config(m, &full) == LEGO_OK);
    ck_assert_int_eq(full.num_threads, 0);
    ck_assert_int_eq(full.backend, LEGO_BACKEND_CPU);
    ck_assert(full.size == sizeof full);

    /* A newer caller's config, with fields this library does not know. */
    struct {
        lego_model_config c;
        char future[64];
    } newer;
    memset(&newer, 0x7F, sizeof newer);
    newer.c = small_config();
    newer.c.size = sizeof newer;
    lego_model *m2 = NULL;
    ck_assert_msg(lego_model_create(&newer.c, &m2) == LEGO_OK, "%s", lego_model_error(m2));
    lego_model_free(m2);

    /* Requests: one from before brick_outputs/cond must not have them
     * written. */
    lego_model_init_weights(m, 3);
    randomize(m, 3);
    inputs in = make_inputs(2, 2, 4, 4, 1);
    float *want = alloc_out(in.img), *out = alloc_out(in.img), *spy = alloc_out(2 * in.img);
    lego_denoise_request r;
    request(&r, &in, want);
    denoise_ok(m, &r);

    request(&r, &in, out);
    r.size = offsetof(lego_denoise_request, brick_outputs);
    r.brick_outputs = spy;
    r.cond = spy + in.img;
    denoise_ok(m, &r);
    ck_assert(memcmp(out, want, in.img * sizeof *out) == 0);
    for (size_t i = 0; i < 2 * in.img; i++) ck_assert(spy[i] == 12345.0f);

    /* One from before `cond` gets brick outputs but no conditioning. */
    request(&r, &in, out);
    r.size = offsetof(lego_denoise_request, cond);
    r.brick_outputs = spy;
    r.cond = spy + in.img; /* would be overwritten (n x D < C x H x W) if read */
    for (size_t i = 0; i < 2 * in.img; i++) spy[i] = 12345.0f;
    denoise_ok(m, &r);
    ck_assert(memcmp(out, want, in.img * sizeof *out) == 0);
    ck_assert(spy[0] != 12345.0f); /* brick 0's output written */
    for (size_t i = in.img; i < 2 * in.img; i++) ck_assert(spy[i] == 12345.0f);

    struct {
        lego_denoise_request r;
        char future[64];
    } newer_r;
    memset(&newer_r, 0x7F, sizeof newer_r);
    request(&newer_r.r, &in, out);
    newer_r.r.size = sizeof newer_r;
    denoise_ok(m, &newer_r.r);
    ck_assert(memcmp(out, want, in.img * sizeof *out) == 0);

    /* Load options from before num_threads/backend/device. */
    make_tmpdir();
    const char *path = tmppath("m.safetensors");
    ck_assert(lego_model_save(m, path) == LEGO_OK);
    lego_load_options o;
    lego_load_options_init(&o);
    o.size = offsetof(lego_load_options, num_threads);
    o.num_threads = -1;
    o.backend = (lego_backend)99;
    lego_model *loaded = NULL;
    ck_assert_msg(lego_model_load(path, &o, &loaded) == LEGO_OK, "%s", lego_model_error(loaded));
    lego_model_free(loaded);
    remove_tmpdir();

    free(want), free(out), free(spy);
    free_inputs(&in);
    lego_model_free(m);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* creation                                                                 */
/* ------------------------------------------------------------------------ */

typedef struct bad_config {
    const char *what, *needle;
    lego_status want;
    void (*mutate)(lego_model_config *);
} bad_config;

static void heads_not_dividing(lego_model_config *c) { c->num_heads = 3; }
static void heads_zero(lego_model_config *c) { c->num_heads = 0; }
static void heads_negative(lego_model_config *c) { c->num_heads = -2; }
static void channels_zero(lego_model_config *c) { c->img_channels = 0; }
static void channels_negative(lego_model_config *c) { c->img_channels = -1; }
static void hidden_zero(lego_model_config *c) { c->hidden_size = 0; }
static void hidden_huge(lego_model_config *c) { c->hidden_size = 1 << 30; c->num_heads = 1; }
static void sigma_nan(lego_model_config *c) { c->sigma_data = NAN; }
static void sigma_zero(lego_model_config *c) { c->sigma_data = 0; }
static void sigma_negative(lego_model_config *c) { c->sigma_data = -0.5; }
static void sigma_inf(lego_model_config *c) { c->sigma_data = INFINITY; }
static void mlp_zero(lego_model_config *c) { c->mlp_ratio = 0; }
static void mlp_nan(lego_model_config *c) { c->mlp_ratio = NAN; }
static void mlp_inf(lego_model_config *c) { c->mlp_ratio = INFINITY; }
static void mlp_tiny(lego_model_config *c) { c->mlp_ratio = 0.01; }
static void freq_zero(lego_model_config *c) { c->frequency_embedding_size = 0; }
static void freq_odd(lego_model_config *c) { c->frequency_embedding_size = 31; }
static void labels_negative(lego_model_config *c) { c->label_dim = -1; }
static void threads_negative(lego_model_config *c) { c->num_threads = -1; }
static void resolution_negative(lego_model_config *c) { c->img_resolution = -32; }
static void backend_cuda(lego_model_config *c) { c->backend = LEGO_BACKEND_CUDA; }
static void backend_bogus(lego_model_config *c) { c->backend = (lego_backend)42; }
/* The reference's 2-D sin-cos position embedding splits D in four (MAE
 * asserts embed_dim % 2 == 0 on both halves): no reference model has
 * hidden_size 18. */
static void hidden_not_mult4(lego_model_config *c) { c->hidden_size = 18; c->num_heads = 2; }

static const bad_config bad_configs[] = {
    {"heads not dividing hidden", "num_heads", LEGO_ERR_INVALID_ARGUMENT, heads_not_dividing},
    {"zero heads", "num_heads", LEGO_ERR_INVALID_ARGUMENT, heads_zero},
    {"negative heads", "num_heads", LEGO_ERR_INVALID_ARGUMENT, heads_negative},
    {"zero channels", "img_channels", LEGO_ERR_INVALID_ARGUMENT, channels_zero},
    {"negative channels", "img_channels", LEGO_ERR_INVALID_ARGUMENT, channels_negative},
    {"zero hidden", "hidden_size", LEGO_ERR_INVALID_ARGUMENT, hidden_zero},
    {"huge hidden", "hidden_size", LEGO_ERR_INVALID_ARGUMENT, hidden_huge},
    {"NaN sigma_data", "sigma_data", LEGO_ERR_INVALID_ARGUMENT, sigma_nan},
    {"zero sigma_data", "sigma_data", LEGO_ERR_INVALID_ARGUMENT, sigma_zero},
    {"negative sigma_data", "sigma_data", LEGO_ERR_INVALID_ARGUMENT, sigma_negative},
    {"infinite sigma_data", "sigma_data", LEGO_ERR_INVALID_ARGUMENT, sigma_inf},
    {"zero mlp_ratio", "mlp_ratio", LEGO_ERR_INVALID_ARGUMENT, mlp_zero},
    {"NaN mlp_ratio", "mlp_ratio", LEGO_ERR_INVALID_ARGUMENT, mlp_nan},
    {"infinite mlp_ratio", "mlp_ratio", LEGO_ERR_INVALID_ARGUMENT, mlp_inf},
    {"empty MLP", "mlp_ratio", LEGO_ERR_INVALID_ARGUMENT, mlp_tiny},
    {"zero frequency size", "frequency_embedding_size", LEGO_ERR_INVALID_ARGUMENT, freq_zero},
    {"odd frequency size", "frequency_embedding_size", LEGO_ERR_INVALID_ARGUMENT, freq_odd},
    {"negative label_dim", "label_dim", LEGO_ERR_INVALID_ARGUMENT, labels_negative},
    {"negative threads", "num_threads", LEGO_ERR_INVALID_ARGUMENT, threads_negative},
    {"negative resolution", "img_resolution", LEGO_ERR_INVALID_ARGUMENT, resolution_negative},
    {"CUDA backend without CUDA or a device", "backend", LEGO_ERR_UNSUPPORTED, backend_cuda},
    {"unknown backend", "backend", LEGO_ERR_UNSUPPORTED, backend_bogus},
    {"hidden_size not a multiple of 4", "hidden_size", LEGO_ERR_INVALID_ARGUMENT,
     hidden_not_mult4},
};

START_TEST(test_create_bad_config) {
    const bad_config *bc = &bad_configs[_i];
    if (bc->mutate == backend_cuda && lego_backend_available(LEGO_BACKEND_CUDA)) {
        printf("test_api: a CUDA device is present; '%s' does not apply\n", bc->what);
        return;
    }
    lego_model_config c = small_config();
    bc->mutate(&c);
    lego_model *m = NULL;
    lego_status s = lego_model_create(&c, &m);
    ck_assert_msg(s == bc->want, "%s: status %d (%s), want %d; message '%s'", bc->what, s,
                  lego_status_string(s), bc->want, lego_model_error(m));
    ck_assert_msg(m != NULL, "%s: no handle", bc->what);
    expect_failed_handle(m, bc->needle);
    lego_model_free(m);
}
END_TEST

START_TEST(test_create_null) {
    lego_model *m = NULL;
    ck_assert_int_eq(lego_model_create(NULL, &m), LEGO_ERR_INVALID_ARGUMENT);
    expect_failed_handle(m, "config");
    lego_model_free(m);
    lego_model_config c = small_config();
    ck_assert_int_eq(lego_model_create(&c, NULL), LEGO_ERR_INVALID_ARGUMENT);
}
END_TEST

START_TEST(test_brick_add_bad) {
    lego_model_config c = small_config();
    lego_model *m = model_with_bricks(&c, std_bricks, 1);
    int64_t params = lego_model_num_params(m);
    static const struct {
        int brick, patch, depth;
        const char *needle;
    } bad[] = {
        {4, 3, 1, "patch_size"}, {6, 4, 1, "patch_size"}, {4, 0, 1, "patch_size"},
        {4, -2, 1, "patch_size"}, {4, 2, 0, "depth"},     {4, 2, -1, "depth"},
        {4, 2, 65, "depth"},     {0, 1, 1, "brick_size"}, {-4, 2, 1, "brick_size"},
        {1 << 20, 2, 1, "brick_size"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        lego_brick_config b;
        lego_brick_config_init(&b);
        b.brick_size = bad[i].brick;
        b.patch_size = bad[i].patch;
        b.depth = bad[i].depth;
        ck_assert_int_eq(lego_brick_add(m, &b), LEGO_ERR_INVALID_ARGUMENT);
        ck_assert_msg(strstr(lego_model_error(m), bad[i].needle), "brick %d/%d/%d: '%s'",
                      bad[i].brick, bad[i].patch, bad[i].depth, lego_model_error(m));
        /* Nothing half-added; the model stays usable. */
        ck_assert_int_eq(lego_model_num_bricks(m), 1);
        ck_assert(lego_model_num_params(m) == params);
    }
    ck_assert_int_eq(lego_brick_add(m, NULL), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert(lego_model_error(m)[0]);
    ck_assert_int_eq(lego_brick_add(NULL, NULL), LEGO_ERR_INVALID_ARGUMENT);
    /* A good brick after the failures. */
    lego_brick_config b;
    lego_brick_config_init(&b);
    b.brick_size = 8;
    b.patch_size = 4;
    ck_assert(lego_brick_add(m, &b) == LEGO_OK);
    ck_assert_str_eq(lego_model_error(m), "");
    ck_assert_int_eq(lego_model_num_bricks(m), 2);
    lego_model_free(m);
}
END_TEST

START_TEST(test_too_many_bricks) {
    lego_model_config c = small_config();
    c.label_dim = 0;
    c.hidden_size = 8;
    c.num_heads = 1;
    c.mlp_ratio = 1.0;
    lego_model *m = model_with_bricks(&c, NULL, 0);
    lego_brick_config b;
    lego_brick_config_init(&b);
    b.brick_size = 2;
    b.patch_size = 2;
    for (int k = 0; k < LEGO_MAX_BRICKS; k++)
        ck_assert_msg(lego_brick_add(m, &b) == LEGO_OK, "brick %d: %s", k, lego_model_error(m));
    int64_t params = lego_model_num_params(m);
    ck_assert_int_eq(lego_brick_add(m, &b), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_msg(strstr(lego_model_error(m), "32"), "%s", lego_model_error(m));
    ck_assert_int_eq(lego_model_num_bricks(m), LEGO_MAX_BRICKS);
    ck_assert(lego_model_num_params(m) == params);
    /* A 32-brick model still denoises; skipping brick 31 is allowed. */
    lego_model_init_weights(m, 5);
    inputs in = make_inputs(1, 2, 2, 2, 2);
    float *out = alloc_out(in.img);
    lego_denoise_request r;
    request(&r, &in, out);
    r.skip_mask = 1u << 31;
    denoise_ok(m, &r);
    r.num_bricks = 32;
    denoise_ok(m, &r);
    free(out);
    free_inputs(&in);
    lego_model_free(m);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* introspection                                                            */
/* ------------------------------------------------------------------------ */

START_TEST(test_num_params) {
    lego_model_config c = small_config();
    const int bricks[][3] = {{4, 2, 1}, {8, 4, 2}, {6, 3, 1}, {4, 1, 1}};
    lego_model *m = model_with_bricks(&c, NULL, 0);
    ck_assert(lego_model_num_params(m) == expected_params(&c, bricks, 0));
    for (int k = 0; k < 4; k++) {
        lego_brick_config b;
        lego_brick_config_init(&b);
        b.brick_size = bricks[k][0];
        b.patch_size = bricks[k][1];
        b.depth = bricks[k][2];
        ck_assert(lego_brick_add(m, &b) == LEGO_OK);
        int64_t want = expected_params(&c, bricks, k + 1);
        ck_assert_msg(lego_model_num_params(m) == want, "%d bricks: %lld params, want %lld",
                      k + 1, (long long)lego_model_num_params(m), (long long)want);
    }
    /* Spelled out for the first brick alone: D=16, F=32, L=10, C=2, H=32,
     * 4x4 bricks of 2x2 patches (4 tokens), depth 1. */
    ck_assert(expected_params(&c, bricks, 1) ==
              (32 * 16 + 16 + 16 * 16 + 16) + (10 * 16 + 16) + 4 * 16 + (16 * 4 * 4 + 16) +
                  (16 * 48 + 48 + 16 * 16 + 16 + 16 * 32 + 32 + 32 * 16 + 16 + 16 * 96 + 96) +
                  (16 * 8 + 8) + (16 * 32 + 32));
    lego_model_free(m);

    /* Unconditional, and a fractional mlp_ratio truncated as int(D*r). */
    c.label_dim = 0;
    c.mlp_ratio = 1.3; /* 20.8 -> 20 */
    m = model_with_bricks(&c, bricks, 2);
    ck_assert(lego_model_num_params(m) == expected_params(&c, bricks, 2));
    ck_assert(find_param(m, "model.y_embedder.embedding_table.weight") == NULL);
    const lego_param *fc1 = find_param(m, "model.model.1.blocks.1.mlp.fc1.weight");
    ck_assert(fc1 && fc1->shape[0] == 20 && fc1->shape[1] == 16);
    lego_model_free(m);
}
END_TEST

START_TEST(test_introspection) {
    lego_model_config c = small_config();
    const int bricks[][3] = {{4, 2, 1}, {6, 3, 2}};
    lego_model *m = model_with_bricks(&c, NULL, 0);
    ck_assert_int_eq(lego_model_num_bricks(m), 0);
    ck_assert_int_eq(lego_model_resolution_multiple(m), 0);
    ck_assert_int_eq(lego_model_check_resolution(m, 8, 8), LEGO_ERR_STATE);
    ck_assert(lego_model_error(m)[0]);
    lego_model_free(m);

    m = model_with_bricks(&c, bricks, 2);
    ck_assert_int_eq(lego_model_num_bricks(m), 2);
    lego_brick_config b;
    lego_brick_config_init(&b);
    ck_assert(lego_model_get_brick(m, 1, &b) == LEGO_OK);
    ck_assert(b.brick_size == 6 && b.patch_size == 3 && b.depth == 2 && b.size == sizeof b);
    ck_assert_int_eq(lego_model_get_brick(m, 2, &b), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_model_get_brick(m, -1, &b), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_model_get_brick(m, 0, NULL), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_model_get_brick(NULL, 0, &b), LEGO_ERR_INVALID_ARGUMENT);
    lego_model_config got;
    lego_model_config_init(&got);
    ck_assert(lego_model_get_config(m, &got) == LEGO_OK);
    ck_assert(got.img_channels == 2 && got.img_resolution == 8 && got.label_dim == 10 &&
              got.hidden_size == 16 && got.num_heads == 2 && got.mlp_ratio == 2.0 &&
              got.frequency_embedding_size == 32 && got.sigma_data == 0.5 &&
              got.num_threads == 2);
    ck_assert_int_eq(lego_model_get_config(m, NULL), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_model_get_config(NULL, &got), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_model_num_bricks(NULL), 0);
    ck_assert(lego_model_num_params(NULL) == 0);
    ck_assert_int_eq(lego_model_resolution_multiple(NULL), 0);

    /* LCM(4, 6) = 12. */
    ck_assert_int_eq(lego_model_resolution_multiple(m), 12);
    ck_assert(lego_model_check_resolution(m, 12, 36) == LEGO_OK);
    ck_assert_int_eq(lego_model_check_resolution(m, 12, 18), LEGO_ERR_SHAPE);
    ck_assert_msg(strstr(lego_model_error(m), "12"), "%s", lego_model_error(m));
    ck_assert_int_eq(lego_model_check_resolution(m, 8, 12), LEGO_ERR_SHAPE);
    ck_assert_int_eq(lego_model_check_resolution(m, 0, 12), LEGO_ERR_SHAPE);
    ck_assert_int_eq(lego_model_check_resolution(m, -12, 12), LEGO_ERR_SHAPE);
    ck_assert_int_eq(lego_model_check_resolution(m, 12, 1 << 30), LEGO_ERR_SHAPE);
    ck_assert(lego_model_error(m)[0]);
    ck_assert(lego_model_check_resolution(m, 24, 12) == LEGO_OK);
    ck_assert_str_eq(lego_model_error(m), ""); /* a success clears the message */
    ck_assert_int_eq(lego_model_check_resolution(NULL, 12, 12), LEGO_ERR_INVALID_ARGUMENT);

    /* Thread count. */
    ck_assert(lego_model_set_threads(m, 1) == LEGO_OK);
    ck_assert(lego_model_get_config(m, &got) == LEGO_OK && got.num_threads == 1);
    ck_assert_int_eq(lego_model_set_threads(m, -1), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert(lego_model_error(m)[0]);
    ck_assert(lego_model_set_threads(m, 0) == LEGO_OK);
    lego_model_free(m);

    /* LCM(4, 8, 2) = 8; LCM(3, 4, 5) = 60. */
    const int b2[][3] = {{4, 2, 1}, {8, 2, 1}, {2, 1, 1}};
    m = model_with_bricks(&c, b2, 3);
    ck_assert_int_eq(lego_model_resolution_multiple(m), 8);
    lego_model_free(m);
    const int b3[][3] = {{3, 1, 1}, {4, 2, 1}, {5, 5, 1}};
    m = model_with_bricks(&c, b3, 3);
    ck_assert_int_eq(lego_model_resolution_multiple(m), 60);
    ck_assert(lego_model_check_resolution(m, 60, 120) == LEGO_OK);
    lego_model_free(m);

    /* Coordinates divide by H-1: 1x1 images are refused even for 1x1
     * bricks. */
    const int b4[][3] = {{1, 1, 1}};
    m = model_with_bricks(&c, b4, 1);
    ck_assert_int_eq(lego_model_check_resolution(m, 1, 4), LEGO_ERR_SHAPE);
    ck_assert_int_eq(lego_model_check_resolution(m, 4, 1), LEGO_ERR_SHAPE);
    ck_assert(lego_model_check_resolution(m, 2, 3) == LEGO_OK);
    lego_model_free(m);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* weights                                                                  */
/* ------------------------------------------------------------------------ */

START_TEST(test_init_weights) {
    lego_model_config c = small_config();
    lego_model *a = model_with_bricks(&c, std_bricks, 3), *b = model_with_bricks(&c, std_bricks, 3);
    ck_assert(lego_model_init_weights(a, 42) == LEGO_OK);
    ck_assert(lego_model_init_weights(b, 42) == LEGO_OK);
    ck_assert(a->params_size == b->params_size);
    ck_assert(memcmp(a->params, b->params, a->params_size * sizeof(float)) == 0);
    /* Re-initialising overwrites everything, including earlier changes. */
    randomize(b, 9);
    ck_assert(lego_model_init_weights(b, 42) == LEGO_OK);
    ck_assert(memcmp(a->params, b->params, a->params_size * sizeof(float)) == 0);
    ck_assert(lego_model_init_weights(b, 43) == LEGO_OK);
    ck_assert(lego_model_init_weights(NULL, 1) == LEGO_ERR_INVALID_ARGUMENT);

    float *pe = malloc(64 * 16 * sizeof *pe);
    for (int i = 0; i < a->num_params; i++) {
        const lego_param *p = &a->table[i];
        const float *v = a->params + p->offset, *w = b->params + p->offset;
        const char *n = p->name;
        size_t len = strlen(n);
        int is_bias = len > 5 && strcmp(n + len - 5, ".bias") == 0;
        int zero = is_bias || strstr(n, "adaLN_modulation") || strstr(n, "final_layer.linear");
        if (zero) {
            for (size_t j = 0; j < p->numel; j++)
                ck_assert_msg(v[j] == 0.0f, "%s[%zu] = %g, want 0", n, j, (double)v[j]);
            continue;
        }
        if (strstr(n, "pos_embed")) {
            int grid = (int)sqrt((double)p->shape[1]);
            ck_assert(grid * grid == p->shape[1]);
            sincos_pos_embed(pe, grid, 16);
            ck_assert_msg(memcmp(pe, v, p->numel * sizeof *v) == 0, "%s", n);
            ck_assert(memcmp(v, w, p->numel * sizeof *v) == 0); /* seed-independent */
            continue;
        }
        /* Random: differs across seeds, within its distribution's range. */
        ck_assert_msg(memcmp(v, w, p->numel * sizeof *v) != 0, "%s same for seeds 42, 43", n);
        double bound, sum2 = 0;
        int normal = strstr(n, "t_embedder") || strstr(n, "y_embedder");
        if (normal) bound = 0.02 * 6; /* N(0, 0.02): 6 sigma */
        else bound = sqrt(6.0 / ((double)(p->numel / (size_t)p->shape[0]) + (double)p->shape[0]));
        int nonzero = 0;
        for (size_t j = 0; j < p->numel; j++) {
            ck_assert_msg(fabs(v[j]) <= bound + 1e-7, "%s[%zu] = %g outside %g", n, j,
                          (double)v[j], bound);
            sum2 += (double)v[j] * v[j];
            nonzero += v[j] != 0;
        }
        ck_assert_msg(nonzero > (int)p->numel * 9 / 10, "%s mostly zero", n);
        if (p->numel >= 500) {
            /* Xavier-uniform has std bound/sqrt(3); normal std 0.02. */
            double sd = sqrt(sum2 / (double)p->numel);
            double want = normal ? 0.02 : bound / sqrt(3.0);
            ck_assert_msg(fabs(sd - want) < 0.15 * want, "%s: std %g, want %g", n, sd, want);
        }
    }
    free(pe);

    /* A fresh model's bricks all output exactly 0, so D(x) = c_skip x. */
    inputs in = make_inputs(3, 2, 8, 8, 3);
    float *out = alloc_out(in.img), *bo = alloc_out(3 * in.img);
    int32_t labels[3] = {4, -1, 9};
    lego_denoise_request r;
    request(&r, &in, out);
    r.brick_outputs = bo;
    r.labels = labels;
    r.guidance = 2.5f;
    denoise_ok(a, &r);
    for (size_t i = 0; i < 3 * in.img; i++) ck_assert_msg(bo[i] == 0.0f, "F[%zu] = %g", i, (double)bo[i]);
    size_t chw = in.img / 3;
    for (int i = 0; i < 3; i++) {
        double s = in.sigma[i], c_skip = 0.25 / (s * s + 0.25);
        for (size_t j = 0; j < chw; j++) {
            double want = c_skip * in.x[i * chw + j];
            ck_assert_msg(fabs(out[i * chw + j] - want) <= 1e-6 * fabs(want) + 1e-30,
                          "D(x)[%d][%zu] = %.9g, want c_skip*x = %.9g", i, j,
                          (double)out[i * chw + j], want);
        }
    }
    free(out), free(bo);
    free_inputs(&in);
    lego_model_free(a);
    lego_model_free(b);
}
END_TEST

START_TEST(test_save_load_round_trip) {
    make_tmpdir();
    lego_model *m = std_model(11);
    const char *path = tmppath("m.safetensors");
    ck_assert_msg(lego_model_save(m, path) == LEGO_OK, "%s", lego_model_error(m));
    lego_model *l = NULL;
    ck_assert_msg(lego_model_load(path, NULL, &l) == LEGO_OK, "%s", lego_model_error(l));
    ck_assert_int_eq(lego_model_num_bricks(l), 3);
    ck_assert(lego_model_num_params(l) == lego_model_num_params(m));
    ck_assert(memcmp(l->params, m->params, m->params_size * sizeof(float)) == 0);
    lego_model_config a, b;
    lego_model_config_init(&a);
    lego_model_config_init(&b);
    lego_model_get_config(m, &a);
    lego_model_get_config(l, &b);
    ck_assert(a.img_channels == b.img_channels && a.img_resolution == b.img_resolution &&
              a.label_dim == b.label_dim && a.hidden_size == b.hidden_size &&
              a.num_heads == b.num_heads && a.mlp_ratio == b.mlp_ratio &&
              a.frequency_embedding_size == b.frequency_embedding_size &&
              a.sigma_data == b.sigma_data);
    for (int k = 0; k < 3; k++) {
        lego_brick_config x, y;
        lego_brick_config_init(&x);
        lego_brick_config_init(&y);
        lego_model_get_brick(m, k, &x);
        lego_model_get_brick(l, k, &y);
        ck_assert(x.brick_size == y.brick_size && x.patch_size == y.patch_size && x.depth == y.depth);
    }
    /* Same thread count on both sides, so the same GEMM paths. */
    lego_model_set_threads(l, 2);
    inputs in = make_inputs(2, 2, 8, 16, 4);
    int32_t labels[2] = {1, 7};
    float *o1 = alloc_out(in.img), *o2 = alloc_out(in.img);
    lego_denoise_request r;
    request(&r, &in, o1);
    r.labels = labels;
    r.guidance = 1.5f;
    denoise_ok(m, &r);
    r.out = o2;
    denoise_ok(l, &r);
    ck_assert_msg(memcmp(o1, o2, in.img * sizeof *o1) == 0, "outputs differ by %g",
                  max_abs_diff(o1, o2, in.img));
    /* Saving again over the same path works; so does a sigma_data other
     * than 0.5 surviving the trip. */
    ck_assert(lego_model_save(m, path) == LEGO_OK);
    lego_model_free(l);

    lego_model_config c = small_config();
    c.sigma_data = 0.25;
    c.label_dim = 0;
    lego_model *m2 = model_with_bricks(&c, std_bricks, 1);
    ck_assert(lego_model_save(m2, path) == LEGO_OK);
    ck_assert(lego_model_load(path, NULL, &l) == LEGO_OK);
    lego_model_get_config(l, &b);
    ck_assert(b.sigma_data == 0.25 && b.label_dim == 0);
    lego_model_free(l);
    lego_model_free(m2);

    /* Save failures. */
    ck_assert_int_eq(lego_model_save(m, NULL), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_model_save(NULL, path), LEGO_ERR_INVALID_ARGUMENT);
    char bad[200];
    snprintf(bad, sizeof bad, "%s/no/such/dir/m.safetensors", tmpdir);
    ck_assert_int_eq(lego_model_save(m, bad), LEGO_ERR_IO);
    ck_assert(lego_model_error(m)[0]);
    lego_model *empty = model_with_bricks(&c, NULL, 0);
    ck_assert_int_eq(lego_model_save(empty, tmppath("e.safetensors")), LEGO_ERR_STATE);
    ck_assert(!path_exists(tmppath("e.safetensors")));
    lego_model_free(empty);

    free(o1), free(o2);
    free_inputs(&in);
    lego_model_free(m);
    remove_tmpdir();
}
END_TEST

/* lego_model_load fails with `want`, the message naming `needle`, and a
 * failed handle. */
static void expect_load_fails(const char *path, const lego_load_options *o, lego_status want,
                              const char *needle, const char *needle2) {
    lego_model *m = NULL;
    lego_status s = lego_model_load(path, o, &m);
    ck_assert_msg(s == want, "load %s: status %d (%s), want %d; '%s'", path, s,
                  lego_status_string(s), want, lego_model_error(m));
    ck_assert(m != NULL);
    if (needle2)
        ck_assert_msg(strstr(lego_model_error(m), needle2), "'%s' lacks '%s'",
                      lego_model_error(m), needle2);
    expect_failed_handle(m, needle);
    lego_model_free(m);
}

START_TEST(test_load_errors) {
    make_tmpdir();
    lego_model *m = std_model(12);
    const char *good = tmppath("good.safetensors");
    ck_assert(lego_model_save(m, good) == LEGO_OK);

    /* Missing file; NULL arguments. */
    expect_load_fails(tmppath("missing.safetensors"), NULL, LEGO_ERR_IO, "missing.safetensors",
                      NULL);
    expect_load_fails(NULL, NULL, LEGO_ERR_INVALID_ARGUMENT, "path", NULL);
    ck_assert_int_eq(lego_model_load(good, NULL, NULL), LEGO_ERR_INVALID_ARGUMENT);
    expect_load_fails(tmpdir, NULL, LEGO_ERR_IO, NULL, NULL); /* a directory */

    /* Truncations: inside the tensors, right after the header, inside the
     * header, inside the length. */
    size_t n;
    unsigned char *bytes = read_all(good, &n);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = hl << 8 | bytes[i];
    const char *cut = tmppath("cut.safetensors");
    const size_t cuts[] = {n - 1, n / 2, 8 + (size_t)hl, 8 + (size_t)hl / 2, 5, 0};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        write_file(cut, bytes, cuts[i]);
        expect_load_fails(cut, NULL, LEGO_ERR_FORMAT, "cut.safetensors", NULL);
    }
    free(bytes);

    /* No lego.config: an error naming it, unless the caller supplies it. */
    const char *plain = tmppath("plain.safetensors");
    write_variant(m, plain, 0, NULL, NULL, NULL);
    expect_load_fails(plain, NULL, LEGO_ERR_FORMAT, "lego.config", NULL);
    char *json = config_to_json(m);
    lego_load_options o;
    lego_load_options_init(&o);
    o.config_json = json;
    o.num_threads = 2;
    lego_model *l = NULL;
    ck_assert_msg(lego_model_load(plain, &o, &l) == LEGO_OK, "%s", lego_model_error(l));
    ck_assert(memcmp(l->params, m->params, m->params_size * sizeof(float)) == 0);
    lego_model_free(l);
    /* A bad architecture string. */
    o.config_json = "{not json";
    expect_load_fails(plain, &o, LEGO_ERR_FORMAT, "lego.config", NULL);
    o.config_json = "{\"img_channels\": 2, \"hidden_size\": 16, \"num_heads\": 3, "
                    "\"bricks\": [{\"brick_size\": 4, \"patch_size\": 2, \"depth\": 1}]}";
    expect_load_fails(plain, &o, LEGO_ERR_INVALID_ARGUMENT, "num_heads", NULL);
    o.config_json = "{\"img_channels\": 2, \"hidden_size\": 16, \"num_heads\": 2}";
    expect_load_fails(plain, &o, LEGO_ERR_FORMAT, "bricks", NULL);
    o.config_json = "{\"img_channels\": 2, \"hidden_size\": 16, \"num_heads\": 2, "
                    "\"bricks\": [{\"brick_size\": 4, \"patch_size\": 3, \"depth\": 1}]}";
    expect_load_fails(plain, &o, LEGO_ERR_INVALID_ARGUMENT, "patch_size", NULL);
    /* The file's architecture (16 wide) against the given one's tensors. */
    o.config_json = "{\"format\": \"lego-diffusion\", \"img_channels\": 2, \"label_dim\": 10, "
                    "\"hidden_size\": 32, \"num_heads\": 2, \"mlp_ratio\": 2.0, "
                    "\"frequency_embedding_size\": 32, \"bricks\": [{\"brick_size\": 4, "
                    "\"patch_size\": 2, \"depth\": 1}, {\"brick_size\": 8, \"patch_size\": 4, "
                    "\"depth\": 1}, {\"brick_size\": 8, \"patch_size\": 2, \"depth\": 1}]}";
    expect_load_fails(plain, &o, LEGO_ERR_SHAPE, "shape", "model.t_embedder.mlp.0.weight");
    free(json);

    /* Missing, extra, wrongly shaped tensors are named. */
    const char *var = tmppath("variant.safetensors");
    const char *victim = "model.model.1.blocks.0.attn.qkv.weight";
    write_variant(m, var, 1, victim, NULL, NULL);
    expect_load_fails(var, NULL, LEGO_ERR_SHAPE, victim, "missing");
    write_variant(m, var, 1, "model.model.2.pos_embed", NULL, NULL);
    expect_load_fails(var, NULL, LEGO_ERR_SHAPE, "model.model.2.pos_embed", "missing");
    write_variant(m, var, 1, NULL, "model.model.3.extra.weight", NULL);
    expect_load_fails(var, NULL, LEGO_ERR_SHAPE, "model.model.3.extra.weight", NULL);
    write_variant(m, var, 1, NULL, NULL, victim);
    expect_load_fails(var, NULL, LEGO_ERR_SHAPE, victim, "shape");
    write_variant(m, var, 1, NULL, NULL, "model.model.0.x_embedder.proj.weight");
    expect_load_fails(var, NULL, LEGO_ERR_SHAPE, "model.model.0.x_embedder.proj.weight", NULL);

    lego_model_free(m);
    remove_tmpdir();
}
END_TEST

/* ---- reduced-precision checkpoints written here ---- */

static uint16_t f32_to_f16(float f) {
    /* Round to nearest even through double arithmetic. */
    double v = fabs((double)f);
    uint16_t sign = signbit(f) ? 0x8000 : 0;
    if (isnan(f)) return sign | 0x7e00;
    if (v >= 65520.0) return sign | 0x7c00;
    if (v < ldexp(1, -14)) { /* subnormal: units of 2^-24 */
        return sign | (uint16_t)nearbyint(v * ldexp(1, 24));
    }
    int e;
    double m = frexp(v, &e); /* v = m 2^e, m in [0.5, 1) */
    double mant = nearbyint((m * 2 - 1) * 1024);
    int ex = e - 1 + 15;
    if (mant >= 1024) {
        mant = 0;
        ex++;
    }
    if (ex >= 31) return sign | 0x7c00;
    return sign | (uint16_t)(ex << 10) | (uint16_t)mant;
}

static uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

static float f16_value(uint16_t h) {
    int sign = h >> 15, e = (h >> 10) & 31, f = h & 1023;
    double v = e == 0 ? ldexp(f, -24) : e == 31 ? (f ? NAN : INFINITY) : ldexp(1024 + f, e - 25);
    return (float)(sign ? -v : v);
}
static float bf16_value(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Write every parameter of m as `dtype` ("F16", "BF16", "F64"), with
 * lego.config; `expect` receives the values a reader must recover. */
static void write_dtype(const lego_model *m, const char *path, const char *dtype, float *expect) {
    size_t es = strcmp(dtype, "F64") == 0 ? 8 : 2;
    cJSON *root = cJSON_CreateObject(), *meta = cJSON_AddObjectToObject(root, "__metadata__");
    char *json = config_to_json(m);
    cJSON_AddStringToObject(meta, "lego.config", json);
    free(json);
    unsigned char *data = malloc(m->params_size * es);
    size_t off = 0;
    for (int i = 0; i < m->num_params; i++) {
        const lego_param *p = &m->table[i];
        cJSON *t = cJSON_AddObjectToObject(root, p->name);
        cJSON_AddStringToObject(t, "dtype", dtype);
        cJSON *shape = cJSON_AddArrayToObject(t, "shape");
        for (int d = 0; d < p->rank; d++)
            cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)p->shape[d]));
        double offs[2] = {(double)off, (double)(off + p->numel * es)};
        cJSON_AddItemToObject(t, "data_offsets", cJSON_CreateDoubleArray(offs, 2));
        for (size_t j = 0; j < p->numel; j++) {
            float v = m->params[p->offset + j];
            unsigned char *at = data + off + j * es;
            if (es == 8) {
                double dv = v;
                memcpy(at, &dv, 8);
                expect[p->offset + j] = v;
            } else {
                uint16_t h = strcmp(dtype, "F16") == 0 ? f32_to_f16(v) : f32_to_bf16(v);
                memcpy(at, &h, 2);
                expect[p->offset + j] = strcmp(dtype, "F16") == 0 ? f16_value(h) : bf16_value(h);
            }
        }
        off += p->numel * es;
    }
    char *header = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    size_t hl = strlen(header);
    unsigned char len[8];
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    FILE *fp = fopen(path, "wb");
    ck_assert(fp);
    ck_assert(fwrite(len, 1, 8, fp) == 8 && fwrite(header, 1, hl, fp) == hl &&
              fwrite(data, 1, off, fp) == off);
    ck_assert(fclose(fp) == 0);
    free(header);
    free(data);
}

START_TEST(test_load_half_precision) {
    make_tmpdir();
    lego_model *m = std_model(13);
    /* Values that exercise the conversions: fp16 subnormals, zero signs,
     * the largest half, values needing rounding. */
    float *bias = m->params + find_param(m, "model.model.0.blocks.0.attn.qkv.bias")->offset;
    const float special[] = {1e-6f, -3e-7f, 0.0f, -0.0f, 65504.0f, -2.0f, 1.0f / 3, 6.1e-5f};
    memcpy(bias, special, sizeof special);
    inputs in = make_inputs(2, 2, 8, 8, 5);
    int32_t labels[2] = {3, 8};
    float *want = alloc_out(in.img), *got = alloc_out(in.img);
    float *expect = malloc(m->params_size * sizeof *expect);
    const char *path = tmppath("h.safetensors");
    static const char *dtypes[] = {"F16", "BF16"};
    for (int t = 0; t < 2; t++) {
        write_dtype(m, path, dtypes[t], expect);
        lego_model *l = NULL;
        ck_assert_msg(lego_model_load(path, NULL, &l) == LEGO_OK, "%s: %s", dtypes[t],
                      lego_model_error(l));
        for (size_t i = 0; i < m->params_size; i++)
            ck_assert_msg(memcmp(&l->params[i], &expect[i], 4) == 0,
                          "%s param %zu: %.9g, want %.9g (from %.9g)", dtypes[t], i,
                          (double)l->params[i], (double)expect[i], (double)m->params[i]);
        /* The conversions really happened (not a copy of the F32 values). */
        ck_assert(memcmp(l->params, m->params, m->params_size * sizeof(float)) != 0);
        if (t == 0) {
            const float *b = l->params + find_param(l, "model.model.0.blocks.0.attn.qkv.bias")->offset;
            ck_assert(b[0] == (float)(17 * ldexp(1, -24))); /* 1e-6 is 16.78 units of 2^-24 */
            ck_assert(b[1] == (float)(-5 * ldexp(1, -24)));
            ck_assert(b[2] == 0.0f && !signbit(b[2]) && b[3] == 0.0f && signbit(b[3]));
            ck_assert(b[4] == 65504.0f && b[5] == -2.0f);
        }
        /* Its output equals the F32 model's holding the same values. */
        lego_model *same = std_model(13);
        memcpy(same->params, expect, m->params_size * sizeof(float));
        lego_model_set_threads(l, 2);
        lego_denoise_request r;
        request(&r, &in, want);
        r.labels = labels;
        denoise_ok(same, &r);
        r.out = got;
        denoise_ok(l, &r);
        ck_assert(memcmp(want, got, in.img * sizeof *got) == 0);
        lego_model_free(same);
        lego_model_free(l);
    }
    /* F64 checkpoints are refused by name. */
    write_dtype(m, path, "F64", expect);
    expect_load_fails(path, NULL, LEGO_ERR_UNSUPPORTED, "F64", "model.t_embedder.mlp.0.weight");
    free(want), free(got), free(expect);
    free_inputs(&in);
    lego_model_free(m);
    remove_tmpdir();
}
END_TEST

START_TEST(test_load_weights) {
    make_tmpdir();
    lego_model *src = std_model(14);
    const char *path = tmppath("src.safetensors");
    ck_assert(lego_model_save(src, path) == LEGO_OK);

    /* Same architecture: the weights are replaced. */
    lego_model *dst = std_model(15);
    ck_assert(memcmp(dst->params, src->params, src->params_size * 4) != 0);
    ck_assert_msg(lego_model_load_weights(dst, path) == LEGO_OK, "%s", lego_model_error(dst));
    ck_assert(memcmp(dst->params, src->params, src->params_size * 4) == 0);

    /* A plain state dict (no lego.config) with the right tensors works. */
    const char *plain = tmppath("plain.safetensors");
    lego_model *other = std_model(16);
    write_variant(other, plain, 0, NULL, NULL, NULL);
    ck_assert_msg(lego_model_load_weights(dst, plain) == LEGO_OK, "%s", lego_model_error(dst));
    ck_assert(memcmp(dst->params, other->params, src->params_size * 4) == 0);
    lego_model_free(other);

    /* Failures leave the weights unchanged and the model usable. */
    float *before = malloc(dst->params_size * 4);
    memcpy(before, dst->params, dst->params_size * 4);
    lego_model_config c = small_config();
    const int diff_bricks[][3] = {{4, 2, 1}, {8, 4, 1}, {8, 2, 2}}; /* last brick deeper */
    lego_model *wrong = model_with_bricks(&c, diff_bricks, 3);
    const char *wpath = tmppath("wrong.safetensors");
    ck_assert(lego_model_save(wrong, wpath) == LEGO_OK);
    ck_assert_int_eq(lego_model_load_weights(dst, wpath), LEGO_ERR_SHAPE);
    ck_assert_msg(strstr(lego_model_error(dst), "architecture"), "%s", lego_model_error(dst));
    ck_assert(memcmp(dst->params, before, dst->params_size * 4) == 0);
    lego_model_free(wrong);

    c.hidden_size = 32; /* same bricks, other width */
    wrong = model_with_bricks(&c, std_bricks, 3);
    ck_assert(lego_model_save(wrong, wpath) == LEGO_OK);
    ck_assert_int_eq(lego_model_load_weights(dst, wpath), LEGO_ERR_SHAPE);
    ck_assert(memcmp(dst->params, before, dst->params_size * 4) == 0);
    /* ...and without its config, a shape error naming a tensor. */
    write_variant(wrong, wpath, 0, NULL, NULL, NULL);
    ck_assert_int_eq(lego_model_load_weights(dst, wpath), LEGO_ERR_SHAPE);
    ck_assert_msg(strstr(lego_model_error(dst), "model.") && strstr(lego_model_error(dst), "shape"),
                  "%s", lego_model_error(dst));
    ck_assert(memcmp(dst->params, before, dst->params_size * 4) == 0);
    lego_model_free(wrong);

    write_variant(src, wpath, 0, "model.model.2.final_layer.linear.bias", NULL, NULL);
    ck_assert_int_eq(lego_model_load_weights(dst, wpath), LEGO_ERR_SHAPE);
    ck_assert_msg(strstr(lego_model_error(dst), "model.model.2.final_layer.linear.bias"), "%s",
                  lego_model_error(dst));
    ck_assert(memcmp(dst->params, before, dst->params_size * 4) == 0);

    ck_assert_int_eq(lego_model_load_weights(dst, tmppath("missing.safetensors")), LEGO_ERR_IO);
    ck_assert(lego_model_error(dst)[0]);
    ck_assert_int_eq(lego_model_load_weights(dst, NULL), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_model_load_weights(NULL, path), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert(memcmp(dst->params, before, dst->params_size * 4) == 0);
    ck_assert_int_eq(lego_model_num_bricks(dst), 3);

    /* Still usable afterwards. */
    ck_assert(lego_model_load_weights(dst, path) == LEGO_OK);
    ck_assert_str_eq(lego_model_error(dst), "");
    inputs in = make_inputs(1, 2, 8, 8, 6);
    float *a = alloc_out(in.img), *b = alloc_out(in.img);
    lego_denoise_request r;
    request(&r, &in, a);
    denoise_ok(src, &r);
    r.out = b;
    denoise_ok(dst, &r);
    ck_assert(memcmp(a, b, in.img * 4) == 0);
    free(a), free(b), free(before);
    free_inputs(&in);
    lego_model_free(src);
    lego_model_free(dst);
    remove_tmpdir();
}
END_TEST

/* ------------------------------------------------------------------------ */
/* denoise: bad requests                                                    */
/* ------------------------------------------------------------------------ */

/* The request fails with `want` and a message containing `needle`; the
 * model then still works. */
static void expect_bad(lego_model *m, const lego_denoise_request *r, lego_status want,
                       const char *needle, const char *what, const lego_denoise_request *good) {
    lego_status s = lego_denoise(m, r);
    ck_assert_msg(s == want, "%s: status %d (%s), want %d; '%s'", what, s, lego_status_string(s),
                  want, lego_model_error(m));
    const char *msg = lego_model_error(m);
    ck_assert_msg(msg[0], "%s: empty message", what);
    if (needle) ck_assert_msg(strstr(msg, needle), "%s: message '%s' lacks '%s'", what, msg, needle);
    denoise_ok(m, good);
}

START_TEST(test_denoise_bad_requests) {
    lego_model *m = std_model(20);
    inputs in = make_inputs(2, 2, 8, 8, 7);
    float *out = alloc_out(in.img);
    lego_denoise_request good, r;
    request(&good, &in, out);
    denoise_ok(m, &good);

    ck_assert_int_eq(lego_denoise(NULL, &good), LEGO_ERR_INVALID_ARGUMENT);
    expect_bad(m, NULL, LEGO_ERR_INVALID_ARGUMENT, "request", "NULL request", &good);

#define BAD(want, needle, what, ...)                                                           \
    do {                                                                                       \
        r = good;                                                                              \
        __VA_ARGS__;                                                                           \
        expect_bad(m, &r, want, needle, what, &good);                                          \
    } while (0)

    BAD(LEGO_ERR_INVALID_ARGUMENT, "NULL", "NULL x", r.x = NULL);
    BAD(LEGO_ERR_INVALID_ARGUMENT, "NULL", "NULL sigma", r.sigma = NULL);
    BAD(LEGO_ERR_INVALID_ARGUMENT, "NULL", "NULL out", r.out = NULL);
    BAD(LEGO_ERR_INVALID_ARGUMENT, "batch", "n = 0", r.n = 0);
    BAD(LEGO_ERR_INVALID_ARGUMENT, "batch", "n = -3", r.n = -3);
    BAD(LEGO_ERR_SHAPE, "8", "H not a multiple of 8", r.height = 12);
    BAD(LEGO_ERR_SHAPE, "8", "W not a multiple of 8", r.width = 4);
    BAD(LEGO_ERR_SHAPE, NULL, "H = 0", r.height = 0);
    BAD(LEGO_ERR_SHAPE, NULL, "W < 0", r.width = -8);

    float sig[2];
    const float bad_sigmas[] = {0.0f, -0.0f, -1.0f, NAN, INFINITY, -INFINITY};
    for (size_t i = 0; i < sizeof bad_sigmas / sizeof bad_sigmas[0]; i++) {
        sig[0] = 1.0f;
        sig[1] = bad_sigmas[i];
        char what[48];
        snprintf(what, sizeof what, "sigma %g", (double)bad_sigmas[i]);
        BAD(LEGO_ERR_INVALID_ARGUMENT, "sigma[1]", what, r.sigma = sig);
    }

    int32_t labels[2] = {0, 10};
    BAD(LEGO_ERR_INVALID_ARGUMENT, "label", "label 10 of 10", r.labels = labels);
    labels[1] = -2;
    BAD(LEGO_ERR_INVALID_ARGUMENT, "label", "label -2", r.labels = labels);
    labels[0] = INT32_MIN;
    labels[1] = 0;
    BAD(LEGO_ERR_INVALID_ARGUMENT, "label", "label INT32_MIN", r.labels = labels);
    labels[0] = 3;
    float vecs[20] = {0};
    BAD(LEGO_ERR_INVALID_ARGUMENT, "label", "labels and label_vectors",
        r.labels = labels; r.label_vectors = vecs);
    vecs[13] = NAN;
    BAD(LEGO_ERR_INVALID_ARGUMENT, "label_vectors", "NaN in label_vectors", r.label_vectors = vecs);
    vecs[13] = INFINITY;
    BAD(LEGO_ERR_INVALID_ARGUMENT, "label_vectors", "inf in label_vectors", r.label_vectors = vecs);

    BAD(LEGO_ERR_INVALID_ARGUMENT, "guidance", "guidance -1", r.guidance = -1.0f);
    BAD(LEGO_ERR_INVALID_ARGUMENT, "guidance", "guidance NaN", r.guidance = NAN);
    BAD(LEGO_ERR_INVALID_ARGUMENT, "guidance", "guidance inf", r.guidance = INFINITY);
    BAD(LEGO_ERR_INVALID_ARGUMENT, "num_bricks", "num_bricks 4 > 3", r.num_bricks = 4);
    BAD(LEGO_ERR_INVALID_ARGUMENT, "num_bricks", "num_bricks -1", r.num_bricks = -1);
    BAD(LEGO_ERR_INVALID_ARGUMENT, "first brick", "skip brick 0", r.skip_mask = 1);
    BAD(LEGO_ERR_INVALID_ARGUMENT, "first brick", "skip bricks 0, 1", r.skip_mask = 3);
    BAD(LEGO_ERR_INVALID_ARGUMENT, "skip_mask", "skip brick 3 of 3", r.skip_mask = 1u << 3);
    BAD(LEGO_ERR_INVALID_ARGUMENT, "skip_mask", "skip brick 31 of 3", r.skip_mask = 1u << 31);
#undef BAD

    /* Labels are ignored by an unconditional model, even out-of-range ones. */
    lego_model_config c = small_config();
    c.label_dim = 0;
    lego_model *u = model_with_bricks(&c, std_bricks, 3);
    randomize(u, 21);
    float *o2 = alloc_out(in.img);
    r = good;
    r.out = o2;
    denoise_ok(u, &r);
    labels[0] = 99;
    labels[1] = -7;
    r.out = out;
    r.labels = labels;
    r.guidance = 3.0f;
    denoise_ok(u, &r);
    ck_assert(memcmp(out, o2, in.img * 4) == 0);
    free(o2);
    lego_model_free(u);

    /* A model without bricks. */
    lego_model *e = model_with_bricks(&c, NULL, 0);
    ck_assert_int_eq(lego_denoise(e, &good), LEGO_ERR_STATE);
    ck_assert(lego_model_error(e)[0]);
    lego_model_free(e);

    free(out);
    free_inputs(&in);
    lego_model_free(m);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* denoise: semantics                                                       */
/* ------------------------------------------------------------------------ */

/* Skipping brick 1 of (0, 1, 2) equals the two-brick model (0, 2) with the
 * same weights; the skipped slot of brick_outputs is left alone. */
START_TEST(test_skip_middle_brick) {
    lego_model *m3 = std_model(30);
    lego_model_config c = small_config();
    const int b2[][3] = {{4, 2, 1}, {8, 2, 1}};
    lego_model *m2 = model_with_bricks(&c, b2, 2);
    for (int i = 0; i < m2->num_params; i++) {
        const lego_param *p = &m2->table[i];
        char name[128];
        snprintf(name, sizeof name, "%s", p->name);
        if (strncmp(name, "model.model.1.", 14) == 0) name[12] = '2';
        const lego_param *q = find_param(m3, name);
        ck_assert_msg(q && q->numel == p->numel, "%s", name);
        memcpy(m2->params + p->offset, m3->params + q->offset, p->numel * 4);
    }
    inputs in = make_inputs(2, 2, 8, 16, 8);
    int32_t labels[2] = {2, -1};
    float *o3 = alloc_out(in.img), *o2 = alloc_out(in.img);
    float *bo3 = alloc_out(3 * in.img), *bo2 = alloc_out(2 * in.img);
    lego_denoise_request r;
    request(&r, &in, o3);
    r.labels = labels;
    r.skip_mask = 1u << 1;
    r.brick_outputs = bo3;
    denoise_ok(m3, &r);
    request(&r, &in, o2);
    r.labels = labels;
    r.brick_outputs = bo2;
    denoise_ok(m2, &r);
    double d = max_abs_diff(o3, o2, in.img);
    printf("skip middle brick vs two-brick model: max diff %.3g\n", d);
    ck_assert_msg(d <= 1e-6, "skip_mask 0b010 differs from the model without brick 1 by %g", d);
    ck_assert(max_abs_diff(bo3, bo2, in.img) <= 1e-6);
    ck_assert(max_abs_diff(bo3 + 2 * in.img, bo2 + in.img, in.img) <= 1e-6);
    for (size_t i = 0; i < in.img; i++) ck_assert(bo3[in.img + i] == 12345.0f);
    free(o3), free(o2), free(bo3), free(bo2);
    free_inputs(&in);
    lego_model_free(m3);
    lego_model_free(m2);
}
END_TEST

/* num_bricks = k returns F_{k-1} in place of F_K: D = c_skip x + c_out F_{k-1}
 * with F the full run's brick outputs (bricks below do not see those above). */
START_TEST(test_num_bricks) {
    lego_model *m = std_model(31);
    inputs in = make_inputs(3, 2, 8, 8, 9);
    int32_t labels[3] = {0, 5, -1};
    float *full = alloc_out(in.img), *bo = alloc_out(3 * in.img), *out = alloc_out(in.img);
    float *bo_part = alloc_out(3 * in.img);
    lego_denoise_request r;
    request(&r, &in, full);
    r.labels = labels;
    r.brick_outputs = bo;
    denoise_ok(m, &r);
    size_t chw = in.img / 3;
    for (int k = 1; k <= 3; k++) {
        request(&r, &in, out);
        r.labels = labels;
        r.num_bricks = k;
        r.brick_outputs = bo_part;
        for (size_t i = 0; i < 3 * in.img; i++) bo_part[i] = 12345.0f;
        denoise_ok(m, &r);
        for (int i = 0; i < 3; i++) {
            double s = in.sigma[i], c_skip = 0.25 / (s * s + 0.25), c_out = s * 0.5 / sqrt(s * s + 0.25);
            for (size_t j = 0; j < chw; j++) {
                double want = c_skip * in.x[i * chw + j] + c_out * bo[(size_t)(k - 1) * in.img + i * chw + j];
                ck_assert_msg(fabs(out[i * chw + j] - want) <= 1e-5 * (1 + fabs(want)),
                              "num_bricks %d image %d: %.7g, want %.7g", k, i,
                              (double)out[i * chw + j], want);
            }
        }
        /* Bricks run: same outputs as the full run; bricks not run: untouched. */
        ck_assert(memcmp(bo_part, bo, (size_t)k * in.img * 4) == 0);
        for (size_t i = (size_t)k * in.img; i < 3 * in.img; i++) ck_assert(bo_part[i] == 12345.0f);
    }
    /* num_bricks = 3 and 0 are the full model. */
    ck_assert(memcmp(out, full, in.img * 4) == 0);
    /* num_bricks = 2 equals skipping brick 2. */
    float *skip = alloc_out(in.img);
    request(&r, &in, out);
    r.labels = labels;
    r.num_bricks = 2;
    denoise_ok(m, &r);
    request(&r, &in, skip);
    r.labels = labels;
    r.skip_mask = 1u << 2;
    denoise_ok(m, &r);
    ck_assert(memcmp(out, skip, in.img * 4) == 0);
    free(full), free(bo), free(out), free(bo_part), free(skip);
    free_inputs(&in);
    lego_model_free(m);
}
END_TEST

/* Guidance: 1 is the plain conditional output, 0 the unconditional one,
 * g mixes F_u + g (F_c - F_u) on every brick output and on D. */
START_TEST(test_guidance) {
    lego_model *m = std_model(32);
    inputs in = make_inputs(2, 2, 8, 8, 10);
    int32_t labels[2] = {6, 1}, null_labels[2] = {-1, -1};
    size_t img = in.img, chw = img / 2;
    float *cond = alloc_out(img), *unc = alloc_out(img), *g1 = alloc_out(img), *g0 = alloc_out(img);
    float *g3 = alloc_out(img), *bc = alloc_out(3 * img), *bu = alloc_out(3 * img), *bg = alloc_out(3 * img);
    lego_denoise_request r;
    request(&r, &in, cond);
    r.labels = labels;
    r.brick_outputs = bc;
    denoise_ok(m, &r);
    request(&r, &in, unc);
    r.labels = null_labels;
    r.brick_outputs = bu;
    denoise_ok(m, &r);
    ck_assert(max_abs_diff(cond, unc, img) > 1e-3); /* labels matter */
    /* No labels at all = null labels. */
    request(&r, &in, g0);
    denoise_ok(m, &r);
    ck_assert(memcmp(g0, unc, img * 4) == 0);

    request(&r, &in, g1);
    r.labels = labels;
    r.guidance = 1.0f;
    denoise_ok(m, &r);
    ck_assert(memcmp(g1, cond, img * 4) == 0);

    request(&r, &in, g0);
    r.labels = labels;
    r.guidance = 0.0f;
    denoise_ok(m, &r);
    ck_assert_msg(max_abs_diff(g0, unc, img) <= 1e-6, "guidance 0 vs unconditional: %g",
                  max_abs_diff(g0, unc, img));

    const float g = 3.0f;
    request(&r, &in, g3);
    r.labels = labels;
    r.guidance = g;
    r.brick_outputs = bg;
    denoise_ok(m, &r);
    for (size_t i = 0; i < 3 * img; i++) {
        double want = bu[i] + g * ((double)bc[i] - bu[i]);
        ck_assert_msg(fabs(bg[i] - want) <= 1e-5 * (1 + fabs(want)), "guided F[%zu] %.7g want %.7g",
                      i, (double)bg[i], want);
    }
    for (int i = 0; i < 2; i++) {
        double s = in.sigma[i], c_skip = 0.25 / (s * s + 0.25), c_out = s * 0.5 / sqrt(s * s + 0.25);
        for (size_t j = 0; j < chw; j++) {
            size_t at = i * chw + j;
            double fc = bc[2 * img + at], fu = bu[2 * img + at];
            double want = c_skip * in.x[at] + c_out * (fu + g * (fc - fu));
            ck_assert_msg(fabs(g3[at] - want) <= 1e-5 * (1 + fabs(want)),
                          "guided D[%zu] %.7g want %.7g", at, (double)g3[at], want);
        }
    }
    /* Guidance composes with skipping: the guided output of bricks 0..1. */
    request(&r, &in, g3);
    r.labels = labels;
    r.guidance = g;
    r.num_bricks = 2;
    denoise_ok(m, &r);
    for (int i = 0; i < 2; i++) {
        double s = in.sigma[i], c_skip = 0.25 / (s * s + 0.25), c_out = s * 0.5 / sqrt(s * s + 0.25);
        for (size_t j = 0; j < chw; j++) {
            size_t at = i * chw + j;
            double fc = bc[img + at], fu = bu[img + at];
            double want = c_skip * in.x[at] + c_out * (fu + g * (fc - fu));
            ck_assert(fabs(g3[at] - want) <= 1e-5 * (1 + fabs(want)));
        }
    }
    free(cond), free(unc), free(g1), free(g0), free(g3), free(bc), free(bu), free(bg);
    free_inputs(&in);
    lego_model_free(m);
}
END_TEST

START_TEST(test_labels_vs_vectors) {
    lego_model *m = std_model(33);
    inputs in = make_inputs(3, 2, 8, 8, 11);
    int32_t labels[3] = {3, -1, 9};
    float vecs[30] = {0};
    vecs[0 * 10 + 3] = 1.0f;
    vecs[2 * 10 + 9] = 1.0f;
    float *a = alloc_out(in.img), *b = alloc_out(in.img);
    for (int guided = 0; guided < 2; guided++) {
        lego_denoise_request r;
        request(&r, &in, a);
        r.labels = labels;
        r.guidance = guided ? 2.0f : 1.0f;
        denoise_ok(m, &r);
        request(&r, &in, b);
        r.label_vectors = vecs;
        r.guidance = guided ? 2.0f : 1.0f;
        denoise_ok(m, &r);
        ck_assert_msg(memcmp(a, b, in.img * 4) == 0, "labels vs one-hot vectors differ by %g",
                      max_abs_diff(a, b, in.img));
    }
    /* A soft label vector is a linear mix of the label embeddings:
     * c(0.5 e3 + 0.5 e9) - bias = average of the two. */
    float soft[10] = {0}, *ca = alloc_out(3 * 16), *cb = alloc_out(16);
    soft[3] = soft[9] = 0.5f;
    inputs one = make_inputs(1, 2, 8, 8, 12);
    lego_denoise_request r;
    request(&r, &in, a);
    r.labels = labels;
    r.cond = ca;
    denoise_ok(m, &r);
    request(&r, &one, b);
    one.sigma[0] = in.sigma[0];
    r.label_vectors = soft;
    r.cond = cb;
    denoise_ok(m, &r);
    for (int d = 0; d < 16; d++) {
        /* ca row 0 is t(sigma_0) + bias + W e3; the soft row shares sigma_0. */
        const float *w = m->params + find_param(m, "model.y_embedder.embedding_table.weight")->offset;
        double t0 = ca[d] - w[d * 10 + 3]; /* t(sigma_0) + bias */
        double want = t0 + 0.5 * w[d * 10 + 3] + 0.5 * w[d * 10 + 9];
        ck_assert_msg(fabs(cb[d] - want) <= 1e-5, "soft label c[%d] %.7g want %.7g", d,
                      (double)cb[d], want);
    }
    free(ca), free(cb);
    free_inputs(&one);
    free(a), free(b);
    free_inputs(&in);
    lego_model_free(m);
}
END_TEST

/* c = t_embedder(ln(sigma)/4) + y_embedder(one-hot), against a double
 * reference built from the parameter tensors. */
START_TEST(test_conditioning) {
    lego_model *m = std_model(34);
    inputs in = make_inputs(3, 2, 8, 8, 13);
    int32_t labels[3] = {-1, 4, 0};
    float *out = alloc_out(in.img), *cond = alloc_out(3 * 16 + 4);
    lego_denoise_request r;
    request(&r, &in, out);
    r.labels = labels;
    r.cond = cond;
    r.guidance = 2.0f; /* the reported c is the conditional one */
    denoise_ok(m, &r);
    for (int i = 3 * 16; i < 3 * 16 + 4; i++) ck_assert(cond[i] == 12345.0f); /* n x D only */
    const int F = 32, D = 16;
    const float *w1 = m->params + find_param(m, "model.t_embedder.mlp.0.weight")->offset;
    const float *b1 = m->params + find_param(m, "model.t_embedder.mlp.0.bias")->offset;
    const float *w2 = m->params + find_param(m, "model.t_embedder.mlp.2.weight")->offset;
    const float *b2 = m->params + find_param(m, "model.t_embedder.mlp.2.bias")->offset;
    const float *wy = m->params + find_param(m, "model.y_embedder.embedding_table.weight")->offset;
    const float *by = m->params + find_param(m, "model.y_embedder.embedding_table.bias")->offset;
    for (int i = 0; i < 3; i++) {
        double cn = log((double)in.sigma[i]) / 4, emb[32], hid[16];
        for (int j = 0; j < F / 2; j++) {
            double f = pow(10000.0, -(double)j / (F / 2));
            emb[j] = cos(cn * f);
            emb[F / 2 + j] = sin(cn * f);
        }
        for (int d = 0; d < D; d++) {
            double s = b1[d];
            for (int j = 0; j < F; j++) s += (double)w1[d * F + j] * emb[j];
            hid[d] = s / (1 + exp(-s));
        }
        for (int d = 0; d < D; d++) {
            double s = b2[d] + by[d];
            for (int j = 0; j < D; j++) s += (double)w2[d * D + j] * hid[j];
            if (labels[i] >= 0) s += wy[d * 10 + labels[i]];
            ck_assert_msg(fabs(cond[i * D + d] - s) <= 1e-5 * (1 + fabs(s)),
                          "c[%d][%d] = %.7g, want %.7g", i, d, (double)cond[i * D + d], s);
        }
    }
    free(out), free(cond);
    free_inputs(&in);
    lego_model_free(m);
}
END_TEST

/* Image i of a batch equals the same image denoised alone. */
START_TEST(test_batch_invariance) {
    lego_model *m = std_model(35);
    inputs in = make_inputs(3, 2, 8, 16, 14);
    int32_t labels[3] = {7, -1, 2};
    size_t chw = in.img / 3;
    float *batch = alloc_out(in.img), *alone = alloc_out(chw);
    double worst = 0;
    for (int guided = 0; guided < 2; guided++) {
        lego_denoise_request r;
        request(&r, &in, batch);
        r.labels = labels;
        r.guidance = guided ? 2.0f : 1.0f;
        denoise_ok(m, &r);
        for (int i = 0; i < 3; i++) {
            inputs one = {1, 2, 8, 16, in.x + i * chw, in.sigma + i, chw};
            request(&r, &one, alone);
            r.labels = labels + i;
            r.guidance = guided ? 2.0f : 1.0f;
            denoise_ok(m, &r);
            /* Not bit-exact: BLAS may block a GEMM of 3 rows differently
             * from one of 1.  Scaled as the golden tolerance is. */
            double d = scaled_error(batch + i * chw, alone, chw);
            if (d > worst) worst = d;
            ck_assert_msg(d <= 1e-6, "guided %d image %d: batch vs alone differ by %g (scaled)",
                          guided, i, d);
        }
    }
    printf("batch invariance: max scaled diff %.3g\n", worst);
    free(batch), free(alone);
    free_inputs(&in);
    lego_model_free(m);
}
END_TEST

/* Variable resolution: a non-square image at another size than the
 * training one runs, and coordinate channels still span [-1, 1] (checked
 * indirectly: a 16x8 image is not the transpose of the 8x16 one). */
START_TEST(test_resolutions) {
    lego_model *m = std_model(36);
    const int sizes[][2] = {{8, 8}, {8, 24}, {24, 8}, {16, 16}};
    for (size_t s = 0; s < 4; s++) {
        inputs in = make_inputs(1, 2, sizes[s][0], sizes[s][1], 15);
        float *out = alloc_out(in.img);
        lego_denoise_request r;
        request(&r, &in, out);
        denoise_ok(m, &r);
        for (size_t i = 0; i < in.img; i++) ck_assert(isfinite(out[i]));
        free(out);
        free_inputs(&in);
    }
    lego_model_free(m);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* threads                                                                  */
/* ------------------------------------------------------------------------ */

typedef struct job {
    lego_model *m;
    const inputs *in;
    const int32_t *labels;
    float *out[3];
    lego_status status;
} job;

static void *run_job(void *arg) {
    job *j = arg;
    j->status = LEGO_OK;
    for (int it = 0; it < 3 && j->status == LEGO_OK; it++) {
        lego_denoise_request r;
        request(&r, j->in, j->out[it]);
        r.labels = j->labels;
        r.guidance = it == 2 ? 2.0f : 1.0f;
        j->status = lego_denoise(j->m, &r);
    }
    return NULL;
}

START_TEST(test_two_models_two_threads) {
    lego_model *a = std_model(40), *b = std_model(41);
    inputs ia = make_inputs(2, 2, 8, 16, 16), ib = make_inputs(3, 2, 8, 8, 17);
    int32_t la[2] = {1, 2}, lb[3] = {-1, 5, 9};
    job seq[2] = {{a, &ia, la, {0}, 0}, {b, &ib, lb, {0}, 0}};
    job par[2] = {{a, &ia, la, {0}, 0}, {b, &ib, lb, {0}, 0}};
    for (int k = 0; k < 2; k++)
        for (int it = 0; it < 3; it++) {
            seq[k].out[it] = alloc_out(seq[k].in->img);
            par[k].out[it] = alloc_out(par[k].in->img);
        }
    run_job(&seq[0]);
    run_job(&seq[1]);
    ck_assert(seq[0].status == LEGO_OK && seq[1].status == LEGO_OK);
    pthread_t t[2];
    for (int k = 0; k < 2; k++) ck_assert(pthread_create(&t[k], NULL, run_job, &par[k]) == 0);
    for (int k = 0; k < 2; k++) ck_assert(pthread_join(t[k], NULL) == 0);
    for (int k = 0; k < 2; k++) {
        ck_assert_msg(par[k].status == LEGO_OK, "thread %d: %s", k, lego_model_error(par[k].m));
        for (int it = 0; it < 3; it++) {
            ck_assert_msg(memcmp(par[k].out[it], seq[k].out[it], seq[k].in->img * 4) == 0,
                          "model %d call %d: concurrent result differs by %g", k, it,
                          max_abs_diff(par[k].out[it], seq[k].out[it], seq[k].in->img));
            free(seq[k].out[it]);
            free(par[k].out[it]);
        }
    }
    free_inputs(&ia);
    free_inputs(&ib);
    lego_model_free(a);
    lego_model_free(b);
}
END_TEST

/* Sampling: two models drawing at once in two threads give, bit for bit,
 * the images they draw one after the other (no state is shared between
 * models, and each call's numbers depend only on its model and request). */
typedef struct sample_job {
    lego_model *m;
    int n, h, w;
    lego_solver solver;
    lego_rng rng;
    float guidance;
    float *out;
    int32_t *labels_out;
    lego_status status;
} sample_job;

static void *run_sample_job(void *arg) {
    sample_job *j = arg;
    lego_sample_request r;
    lego_sample_request_init(&r);
    r.n = j->n;
    r.height = j->h;
    r.width = j->w;
    r.out = j->out;
    r.labels_out = j->labels_out;
    lego_sample_options o;
    lego_sample_options_init(&o);
    o.steps = 4;
    o.solver = j->solver;
    o.rng = j->rng;
    o.guidance = j->guidance;
    o.s_churn = j->solver == LEGO_SOLVER_DPMPP_2M ? 0 : 3;
    j->status = lego_sample(j->m, &r, &o, NULL);
    return NULL;
}

START_TEST(test_two_models_sample_threads) {
    lego_model *a = std_model(42), *b = std_model(43);
    sample_job base[2] = {{a, 3, 8, 16, LEGO_SOLVER_HEUN, LEGO_RNG_TORCH, 2.0f, NULL, NULL, 0},
                          {b, 2, 16, 8, LEGO_SOLVER_DPMPP_2M, LEGO_RNG_PHILOX, 1.0f, NULL, NULL, 0}};
    sample_job seq[2], par[2];
    size_t len[2];
    for (int k = 0; k < 2; k++) {
        len[k] = (size_t)base[k].n * 2 * base[k].h * base[k].w;
        seq[k] = par[k] = base[k];
        seq[k].out = alloc_out(len[k]);
        par[k].out = alloc_out(len[k]);
        seq[k].labels_out = malloc((size_t)base[k].n * sizeof(int32_t));
        par[k].labels_out = malloc((size_t)base[k].n * sizeof(int32_t));
        run_sample_job(&seq[k]);
        ck_assert_msg(seq[k].status == LEGO_OK, "%s", lego_model_error(seq[k].m));
    }
    for (int round = 0; round < 2; round++) {
        pthread_t t[2];
        for (int k = 0; k < 2; k++)
            ck_assert(pthread_create(&t[k], NULL, run_sample_job, &par[k]) == 0);
        for (int k = 0; k < 2; k++) ck_assert(pthread_join(t[k], NULL) == 0);
        for (int k = 0; k < 2; k++) {
            ck_assert_msg(par[k].status == LEGO_OK, "thread %d: %s", k,
                          lego_model_error(par[k].m));
            ck_assert_msg(memcmp(par[k].out, seq[k].out, len[k] * sizeof(float)) == 0,
                          "round %d, model %d: concurrent images differ by %g", round, k,
                          max_abs_diff(par[k].out, seq[k].out, len[k]));
            ck_assert(memcmp(par[k].labels_out, seq[k].labels_out,
                             (size_t)base[k].n * sizeof(int32_t)) == 0);
        }
    }
    for (int k = 0; k < 2; k++) {
        free(seq[k].out), free(par[k].out);
        free(seq[k].labels_out), free(par[k].labels_out);
    }
    lego_model_free(a);
    lego_model_free(b);
}
END_TEST

/* Messages belong to their model: a thread failing call after call on one
 * model leaves another thread's model, succeeding meanwhile, with an empty
 * message, and its own model with the message of its own last call. */
typedef struct error_job {
    lego_model *m;
    const inputs *in;
    int fail;          /* make every call fail, each with its own message */
    float *out;
    int ok, failed;
    char last[512];    /* the message after the last call, read at once */
} error_job;

static void *run_error_job(void *arg) {
    error_job *j = arg;
    float *sigma = malloc((size_t)j->in->n * sizeof *sigma);
    for (int it = 0; it < 40; it++) {
        lego_denoise_request r;
        request(&r, j->in, j->out);
        memcpy(sigma, j->in->sigma, (size_t)j->in->n * sizeof *sigma);
        if (j->fail) sigma[0] = -(float)(it + 1); /* "sigma[0] = -<it+1>" */
        r.sigma = sigma;
        lego_status s = lego_denoise(j->m, &r);
        snprintf(j->last, sizeof j->last, "%s", lego_model_error(j->m));
        if (s == LEGO_OK) j->ok++;
        else j->failed++;
    }
    free(sigma);
    return NULL;
}

START_TEST(test_errors_per_model) {
    lego_model *a = std_model(44), *b = std_model(45);
    inputs in = make_inputs(2, 2, 8, 8, 18);
    error_job ja = {a, &in, 1, alloc_out(in.img), 0, 0, ""};
    error_job jb = {b, &in, 0, alloc_out(in.img), 0, 0, ""};
    pthread_t ta, tb;
    ck_assert(pthread_create(&ta, NULL, run_error_job, &ja) == 0);
    ck_assert(pthread_create(&tb, NULL, run_error_job, &jb) == 0);
    ck_assert(pthread_join(ta, NULL) == 0);
    ck_assert(pthread_join(tb, NULL) == 0);
    ck_assert_int_eq(ja.failed, 40);
    ck_assert_int_eq(jb.ok, 40);
    ck_assert_str_eq(lego_model_error(b), "");
    ck_assert_str_eq(jb.last, "");
    ck_assert_msg(strstr(lego_model_error(a), "sigma[0] = -40") != NULL, "model a says '%s'",
                  lego_model_error(a));
    ck_assert_str_eq(ja.last, lego_model_error(a));
    /* The next successful call clears it. */
    lego_denoise_request r;
    request(&r, &in, ja.out);
    denoise_ok(a, &r);
    free(ja.out), free(jb.out);
    free_inputs(&in);
    lego_model_free(a);
    lego_model_free(b);
}
END_TEST

/* One model shared by two threads, one call at a time (a lock around each
 * call): allowed, and the results are those of the same calls made by one
 * thread. */
typedef struct shared_job {
    lego_model *m;
    pthread_mutex_t *lock;
    const inputs *in;
    float guidance;
    float *out[4];
    lego_status status;
} shared_job;

static void *run_shared_job(void *arg) {
    shared_job *j = arg;
    j->status = LEGO_OK;
    for (int it = 0; it < 4 && j->status == LEGO_OK; it++) {
        int32_t labels[3] = {it % 10, -1, 7};
        lego_denoise_request r;
        request(&r, j->in, j->out[it]);
        r.labels = labels;
        r.guidance = j->guidance;
        pthread_mutex_lock(j->lock);
        j->status = lego_denoise(j->m, &r);
        pthread_mutex_unlock(j->lock);
    }
    return NULL;
}

START_TEST(test_one_model_serialised) {
    lego_model *m = std_model(46);
    pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    /* Different sizes, so the shared scratch is regrown between calls. */
    inputs small = make_inputs(2, 2, 8, 8, 19), large = make_inputs(3, 2, 16, 8, 20);
    shared_job seq[2] = {{m, &lock, &small, 1.0f, {0}, 0}, {m, &lock, &large, 2.5f, {0}, 0}};
    shared_job par[2] = {{m, &lock, &small, 1.0f, {0}, 0}, {m, &lock, &large, 2.5f, {0}, 0}};
    for (int k = 0; k < 2; k++)
        for (int it = 0; it < 4; it++) {
            seq[k].out[it] = alloc_out(seq[k].in->img);
            par[k].out[it] = alloc_out(par[k].in->img);
        }
    run_shared_job(&seq[0]);
    run_shared_job(&seq[1]);
    ck_assert(seq[0].status == LEGO_OK && seq[1].status == LEGO_OK);
    pthread_t t[2];
    for (int k = 0; k < 2; k++) ck_assert(pthread_create(&t[k], NULL, run_shared_job, &par[k]) == 0);
    for (int k = 0; k < 2; k++) ck_assert(pthread_join(t[k], NULL) == 0);
    for (int k = 0; k < 2; k++) {
        ck_assert_msg(par[k].status == LEGO_OK, "thread %d: %s", k, lego_model_error(m));
        for (int it = 0; it < 4; it++) {
            ck_assert(memcmp(par[k].out[it], seq[k].out[it], seq[k].in->img * 4) == 0);
            free(seq[k].out[it]), free(par[k].out[it]);
        }
    }
    free_inputs(&small);
    free_inputs(&large);
    lego_model_free(m);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* the trained model in ../shared                                           */
/* ------------------------------------------------------------------------ */

static const char *fmnist_path(void) {
    static char path[4200];
    snprintf(path, sizeof path, "%s/../models/fmnist_lego_pg32.safetensors", golden_dir());
    return path;
}

START_TEST(test_fmnist_checkpoint) {
    const char *path = fmnist_path();
    if (!path_exists(path)) {
        printf("test_api: %s absent, skipping the fmnist checkpoint test\n", path);
        return;
    }
    lego_load_options o;
    lego_load_options_init(&o);
    o.num_threads = 2;
    lego_model *m = NULL;
    ck_assert_msg(lego_model_load(path, &o, &m) == LEGO_OK, "%s", lego_model_error(m));
    ck_assert_int_eq(lego_model_num_bricks(m), 3);
    lego_model_config c;
    lego_model_config_init(&c);
    ck_assert(lego_model_get_config(m, &c) == LEGO_OK);
    ck_assert_int_eq(c.label_dim, 10);
    ck_assert_int_eq(c.img_channels, 1);
    ck_assert_int_eq(c.hidden_size, 256);
    ck_assert(c.sigma_data == 0.5);
    int bricks[3][3];
    const int sizes[3] = {4, 16, 32};
    for (int k = 0; k < 3; k++) {
        lego_brick_config b;
        lego_brick_config_init(&b);
        ck_assert(lego_model_get_brick(m, k, &b) == LEGO_OK);
        ck_assert_int_eq(b.brick_size, sizes[k]);
        bricks[k][0] = b.brick_size;
        bricks[k][1] = b.patch_size;
        bricks[k][2] = b.depth;
    }
    ck_assert_int_eq(lego_model_resolution_multiple(m), 32);
    int64_t np = lego_model_num_params(m);
    ck_assert(np == expected_params(&c, bricks, 3));
    ck_assert_msg(np > 10100000 && np < 10300000, "%lld parameters, README says 10.2 M",
                  (long long)np);
    /* The file's own tensor count agrees. */
    st_file *f = NULL;
    lego_err err;
    ck_assert(st_open(path, &f, &err) == LEGO_OK);
    size_t total = 0;
    for (int i = 0; i < f->num_tensors; i++) total += f->tensors[i].numel;
    ck_assert((int64_t)total == np);
    st_close(f);
    lego_model_free(m);
}
END_TEST

int main(void) {
    Suite *s = suite_create("api");
    TCase *basics = tcase_create("basics");
    tcase_set_timeout(basics, 60);
    tcase_add_test(basics, test_version);
    tcase_add_test(basics, test_status_strings);
    tcase_add_test(basics, test_option_defaults);
    tcase_add_test(basics, test_size_contract);
    suite_add_tcase(s, basics);

    TCase *create = tcase_create("create");
    tcase_set_timeout(create, 60);
    tcase_add_loop_test(create, test_create_bad_config, 0,
                        (int)(sizeof bad_configs / sizeof bad_configs[0]));
    tcase_add_test(create, test_create_null);
    tcase_add_test(create, test_brick_add_bad);
    tcase_add_test(create, test_too_many_bricks);
    tcase_add_test(create, test_num_params);
    tcase_add_test(create, test_introspection);
    suite_add_tcase(s, create);

    TCase *weights = tcase_create("weights");
    tcase_set_timeout(weights, 120);
    tcase_add_test(weights, test_init_weights);
    tcase_add_test(weights, test_save_load_round_trip);
    tcase_add_test(weights, test_load_errors);
    tcase_add_test(weights, test_load_half_precision);
    tcase_add_test(weights, test_load_weights);
    suite_add_tcase(s, weights);

    TCase *denoise = tcase_create("denoise");
    tcase_set_timeout(denoise, 120);
    tcase_add_test(denoise, test_denoise_bad_requests);
    tcase_add_test(denoise, test_skip_middle_brick);
    tcase_add_test(denoise, test_num_bricks);
    tcase_add_test(denoise, test_guidance);
    tcase_add_test(denoise, test_labels_vs_vectors);
    tcase_add_test(denoise, test_conditioning);
    tcase_add_test(denoise, test_batch_invariance);
    tcase_add_test(denoise, test_resolutions);
    tcase_add_test(denoise, test_two_models_two_threads);
    tcase_add_test(denoise, test_two_models_sample_threads);
    tcase_add_test(denoise, test_errors_per_model);
    tcase_add_test(denoise, test_one_model_serialised);
    suite_add_tcase(s, denoise);

    TCase *golden = tcase_create("golden");
    tcase_set_timeout(golden, 120);
    tcase_add_test(golden, test_fmnist_checkpoint);
    suite_add_tcase(s, golden);
    return run_suite(s);
}
