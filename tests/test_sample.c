/*
 * test_sample.c -- the samplers against the reference (golden cases under
 * $LEGO_GOLDEN_DIR, discovered) and the sampling contract: batch
 * invariance, skip accounting, cancellation, progress, bad requests.
 */
#define _POSIX_C_SOURCE 200809L
#include <cjson/cJSON.h>
#include <dirent.h>

#include "model.h"
#include "rng.h"
#define TESTUTIL_GOLDEN_CASES
#include "testutil.h"


typedef struct scase {
    const char *name;
    lego_model *m;
    st_file *io;
    double tol;
    int steps, n, C, H, W, K, L;
    int32_t labels[64];
} scase;

static void open_case(scase *c, const char *dir) {
    char path[4096];
    memset(c, 0, sizeof *c);
    c->name = strrchr(dir, '/') + 1;
    cJSON *root = case_json(dir);
    c->steps = cJSON_GetObjectItem(root, "steps")->valueint;
    c->tol = cJSON_GetObjectItem(cJSON_GetObjectItem(root, "tolerance"), "sampler")->valuedouble;
    cJSON_Delete(root);

    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    ck_assert_msg(lego_model_load(path, NULL, &c->m) == LEGO_OK, "%s", lego_model_error(c->m));
    snprintf(path, sizeof path, "%s/io.safetensors", dir);
    lego_err err;
    ck_assert_msg(st_open(path, &c->io, &err) == LEGO_OK, "%s", err.msg);
    const st_tensor *x = st_find(c->io, "latents");
    ck_assert(x && x->rank == 4 && x->shape[0] <= 64);
    c->n = (int)x->shape[0];
    c->C = (int)x->shape[1];
    c->H = (int)x->shape[2];
    c->W = (int)x->shape[3];
    c->K = lego_model_num_bricks(c->m);
    lego_model_config cfg;
    lego_model_config_init(&cfg);
    lego_model_get_config(c->m, &cfg);
    c->L = cfg.label_dim;
    /* One-hot label rows back to class indices (-1 for a null row). */
    float *rows = tensor_f32(c->io, "labels", NULL);
    for (int i = 0; i < c->n; i++) {
        c->labels[i] = -1;
        for (int j = 0; rows && j < c->L; j++)
            if (rows[(size_t)i * c->L + j] == 1.0f) c->labels[i] = j;
    }
    free(rows);
}

static void close_case(scase *c) {
    st_close(c->io);
    lego_model_free(c->m);
}

static void expect(const scase *c, const char *name, const float *got, size_t numel) {
    expect_golden(c->io, c->name, name, got, numel, c->tol);
}

START_TEST(test_golden_sigmas) {
    scase c;
    open_case(&c, case_dirs[_i]);
    double sig[1024];
    ck_assert(c.steps < 1000);
    ck_assert(lego_karras_sigmas(c.steps, 0.002, 80, 7, sig) == LEGO_OK);
    float got[1024];
    for (int i = 0; i <= c.steps; i++) got[i] = (float)sig[i];
    expect(&c, "sigmas", got, (size_t)c.steps + 1);
    close_case(&c);
}
END_TEST

