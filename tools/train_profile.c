/*
 * train_profile -- training throughput on the GPU and where a step's time
 * goes (uploads and loss, GEMMs, attention, row kernels, column sums,
 * optimiser), for the Fashion-MNIST architecture on random images.
 *
 *   build/tools/train_profile [BATCH] [fp32|bf16] [PATCH_FRACTION] [ATTENTION] [TUNE]
 *                             [EPILOGUES] [LN_SUMS]
 *
 * ATTENTION sets CUDA_OPT_TRAIN_ATTENTION (src/backend_cuda.h: 0 the
 * default, 3 the flash kernels everywhere, 4 the GEMMs as before them),
 * TUNE CUDA_OPT_TRAIN_AUTOTUNE (1: the GEMMs' algorithms timed), EPILOGUES
 * CUDA_OPT_TRAIN_EPILOGUES (1, the default: cuBLASLt's GELU and bias-gradient
 * fusions where offered; 0: the kernels), LN_SUMS CUDA_OPT_TRAIN_LN_SUMS (1, the
 * default: the LayerNorm backward kernels make their column sums; 0: passes
 * of their own).
 * Built by `make CUDA=1 build/tools/train_profile` against the static
 * library (it reads the training profile, src/backend_cuda.h).  First
 * 3 warm-up steps and 10 timed steps as lego-train --bench runs them, then
 * 5 steps with the profile on (every part synchronised, so they add up to
 * somewhat more than a plain step).
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend_cuda.h"
#include "lego.h"

static const char *part_names[CUDA_TPROF_PARTS] = {"input+loss", "gemm", "attention",
                                                   "rows",       "sums", "optimizer"};

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec * 1e-6;
}

static int steps(lego_trainer *t, const float *images, const int32_t *labels, int n, int count) {
    for (int i = 0; i < count; i++)
        if (lego_trainer_step(t, images, labels, n, NULL) != LEGO_OK) {
            fprintf(stderr, "train_profile: %s\n", lego_trainer_error(t));
            return 0;
        }
    return 1;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 256;
    int bf16 = argc > 2 && strcmp(argv[2], "bf16") == 0;
    double fraction = argc > 3 ? atof(argv[3]) : 0;
    int attention = argc > 4 ? atoi(argv[4]) : 0, tune = argc > 5 ? atoi(argv[5]) : 0;
    int epilogues = argc > 6 ? atoi(argv[6]) : 1, ln_sums = argc > 7 ? atoi(argv[7]) : 1;
    if (n < 1) {
        fprintf(stderr,
                "usage: train_profile [BATCH] [fp32|bf16] [PATCH_FRACTION] [ATTENTION] [TUNE] "
                "[EPILOGUES] [LN_SUMS]\n");
        return 2;
    }
    lego_preset_options o;
    lego_preset_options_init(&o);
    o.backend = LEGO_BACKEND_CUDA;
    o.precision = bf16 ? LEGO_PRECISION_BF16 : LEGO_PRECISION_FP32;
    lego_model *m = NULL;
    lego_trainer *t = NULL;
    int status = 1;
    size_t chw = 32 * 32;
    float *images = malloc((size_t)n * chw * sizeof *images);
    int32_t *labels = malloc((size_t)n * sizeof *labels);
    if (!images || !labels) goto done;
    uint64_t rs = 88172645463325252ull;
    for (size_t i = 0; i < (size_t)n * chw; i++) {
        rs ^= rs << 13, rs ^= rs >> 7, rs ^= rs << 17;
        images[i] = (float)((rs >> 40) / (double)(1 << 24)) * 2.0f - 1.0f;
    }
    for (int i = 0; i < n; i++) labels[i] = i % 10;
    if (lego_model_create_preset("fmnist_lego_pg32", &o, &m) != LEGO_OK ||
        lego_model_init_weights(m, 0) != LEGO_OK ||
        cuda_backend_set_option(m, CUDA_OPT_TRAIN_ATTENTION, attention) != LEGO_OK ||
        cuda_backend_set_option(m, CUDA_OPT_TRAIN_AUTOTUNE, tune) != LEGO_OK ||
        cuda_backend_set_option(m, CUDA_OPT_TRAIN_EPILOGUES, epilogues) != LEGO_OK ||
        cuda_backend_set_option(m, CUDA_OPT_TRAIN_LN_SUMS, ln_sums) != LEGO_OK) {
        fprintf(stderr, "train_profile: %s\n", lego_model_error(m));
        goto done;
    }
    lego_train_options to;
    lego_train_options_init(&to);
    to.label_dropout = 0.1;
    to.patch_fraction = fraction;
    if (lego_trainer_create(m, &to, &t) != LEGO_OK) {
        fprintf(stderr, "train_profile: %s\n", lego_trainer_error(t));
        goto done;
    }
    if (!steps(t, images, labels, n, 3)) goto done;
    const int timed = 10, profiled = 5;
    double start = now_ms();
    if (!steps(t, images, labels, n, timed)) goto done;
    double ms = (now_ms() - start) / timed;
    cuda_stats st;
    memset(&st, 0, sizeof st);
    cuda_backend_stats(m, &st);
    printf("train_profile fmnist_lego_pg32 %s batch %d patch-fraction %g attention %d tune %d "
           "epilogues %d ln-sums %d: %.2f ms/step, %.0f images/s, %.0f MiB on the device "
           "(GEMM epilogue fusions %llu run, %llu refused, %llu rejected by their check%s%s)\n",
           bf16 ? "bf16" : "fp32", n, fraction, attention, tune, epilogues, ln_sums, ms,
           1e3 * n / ms, (double)lego_model_device_memory_usage(m) / (1 << 20),
           (unsigned long long)st.fused_runs, (unsigned long long)st.fused_refused,
           (unsigned long long)st.fused_rejected, st.fusion_note[0] ? ": " : "",
           st.fusion_note);
    double parts[CUDA_TPROF_PARTS] = {0};
    if (cuda_train_profile(m, 1, NULL) != LEGO_OK) {
        fprintf(stderr, "train_profile: %s\n", lego_model_error(m));
        goto done;
    }
    start = now_ms();
    if (!steps(t, images, labels, n, profiled)) goto done;
    double total = (now_ms() - start) / profiled;
    cuda_train_profile(m, 0, parts);
    printf("  profiled step %.2f ms:", total);
    for (int i = 0; i < CUDA_TPROF_PARTS; i++)
        printf(" %s %.2f", part_names[i], parts[i] / profiled);
    printf(" (ms)\n");
    status = 0;
done:
    free(images);
    free(labels);
    lego_trainer_free(t);
    lego_model_free(m);
    return status;
}
