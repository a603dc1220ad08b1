/*
 * lego-sample -- draw images from a LEGO diffusion checkpoint.
 *
 *   lego-sample --model M.safetensors --grid grid.png --seeds 0-63 --labels cycle
 *
 * Run with --help for every option.  Exit status 0 on success, 1 on a
 * sampling or I/O failure, 2 on a usage error.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "lego.h"

/* liblego runs GEMMs on its own workers when OpenBLAS is single-threaded,
 * the fastest arrangement; that setting is process-wide, so it is the
 * application's to make.  Weak: absent when liblego uses another BLAS. */
extern void openblas_set_num_threads(int) __attribute__((weak));

/* The bundled Fashion-MNIST model (trained by lego-train, models/): where
 * the source tree keeps it, relative to the working directory or to this
 * program in the tree's bin/, then where `make install` puts it, relative
 * to this program in PREFIX/bin. */
#define DEFAULT_MODEL "lego_fmnist_pg32.safetensors"
static const char *default_model_dirs[] = {"../models/", "../share/liblego/"};

/* The first default model that exists, into buf; NULL if none. */
static const char *find_default_model(char *buf, size_t size) {
    struct stat sb;
    if (stat("models/" DEFAULT_MODEL, &sb) == 0) return "models/" DEFAULT_MODEL;
    char exe[4096];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len <= 0) return NULL;
    exe[len] = '\0';
    char *slash = strrchr(exe, '/');
    if (!slash) return NULL;
    slash[1] = '\0';
    for (size_t i = 0; i < sizeof default_model_dirs / sizeof *default_model_dirs; i++) {
        int w = snprintf(buf, size, "%s%s%s", exe, default_model_dirs[i], DEFAULT_MODEL);
        if (w > 0 && (size_t)w < size && stat(buf, &sb) == 0) return buf;
    }
    return NULL;
}

static void usage(FILE *fp) {
    fprintf(fp,
        "usage: lego-sample [options]\n"
        "  --model FILE          checkpoint (default: the bundled Fashion-MNIST model)\n"
        "  --out DIR             write one PNG per image into DIR\n"
        "  --grid FILE.png       write all images as one grid\n"
        "  --npz FILE.npz        write arr_0 (N x H x W x C uint8) and labels\n"
        "  --seeds LIST          seeds, e.g. 0-63 or 1,5,9-12 (default 0-63)\n"
        "  --labels cycle|random image i gets class i mod classes, or a random one (default random)\n"
        "  --class N             every image gets class N (-1 = null label)\n"
        "  --steps N             solver steps (default 18)\n"
        "  --solver NAME         heun, euler or dpmpp2m (default heun)\n"
        "  --cfg S               classifier-free guidance scale (default 1 = none)\n"
        "  --churn C,MIN,MAX,N   stochastic churn S_churn,S_min,S_max,S_noise\n"
        "  --skip RULE           none, pg:F, pr:F (fraction of steps) or pg@S, pr@S (sigma)\n"
        "  --height H --width W  image size (default: the model's resolution)\n"
        "  --pad                 allow sizes that are not brick multiples (sample larger, crop)\n"
        "  --rng philox|torch    generator (default philox; torch = reference generate.py)\n"
        "  --threads N           CPU threads (default: all cores)\n"
        "  --backend cpu|cuda    where the network runs (default cpu)\n"
        "  --device N            CUDA device index (default 0)\n"
        "  --precision P         fp32, bf16 or fp16 arithmetic on the GPU (default fp32)\n"
        "  --batch N             images per call (default 64)\n"
        "  --quiet               no progress bar\n");
}

typedef struct args {
    const char *model, *out_dir, *grid, *npz, *seeds, *skip;
    int labels_cycle, class_label, have_class, steps, height, width, pad, threads, batch, quiet;
    int device;
    lego_backend backend;
    lego_precision precision;
    lego_solver solver;
    lego_rng rng;
    float cfg;
    double churn[4];
} args;

static int parse_int(const char *s, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < -2147483647L || v > 2147483647L) return 0;
    *out = (int)v;
    return 1;
}

