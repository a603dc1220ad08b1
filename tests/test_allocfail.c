/*
 * test_allocfail.c -- every allocation during lego_model_load and
 * lego_sample (and lego_step, lego_denoise, lego_dataset_open) fails in
 * turn, and each time the call must fail cleanly: a known status
 * (LEGO_ERR_OUT_OF_MEMORY whenever liblego's own allocation failed), a
 * message, no crash, nothing leaked, and the model still usable with the
 * same results.  The loop ends at the first run in which no allocation
 * failed, which must succeed.
 *
 * How: this program defines malloc, calloc, realloc, free, posix_memalign,
 * aligned_alloc and memalign, which take precedence over the C library's
 * for the whole process (the library is linked in statically, its
 * dependencies resolve to these too).  They forward to the next definition
 * (the C library, or the sanitizer's or valgrind's allocator), and only
 * inside a window the test opens do they count allocations whose immediate
 * caller is liblego, cJSON, libpng, zlib or the C library, make the chosen
 * one fail and remember every block handed out until it is freed.  OpenMP
 * and OpenBLAS allocations are never failed: their runtimes abort on
 * failure, which is theirs to do, not liblego's.
 *
 * Check is linked in statically too, so nothing inside a window may call
 * it: results are copied out and asserted after the window closes.
 * Mmap failures are not simulated (the loader maps checkpoints).
 */
#define _GNU_SOURCE
#include "testutil.h"

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <zlib.h>

#include "model.h"

/* ------------------------------------------------------------------------ */
/* the allocator shim                                                       */
/* ------------------------------------------------------------------------ */

static void *(*next_malloc)(size_t);
static void *(*next_calloc)(size_t, size_t);
static void *(*next_realloc)(void *, size_t);
static void (*next_free)(void *);
static int (*next_posix_memalign)(void **, size_t, size_t);
static void *(*next_aligned_alloc)(size_t, size_t);
static void *(*next_memalign)(size_t, size_t);

/* The sanitizer runtime calls malloc before its own set-up is done: the
 * shim must not be instrumented. */
#define SHIM_NOSAN __attribute__((no_sanitize("address", "undefined")))

/* dlsym may allocate while the pointers above are being looked up: those
 * few bytes come from here and are never freed. */
static _Alignas(16) unsigned char boot_arena[4096];
static size_t boot_used;
static int resolving;

SHIM_NOSAN static void *boot_alloc(size_t n) {
    n = (n + 15) & ~(size_t)15;
    if (boot_used + n > sizeof boot_arena) return NULL;
    void *p = boot_arena + boot_used;
    boot_used += n;
    return p;
}

SHIM_NOSAN static int in_boot_arena(const void *p) {
    return (const unsigned char *)p >= boot_arena &&
           (const unsigned char *)p < boot_arena + sizeof boot_arena;
}

SHIM_NOSAN static void resolve(void) {
    if (next_malloc || resolving) return;
    resolving = 1;
    next_calloc = (void *(*)(size_t, size_t))dlsym(RTLD_NEXT, "calloc");
    next_realloc = (void *(*)(void *, size_t))dlsym(RTLD_NEXT, "realloc");
    next_free = (void (*)(void *))dlsym(RTLD_NEXT, "free");
    next_posix_memalign = (int (*)(void **, size_t, size_t))dlsym(RTLD_NEXT, "posix_memalign");
    next_aligned_alloc = (void *(*)(size_t, size_t))dlsym(RTLD_NEXT, "aligned_alloc");
    next_memalign = (void *(*)(size_t, size_t))dlsym(RTLD_NEXT, "memalign");
    next_malloc = (void *(*)(size_t))dlsym(RTLD_NEXT, "malloc");
    resolving = 0;
}

/* The build hides symbols by default (-fvisibility=hidden); the shim must
 * be exported so that the shared libraries bind to it too. */
#define SHIM_API __attribute__((visibility("default"))) SHIM_NOSAN

/* The window.  Outside it the shim only forwards. */
enum { ORIGIN_NONE, ORIGIN_LIBLEGO, ORIGIN_DEPENDENCY };

static struct {
    pthread_mutex_t lock;
    int open;
    long fail_at;          /* the n-th counted allocation fails (1-based) */
    long count;            /* counted so far                              */
    int failed_origin;     /* who made the allocation that failed         */
    const void *bases[5];  /* liblego (this program), cJSON, libpng, zlib, libc */
    /* Blocks handed out in the window and not yet freed. */
    void *live[1 << 14];
    size_t live_size[1 << 14];
    void *live_caller[1 << 14];
    int live_count;
    int live_overflow;
} shim = {.lock = PTHREAD_MUTEX_INITIALIZER};

