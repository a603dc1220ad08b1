/*
 * lego-bench -- how fast one network evaluation D(x; sigma) runs.
 *
 *   lego-bench [--model FILE | --preset NAME] [--batch N[,N...]] [--threads N]
 *              [--iters N] [--warmup N] [--size H[xW]] [--skip-top] [--cfg S]
 *              [--backend cpu|cuda] [--device N] [--precision P[,P...]]
 *              [--both] [--peak TFLOPS]
 *   lego-bench --sample [--steps N] [--solver heun|euler|dpm] [other options as above]
 *   lego-bench --list
 *
 * For every batch size it prints the median (and fastest) time of one
 * lego_denoise call after warm-up, images per second, the model FLOPs of
 * one evaluation counted analytically, and the FLOP rate that implies.
 *
 * Without --model or --preset it times the bundled Fashion-MNIST model
 * (models/lego_fmnist_pg32) when run from the source tree, else the small
 * random "tiny" model.  --preset
 * takes a library preset (lego_S_PG_64, dit_XL2_32, ...; --list shows them
 * with their sizes) or one of the short aliases (S-PG-64, DiT-S-64, ...),
 * built with random weights (lego_model_init_weights); the paper-sized ones
 * need gigabytes and are slow on a small CPU, so ask for them by name.
 *
 * --sample times whole lego_sample calls instead (Philox seeds 0..n-1,
 * random labels, --steps noise levels, 18 by default, Heun unless --solver
 * says otherwise; --skip-top drops the top brick for the second half of
 * the steps): ms per call, ms per image, network evaluations per image.
 * On a CUDA model the whole loop runs on the device (docs/cuda.md).
 *
 * FLOPs counted (2 per multiply-add), per image and evaluation:
 *   every linear layer: 2 * rows * in * out (patch embedding, qkv, proj,
 *     fc1, fc2, final linear per token; adaLN per image per block; the
 *     time/label embedders per image);
 *   attention: 4 * T^2 * D per sequence of T tokens and block (QK^T, PV);
 *   not counted: LayerNorm, softmax, GELU, SiLU, residuals, gather/scatter.
 * With guidance (--cfg S, S != 1, conditional model) the batch runs twice
 * (conditional and unconditional), and the count doubles accordingly.
 *
 * Threads: --threads sets the library's OpenMP workers.  OpenBLAS reads
 * OPENBLAS_NUM_THREADS when the program starts; with the pthreads OpenBLAS,
 * OPENBLAS_NUM_THREADS=1 lets liblego spread each GEMM over its own workers
 * (no second thread pool competing for the cores), which is usually
 * fastest.  OMP_WAIT_POLICY also matters when both pools run.
 *
 * --backend cuda moves the model to CUDA device --device (0) after it is
 * built or loaded (lego_model_set_backend); lego_denoise returns only when
 * the device is done, so the times are complete evaluations, host-device
 * copies of x and D(x) included.  --precision sets the model's GPU
 * arithmetic (lego_model_set_precision): fp32, bf16 or fp16, or a list of
 * them timed in turn on the same model; --both times every configuration
 * with and without the top brick.  The last column relates the
 * FLOP rate to the GPU's dense bf16 peak, --peak TFLOP/s (989.4: an H100
 * or H200 SXM, by the datasheet), whatever the precision timed.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lego.h"

#define DEFAULT_MODEL "models/lego_fmnist_pg32.safetensors"
#define MAX_BATCHES 32

/* ---- presets -------------------------------------------------------------
 * The library's presets (lego_preset_name: the reference architectures of
 * lego_models.py, the DiT baselines, fmnist_lego_pg32), built with random
 * weights.  The short names earlier versions used stay as aliases
 * (tools/gpu-checks.sh uses them), and "tiny" is a small model of our own
 * for a quick run without ../shared. */