/* "0-63", "1,5,9-12" -> an array of seeds. */
static int parse_seeds(const char *spec, uint64_t **out, int *count) {
    int cap = 64, n = 0;
    uint64_t *v = malloc((size_t)cap * sizeof *v);
    const char *p = spec;
    while (v && *p) {
        char *end;
        errno = 0;
        unsigned long long a = strtoull(p, &end, 10), b = a;
        if (errno || end == p) break;
        p = end;
        if (*p == '-') {
            b = strtoull(p + 1, &end, 10);
            if (errno || end == p + 1 || b < a || b - a > 10000000) break;
            p = end;
        }
        for (unsigned long long s = a; s <= b; s++) {
            if (n == cap) {
                uint64_t *t = realloc(v, (size_t)(cap *= 2) * sizeof *t);
                if (!t) { free(v); return 0; }
                v = t;
            }
            v[n++] = s;
        }
        if (*p == ',') p++;
        else if (*p) break;
    }
    if (!v || *p || n == 0) {
        free(v);
        return 0;
    }
    *out = v;
    *count = n;
    return 1;
}

static int parse_args(int argc, char **argv, args *a) {
    memset(a, 0, sizeof *a);
    a->seeds = "0-63";
    a->steps = 18;
    a->batch = 64;
    a->cfg = 1.0f;
    a->churn[2] = INFINITY;
    a->churn[3] = 1.0;
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int takes = 1, ok = 1;
        if (!strcmp(o, "--help") || !strcmp(o, "-h")) { usage(stdout); exit(0); }
        else if (!strcmp(o, "--pad")) { a->pad = 1; takes = 0; }
        else if (!strcmp(o, "--quiet")) { a->quiet = 1; takes = 0; }
        else if (!v) { fprintf(stderr, "lego-sample: %s needs a value\n", o); return 0; }
        else if (!strcmp(o, "--model")) a->model = v;
        else if (!strcmp(o, "--out")) a->out_dir = v;
        else if (!strcmp(o, "--grid")) a->grid = v;
        else if (!strcmp(o, "--npz")) a->npz = v;
        else if (!strcmp(o, "--seeds")) a->seeds = v;
        else if (!strcmp(o, "--skip")) a->skip = v;
        else if (!strcmp(o, "--labels")) {
            if (!strcmp(v, "cycle")) a->labels_cycle = 1;
            else ok = !strcmp(v, "random");
        }
        else if (!strcmp(o, "--class")) { ok = parse_int(v, &a->class_label); a->have_class = 1; }
        else if (!strcmp(o, "--steps")) ok = parse_int(v, &a->steps) && a->steps > 0;
        else if (!strcmp(o, "--height")) ok = parse_int(v, &a->height) && a->height > 0;
        else if (!strcmp(o, "--width")) ok = parse_int(v, &a->width) && a->width > 0;
        else if (!strcmp(o, "--threads")) ok = parse_int(v, &a->threads) && a->threads >= 0;
        else if (!strcmp(o, "--batch")) ok = parse_int(v, &a->batch) && a->batch > 0;
        else if (!strcmp(o, "--cfg")) { char *e; a->cfg = strtof(v, &e); ok = *v && !*e && a->cfg >= 0; }
        else if (!strcmp(o, "--solver")) {
            if (!strcmp(v, "heun")) a->solver = LEGO_SOLVER_HEUN;
            else if (!strcmp(v, "euler")) a->solver = LEGO_SOLVER_EULER;
            else if (!strcmp(v, "dpmpp2m")) a->solver = LEGO_SOLVER_DPMPP_2M;
            else ok = 0;
        }
        else if (!strcmp(o, "--device")) ok = parse_int(v, &a->device) && a->device >= 0;
        else if (!strcmp(o, "--backend")) {
            if (!strcmp(v, "cpu")) a->backend = LEGO_BACKEND_CPU;
            else if (!strcmp(v, "cuda")) a->backend = LEGO_BACKEND_CUDA;
            else ok = 0;
        }
        else if (!strcmp(o, "--precision")) {
            if (!strcmp(v, "fp32")) a->precision = LEGO_PRECISION_FP32;
            else if (!strcmp(v, "bf16")) a->precision = LEGO_PRECISION_BF16;
            else if (!strcmp(v, "fp16")) a->precision = LEGO_PRECISION_FP16;
            else ok = 0;
        }
        else if (!strcmp(o, "--rng")) {
            if (!strcmp(v, "philox")) a->rng = LEGO_RNG_PHILOX;
            else if (!strcmp(v, "torch")) a->rng = LEGO_RNG_TORCH;
            else ok = 0;
        }
        else if (!strcmp(o, "--churn"))
            ok = sscanf(v, "%lf,%lf,%lf,%lf", &a->churn[0], &a->churn[1], &a->churn[2], &a->churn[3]) == 4;
        else { fprintf(stderr, "lego-sample: unknown option %s (see --help)\n", o); return 0; }
        if (!ok) { fprintf(stderr, "lego-sample: bad value '%s' for %s\n", v, o); return 0; }
        i += takes;
    }
    return 1;
}