/* sample.heun, sample.heun_skip, sample.heun_cfg2 from the given latents. */
START_TEST(test_golden_heun) {
    scase c;
    open_case(&c, case_dirs[_i]);
    size_t img = (size_t)c.n * c.C * c.H * c.W;
    float *lat = tensor_f32(c.io, "latents", NULL), *out = malloc(img * sizeof *out);
    lego_sample_request r;
    lego_sample_request_init(&r);
    r.n = c.n;
    r.height = c.H;
    r.width = c.W;
    r.latents = lat;
    r.labels = c.L > 0 ? c.labels : NULL;
    r.out = out;
    lego_sample_options o;
    lego_sample_options_init(&o);
    o.steps = c.steps;
    lego_sample_result res;
    lego_sample_result_init(&res);

    ck_assert_msg(lego_sample(c.m, &r, &o, &res) == LEGO_OK, "%s", lego_model_error(c.m));
    expect(&c, "sample.heun", out, img);
    ck_assert_int_eq(res.network_evals, 2 * c.steps - 1);
    ck_assert_int_eq(res.brick_evals_saved, 0);

    if (c.K > 1) {
        lego_skip_policy p;
        lego_skip_policy_init(&p);
        ck_assert(lego_skip_policy_preset(&p, c.m, LEGO_SKIP_TOP_AT_LOW_NOISE, c.steps, 0.5, 0) ==
                  LEGO_OK);
        o.skip = &p;
        ck_assert(lego_sample(c.m, &r, &o, &res) == LEGO_OK);
        expect(&c, "sample.heun_skip", out, img);
        /* Steps i > floor(steps/2) drop the top brick: 2 evaluations each,
         * 1 for the last step. */
        int skipped_steps = c.steps - 1 - c.steps / 2;
        ck_assert_int_eq(res.brick_evals_saved, 2 * skipped_steps - 1);
        ck_assert_int_eq(res.brick_evals, res.network_evals * c.K - res.brick_evals_saved);
        o.skip = NULL;
    }
    if (c.L > 0) {
        o.guidance = 2.0f;
        ck_assert(lego_sample(c.m, &r, &o, NULL) == LEGO_OK);
        expect(&c, "sample.heun_cfg2", out, img);
    }
    free(lat);
    free(out);
    close_case(&c);
}
END_TEST

/* The reference generate.py pipeline end to end with PyTorch's generator. */
START_TEST(test_golden_generate) {
    scase c;
    open_case(&c, case_dirs[_i]);
    size_t ns = 0;
    double *seeds = tensor_f64(c.io, "generate.seeds", &ns);
    if (!seeds) {
        printf("golden %-12s generate.*          (not in this case)\n", c.name);
        close_case(&c);
        return;
    }
    ck_assert_int_eq((int)ns, c.n);
    uint64_t s64[64];
    for (int i = 0; i < c.n; i++) s64[i] = (uint64_t)seeds[i];
    size_t img = (size_t)c.n * c.C * c.H * c.W, chw = img / (size_t)c.n;

    /* Latents straight from the generator. */
    float *lat = malloc(img * sizeof *lat);
    for (int i = 0; i < c.n; i++) {
        lego_torch_gen g;
        torch_gen_seed(&g, s64[i]);
        torch_randn_f32(&g, lat + (size_t)i * chw, chw);
    }
    expect(&c, "generate.latents", lat, img);

    float *out = malloc(img * sizeof *out);
    int32_t labels[64];
    lego_sample_request r;
    lego_sample_request_init(&r);
    r.n = c.n;
    r.height = c.H;
    r.width = c.W;
    r.seeds = s64;
    r.out = out;
    r.labels_out = labels;
    lego_sample_options o;
    lego_sample_options_init(&o);
    o.steps = c.steps;
    o.rng = LEGO_RNG_TORCH;
    o.s_churn = 20;
    o.s_min = 0.05;
    o.s_max = 50;
    o.s_noise = 1.003;
    ck_assert_msg(lego_sample(c.m, &r, &o, NULL) == LEGO_OK, "%s", lego_model_error(c.m));
    if (c.L > 0) {
        float rows[64 * 64] = {0};
        ck_assert(c.L <= 64);
        for (int i = 0; i < c.n; i++) {
            ck_assert(labels[i] >= 0 && labels[i] < c.L);
            rows[i * c.L + labels[i]] = 1.0f;
        }
        expect(&c, "generate.labels", rows, (size_t)c.n * c.L);
    }
    expect(&c, "generate.out", out, img);
    free(seeds);
    free(lat);
    free(out);
    close_case(&c);
}
END_TEST


/* ---- the sampling contract, on a small random conditional model ---- */