SHIM_NOSAN static const void *object_base(const void *addr) {
    Dl_info info;
    return addr && dladdr(addr, &info) ? info.dli_fbase : NULL;
}

SHIM_NOSAN static int origin_of(const void *caller) {
    const void *base = object_base(caller);
    if (!base) return ORIGIN_NONE;
    if (base == shim.bases[0]) return ORIGIN_LIBLEGO;
    for (int i = 1; i < 5; i++)
        if (base == shim.bases[i]) return ORIGIN_DEPENDENCY;
    return ORIGIN_NONE;
}

/* Called with the lock held: is this allocation the one to fail? */
SHIM_NOSAN static int should_fail(const void *caller, int *origin) {
    *origin = origin_of(caller);

    if (*origin == ORIGIN_NONE) return 0;
    if (++shim.count != shim.fail_at) return 0;
    shim.failed_origin = *origin;
    return 1;
}

SHIM_NOSAN static void remember(void *p, size_t size, void *caller) {
    if (shim.live_count == (int)(sizeof shim.live / sizeof shim.live[0])) {
        shim.live_overflow = 1;
        return;
    }
    shim.live[shim.live_count] = p;
    shim.live_size[shim.live_count] = size;
    shim.live_caller[shim.live_count] = caller;
    shim.live_count++;
}

SHIM_NOSAN static void forget(void *p) {
    for (int i = shim.live_count - 1; i >= 0; i--)
        if (shim.live[i] == p) {
            shim.live_count--;
            shim.live[i] = shim.live[shim.live_count];
            shim.live_size[i] = shim.live_size[shim.live_count];
            shim.live_caller[i] = shim.live_caller[shim.live_count];
            return;
        }
}

/* The common path of every allocating entry point: NULL when this one is
 * to fail, else the block `alloc` made, remembered. */
#define SHIM_ALLOC(size, caller, expr)                                         \
    do {                                                                       \
        if (!shim.open) return (expr);                                         \
        pthread_mutex_lock(&shim.lock);                                        \
        int origin_;                                                           \
        if (shim.open && should_fail((caller), &origin_)) {                    \
            pthread_mutex_unlock(&shim.lock);                                  \
            errno = ENOMEM;                                                    \
            return NULL;                                                       \
        }                                                                      \
        pthread_mutex_unlock(&shim.lock);                                      \
        void *p_ = (expr);                                                     \
        if (p_ && origin_ != ORIGIN_NONE) {                                    \
            pthread_mutex_lock(&shim.lock);                                    \
            remember(p_, (size), (caller));                                    \
            pthread_mutex_unlock(&shim.lock);                                  \
        }                                                                      \
        return p_;                                                             \
    } while (0)

SHIM_API void *malloc(size_t size) {
    resolve();
    if (!next_malloc) return boot_alloc(size);
    SHIM_ALLOC(size, __builtin_return_address(0), next_malloc(size));
}

SHIM_API void *calloc(size_t n, size_t size) {
    resolve();
    if (!next_calloc) {
        void *p = n && size > sizeof boot_arena / n ? NULL : boot_alloc(n * size);
        if (p) memset(p, 0, n * size);
        return p;
    }
    SHIM_ALLOC(n * size, __builtin_return_address(0), next_calloc(n, size));
}

SHIM_API void free(void *p) {
    if (!p || in_boot_arena(p)) return;
    resolve();
    if (shim.live_count) {
        pthread_mutex_lock(&shim.lock);
        forget(p);
        pthread_mutex_unlock(&shim.lock);
    }
    next_free(p);
}

SHIM_API void *realloc(void *p, size_t size) {
    resolve();
    if (p && in_boot_arena(p)) {
        void *q = malloc(size);
        if (q) memcpy(q, p, size); /* the arena is larger than any boot block */
        return q;
    }
    void *caller = __builtin_return_address(0);
    if (!shim.open) {
        if (shim.live_count && p) {
            pthread_mutex_lock(&shim.lock);
            forget(p);
            pthread_mutex_unlock(&shim.lock);
        }
        return next_realloc(p, size);
    }
    pthread_mutex_lock(&shim.lock);
    int origin;
    if (should_fail(caller, &origin)) {
        /* A failed realloc leaves the old block as it was. */
        pthread_mutex_unlock(&shim.lock);
        errno = ENOMEM;
        return NULL;
    }
    pthread_mutex_unlock(&shim.lock);
    void *q = next_realloc(p, size);
    if (q || size == 0) {
        pthread_mutex_lock(&shim.lock);
        if (p) forget(p);
        if (q && origin != ORIGIN_NONE) remember(q, size, caller);
        pthread_mutex_unlock(&shim.lock);
    }
    return q;
}

