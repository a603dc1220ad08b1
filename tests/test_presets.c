/*
 * test_presets.c -- the reference architectures by name (lego_preset_*,
 * lego_model_create_preset):
 *
 *   names     the list: every reference name present once, out-of-range
 *             indices
 *   counts    exact parameter counts of the reference PyTorch models
 *             (pytorch_reference_speed_h100.json), an independent formula
 *             for every preset, and the counted number equal to what a
 *             built model reports
 *   config    brick lists, defaults, options applied, the size contract
 *   errors    unknown names (the message lists the presets), bad options,
 *             NULL pointers, a backend that is not built in
 *   fmnist    fmnist_lego_pg32 is the architecture of the bundled model
 *             (models/) and of the shared one (skipped when ../shared is
 *             absent); both are trained: no zero-initialised tensor
 *             left at zero, and D(x) at sigma 20 has about each class's
 *             mean pixel
 */
#define _POSIX_C_SOURCE 200809L
#include "testutil.h"

#include <stddef.h>

static const char *const reference_names[] = {
    "lego_S_PG_64",  "lego_S_PR_64",  "lego_S_U_32",   "lego_S_U_64",   "lego_L_PG_32",
    "lego_L_PG_64",  "lego_L_PR_32",  "lego_L_PR_64",  "lego_L_U_32",   "lego_L_U_64",
    "lego_XL_PG_32", "lego_XL_PG_64", "lego_XL_PR_32", "lego_XL_PR_64", "lego_XL_U_32",
    "lego_XL_U_64",  "dit_S2_64",     "dit_L2_64",     "dit_XL2_32",
};
#define NUM_REFERENCE (int)(sizeof reference_names / sizeof reference_names[0])

static int64_t count_of(const char *name, int channels, int classes) {
    lego_preset_options o;
    lego_preset_options_init(&o);
    o.img_channels = channels;
    o.label_dim = classes;
    int64_t n = -1;
    lego_status s = lego_preset_num_params(name, &o, &n);
    ck_assert_msg(s == LEGO_OK, "%s: %s", name, lego_status_string(s));
    return n;
}

/* The parameter count of a LEGO network written out term by term, apart
 * from the library's parameter table: embedders, then per brick the
 * position embedding, patch embedding, blocks and final layer. */
static int64_t formula_count(const lego_model_config *c, const char *name) {
    int64_t D = c->hidden_size, C = c->img_channels, H = (int64_t)(D * c->mlp_ratio);
    int64_t n = c->frequency_embedding_size * D + D + D * D + D;
    if (c->label_dim) n += c->label_dim * D + D;
    for (int k = 0; k < lego_preset_num_bricks(name); k++) {
        lego_brick_config b;
        lego_brick_config_init(&b);
        ck_assert(lego_preset_get_brick(name, k, &b) == LEGO_OK);
        int64_t p = b.patch_size, g = b.brick_size / p, c_in = (k ? 2 * C : C) + 2;
        n += g * g * D + D * c_in * p * p + D;
        n += b.depth * ((3 * D * D + 3 * D) + (D * D + D) + (D * H + H) + (H * D + D) +
                        (6 * D * D + 6 * D));
        n += D * p * p * C + p * p * C + 2 * D * D + 2 * D;
    }
    return n;
}

/* ------------------------------------------------------------------------ */

START_TEST(test_names) {
    int count = lego_preset_count();
    ck_assert_int_eq(count, 22);
    for (int r = 0; r < NUM_REFERENCE; r++) {
        int found = 0;
        for (int i = 0; i < count; i++) found += strcmp(lego_preset_name(i), reference_names[r]) == 0;
        ck_assert_msg(found == 1, "%s listed %d times", reference_names[r], found);
    }
    for (int i = 0; i < count; i++) {
        const char *name = lego_preset_name(i);
        ck_assert_ptr_nonnull(name);
        ck_assert_int_ge(lego_preset_num_bricks(name), 1);
        for (int j = 0; j < i; j++) ck_assert_str_ne(name, lego_preset_name(j));
    }
    ck_assert_ptr_null(lego_preset_name(-1));
    ck_assert_ptr_null(lego_preset_name(count));
    ck_assert_int_eq(lego_preset_num_bricks("lego_s_pg_64"), 0); /* case matters */
    ck_assert_int_eq(lego_preset_num_bricks(NULL), 0);
}
END_TEST