static lego_model *small_model(void) {
    lego_model_config cfg;
    lego_model_config_init(&cfg);
    cfg.img_channels = 2;
    cfg.label_dim = 5;
    cfg.hidden_size = 32;
    cfg.num_heads = 2;
    cfg.num_threads = 1;
    const int bricks[3][3] = {{4, 2, 1}, {8, 4, 1}, {8, 2, 1}};
    lego_model *m = model_with_bricks(&cfg, bricks, 3);
    ck_assert(lego_model_init_weights(m, 7) == LEGO_OK);
    return m;
}

/* The reference initialisation zeroes adaLN and the final layers, so every
 * brick outputs 0; perturb all weights so sampling exercises the network. */
static void scramble(lego_model *m) {
    for (size_t i = 0; i < m->params_size; i++)
        m->params[i] += 0.02f * (float)((int)((i * 2654435761u) % 201) - 100) / 100.0f;
}

static void sample_into(lego_model *m, int n, const uint64_t *seeds, const int32_t *labels,
                        const lego_sample_options *o, float *out, lego_sample_result *res) {
    lego_sample_request r;
    lego_sample_request_init(&r);
    r.n = n;
    r.height = 8;
    r.width = 16;
    r.seeds = seeds;
    r.labels = labels;
    r.out = out;
    ck_assert_msg(lego_sample(m, &r, o, res) == LEGO_OK, "%s", lego_model_error(m));
}

START_TEST(test_batch_invariance) {
    lego_model *m = small_model();
    scramble(m);
    const size_t img = 2 * 8 * 16;
    uint64_t seeds[7] = {11, 3, 42, 5, 0, 99, 7};
    float batch[7 * 256], alone[256];
    for (int rng = 0; rng < 2; rng++) {
        lego_sample_options o;
        lego_sample_options_init(&o);
        o.steps = 4;
        o.rng = rng ? LEGO_RNG_TORCH : LEGO_RNG_PHILOX;
        o.s_churn = 10; /* exercise the churn noise too */
        o.guidance = 1.5f;
        sample_into(m, 7, seeds, NULL, &o, batch, NULL);
        sample_into(m, 1, seeds + 2, NULL, &o, alone, NULL);
        for (size_t j = 0; j < img; j++)
            ck_assert_msg(fabsf(alone[j] - batch[2 * img + j]) <= 1e-5f * (1 + fabsf(alone[j])),
                          "rng %d: seed 42 alone differs from seed 42 in a batch at %zu", rng, j);
    }
    lego_model_free(m);
}
END_TEST

static int count_calls(int step, int total, void *user) {
    int *calls = user;
    ck_assert_int_eq(step, calls[0] + 1);
    ck_assert_int_eq(total, 5);
    calls[0]++;
    return 0;
}

static int cancel_at_two(int step, int total, void *user) {
    (void)total;
    (void)user;
    return step == 2;
}

START_TEST(test_progress_and_cancel) {
    lego_model *m = small_model();
    float out[2 * 256];
    int calls[1] = {0};
    lego_sample_options o;
    lego_sample_options_init(&o);
    o.steps = 5;
    o.progress = count_calls;
    o.progress_user = calls;
    lego_sample_result res;
    lego_sample_result_init(&res);
    sample_into(m, 2, NULL, NULL, &o, out, &res);
    ck_assert_int_eq(calls[0], 5);
    ck_assert_int_eq(res.network_evals, 9);
    ck_assert_int_eq(res.brick_evals, 27);

    o.progress = cancel_at_two;
    lego_sample_request r;
    lego_sample_request_init(&r);
    r.n = 2;
    r.height = 8;
    r.width = 8;
    r.out = out;
    ck_assert_int_eq(lego_sample(m, &r, &o, NULL), LEGO_ERR_CANCELLED);
    ck_assert(strstr(lego_model_error(m), "cancel") != NULL);
    lego_model_free(m);
}
END_TEST