static const struct { const char *alias, *name; } aliases[] = {
    {"fmnist", "fmnist_lego_pg32"},  {"S-PG-64", "lego_S_PG_64"},   {"S-PR-64", "lego_S_PR_64"},
    {"S-U-64", "lego_S_U_64"},       {"S-U-32", "lego_S_U_32"},     {"L-PG-64", "lego_L_PG_64"},
    {"L-PR-64", "lego_L_PR_64"},     {"L-U-32", "lego_L_U_32"},     {"XL-PG-32", "lego_XL_PG_32"},
    {"XL-PR-32", "lego_XL_PR_32"},   {"XL-U-32", "lego_XL_U_32"},   {"XL-PG-64", "lego_XL_PG_64"},
    {"DiT-S-64", "dit_S2_64"},       {"DiT-L-64", "dit_L2_64"},     {"DiT-XL-32", "dit_XL2_32"},
};
#define NUM_ALIASES (sizeof aliases / sizeof aliases[0])

static const char *resolve_alias(const char *name) {
    for (size_t i = 0; i < NUM_ALIASES; i++)
        if (strcmp(aliases[i].alias, name) == 0) return aliases[i].name;
    return name;
}

static void list_presets(void) {
    printf("%-17s %5s %5s %3s %4s %7s %9s  bricks (size/patch x depth)\n", "preset", "D",
           "heads", "C", "res", "classes", "params");
    for (int i = 0; i < lego_preset_count(); i++) {
        const char *name = lego_preset_name(i);
        lego_model_config c;
        lego_model_config_init(&c);
        int64_t n = 0;
        lego_preset_config(name, NULL, &c);
        lego_preset_num_params(name, NULL, &n);
        printf("%-17s %5d %5d %3d %4d %7d %8.1fM ", name, c.hidden_size, c.num_heads,
               c.img_channels, c.img_resolution, c.label_dim, (double)n / 1e6);
        for (int k = 0; k < lego_preset_num_bricks(name); k++) {
            lego_brick_config b;
            lego_brick_config_init(&b);
            lego_preset_get_brick(name, k, &b);
            printf(" %d/%dx%d", b.brick_size, b.patch_size, b.depth);
        }
        for (size_t a = 0; a < NUM_ALIASES; a++)
            if (strcmp(aliases[a].name, name) == 0) printf("  (alias %s)", aliases[a].alias);
        printf("\n");
    }
    printf("%-17s %5d %5d %3d %4d %7d %9s  4/2x1 16/8x1 32/2x2 (lego-bench's own)\n", "tiny", 64,
           4, 1, 32, 10, "");
}

/* "tiny": D 64, 4 heads, one channel, 10 classes, bricks 4/2x1 16/8x1 32/2x2. */
static lego_status build_tiny(int threads, lego_model **out) {
    lego_model_config cfg;
    lego_model_config_init(&cfg);
    cfg.img_channels = 1;
    cfg.img_resolution = 32;
    cfg.label_dim = 10;
    cfg.hidden_size = 64;
    cfg.num_heads = 4;
    cfg.num_threads = threads;
    lego_status s = lego_model_create(&cfg, out);
    const int bricks[3][3] = {{4, 2, 1}, {16, 8, 1}, {32, 2, 2}};
    for (int k = 0; s == LEGO_OK && k < 3; k++) {
        lego_brick_config b;
        lego_brick_config_init(&b);
        b.brick_size = bricks[k][0];
        b.patch_size = bricks[k][1];
        b.depth = bricks[k][2];
        s = lego_brick_add(*out, &b);
    }
    return s;
}

static lego_status build_preset(const char *name, int threads, lego_model **out) {
    lego_status s;
    if (strcmp(name, "tiny") == 0) {
        s = build_tiny(threads, out);
    } else {
        lego_preset_options o;
        lego_preset_options_init(&o);
        o.num_threads = threads;
        s = lego_model_create_preset(resolve_alias(name), &o, out);
    }
    if (s == LEGO_OK) s = lego_model_init_weights(*out, 1);
    return s;
}

/* ---- FLOPs ------------------------------------------------------------- */

/* Model FLOPs of one evaluation of n images of h x w through bricks
 * 0 .. bricks_run-1 (see the list at the top of the file). */