/* The counts the reference PyTorch models report (parameters() summed). */
START_TEST(test_reference_counts) {
    ck_assert_int_eq(count_of("lego_S_PG_64", 3, 1000), 34134744);
    ck_assert_int_eq(count_of("lego_L_PG_64", 3, 1000), 501627096);
    ck_assert_int_eq(count_of("lego_L_PR_64", 3, 1000), 501627096);
    ck_assert_int_eq(count_of("lego_XL_U_32", 4, 1000), 1261977392);
    ck_assert_int_eq(count_of("dit_S2_64", 3, 1000), 33252108);
    ck_assert_int_eq(count_of("dit_L2_64", 3, 1000), 458872844);
    ck_assert_int_eq(count_of("dit_XL2_32", 4, 1000), 675120400);
    /* The same with the defaults (the presets' own data). */
    ck_assert_int_eq(count_of("lego_S_PG_64", 0, -1), 34134744);
    ck_assert_int_eq(count_of("lego_XL_U_32", 0, -1), 1261977392);
    ck_assert_int_eq(count_of("dit_XL2_32", 0, -1), 675120400);
    int64_t n = -1;
    ck_assert_int_eq(lego_preset_num_params("lego_L_PG_64", NULL, &n), LEGO_OK);
    ck_assert_int_eq(n, 501627096);
}
END_TEST

START_TEST(test_formula_counts) {
    for (int i = 0; i < lego_preset_count(); i++) {
        const char *name = lego_preset_name(i);
        for (int variant = 0; variant < 3; variant++) {
            lego_preset_options o;
            lego_preset_options_init(&o);
            if (variant == 1) o.label_dim = 0;
            if (variant == 2) o.img_channels = 7, o.label_dim = 3;
            lego_model_config c;
            lego_model_config_init(&c);
            ck_assert_int_eq(lego_preset_config(name, &o, &c), LEGO_OK);
            int64_t n = -1;
            ck_assert_int_eq(lego_preset_num_params(name, &o, &n), LEGO_OK);
            ck_assert_msg(n == formula_count(&c, name), "%s variant %d: %lld != %lld", name,
                          variant, (long long)n, (long long)formula_count(&c, name));
        }
    }
}
END_TEST

/* What lego_preset_num_params counts is what a built model holds (the
 * small presets only: the others take gigabytes, and valgrind runs this). */
START_TEST(test_count_matches_model) {
    const char *names[] = {"fmnist_lego_pg32"};
    for (int i = 0; i < 1; i++) {
        lego_preset_options o;
        lego_preset_options_init(&o);
        o.num_threads = 2;
        lego_model *m = NULL;
        lego_status s = lego_model_create_preset(names[i], &o, &m);
        ck_assert_msg(s == LEGO_OK, "%s: %s", names[i], lego_model_error(m));
        int64_t n = -1;
        ck_assert_int_eq(lego_preset_num_params(names[i], &o, &n), LEGO_OK);
        ck_assert_int_eq(lego_model_num_params(m), n);
        ck_assert_int_eq(lego_model_num_bricks(m), lego_preset_num_bricks(names[i]));
        for (int k = 0; k < lego_model_num_bricks(m); k++) {
            lego_brick_config a, b;
            lego_brick_config_init(&a);
            lego_brick_config_init(&b);
            ck_assert_int_eq(lego_model_get_brick(m, k, &a), LEGO_OK);
            ck_assert_int_eq(lego_preset_get_brick(names[i], k, &b), LEGO_OK);
            ck_assert_int_eq(a.brick_size, b.brick_size);
            ck_assert_int_eq(a.patch_size, b.patch_size);
            ck_assert_int_eq(a.depth, b.depth);
        }
        lego_model_free(m);
    }
}
END_TEST

/* A preset model is an ordinary model: its settings are the preset's and
 * it takes the preset's images.  (Denoising with a preset model runs in
 * check-python's lego-convert test; it is too slow for valgrind here.) */
START_TEST(test_preset_model) {
    lego_model *m = NULL;
    lego_preset_options o;
    lego_preset_options_init(&o);
    o.num_threads = 2;
    o.label_dim = 0;
    ck_assert_int_eq(lego_model_create_preset("fmnist_lego_pg32", &o, &m), LEGO_OK);
    lego_model_config got, want;
    lego_model_config_init(&got);
    lego_model_config_init(&want);
    ck_assert_int_eq(lego_model_get_config(m, &got), LEGO_OK);
    ck_assert_int_eq(lego_preset_config("fmnist_lego_pg32", &o, &want), LEGO_OK);
    ck_assert_int_eq(got.label_dim, 0);
    ck_assert_int_eq(got.num_threads, 2);
    ck_assert_mem_eq(&got, &want, sizeof got);
    ck_assert_int_eq(lego_model_resolution_multiple(m), 32);
    ck_assert_int_eq(lego_model_check_resolution(m, 64, 96), LEGO_OK);
    ck_assert_int_eq(lego_model_check_resolution(m, 48, 48), LEGO_ERR_SHAPE);
    lego_model_free(m);
}
END_TEST

