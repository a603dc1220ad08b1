/*
 * cuda_samples -- draw a checkpoint's samples on the GPU under the
 * backend's internal options, for the quality side of an A/B whose speed
 * side cuda_profile measures (for instance the residual stream in bf16):
 *
 *   build/tools/cuda_samples MODEL PRECISION N OUT.npz [--residual M] [--ln M]
 *                            [--attn M] [--steps S] [--batch B] [--compare REF.npz]
 *
 * Images 0..N-1 with seeds 0..N-1 and labels i mod classes, Heun with S
 * noise levels (18): the same images as `lego-sample --seeds 0-(N-1)
 * --labels cycle`, so `../shared/eval/fmnist_score.py OUT.npz` scores
 * them alike.  --compare prints how far each image is from the one at the
 * same index of REF.npz (a CPU or fp32 run), in 8-bit levels.
 *
 * Built by `make CUDA=1 build/tools/cuda_samples` against the static
 * library (the options are src/backend_cuda.h's); on the host emulation by
 * `make build/emu/cuda_samples`.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "backend_cuda.h"
#include "lego.h"
#include "zip.h"

#define MAX_BATCH 4096

/* The images of an .npz that lego_write_npz wrote (arr_0.npy, an .npy of
 * `want` uint8 values after its header), through the dataset reader's ZIP
 * code. */
static uint8_t *read_npz_images(const char *path, size_t want, char *msg, size_t msg_size) {
    lego_err err = {LEGO_OK, ""};
    ds_zip *z = NULL;
    uint8_t *buf = NULL, *img = NULL;
    size_t cap = 0;
    if (ds_zip_open(path, 1u << 20, &z, &err) == LEGO_OK && z->count > 0 &&
        strcmp(z->entries[0].name, "arr_0.npy") == 0 &&
        ds_zip_locate(z, &z->entries[0], &err) == LEGO_OK &&
        ds_zip_read(z, &z->entries[0], want + 4096, &buf, &cap, &err) == LEGO_OK) {
        size_t len = z->entries[0].usize;
        if (len > want && memcmp(buf, "\x93NUMPY", 6) == 0 && len - want == 10u + (size_t)(buf[8] | buf[9] << 8))
            img = malloc(want);
        if (img) memcpy(img, buf + (len - want), want);
        else if (err.status == LEGO_OK)
            snprintf(err.msg, sizeof err.msg, "%s: not %zu image bytes", path, want);
    }
    snprintf(msg, msg_size, "%s", err.msg[0] ? err.msg : "not an .npz of lego_write_npz");
    free(buf);
    if (z) ds_zip_close(z);
    return img;
}

static int parse_option(const char *name, const char *value, lego_model *m) {
    static const struct {
        const char *flag;
        int option;
    } opts[] = {{"--residual", CUDA_OPT_RESIDUAL},
                {"--ln", CUDA_OPT_LAYERNORM},
                {"--attn", CUDA_OPT_ATTENTION}};
    for (size_t i = 0; i < sizeof opts / sizeof opts[0]; i++)
        if (strcmp(name, opts[i].flag) == 0) return cuda_backend_set_option(m, opts[i].option,
                                                                            atoi(value));
    return -1;
}