SHIM_API int posix_memalign(void **out, size_t align, size_t size) {
    resolve();
    void *caller = __builtin_return_address(0);
    if (shim.open) {
        pthread_mutex_lock(&shim.lock);
        int origin, fail = should_fail(caller, &origin);
        pthread_mutex_unlock(&shim.lock);
        if (fail) return ENOMEM;
        int r = next_posix_memalign(out, align, size);
        if (r == 0 && origin != ORIGIN_NONE) {
            pthread_mutex_lock(&shim.lock);
            remember(*out, size, caller);
            pthread_mutex_unlock(&shim.lock);
        }
        return r;
    }
    return next_posix_memalign(out, align, size);
}

SHIM_API void *aligned_alloc(size_t align, size_t size) {
    resolve();
    SHIM_ALLOC(size, __builtin_return_address(0), next_aligned_alloc(align, size));
}

SHIM_API void *memalign(size_t align, size_t size) {
    resolve();
    SHIM_ALLOC(size, __builtin_return_address(0), next_memalign(align, size));
}

static void shim_locate_objects(void) {
    static int done;
    if (done) return;
    shim.bases[0] = object_base((const void *)(uintptr_t)shim_locate_objects);
    const char *symbols[4] = {"cJSON_Parse", "png_create_read_struct", "inflate",
                              "gnu_get_libc_version"};
    for (int i = 0; i < 4; i++) shim.bases[i + 1] = object_base(dlsym(RTLD_DEFAULT, symbols[i]));
    ck_assert_ptr_nonnull(shim.bases[0]);
    ck_assert_ptr_nonnull(shim.bases[1]);
    ck_assert_ptr_nonnull(shim.bases[4]);
    done = 1;
}

/* Open the window: allocation number fail_at (1-based; 0 = none) fails. */
static void window_open(long fail_at) {
    shim_locate_objects();
    pthread_mutex_lock(&shim.lock);
    shim.fail_at = fail_at;
    shim.count = 0;
    shim.failed_origin = ORIGIN_NONE;
    shim.open = 1;
    pthread_mutex_unlock(&shim.lock);
}

/* Close it; the number of allocations counted. */
static long window_close(void) {
    pthread_mutex_lock(&shim.lock);
    shim.open = 0;
    long n = shim.count;
    pthread_mutex_unlock(&shim.lock);
    return n;
}

/* Everything allocated in windows so far has been freed. */
static void expect_no_leak(const char *what, long k) {
    pthread_mutex_lock(&shim.lock);
    int n = shim.live_count, overflow = shim.live_overflow;
    size_t size = n ? shim.live_size[0] : 0;
    void *caller = n ? shim.live_caller[0] : NULL;
    shim.live_count = 0;
    pthread_mutex_unlock(&shim.lock);
    ck_assert_msg(!overflow, "%s: too many live blocks to track", what);
    ck_assert_msg(n == 0,
                  "%s, allocation %ld failed: %d block(s) leaked, the first %zu bytes "
                  "allocated from %p (addr2line -e <test> that address)",
                  what, k, n, size, caller);
}

/* ------------------------------------------------------------------------ */
/* the calls under test                                                     */
/* ------------------------------------------------------------------------ */

static char tmpdir[64];
static char ckpt[128];

/* A tiny conditional model with two bricks, saved with lego_model_save. */
static void write_checkpoint(void) {
    strcpy(tmpdir, "/tmp/lego_allocfail_XXXXXX");
    ck_assert(mkdtemp(tmpdir) != NULL);
    snprintf(ckpt, sizeof ckpt, "%s/tiny.safetensors", tmpdir);
    lego_model_config c;
    lego_model_config_init(&c);
    c.img_channels = 1;
    c.label_dim = 3;
    c.hidden_size = 8;
    c.num_heads = 2;
    c.mlp_ratio = 1.0;
    c.frequency_embedding_size = 8;
    c.num_threads = 2;
    const int bricks[2][3] = {{2, 1, 1}, {4, 2, 1}};
    lego_model *m = model_with_bricks(&c, bricks, 2);
    int64_t np = lego_model_num_params(m);
    float *p = malloc((size_t)np * sizeof *p);
    ck_assert(p && lego_model_get_params(m, p, np) == LEGO_OK);
    for (int64_t i = 0; i < np; i++) p[i] = 0.2f * sinf(0.37f * (float)i);
    ck_assert(lego_model_set_params(m, p, np) == LEGO_OK);
    free(p);
    ck_assert_msg(lego_model_save(m, ckpt) == LEGO_OK, "%s", lego_model_error(m));
    lego_model_free(m);
}

