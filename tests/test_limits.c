/*
 * test_limits.c -- sizes and memory: what a caller or a file can make the
 * library allocate.
 *
 *   usage      lego_model_memory_usage counts the handle, the parameter table
 *              and array and the scratch, byte for byte
 *   budget     lego_model_set_memory_budget: denoise, sample and step
 *              requests over the budget fail with LEGO_ERR_OUT_OF_MEMORY
 *              before allocating anything (usage and outputs unchanged), at
 *              the budget they succeed with the same result as without one;
 *              setting a budget below the weights fails
 *   huge       requests whose sizes overflow or pass the allocation guard
 *              fail cleanly without touching the caller's buffers
 *   loader     a small checkpoint claiming a 100 GB architecture is refused
 *              before anything of that size is allocated
 *
 * Needs nothing from ../shared.
 */
#define _POSIX_C_SOURCE 200809L
#include "testutil.h"

#include <stdint.h>

#include "denoise.h"
#include "model.h"

/* C = 2, 10 classes, D = 16; bricks 4/2 and 8/4. */
static lego_model *small_model(void) {
    lego_model_config c;
    lego_model_config_init(&c);
    c.img_channels = 2;
    c.label_dim = 10;
    c.hidden_size = 16;
    c.num_heads = 2;
    c.mlp_ratio = 2.0;
    c.frequency_embedding_size = 32;
    c.num_threads = 1;
    const int bricks[2][3] = {{4, 2, 1}, {8, 4, 1}};
    lego_model *m = model_with_bricks(&c, bricks, 2);
    ck_assert(lego_model_init_weights(m, 7) == LEGO_OK);
    /* The zero-initialised adaLN and final layers would make every output
     * the same; give them values so results say something. */
    for (size_t i = 0; i < m->params_size; i++)
        if (m->params[i] == 0.0f) m->params[i] = 0.01f * (float)((i * 37) % 11) - 0.05f;
    model_weights_changed(m);
    return m;
}

enum { N = 2, H = 8, W = 8, C = 2, L = 10 };
#define IMG ((size_t)N * C * H * W)

typedef struct denoise_io {
    float x[IMG], sigma[N], out[IMG];
    int32_t labels[N];
} denoise_io;

static void io_init(denoise_io *io) {
    for (size_t i = 0; i < IMG; i++) io->x[i] = (float)sin(0.37 * (double)i);
    io->sigma[0] = 0.7f;
    io->sigma[1] = 3.0f;
    io->labels[0] = 4;
    io->labels[1] = -1;
    for (size_t i = 0; i < IMG; i++) io->out[i] = 12345.0f; /* must be overwritten */
}

static lego_status denoise(lego_model *m, denoise_io *io, float guidance) {
    lego_denoise_request r;
    lego_denoise_request_init(&r);
    r.n = N;
    r.height = H;
    r.width = W;
    r.x = io->x;
    r.sigma = io->sigma;
    r.labels = io->labels;
    r.guidance = guidance;
    r.out = io->out;
    return lego_denoise(m, &r);
}

static size_t scratch_bytes(const lego_model *m, int n, int h, int w, int guided) {
    size_t floats = 0;
    ck_assert(model_denoise_floats(m, n, h, w, guided, &floats) == LEGO_OK);
    return floats * sizeof(float);
}

static void expect_contains(const char *msg, const char *needle) {
    ck_assert_msg(strstr(msg, needle) != NULL, "message '%s' lacks '%s'", msg, needle);
}

static void expect_zu(const char *msg, size_t v) {
    char num[32];
    snprintf(num, sizeof num, "%zu", v);
    expect_contains(msg, num);
}

/* ------------------------------------------------------------------------ */
/* usage                                                                    */
/* ------------------------------------------------------------------------ */

