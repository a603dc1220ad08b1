/*
 * cuda_profile -- where one evaluation of a preset spends its time on the
 * GPU, part by part (GEMMs by layer, attention, LayerNorm, ...).
 *
 *   build/tools/cuda_profile PRESET BATCH [fp32|bf16|fp16] [--skip-top]
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

#include "backend_cuda.h"
#include "lego.h"

static const char *part_names[CUDA_PROF_PARTS] = {
    "input+cond", "adaLN", "gather+embed", "layernorm", "qkv",
    "attention",  "proj",  "fc1+gelu",     "fc2",       "final+out",
};

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: cuda_profile PRESET BATCH [fp32|bf16|fp16] [--skip-top]\n");
        return 2;
    }
    int n = atoi(argv[2]), skip_top = argc > 4 && strcmp(argv[4], "--skip-top") == 0;
    lego_preset_options o;
    lego_preset_options_init(&o);
    o.backend = LEGO_BACKEND_CUDA;
    if (argc > 3) o.precision = strcmp(argv[3], "bf16") == 0   ? LEGO_PRECISION_BF16
                                : strcmp(argv[3], "fp16") == 0 ? LEGO_PRECISION_FP16
                                                               : LEGO_PRECISION_FP32;
    lego_model *m = NULL;
    if (lego_model_create_preset(argv[1], &o, &m) != LEGO_OK ||
        lego_model_init_weights(m, 1) != LEGO_OK) {
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
    ok = ok && cuda_backend_set_option(m, CUDA_OPT_PROFILE, 2) == LEGO_OK;
    for (int i = 0; ok && i < reps; i++) ok = lego_denoise(m, &r) == LEGO_OK;
    cuda_stats st;
    if (!ok || cuda_backend_stats(m, &st) != LEGO_OK) {
        fprintf(stderr, "cuda_profile: %s\n", lego_model_error(m));
        return 1;
    }
    double total = 0;
    for (int p = 0; p < CUDA_PROF_PARTS; p++) total += st.profile_ms[p] / reps;
    printf("profile %s batch %d %s, %d/%d bricks: %.2f ms per evaluation (synchronised parts)\n",
           argv[1], n, argc > 3 ? argv[3] : "fp32", r.num_bricks, K, total);
    for (int p = 0; p < CUDA_PROF_PARTS; p++)
        printf("  %-13s %9.3f ms %5.1f%%\n", part_names[p], st.profile_ms[p] / reps,
               100.0 * st.profile_ms[p] / reps / total);
    free(x), free(out), free(sigma);
    lego_model_free(m);
    return 0;
}