static void remove_checkpoint(void) {
    remove(ckpt);
    rmdir(tmpdir);
}

static lego_model *load(lego_status *status) {
    lego_load_options o;
    lego_load_options_init(&o);
    o.num_threads = 2;
    lego_model *m = NULL;
    *status = lego_model_load(ckpt, &o, &m);
    return m;
}

/* The status and message of a call during which allocation k failed
 * (`origin` made it).  A call may also cope with the failure (a shrinking
 * realloc, a sort's scratch) and succeed: the caller then checks that the
 * result is the reference one. */
static void expect_clean_failure(const char *what, long k, lego_status s, const char *msg,
                                 int origin) {
    if (s == LEGO_OK) return;
    ck_assert_msg(s >= LEGO_ERR_INVALID_ARGUMENT && s <= LEGO_ERR_STATE, "%s: status %d", what,
                  s);
    if (origin == ORIGIN_LIBLEGO)
        ck_assert_msg(s == LEGO_ERR_OUT_OF_MEMORY,
                      "%s: allocation %ld (liblego's) failed, status %s: %s", what, k,
                      lego_status_string(s), msg);
    ck_assert_msg(msg && msg[0], "%s: allocation %ld failed without a message", what, k);
    if (s == LEGO_ERR_OUT_OF_MEMORY)
        ck_assert_msg(strstr(msg, "memory") != NULL, "%s: message '%s' does not say why", what,
                      msg);
}

START_TEST(test_load) {
    write_checkpoint();
    lego_status s;
    lego_model *ref = load(&s);
    ck_assert_msg(s == LEGO_OK, "%s", lego_model_error(ref));
    int64_t np = lego_model_num_params(ref);
    float *want = malloc((size_t)np * sizeof *want), *got = malloc((size_t)np * sizeof *got);
    ck_assert(lego_model_get_params(ref, want, np) == LEGO_OK);
    lego_model_free(ref);

    long k, failures = 0, oom = 0;
    for (k = 1;; k++) {
        window_open(k);
        lego_model *m = load(&s);
        /* Copy out what the model says before the window closes: the
         * checks below allocate (Check's messages). */
        char msg[512];
        snprintf(msg, sizeof msg, "%s", lego_model_error(m));
        lego_status got_params = s == LEGO_OK ? lego_model_get_params(m, got, np) : LEGO_OK;
        lego_model_free(m);
        long counted = window_close();
        int origin = shim.failed_origin;
        expect_no_leak("lego_model_load", k);
        if (counted < k) { /* nothing failed: the last run */
            ck_assert_msg(s == LEGO_OK, "load without failures: %s", msg);
            ck_assert(got_params == LEGO_OK && memcmp(got, want, (size_t)np * 4) == 0);
            break;
        }
        failures++;
        if (s == LEGO_ERR_OUT_OF_MEMORY) oom++;
        expect_clean_failure("lego_model_load", k, s, msg, origin);
        if (s == LEGO_OK)
            ck_assert(got_params == LEGO_OK && memcmp(got, want, (size_t)np * 4) == 0);
    }
    printf("allocfail: lego_model_load: %ld allocations failed in turn (%ld reported "
           "LEGO_ERR_OUT_OF_MEMORY), then a clean load\n", failures, oom);
    ck_assert_int_gt(failures, 20);
    free(want);
    free(got);
    remove_checkpoint();
}
END_TEST

typedef enum call_kind { CALL_SAMPLE, CALL_STEP, CALL_DENOISE } call_kind;

enum { N = 3, H = 4, W = 4 };
#define IMG ((size_t)N * H * W)

