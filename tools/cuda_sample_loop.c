/*
 * cuda_sample_loop -- whole lego_sample calls on the GPU with the sampling
 * loop on the device (with and without step graphs) and driven from the
 * host (one evaluation at a time, x and D(x) copied each time), side by
 * side: ms per call and per image, host<->device copies per call, and the
 * largest difference between the device loop's images and the host loop's.
 *
 *   build/tools/cuda_sample_loop PRESET BATCH [fp32|bf16|fp16] [STEPS] [ITERS]
 *
 * Built by `make CUDA=1 build/tools/cuda_sample_loop` against the static
 * library (it switches the backend's internal options, src/backend_cuda.h).
 * Heun with STEPS noise levels (18), Philox seeds 0..n-1, random labels;
 * median of ITERS (3) calls after one warm-up per configuration.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend_cuda.h"
#include "lego.h"

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: cuda_sample_loop PRESET BATCH [fp32|bf16|fp16] [STEPS] [ITERS]\n");
        return 2;
    }
    int n = atoi(argv[2]), steps = argc > 4 ? atoi(argv[4]) : 18;
    int iters = argc > 5 ? atoi(argv[5]) : 3;
    if (n < 1 || steps < 1 || iters < 1 || iters > 100) {
        fprintf(stderr, "cuda_sample_loop: bad batch, steps or iterations\n");
        return 2;
    }
    lego_preset_options po;
    lego_preset_options_init(&po);
    po.backend = LEGO_BACKEND_CUDA;
    if (argc > 3) po.precision = strcmp(argv[3], "bf16") == 0   ? LEGO_PRECISION_BF16
                                 : strcmp(argv[3], "fp16") == 0 ? LEGO_PRECISION_FP16
                                                                : LEGO_PRECISION_FP32;
    lego_model *m = NULL;
    if (lego_model_create_preset(argv[1], &po, &m) != LEGO_OK ||
        lego_model_init_weights(m, 1) != LEGO_OK) {
        fprintf(stderr, "cuda_sample_loop: %s\n", lego_model_error(m));
        lego_model_free(m);
        return 1;
    }
    lego_model_config c;
    lego_model_config_init(&c);
    lego_model_get_config(m, &c);
    int h = c.img_resolution;
    size_t len = (size_t)n * c.img_channels * h * h;
    float *img[3];
    for (int v = 0; v < 3; v++) img[v] = malloc(len * sizeof(float));
    uint64_t *seeds = malloc((size_t)n * sizeof *seeds);
    if (!img[0] || !img[1] || !img[2] || !seeds) {
        fprintf(stderr, "cuda_sample_loop: out of memory\n");
        return 1;
    }
    for (int i = 0; i < n; i++) seeds[i] = (uint64_t)i;
    lego_sample_request r;
    lego_sample_request_init(&r);
    r.n = n;
    r.height = r.width = h;
    r.seeds = seeds;
    lego_sample_options o;
    lego_sample_options_init(&o);
    o.steps = steps;

    static const struct {
        const char *name;
        int device_loop, graphs;
    } variants[3] = {
        {"device loop, step graphs", 1, 1},
        {"device loop, no graphs", 1, 0},
        {"host loop (per-eval copies)", 0, 1},
    };
    printf("%s batch %d %s, Heun %d steps, median of %d\n", argv[1], n,
           argc > 3 ? argv[3] : "fp32", steps, iters);
    printf("%-28s %12s %10s %12s %8s\n", "variant", "ms/sample", "ms/image", "copies/call",
           "syncs");
    double times[100];
    int status = 0;
    for (int v = 0; v < 3 && status == 0; v++) {
        if (cuda_backend_set_option(m, CUDA_OPT_DEVICE_LOOP, variants[v].device_loop) != LEGO_OK ||
            cuda_backend_set_option(m, CUDA_OPT_GRAPHS, variants[v].graphs) != LEGO_OK) {
            fprintf(stderr, "cuda_sample_loop: the model is not on the CUDA backend\n");
            status = 1;
            break;
        }
        r.out = img[v];
        cuda_stats s0, s1;
        for (int it = 0; status == 0 && it <= iters; it++) {
            cuda_backend_stats(m, &s0);
            double t0 = now_s();
            if (lego_sample(m, &r, &o, NULL) != LEGO_OK) {
                fprintf(stderr, "cuda_sample_loop: %s\n", lego_model_error(m));
                status = 1;
            }
            if (it > 0) times[it - 1] = now_s() - t0;
            cuda_backend_stats(m, &s1);
        }
        if (status) break;
        qsort(times, (size_t)iters, sizeof *times, compare_doubles);
        double med = iters % 2 ? times[iters / 2] : 0.5 * (times[iters / 2 - 1] + times[iters / 2]);
        printf("%-28s %12.2f %10.3f %12llu %8s\n", variants[v].name, med * 1e3, med * 1e3 / n,
               (unsigned long long)(s1.host_copies - s0.host_copies),
               variants[v].device_loop ? "1" : "per eval");
    }
    if (status == 0) {
        double worst = 0, scale = 0;
        for (size_t i = 0; i < len; i++) {
            double d = fabs((double)img[0][i] - img[2][i]), a = fabs((double)img[2][i]);
            if (d > worst) worst = d;
            if (a > scale) scale = a;
        }
        printf("device loop vs host loop: max |difference| %.3g (largest value %.3g); "
               "graphs vs eager: %s\n", worst, scale,
               memcmp(img[0], img[1], len * sizeof(float)) == 0 ? "bit-identical" : "DIFFERENT");
    }
    for (int v = 0; v < 3; v++) free(img[v]);
    free(seeds);
    lego_model_free(m);
    return status;
}