START_TEST(test_usage_accounting) {
    lego_model *m = small_model();
    size_t u0 = lego_model_memory_usage(m);
    ck_assert_uint_eq(u0, sizeof *m + (size_t)m->cap_params * sizeof(lego_param) +
                              m->params_size * sizeof(float));
    ck_assert_uint_ge(u0, (size_t)lego_model_num_params(m) * sizeof(float));

    denoise_io io;
    io_init(&io);
    ck_assert_msg(denoise(m, &io, 1.0f) == LEGO_OK, "%s", lego_model_error(m));
    size_t grow = scratch_bytes(m, N, H, W, 0);
    ck_assert_uint_eq(lego_model_memory_usage(m), u0 + grow);
    /* The same size again: the scratch is reused. */
    ck_assert(denoise(m, &io, 1.0f) == LEGO_OK);
    ck_assert_uint_eq(lego_model_memory_usage(m), u0 + grow);
    /* Guidance doubles the batch: the scratch grows to the guided size. */
    ck_assert(denoise(m, &io, 2.0f) == LEGO_OK);
    ck_assert_uint_eq(lego_model_memory_usage(m), u0 + scratch_bytes(m, N, H, W, 1));

    ck_assert_uint_eq(lego_model_memory_usage(NULL), 0);
    lego_model_free(m);

    /* A failed handle holds only itself. */
    lego_model_config bad;
    lego_model_config_init(&bad);
    bad.hidden_size = 6;
    lego_model *f = NULL;
    ck_assert(lego_model_create(&bad, &f) == LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_uint_eq(lego_model_memory_usage(f), sizeof *f);
    ck_assert_int_eq(lego_model_set_memory_budget(f, 1 << 20), LEGO_ERR_STATE);
    lego_model_free(f);
    ck_assert_int_eq(lego_model_set_memory_budget(NULL, 1 << 20), LEGO_ERR_INVALID_ARGUMENT);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* budget                                                                   */
/* ------------------------------------------------------------------------ */

START_TEST(test_budget_denoise) {
    lego_model *free_model = small_model(), *m = small_model();
    denoise_io want, io;
    io_init(&want);
    ck_assert(denoise(free_model, &want, 1.0f) == LEGO_OK);

    size_t u0 = lego_model_memory_usage(m);
    /* The scratch plus the one-hot label rows of this call. */
    size_t need = scratch_bytes(m, N, H, W, 0) + (size_t)N * L * sizeof(float);

    ck_assert(lego_model_set_memory_budget(m, u0 + need - 1) == LEGO_OK);
    io_init(&io);
    ck_assert_int_eq(denoise(m, &io, 1.0f), LEGO_ERR_OUT_OF_MEMORY);
    const char *msg = lego_model_error(m);
    expect_zu(msg, need);
    expect_zu(msg, u0);
    expect_zu(msg, u0 + need - 1);
    expect_contains(msg, "budget");
    ck_assert_uint_eq(lego_model_memory_usage(m), u0); /* nothing allocated */
    for (size_t i = 0; i < IMG; i++) ck_assert(io.out[i] == 12345.0f);

    /* Exactly enough. */
    ck_assert(lego_model_set_memory_budget(m, u0 + need) == LEGO_OK);
    ck_assert_msg(denoise(m, &io, 1.0f) == LEGO_OK, "%s", lego_model_error(m));
    ck_assert(memcmp(io.out, want.out, sizeof io.out) == 0);
    ck_assert_str_eq(lego_model_error(m), "");

    /* Guidance needs the larger scratch: refused under this budget, and
     * accepted again without one. */
    ck_assert_int_eq(denoise(m, &io, 2.5f), LEGO_ERR_OUT_OF_MEMORY);
    ck_assert(lego_model_set_memory_budget(m, 0) == LEGO_OK);
    ck_assert(denoise(m, &io, 2.5f) == LEGO_OK);
    lego_model_free(m);
    lego_model_free(free_model);
}
END_TEST

START_TEST(test_budget_set) {
    lego_model *m = small_model();
    size_t u0 = lego_model_memory_usage(m);
    denoise_io io;
    io_init(&io);
    ck_assert(denoise(m, &io, 1.0f) == LEGO_OK);
    ck_assert_uint_gt(lego_model_memory_usage(m), u0);

    /* Below what the weights take: refused, nothing changes. */
    ck_assert_int_eq(lego_model_set_memory_budget(m, u0 - 1), LEGO_ERR_OUT_OF_MEMORY);
    expect_contains(lego_model_error(m), "weights");
    expect_zu(lego_model_error(m), u0);
    ck_assert_uint_eq(lego_model_memory_usage(m), u0); /* the scratch went first */
    ck_assert(denoise(m, &io, 1.0f) == LEGO_OK);        /* still no budget */

    /* Between the weights and weights + scratch: accepted, and the scratch
     * is given back. */
    ck_assert(lego_model_set_memory_budget(m, u0 + 16) == LEGO_OK);
    ck_assert_uint_eq(lego_model_memory_usage(m), u0);
    ck_assert_int_eq(denoise(m, &io, 1.0f), LEGO_ERR_OUT_OF_MEMORY);

    /* A CPU model holds no GPU memory; a device budget is accepted and
     * changes nothing here (test_cuda checks it on a device). */
    ck_assert_uint_eq(lego_model_device_memory_usage(m), 0);
    ck_assert_uint_eq(lego_model_device_memory_usage(NULL), 0);
    ck_assert(lego_model_set_device_memory_budget(m, 1) == LEGO_OK);
    ck_assert(lego_model_set_memory_budget(m, 0) == LEGO_OK);
    ck_assert(denoise(m, &io, 1.0f) == LEGO_OK);
    ck_assert_int_eq(lego_model_set_device_memory_budget(NULL, 1), LEGO_ERR_INVALID_ARGUMENT);
    lego_model_free(m);
}
END_TEST

static lego_status sample(lego_model *m, lego_solver solver, lego_rng rng, float guidance,
                          float *out) {
    lego_sample_request r;
    lego_sample_request_init(&r);
    r.n = N;
    r.height = H;
    r.width = W;
    r.out = out;
    lego_sample_options o;
    lego_sample_options_init(&o);
    o.steps = 3;
    o.solver = solver;
    o.rng = rng;
    o.guidance = guidance;
    o.s_churn = 1.0;
    return lego_sample(m, &r, &o, NULL);
}

START_TEST(test_budget_sample) {
    const struct {
        lego_solver solver;
        lego_rng rng;
        float guidance;
    } runs[] = {{LEGO_SOLVER_HEUN, LEGO_RNG_PHILOX, 1.0f},
                {LEGO_SOLVER_DPMPP_2M, LEGO_RNG_TORCH, 2.0f},
                {LEGO_SOLVER_EULER, LEGO_RNG_TORCH, 1.0f}};
    for (size_t k = 0; k < sizeof runs / sizeof runs[0]; k++) {
        lego_model *free_model = small_model(), *m = small_model();
        float want[IMG], got[IMG];
        ck_assert(sample(free_model, runs[k].solver, runs[k].rng, runs[k].guidance, want) ==
                  LEGO_OK);
        size_t u0 = lego_model_memory_usage(m);
        size_t scratch = scratch_bytes(m, N, H, W, runs[k].guidance != 1.0f);

        /* Room for the network's scratch but not for the sampler's own
         * buffers (x and noise in float64 alone are 2 * 8 * IMG bytes). */
        ck_assert(lego_model_set_memory_budget(m, u0 + scratch + 16 * IMG) == LEGO_OK);
        for (size_t i = 0; i < IMG; i++) got[i] = 12345.0f;
        ck_assert_int_eq(sample(m, runs[k].solver, runs[k].rng, runs[k].guidance, got),
                         LEGO_ERR_OUT_OF_MEMORY);
        expect_contains(lego_model_error(m), "budget");
        expect_zu(lego_model_error(m), u0 + scratch + 16 * IMG);
        ck_assert_uint_eq(lego_model_memory_usage(m), u0);
        for (size_t i = 0; i < IMG; i++) ck_assert(got[i] == 12345.0f);

        /* A generous budget: the same images as without one. */
        ck_assert(lego_model_set_memory_budget(m, u0 + scratch + 4096 * IMG) == LEGO_OK);
        ck_assert_msg(sample(m, runs[k].solver, runs[k].rng, runs[k].guidance, got) == LEGO_OK,
                      "%s", lego_model_error(m));
        ck_assert(memcmp(got, want, sizeof got) == 0);
        lego_model_free(m);
        lego_model_free(free_model);
    }
}
END_TEST

START_TEST(test_budget_step) {
    lego_model *m = small_model();
    float x[IMG], noise[IMG], den[IMG];
    for (size_t i = 0; i < IMG; i++) {
        x[i] = (float)cos(0.3 * (double)i);
        noise[i] = (float)sin(0.7 * (double)i);
    }
    lego_step_request r;
    lego_step_request_init(&r);
    r.n = N;
    r.height = H;
    r.width = W;
    r.x = x;
    r.t_cur = 2.0;
    r.t_next = 1.0;
    r.noise = noise;
    r.denoised = den;
    lego_sample_options o;
    lego_sample_options_init(&o);
    o.s_churn = 5;
    size_t u0 = lego_model_memory_usage(m), scratch = scratch_bytes(m, N, H, W, 0);
    ck_assert(lego_model_set_memory_budget(m, u0 + scratch) == LEGO_OK);
    ck_assert_int_eq(lego_step(m, &r, &o), LEGO_ERR_OUT_OF_MEMORY);
    expect_contains(lego_model_error(m), "budget");
    ck_assert(x[1] == (float)cos(0.3)); /* x untouched */
    ck_assert_uint_eq(lego_model_memory_usage(m), u0);
    ck_assert(lego_model_set_memory_budget(m, u0 + scratch + 64 * IMG) == LEGO_OK);
    ck_assert_msg(lego_step(m, &r, &o) == LEGO_OK, "%s", lego_model_error(m));
    ck_assert(x[1] != (float)cos(0.3));
    lego_model_free(m);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* huge                                                                     */
/* ------------------------------------------------------------------------ */

/* Requests far beyond memory: refused with a clean status and a message,
 * the one-float caller buffers never touched (ASan or valgrind would see
 * an access). */
START_TEST(test_huge_requests) {
    lego_model *m = small_model();
    float one = 1.0f, out = 0.0f;
    float sigma[4] = {1, 1, 1, 1};
    const struct {
        int n, h, w;
        size_t budget;
    } cases[] = {
        {1, 8192, 8192, (size_t)64 << 20},  /* 10 GB of scratch, under a 64 MiB budget */
        {1, 65536, 65536, 0},               /* past the allocation guard */
        {4, 262144, 262144, 0},             /* n * C * H * W near 2^40 */
        {1, 262152, 8, 0},                  /* taller than any image may be */
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        ck_assert(lego_model_set_memory_budget(m, cases[k].budget) == LEGO_OK);
        lego_denoise_request r;
        lego_denoise_request_init(&r);
        r.n = cases[k].n;
        r.height = cases[k].h;
        r.width = cases[k].w;
        r.x = &one;
        r.sigma = sigma;
        r.out = &out;
        lego_status s = lego_denoise(m, &r);
        ck_assert_msg(s == LEGO_ERR_OUT_OF_MEMORY || s == LEGO_ERR_SHAPE,
                      "denoise case %zu: status %d", k, s);
        ck_assert(lego_model_error(m)[0] != '\0');

        lego_sample_request q;
        lego_sample_request_init(&q);
        q.n = cases[k].n;
        q.height = cases[k].h;
        q.width = cases[k].w;
        q.out = &out;
        s = lego_sample(m, &q, NULL, NULL);
        ck_assert_msg(s == LEGO_ERR_OUT_OF_MEMORY || s == LEGO_ERR_SHAPE,
                      "sample case %zu: status %d", k, s);

        lego_step_request t;
        lego_step_request_init(&t);
        t.n = cases[k].n;
        t.height = cases[k].h;
        t.width = cases[k].w;
        t.x = &out;
        t.t_cur = 1;
        s = lego_step(m, &t, NULL);
        ck_assert_msg(s == LEGO_ERR_OUT_OF_MEMORY || s == LEGO_ERR_SHAPE,
                      "step case %zu: status %d", k, s);
        ck_assert(out == 0.0f);
        ck_assert_uint_eq(lego_model_memory_usage(m), sizeof *m + (size_t)m->cap_params *
                          sizeof(lego_param) + m->params_size * sizeof(float));
    }
    lego_model_free(m);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* loader                                                                   */
/* ------------------------------------------------------------------------ */

/* A few hundred bytes whose lego.config describes ~26e9 parameters (a
 * 400000-class label embedding at width 65536).  The loader once built the
 * model, allocating and zeroing the whole array, before it looked at the
 * tensors; now the file must show every tensor first.  (Found while
 * fuzzing the loader: a tiny file could ask for any amount of memory.) */
START_TEST(test_load_oversized_config) {
    char dir[] = "/tmp/lego_limits_XXXXXX", path[64];
    ck_assert(mkdtemp(dir) != NULL);
    snprintf(path, sizeof path, "%s/huge.safetensors", dir);
    const char *json = "{\"format\": \"lego-diffusion\", \"version\": 1, \"img_channels\": 1, "
                       "\"label_dim\": 400000, \"hidden_size\": 65536, \"num_heads\": 1, "
                       "\"mlp_ratio\": 1.0, \"frequency_embedding_size\": 4, \"bricks\": "
                       "[{\"brick_size\": 2, \"patch_size\": 2, \"depth\": 1}]}";
    float v = 1.0f;
    st_write_item item = {"model.t_embedder.mlp.0.bias", 1, {1}, &v};
    lego_err err;
    ck_assert(st_write_f32(path, &item, 1, json, &err) == LEGO_OK);

    lego_model *m = NULL;
    ck_assert_int_eq(lego_model_load(path, NULL, &m), LEGO_ERR_SHAPE);
    expect_contains(lego_model_error(m), "missing tensor 'model.t_embedder.mlp.0.weight'");
    ck_assert_uint_eq(lego_model_memory_usage(m), sizeof *m);
    lego_model_free(m);

    /* load_weights compares the file's architecture with the model's
     * without building the file's one either. */
    lego_model *small = small_model();
    ck_assert_int_eq(lego_model_load_weights(small, path), LEGO_ERR_SHAPE);
    expect_contains(lego_model_error(small), "differs");
    lego_model_free(small);
    remove(path);
    rmdir(dir);
}
END_TEST

int main(void) {
    Suite *s = suite_create("limits");
    TCase *t = tcase_create("budget");
    tcase_set_timeout(t, 120);
    tcase_add_test(t, test_usage_accounting);
    tcase_add_test(t, test_budget_denoise);
    tcase_add_test(t, test_budget_set);
    tcase_add_test(t, test_budget_sample);
    tcase_add_test(t, test_budget_step);
    suite_add_tcase(s, t);
    TCase *h = tcase_create("huge");
    tcase_set_timeout(h, 120);
    tcase_add_test(h, test_huge_requests);
    tcase_add_test(h, test_load_oversized_config);
    suite_add_tcase(s, h);
    return run_suite(s);
}