static lego_status run_call(lego_model *m, call_kind kind, int variant, float *out) {
    if (kind == CALL_SAMPLE) {
        int32_t labels[N] = {0, 2, -1};
        lego_sample_request r;
        lego_sample_request_init(&r);
        r.n = N;
        r.height = H;
        r.width = W;
        r.out = out;
        if (variant == 1) r.labels = labels;
        lego_sample_options o;
        lego_sample_options_init(&o);
        o.steps = 3;
        o.solver = variant == 1 ? LEGO_SOLVER_DPMPP_2M : LEGO_SOLVER_HEUN;
        o.rng = variant == 1 ? LEGO_RNG_PHILOX : LEGO_RNG_TORCH;
        o.guidance = variant == 1 ? 2.0f : 1.0f;
        o.s_churn = 2;
        return lego_sample(m, &r, &o, NULL);
    }
    float x[IMG], noise[IMG];
    int32_t labels[N] = {1, -1, 2};
    for (size_t i = 0; i < IMG; i++) {
        x[i] = sinf(0.5f * (float)i);
        noise[i] = cosf(0.3f * (float)i);
    }
    if (kind == CALL_STEP) {
        lego_step_request r;
        lego_step_request_init(&r);
        r.n = N;
        r.height = H;
        r.width = W;
        r.x = x;
        r.t_cur = 3.0;
        r.t_next = 1.5;
        r.labels = labels;
        r.noise = noise;
        lego_sample_options o;
        lego_sample_options_init(&o);
        o.s_churn = 5;
        o.guidance = 1.5f;
        lego_status s = lego_step(m, &r, &o);
        memcpy(out, x, sizeof x);
        return s;
    }
    float sigma[N] = {0.5f, 2.0f, 9.0f};
    lego_denoise_request r;
    lego_denoise_request_init(&r);
    r.n = N;
    r.height = H;
    r.width = W;
    r.x = x;
    r.sigma = sigma;
    r.labels = labels;
    r.guidance = 3.0f;
    r.out = out;
    return lego_denoise(m, &r);
}

/* Each allocation of one call on a freshly loaded model fails in turn; the
 * model then gives the reference result. */
static void fail_each(call_kind kind, int variant, const char *what) {
    lego_status s;
    lego_model *m = load(&s);
    ck_assert(s == LEGO_OK);
    float want[IMG], got[IMG];
    ck_assert_msg(run_call(m, kind, variant, want) == LEGO_OK, "%s", lego_model_error(m));
    lego_model_free(m);

    long k, failures = 0;
    for (k = 1;; k++) {
        m = load(&s);
        ck_assert(s == LEGO_OK);
        for (size_t i = 0; i < IMG; i++) got[i] = -7.0f;
        window_open(k);
        s = run_call(m, kind, variant, got);
        char msg[512];
        snprintf(msg, sizeof msg, "%s", lego_model_error(m));
        long counted = window_close();
        int origin = shim.failed_origin;
        if (counted < k) {
            ck_assert_msg(s == LEGO_OK, "%s without failures: %s", what, msg);
            ck_assert(memcmp(got, want, sizeof got) == 0);
            lego_model_free(m);
            expect_no_leak(what, k);
            break;
        }
        failures++;
        expect_clean_failure(what, k, s, msg, origin);
        if (s == LEGO_OK)
            ck_assert_msg(memcmp(got, want, sizeof got) == 0, "%s coped with allocation %ld "
                          "failing, but with a different result", what, k);
        /* The same call again, nothing failing: the reference result. */
        ck_assert_msg(run_call(m, kind, variant, got) == LEGO_OK, "%s after a failure: %s",
                      what, lego_model_error(m));
        ck_assert_msg(memcmp(got, want, sizeof got) == 0, "%s after allocation %ld failed: "
                      "a different result", what, k);
        lego_model_free(m);
        expect_no_leak(what, k);
    }
    printf("allocfail: %s: %ld allocations failed in turn, then a clean run\n", what, failures);
    ck_assert_int_ge(failures, 1);
}

START_TEST(test_sample) {
    write_checkpoint();
    fail_each(CALL_SAMPLE, 0, "lego_sample (Heun, torch generator, churn)");
    fail_each(CALL_SAMPLE, 1, "lego_sample (DPM-Solver++, labels, guidance)");
    fail_each(CALL_STEP, 0, "lego_step");
    fail_each(CALL_DENOISE, 0, "lego_denoise");
    remove_checkpoint();
}
END_TEST

/* ------------------------------------------------------------------------ */
/* datasets                                                                 */
/* ------------------------------------------------------------------------ */