START_TEST(test_skip_accounting) {
    lego_model *m = small_model();
    float out[256];
    lego_skip_policy p;
    lego_skip_policy_init(&p);
    lego_sample_options o;
    lego_sample_options_init(&o);
    o.steps = 10;
    o.skip = &p;
    lego_sample_result res;
    lego_sample_result_init(&res);
    /* PR rule by sigma: the top brick runs only at t_i <= 1. */
    ck_assert(lego_skip_policy_preset(&p, m, LEGO_SKIP_TOP_AT_HIGH_NOISE, 0, 0, 1.0) == LEGO_OK);
    double sig[11];
    lego_karras_sigmas(10, 0.002, 80, 7, sig);
    int high = 0;
    for (int i = 0; i < 10; i++) high += sig[i] > 1.0 ? (i < 9 ? 2 : 1) : 0;
    sample_into(m, 1, NULL, NULL, &o, out, &res);
    ck_assert_int_eq(res.network_evals, 19);
    ck_assert_int_eq(res.brick_evals_saved, high);
    /* Skipping a middle brick through the raw policy fields. */
    lego_skip_policy_init(&p);
    p.step_max[1] = -1; /* brick 1 never runs */
    sample_into(m, 1, NULL, NULL, &o, out, &res);
    ck_assert_int_eq(res.brick_evals_saved, 19);
    /* Brick 0 cannot be skipped by a preset on a one-brick model. */
    lego_model_config cfg;
    lego_model_config_init(&cfg);
    cfg.hidden_size = 16;
    cfg.num_heads = 2;
    lego_model *one = NULL;
    ck_assert(lego_model_create(&cfg, &one) == LEGO_OK);
    lego_brick_config b;
    lego_brick_config_init(&b);
    b.brick_size = 8;
    ck_assert(lego_brick_add(one, &b) == LEGO_OK);
    ck_assert(lego_skip_policy_preset(&p, one, LEGO_SKIP_TOP_AT_LOW_NOISE, 10, 0.5, 0) != LEGO_OK);
    lego_model_free(one);
    lego_model_free(m);
}
END_TEST

/* A caller's own loop of lego_step calls reproduces lego_sample. */
START_TEST(test_step_loop_matches_sample) {
    lego_model *m = small_model();
    scramble(m);
    for (int solver = 0; solver < 3; solver++) {
        lego_sample_options o;
        lego_sample_options_init(&o);
        o.steps = 6;
        o.solver = (lego_solver)solver;
        float lat[256], want[256], x[256], den[256];
        uint64_t seed = 5;
        int32_t label = 3;
        for (int i = 0; i < 256; i++) lat[i] = (float)sin(i * 0.37);
        lego_sample_request r;
        lego_sample_request_init(&r);
        r.n = 1;
        r.height = 8;
        r.width = 16;
        r.seeds = &seed;
        r.labels = &label;
        r.latents = lat;
        r.out = want;
        ck_assert(lego_sample(m, &r, &o, NULL) == LEGO_OK);

        double sig[7];
        lego_karras_sigmas(6, 0.002, 80, 7, sig);
        for (int i = 0; i < 256; i++) x[i] = (float)(lat[i] * sig[0]);
        for (int i = 0; i < 6; i++) {
            lego_step_request s;
            lego_step_request_init(&s);
            s.n = 1;
            s.height = 8;
            s.width = 16;
            s.x = x;
            s.t_cur = sig[i];
            s.t_next = sig[i + 1];
            s.t_prev = i ? sig[i - 1] : 0;
            s.step = i;
            s.labels = &label;
            s.denoised = den;
            ck_assert_msg(lego_step(m, &s, &o) == LEGO_OK, "%s", lego_model_error(m));
        }
        /* lego_step keeps x in float32 between steps; lego_sample in float64. */
        float err = 0;
        for (int i = 0; i < 256; i++) err = fmaxf(err, fabsf(x[i] - want[i]));
        ck_assert_msg(err < 1e-3f, "solver %d: step loop differs by %g", solver, err);
    }
    lego_model_free(m);
}
END_TEST

