/*
 * lego-denoise -- the smallest complete liblego program: load a checkpoint,
 * denoise one noisy image, report how far D(x; sigma) moved it.
 *
 *   lego-denoise MODEL.safetensors [SIGMA]
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "lego.h"

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: lego-denoise MODEL.safetensors [SIGMA]\n");
        return 2;
    }
    float sigma = argc > 2 ? strtof(argv[2], NULL) : 1.0f;

    lego_model *model = NULL;
    if (lego_model_load(argv[1], NULL, &model) != LEGO_OK) {
        fprintf(stderr, "lego-denoise: %s\n", lego_model_error(model));
        lego_model_free(model);
        return 1;
    }
    lego_model_config cfg;
    lego_model_config_init(&cfg);
    lego_model_get_config(model, &cfg);
    int res = cfg.img_resolution, c = cfg.img_channels;
    size_t len = (size_t)c * res * res;
    float *x = malloc(len * sizeof *x), *d = malloc(len * sizeof *d);
    for (size_t i = 0; i < len; i++) x[i] = sigma * (float)((int)(i * 2654435761u % 2001) - 1000) / 577.0f;

    lego_denoise_request req;
    lego_denoise_request_init(&req);
    req.n = 1;
    req.height = res;
    req.width = res;
    req.x = x;
    req.sigma = &sigma;
    req.out = d;
    int status = 0;
    if (lego_denoise(model, &req) != LEGO_OK) {
        fprintf(stderr, "lego-denoise: %s\n", lego_model_error(model));
        status = 1;
    } else {
        double moved = 0;
        for (size_t i = 0; i < len; i++) moved += fabs((double)d[i] - x[i]);
        printf("%d bricks, %lld parameters; mean |D(x) - x| = %.4f at sigma %g\n",
               lego_model_num_bricks(model), (long long)lego_model_num_params(model),
               moved / (double)len, sigma);
    }
    free(x);
    free(d);
    lego_model_free(model);
    return status;
}