int main(int argc, char **argv) {
    if (argc < 5 || argc % 2 == 0) {
        fprintf(stderr, "usage: cuda_samples MODEL fp32|bf16|fp16 N OUT.npz [--residual M] "
                        "[--ln M] [--attn M] [--steps S] [--batch B] [--compare REF.npz]\n");
        return 2;
    }
    const char *prec = argv[2], *out_path = argv[4], *ref_path = NULL;
    int n = atoi(argv[3]), steps = 18, batch = 500;
    lego_load_options lo;
    lego_load_options_init(&lo);
    lo.backend = LEGO_BACKEND_CUDA;
    lo.precision = strcmp(prec, "bf16") == 0   ? LEGO_PRECISION_BF16
                   : strcmp(prec, "fp16") == 0 ? LEGO_PRECISION_FP16
                                               : LEGO_PRECISION_FP32;
    lego_model *m = NULL;
    if (lego_model_load(argv[1], &lo, &m) != LEGO_OK) {
        fprintf(stderr, "cuda_samples: %s\n", lego_model_error(m));
        lego_model_free(m);
        return 1;
    }
    for (int i = 5; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--steps") == 0) steps = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--batch") == 0) batch = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--compare") == 0) ref_path = argv[i + 1];
        else if (parse_option(argv[i], argv[i + 1], m) != LEGO_OK) {
            fprintf(stderr, "cuda_samples: bad option %s %s\n", argv[i], argv[i + 1]);
            lego_model_free(m);
            return 2;
        }
    }
    lego_model_config c;
    lego_model_config_init(&c);
    lego_model_get_config(m, &c);
    if (n < 1 || n > 1000000 || steps < 1 || batch < 1 || batch > MAX_BATCH) {
        fprintf(stderr, "cuda_samples: bad count, steps or batch\n");
        lego_model_free(m);
        return 2;
    }
    const int h = c.img_resolution, ch = c.img_channels;
    const size_t per = (size_t)ch * h * h;
    float *x = malloc((size_t)batch * per * sizeof *x);
    uint8_t *u8 = malloc((size_t)n * per);
    uint64_t *seeds = malloc((size_t)n * sizeof *seeds);
    int32_t *labels = malloc((size_t)n * sizeof *labels);
    int status = x && u8 && seeds && labels ? 0 : 1;
    for (int i = 0; status == 0 && i < n; i++) {
        seeds[i] = (uint64_t)i;
        labels[i] = c.label_dim > 0 ? i % c.label_dim : -1;
    }
    lego_sample_options o;
    lego_sample_options_init(&o);
    o.steps = steps;
    for (int first = 0; status == 0 && first < n; first += batch) {
        lego_sample_request r;
        lego_sample_request_init(&r);
        r.n = n - first < batch ? n - first : batch;
        r.height = r.width = h;
        r.seeds = seeds + first;
        r.labels = c.label_dim > 0 ? labels + first : NULL;
        r.out = x;
        if (lego_sample(m, &r, &o, NULL) != LEGO_OK ||
            lego_images_to_u8(x, r.n, ch, h, h, u8 + (size_t)first * per) != LEGO_OK) {
            fprintf(stderr, "cuda_samples: %s\n", lego_model_error(m));
            status = 1;
        }
    }
    char msg[256] = "out of memory";
    if (status == 0 && lego_write_npz(out_path, u8, n, h, h, ch, c.label_dim > 0 ? labels : NULL,
                                      msg, sizeof msg) != LEGO_OK)
        status = 1;
    if (status == 0 && ref_path) {
        uint8_t *ref = read_npz_images(ref_path, (size_t)n * per, msg, sizeof msg);
        if (!ref) status = 1;
        /* Per image: the largest and the mean absolute difference in 8-bit
         * levels; then their distribution over the images. */
        double worst = 0, mean = 0;
        int same = 0, over8 = 0;
        for (int i = 0; ref && i < n; i++) {
            double w = 0, s = 0;
            for (size_t j = 0; j < per; j++) {
                double d = fabs((double)u8[i * per + j] - ref[i * per + j]);
                s += d;
                if (d > w) w = d;
            }
            worst = w > worst ? w : worst;
            mean += s / (double)per / n;
            same += w == 0;
            over8 += w > 8;
        }
        if (ref)
            printf("against %s: %d of %d images identical, %d with a pixel more than 8 levels "
                   "off; largest difference %.0f levels, mean %.4f\n",
                   ref_path, same, n, over8, worst, mean);
        free(ref);
    }
    if (status) fprintf(stderr, "cuda_samples: %s\n", msg);
    else printf("%d images (%s, Heun %d) to %s\n", n, prec, steps, out_path);
    free(x);
    free(u8);
    free(seeds);
    free(labels);
    lego_model_free(m);
    return status;
}