static int parse_skip(const char *spec, lego_skip_policy *p, lego_model *m, int steps) {
    lego_skip_policy_init(p);
    if (!spec || !strcmp(spec, "none")) return 1;
    lego_skip_rule rule;
    if (!strncmp(spec, "pg", 2)) rule = LEGO_SKIP_TOP_AT_LOW_NOISE;
    else if (!strncmp(spec, "pr", 2)) rule = LEGO_SKIP_TOP_AT_HIGH_NOISE;
    else return 0;
    char *end;
    double v = strtod(spec + 3, &end);
    if ((spec[2] != ':' && spec[2] != '@') || end == spec + 3 || *end) return 0;
    return lego_skip_policy_preset(p, m, rule, steps, spec[2] == ':' ? v : 0,
                                   spec[2] == '@' ? v : 0) == LEGO_OK;
}

typedef struct progress {
    int done_images, total_images, batch_images;
    double start;
} progress;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int show_progress(int step, int total, void *user) {
    const progress *p = user;
    double frac = (p->done_images + p->batch_images * (double)step / total) / p->total_images;
    int bar = (int)(frac * 30);
    double el = now() - p->start;
    fprintf(stderr, "\r[%.*s%*s] %5.1f%%  %d/%d images  %.1fs", bar,
            "==============================", 30 - bar, "", 100 * frac, p->done_images,
            p->total_images, el);
    return 0;
}

static int write_outputs(const args *a, const uint8_t *u8, const int32_t *labels, int n, int h,
                         int w, int c, const uint64_t *seeds) {
    char msg[512];
    if (a->out_dir) {
        if (mkdir(a->out_dir, 0755) != 0 && errno != EEXIST) {
            fprintf(stderr, "lego-sample: cannot create %s: %s\n", a->out_dir, strerror(errno));
            return 0;
        }
        for (int i = 0; i < n; i++) {
            char path[4096];
            snprintf(path, sizeof path, "%s/%06llu.png", a->out_dir, (unsigned long long)seeds[i]);
            if (lego_write_png(path, u8 + (size_t)i * h * w * c, h, w, c, msg, sizeof msg)) {
                fprintf(stderr, "lego-sample: %s\n", msg);
                return 0;
            }
        }
    }
    if (a->grid && lego_write_png_grid(a->grid, u8, n, h, w, c, 0, 2, msg, sizeof msg)) {
        fprintf(stderr, "lego-sample: %s\n", msg);
        return 0;
    }
    if (a->npz && lego_write_npz(a->npz, u8, n, h, w, c, labels, msg, sizeof msg)) {
        fprintf(stderr, "lego-sample: %s\n", msg);
        return 0;
    }
    return 1;
}