START_TEST(test_config) {
    lego_model_config c;
    lego_model_config_init(&c);
    ck_assert_int_eq(lego_preset_config("lego_S_PG_64", NULL, &c), LEGO_OK);
    ck_assert_int_eq(c.hidden_size, 384);
    ck_assert_int_eq(c.num_heads, 6);
    ck_assert_int_eq(c.img_channels, 3);
    ck_assert_int_eq(c.img_resolution, 64);
    ck_assert_int_eq(c.label_dim, 1000);
    ck_assert(c.mlp_ratio == 4.0 && c.sigma_data == 0.5 && c.frequency_embedding_size == 256);
    ck_assert_int_eq(lego_preset_config("lego_L_U_32", NULL, &c), LEGO_OK);
    ck_assert_int_eq(c.hidden_size, 1024);
    ck_assert_int_eq(c.num_heads, 16);
    ck_assert_int_eq(c.img_channels, 4);
    ck_assert_int_eq(c.img_resolution, 32);
    ck_assert_int_eq(lego_preset_config("lego_XL_PG_64", NULL, &c), LEGO_OK);
    ck_assert_int_eq(c.hidden_size, 1152);
    ck_assert_int_eq(c.img_channels, 4);
    ck_assert_int_eq(c.img_resolution, 64);

    lego_preset_options o;
    lego_preset_options_init(&o);
    ck_assert_int_eq(o.size, sizeof o);
    ck_assert_int_eq(o.img_channels, 0);
    ck_assert_int_eq(o.img_resolution, 0);
    ck_assert_int_eq(o.label_dim, -1);
    ck_assert_int_eq(o.backend, LEGO_BACKEND_CPU);
    o.img_channels = 1, o.img_resolution = 128, o.label_dim = 0, o.num_threads = 3, o.device = 2;
    ck_assert_int_eq(lego_preset_config("lego_S_PR_64", &o, &c), LEGO_OK);
    ck_assert_int_eq(c.img_channels, 1);
    ck_assert_int_eq(c.img_resolution, 128);
    ck_assert_int_eq(c.label_dim, 0);
    ck_assert_int_eq(c.num_threads, 3);
    ck_assert_int_eq(c.device, 2);

    /* Brick lists, bottom up, as lego_models.py has them. */
    static const struct { const char *name; int n; int b[5][3]; } want[] = {
        {"lego_S_PG_64", 3, {{4, 2, 2}, {16, 8, 4}, {64, 2, 6}}},
        {"lego_S_PR_64", 3, {{64, 2, 6}, {16, 8, 4}, {4, 2, 2}}},
        {"lego_L_PG_32", 3, {{4, 2, 4}, {16, 8, 8}, {32, 2, 12}}},
        {"lego_L_PR_64_old", 3, {{64, 2, 12}, {16, 8, 6}, {4, 2, 6}}},
        {"lego_XL_U_32", 5, {{32, 2, 14}, {16, 8, 10}, {4, 2, 4}, {16, 8, 10}, {32, 2, 14}}},
        {"lego_XL_U_64", 5, {{64, 2, 14}, {16, 8, 12}, {4, 2, 4}, {16, 8, 12}, {64, 2, 14}}},
        {"dit_XL2_32", 1, {{32, 2, 28}}},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        ck_assert_int_eq(lego_preset_num_bricks(want[i].name), want[i].n);
        for (int k = 0; k < want[i].n; k++) {
            lego_brick_config b;
            lego_brick_config_init(&b);
            ck_assert_int_eq(lego_preset_get_brick(want[i].name, k, &b), LEGO_OK);
            ck_assert_int_eq(b.brick_size, want[i].b[k][0]);
            ck_assert_int_eq(b.patch_size, want[i].b[k][1]);
            ck_assert_int_eq(b.depth, want[i].b[k][2]);
        }
        lego_brick_config b;
        lego_brick_config_init(&b);
        ck_assert_int_eq(lego_preset_get_brick(want[i].name, want[i].n, &b),
                         LEGO_ERR_INVALID_ARGUMENT);
        ck_assert_int_eq(lego_preset_get_brick(want[i].name, -1, &b), LEGO_ERR_INVALID_ARGUMENT);
    }
}
END_TEST