static double eval_flops(lego_model *m, int n, int h, int w, int bricks_run, int guided) {
    lego_model_config cfg;
    lego_model_config_init(&cfg);
    lego_model_get_config(m, &cfg);
    double D = cfg.hidden_size, C = cfg.img_channels, hid = (double)(int)(D * cfg.mlp_ratio);
    double per_image = 2 * (cfg.frequency_embedding_size * D + D * D) + 2 * cfg.label_dim * D;
    for (int k = 0; k < bricks_run; k++) {
        lego_brick_config b;
        lego_brick_config_init(&b);
        lego_model_get_brick(m, k, &b);
        double grid = b.brick_size / b.patch_size, T = grid * grid;
        double seqs = (double)(h / b.brick_size) * (w / b.brick_size), rows = seqs * T;
        double p2 = (double)b.patch_size * b.patch_size, c_in = k == 0 ? C + 2 : 2 * C + 2;
        double block = rows * 2 * (D * 3 * D + D * D + 2 * D * hid) /* qkv proj fc1 fc2 */
                       + seqs * 4 * T * T * D                        /* QK^T and PV       */
                       + 2 * D * 6 * D;                              /* adaLN             */
        per_image += 2 * rows * c_in * p2 * D + b.depth * block + 2 * D * 2 * D +
                     2 * rows * D * p2 * C;
    }
    return per_image * n * (guided ? 2 : 1);
}

/* ---- timing ------------------------------------------------------------ */

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Parse "1,8,100" into batches[]; returns the count, 0 on a bad list. */
static int parse_batches(const char *s, int *batches) {
    int count = 0;
    while (*s && count < MAX_BATCHES) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 1 || v > 1000000) return 0;
        batches[count++] = (int)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return 0;
    }
    return count;
}

/* Time `iters` evaluations of n images (after `warmup`) with the bottom
 * `run` bricks: the median and the fastest, in seconds.  0 on success. */
static int time_batch(lego_model *m, const lego_model_config *cfg, int n, int h, int w,
                      float guidance, int run, int warmup, int iters, double *times, double *med,
                      double *best) {
    size_t len = (size_t)n * cfg->img_channels * h * w;
    float *x = malloc(len * sizeof *x), *out = malloc(len * sizeof *out);
    float *sigma = malloc((size_t)n * sizeof *sigma);
    int32_t *labels = malloc((size_t)n * sizeof *labels);
    int status = 0;
    if (!x || !out || !sigma || !labels || !times) {
        fprintf(stderr, "lego-bench: out of memory for batch %d\n", n);
        status = 1;
    }
    for (size_t i = 0; status == 0 && i < len; i++)
        x[i] = (float)((int)(i * 2654435761u % 2001) - 1000) / 1000.0f;
    for (int i = 0; status == 0 && i < n; i++) {
        sigma[i] = 1.0f;
        labels[i] = cfg->label_dim > 0 ? i % cfg->label_dim : -1;
    }
    lego_denoise_request r;
    lego_denoise_request_init(&r);
    r.n = n;
    r.height = h;
    r.width = w;
    r.x = x;
    r.sigma = sigma;
    r.labels = cfg->label_dim > 0 ? labels : NULL;
    r.guidance = guidance;
    r.num_bricks = run;
    r.out = out;
    for (int it = 0; status == 0 && it < warmup + iters; it++) {
        double t0 = now_s();
        if (lego_denoise(m, &r) != LEGO_OK) {
            fprintf(stderr, "lego-bench: batch %d: %s\n", n, lego_model_error(m));
            status = 1;
        }
        if (it >= warmup) times[it - warmup] = now_s() - t0;
    }
    if (status == 0) {
        qsort(times, (size_t)iters, sizeof *times, compare_doubles);
        *med = iters % 2 ? times[iters / 2] : 0.5 * (times[iters / 2 - 1] + times[iters / 2]);
        *best = times[0];
    }
    free(x), free(out), free(sigma), free(labels);
    return status;
}

/* Time `iters` lego_sample calls of n images (after `warmup`): the median
 * and the fastest, in seconds, and the evaluations per image.  0 on
 * success. */
