/*
 * lego-train -- train a LEGO diffusion model with liblego.
 *
 *   lego-train --data /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \
 *              --out runs/fmnist --steps 20000 --batch 256
 *
 * The default architecture is the Fashion-MNIST LEGO-PG of the reference (bricks 4/16/32 with
 * patches 2/8/2, depths 2/2/4, hidden 256, 4 heads, 10 classes).  Writes DIR/state.safetensors
 * (resumable training state), DIR/ema.safetensors (a checkpoint lego-sample reads) and
 * DIR/grid-STEP.png sample grids.  --steps counts from the start of training, so --resume
 * continues to the same end, and the data order is a function of the images seen, so a resumed
 * run sees the images a straight run would.  SIGINT or SIGTERM stops after the current step,
 * saving first.  Exit status 0 on success, 1 on failure, 2 on usage errors, 128 + the signal
 * when a signal stopped a run (its state saved).
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "lego.h"

extern void openblas_set_num_threads(int) __attribute__((weak));

static void usage(FILE *fp) {
    fprintf(fp,
        "usage: lego-train [options]\n"
        "  --data PATH        idx.gz images, a PNG folder or a dataset zip\n"
        "                     (default: Debian's Fashion-MNIST training set)\n"
        "  --out DIR          where state, EMA checkpoint and grids go (default runs/lego)\n"
        "  --init FILE        start from this checkpoint instead of a fresh model\n"
        "  --resume           continue from DIR/state.safetensors\n"
        "  --steps N          train until step N, counted from the start (a resumed\n"
        "                     run continues to it; default 1000)\n"
        "  --minutes X        stop after X minutes of training (saving and grids not\n"
        "                     counted), or at --steps, whichever comes first\n"
        "  --batch N          images per step (default 64)\n"
        "  --lr X             learning rate (default 1e-4)\n"
        "  --warmup N         linear warm-up steps (default 0)\n"
        "  --ema-kimg X       EMA half-life in thousands of images (default 500)\n"
        "  --label-dropout P  null-label probability, for guidance (default 0.1)\n"
        "  --hflip            random horizontal flips\n"
        "  --patch-fraction F patch-sampled brick training (paper eq. 12): each brick\n"
        "                     trains on this fraction of its patches (default 1: all)\n"
        "  --seed N           data order, noise and flips (default 0)\n"
        "  --every N          save state, EMA and a sample grid every N steps (default 500)\n"
        "  --grid N           images in each sample grid, 0 = no grids (default 20)\n"
        "  --threads N        CPU threads (default: all cores)\n"
        "  --backend cpu|cuda where the network trains (default cpu)\n"
        "  --device N         CUDA device index (default 0)\n"
        "  --precision P      fp32 or bf16 GEMM operands on the GPU (default fp32)\n"
        "  --bench N          time N steps (after 3 warm-up steps) of the Fashion-MNIST\n"
        "                     architecture on random 32x32 images, print images/s and\n"
        "                     ms/step, write nothing (no dataset needed)\n");
}

typedef struct args {
    const char *data, *out, *init;
    int resume, steps, batch, warmup, hflip, every, threads, device, bench, grid;
    lego_backend backend;
    lego_precision precision;
    double lr, ema_kimg, dropout, patch_fraction, minutes;
    uint64_t seed;
} args;

static int parse_args(int argc, char **argv, args *a) {
    memset(a, 0, sizeof *a);
    a->data = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz";
    a->out = "runs/lego";
    a->steps = 1000;
    a->batch = 64;
    a->lr = 1e-4;
    a->ema_kimg = 500;
    a->dropout = 0.1;
    a->every = 500;
    a->grid = 20;
    a->patch_fraction = 1;
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        int takes = 1, ok = 1;
        if (!strcmp(o, "--help") || !strcmp(o, "-h")) { usage(stdout); exit(0); }
        else if (!strcmp(o, "--resume")) { a->resume = 1; takes = 0; }
        else if (!strcmp(o, "--hflip")) { a->hflip = 1; takes = 0; }
        else if (!v) { fprintf(stderr, "lego-train: %s needs a value\n", o); return 0; }
        else if (!strcmp(o, "--data")) a->data = v;
        else if (!strcmp(o, "--out")) a->out = v;
        else if (!strcmp(o, "--init")) a->init = v;
        else if (!strcmp(o, "--steps")) ok = (a->steps = (int)strtol(v, &end, 10)) > 0 && !*end;
        else if (!strcmp(o, "--batch")) ok = (a->batch = (int)strtol(v, &end, 10)) > 0 && !*end;
        else if (!strcmp(o, "--warmup")) ok = (a->warmup = (int)strtol(v, &end, 10)) >= 0 && !*end;
        else if (!strcmp(o, "--every")) ok = (a->every = (int)strtol(v, &end, 10)) > 0 && !*end;
        else if (!strcmp(o, "--grid"))
            ok = (a->grid = (int)strtol(v, &end, 10)) >= 0 && a->grid <= 100 && !*end;
        else if (!strcmp(o, "--threads")) ok = (a->threads = (int)strtol(v, &end, 10)) >= 0 && !*end;
        else if (!strcmp(o, "--seed")) { a->seed = strtoull(v, &end, 10); ok = !*end; }
        else if (!strcmp(o, "--device")) ok = (a->device = (int)strtol(v, &end, 10)) >= 0 && !*end;
        else if (!strcmp(o, "--bench")) ok = (a->bench = (int)strtol(v, &end, 10)) > 0 && !*end;
        else if (!strcmp(o, "--backend")) {
            if (!strcmp(v, "cpu")) a->backend = LEGO_BACKEND_CPU;
            else if (!strcmp(v, "cuda")) a->backend = LEGO_BACKEND_CUDA;
            else ok = 0;
        }
        else if (!strcmp(o, "--precision")) {
            if (!strcmp(v, "fp32")) a->precision = LEGO_PRECISION_FP32;
            else if (!strcmp(v, "bf16")) a->precision = LEGO_PRECISION_BF16;
            else ok = 0;
        }
        else if (!strcmp(o, "--lr")) ok = (a->lr = strtod(v, &end)) > 0 && !*end;
        else if (!strcmp(o, "--ema-kimg")) ok = (a->ema_kimg = strtod(v, &end)) >= 0 && !*end;
        else if (!strcmp(o, "--minutes")) ok = (a->minutes = strtod(v, &end)) > 0 && !*end;
        else if (!strcmp(o, "--patch-fraction"))
            ok = (a->patch_fraction = strtod(v, &end)) > 0 && a->patch_fraction <= 1 && !*end;
        else if (!strcmp(o, "--label-dropout"))
            ok = (a->dropout = strtod(v, &end)) >= 0 && a->dropout <= 1 && !*end;
        else { fprintf(stderr, "lego-train: unknown option %s (see --help)\n", o); return 0; }
        if (!ok) { fprintf(stderr, "lego-train: bad value '%s' for %s\n", v, o); return 0; }
        i += takes;
    }
    return 1;
}

/* The reference Fashion-MNIST LEGO-PG (the library's fmnist_lego_pg32
 * preset) for the data's channels, classes and size. */