/* Non-square sizes and padding to brick multiples. */
START_TEST(test_sizes) {
    lego_model *m = small_model();
    float out[2 * 12 * 20], big[2 * 16 * 24];
    lego_sample_options o;
    lego_sample_options_init(&o);
    o.steps = 2;
    lego_sample_request r;
    lego_sample_request_init(&r);
    r.n = 1;
    r.height = 12;
    r.width = 20;
    r.out = out;
    ck_assert_int_eq(lego_sample(m, &r, &o, NULL), LEGO_ERR_SHAPE);
    ck_assert(strstr(lego_model_error(m), "multiple") != NULL);
    r.pad = 1;
    ck_assert_msg(lego_sample(m, &r, &o, NULL) == LEGO_OK, "%s", lego_model_error(m));
    /* The padded result is the centre crop of the 16 x 24 sample. */
    r.pad = 0;
    r.height = 16;
    r.width = 24;
    r.out = big;
    ck_assert(lego_sample(m, &r, &o, NULL) == LEGO_OK);
    for (int c = 0; c < 2; c++)
        for (int y = 0; y < 12; y++)
            for (int x = 0; x < 20; x++)
                ck_assert(out[(c * 12 + y) * 20 + x] == big[(c * 16 + y + 2) * 24 + x + 2]);
    lego_model_free(m);
}
END_TEST


/* A freshly initialised model's bricks output 0, so D(x; s) = c_skip x:
 * the exact denoiser of Gaussian data N(0, s_d^2), linear in x.  Each
 * solver then maps x_T = z T to g z for a scalar g that the solver's
 * formula gives when run on one number; this spells out Heun, Euler and
 * DPM-Solver++(2M) independently of src/solver.c.  The exact ODE solution
 * is g = T s_d / sqrt(T^2 + s_d^2); every solver must land near it. */
static double gaussian_endpoint(lego_solver solver, int steps) {
    double t[1024], x = 80, old = 0;
    lego_karras_sigmas(steps, 0.002, 80, 7, t);
    for (int i = 0; i < steps; i++) {
        double tc = t[i], tn = t[i + 1], d = 0.25 / (tc * tc + 0.25) * x;
        if (solver == LEGO_SOLVER_DPMPP_2M) {
            if (tn == 0) {
                x = d;
            } else {
                double h = log(tc / tn), dd = d;
                if (i > 0) {
                    double r = log(t[i - 1] / tc) / h;
                    dd = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old;
                }
                x = exp(-h) * x + (1 - exp(-h)) * dd;
            }
            old = d;
            continue;
        }
        double slope = (x - d) / tc, xn = x + (tn - tc) * slope;
        if (solver == LEGO_SOLVER_HEUN && tn > 0) {
            double slope2 = (xn - 0.25 / (tn * tn + 0.25) * xn) / tn;
            xn = x + (tn - tc) * (0.5 * slope + 0.5 * slope2);
        }
        x = xn;
    }
    return x; /* z = 1 */
}

START_TEST(test_solvers_reach_gaussian_endpoint) {
    lego_model *m = small_model();
    float lat[256], out[256];
    for (int i = 0; i < 256; i++) lat[i] = (float)cos(i * 0.71);
    const lego_solver solvers[3] = {LEGO_SOLVER_HEUN, LEGO_SOLVER_EULER, LEGO_SOLVER_DPMPP_2M};
    const int steps[3] = {18, 200, 12};
    const double exact = 80.0 * 0.5 / sqrt(80.0 * 80.0 + 0.25);
    for (int k = 0; k < 3; k++) {
        lego_sample_options o;
        lego_sample_options_init(&o);
        o.solver = solvers[k];
        o.steps = steps[k];
        lego_sample_request r;
        lego_sample_request_init(&r);
        r.n = 1;
        r.height = 8;
        r.width = 16;
        r.latents = lat;
        r.out = out;
        ck_assert(lego_sample(m, &r, &o, NULL) == LEGO_OK);
        double g = gaussian_endpoint(solvers[k], steps[k]), err = 0;
        ck_assert_msg(fabs(g - exact) < 0.2 * exact, "solver %d: %g is no ODE solution (%g)", k,
                      g, exact);
        for (int i = 0; i < 256; i++) err = fmax(err, fabs(out[i] - lat[i] * g));
        ck_assert_msg(err < 1e-5, "solver %d: differs from its formula by %g", k, err);
    }
    lego_model_free(m);
}
END_TEST

