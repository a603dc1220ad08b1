/*
 * test_golden.c -- liblego against the reference PyTorch implementation.
 *
 * Every folder under $LEGO_GOLDEN_DIR (default ../shared/golden) holding a
 * model.safetensors is a case; nothing here names a case.  Each tensor a
 * case provides is checked within the tolerance of its case.json
 * (max|got-want| <= tol * max(1, max|want|)); tensors a case lacks are
 * skipped.
 */
#define _POSIX_C_SOURCE 200809L
#include <cjson/cJSON.h>
#include <dirent.h>

#define TESTUTIL_GOLDEN_CASES
#include "testutil.h"

typedef struct golden_case {
    const char *name;
    lego_model *model;
    st_file *io;
    double tol;
    int n, C, H, W, K, L;
    float *x, *sigma, *labels;
} golden_case;

static void open_case(golden_case *g, const char *dir) {
    char path[4096];
    g->name = strrchr(dir, '/') + 1;
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    lego_status s = lego_model_load(path, NULL, &g->model);
    ck_assert_msg(s == LEGO_OK, "%s: load failed: %s", g->name, lego_model_error(g->model));
    snprintf(path, sizeof path, "%s/io.safetensors", dir);
    lego_err err;
    ck_assert_msg(st_open(path, &g->io, &err) == LEGO_OK, "%s", err.msg);
    g->tol = case_tolerance(dir, "denoiser");
    const st_tensor *x = st_find(g->io, "x");
    ck_assert(x && x->rank == 4);
    g->n = (int)x->shape[0];
    g->C = (int)x->shape[1];
    g->H = (int)x->shape[2];
    g->W = (int)x->shape[3];
    g->K = lego_model_num_bricks(g->model);
    lego_model_config cfg;
    lego_model_config_init(&cfg);
    lego_model_get_config(g->model, &cfg);
    g->L = cfg.label_dim;
    g->x = tensor_f32(g->io, "x", NULL);
    g->sigma = tensor_f32(g->io, "sigma", NULL);
    g->labels = tensor_f32(g->io, "labels", NULL);
}

static void close_case(golden_case *g) {
    free(g->x);
    free(g->sigma);
    free(g->labels);
    st_close(g->io);
    lego_model_free(g->model);
}

/* Compare `got` with tensor `name` if the case has it, within the case's tolerance. */
static void expect(const golden_case *g, const char *name, const float *got, size_t numel) {
    expect_golden(g->io, g->name, name, got, numel, g->tol);
}

static void request_for(const golden_case *g, lego_denoise_request *r, const float *x, int h, int w,
                        float *out) {
    lego_denoise_request_init(r);
    r->n = g->n;
    r->height = h;
    r->width = w;
    r->x = x;
    r->sigma = g->sigma;
    r->label_vectors = g->L > 0 ? g->labels : NULL;
    r->out = out;
}