static lego_status fmnist_pg32(int channels, int labels, int resolution, int threads,
                               lego_model **out) {
    lego_preset_options o;
    lego_preset_options_init(&o);
    o.img_channels = channels;
    o.img_resolution = resolution;
    o.label_dim = labels;
    o.num_threads = threads;
    lego_status s = lego_model_create_preset("fmnist_lego_pg32", &o, out);
    if (s == LEGO_OK) s = lego_model_init_weights(*out, 0);
    return s;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* The model on the requested backend and precision. */
static int place_model(lego_model *m, const args *a) {
    if (a->backend == LEGO_BACKEND_CUDA &&
        lego_model_set_backend(m, LEGO_BACKEND_CUDA, a->device) != LEGO_OK) {
        fprintf(stderr, "lego-train: %s\n", lego_model_error(m));
        return 0;
    }
    if (lego_model_set_precision(m, a->precision) != LEGO_OK) {
        fprintf(stderr, "lego-train: %s\n", lego_model_error(m));
        return 0;
    }
    return 1;
}

/* --bench: training throughput of the Fashion-MNIST architecture on
 * random images (no dataset, nothing written). */
static int bench(const args *a) {
    const int c = 1, h = 32, classes = 10, warmup = 3;
    lego_model *m = NULL;
    lego_trainer *t = NULL;
    int ok = 0;
    size_t chw = (size_t)c * h * h;
    float *images = malloc((size_t)a->batch * chw * sizeof *images);
    int32_t *labels = malloc((size_t)a->batch * sizeof *labels);
    if (!images || !labels) {
        fprintf(stderr, "lego-train: out of memory\n");
        goto done;
    }
    uint64_t rs = a->seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < (size_t)a->batch * chw; i++) {
        rs ^= rs << 13, rs ^= rs >> 7, rs ^= rs << 17;
        images[i] = (float)((rs >> 40) / (double)(1 << 24)) * 2.0f - 1.0f;
    }
    for (int i = 0; i < a->batch; i++) labels[i] = i % classes;
    if (fmnist_pg32(c, classes, h, a->threads, &m) != LEGO_OK) {
        fprintf(stderr, "lego-train: %s\n", lego_model_error(m));
        goto done;
    }
    if (!place_model(m, a)) goto done;
    lego_train_options to;
    lego_train_options_init(&to);
    to.lr = a->lr;
    to.label_dropout = a->dropout;
    to.hflip = a->hflip;
    to.seed = a->seed;
    to.patch_fraction = a->patch_fraction;
    if (lego_trainer_create(m, &to, &t) != LEGO_OK) {
        fprintf(stderr, "lego-train: %s\n", lego_trainer_error(t));
        goto done;
    }
    lego_train_stats st;
    lego_train_stats_init(&st);
    double start = 0;
    for (int step = 0; step < warmup + a->bench; step++) {
        if (step == warmup) start = now();
        if (lego_trainer_step(t, images, labels, a->batch, &st) != LEGO_OK) {
            fprintf(stderr, "lego-train: %s\n", lego_trainer_error(t));
            goto done;
        }
    }
    double el = now() - start;
    printf("train-bench fmnist_lego_pg32 backend %s precision %s batch %d patch-fraction %g: "
           "%d steps, %.2f ms/step, %.0f images/s (loss %.4f, %.0f MiB on the device)\n",
           a->backend == LEGO_BACKEND_CUDA ? "cuda" : "cpu",
           a->precision == LEGO_PRECISION_BF16 ? "bf16" : "fp32", a->batch, a->patch_fraction,
           a->bench, 1e3 * el / a->bench, (double)a->bench * a->batch / el, st.loss,
           (double)lego_model_device_memory_usage(m) / (1 << 20));
    ok = 1;
done:
    free(images);
    free(labels);
    lego_trainer_free(t);
    lego_model_free(m);
    return ok;
}

