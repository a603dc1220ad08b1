/*
 * test_train.c -- the training loss, its gradients and the trainer.
 *
 *   golden     every case under $LEGO_GOLDEN_DIR with train.* tensors:
 *              train.loss and every grad.* tensor against the reference
 *              (max|got-want| <= tol * max(1, max|want|)); skipped cleanly
 *              when the folder is absent
 *   gradcheck  central finite differences on a tiny random model whose
 *              adaLN and final layers are not zero, a few values of every
 *              trainable tensor
 *   api        tensor info, get/set params, lego_train_loss equals the
 *              internal loss; every bad input
 *   trainer    an Adam(W) step against a hand computation; warm-up,
 *              clipping, non-finite gradients; save/resume bit-exactness;
 *              export_ema loads; label dropout and flips; the loss of a
 *              tiny model goes down on a fixed batch
 *
 * Tiny models (hidden 16, 8x8 images) keep it fast under valgrind.
 */
#define _POSIX_C_SOURCE 200809L
#define TESTUTIL_GOLDEN_CASES
#include "testutil.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <stdint.h>

#include "model.h"
#include "train.h"

/* ------------------------------------------------------------------------ */
/* helpers                                                                  */
/* ------------------------------------------------------------------------ */

static char *temp_path(const char *tag) {
    char *p = malloc(64);
    ck_assert(p);
    snprintf(p, 64, "/tmp/lego_train_%s_XXXXXX", tag);
    int fd = mkstemp(p);
    ck_assert(fd >= 0);
    close(fd);
    return p;
}

/* The tiny test model: C = 2, 3 classes, D = 16, 2 heads, MLP 32, two
 * bricks (4/2 depth 1 and 8/4 depth 2) so that brick 1 reads F_0 and has
 * patches of a different size; 8x8 images. */
#define TINY_C 2
#define TINY_L 3
#define TINY_HW 8
static const int TINY_PG[2][3] = {{4, 2, 1}, {8, 4, 2}};
/* Progressive refinement: an image brick, then patch bricks with 4 and 16
 * patches per image, so that a sampled brick reads a sampled one. */
static const int TINY_PR[3][3] = {{8, 4, 1}, {4, 2, 1}, {2, 1, 1}};

static lego_model *tiny_model_of(int label_dim, uint64_t seed, double jitter, int num_bricks,
                                 const int (*bricks)[3]) {
    lego_model_config c;
    lego_model_config_init(&c);
    c.img_channels = TINY_C;
    c.img_resolution = TINY_HW;
    c.label_dim = label_dim;
    c.hidden_size = 16;
    c.num_heads = 2;
    c.mlp_ratio = 2.0;
    c.frequency_embedding_size = 16;
    c.num_threads = 2;
    lego_model *m = model_with_bricks(&c, bricks, num_bricks);
    ck_assert(lego_model_init_weights(m, seed) == LEGO_OK);
    /* The reference init zeroes adaLN and final layers, which would hide
     * most gradients: jitter every trainable value. */
    rng_seed(seed);
    for (int i = 0; i < m->num_params; i++) {
        const lego_param *p = &m->table[i];
        if (p->fixed) continue;
        for (size_t j = 0; j < p->numel; j++)
            m->params[p->offset + j] += (float)(jitter * nrand());
    }
    return m;
}

static lego_model *tiny_model(int label_dim, uint64_t seed, double jitter) {
    return tiny_model_of(label_dim, seed, jitter, 2, TINY_PG);
}

static size_t tiny_img(int n) { return (size_t)n * TINY_C * TINY_HW * TINY_HW; }

static int find_tensor(lego_model *m, const char *name) {
    for (int i = 0; i < lego_model_num_tensors(m); i++) {
        lego_tensor_info t;
        lego_tensor_info_init(&t);
        ck_assert(lego_model_tensor_info(m, i, &t) == LEGO_OK);
        if (!strcmp(t.name, name)) return i;
    }
    return -1;
}

/* ------------------------------------------------------------------------ */
/* golden                                                                   */
/* ------------------------------------------------------------------------ */