int main(int argc, char **argv) {
    args a;
    if (!parse_args(argc, argv, &a)) return 2;
    uint64_t *seeds = NULL;
    int n = 0;
    if (!parse_seeds(a.seeds, &seeds, &n)) {
        fprintf(stderr, "lego-sample: bad --seeds '%s' (use e.g. 0-63 or 1,5,9-12)\n", a.seeds);
        return 2;
    }
    char default_path[4200];
    if (!a.model) {
        a.model = find_default_model(default_path, sizeof default_path);
        if (!a.model) {
            fprintf(stderr, "lego-sample: no --model given and the bundled model "
                            "(models/" DEFAULT_MODEL ") was not found\n");
            free(seeds);
            return 2;
        }
    }
    if (!a.out_dir && !a.grid && !a.npz)
        fprintf(stderr, "lego-sample: note: no --out, --grid or --npz; images are not saved\n");

    if (openblas_set_num_threads && !getenv("OPENBLAS_NUM_THREADS")) openblas_set_num_threads(1);
    lego_load_options lo;
    lego_load_options_init(&lo);
    lo.num_threads = a.threads;
    lo.backend = a.backend;
    lo.device = a.device;
    lo.precision = a.precision;
    lego_model *m = NULL;
    int status = 1;
    float *images = NULL;
    uint8_t *u8 = NULL;
    int32_t *labels = NULL, *used = NULL;
    if (lego_model_load(a.model, &lo, &m) != LEGO_OK) {
        fprintf(stderr, "lego-sample: %s\n", lego_model_error(m));
        goto done;
    }
    lego_model_config cfg;
    lego_model_config_init(&cfg);
    lego_model_get_config(m, &cfg);
    int h = a.height ? a.height : cfg.img_resolution, w = a.width ? a.width : cfg.img_resolution;
    int c = cfg.img_channels;
    if (h <= 0 || w <= 0) {
        fprintf(stderr, "lego-sample: the model has no resolution; give --height and --width\n");
        status = 2;
        goto done;
    }

    lego_skip_policy skip;
    if (!parse_skip(a.skip, &skip, m, a.steps)) {
        fprintf(stderr, "lego-sample: bad --skip '%s' (none, pg:0.5, pr:0.3, pg@1.0, ...; "
                "the model needs at least two bricks)\n", a.skip);
        status = 2;
        goto done;
    }
    lego_sample_options so;
    lego_sample_options_init(&so);
    so.solver = a.solver;
    so.steps = a.steps;
    so.guidance = a.cfg;
    so.rng = a.rng;
    so.s_churn = a.churn[0];
    so.s_min = a.churn[1];
    so.s_max = a.churn[2];
    so.s_noise = a.churn[3];
    so.skip = &skip;
    progress prog = {0, n, 0, now()};
    if (!a.quiet) {
        so.progress = show_progress;
        so.progress_user = &prog;
    }

    size_t chw = (size_t)c * h * w;
    images = malloc((size_t)a.batch * chw * sizeof *images);
    u8 = malloc((size_t)n * chw);
    labels = malloc((size_t)n * sizeof *labels);
    used = malloc((size_t)n * sizeof *used);
    if (!images || !u8 || !labels || !used) {
        fprintf(stderr, "lego-sample: out of memory for %d images of %dx%d\n", n, h, w);
        goto done;
    }
    int conditional = cfg.label_dim > 0;
    for (int i = 0; i < n; i++)
        labels[i] = a.have_class ? a.class_label : a.labels_cycle ? i % (conditional ? cfg.label_dim : 1) : -1;

    lego_sample_result total;
    lego_sample_result_init(&total);
    for (int first = 0; first < n; first += a.batch) {
        int count = n - first < a.batch ? n - first : a.batch;
        lego_sample_request r;
        lego_sample_request_init(&r);
        r.n = count;
        r.height = h;
        r.width = w;
        r.pad = a.pad;
        r.seeds = seeds + first;
        r.labels = conditional && (a.have_class || a.labels_cycle) ? labels + first : NULL;
        r.out = images;
        r.labels_out = used + first;
        lego_sample_result res;
        lego_sample_result_init(&res);
        prog.batch_images = count;
        if (lego_sample(m, &r, &so, &res) != LEGO_OK) {
            if (!a.quiet) fputc('\n', stderr);
            fprintf(stderr, "lego-sample: %s\n", lego_model_error(m));
            goto done;
        }
        prog.done_images += count;
        total.network_evals = res.network_evals;
        total.brick_evals_saved = res.brick_evals_saved;
        lego_images_to_u8(images, count, c, h, w, u8 + (size_t)first * chw);
    }
    double secs = now() - prog.start;
    if (!a.quiet) show_progress(0, 1, &prog), fputc('\n', stderr);
    fprintf(stderr, "lego-sample: %d images %dx%d in %.2f s (%.1f ms/image), %lld network "
            "evaluations per image, %lld brick evaluations saved per image\n",
            n, h, w, secs, 1e3 * secs / n, (long long)total.network_evals,
            (long long)total.brick_evals_saved);
    if (write_outputs(&a, u8, conditional ? used : NULL, n, h, w, c, seeds)) status = 0;

done:
    lego_model_free(m);
    free(images);
    free(u8);
    free(labels);
    free(used);
    free(seeds);
    return status;
}