/* A grid of n images from the EMA weights, classes in turn (unlabelled
 * models: the null label), 10 to a row. */
static int write_grid(const char *ema_path, const char *grid_path, int n, int threads) {
    lego_load_options lo;
    lego_load_options_init(&lo);
    lo.num_threads = threads;
    lego_model *m = NULL;
    int ok = 0;
    float *img = NULL;
    uint8_t *u8 = NULL;
    if (lego_model_load(ema_path, &lo, &m) != LEGO_OK) {
        fprintf(stderr, "lego-train: %s\n", lego_model_error(m));
        goto done;
    }
    lego_model_config cfg;
    lego_model_config_init(&cfg);
    lego_model_get_config(m, &cfg);
    int c = cfg.img_channels, h = cfg.img_resolution;
    int32_t labels[100];
    for (int i = 0; i < n; i++) labels[i] = cfg.label_dim > 0 ? i % cfg.label_dim : -1;
    img = malloc((size_t)n * c * h * h * sizeof *img);
    u8 = malloc((size_t)n * c * h * h);
    if (!img || !u8) goto done;
    lego_sample_request r;
    lego_sample_request_init(&r);
    r.n = n;
    r.height = h;
    r.width = h;
    r.labels = labels;
    r.out = img;
    lego_sample_options o;
    lego_sample_options_init(&o);
    o.solver = LEGO_SOLVER_DPMPP_2M; /* cheap and deterministic: a progress picture */
    o.steps = 12;
    char msg[512];
    if (lego_sample(m, &r, &o, NULL) != LEGO_OK) {
        fprintf(stderr, "lego-train: sampling: %s\n", lego_model_error(m));
        goto done;
    }
    lego_images_to_u8(img, n, c, h, h, u8);
    if (lego_write_png_grid(grid_path, u8, n, h, h, c, 10, 2, msg, sizeof msg) != LEGO_OK) {
        fprintf(stderr, "lego-train: %s\n", msg);
        goto done;
    }
    ok = 1;
done:
    free(img);
    free(u8);
    lego_model_free(m);
    return ok;
}