/* An older caller whose options end before label_dim gets the default
 * for it (the preset's 1000 classes), and a newer caller's extra bytes are
 * ignored. */
START_TEST(test_size_contract) {
    struct { lego_preset_options o; char extra[32]; } big;
    lego_preset_options_init(&big.o);
    memset(big.extra, 0x7f, sizeof big.extra);
    big.o.size = sizeof big;
    big.o.img_channels = 2;
    lego_preset_options old;
    lego_preset_options_init(&old);
    old.label_dim = 0; /* beyond the old size: must not be read */
    old.img_channels = 2;
    old.size = offsetof(lego_preset_options, label_dim);
    lego_model_config a, b;
    lego_model_config_init(&a);
    lego_model_config_init(&b);
    ck_assert_int_eq(lego_preset_config("lego_S_U_32", &big.o, &a), LEGO_OK);
    ck_assert_int_eq(lego_preset_config("lego_S_U_32", &old, &b), LEGO_OK);
    ck_assert_int_eq(a.img_channels, 2);
    ck_assert_int_eq(b.img_channels, 2);
    ck_assert_int_eq(a.label_dim, 1000);
    ck_assert_int_eq(b.label_dim, 1000);
    /* An older model config receiving the settings keeps its own size. */
    lego_model_config small;
    lego_model_config_init(&small);
    small.size = offsetof(lego_model_config, hidden_size);
    small.hidden_size = -5;
    ck_assert_int_eq(lego_preset_config("lego_L_PG_64", NULL, &small), LEGO_OK);
    ck_assert_int_eq(small.img_channels, 3);
    ck_assert_int_eq(small.hidden_size, -5);
}
END_TEST