static int time_sample(lego_model *m, int n, int h, int w, float guidance, int skip_top,
                       lego_solver solver, int steps, int warmup, int iters, double *times,
                       double *med, double *best, int64_t *evals) {
    lego_model_config cfg;
    lego_model_config_init(&cfg);
    lego_model_get_config(m, &cfg);
    size_t len = (size_t)n * cfg.img_channels * h * w;
    float *out = malloc(len * sizeof *out);
    uint64_t *seeds = malloc((size_t)n * sizeof *seeds);
    int status = 0;
    if (!out || !seeds || !times) {
        fprintf(stderr, "lego-bench: out of memory for batch %d\n", n);
        status = 1;
    }
    for (int i = 0; status == 0 && i < n; i++) seeds[i] = (uint64_t)i;
    lego_sample_request r;
    lego_sample_request_init(&r);
    r.n = n;
    r.height = h;
    r.width = w;
    r.seeds = seeds;
    r.out = out;
    lego_sample_options o;
    lego_sample_options_init(&o);
    o.solver = solver;
    o.steps = steps;
    o.guidance = guidance;
    lego_skip_policy p;
    lego_skip_policy_init(&p);
    if (skip_top && lego_model_num_bricks(m) > 1 &&
        lego_skip_policy_preset(&p, m, LEGO_SKIP_TOP_AT_LOW_NOISE, steps, 0.5, 0) == LEGO_OK)
        o.skip = &p;
    lego_sample_result res;
    lego_sample_result_init(&res);
    for (int it = 0; status == 0 && it < warmup + iters; it++) {
        double t0 = now_s();
        if (lego_sample(m, &r, &o, &res) != LEGO_OK) {
            fprintf(stderr, "lego-bench: sample batch %d: %s\n", n, lego_model_error(m));
            status = 1;
        }
        if (it >= warmup) times[it - warmup] = now_s() - t0;
    }
    if (status == 0) {
        qsort(times, (size_t)iters, sizeof *times, compare_doubles);
        *med = iters % 2 ? times[iters / 2] : 0.5 * (times[iters / 2 - 1] + times[iters / 2]);
        *best = times[0];
        *evals = res.network_evals;
    }
    free(out), free(seeds);
    return status;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: lego-bench [--model FILE | --preset NAME] [--batch N[,N...]] [--threads N]\n"
            "                  [--iters N] [--warmup N] [--size H[xW]] [--skip-top] [--cfg S]\n"
            "                  [--backend cpu|cuda] [--device N] [--precision P[,P...]]\n"
            "                  [--both] [--peak TFLOPS]   (P: fp32, bf16, fp16)\n"
            "                  [--sample [--steps N] [--solver heun|euler|dpm]]\n"
            "       lego-bench --list\n"
            "Default model: %s if present, else the \"tiny\" preset.\n"
            "Environment: OPENBLAS_NUM_THREADS (1 lets liblego thread the GEMMs itself).\n",
            DEFAULT_MODEL);
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *preset_name = NULL;
    int batches[MAX_BATCHES] = {1, 100}, num_batches = 2;
    int threads = 0, iters = 5, warmup = 1, skip_top = 0, h = 0, w = 0, device = 0;
    float guidance = 1.0f;
    double peak_tflops = 989.4;
    lego_backend backend = LEGO_BACKEND_CPU;
    static const char *precision_names[] = {"fp32", "bf16", "fp16"};
    lego_precision precisions[8] = {LEGO_PRECISION_FP32};
    int num_precisions = 1, both = 0, sample = 0, steps = 18;
    lego_solver solver = LEGO_SOLVER_HEUN;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--list") == 0) {
            list_presets();
            return 0;
        } else if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--skip-top") == 0) {
            skip_top = 1;
            continue;
        } else if (strcmp(a, "--both") == 0) {
            both = 1;
            continue;
        } else if (strcmp(a, "--sample") == 0) {
            sample = 1;
            continue;
        }
        if (!v) {
            usage(stderr);
            return 2;
        }
        i++;
        if (strcmp(a, "--model") == 0) model_path = v;
        else if (strcmp(a, "--preset") == 0) preset_name = v;
        else if (strcmp(a, "--batch") == 0) num_batches = parse_batches(v, batches);
        else if (strcmp(a, "--threads") == 0) threads = atoi(v);
        else if (strcmp(a, "--iters") == 0) iters = atoi(v);
        else if (strcmp(a, "--warmup") == 0) warmup = atoi(v);
        else if (strcmp(a, "--cfg") == 0) guidance = strtof(v, NULL);
        else if (strcmp(a, "--device") == 0) device = atoi(v);
        else if (strcmp(a, "--steps") == 0) steps = atoi(v);
        else if (strcmp(a, "--solver") == 0) {
            if (strcmp(v, "heun") == 0) solver = LEGO_SOLVER_HEUN;
            else if (strcmp(v, "euler") == 0) solver = LEGO_SOLVER_EULER;
            else if (strcmp(v, "dpm") == 0) solver = LEGO_SOLVER_DPMPP_2M;
            else {
                usage(stderr);
                return 2;
            }
        }
        else if (strcmp(a, "--peak") == 0) peak_tflops = strtod(v, NULL);
        else if (strcmp(a, "--precision") == 0) {
            num_precisions = 0;
            for (const char *p = v; *p && num_precisions < 8;) {
                size_t len = strcspn(p, ",");
                int found = -1;
                for (int k = 0; k < 3; k++)
                    if (strlen(precision_names[k]) == len && strncmp(p, precision_names[k], len) == 0)
                        found = k;
                if (found < 0) {
                    usage(stderr);
                    return 2;
                }
                precisions[num_precisions++] = (lego_precision)found;
                p += len + (p[len] == ',');
            }
        }
        else if (strcmp(a, "--backend") == 0) {
            if (strcmp(v, "cpu") == 0) backend = LEGO_BACKEND_CPU;
            else if (strcmp(v, "cuda") == 0) backend = LEGO_BACKEND_CUDA;
            else {
                usage(stderr);
                return 2;
            }
        }
        else if (strcmp(a, "--size") == 0) {
            if (sscanf(v, "%dx%d", &h, &w) != 2) w = h = atoi(v);
        } else {
            usage(stderr);
            return 2;
        }
    }
    if (num_batches < 1 || iters < 1 || warmup < 0 || threads < 0 || guidance < 0 ||
        !(peak_tflops > 0) || steps < 1 || steps > 10000) {
        usage(stderr);
        return 2;
    }

    /* The model. */
    lego_model *m = NULL;
    lego_status s;
    const char *what;
    if (!model_path && !preset_name) {
        FILE *f = fopen(DEFAULT_MODEL, "rb");
        if (f) {
            fclose(f);
            model_path = DEFAULT_MODEL;
        } else {
            preset_name = "tiny";
        }
    }
    if (model_path) {
        lego_load_options o;
        lego_load_options_init(&o);
        o.num_threads = threads;
        s = lego_model_load(model_path, &o, &m);
        what = model_path;
    } else {
        s = build_preset(preset_name, threads, &m);
        what = resolve_alias(preset_name);
    }
    if (s == LEGO_OK && backend != LEGO_BACKEND_CPU) s = lego_model_set_backend(m, backend, device);
    if (s != LEGO_OK) {
        fprintf(stderr, "lego-bench: %s: %s\n", what, lego_model_error(m));
        lego_model_free(m);
        return 1;
    }

    lego_model_config cfg;
    lego_model_config_init(&cfg);
    lego_model_get_config(m, &cfg);
    int K = lego_model_num_bricks(m);
    if (h == 0) h = w = cfg.img_resolution;
    if (lego_model_check_resolution(m, h, w) != LEGO_OK) {
        fprintf(stderr, "lego-bench: %s\n", lego_model_error(m));
        lego_model_free(m);
        return 1;
    }
    int guided = cfg.label_dim > 0 && guidance != 1.0f && guidance != 0.0f;
    const char *blas_env = getenv("OPENBLAS_NUM_THREADS");

    printf("model    %s: %.2f M parameters, D=%d, %d heads, %dx%dx%d, %d classes\n", what,
           (double)lego_model_num_params(m) / 1e6, cfg.hidden_size, cfg.num_heads, h, w,
           cfg.img_channels, cfg.label_dim);
    printf("bricks  ");
    for (int k = 0; k < K; k++) {
        lego_brick_config b;
        lego_brick_config_init(&b);
        lego_model_get_brick(m, k, &b);
        printf(" %d/%dx%d", b.brick_size, b.patch_size, b.depth);
    }
    printf(" (size/patch x depth, bottom first)\n");
    if (backend == LEGO_BACKEND_CUDA)
        printf("backend  CUDA device %d; guidance %g; median of %d after %d warm-up\n", device,
               (double)guidance, iters, warmup);
    else
        printf("threads  %d liblego (0 = all cores), OPENBLAS_NUM_THREADS=%s; guidance %g; "
               "median of %d after %d warm-up\n",
               threads, blas_env ? blas_env : "(unset)", (double)guidance, iters, warmup);
    if (sample) {
        static const char *solver_names[] = {"heun", "euler", "dpm"};
        printf("sample   lego_sample, %s %d steps%s, Philox seeds 0..n-1\n", solver_names[solver],
               steps, skip_top ? ", top brick skipped in the second half" : "");
        printf("%-5s %7s %12s %12s %10s %10s %11s\n", "prec", "batch", "ms/sample", "min ms",
               "ms/image", "images/s", "evals/image");
        int status = 0;
        double *times = malloc((size_t)iters * sizeof *times);
        for (int pi = 0; pi < num_precisions && status == 0; pi++) {
            if (lego_model_set_precision(m, precisions[pi]) != LEGO_OK) {
                fprintf(stderr, "lego-bench: %s\n", lego_model_error(m));
                status = 1;
            }
            for (int bi = 0; bi < num_batches && status == 0; bi++) {
                int n = batches[bi];
                double med, best;
                int64_t evals = 0;
                status = time_sample(m, n, h, w, guidance, skip_top, solver, steps, warmup, iters,
                                     times, &med, &best, &evals);
                if (status == 0) {
                    printf("%-5s %7d %12.2f %12.2f %10.3f %10.1f %11lld\n",
                           precision_names[precisions[pi]], n, med * 1e3, best * 1e3,
                           med * 1e3 / n, n / med, (long long)evals);
                    fflush(stdout);
                }
            }
        }
        free(times);
        lego_model_free(m);
        return status;
    }
    printf("%-5s %6s %7s %12s %12s %10s %10s %12s %9s %8s\n", "prec", "bricks", "batch",
           "ms/eval", "min ms", "ms/image", "images/s", "GFLOP/eval", "GFLOP/s", "%peak");

    int status = 0;
    double *times = malloc((size_t)iters * sizeof *times);
    for (int pi = 0; pi < num_precisions && status == 0; pi++) {
        if (lego_model_set_precision(m, precisions[pi]) != LEGO_OK) {
            fprintf(stderr, "lego-bench: %s\n", lego_model_error(m));
            status = 1;
        }
        for (int variant = 0; variant < (both && K > 1 ? 2 : 1) && status == 0; variant++) {
            int run = (skip_top || variant == 1) && K > 1 ? K - 1 : K;
            for (int bi = 0; bi < num_batches && status == 0; bi++) {
                int n = batches[bi];
                double med, best;
                status = time_batch(m, &cfg, n, h, w, guidance, run, warmup, iters, times, &med,
                                    &best);
                if (status == 0) {
                    double flops = eval_flops(m, n, h, w, run, guided);
                    printf("%-5s %3d/%-2d %7d %12.2f %12.2f %10.3f %10.1f %12.3f %9.1f %7.1f%%\n",
                           precision_names[precisions[pi]], run, K, n, med * 1e3, best * 1e3,
                           med * 1e3 / n, n / med, flops * 1e-9, flops * 1e-9 / med,
                           100.0 * flops / med / (peak_tflops * 1e12));
                    fflush(stdout);
                }
            }
        }
    }
    free(times);
    lego_model_free(m);
    return status;
}