/* The signal that asked the run to stop (SIGINT, SIGTERM), or 0. */
static volatile sig_atomic_t stop_signal;

static void on_stop_signal(int sig) { stop_signal = sig; }

static void catch_stop_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sa.sa_flags = SA_RESETHAND; /* a second signal stops at once */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

/* Epoch e's visiting order: a Fisher-Yates shuffle driven by xorshift,
 * seeded by (seed, e), so any image's place in the stream follows from the
 * number of images seen before it. */
static void epoch_order(int64_t *order, int64_t count, uint64_t seed, int64_t epoch) {
    uint64_t rs = (seed * 0x9E3779B97F4A7C15ull) ^ ((uint64_t)epoch * 0xD1B54A32D192ED03ull);
    rs = rs ? rs : 1;
    for (int64_t j = 0; j < count; j++) order[j] = j;
    for (int64_t j = count - 1; j > 0; j--) {
        rs ^= rs << 13, rs ^= rs >> 7, rs ^= rs << 17;
        int64_t k = (int64_t)(rs % (uint64_t)(j + 1)), tmp = order[j];
        order[j] = order[k];
        order[k] = tmp;
    }
}

int main(int argc, char **argv) {
    args a;
    if (!parse_args(argc, argv, &a)) return 2;
    if (openblas_set_num_threads && !getenv("OPENBLAS_NUM_THREADS")) openblas_set_num_threads(1);
    if (a.bench) return bench(&a) ? 0 : 1;
    if (mkdir(a.out, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "lego-train: cannot create %s: %s\n", a.out, strerror(errno));
        return 1;
    }
    char state_path[4096], ema_path[4096], grid_path[4096];
    snprintf(state_path, sizeof state_path, "%s/state.safetensors", a.out);
    snprintf(ema_path, sizeof ema_path, "%s/ema.safetensors", a.out);

    int status = 1;
    lego_dataset *ds = NULL;
    lego_model *m = NULL;
    lego_trainer *t = NULL;
    float *images = NULL;
    int32_t *labels = NULL;
    int64_t *order = NULL, *idx = NULL;

    lego_dataset_options dopt;
    lego_dataset_options_init(&dopt);
    dopt.resolution = 32;
    if (lego_dataset_open(a.data, &dopt, &ds) != LEGO_OK) {
        fprintf(stderr, "lego-train: %s\n", lego_dataset_error(ds));
        goto done;
    }
    int c, h, w;
    lego_dataset_shape(ds, &c, &h, &w);
    int64_t count = lego_dataset_count(ds);
    int classes = lego_dataset_label_dim(ds);

    lego_status s;
    if (a.init) {
        lego_load_options lo;
        lego_load_options_init(&lo);
        lo.num_threads = a.threads;
        s = lego_model_load(a.init, &lo, &m);
    } else {
        s = fmnist_pg32(c, classes, h, a.threads, &m);
    }
    if (s != LEGO_OK) {
        fprintf(stderr, "lego-train: %s\n", lego_model_error(m));
        goto done;
    }
    if (!place_model(m, &a)) goto done;
    lego_train_options to;
    lego_train_options_init(&to);
    to.lr = a.lr;
    to.warmup_steps = a.warmup;
    to.ema_halflife_kimg = a.ema_kimg;
    to.label_dropout = classes > 0 ? a.dropout : 0;
    to.hflip = a.hflip;
    to.height = h;
    to.width = w;
    to.seed = a.seed;
    to.patch_fraction = a.patch_fraction;
    if (lego_trainer_create(m, &to, &t) != LEGO_OK) {
        fprintf(stderr, "lego-train: %s\n", lego_trainer_error(t));
        goto done;
    }
    if (a.resume && lego_trainer_load_state(t, state_path) != LEGO_OK) {
        fprintf(stderr, "lego-train: %s\n", lego_trainer_error(t));
        goto done;
    }

    size_t chw = (size_t)c * h * w;
    images = malloc((size_t)a.batch * chw * sizeof *images);
    labels = malloc((size_t)a.batch * sizeof *labels);
    order = malloc((size_t)count * sizeof *order);
    idx = malloc((size_t)a.batch * sizeof *idx);
    if (!images || !labels || !order || !idx) {
        fprintf(stderr, "lego-train: out of memory\n");
        goto done;
    }
    lego_train_stats st;
    lego_train_stats_init(&st);
    lego_trainer_get_stats(t, &st); /* step 0, or the resumed state's */
    const int64_t first_step = st.step;
    if (first_step >= a.steps) {
        fprintf(stderr, "lego-train: %s is at step %lld already (--steps %d)\n", state_path,
                (long long)first_step, a.steps);
        status = 0;
        goto done;
    }
    /* Where the resumed run left the data stream. */
    int64_t epoch = st.images_seen / count, pos = st.images_seen % count;
    epoch_order(order, count, a.seed, epoch);
    catch_stop_signals(); /* before the first line: a caller may signal once it sees it */
    fprintf(stderr, "lego-train: %lld images %dx%dx%d, %d classes, %lld parameters%s\n",
            (long long)count, c, h, w, classes, (long long)lego_model_num_params(m),
            first_step ? ", resumed" : "");
    if (first_step)
        fprintf(stderr, "lego-train: from step %lld (%lld images seen) to %d\n",
                (long long)first_step, (long long)st.images_seen, a.steps);
    double trained = 0; /* seconds in steps: saving and grids excluded */
    for (int64_t done_steps = 1;; done_steps++) {
        double t0 = now();
        for (int i = 0; i < a.batch; i++) {
            if (pos == count) {
                epoch_order(order, count, a.seed, ++epoch);
                pos = 0;
            }
            idx[i] = order[pos++];
        }
        if (lego_dataset_get_batch(ds, idx, a.batch, images, labels) != LEGO_OK) {
            fprintf(stderr, "\nlego-train: %s\n", lego_dataset_error(ds));
            goto done;
        }
        if (lego_trainer_step(t, images, classes > 0 ? labels : NULL, a.batch, &st) != LEGO_OK) {
            fprintf(stderr, "\nlego-train: %s\n", lego_trainer_error(t));
            goto done;
        }
        trained += now() - t0;
        double rate = (double)done_steps * a.batch / trained;
        double eta = (double)(a.steps - st.step) * trained / (double)done_steps;
        int last = st.step >= a.steps || stop_signal;
        if (a.minutes > 0) {
            double left = a.minutes * 60 - trained;
            if (left < eta) eta = left > 0 ? left : 0;
            if (left <= 0) last = 1;
        }
        fprintf(stderr, "\rstep %lld  %.1f img/s  loss %.4f  lr %.2e  %s  ETA %.0fs   ",
                (long long)st.step, rate, st.loss, st.lr, st.skipped ? "(skipped)" : "", eta);
        if (st.step % a.every == 0 || last) {
            snprintf(grid_path, sizeof grid_path, "%s/grid-%06lld.png", a.out, (long long)st.step);
            if (lego_trainer_save_state(t, state_path) != LEGO_OK ||
                lego_trainer_export_ema(t, ema_path) != LEGO_OK) {
                fprintf(stderr, "\nlego-train: %s\n", lego_trainer_error(t));
                goto done;
            }
            if (a.grid > 0 && !write_grid(ema_path, grid_path, a.grid, a.threads)) goto done;
            fprintf(stderr, "\nlego-train: saved %s, %s%s%s\n", state_path, ema_path,
                    a.grid > 0 ? ", " : "", a.grid > 0 ? grid_path : "");
        }
        if (last) {
            fprintf(stderr, "lego-train: %lld steps, %lld images in %.1f s of training (%.1f img/s)\n",
                    (long long)done_steps, (long long)done_steps * a.batch, trained, rate);
            break;
        }
    }
    if (stop_signal) {
        fprintf(stderr, "lego-train: stopped by signal %d at step %lld; continue with --resume\n",
                (int)stop_signal, (long long)st.step);
        status = 128 + stop_signal;
        goto done;
    }
    fputc('\n', stderr);
    status = 0;
done:
    free(images);
    free(labels);
    free(order);
    free(idx);
    lego_trainer_free(t);
    lego_model_free(m);
    lego_dataset_free(ds);
    return status;
}