START_TEST(test_bad_requests) {
    lego_model *m = small_model();
    float out[256];
    lego_sample_request r;
    lego_sample_request_init(&r);
    r.n = 1;
    r.height = 8;
    r.width = 8;
    r.out = out;
    lego_sample_options o;
    struct { const char *what, *needle; } cases[] = {
        {"zero steps", "steps"}, {"sigma_min >= sigma_max", "sigma_min"},
        {"unknown solver", "solver"}, {"negative guidance", "guidance"},
        {"NaN rho", "rho"}, {"unknown rng", "generator"}, {"increasing sigmas", "decreasing"},
        {"label out of range", "label"},
    };
    double bad_sigmas[3] = {1.0, 2.0, 0.5};
    int32_t bad_label = 5;
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        lego_sample_options_init(&o);
        o.steps = 3;
        r.labels = NULL;
        switch (i) {
        case 0: o.steps = 0; break;
        case 1: o.sigma_min = 80; break;
        case 2: o.solver = (lego_solver)7; break;
        case 3: o.guidance = -1; break;
        case 4: o.rho = NAN; break;
        case 5: o.rng = (lego_rng)9; break;
        case 6: o.sigmas = bad_sigmas; break;
        case 7: r.labels = &bad_label; break;
        }
        ck_assert_int_eq(lego_sample(m, &r, &o, NULL), LEGO_ERR_INVALID_ARGUMENT);
        ck_assert_msg(strstr(lego_model_error(m), cases[i].needle) != NULL, "%s: message '%s'",
                      cases[i].what, lego_model_error(m));
    }
    r.labels = NULL;
    lego_sample_options_init(&o);
    r.width = 12; /* not a multiple of 8 */
    ck_assert_int_eq(lego_sample(m, &r, &o, NULL), LEGO_ERR_SHAPE);
    r.width = 8;
    r.n = 0;
    ck_assert_int_eq(lego_sample(m, &r, &o, NULL), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_sample(NULL, &r, &o, NULL), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_sample(m, NULL, &o, NULL), LEGO_ERR_INVALID_ARGUMENT);
    double sig[3];
    ck_assert_int_eq(lego_karras_sigmas(0, 0.002, 80, 7, sig), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_karras_sigmas(2, 80, 0.002, 7, sig), LEGO_ERR_INVALID_ARGUMENT);
    lego_model_free(m);
}
END_TEST

int main(void) {
    discover_cases();
    Suite *s = suite_create("sample");
    TCase *golden = tcase_create("golden");
    tcase_set_timeout(golden, 600);
    if (num_cases == 0) {
        printf("test_sample: no golden cases under %s, skipping them\n", golden_dir());
    } else {
        tcase_add_loop_test(golden, test_golden_sigmas, 0, num_cases);
        tcase_add_loop_test(golden, test_golden_heun, 0, num_cases);
        tcase_add_loop_test(golden, test_golden_generate, 0, num_cases);
    }
    suite_add_tcase(s, golden);
    TCase *contract = tcase_create("contract");
    tcase_set_timeout(contract, 300);
    tcase_add_test(contract, test_batch_invariance);
    tcase_add_test(contract, test_progress_and_cancel);
    tcase_add_test(contract, test_skip_accounting);
    tcase_add_test(contract, test_step_loop_matches_sample);
    tcase_add_test(contract, test_sizes);
    tcase_add_test(contract, test_bad_requests);
    tcase_add_test(contract, test_solvers_reach_gaussian_endpoint);
    suite_add_tcase(s, contract);
    int status = run_suite(s);
    free_cases();
    return status;
}