START_TEST(test_golden_train) {
    const char *dir = case_dirs[_i], *name = strrchr(dir, '/') + 1;
    char path[4096];
    snprintf(path, sizeof path, "%s/io.safetensors", dir);
    st_file *io = NULL;
    lego_err err;
    ck_assert_msg(st_open(path, &io, &err) == LEGO_OK, "%s", err.msg);
    const st_tensor *ty = st_find(io, "train.y");
    if (!ty) {
        printf("golden %-12s (no train.* tensors)\n", name);
        st_close(io);
        return;
    }
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    lego_model *m = NULL;
    ck_assert_msg(lego_model_load(path, NULL, &m) == LEGO_OK, "%s", lego_model_error(m));
    /* tolerance.denoiser: the gradients are held to it too. */
    double tol = case_tolerance(dir, "denoiser");
    ck_assert(ty->rank == 4);

    lego_train_batch b;
    lego_train_batch_init(&b);
    b.n = (int)ty->shape[0];
    b.height = (int)ty->shape[2];
    b.width = (int)ty->shape[3];
    float *y = tensor_f32(io, "train.y", NULL), *noise = tensor_f32(io, "train.noise", NULL);
    float *sigma = tensor_f32(io, "train.sigma", NULL);
    float *labels = tensor_f32(io, "train.labels", NULL); /* one-hot; absent = unconditional */
    float *want_loss = tensor_f32(io, "train.loss", NULL);
    ck_assert(y && noise && sigma && want_loss);
    b.y = y;
    b.noise = noise;
    b.sigma = sigma;
    b.label_vectors = labels;

    size_t np = (size_t)lego_model_num_params(m);
    float *grads = malloc(np * sizeof *grads), loss = 0;
    ck_assert(grads);
    ck_assert_msg(lego_train_loss(m, &b, &loss, grads) == LEGO_OK, "%s", lego_model_error(m));
    double e = scaled_error(&loss, want_loss, 1);
    printf("golden %-12s train.loss %.6g (want %.6g) scaled error %.2e (tolerance %.0e)\n", name,
           (double)loss, (double)want_loss[0], e, tol);
    ck_assert_msg(e <= tol, "%s train.loss: %g vs %g", name, (double)loss, (double)want_loss[0]);

    /* Every grad.* tensor, and every trainable tensor must have one. */
    int checked = 0, trainable = 0;
    double worst = 0;
    for (int i = 0; i < io->num_tensors; i++) {
        const char *tn = io->tensors[i].name;
        if (strncmp(tn, "grad.", 5) != 0) continue;
        int idx = find_tensor(m, tn + 5);
        ck_assert_msg(idx >= 0, "%s: %s names no parameter", name, tn);
        lego_tensor_info info;
        lego_tensor_info_init(&info);
        lego_model_tensor_info(m, idx, &info);
        size_t n = 0;
        float *want = tensor_f32(io, tn, &n);
        ck_assert_msg(n == (size_t)info.numel, "%s %s: %zu values, expected %lld", name, tn, n,
                      (long long)info.numel);
        double err_t = scaled_error(grads + info.offset, want, n);
        printf("golden %-12s %-60s scaled error %.2e\n", name, tn, err_t);
        if (err_t > worst || isnan(err_t)) worst = err_t;
        ck_assert_msg(err_t <= tol, "%s %s: scaled error %g exceeds %g", name, tn, err_t, tol);
        free(want);
        checked++;
    }
    for (int i = 0; i < lego_model_num_tensors(m); i++) {
        lego_tensor_info info;
        lego_tensor_info_init(&info);
        lego_model_tensor_info(m, i, &info);
        if (!info.trainable) {
            for (int64_t j = 0; j < info.numel; j++) ck_assert(grads[info.offset + j] == 0.0f);
            continue;
        }
        trainable++;
        char gname[160];
        snprintf(gname, sizeof gname, "grad.%s", info.name);
        ck_assert_msg(st_find(io, gname) != NULL, "%s: no %s in the case", name, gname);
    }
    printf("golden %-12s %d gradient tensors checked (of %d trainable), worst %.2e\n", name,
           checked, trainable, worst);
    ck_assert_int_eq(checked, trainable);

    free(y);
    free(noise);
    free(sigma);
    free(labels);
    free(want_loss);
    free(grads);
    lego_model_free(m);
    st_close(io);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* gradcheck                                                                */
/* ------------------------------------------------------------------------ */

/* A fixed batch for the tiny model: n images, labels (one null), sigmas
 * spread over the training range. */
typedef struct tiny_batch {
    int n;
    float *y, *noise, *sigma, *vectors;
    int32_t labels[8];
} tiny_batch;

static tiny_batch make_batch(int n, int label_dim, uint64_t seed) {
    tiny_batch b = {0};
    ck_assert(n <= 8);
    rng_seed(seed);
    b.n = n;
    b.y = rand_floats(tiny_img(n), -1, 1);
    b.noise = normal_floats(tiny_img(n));
    b.sigma = malloc((size_t)n * sizeof *b.sigma);
    b.vectors = calloc((size_t)n * (label_dim ? label_dim : 1), sizeof *b.vectors);
    ck_assert(b.sigma && b.vectors);
    const float sig[8] = {0.3f, 1.7f, 0.05f, 6.0f, 0.8f, 2.5f, 0.15f, 12.0f};
    for (int i = 0; i < n; i++) {
        b.sigma[i] = sig[i];
        b.labels[i] = label_dim ? (i == 1 ? -1 : i % label_dim) : -1;
        if (b.labels[i] >= 0) b.vectors[(size_t)i * label_dim + b.labels[i]] = 1.0f;
    }
    return b;
}

static void free_batch(tiny_batch *b) {
    free(b->y);
    free(b->noise);
    free(b->sigma);
    free(b->vectors);
}

/* Loss in double (and gradient) through the internal entry point. */
static double internal_loss(lego_model *m, net_cache *c, const tiny_batch *b, float *scratch,
                            float *grads) {
    double loss;
    train_loss_grads(m, c, b->y, b->noise, b->sigma, m->cfg.label_dim ? b->vectors : NULL, scratch,
                     &loss, grads);
    return loss;
}

/* Variants: 0 conditional, 1 unconditional, both joint; 2 conditional PG
 * and 3 unconditional PR, both training half of every brick's patches. */
START_TEST(test_gradcheck) {
    int label_dim = _i % 2 == 0 ? TINY_L : 0, sampled = _i >= 2;
    lego_model *m = _i == 3 ? tiny_model_of(label_dim, 21 + (uint64_t)_i, 0.15, 3, TINY_PR)
                            : tiny_model(label_dim, 21 + (uint64_t)_i, 0.15);
    tiny_batch b = make_batch(4, label_dim, 5);
    net_cache *c = NULL;
    lego_err err;
    ck_assert(net_cache_create(m, b.n, TINY_HW, TINY_HW, &c, &err) == LEGO_OK);
    if (sampled) {
        net_sample_patches(m, c, 0.5, 77, 3);
        ck_assert(net_sampling_patches(m, c));
    }
    const char *variant = _i == 0 ? "cond  " : _i == 1 ? "uncond" : _i == 2 ? "pg-0.5" : "pr-0.5";
    float *scratch = malloc(train_scratch_floats(m, b.n, TINY_HW, TINY_HW) * sizeof *scratch);
    float *grads = malloc(m->params_size * sizeof *grads);
    ck_assert(scratch && grads);
    double loss = internal_loss(m, c, &b, scratch, grads);
    ck_assert(isfinite(loss) && loss > 0);

    /* Central differences on the argmax of |g| and two random values of
     * every trainable tensor.  The float32 forward limits the accuracy of
     * the difference quotient, hence the mixed tolerance. */
    double worst = 0;
    int checked = 0;
    for (int t = 0; t < m->num_params; t++) {
        const lego_param *p = &m->table[t];
        if (p->fixed) continue;
        size_t idx[3] = {0, (size_t)urand(0, (double)p->numel), (size_t)urand(0, (double)p->numel)};
        for (size_t j = 0; j < p->numel; j++)
            if (fabsf(grads[p->offset + j]) > fabsf(grads[p->offset + idx[0]])) idx[0] = j;
        double tensor_worst = 0;
        for (int q = 0; q < 3; q++) {
            float *v = m->params + p->offset + (idx[q] < p->numel ? idx[q] : 0);
            float orig = *v;
            float h = 1e-2f * (fabsf(orig) > 1 ? fabsf(orig) : 1.0f);
            *v = orig + h;
            double lp = internal_loss(m, c, &b, scratch, NULL);
            float up = *v;
            *v = orig - h;
            double lm = internal_loss(m, c, &b, scratch, NULL);
            float down = *v;
            *v = orig;
            double fd = (lp - lm) / ((double)up - down);
            double an = grads[v - m->params];
            double e = fabs(fd - an) / (fabs(an) + fabs(fd) + 1e-3 * loss);
            if (e > tensor_worst) tensor_worst = e;
            ck_assert_msg(e < 2e-2, "%s[%td]: finite difference %.6g, analytic %.6g (loss %g)",
                          p->name, (ptrdiff_t)(v - m->params - p->offset), fd, an, loss);
            checked++;
        }
        printf("gradcheck %s %-48s worst relative error %.1e\n", variant, p->name, tensor_worst);
        if (tensor_worst > worst) worst = tensor_worst;
    }
    printf("gradcheck %s: %d values, worst %.1e, loss %.4f\n", variant, checked, worst, loss);
    free(scratch);
    free(grads);
    net_cache_free(c);
    free_batch(&b);
    lego_model_free(m);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* api                                                                      */
/* ------------------------------------------------------------------------ */

START_TEST(test_tensor_info) {
    lego_model *m = tiny_model(TINY_L, 1, 0);
    int nt = lego_model_num_tensors(m);
    ck_assert_int_eq(nt, m->num_params);
    int64_t next = 0;
    for (int i = 0; i < nt; i++) {
        lego_tensor_info t;
        lego_tensor_info_init(&t);
        ck_assert(lego_model_tensor_info(m, i, &t) == LEGO_OK);
        ck_assert_str_eq(t.name, m->table[i].name);
        ck_assert_int_eq(t.offset, next);
        int64_t numel = 1;
        for (int d = 0; d < t.rank; d++) numel *= t.shape[d];
        ck_assert_int_eq(numel, t.numel);
        ck_assert_int_eq(t.trainable, strstr(t.name, "pos_embed") == NULL);
        next += t.numel;
    }
    ck_assert_int_eq(next, lego_model_num_params(m));
    /* An older caller's smaller struct is filled only as far as it goes. */
    struct { size_t size; const char *name; } old = {sizeof old, NULL};
    ck_assert(lego_model_tensor_info(m, 0, (lego_tensor_info *)&old) == LEGO_OK);
    ck_assert_str_eq(old.name, "model.t_embedder.mlp.0.weight");

    lego_tensor_info t;
    lego_tensor_info_init(&t);
    ck_assert(lego_model_tensor_info(m, -1, &t) == LEGO_ERR_INVALID_ARGUMENT);
    ck_assert(lego_model_tensor_info(m, nt, &t) == LEGO_ERR_INVALID_ARGUMENT);
    ck_assert(strlen(lego_model_error(m)) > 0);
    ck_assert(lego_model_tensor_info(m, 0, NULL) == LEGO_ERR_INVALID_ARGUMENT);
    ck_assert(lego_model_tensor_info(NULL, 0, &t) == LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_model_num_tensors(NULL), 0);

    /* get/set round trip */
    int64_t np = lego_model_num_params(m);
    float *a = malloc((size_t)np * sizeof *a);
    ck_assert(a);
    ck_assert(lego_model_get_params(m, a, np) == LEGO_OK);
    ck_assert(memcmp(a, m->params, (size_t)np * sizeof *a) == 0);
    a[5] += 1.0f;
    uint64_t gen = m->weights_gen;
    ck_assert(lego_model_set_params(m, a, np) == LEGO_OK);
    ck_assert(m->params[5] == a[5]);
    ck_assert(m->weights_gen != gen); /* a device copy would be refreshed */
    ck_assert(lego_model_get_params(m, a, np - 1) == LEGO_ERR_SHAPE);
    ck_assert(lego_model_set_params(m, a, np + 1) == LEGO_ERR_SHAPE);
    ck_assert(lego_model_get_params(m, NULL, np) == LEGO_ERR_INVALID_ARGUMENT);
    ck_assert(lego_model_set_params(NULL, a, np) == LEGO_ERR_INVALID_ARGUMENT);
    free(a);
    lego_model_free(m);
}
END_TEST

/* lego_train_loss agrees with the internal loss, with lego_denoise (the
 * last brick's D), and labels as indices equal labels as vectors. */
START_TEST(test_train_loss_api) {
    lego_model *m = tiny_model(TINY_L, 2, 0.1);
    tiny_batch tb = make_batch(3, TINY_L, 9);
    size_t np = m->params_size;
    float *g1 = malloc(np * sizeof *g1), *g2 = malloc(np * sizeof *g2);
    ck_assert(g1 && g2);

    lego_train_batch b;
    lego_train_batch_init(&b);
    b.n = tb.n;
    b.height = b.width = TINY_HW;
    b.y = tb.y;
    b.noise = tb.noise;
    b.sigma = tb.sigma;
    b.label_vectors = tb.vectors;
    float l1 = 0, l2 = 0, l3 = 0;
    ck_assert_msg(lego_train_loss(m, &b, &l1, g1) == LEGO_OK, "%s", lego_model_error(m));
    b.label_vectors = NULL;
    b.labels = tb.labels;
    ck_assert(lego_train_loss(m, &b, &l2, g2) == LEGO_OK);
    ck_assert(l1 == l2);
    ck_assert(memcmp(g1, g2, np * sizeof *g1) == 0);
    ck_assert(lego_train_loss(m, &b, &l3, NULL) == LEGO_OK);
    ck_assert(l3 == l1);

    net_cache *c = NULL;
    lego_err err;
    ck_assert(net_cache_create(m, tb.n, TINY_HW, TINY_HW, &c, &err) == LEGO_OK);
    float *scratch = malloc(train_scratch_floats(m, tb.n, TINY_HW, TINY_HW) * sizeof *scratch);
    double l4 = internal_loss(m, c, &tb, scratch, g2);
    ck_assert(fabs(l4 - l1) <= 1e-6 * fabs(l4));
    ck_assert(memcmp(g1, g2, np * sizeof *g1) == 0);

    /* The cached forward equals lego_denoise's brick outputs. */
    size_t img = tiny_img(tb.n);
    float *x = malloc(img * sizeof *x), *out = malloc(img * sizeof *out);
    float *bricks = malloc(2 * img * sizeof *bricks);
    ck_assert(x && out && bricks);
    for (int i = 0; i < tb.n; i++)
        for (size_t j = 0; j < img / (size_t)tb.n; j++) {
            size_t e = (size_t)i * (img / (size_t)tb.n) + j;
            x[e] = tb.y[e] + tb.sigma[i] * tb.noise[e];
        }
    lego_denoise_request r;
    lego_denoise_request_init(&r);
    r.n = tb.n;
    r.height = r.width = TINY_HW;
    r.x = x;
    r.sigma = tb.sigma;
    r.labels = tb.labels;
    r.out = out;
    r.brick_outputs = bricks;
    ck_assert(lego_denoise(m, &r) == LEGO_OK);
    for (int k = 0; k < 2; k++) {
        double e = scaled_error(c->bricks[k].out, bricks + (size_t)k * img, img);
        ck_assert_msg(e < 1e-5, "brick %d: forward differs from lego_denoise by %g", k, e);
    }
    free(x);
    free(out);
    free(bricks);
    free(scratch);
    net_cache_free(c);
    free(g1);
    free(g2);
    free_batch(&tb);
    lego_model_free(m);
}
END_TEST

START_TEST(test_train_loss_bad) {
    lego_model *m = tiny_model(TINY_L, 3, 0);
    tiny_batch tb = make_batch(2, TINY_L, 1);
    float loss = 0, *grads = malloc(m->params_size * sizeof *grads);
    ck_assert(grads);
    lego_train_batch b, ok;
    lego_train_batch_init(&ok);
    ok.n = 2;
    ok.height = ok.width = TINY_HW;
    ok.y = tb.y;
    ok.noise = tb.noise;
    ok.sigma = tb.sigma;
    ok.labels = tb.labels;
    ck_assert(lego_train_loss(m, &ok, &loss, grads) == LEGO_OK);

#define EXPECT_BAD(code, change)                                                       \
    do {                                                                               \
        b = ok;                                                                        \
        change;                                                                        \
        lego_status s_ = lego_train_loss(m, &b, &loss, grads);                         \
        ck_assert_msg(s_ == (code), "%s: got %d", #change, (int)s_);                   \
        ck_assert_msg(strlen(lego_model_error(m)) > 0, "%s: no message", #change);     \
    } while (0)
    float bad_sigma[2] = {1.0f, 0.0f}, neg_sigma[2] = {-1.0f, 1.0f}, nan_sigma[2] = {NAN, 1.0f};
    float inf_sigma[2] = {1.0f, INFINITY};
    int32_t high[2] = {0, TINY_L}, low[2] = {-2, 0};
    EXPECT_BAD(LEGO_ERR_INVALID_ARGUMENT, b.n = 0);
    EXPECT_BAD(LEGO_ERR_INVALID_ARGUMENT, b.n = -3);
    EXPECT_BAD(LEGO_ERR_INVALID_ARGUMENT, b.y = NULL);
    EXPECT_BAD(LEGO_ERR_INVALID_ARGUMENT, b.noise = NULL);
    EXPECT_BAD(LEGO_ERR_INVALID_ARGUMENT, b.sigma = NULL);
    EXPECT_BAD(LEGO_ERR_INVALID_ARGUMENT, b.sigma = bad_sigma);
    EXPECT_BAD(LEGO_ERR_INVALID_ARGUMENT, b.sigma = neg_sigma);
    EXPECT_BAD(LEGO_ERR_INVALID_ARGUMENT, b.sigma = nan_sigma);
    EXPECT_BAD(LEGO_ERR_INVALID_ARGUMENT, b.sigma = inf_sigma);
    EXPECT_BAD(LEGO_ERR_INVALID_ARGUMENT, b.labels = high);
    EXPECT_BAD(LEGO_ERR_INVALID_ARGUMENT, b.labels = low);
    EXPECT_BAD(LEGO_ERR_INVALID_ARGUMENT, b.label_vectors = tb.vectors);
    EXPECT_BAD(LEGO_ERR_SHAPE, b.height = 6);
    EXPECT_BAD(LEGO_ERR_SHAPE, b.width = 0);
    float saved = tb.y[7];
    tb.y[7] = NAN;
    EXPECT_BAD(LEGO_ERR_INVALID_ARGUMENT, (void)0);
    tb.y[7] = saved;
    tb.noise[3] = INFINITY;
    EXPECT_BAD(LEGO_ERR_INVALID_ARGUMENT, (void)0);
#undef EXPECT_BAD
    ck_assert(lego_train_loss(m, NULL, &loss, grads) == LEGO_ERR_INVALID_ARGUMENT);
    ck_assert(lego_train_loss(m, &ok, NULL, grads) == LEGO_ERR_INVALID_ARGUMENT);
    ck_assert(lego_train_loss(NULL, &ok, &loss, grads) == LEGO_ERR_INVALID_ARGUMENT);

    /* A model without bricks, and a failed model. */
    lego_model_config cfg;
    lego_model_config_init(&cfg);
    cfg.hidden_size = 16;
    cfg.num_heads = 2;
    lego_model *empty = NULL;
    ck_assert(lego_model_create(&cfg, &empty) == LEGO_OK);
    ck_assert(lego_train_loss(empty, &ok, &loss, NULL) == LEGO_ERR_STATE);
    lego_model_free(empty);
    cfg.hidden_size = 15;
    lego_model *failed = NULL;
    ck_assert(lego_model_create(&cfg, &failed) != LEGO_OK);
    ck_assert(lego_train_loss(failed, &ok, &loss, NULL) == LEGO_ERR_STATE);
    lego_model_free(failed);
    free(grads);
    free_batch(&tb);
    lego_model_free(m);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* trainer                                                                  */
/* ------------------------------------------------------------------------ */

static lego_trainer *make_trainer(lego_model *m, const lego_train_options *o) {
    lego_trainer *t = NULL;
    lego_status s = lego_trainer_create(m, o, &t);
    ck_assert_msg(s == LEGO_OK, "trainer: %s", lego_trainer_error(t));
    return t;
}

/* One trainer step checked against Adam written out in double.  _i picks
 * the variant: 0 AdamW with weight decay and warm-up, 1 Adam with L2 weight
 * decay, 2 AdamW with gradient clipping. */
START_TEST(test_adam_hand) {
    lego_model *m = tiny_model(TINY_L, 4, 0.05);
    lego_train_options o;
    lego_train_options_init(&o);
    o.lr = 1e-2;
    o.beta1 = 0.8;
    o.beta2 = 0.95;
    o.eps = 1e-6;
    o.weight_decay = _i == 2 ? 0 : 0.1;
    o.warmup_steps = _i == 0 ? 4 : 0;
    o.optimizer = _i == 1 ? LEGO_OPTIMIZER_ADAM : LEGO_OPTIMIZER_ADAMW;
    if (_i == 2) {
        o.grad_clip = 1e-3;
        o.eps = 1e-2; /* so that the size of the gradient shows in the update */
    }
    o.ema_halflife_kimg = 0.001; /* one image: beta = 0.5^n */
    o.ema_rampup_ratio = 0;
    o.seed = 77;
    lego_trainer *t = make_trainer(m, &o);

    int n = 2;
    int32_t labels[2] = {1, -1};
    rng_seed(8);
    float *images = rand_floats(tiny_img(n), -1, 1);
    size_t nv = m->params_size, img = tiny_img(n);
    float *y = malloc(img * sizeof *y), *noise = malloc(img * sizeof *noise), sigma[2];
    float vectors[2 * TINY_L];
    float *g = malloc(nv * sizeof *g), *before = malloc(nv * sizeof *before);
    float *ema_before = malloc(nv * sizeof *ema_before);
    double *hm = calloc(nv, sizeof *hm), *hv = calloc(nv, sizeof *hv);
    net_cache *c = NULL;
    lego_err err;
    ck_assert(net_cache_create(m, n, TINY_HW, TINY_HW, &c, &err) == LEGO_OK);
    float *scratch = malloc(train_scratch_floats(m, n, TINY_HW, TINY_HW) * sizeof *scratch);
    ck_assert(y && noise && g && before && ema_before && hm && hv && scratch);

    for (int step = 0; step < 3; step++) {
        /* The batch and gradient the trainer is about to use. */
        trainer_draw_batch(t, images, labels, n, y, noise, sigma, vectors);
        double loss;
        train_loss_grads(m, c, y, noise, sigma, vectors, scratch, &loss, g);
        memcpy(before, m->params, nv * sizeof *before);
        memcpy(ema_before, t->ema, nv * sizeof *ema_before);

        lego_train_stats st;
        lego_train_stats_init(&st);
        uint64_t gen = m->weights_gen;
        ck_assert_msg(lego_trainer_step(t, images, labels, n, &st) == LEGO_OK, "%s",
                      lego_trainer_error(t));
        ck_assert(m->weights_gen != gen);
        double lr = o.lr * (o.warmup_steps ? fmin(1.0, (step + 1.0) / o.warmup_steps) : 1.0);
        ck_assert_int_eq(st.step, step + 1);
        ck_assert_int_eq(st.images_seen, (step + 1) * n);
        ck_assert(!st.skipped && st.skipped_total == 0);
        ck_assert(fabs(st.loss - loss) <= 1e-9 * fabs(loss));
        ck_assert(fabs(st.lr - lr) <= 1e-15);
        ck_assert(fabs(st.ema_beta - 0.25) < 1e-12);

        double sq = 0;
        for (int i = 0; i < m->num_params; i++)
            if (!m->table[i].fixed)
                for (size_t j = 0; j < m->table[i].numel; j++)
                    sq += (double)g[m->table[i].offset + j] * g[m->table[i].offset + j];
        double norm = sqrt(sq), gscale = 1;
        ck_assert(fabs(st.grad_norm - norm) <= 1e-9 * norm);
        if (o.grad_clip > 0) {
            ck_assert(norm > o.grad_clip);
            gscale = o.grad_clip / (norm + 1e-6);
        }
        double bc1 = 1 - pow(o.beta1, step + 1), bc2 = 1 - pow(o.beta2, step + 1), worst = 0;
        for (int i = 0; i < m->num_params; i++) {
            const lego_param *p = &m->table[i];
            for (size_t j = p->offset; j < p->offset + p->numel; j++) {
                double w = before[j];
                if (!p->fixed) {
                    double gj = (double)(float)(g[j] * (float)gscale);
                    if (o.optimizer == LEGO_OPTIMIZER_ADAM) gj += o.weight_decay * w;
                    else w *= 1 - lr * o.weight_decay;
                    hm[j] = o.beta1 * hm[j] + (1 - o.beta1) * gj;
                    hv[j] = o.beta2 * hv[j] + (1 - o.beta2) * gj * gj;
                    w -= lr * (hm[j] / bc1) / (sqrt(hv[j] / bc2) + o.eps);
                }
                double e = fabs(m->params[j] - w);
                if (e > worst) worst = e;
                ck_assert_msg(e <= 1e-6, "variant %d step %d %s: %.9g, by hand %.9g", _i, step,
                              p->name, (double)m->params[j], w);
                if (p->fixed) ck_assert(m->params[j] == before[j]);
                /* EMA with beta 0.25 towards the new weights. */
                double ema = m->params[j] + 0.25 * ((double)ema_before[j] - m->params[j]);
                ck_assert(fabs(t->ema[j] - ema) <= 1e-6);
            }
        }
        printf("adam variant %d step %d: lr %.4g, |g| %.4g, max |param - hand| %.2e\n", _i, step,
               lr, norm, worst);
    }
    free(images);
    free(y);
    free(noise);
    free(g);
    free(before);
    free(ema_before);
    free(hm);
    free(hv);
    free(scratch);
    net_cache_free(c);
    lego_trainer_free(t);
    lego_model_free(m);
}
END_TEST

/* A gradient that is not finite skips the update and is counted. */
START_TEST(test_nonfinite_skip) {
    lego_model *m = tiny_model(TINY_L, 5, 0.05);
    lego_trainer *t = make_trainer(m, NULL);
    rng_seed(3);
    float *images = rand_floats(tiny_img(2), -1, 1);
    size_t nv = m->params_size;
    /* Overflow in the time embedder poisons every gradient. */
    m->params[m->table[0].offset] = 3e38f;
    m->params[m->table[0].offset + 1] = 3e38f;
    float *before = malloc(nv * sizeof *before);
    ck_assert(before);
    memcpy(before, m->params, nv * sizeof *before);
    lego_train_stats st;
    lego_train_stats_init(&st);
    ck_assert(lego_trainer_step(t, images, NULL, 2, &st) == LEGO_OK);
    ck_assert_int_eq(st.skipped, 1);
    ck_assert_int_eq(st.skipped_total, 1);
    ck_assert_int_eq(st.step, 1);
    ck_assert_int_eq(t->adam_t, 0);
    ck_assert(memcmp(before, m->params, nv * sizeof *before) == 0);
    for (size_t j = 0; j < nv; j++) ck_assert(t->adam_m[j] == 0 && t->adam_v[j] == 0);
    /* Repaired weights train again. */
    m->params[m->table[0].offset] = 0;
    m->params[m->table[0].offset + 1] = 0;
    ck_assert(lego_trainer_step(t, images, NULL, 2, &st) == LEGO_OK);
    ck_assert_int_eq(st.skipped, 0);
    ck_assert_int_eq(st.skipped_total, 1);
    ck_assert_int_eq(t->adam_t, 1);
    free(before);
    free(images);
    lego_trainer_free(t);
    lego_model_free(m);
}
END_TEST

/* A state file with a damaged value (NaN, or a negative second moment) is
 * refused and the trainer keeps its state; counters at their limit make the
 * next step fail instead of overflowing; get_stats reports the counters
 * after a load and the last step after a step. */
START_TEST(test_state_damaged) {
    const int n = 2;
    int32_t labels[2] = {0, 1};
    rng_seed(5);
    float *images = rand_floats(tiny_img(n), -1, 1);
    char *path = temp_path("damaged");
    lego_model *ma = tiny_model(TINY_L, 3, 0.02), *mb = tiny_model(TINY_L, 4, 0.02);
    lego_trainer *ta = make_trainer(ma, NULL), *tb = make_trainer(mb, NULL);
    ck_assert(lego_trainer_step(ta, images, labels, n, NULL) == LEGO_OK);
    int k = find_tensor(ma, "model.model.0.blocks.0.attn.qkv.weight");
    size_t at = ma->table[k].offset + 5;
    const char *expect[3] = {"'adam_v.model.model.0.blocks.0.attn.qkv.weight' holds -0.5 at 5",
                             "'ema.model.model.0.blocks.0.attn.qkv.weight' holds nan at 5",
                             "'model.model.0.blocks.0.attn.qkv.weight' holds inf at 5"};
    float first = mb->params[at];
    for (int c = 0; c < 3; c++) {
        float keep[3] = {ta->adam_v[at], ta->ema[at], ma->params[at]};
        if (c == 0) ta->adam_v[at] = -0.5f;
        if (c == 1) ta->ema[at] = NAN;
        if (c == 2) ma->params[at] = INFINITY;
        ck_assert(lego_trainer_save_state(ta, path) == LEGO_OK);
        ck_assert(lego_trainer_load_state(tb, path) == LEGO_ERR_FORMAT);
        ck_assert_msg(strstr(lego_trainer_error(tb), expect[c]) != NULL, "%s",
                      lego_trainer_error(tb));
        ck_assert(mb->params[at] == first && tb->step == 0 && tb->adam_v[at] == 0);
        ta->adam_v[at] = keep[0];
        ta->ema[at] = keep[1];
        ma->params[at] = keep[2];
    }
    ck_assert(lego_trainer_save_state(ta, path) == LEGO_OK);
    ck_assert_msg(lego_trainer_load_state(tb, path) == LEGO_OK, "%s", lego_trainer_error(tb));
    ck_assert(tb->step == 1 && mb->params[at] == ma->params[at]);
    /* get_stats: counters from the file, no last step yet. */
    lego_train_stats st;
    lego_train_stats_init(&st);
    st.loss = 99;
    ck_assert(lego_trainer_get_stats(tb, &st) == LEGO_OK);
    ck_assert(st.step == 1 && st.images_seen == n && st.skipped_total == 0);
    ck_assert(st.loss == 0 && st.lr == 0 && st.grad_norm == 0 && !st.skipped);
    ck_assert(lego_trainer_get_stats(tb, NULL) == LEGO_ERR_INVALID_ARGUMENT);
    ck_assert(lego_trainer_get_stats(NULL, &st) == LEGO_ERR_INVALID_ARGUMENT);

    tb->step = INT64_MAX;
    ck_assert(lego_trainer_step(tb, images, labels, n, NULL) == LEGO_ERR_STATE);
    ck_assert(strstr(lego_trainer_error(tb), "overflow") != NULL);
    tb->step = 1;
    tb->images_seen = INT64_MAX - 1;
    ck_assert(lego_trainer_step(tb, images, labels, n, NULL) == LEGO_ERR_STATE);
    ck_assert(tb->step == 1 && mb->params[at] == ma->params[at]);
    tb->images_seen = INT64_MAX - n;
    lego_train_stats got;
    lego_train_stats_init(&got);
    ck_assert(lego_trainer_step(tb, images, labels, n, &got) == LEGO_OK);
    ck_assert(tb->step == 2 && tb->images_seen == INT64_MAX);
    /* get_stats repeats the last step's stats. */
    lego_train_stats_init(&st);
    ck_assert(lego_trainer_get_stats(tb, &st) == LEGO_OK);
    ck_assert(st.step == 2 && st.images_seen == INT64_MAX && st.loss == got.loss &&
              st.lr == got.lr && st.grad_norm == got.grad_norm && st.loss > 0);
    /* A caller's older, shorter struct gets only the fields it has. */
    struct { size_t size; int64_t step; } old_stats = {sizeof old_stats, -1};
    ck_assert(lego_trainer_get_stats(tb, (lego_train_stats *)&old_stats) == LEGO_OK);
    ck_assert(old_stats.size == sizeof old_stats && old_stats.step == 2);

    remove(path);
    free(path);
    free(images);
    lego_trainer_free(ta);
    lego_trainer_free(tb);
    lego_model_free(ma);
    lego_model_free(mb);
}
END_TEST

static lego_train_options resume_options(void) {
    lego_train_options o;
    lego_train_options_init(&o);
    o.lr = 2e-3;
    o.warmup_steps = 3;
    o.weight_decay = 0.01;
    o.grad_clip = 50;
    o.ema_halflife_kimg = 0.01;
    o.label_dropout = 0.3;
    o.hflip = 1;
    o.seed = 1234;
    return o;
}

/* N steps straight equal k steps, save, load into a fresh trainer on a
 * fresh model, N-k steps: bit for bit. */
START_TEST(test_resume_exact) {
    const int N = 6, k = 3, n = 3;
    int32_t labels[3] = {0, 2, -1};
    rng_seed(12);
    float *images = rand_floats(tiny_img(n), -1, 1);
    lego_train_options o = resume_options();
    o.patch_fraction = _i ? 0.5 : 0; /* 1: patch-sampled training */
    char *path = temp_path("state");

    lego_model *ma = tiny_model(TINY_L, 9, 0.02);
    lego_trainer *ta = make_trainer(ma, &o);
    double loss_a[6];
    for (int s = 0; s < N; s++) {
        lego_train_stats st;
        lego_train_stats_init(&st);
        ck_assert(lego_trainer_step(ta, images, labels, n, &st) == LEGO_OK);
        loss_a[s] = st.loss;
    }

    lego_model *mb = tiny_model(TINY_L, 9, 0.02);
    lego_trainer *tb = make_trainer(mb, &o);
    for (int s = 0; s < k; s++) ck_assert(lego_trainer_step(tb, images, labels, n, NULL) == LEGO_OK);
    ck_assert_msg(lego_trainer_save_state(tb, path) == LEGO_OK, "%s", lego_trainer_error(tb));
    lego_trainer_free(tb);
    lego_model_free(mb);

    /* Different weights and seed: the state file restores both. */
    lego_model *mc = tiny_model(TINY_L, 99, 0.5);
    lego_train_options oc = o;
    oc.seed = 999;
    lego_trainer *tc = make_trainer(mc, &oc);
    uint64_t gen = mc->weights_gen;
    ck_assert_msg(lego_trainer_load_state(tc, path) == LEGO_OK, "%s", lego_trainer_error(tc));
    ck_assert(mc->weights_gen != gen);
    ck_assert_int_eq(tc->step, k);
    ck_assert(tc->seed == o.seed);
    for (int s = k; s < N; s++) {
        lego_train_stats st;
        lego_train_stats_init(&st);
        ck_assert(lego_trainer_step(tc, images, labels, n, &st) == LEGO_OK);
        ck_assert_msg(st.loss == loss_a[s], "step %d: loss %.17g vs %.17g", s, st.loss, loss_a[s]);
        ck_assert_int_eq(st.step, s + 1);
    }
    size_t bytes = ma->params_size * sizeof(float);
    ck_assert(memcmp(ma->params, mc->params, bytes) == 0);
    ck_assert(memcmp(ta->ema, tc->ema, bytes) == 0);
    ck_assert(memcmp(ta->adam_m, tc->adam_m, bytes) == 0);
    ck_assert(memcmp(ta->adam_v, tc->adam_v, bytes) == 0);
    ck_assert(ta->step == tc->step && ta->adam_t == tc->adam_t &&
              ta->images_seen == tc->images_seen && ta->skipped == tc->skipped);
    printf("resume%s: %d steps straight == %d + %d resumed, bit for bit\n",
           _i ? " (patch-sampled)" : "", N, k, N - k);

    /* A trainer on another architecture refuses the file and keeps its
     * state. */
    lego_model *other = tiny_model(0, 9, 0.02);
    lego_trainer *to = make_trainer(other, &o);
    float first = other->params[0];
    ck_assert(lego_trainer_load_state(to, path) == LEGO_ERR_SHAPE);
    ck_assert(strstr(lego_trainer_error(to), "architecture") != NULL);
    ck_assert(other->params[0] == first && to->step == 0);
    ck_assert(lego_trainer_load_state(to, "/nonexistent/state.safetensors") == LEGO_ERR_IO);
    ck_assert(lego_trainer_load_state(to, NULL) == LEGO_ERR_INVALID_ARGUMENT);
    ck_assert(lego_trainer_save_state(to, NULL) == LEGO_ERR_INVALID_ARGUMENT);
    ck_assert(lego_trainer_save_state(to, "/nonexistent/dir/state") == LEGO_ERR_IO);
    /* A model checkpoint is not a trainer state. */
    ck_assert(lego_model_save(mc, path) == LEGO_OK);
    ck_assert(lego_trainer_load_state(tc, path) == LEGO_ERR_SHAPE);
    ck_assert(strstr(lego_trainer_error(tc), "ema.") != NULL);
    lego_trainer_free(to);
    lego_model_free(other);

    remove(path);
    free(path);
    free(images);
    lego_trainer_free(ta);
    lego_trainer_free(tc);
    lego_model_free(ma);
    lego_model_free(mc);
}
END_TEST

START_TEST(test_export_ema) {
    lego_model *m = tiny_model(TINY_L, 6, 0.02);
    lego_train_options o = resume_options();
    lego_trainer *t = make_trainer(m, &o);
    rng_seed(2);
    float *images = rand_floats(tiny_img(2), -1, 1);
    for (int s = 0; s < 3; s++) ck_assert(lego_trainer_step(t, images, NULL, 2, NULL) == LEGO_OK);
    char *path = temp_path("ema");
    ck_assert_msg(lego_trainer_export_ema(t, path) == LEGO_OK, "%s", lego_trainer_error(t));
    lego_model *e = NULL;
    ck_assert_msg(lego_model_load(path, NULL, &e) == LEGO_OK, "%s", lego_model_error(e));
    ck_assert_int_eq(lego_model_num_params(e), lego_model_num_params(m));
    ck_assert(memcmp(e->params, t->ema, m->params_size * sizeof(float)) == 0);
    /* The EMA differs from the raw weights after a few steps. */
    ck_assert(memcmp(e->params, m->params, m->params_size * sizeof(float)) != 0);
    float *out = malloc(tiny_img(2) * sizeof *out), sigma[2] = {1, 2};
    lego_denoise_request r;
    lego_denoise_request_init(&r);
    r.n = 2;
    r.height = r.width = TINY_HW;
    r.x = images;
    r.sigma = sigma;
    r.out = out;
    ck_assert(lego_denoise(e, &r) == LEGO_OK);
    ck_assert(lego_trainer_export_ema(t, NULL) == LEGO_ERR_INVALID_ARGUMENT);
    remove(path);
    free(path);
    free(out);
    free(images);
    lego_model_free(e);
    lego_trainer_free(t);
    lego_model_free(m);
}
END_TEST

/* Label dropout, flips and the sigma distribution of the drawn batches. */
START_TEST(test_draws) {
    lego_model *m = tiny_model(TINY_L, 7, 0.05); /* adaLN not zero: c gets gradients */
    lego_train_options o;
    lego_train_options_init(&o);
    o.hflip = 1;
    o.label_dropout = 0.5;
    o.seed = 3;
    lego_trainer *t = make_trainer(m, &o);
    enum { N = 64 };
    size_t chw = tiny_img(1);
    rng_seed(4);
    float *images = rand_floats(N * chw, -1, 1), *y = malloc(N * chw * sizeof *y);
    float *y2 = malloc(N * chw * sizeof *y2), *noise = malloc(N * chw * sizeof *noise);
    float sigma[N], vectors[N * TINY_L], v2[N * TINY_L], s2[N];
    int32_t labels[N];
    for (int i = 0; i < N; i++) labels[i] = i % TINY_L;
    ck_assert(y && y2 && noise);
    trainer_draw_batch(t, images, labels, N, y, noise, sigma, vectors);
    int flipped = 0, dropped = 0;
    double mean = 0, var = 0;
    for (int i = 0; i < N; i++) {
        const float *src = images + (size_t)i * chw, *dst = y + (size_t)i * chw;
        int same = memcmp(src, dst, chw * sizeof *src) == 0, mirror = 1;
        for (size_t row = 0; row < chw / TINY_HW; row++)
            for (int x = 0; x < TINY_HW; x++)
                mirror &= dst[row * TINY_HW + x] == src[row * TINY_HW + TINY_HW - 1 - x];
        ck_assert(same || mirror);
        flipped += !same;
        float s = 0;
        for (int l = 0; l < TINY_L; l++) s += vectors[i * TINY_L + l];
        if (s == 0) dropped++;
        else ck_assert(vectors[i * TINY_L + labels[i]] == 1.0f && s == 1.0f);
        mean += log(sigma[i]) / N;
    }
    for (int i = 0; i < N; i++) var += (log(sigma[i]) - mean) * (log(sigma[i]) - mean) / (N - 1);
    printf("draws: %d/%d flipped, %d/%d labels dropped, ln sigma mean %.3f std %.3f\n", flipped, N,
           dropped, N, mean, sqrt(var));
    ck_assert(flipped > 16 && flipped < 48);
    ck_assert(dropped > 16 && dropped < 48);
    ck_assert(fabs(mean + 1.2) < 0.5 && fabs(sqrt(var) - 1.2) < 0.4);
    /* Pure functions of (seed, step): the same again, another step differs. */
    trainer_draw_batch(t, images, labels, N, y2, noise, s2, v2);
    ck_assert(memcmp(y, y2, N * chw * sizeof *y) == 0 && memcmp(sigma, s2, sizeof s2) == 0);
    t->step = 1;
    trainer_draw_batch(t, images, labels, N, y2, noise, s2, v2);
    ck_assert(memcmp(sigma, s2, sizeof s2) != 0);
    t->step = 0;
    lego_trainer_free(t);

    /* Dropout 1: the label embedding weight gets no gradient, so Adam
     * leaves it alone while its bias (the null label) trains. */
    o.label_dropout = 1;
    o.hflip = 0;
    t = make_trainer(m, &o);
    const lego_param *w = &m->table[4], *b = &m->table[5];
    ck_assert_str_eq(w->name, "model.y_embedder.embedding_table.weight");
    float *w0 = malloc(w->numel * sizeof *w0), b0 = m->params[b->offset];
    memcpy(w0, m->params + w->offset, w->numel * sizeof *w0);
    ck_assert(lego_trainer_step(t, images, labels, 4, NULL) == LEGO_OK);
    ck_assert(memcmp(w0, m->params + w->offset, w->numel * sizeof *w0) == 0);
    ck_assert(m->params[b->offset] != b0);
    free(w0);
    free(images);
    free(y);
    free(y2);
    free(noise);
    lego_trainer_free(t);
    lego_model_free(m);
}
END_TEST

/* A tiny model with the reference initialisation learns a fixed batch. */
START_TEST(test_loss_decreases) {
    lego_model *m = tiny_model(0, 10, 0);
    int n = 4;
    size_t img = tiny_img(n), chw = tiny_img(1);
    float *images = malloc(img * sizeof *images);
    ck_assert(images);
    /* Smooth patterns, one per image. */
    for (int i = 0; i < n; i++)
        for (int c = 0; c < TINY_C; c++)
            for (int r = 0; r < TINY_HW; r++)
                for (int x = 0; x < TINY_HW; x++)
                    images[(size_t)i * chw + ((size_t)c * TINY_HW + r) * TINY_HW + x] =
                        (float)(0.8 * sin(0.7 * (i + 1) * x + 0.5 * r + c));
    /* Evaluate on fixed noise at fixed levels. */
    rng_seed(5);
    float *noise = normal_floats(img), sigma[4] = {0.2f, 0.6f, 1.5f, 4.0f}, before, after;
    lego_train_batch b;
    lego_train_batch_init(&b);
    b.n = n;
    b.height = b.width = TINY_HW;
    b.y = images;
    b.noise = noise;
    b.sigma = sigma;
    ck_assert(lego_train_loss(m, &b, &before, NULL) == LEGO_OK);

    lego_train_options o;
    lego_train_options_init(&o);
    o.lr = 3e-3;
    o.seed = 8;
    o.patch_fraction = _i ? 0.5 : 0; /* 1: patch-sampled training */
    lego_trainer *t = make_trainer(m, &o);
    double first = 0, last = 0;
    for (int s = 0; s < 50; s++) {
        lego_train_stats st;
        lego_train_stats_init(&st);
        ck_assert(lego_trainer_step(t, images, NULL, n, &st) == LEGO_OK);
        if (s < 10) first += st.loss / 10;
        if (s >= 40) last += st.loss / 10;
    }
    ck_assert(lego_train_loss(m, &b, &after, NULL) == LEGO_OK);
    printf("50 steps%s: fixed-batch loss %.4f -> %.4f; step losses %.4f (first 10) -> %.4f (last 10)\n",
           _i ? " (patch-sampled)" : "", (double)before, (double)after, first, last);
    /* From the reference init (zero adaLN and output layers) 50 steps take
     * off about a fifth; require a tenth. */
    ck_assert(after < 0.9 * before);
    ck_assert(last < 0.9 * first);
    free(images);
    free(noise);
    lego_trainer_free(t);
    lego_model_free(m);
}
END_TEST

START_TEST(test_trainer_bad) {
    lego_model *m = tiny_model(TINY_L, 11, 0);
    lego_trainer *t = NULL;
    lego_train_options o;

    ck_assert(lego_trainer_create(m, NULL, NULL) == LEGO_ERR_INVALID_ARGUMENT);
    ck_assert(lego_trainer_create(NULL, NULL, &t) == LEGO_ERR_INVALID_ARGUMENT);
    ck_assert(t && strlen(lego_trainer_error(t)) > 0);
    lego_trainer_free(t);

#define EXPECT_BAD_OPT(code, change)                                                   \
    do {                                                                               \
        lego_train_options_init(&o);                                                   \
        change;                                                                        \
        t = NULL;                                                                      \
        lego_status s_ = lego_trainer_create(m, &o, &t);                               \
        ck_assert_msg(s_ == (code), "%s: got %d", #change, (int)s_);                   \
        ck_assert_msg(t && strlen(lego_trainer_error(t)) > 0, "%s: no message", #change); \
        /* A failed trainer refuses everything but error and free. */                 \
        ck_assert(lego_trainer_step(t, NULL, NULL, 1, NULL) == LEGO_ERR_STATE);        \
        ck_assert(lego_trainer_save_state(t, "x") == LEGO_ERR_STATE);                  \
        lego_trainer_free(t);                                                          \
    } while (0)
    EXPECT_BAD_OPT(LEGO_ERR_INVALID_ARGUMENT, o.lr = 0);
    EXPECT_BAD_OPT(LEGO_ERR_INVALID_ARGUMENT, o.lr = NAN);
    EXPECT_BAD_OPT(LEGO_ERR_INVALID_ARGUMENT, o.beta1 = 1);
    EXPECT_BAD_OPT(LEGO_ERR_INVALID_ARGUMENT, o.beta2 = -0.1);
    EXPECT_BAD_OPT(LEGO_ERR_INVALID_ARGUMENT, o.eps = 0);
    EXPECT_BAD_OPT(LEGO_ERR_INVALID_ARGUMENT, o.weight_decay = -1);
    EXPECT_BAD_OPT(LEGO_ERR_INVALID_ARGUMENT, o.warmup_steps = -1);
    EXPECT_BAD_OPT(LEGO_ERR_INVALID_ARGUMENT, o.grad_clip = -1);
    EXPECT_BAD_OPT(LEGO_ERR_INVALID_ARGUMENT, o.ema_halflife_kimg = -1);
    EXPECT_BAD_OPT(LEGO_ERR_INVALID_ARGUMENT, o.p_std = -1);
    EXPECT_BAD_OPT(LEGO_ERR_INVALID_ARGUMENT, o.label_dropout = 1.5);
    EXPECT_BAD_OPT(LEGO_ERR_INVALID_ARGUMENT, o.hflip = 2);
    EXPECT_BAD_OPT(LEGO_ERR_INVALID_ARGUMENT, o.patch_fraction = -0.5);
    EXPECT_BAD_OPT(LEGO_ERR_INVALID_ARGUMENT, o.patch_fraction = 2);
    EXPECT_BAD_OPT(LEGO_ERR_INVALID_ARGUMENT, o.patch_fraction = NAN);
    EXPECT_BAD_OPT(LEGO_ERR_INVALID_ARGUMENT, o.optimizer = (lego_optimizer)7);
    EXPECT_BAD_OPT(LEGO_ERR_SHAPE, o.height = 6);
    EXPECT_BAD_OPT(LEGO_ERR_INVALID_ARGUMENT, o.width = -8);
#undef EXPECT_BAD_OPT

    lego_train_options_init(&o);
    t = make_trainer(m, &o);
    rng_seed(1);
    float *images = rand_floats(tiny_img(2), -1, 1);
    int32_t high[2] = {0, TINY_L}, low[2] = {-2, 1};
    ck_assert(lego_trainer_step(t, NULL, NULL, 2, NULL) == LEGO_ERR_INVALID_ARGUMENT);
    ck_assert(lego_trainer_step(t, images, NULL, 0, NULL) == LEGO_ERR_INVALID_ARGUMENT);
    ck_assert(lego_trainer_step(t, images, NULL, -1, NULL) == LEGO_ERR_INVALID_ARGUMENT);
    ck_assert(lego_trainer_step(t, images, high, 2, NULL) == LEGO_ERR_INVALID_ARGUMENT);
    ck_assert(lego_trainer_step(t, images, low, 2, NULL) == LEGO_ERR_INVALID_ARGUMENT);
    ck_assert(strstr(lego_trainer_error(t), "label") != NULL);
    images[3] = NAN;
    ck_assert(lego_trainer_step(t, images, NULL, 2, NULL) == LEGO_ERR_INVALID_ARGUMENT);
    images[3] = 0;
    ck_assert_int_eq(t->step, 0);
    /* Batch sizes may change from step to step. */
    ck_assert(lego_trainer_step(t, images, NULL, 2, NULL) == LEGO_OK);
    ck_assert(lego_trainer_step(t, images, NULL, 1, NULL) == LEGO_OK);
    ck_assert_int_eq(t->images_seen, 3);
    /* More threads than when the activations were sized. */
    ck_assert(lego_model_set_threads(m, 4) == LEGO_OK);
    ck_assert(lego_trainer_step(t, images, NULL, 1, NULL) == LEGO_OK);
    /* A model that grew a brick no longer fits the trainer. */
    lego_brick_config bc;
    lego_brick_config_init(&bc);
    bc.brick_size = 8;
    bc.patch_size = 2;
    ck_assert(lego_brick_add(m, &bc) == LEGO_OK);
    ck_assert(lego_trainer_step(t, images, NULL, 2, NULL) == LEGO_ERR_STATE);
    ck_assert(lego_trainer_export_ema(t, "x") == LEGO_ERR_STATE);
    ck_assert(strlen(lego_trainer_error(t)) > 0);
    lego_trainer_free(t);

    ck_assert(lego_trainer_step(NULL, images, NULL, 2, NULL) == LEGO_ERR_INVALID_ARGUMENT);
    ck_assert(lego_trainer_error(NULL) != NULL);
    lego_trainer_free(NULL);
    free(images);
    lego_model_free(m);
}
END_TEST


/* ------------------------------------------------------------------------ */
/* patches: patch-sampled training (eq. 12)                                 */
/* ------------------------------------------------------------------------ */

START_TEST(test_patch_draws) {
    ck_assert_int_eq(net_patches_kept(64, 0.5), 32);
    ck_assert_int_eq(net_patches_kept(4, 0.3), 2);
    ck_assert_int_eq(net_patches_kept(4, 0.25), 1);
    ck_assert_int_eq(net_patches_kept(3, 1.0 / 3), 1);
    ck_assert_int_eq(net_patches_kept(16, 1e-9), 1);
    ck_assert_int_eq(net_patches_kept(16, 1.0), 16);
    ck_assert_int_eq(net_patches_kept(1, 0.1), 1);

    lego_model *m = tiny_model_of(0, 3, 0, 3, TINY_PR);
    const int n = 5;
    net_cache *c = NULL, *d = NULL;
    lego_err err;
    ck_assert(net_cache_create(m, n, TINY_HW, TINY_HW, &c, &err) == LEGO_OK);
    ck_assert(net_cache_create(m, n, TINY_HW, TINY_HW, &d, &err) == LEGO_OK);
    ck_assert(!net_sampling_patches(m, c));
    net_sample_patches(m, c, 0.5, 11, 7);
    net_sample_patches(m, d, 0.5, 11, 7);
    /* The image brick runs whole; the others on half their patches, a
     * distinct ascending set per image, the same for the same stream. */
    ck_assert(c->bricks[0].patch_index == NULL && c->bricks[0].patches_used == 1);
    const int total[3] = {1, 4, 16};
    int seen[16] = {0};
    for (int k = 1; k < 3; k++) {
        const brick_acts *ba = &c->bricks[k];
        ck_assert_int_eq(ba->patches_total, total[k]);
        ck_assert_int_eq(ba->patches_used, total[k] / 2);
        ck_assert(ba->rows == (size_t)n * ba->patches_used * m->bricks[k].tokens);
        ck_assert(ba->patch_index != NULL);
        for (int i = 0; i < n; i++)
            for (int j = 0; j < ba->patches_used; j++) {
                int32_t v = ba->patch_index[i * ba->patches_used + j];
                ck_assert(v >= 0 && v < total[k]);
                if (j > 0) ck_assert(v > ba->patch_index[i * ba->patches_used + j - 1]);
                ck_assert(v == d->bricks[k].patch_index[i * ba->patches_used + j]);
                if (k == 2) seen[v]++;
            }
    }
    /* Over 40 draws on 5 images every one of the 16 patches comes up. */
    for (uint64_t stream = 8; stream < 48; stream++) {
        net_sample_patches(m, d, 0.5, 11, stream);
        for (int q = 0; q < n * 8; q++) seen[d->bricks[2].patch_index[q]]++;
    }
    for (int v = 0; v < 16; v++) ck_assert_msg(seen[v] > 0, "patch %d never drawn", v);
    net_use_all_patches(m, c);
    ck_assert(!net_sampling_patches(m, c));
    ck_assert(c->bricks[2].rows == (size_t)n * 16 * m->bricks[2].tokens);
    net_sample_patches(m, c, 1.0, 11, 7); /* keeps everything */
    ck_assert(!net_sampling_patches(m, c));
    net_cache_free(c);
    net_cache_free(d);
    lego_model_free(m);
}
END_TEST

/* A brick on a subset of its patches computes exactly what it computes on
 * all of them there, and leaves the fill elsewhere; the brick above sees
 * that fill as its context. */
START_TEST(test_patch_context) {
    lego_model *m = tiny_model(TINY_L, 31, 0.15);
    tiny_batch b = make_batch(3, TINY_L, 6);
    size_t img = tiny_img(b.n), chw = tiny_img(1);
    float *x = malloc(img * sizeof *x), *f0 = malloc(img * sizeof *f0), *f1 = malloc(img * sizeof *f1);
    ck_assert(x && f0 && f1);
    for (size_t j = 0; j < img; j++) x[j] = b.y[j] + b.sigma[j / chw] * b.noise[j];
    net_cache *c = NULL;
    lego_err err;
    ck_assert(net_cache_create(m, b.n, TINY_HW, TINY_HW, &c, &err) == LEGO_OK);
    net_forward(m, c, x, b.sigma, b.vectors, NULL);
    memcpy(f0, c->bricks[0].out, img * sizeof *f0);
    memcpy(f1, c->bricks[1].out, img * sizeof *f1);

    /* One of brick 0's four patches, filled with its own full output: the
     * image brick above must see what it saw before. */
    net_sample_patches(m, c, 0.25, 5, 1);
    ck_assert_int_eq(c->bricks[0].patches_used, 1);
    ck_assert(c->bricks[1].patch_index == NULL);
    net_forward(m, c, x, b.sigma, b.vectors, f0);
    double worst = 0;
    for (size_t j = 0; j < img; j++) {
        worst = fmax(worst, fabs((double)c->bricks[0].out[j] - f0[j]));
        worst = fmax(worst, fabs((double)c->bricks[1].out[j] - f1[j]));
    }
    ck_assert_msg(worst < 1e-5, "sampled pass differs from the full one by %g", worst);

    /* With a fill of zeros, brick 0's sampled patch still matches, the
     * other pixels are 0, and brick 1 (reading them) changes. */
    float *zero = calloc(img, sizeof *zero);
    ck_assert(zero);
    net_forward(m, c, x, b.sigma, b.vectors, zero);
    double moved = 0;
    for (int i = 0; i < b.n; i++) {
        int patch = c->bricks[0].patch_index[i], y0 = patch / 2 * 4, x0 = patch % 2 * 4;
        for (int ch = 0; ch < TINY_C; ch++)
            for (int r = 0; r < TINY_HW; r++)
                for (int q = 0; q < TINY_HW; q++) {
                    size_t j = (size_t)i * chw + ((size_t)ch * TINY_HW + r) * TINY_HW + q;
                    int inside = r >= y0 && r < y0 + 4 && q >= x0 && q < x0 + 4;
                    if (inside) ck_assert(fabs((double)c->bricks[0].out[j] - f0[j]) < 1e-5);
                    else ck_assert(c->bricks[0].out[j] == 0.0f);
                    moved = fmax(moved, fabs((double)c->bricks[1].out[j] - f1[j]));
                }
    }
    ck_assert(moved > 1e-3);

    /* The loss's own fill is the F that denoises to the clean image. */
    float *scratch = malloc(train_scratch_floats(m, b.n, TINY_HW, TINY_HW) * sizeof *scratch);
    ck_assert(scratch);
    double loss;
    train_loss_grads(m, c, b.y, b.noise, b.sigma, b.vectors, scratch, &loss, NULL);
    double sd = m->cfg.sigma_data;
    for (int i = 0; i < b.n; i++) {
        double s = b.sigma[i], c_skip = sd * sd / (s * s + sd * sd),
               c_out = s * sd / sqrt(s * s + sd * sd);
        int patch = c->bricks[0].patch_index[i], y0 = patch / 2 * 4, x0 = patch % 2 * 4;
        int r = y0 < 4 ? 6 : 1, q = x0 < 4 ? 6 : 1; /* a pixel outside the patch */
        size_t j = (size_t)i * chw + (size_t)r * TINY_HW + (size_t)q;
        double denoised = c_skip * x[j] + c_out * c->bricks[0].out[j];
        ck_assert_msg(fabs(denoised - b.y[j]) < 1e-4, "image %d: fill denoises to %g, not %g", i,
                      denoised, (double)b.y[j]);
    }
    free(scratch);
    free(zero);
    free(x);
    free(f0);
    free(f1);
    net_cache_free(c);
    free_batch(&b);
    lego_model_free(m);
}
END_TEST

/* With one brick, the sampled loss over one patch, averaged over the
 * patches, is the whole image's loss: the P/used scaling makes it an
 * unbiased estimate. */
START_TEST(test_patch_unbiased) {
    const int one[1][3] = {{4, 2, 1}};
    lego_model *m = tiny_model_of(0, 41, 0.15, 1, one);
    tiny_batch b = make_batch(1, 0, 8);
    net_cache *c = NULL;
    lego_err err;
    ck_assert(net_cache_create(m, 1, TINY_HW, TINY_HW, &c, &err) == LEGO_OK);
    float *scratch = malloc(train_scratch_floats(m, 1, TINY_HW, TINY_HW) * sizeof *scratch);
    ck_assert(scratch);
    double full = internal_loss(m, c, &b, scratch, NULL), per_patch[4] = {0};
    int found = 0;
    for (uint64_t stream = 0; stream < 200 && found < 4; stream++) {
        net_sample_patches(m, c, 0.25, 9, stream);
        int p = c->bricks[0].patch_index[0];
        if (per_patch[p] == 0) found++;
        per_patch[p] = internal_loss(m, c, &b, scratch, NULL);
    }
    ck_assert_int_eq(found, 4);
    double mean = (per_patch[0] + per_patch[1] + per_patch[2] + per_patch[3]) / 4;
    printf("patch sampling: full loss %.6f, mean over the 4 one-patch losses %.6f\n", full, mean);
    ck_assert(fabs(mean - full) < 1e-5 * full);
    ck_assert(per_patch[0] != per_patch[1]); /* each one covers its own pixels */
    free(scratch);
    net_cache_free(c);
    free_batch(&b);
    lego_model_free(m);
}
END_TEST

/* Through the API: fraction 0 and 1 are the joint loss; a fraction in
 * between depends on the patch seed only. */
START_TEST(test_patch_api) {
    lego_model *m = tiny_model_of(TINY_L, 51, 0.15, 3, TINY_PR);
    tiny_batch tb = make_batch(4, TINY_L, 9);
    lego_train_batch b;
    lego_train_batch_init(&b);
    b.n = tb.n;
    b.height = b.width = TINY_HW;
    b.y = tb.y;
    b.noise = tb.noise;
    b.sigma = tb.sigma;
    b.labels = tb.labels;
    float joint, one, half_a, half_b, other;
    ck_assert(lego_train_loss(m, &b, &joint, NULL) == LEGO_OK);
    b.patch_fraction = 1;
    ck_assert(lego_train_loss(m, &b, &one, NULL) == LEGO_OK);
    ck_assert(one == joint);
    b.patch_fraction = 0.5;
    b.patch_seed = 3;
    ck_assert(lego_train_loss(m, &b, &half_a, NULL) == LEGO_OK);
    ck_assert(lego_train_loss(m, &b, &half_b, NULL) == LEGO_OK);
    ck_assert(half_a == half_b && half_a != joint);
    b.patch_seed = 4;
    ck_assert(lego_train_loss(m, &b, &other, NULL) == LEGO_OK);
    ck_assert(other != half_a);
    printf("patch sampling: joint loss %.5f, half the patches %.5f / %.5f (two draws)\n",
           (double)joint, (double)half_a, (double)other);
    const double bad[3] = {-0.1, 1.5, NAN};
    for (int i = 0; i < 3; i++) {
        b.patch_fraction = bad[i];
        ck_assert(lego_train_loss(m, &b, &other, NULL) == LEGO_ERR_INVALID_ARGUMENT);
        ck_assert(strstr(lego_model_error(m), "patch_fraction") != NULL);
    }
    free_batch(&tb);
    lego_model_free(m);
}
END_TEST

int main(void) {
    discover_cases();
    Suite *s = suite_create("train");
    TCase *golden = tcase_create("golden");
    tcase_set_timeout(golden, 300);
    if (num_cases == 0) {
        printf("test_train: no golden cases under %s, skipping them\n", golden_dir());
    } else {
        tcase_add_loop_test(golden, test_golden_train, 0, num_cases);
    }
    suite_add_tcase(s, golden);

    TCase *grad = tcase_create("gradcheck");
    tcase_set_timeout(grad, 120);
    tcase_add_loop_test(grad, test_gradcheck, 0, 4);
    suite_add_tcase(s, grad);

    TCase *api = tcase_create("api");
    tcase_add_test(api, test_tensor_info);
    tcase_add_test(api, test_train_loss_api);
    tcase_add_test(api, test_train_loss_bad);
    suite_add_tcase(s, api);

    TCase *tr = tcase_create("trainer");
    tcase_set_timeout(tr, 120);
    tcase_add_loop_test(tr, test_adam_hand, 0, 3);
    tcase_add_test(tr, test_nonfinite_skip);
    tcase_add_loop_test(tr, test_resume_exact, 0, 2);
    tcase_add_test(tr, test_state_damaged);
    tcase_add_test(tr, test_export_ema);
    tcase_add_test(tr, test_draws);
    tcase_add_loop_test(tr, test_loss_decreases, 0, 2);
    tcase_add_test(tr, test_trainer_bad);
    suite_add_tcase(s, tr);

    TCase *patches = tcase_create("patches");
    tcase_set_timeout(patches, 120);
    tcase_add_test(patches, test_patch_draws);
    tcase_add_test(patches, test_patch_context);
    tcase_add_test(patches, test_patch_unbiased);
    tcase_add_test(patches, test_patch_api);
    suite_add_tcase(s, patches);
    int status = run_suite(s);
    free_cases();
    return status;
}
