/*
 * cuda_profile -- where one evaluation of a preset spends its time on the
 * GPU, part by part (GEMMs by layer, attention, LayerNorm, ...).
 *
 *   build/tools/cuda_profile PRESET BATCH [fp32|bf16|fp16] [--skip-top] [--attn MODE] [--ln MODE]
 *                            [--residual MODE]
 *
 * --attn sets CUDA_OPT_ATTENTION (0 automatic, 3 the tensor-core kernel
 * with 32 query rows per warp, 4 cuDNN, 5 never cuDNN: src/backend_cuda.h) for an
 * A/B timing; a "cudnn" line says whether cuDNN was loaded and ran.  --ln
 * sets CUDA_OPT_LAYERNORM (0 one warp per row, 1 tiles per image), --residual
 * CUDA_OPT_RESIDUAL (0 an fp32 residual stream, 1 the operand type's).
 * Before the profile it times whole evaluations (graphs on, as lego-bench;
 * host copies included): the median of 5 after the warm-ups.
 *
 * Built by `make CUDA=1 build/tools/cuda_profile` against the static
 * library (it reads the backend's internal counters, src/backend_cuda.h).
 * The backend synchronises after every part while profiling, so the parts
 * add up to a little more than an unprofiled evaluation (lego-bench).
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend_cuda.h"
#include "lego.h"

static const char *part_names[CUDA_PROF_PARTS] = {
    "input+cond", "adaLN", "gather+embed", "layernorm", "qkv",
    "attention",  "proj",  "fc1+gelu",     "fc2",       "final+out",
};

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: cuda_profile PRESET BATCH [fp32|bf16|fp16] [--skip-top] "
                        "[--attn MODE] [--ln MODE] [--residual MODE]\n");
        return 2;
    }
    int n = atoi(argv[2]), skip_top = 0, attn = -1, ln = 0, residual = 0;
    const char *prec = "fp32";
    for (int i = 3; i < argc; i++) {
        if (strcmp(argv[i], "--skip-top") == 0)
            skip_top = 1;
        else if (strcmp(argv[i], "--attn") == 0 && i + 1 < argc)
            attn = atoi(argv[++i]);
        else if (strcmp(argv[i], "--ln") == 0 && i + 1 < argc)
            ln = atoi(argv[++i]);
        else if (strcmp(argv[i], "--residual") == 0 && i + 1 < argc)
            residual = atoi(argv[++i]);
        else if (i == 3)
            prec = argv[i];
        else {
            fprintf(stderr, "cuda_profile: unknown argument %s\n", argv[i]);
            return 2;
        }
    }
    lego_preset_options o;
    lego_preset_options_init(&o);
    o.backend = LEGO_BACKEND_CUDA;
    o.precision = strcmp(prec, "bf16") == 0   ? LEGO_PRECISION_BF16
                  : strcmp(prec, "fp16") == 0 ? LEGO_PRECISION_FP16
                                              : LEGO_PRECISION_FP32;
    lego_model *m = NULL;
    if (lego_model_create_preset(argv[1], &o, &m) != LEGO_OK ||
        lego_model_init_weights(m, 1) != LEGO_OK ||
        (attn >= 0 && cuda_backend_set_option(m, CUDA_OPT_ATTENTION, attn) != LEGO_OK) ||
        cuda_backend_set_option(m, CUDA_OPT_LAYERNORM, ln) != LEGO_OK ||
        cuda_backend_set_option(m, CUDA_OPT_RESIDUAL, residual) != LEGO_OK) {
        fprintf(stderr, "cuda_profile: %s\n", lego_model_error(m));
        lego_model_free(m);
        return 1;
    }
    lego_model_config c;
    lego_model_config_init(&c);
    lego_model_get_config(m, &c);
    int h = c.img_resolution, K = lego_model_num_bricks(m);
    size_t len = (size_t)n * c.img_channels * h * h;
    float *x = calloc(len, sizeof *x), *out = malloc(len * sizeof *out);
    float *sigma = malloc((size_t)n * sizeof *sigma);
    for (int i = 0; x && sigma && i < n; i++) sigma[i] = 1.0f;
    lego_denoise_request r;
    lego_denoise_request_init(&r);
    r.n = n;
    r.height = r.width = h;
    r.x = x;
    r.sigma = sigma;
    r.out = out;
    r.num_bricks = skip_top && K > 1 ? K - 1 : K;
    const int reps = 3;
    int ok = x && out && sigma;
    for (int i = 0; ok && i < 2; i++) ok = lego_denoise(m, &r) == LEGO_OK; /* warm-up, tuning */
    double wall[5];
    for (int i = 0; ok && i < 5; i++) {
        double t0 = now_ms();
        ok = lego_denoise(m, &r) == LEGO_OK;
        wall[i] = now_ms() - t0;
    }
    if (ok) {
        qsort(wall, 5, sizeof wall[0], cmp_double);
        printf("eval %s batch %d %s attn %d ln %d, %d/%d bricks: %.2f ms per evaluation (median "
               "of 5, min %.2f)\n",
               argv[1], n, prec, attn < 0 ? 0 : attn, ln, r.num_bricks, K, wall[2], wall[0]);
    }
    ok = ok && cuda_backend_set_option(m, CUDA_OPT_PROFILE, 2) == LEGO_OK;
    for (int i = 0; ok && i < reps; i++) ok = lego_denoise(m, &r) == LEGO_OK;
    cuda_stats st;
    if (!ok || cuda_backend_stats(m, &st) != LEGO_OK) {
        fprintf(stderr, "cuda_profile: %s\n", lego_model_error(m));
        return 1;
    }
    double total = 0;
    for (int p = 0; p < CUDA_PROF_PARTS; p++) total += st.profile_ms[p] / reps;
    printf("profile %s batch %d %s attn %d ln %d, %d/%d bricks: %.2f ms per evaluation "
           "(synchronised parts)\n",
           argv[1], n, prec, attn < 0 ? 0 : attn, ln, r.num_bricks, K, total);
    for (int p = 0; p < CUDA_PROF_PARTS; p++)
        printf("  %-13s %9.3f ms %5.1f%%\n", part_names[p], st.profile_ms[p] / reps,
               100.0 * st.profile_ms[p] / reps / total);
    printf("cudnn loaded %d version %ld plans %llu runs %llu graph %d; attention shapes %llu, "
           "%llu on cuDNN, %llu timed%s%s\n",
           st.cudnn_available, st.cudnn_version, (unsigned long long)st.cudnn_plans,
           (unsigned long long)st.cudnn_runs, st.cudnn_last_graph,
           (unsigned long long)st.attn_decided, (unsigned long long)st.attn_cudnn_shapes,
           (unsigned long long)st.attn_timed, st.cudnn_note[0] ? " -- " : "", st.cudnn_note);
    printf("fc1's GELU: %s\n", st.gelu_note);
    free(x), free(out), free(sigma);
    lego_model_free(m);
    return 0;
}
