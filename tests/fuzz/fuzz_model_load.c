/*
 * fuzz_model_load.c -- libFuzzer harness for checkpoints: the safetensors
 * reader, the lego.config parser and the tensor-to-parameter matching.
 *
 * The first input byte picks the entry point, the rest is the file:
 *   0  lego_model_load(file), architecture from the file's metadata;
 *   1  lego_model_load(file) with lego_load_options.config_json: the bytes
 *      up to the first NUL are the JSON, the bytes after it the file;
 *   2  lego_model_load_weights(file) into a fixed small model, which must
 *      keep its weights when the call fails.
 * A model that loads runs one small denoise (its weights may be anything,
 * NaN included: the call must still succeed).
 */
#include "fuzz_util.h"

#include <math.h>

static fuzz_file file;
static lego_model *target; /* mode 2 */

/* A cheap fingerprint of all weights. */
static uint64_t weights_hash(lego_model *m) {
    int64_t n = lego_model_num_params(m);
    float *p = malloc((size_t)n * sizeof *p);
    FUZZ_REQUIRE(p && lego_model_get_params(m, p, n) == LEGO_OK, "get_params");
    uint64_t h = 1469598103934665603ull;
    const unsigned char *b = (const unsigned char *)p;
    for (size_t i = 0; i < (size_t)n * sizeof *p; i++) h = (h ^ b[i]) * 1099511628211ull;
    free(p);
    return h;
}

/* A loaded model must denoise one small image when its size allows. */
static void exercise(lego_model *m) {
    int r = lego_model_resolution_multiple(m);
    lego_model_config c;
    lego_model_config_init(&c);
    FUZZ_REQUIRE(lego_model_get_config(m, &c) == LEGO_OK, "get_config");
    FUZZ_REQUIRE(lego_model_num_bricks(m) >= 1, "a loaded model has bricks");
    if (r < 2 || r > 16 || c.img_channels > 4 || lego_model_num_params(m) > (1 << 20)) return;
    size_t len = (size_t)c.img_channels * (size_t)r * (size_t)r;
    float *x = calloc(len, sizeof *x), *out = malloc(len * sizeof *out), sigma = 1.0f;
    FUZZ_REQUIRE(x && out, "out of memory in the harness");
    int32_t label = c.label_dim > 0 ? 0 : -1;
    lego_denoise_request q;
    lego_denoise_request_init(&q);
    q.n = 1;
    q.height = q.width = r;
    q.x = x;
    q.sigma = &sigma;
    q.labels = &label;
    q.out = out;
    lego_status s = lego_denoise(m, &q);
    FUZZ_REQUIRE(s == LEGO_OK, "denoise of a loaded model: %s", lego_model_error(m));
    free(x);
    free(out);
}

static void load(const uint8_t *data, size_t size, const char *config_json) {
    fuzz_file_set(&file, data, size);
    lego_load_options o;
    lego_load_options_init(&o);
    o.num_threads = 1;
    o.config_json = config_json;
    lego_model *m = NULL;
    lego_status s = lego_model_load(file.path, &o, &m);
    FUZZ_REQUIRE(fuzz_known_status(s), "status %d", (int)s);
    if (s == LEGO_OK) {
        FUZZ_REQUIRE(m != NULL, "success without a model");
        exercise(m);
    } else if (m) {
        FUZZ_REQUIRE(lego_model_error(m)[0] != '\0', "failure %d without a message", (int)s);
        FUZZ_REQUIRE(lego_model_num_bricks(m) == 0, "a failed handle reports bricks");
    }
    lego_model_free(m);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    int mode = data[0] % 3;
    data++;
    size--;
    if (mode == 0) {
        load(data, size, NULL);
    } else if (mode == 1) {
        const uint8_t *nul = memchr(data, 0, size);
        size_t json_len = nul ? (size_t)(nul - data) : size;
        char *json = malloc(json_len + 1);
        FUZZ_REQUIRE(json, "out of memory in the harness");
        memcpy(json, data, json_len);
        json[json_len] = '\0';
        size_t skip = nul ? json_len + 1 : size;
        load(data + skip, size - skip, json);
        free(json);
    } else {
        if (!target) target = fuzz_small_model();
        uint64_t before = weights_hash(target);
        fuzz_file_set(&file, data, size);
        lego_status s = lego_model_load_weights(target, file.path);
        FUZZ_REQUIRE(fuzz_known_status(s), "status %d", (int)s);
        if (s != LEGO_OK) {
            FUZZ_REQUIRE(lego_model_error(target)[0] != '\0', "failure without a message");
            FUZZ_REQUIRE(weights_hash(target) == before, "a failed load_weights changed weights");
        } else {
            exercise(target);
            lego_model_init_weights(target, 1); /* the next input starts from the same model */
        }
    }
    return 0;
}
