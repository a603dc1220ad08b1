/*
 * test_sample.c -- the samplers against the reference (golden cases under
 * $LEGO_GOLDEN_DIR, discovered) and the sampling contract: batch
 * invariance, skip accounting, cancellation, progress, bad requests.
 */
#define _POSIX_C_SOURCE 200809L
#include <cjson/cJSON.h>
#include <dirent.h>

#include "rng.h"
#include "testutil.h"

#define MAX_CASES 256
static char *case_dirs[MAX_CASES];
static int num_cases;

static int compare_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void discover_cases(void) {
    DIR *d = opendir(golden_dir());
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d)) && num_cases < MAX_CASES) {
        char path[4096];
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "%s/%s/model.safetensors", golden_dir(), e->d_name);
        if (!path_exists(path)) continue;
        snprintf(path, sizeof path, "%s/%s", golden_dir(), e->d_name);
        case_dirs[num_cases++] = strdup(path);
    }
    closedir(d);
    qsort(case_dirs, (size_t)num_cases, sizeof *case_dirs, compare_names);
}

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
    static char buf[1 << 20];
    memset(c, 0, sizeof *c);
    c->name = strrchr(dir, '/') + 1;
    snprintf(path, sizeof path, "%s/case.json", dir);
    FILE *fp = fopen(path, "rb");
    ck_assert(fp);
    size_t len = fread(buf, 1, sizeof buf - 1, fp);
    fclose(fp);
    buf[len] = 0;
    cJSON *root = cJSON_Parse(buf);
    ck_assert(root);
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
    size_t n = 0;
    float *want = tensor_f32(c->io, name, &n);
    if (!want) {
        printf("golden %-12s %-18s (not in this case)\n", c->name, name);
        return;
    }
    ck_assert_msg(n == numel, "%s %s: size %zu, expected %zu", c->name, name, numel, n);
    double err = scaled_error(got, want, n);
    printf("golden %-12s %-18s scaled error %.2e (tolerance %.0e)\n", c->name, name, err, c->tol);
    free(want);
    ck_assert_msg(err <= c->tol, "%s %s: scaled error %g exceeds %g", c->name, name, err, c->tol);
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
    int status = run_suite(s);
    for (int i = 0; i < num_cases; i++) free(case_dirs[i]);
    return status;
}