START_TEST(test_dataset) {
    char dir[] = "/tmp/lego_allocfail_ds_XXXXXX", images[96], labels[96], png_dir[96];
    ck_assert(mkdtemp(dir) != NULL);
    snprintf(images, sizeof images, "%s/train-images-idx3-ubyte.gz", dir);
    snprintf(labels, sizeof labels, "%s/train-labels-idx1-ubyte.gz", dir);
    unsigned char idx[16 + 4 * 6 * 5] = {0, 0, 8, 3, 0, 0, 0, 4, 0, 0, 0, 6, 0, 0, 0, 5};
    for (size_t i = 16; i < sizeof idx; i++) idx[i] = (unsigned char)(i * 7);
    unsigned char lab[8 + 4] = {0, 0, 8, 1, 0, 0, 0, 4, 3, 1, 4, 1};
    write_gz(images, idx, sizeof idx);
    write_gz(labels, lab, sizeof lab);
    snprintf(png_dir, sizeof png_dir, "%s/pngs", dir);
    ck_assert(mkdir(png_dir, 0700) == 0);
    for (int i = 0; i < 3; i++) {
        char p[128];
        unsigned char pix[5 * 4 * 3];
        for (size_t j = 0; j < sizeof pix; j++) pix[j] = (unsigned char)(j * 11 + (size_t)i);
        snprintf(p, sizeof p, "%s/%d.png", png_dir, i);
        ck_assert(lego_write_png(p, pix, 5, 4, 3, NULL, 0) == LEGO_OK);
    }
    const char *paths[2] = {images, png_dir};
    float want[2][3 * 8 * 8], coped_img[8][3 * 8 * 8];
    int32_t want_label[2], coped_label[8];
    int coped = 0, coped_which[8];
    for (int which = 0; which < 2; which++) {
        long k, failures = 0;
        for (k = 1;; k++) {
            lego_dataset_options o;
            lego_dataset_options_init(&o);
            o.resolution = 8;
            lego_dataset *ds = NULL;
            float img[3 * 8 * 8];
            int32_t label = -2;
            window_open(k);
            lego_status s = lego_dataset_open(paths[which], &o, &ds);
            char msg[512];
            snprintf(msg, sizeof msg, "%s", lego_dataset_error(ds));
            int64_t count = lego_dataset_count(ds);
            lego_status got = s == LEGO_OK ? lego_dataset_get(ds, count - 1, img, &label) : LEGO_OK;
            lego_dataset_free(ds);
            long counted = window_close();
            ck_assert(got == LEGO_OK);
            int origin = shim.failed_origin;
            expect_no_leak(paths[which], k);
            if (counted < k) {
                ck_assert_msg(s == LEGO_OK, "%s without failures: %s", paths[which], msg);
                ck_assert_int_eq(count, which == 0 ? 4 : 3);
                memcpy(want[which], img, sizeof img);
                want_label[which] = label;
                break;
            }
            failures++;
            expect_clean_failure(paths[which], k, s, msg, origin);
            if (s == LEGO_OK) { /* compared once the reference exists */
                ck_assert_int_lt(coped, 8);
                coped_which[coped] = which;
                memcpy(coped_img[coped], img, sizeof img);
                coped_label[coped++] = label;
            }
        }
        printf("allocfail: lego_dataset_open(%s): %ld allocations failed in turn\n",
               which == 0 ? "idx.gz" : "PNG folder", failures);
        ck_assert_int_ge(failures, 3);
    }
    /* Opens that coped with a failed allocation read the same last image. */
    for (int i = 0; i < coped; i++) {
        int w = coped_which[i];
        size_t floats = (size_t)(w == 0 ? 1 : 3) * 8 * 8;
        ck_assert(memcmp(coped_img[i], want[w], floats * sizeof(float)) == 0);
        ck_assert_int_eq(coped_label[i], want_label[w]);
    }
    printf("allocfail: datasets: %d opens coped with a failed allocation\n", coped);
    for (int i = 0; i < 3; i++) {
        char p[128];
        snprintf(p, sizeof p, "%s/%d.png", png_dir, i);
        remove(p);
    }
    rmdir(png_dir);
    remove(images);
    remove(labels);
    rmdir(dir);
}
END_TEST

int main(void) {
    Suite *s = suite_create("allocfail");
    TCase *t = tcase_create("allocfail");
    tcase_set_timeout(t, 600);
    tcase_add_test(t, test_load);
    tcase_add_test(t, test_sample);
    tcase_add_test(t, test_dataset);
    suite_add_tcase(s, t);
    return run_suite(s);
}