START_TEST(test_golden_denoiser) {
    golden_case g = {0};
    open_case(&g, case_dirs[_i]);
    size_t img = (size_t)g.n * g.C * g.H * g.W;
    lego_model_config cfg;
    lego_model_config_init(&cfg);
    lego_model_get_config(g.model, &cfg);
    float *out = malloc(img * sizeof *out);
    float *bricks = malloc((size_t)g.K * img * sizeof *bricks);
    float *cond = malloc((size_t)g.n * cfg.hidden_size * sizeof *cond);

    lego_denoise_request r;
    request_for(&g, &r, g.x, g.H, g.W, out);
    r.brick_outputs = bricks;
    r.cond = cond;
    ck_assert_msg(lego_denoise(g.model, &r) == LEGO_OK, "%s", lego_model_error(g.model));
    expect(&g, "cond", cond, (size_t)g.n * cfg.hidden_size);
    for (int k = 0; k < g.K; k++) {
        char name[32];
        snprintf(name, sizeof name, "brick.%d", k);
        expect(&g, name, bricks + (size_t)k * img, img);
    }
    expect(&g, "denoised", out, img);

    /* Skipping: only bricks 0..K-2. */
    if (g.K > 1) {
        request_for(&g, &r, g.x, g.H, g.W, out);
        r.num_bricks = g.K - 1;
        ck_assert(lego_denoise(g.model, &r) == LEGO_OK);
        expect(&g, "denoised.skip", out, img);
    }

    /* Classifier-free guidance. */
    if (g.L > 0) {
        request_for(&g, &r, g.x, g.H, g.W, out);
        r.guidance = 4.0f;
        ck_assert(lego_denoise(g.model, &r) == LEGO_OK);
        expect(&g, "denoised.cfg4", out, img);
    }

    /* Variable resolution. */
    const st_tensor *big = st_find(g.io, "x.big");
    if (big) {
        float *xb = tensor_f32(g.io, "x.big", NULL);
        size_t nb = big->numel;
        float *ob = malloc(nb * sizeof *ob);
        request_for(&g, &r, xb, (int)big->shape[2], (int)big->shape[3], ob);
        ck_assert_msg(lego_denoise(g.model, &r) == LEGO_OK, "%s", lego_model_error(g.model));
        expect(&g, "denoised.big", ob, nb);
        free(xb);
        free(ob);
    }
    free(out);
    free(bricks);
    free(cond);
    close_case(&g);
}
END_TEST

/* The position embeddings liblego computes equal the ones stored. */
START_TEST(test_golden_pos_embed) {
    golden_case g = {0};
    char path[4096];
    open_case(&g, case_dirs[_i]);
    snprintf(path, sizeof path, "%s/model.safetensors", case_dirs[_i]);
    lego_model_config cfg;
    lego_model_config_init(&cfg);
    lego_model_get_config(g.model, &cfg);
    lego_model *fresh = NULL;
    ck_assert(lego_model_create(&cfg, &fresh) == LEGO_OK);
    for (int k = 0; k < g.K; k++) {
        lego_brick_config b;
        lego_brick_config_init(&b);
        lego_model_get_brick(g.model, k, &b);
        ck_assert(lego_brick_add(fresh, &b) == LEGO_OK);
    }
    /* Save the fresh model and read its pos_embed back next to the file's. */
    char tmp[] = "/tmp/lego_pe_XXXXXX";
    int fd = mkstemp(tmp);
    ck_assert(fd >= 0);
    close(fd);
    ck_assert(lego_model_save(fresh, tmp) == LEGO_OK);
    st_file *a = NULL, *b = NULL;
    lego_err err;
    ck_assert(st_open(path, &a, &err) == LEGO_OK);
    ck_assert(st_open(tmp, &b, &err) == LEGO_OK);
    for (int k = 0; k < g.K; k++) {
        char name[64];
        size_t n1 = 0, n2 = 0;
        snprintf(name, sizeof name, "model.model.%d.pos_embed", k);
        float *want = tensor_f32(a, name, &n1), *got = tensor_f32(b, name, &n2);
        ck_assert(want && got && n1 == n2);
        double e = scaled_error(got, want, n1);
        ck_assert_msg(e < 1e-6, "%s %s: %g", g.name, name, e);
        free(want);
        free(got);
    }
    st_close(a);
    st_close(b);
    remove(tmp);
    lego_model_free(fresh);
    close_case(&g);
}
END_TEST

int main(void) {
    discover_cases();
    Suite *s = suite_create("golden");
    TCase *tc = tcase_create("denoiser");
    tcase_set_timeout(tc, 600);
    if (num_cases == 0) {
        printf("test_golden: no cases under %s, skipping\n", golden_dir());
    } else {
        for (int i = 0; i < num_cases; i++) printf("golden case: %s\n", case_dirs[i]);
        tcase_add_loop_test(tc, test_golden_denoiser, 0, num_cases);
        tcase_add_loop_test(tc, test_golden_pos_embed, 0, num_cases);
    }
    suite_add_tcase(s, tc);
    int status = run_suite(s);
    free_cases();
    return status;
}
