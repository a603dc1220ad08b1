/*
 * testutil.h -- helpers shared by the Check test programs: where the
 * golden cases are, reading tensors from safetensors files, comparing;
 * reproducible random test data, small models from a brick list, whole
 * files read and written.  Each test is its own program, so everything
 * here is static.
 */
#ifndef LEGO_TESTUTIL_H
#define LEGO_TESTUTIL_H

#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif
#include <check.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "lego.h"
#include "safetensors.h"

/* $LEGO_GOLDEN_DIR, else ../shared/golden (relative to the project root,
 * where make check runs). */
static inline const char *golden_dir(void) {
    const char *d = getenv("LEGO_GOLDEN_DIR");
    return d && *d ? d : "../shared/golden";
}

/* Set by `make valgrind`: a test may leave out arithmetic-heavy checks that
 * the plain and sanitizer runs already make (valgrind looks for memory
 * errors and runs floating point some 50 times slower). */
static inline int under_valgrind(void) {
    return getenv("LEGO_TEST_UNDER_VALGRIND") != NULL;
}

static inline int path_exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

/* A tensor of `f` as a fresh float array (NULL when absent). */
static inline float *tensor_f32(const st_file *f, const char *name, size_t *numel) {
    const st_tensor *t = st_find(f, name);
    if (!t) return NULL;
    double *tmp = malloc(t->numel * sizeof *tmp);
    float *out = malloc(t->numel * sizeof *out);
    ck_assert(tmp && out);
    st_to_f64(t, tmp, NULL);
    for (size_t i = 0; i < t->numel; i++) out[i] = (float)tmp[i];
    free(tmp);
    if (numel) *numel = t->numel;
    return out;
}

static inline double *tensor_f64(const st_file *f, const char *name, size_t *numel) {
    const st_tensor *t = st_find(f, name);
    if (!t) return NULL;
    double *out = malloc(t->numel * sizeof *out);
    ck_assert(out);
    st_to_f64(t, out, NULL);
    if (numel) *numel = t->numel;
    return out;
}

/* max|got - want| / max(1, max|want|): the golden cases' tolerance rule. */
static inline double scaled_error(const float *got, const float *want, size_t n) {
    double err = 0, top = 1;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - want[i]);
        if (!(d <= err)) err = d; /* NaN propagates as an error */
        if (fabs(want[i]) > top) top = fabs(want[i]);
    }
    return err / top;
}

/* xorshift64*: reproducible test data, independent of the library's RNGs.
 * One stream per test program; rng_seed() restarts it. */
static uint64_t rng_state;
static inline void rng_seed(uint64_t s) { rng_state = s * 0x9E3779B97F4A7C15ull + 1; }
static inline double urand(double lo, double hi) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    uint64_t r = rng_state * 0x2545F4914F6CDD1Dull;
    return lo + (hi - lo) * ((double)(r >> 11) * (1.0 / 9007199254740992.0));
}
/* A standard normal from two uniforms (Box-Muller). */
static inline double nrand(void) {
    double u = urand(1e-12, 1), v = urand(0, 1);
    return sqrt(-2 * log(u)) * cos(6.283185307179586 * v);
}
/* n uniform floats in [lo, hi) (n may be 0: a valid pointer still). */
static inline float *rand_floats(size_t n, double lo, double hi) {
    float *v = malloc((n ? n : 1) * sizeof *v);
    ck_assert(v);
    for (size_t i = 0; i < n; i++) v[i] = (float)urand(lo, hi);
    return v;
}
static inline float *normal_floats(size_t n) {
    float *v = malloc((n ? n : 1) * sizeof *v);
    ck_assert(v);
    for (size_t i = 0; i < n; i++) v[i] = (float)nrand();
    return v;
}

/* A model of `cfg` with bricks given as rows {brick_size, patch_size,
 * depth}, added in order (weights not initialised). */
