/*
 * hello_lego.c -- a program outside the source tree, built by
 * `make check-pkgconfig` against an installed liblego with nothing but
 *
 *   cc hello_lego.c $(pkg-config --cflags --libs lego)
 *
 * It builds a two-brick model, initialises it, denoises one image and
 * checks the answer: with the reference initialisation the output layers
 * are zero, so D(x; sigma) = c_skip(sigma) x exactly.  Exit status 0 when
 * all is well.
 */
#include <lego.h>
#include <stdio.h>

#define FAIL(m)                                                                \
    do {                                                                       \
        fprintf(stderr, "hello_lego: %s\n", lego_model_error(m));              \
        lego_model_free(m);                                                    \
        return 1;                                                              \
    } while (0)

int main(void) {
    lego_model_config cfg;
    lego_model_config_init(&cfg);
    cfg.img_channels = 1;
    cfg.label_dim = 10;
    cfg.hidden_size = 32;
    cfg.num_heads = 2;
    cfg.num_threads = 1;
    lego_model *m = NULL;
    if (lego_model_create(&cfg, &m) != LEGO_OK) FAIL(m);
    const int sizes[2][3] = {{4, 2, 1}, {8, 2, 1}}; /* brick, patch, depth */
    for (int k = 0; k < 2; k++) {
        lego_brick_config b;
        lego_brick_config_init(&b);
        b.brick_size = sizes[k][0];
        b.patch_size = sizes[k][1];
        b.depth = sizes[k][2];
        if (lego_brick_add(m, &b) != LEGO_OK) FAIL(m);
    }
    if (lego_model_init_weights(m, 7) != LEGO_OK) FAIL(m);

    float x[8 * 8], out[8 * 8], sigma = 2.0f;
    int32_t label = 3;
    for (int i = 0; i < 64; i++) x[i] = (float)(i % 9) / 4.0f - 1.0f;
    lego_denoise_request r;
    lego_denoise_request_init(&r);
    r.n = 1;
    r.height = 8;
    r.width = 8;
    r.x = x;
    r.sigma = &sigma;
    r.labels = &label;
    r.out = out;
    if (lego_denoise(m, &r) != LEGO_OK) FAIL(m);

    double c_skip = 0.25 / (2.0 * 2.0 + 0.25), worst = 0;
    for (int i = 0; i < 64; i++) {
        double d = out[i] - c_skip * x[i];
        d = d < 0 ? -d : d; /* no fabs: the program links nothing but liblego */
        if (!(d <= worst)) worst = d;
    }
    printf("liblego %s: %lld parameters, max |D(x) - c_skip x| = %.3g\n", lego_version(),
           (long long)lego_model_num_params(m), worst);
    lego_model_free(m);
    return worst < 1e-6 ? 0 : 1;
}