START_TEST(test_errors) {
    lego_model *m = (lego_model *)&m;
    ck_assert_int_eq(lego_model_create_preset("lego_S_PG_65", NULL, &m), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(m);
    ck_assert_ptr_nonnull(strstr(lego_model_error(m), "unknown preset \"lego_S_PG_65\""));
    ck_assert_ptr_nonnull(strstr(lego_model_error(m), "lego_S_PG_64"));
    ck_assert_ptr_nonnull(strstr(lego_model_error(m), "dit_XL2_32"));
    ck_assert_int_eq(lego_model_num_bricks(m), 0);
    ck_assert_int_eq(lego_model_init_weights(m, 1), LEGO_ERR_STATE);
    lego_model_free(m);

    m = NULL;
    ck_assert_int_eq(lego_model_create_preset(NULL, NULL, &m), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(lego_model_error(m), "NULL"));
    lego_model_free(m);
    ck_assert_int_eq(lego_model_create_preset("lego_S_PG_64", NULL, NULL),
                     LEGO_ERR_INVALID_ARGUMENT);

    lego_preset_options o;
    lego_preset_options_init(&o);
    o.img_channels = -1;
    m = NULL;
    ck_assert_int_eq(lego_model_create_preset("lego_S_PG_64", &o, &m), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(lego_model_error(m), "img_channels"));
    lego_model_free(m);
    int64_t n = 42;
    ck_assert_int_eq(lego_preset_num_params("lego_S_PG_64", &o, &n), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(n, 42);
    lego_preset_options_init(&o);
    o.label_dim = -2;
    ck_assert_int_eq(lego_preset_num_params("lego_S_PG_64", &o, &n), LEGO_ERR_INVALID_ARGUMENT);
    lego_preset_options_init(&o);
    o.img_channels = 5000; /* beyond what lego_model_create accepts */
    ck_assert_int_eq(lego_preset_num_params("lego_S_PG_64", &o, &n), LEGO_ERR_INVALID_ARGUMENT);
    m = NULL;
    ck_assert_int_eq(lego_model_create_preset("lego_S_PG_64", &o, &m), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(lego_model_error(m), "img_channels"));
    lego_model_free(m);

    ck_assert_int_eq(lego_preset_num_params("nope", NULL, &n), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_preset_num_params("lego_S_PG_64", NULL, NULL), LEGO_ERR_INVALID_ARGUMENT);
    lego_model_config c;
    lego_model_config_init(&c);
    ck_assert_int_eq(lego_preset_config("nope", NULL, &c), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_preset_config("lego_S_PG_64", NULL, NULL), LEGO_ERR_INVALID_ARGUMENT);
    lego_brick_config b;
    lego_brick_config_init(&b);
    ck_assert_int_eq(lego_preset_get_brick("nope", 0, &b), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_preset_get_brick("lego_S_PG_64", 0, NULL), LEGO_ERR_INVALID_ARGUMENT);
    lego_preset_options_init(NULL); /* allowed, does nothing */

    /* A backend this build lacks fails in creation with its own message;
     * counting needs no backend. */
    if (!lego_backend_available(LEGO_BACKEND_CUDA)) {
        lego_preset_options_init(&o);
        o.backend = LEGO_BACKEND_CUDA;
        m = NULL;
        lego_status s = lego_model_create_preset("fmnist_lego_pg32", &o, &m);
        ck_assert(s == LEGO_ERR_UNSUPPORTED || s == LEGO_ERR_BACKEND);
        ck_assert_ptr_nonnull(m);
        ck_assert_str_ne(lego_model_error(m), "");
        lego_model_free(m);
        ck_assert_int_eq(lego_preset_num_params("fmnist_lego_pg32", &o, &n), LEGO_OK);
    }
}
END_TEST

/* Per-class mean pixel of Debian's Fashion-MNIST training set, scaled to
 * [-1, 1] and padded with -1 to 32 x 32 as lego_dataset does. */
static const double fmnist_class_mean[10] = {-0.501, -0.659, -0.423, -0.604, -0.410,
                                             -0.791, -0.492, -0.743, -0.459, -0.539};

/* Every weight finite, and every tensor that DiT initialises to zero (the
 * adaLN modulations and the final layers) moved away from it: each brick
 * was trained, not only present. */
static void check_trained_weights(lego_model *m, const char *path) {
    int64_t count = lego_model_num_params(m);
    float *w = malloc((size_t)count * sizeof *w);
    ck_assert(w && lego_model_get_params(m, w, count) == LEGO_OK);
    int64_t bad = -1; /* one assertion: each ck_assert marks a point (a system call) */
    for (int64_t i = 0; i < count && bad < 0; i++)
        if (!isfinite(w[i])) bad = i;
    ck_assert_msg(bad < 0, "%s: weight %lld is not finite", path, (long long)bad);
    int zero_init = 0;
    for (int t = 0; t < lego_model_num_tensors(m); t++) {
        lego_tensor_info info;
        lego_tensor_info_init(&info);
        ck_assert(lego_model_tensor_info(m, t, &info) == LEGO_OK);
        if (!strstr(info.name, "adaLN_modulation") && !strstr(info.name, "final_layer.linear"))
            continue;
        float top = 0;
        for (int64_t i = 0; i < info.numel; i++) top = fmaxf(top, fabsf(w[info.offset + i]));
        ck_assert_msg(top > 1e-3f, "%s: '%s' is still zero", path, info.name);
        zero_init++;
    }
    /* Weight and bias of the adaLN of 8 blocks and 3 final layers, and of 3 final linears. */
    ck_assert_int_eq(zero_init, 2 * (8 + 3 + 3));
    free(w);
}

/* At sigma 20 the input is mostly noise, so D(x) is near the class's mean
 * image: for five classes from the darkest to the brightest, the mean pixel
 * of the bottom brick's D (alone: the cheapest) must be near the class's
 * and follow their order; an untrained model's D is about 0 everywhere. */
static void check_class_means(lego_model *m, const char *path) {
    enum { N = 5, PIXELS = 32 * 32 };
    const int32_t labels[N] = {5, 7, 1, 2, 4}; /* sandal, sneaker, trouser, pullover, coat */
    rng_seed(20);
    float *x = normal_floats((size_t)N * PIXELS), out[N * PIXELS], sigma[N];
    for (int i = 0; i < N; i++) sigma[i] = 20.0f;
    for (int i = 0; i < N * PIXELS; i++) x[i] *= 20.0f;
    lego_denoise_request r;
    lego_denoise_request_init(&r);
    r.n = N, r.height = 32, r.width = 32, r.x = x, r.sigma = sigma, r.labels = labels, r.out = out;
    r.num_bricks = 1;
    ck_assert_msg(lego_denoise(m, &r) == LEGO_OK, "%s", lego_model_error(m));
    double mean[N], want[N], sum_got = 0, sum_want = 0;
    for (int i = 0; i < N; i++) {
        mean[i] = 0;
        for (int p = 0; p < PIXELS; p++) mean[i] += out[i * PIXELS + p];
        mean[i] /= PIXELS;
        want[i] = fmnist_class_mean[labels[i]];
        ck_assert_msg(fabs(mean[i] - want[i]) < 0.08,
                      "%s: class %d's mean pixel at sigma 20 is %.3f, the data's %.3f", path,
                      labels[i], mean[i], want[i]);
        sum_got += mean[i], sum_want += want[i];
    }
    double cov = 0, var_got = 0, var_want = 0;
    for (int i = 0; i < N; i++) {
        double g = mean[i] - sum_got / N, w = want[i] - sum_want / N;
        cov += g * w, var_got += g * g, var_want += w * w;
    }
    double corr = cov / sqrt(var_got * var_want);
    ck_assert_msg(corr > 0.95, "%s: class means correlate %.3f with the data's", path, corr);
    free(x);
}

/* The model at `path` has the fmnist_lego_pg32 architecture (so its
 * weights load into the preset), and is trained. */
static void check_fmnist_model(const char *path) {
    lego_load_options lo;
    lego_load_options_init(&lo);
    lo.num_threads = 2;
    lego_model *loaded = NULL, *made = NULL;
    ck_assert_msg(lego_model_load(path, &lo, &loaded) == LEGO_OK, "%s", lego_model_error(loaded));
    ck_assert_int_eq(lego_model_create_preset("fmnist_lego_pg32", NULL, &made), LEGO_OK);
    lego_model_config a, b;
    lego_model_config_init(&a);
    lego_model_config_init(&b);
    lego_model_get_config(loaded, &a);
    lego_model_get_config(made, &b);
    ck_assert_int_eq(a.img_channels, b.img_channels);
    ck_assert_int_eq(a.img_resolution, b.img_resolution);
    ck_assert_int_eq(a.label_dim, b.label_dim);
    ck_assert_int_eq(a.hidden_size, b.hidden_size);
    ck_assert_int_eq(a.num_heads, b.num_heads);
    ck_assert_int_eq(lego_model_num_bricks(loaded), lego_model_num_bricks(made));
    for (int k = 0; k < lego_model_num_bricks(made); k++) {
        lego_brick_config x, y;
        lego_brick_config_init(&x);
        lego_brick_config_init(&y);
        ck_assert_int_eq(lego_model_get_brick(loaded, k, &x), LEGO_OK);
        ck_assert_int_eq(lego_model_get_brick(made, k, &y), LEGO_OK);
        ck_assert_int_eq(x.brick_size, y.brick_size);
        ck_assert_int_eq(x.patch_size, y.patch_size);
        ck_assert_int_eq(x.depth, y.depth);
    }
    ck_assert_int_eq(lego_model_num_params(loaded), lego_model_num_params(made));
    ck_assert_msg(lego_model_load_weights(made, path) == LEGO_OK, "%s", lego_model_error(made));
    check_trained_weights(loaded, path);
    if (!under_valgrind()) check_class_means(loaded, path); /* minutes under valgrind */
    lego_model_free(loaded);
    lego_model_free(made);
}

/* The reference model in ../shared. */
START_TEST(test_fmnist_reference) {
    const char *path = "../shared/models/fmnist_lego_pg32.safetensors";
    if (!path_exists(path)) return; /* reference material absent */
    check_fmnist_model(path);
}
END_TEST

/* The model liblego ships (trained by lego-train; the default of lego-sample). */
START_TEST(test_fmnist_bundled) {
    check_fmnist_model("models/lego_fmnist_pg32.safetensors");
}
END_TEST

int main(void) {
    Suite *s = suite_create("presets");
    TCase *names = tcase_create("names");
    tcase_add_test(names, test_names);
    tcase_add_test(names, test_config);
    tcase_add_test(names, test_size_contract);
    suite_add_tcase(s, names);
    TCase *counts = tcase_create("counts");
    tcase_set_timeout(counts, 60);
    tcase_add_test(counts, test_reference_counts);
    tcase_add_test(counts, test_formula_counts);
    suite_add_tcase(s, counts);
    TCase *models = tcase_create("models");
    tcase_set_timeout(models, 120);
    tcase_add_test(models, test_count_matches_model);
    tcase_add_test(models, test_preset_model);
    tcase_add_test(models, test_errors);
    suite_add_tcase(s, models);
    TCase *fmnist = tcase_create("fmnist");
    tcase_set_timeout(fmnist, 120);
    tcase_add_test(fmnist, test_fmnist_reference);
    tcase_add_test(fmnist, test_fmnist_bundled);
    suite_add_tcase(s, fmnist);
    return run_suite(s);
}