static inline lego_model *model_with_bricks(const lego_model_config *cfg, const int (*bricks)[3],
                                            int num_bricks) {
    lego_model *m = NULL;
    lego_status s = lego_model_create(cfg, &m);
    ck_assert_msg(s == LEGO_OK, "create: %s", lego_model_error(m));
    for (int k = 0; k < num_bricks; k++) {
        lego_brick_config b;
        lego_brick_config_init(&b);
        b.brick_size = bricks[k][0];
        b.patch_size = bricks[k][1];
        b.depth = bricks[k][2];
        ck_assert_msg(lego_brick_add(m, &b) == LEGO_OK, "brick %d: %s", k, lego_model_error(m));
    }
    return m;
}

/* A whole file, with one spare byte after it so text can be terminated. */
static inline unsigned char *read_all(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    unsigned char *buf;
    long n;
    ck_assert_msg(f != NULL, "%s missing", path);
    ck_assert_int_eq(fseek(f, 0, SEEK_END), 0);
    n = ftell(f);
    ck_assert_int_ge(n, 0);
    rewind(f);
    buf = malloc((size_t)n + 1);
    ck_assert_ptr_nonnull(buf);
    ck_assert_uint_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *size = (size_t)n;
    return buf;
}

static inline void write_file(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(data, 1, len, f), len);
    ck_assert_int_eq(fclose(f), 0);
}

static inline void write_gz(const char *path, const void *data, size_t len) {
    gzFile g = gzopen(path, "wb");
    ck_assert_ptr_nonnull(g);
    ck_assert_int_eq(gzwrite(g, data, (unsigned)len), (int)len);
    ck_assert_int_eq(gzclose(g), Z_OK);
}

/* `got` against tensor `name` of a golden case's io file within `tol`
 * (scaled_error), with a line for the log; a tensor the case lacks is
 * skipped. */
static inline void expect_golden(const st_file *io, const char *case_name, const char *name,
                                 const float *got, size_t numel, double tol) {
    size_t n = 0;
    float *want = tensor_f32(io, name, &n);
    if (!want) {
        printf("golden %-12s %-18s (not in this case)\n", case_name, name);
        return;
    }
    ck_assert_msg(n == numel, "%s %s: %zu values, expected %zu", case_name, name, numel, n);
    double err = scaled_error(got, want, n);
    printf("golden %-12s %-18s scaled error %.2e (tolerance %.0e)\n", case_name, name, err, tol);
    free(want);
    ck_assert_msg(err <= tol, "%s %s: scaled error %g exceeds %g", case_name, name, err, tol);
}

/* Run a suite, print Check's summary, return the process exit status. */
static inline int run_suite(Suite *s) {
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}


#ifdef TESTUTIL_GOLDEN_CASES
#include <cjson/cJSON.h>
#include <dirent.h>

/* The golden cases: every folder under golden_dir() holding a
 * model.safetensors, sorted by name.  Nothing names a case. */
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

static inline void free_cases(void) {
    for (int i = 0; i < num_cases; i++) free(case_dirs[i]);
}

/* A case's case.json, parsed; the caller cJSON_Delete()s it. */
static inline cJSON *case_json(const char *dir) {
    char path[4096];
    size_t len;
    snprintf(path, sizeof path, "%s/case.json", dir);
    char *text = (char *)read_all(path, &len);
    text[len] = '\0';
    cJSON *root = cJSON_Parse(text);
    free(text);
    ck_assert_msg(root != NULL, "%s: not JSON", path);
    return root;
}

/* tolerance.<kind> of a case's case.json, which must give it. */
static inline double case_tolerance(const char *dir, const char *kind) {
    cJSON *root = case_json(dir);
    cJSON *tol = cJSON_GetObjectItem(cJSON_GetObjectItem(root, "tolerance"), kind);
    ck_assert_msg(cJSON_IsNumber(tol), "%s: tolerance.%s missing", dir, kind);
    double v = tol->valuedouble;
    cJSON_Delete(root);
    return v;
}
#endif /* TESTUTIL_GOLDEN_CASES */

#endif /* LEGO_TESTUTIL_H */
