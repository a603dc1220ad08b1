/*
 * test_rng.c -- the Philox generator against its published known answers
 * and its statelessness contract, and the PyTorch-compatible generator
 * against values recorded from PyTorch itself (../shared/golden).
 */
#include "testutil.h"

#include "rng.h"

/* ------------------------------------------------------------------------ */
/* Philox                                                                   */
/* ------------------------------------------------------------------------ */

/* Random123's kat_vectors for philox4x32_10. */
START_TEST(test_philox_kat) {
    static const struct {
        uint32_t ctr[4], key[2], want[4];
    } kat[] = {
        {{0, 0, 0, 0}, {0, 0},
         {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
        {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
         {0xffffffff, 0xffffffff},
         {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
        {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
         {0xa4093822, 0x299f31d0},
         {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
    };
    for (size_t i = 0; i < sizeof kat / sizeof kat[0]; i++) {
        uint32_t out[4];
        philox4x32_10(kat[i].ctr, kat[i].key, out);
        for (int j = 0; j < 4; j++)
            ck_assert_msg(out[j] == kat[i].want[j],
                          "vector %zu word %d: %08x, want %08x", i, j,
                          (unsigned)out[j], (unsigned)kat[i].want[j]);
    }
}
END_TEST

/* The documented formula, spelled out independently for block 0, so that a
 * change to the layout (what the CUDA twin copies) cannot pass unnoticed. */
START_TEST(test_philox_normal_formula) {
    const uint64_t seed = UINT64_C(0x0123456789abcdef), stream = 0x1122334455ULL;
    const uint32_t key[2] = {0x89abcdef, 0x01234567};
    const uint32_t ctr[4] = {5, 0, 0x22334455, 0x11};
    uint32_t w[4];
    double got[4];
    philox4x32_10(ctr, key, w);
    philox_normal_f64(seed, stream, 20, 4, got);
    for (int p = 0; p < 2; p++) {
        double r = sqrt(-2.0 * log(((double)w[2 * p] + 1.0) / 4294967296.0));
        double t = 2.0 * 3.14159265358979323846 *
                   (((double)w[2 * p + 1] + 1.0) / 4294967296.0);
        ck_assert(fabs(got[2 * p] - r * cos(t)) < 1e-15);
        ck_assert(fabs(got[2 * p + 1] - r * sin(t)) < 1e-15);
    }
    /* randint: the block of its own index, words 0 and 1 as a 64-bit value. */
    const uint32_t ctr2[4] = {7, 0, 0x22334455, 0x11};
    philox4x32_10(ctr2, key, w);
    uint64_t x = ((uint64_t)w[0] << 32) | w[1];
    ck_assert_int_eq(philox_randint(seed, stream, 7, 1000), (int64_t)(x % 1000));
}
END_TEST

/* Any slice [first, first+n) equals the same slice of a longer request, bit
 * for bit, aligned or not; f32 is the f64 value rounded once. */
START_TEST(test_philox_normal_slices) {
    enum { LEN = 64 };
    double all64[LEN], part64[LEN];
    float all32[LEN], part32[LEN];
    philox_normal_f64(42, 3, 0, LEN, all64);
    philox_normal_f32(42, 3, 0, LEN, all32);
    for (int i = 0; i < LEN; i++) {
        ck_assert(isfinite(all64[i]));
        ck_assert(all32[i] == (float)all64[i]);
    }
    for (size_t first = 0; first < 14; first++) {
        for (size_t n = 0; first + n <= LEN && n < 23; n++) {
            memset(part64, 0, sizeof part64);
            memset(part32, 0, sizeof part32);
            philox_normal_f64(42, 3, first, n, part64);
            philox_normal_f32(42, 3, first, n, part32);
            ck_assert(memcmp(part64, all64 + first, n * sizeof(double)) == 0);
            ck_assert(memcmp(part32, all32 + first, n * sizeof(float)) == 0);
        }
    }
    /* Deterministic, and seeds and streams give different numbers. */
    philox_normal_f64(42, 3, 0, LEN, part64);
    ck_assert(memcmp(part64, all64, sizeof all64) == 0);
    philox_normal_f64(43, 3, 0, LEN, part64);
    ck_assert(memcmp(part64, all64, sizeof all64) != 0);
    philox_normal_f64(42, 4, 0, LEN, part64);
    ck_assert(memcmp(part64, all64, sizeof all64) != 0);
    /* Indices past 2^32 blocks use the high counter word. */
    double hi[3], lo[3];
    philox_normal_f64(42, 3, (UINT64_C(1) << 34) + 2, 3, hi);
    philox_normal_f64(42, 3, 2, 3, lo);
    ck_assert(memcmp(hi, lo, sizeof hi) != 0);
}
END_TEST

START_TEST(test_philox_normal_stats) {
    enum { N = 1000000 };
    double *z = malloc(N * sizeof *z);
    ck_assert_ptr_nonnull(z);
    philox_normal_f64(7, 0, 0, N, z);
    double sum = 0, sum2 = 0, sum4 = 0;
    size_t beyond3 = 0;
    for (size_t i = 0; i < N; i++) {
        ck_assert(isfinite(z[i]));
        sum += z[i];
        sum2 += z[i] * z[i];
        sum4 += z[i] * z[i] * z[i] * z[i];
        if (fabs(z[i]) > 3) beyond3++;
    }
    double mean = sum / N, var = sum2 / N - mean * mean, kurt = sum4 / N;
    /* Standard errors: mean 1e-3, variance 1.4e-3, 4th moment 1e-2. */
    ck_assert_msg(fabs(mean) < 5e-3, "mean %g", mean);
    ck_assert_msg(fabs(var - 1) < 1e-2, "variance %g", var);
    ck_assert_msg(fabs(kurt - 3) < 0.1, "fourth moment %g", kurt);
    /* P(|z| > 3) = 0.0027. */
    ck_assert_msg(beyond3 > 2400 && beyond3 < 3000, "%zu beyond 3", beyond3);
    /* Each lane of the block is a normal too (no lane is special). */
    for (int lane = 0; lane < 4; lane++) {
        double s = 0, s2 = 0;
        for (size_t i = (size_t)lane; i < N; i += 4) {
            s += z[i];
            s2 += z[i] * z[i];
        }
        ck_assert_msg(fabs(s / (N / 4)) < 1e-2, "lane %d mean", lane);
        ck_assert_msg(fabs(s2 / (N / 4) - 1) < 2e-2, "lane %d var", lane);
    }
    free(z);
}
END_TEST

START_TEST(test_philox_randint) {
    enum { N = 100000, K = 10 };
    size_t count[K] = {0};
    for (uint64_t i = 0; i < N; i++) {
        int64_t v = philox_randint(5, 9, i, K);
        ck_assert(v >= 0 && v < K);
        ck_assert_int_eq(v, philox_randint(5, 9, i, K));
        count[v]++;
    }
    /* Expected 10000 each, standard deviation ~95. */
    for (int k = 0; k < K; k++)
        ck_assert_msg(count[k] > 9500 && count[k] < 10500, "class %d: %zu",
                      k, count[k]);
    ck_assert_int_eq(philox_randint(5, 9, 0, 1), 0);
    ck_assert_int_eq(philox_randint(5, 9, 0, 0), -1);
    ck_assert_int_eq(philox_randint(5, 9, 0, -3), -1);
    int64_t big = INT64_C(1) << 40;
    for (uint64_t i = 0; i < 100; i++) {
        int64_t v = philox_randint(5, 9, i, big);
        ck_assert(v >= 0 && v < big);
    }
}
END_TEST

/* ------------------------------------------------------------------------ */
/* PyTorch CPU generator                                                    */
/* ------------------------------------------------------------------------ */

/* The reference mt19937 (C++ std::mt19937, default seed 5489): first output
 * 3499211612, 10000th 4123659995. */
START_TEST(test_torch_mt19937) {
    lego_torch_gen g;
    torch_gen_seed(&g, 5489);
    ck_assert_uint_eq(torch_gen_random(&g), 3499211612u);
    for (int i = 1; i < 9999; i++) torch_gen_random(&g);
    ck_assert_uint_eq(torch_gen_random(&g), 4123659995u);
    /* random64: the first draw is the high word. */
    lego_torch_gen a, b;
    torch_gen_seed(&a, 7);
    torch_gen_seed(&b, 7);
    uint64_t hi = torch_gen_random(&a), lo = torch_gen_random(&a);
    ck_assert(torch_gen_random64(&b) == ((hi << 32) | lo));
}
END_TEST

/* The scalar path caches the second Box-Muller value: two one-element draws
 * equal one two-element draw; reseeding clears the cache. */
START_TEST(test_torch_normal_cache) {
    lego_torch_gen g;
    double two[2], one[2];
    torch_gen_seed(&g, 3);
    torch_randn_f64(&g, two, 2);
    torch_gen_seed(&g, 3);
    torch_randn_f64(&g, &one[0], 1);
    ck_assert(g.has_next_normal);
    torch_randn_f64(&g, &one[1], 1);
    ck_assert(memcmp(one, two, sizeof one) == 0);
    torch_gen_seed(&g, 3);
    torch_randn_f64(&g, &one[0], 1);
    torch_gen_seed(&g, 3);
    ck_assert(!g.has_next_normal);
    torch_randn_f64(&g, &one[1], 1);
    ck_assert(one[0] == one[1]);
    ck_assert_int_eq(torch_randint(&g, 0), -1);
    ck_assert_int_eq(torch_randint(&g, 1), 0);
    torch_randn_f32(&g, NULL, 0); /* nothing drawn, nothing written */
}
END_TEST

static double max_abs_diff(const double *a, const double *b, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs(a[i] - b[i]);
        if (!(d <= m)) m = d; /* NaN propagates as a failure */
    }
    return m;
}

/* Reproduce one golden tensor by its name (the names case.json documents);
 * returns 0 for a name this test does not know. */
static int torch_reproduce(const char *name, double *got, size_t numel) {
    unsigned long long seed;
    char kind[4];
    size_t n;
    int end = 0;
    lego_torch_gen g;

    /* randn.f32.seedS.nN, randn.f64.seedS.nN: a fresh generator each. */
    if (sscanf(name, "randn.%3[f0-9].seed%llu.n%zu%n", kind, &seed, &n,
               &end) == 3 && name[end] == '\0' && n == numel) {
        torch_gen_seed(&g, seed);
        if (strcmp(kind, "f32") == 0) {
            float *f = malloc(n * sizeof *f);
            if (!f) return 0;
            torch_randn_f32(&g, f, n);
            for (size_t i = 0; i < n; i++) got[i] = f[i];
            free(f);
            return 1;
        }
        if (strcmp(kind, "f64") == 0) {
            torch_randn_f64(&g, got, n);
            return 1;
        }
        return 0;
    }

    /* sequence.seedS.*: one generator: randn(192) f32, randint(10) scalar,
     * randn(192) f64. */
    if (sscanf(name, "sequence.seed%llu.%n", &seed, &end) == 1 && end > 0) {
        const char *part = name + end;
        float f[192];
        double d[192];
        int64_t label;
        torch_gen_seed(&g, seed);
        torch_randn_f32(&g, f, 192);
        label = torch_randint(&g, 10);
        torch_randn_f64(&g, d, 192);
        if (strcmp(part, "randn_f32_192") == 0 && numel == 192) {
            for (int i = 0; i < 192; i++) got[i] = f[i];
            return 1;
        }
        if (strcmp(part, "randint10") == 0 && numel == 1) {
            got[0] = (double)label;
            return 1;
        }
        if (strcmp(part, "randn_f64_192") == 0 && numel == 192) {
            memcpy(got, d, sizeof d);
            return 1;
        }
    }
    return 0;
}

START_TEST(test_torch_golden) {
    char path[1024];
    st_file *f = NULL;
    lego_err err;

    snprintf(path, sizeof path, "%s/rng_torch_cpu/io.safetensors", golden_dir());
    if (!path_exists(path)) {
        printf("test_rng: %s not found, skipping the PyTorch golden check\n",
               path);
        return;
    }

    lego_err_clear(&err);
    ck_assert_msg(st_open(path, &f, &err) == LEGO_OK, "%s: %s", path, err.msg);
    ck_assert_int_gt(f->num_tensors, 0);
    for (int i = 0; i < f->num_tensors; i++) {
        const st_tensor *t = &f->tensors[i];
        double *want = malloc(t->numel * sizeof *want);
        double *got = malloc(t->numel * sizeof *got);
        ck_assert(want && got);
        ck_assert_msg(st_to_f64(t, want, &err) == LEGO_OK, "%s: %s", t->name,
                      err.msg);
        ck_assert_msg(torch_reproduce(t->name, got, t->numel),
                      "unknown golden tensor %s", t->name);
        double e = max_abs_diff(got, want, t->numel);
        ck_assert_msg(e <= 1e-5, "%s: max abs error %g", t->name, e);
        free(want);
        free(got);
    }
    st_close(f);
}
END_TEST

static Suite *rng_suite(void) {
    Suite *s = suite_create("rng");
    TCase *philox = tcase_create("philox");
    tcase_add_test(philox, test_philox_kat);
    tcase_add_test(philox, test_philox_normal_formula);
    tcase_add_test(philox, test_philox_normal_slices);
    tcase_add_test(philox, test_philox_normal_stats);
    tcase_add_test(philox, test_philox_randint);
    tcase_set_timeout(philox, 60);
    suite_add_tcase(s, philox);
    TCase *torch = tcase_create("torch");
    tcase_add_test(torch, test_torch_mt19937);
    tcase_add_test(torch, test_torch_normal_cache);
    tcase_add_test(torch, test_torch_golden);
    suite_add_tcase(s, torch);
    return s;
}

int main(void) { return run_suite(rng_suite()); }
