/*
 * test_limits.c -- sizes and memory: what a caller or a file can make the
 * library allocate.
 *
 *   loader     a small checkpoint claiming a 100 GB architecture is refused
 *              before anything of that size is allocated
 *
 * Needs nothing from ../shared.
 */
#define _POSIX_C_SOURCE 200809L
#include "testutil.h"

#include <stdint.h>

#include "denoise.h"
#include "model.h"

/* C = 2, 10 classes, D = 16; bricks 4/2 and 8/4. */
static lego_model *small_model(void) {
    lego_model_config c;
    lego_model_config_init(&c);
    c.img_channels = 2;
    c.label_dim = 10;
    c.hidden_size = 16;
    c.num_heads = 2;
    c.mlp_ratio = 2.0;
    c.frequency_embedding_size = 32;
    c.num_threads = 1;
    lego_model *m = NULL;
    ck_assert_msg(lego_model_create(&c, &m) == LEGO_OK, "%s", lego_model_error(m));
    const int bricks[2][2] = {{4, 2}, {8, 4}};
    for (int k = 0; k < 2; k++) {
        lego_brick_config b;
        lego_brick_config_init(&b);
        b.brick_size = bricks[k][0];
        b.patch_size = bricks[k][1];
        ck_assert_msg(lego_brick_add(m, &b) == LEGO_OK, "%s", lego_model_error(m));
    }
    ck_assert(lego_model_init_weights(m, 7) == LEGO_OK);
    /* The zero-initialised adaLN and final layers would make every output
     * the same; give them values so results say something. */
    for (size_t i = 0; i < m->params_size; i++)
        if (m->params[i] == 0.0f) m->params[i] = 0.01f * (float)((i * 37) % 11) - 0.05f;
    model_weights_changed(m);
    return m;
}

static void expect_contains(const char *msg, const char *needle) {
    ck_assert_msg(strstr(msg, needle) != NULL, "message '%s' lacks '%s'", msg, needle);
}

/* ------------------------------------------------------------------------ */
/* loader                                                                   */
/* ------------------------------------------------------------------------ */

/* A few hundred bytes whose lego.config describes ~26e9 parameters (a
 * 400000-class label embedding at width 65536).  The loader once built the
 * model, allocating and zeroing the whole array, before it looked at the
 * tensors; now the file must show every tensor first.  (Found while
 * fuzzing the loader: a tiny file could ask for any amount of memory.) */
START_TEST(test_load_oversized_config) {
    char dir[] = "/tmp/lego_limits_XXXXXX", path[64];
    ck_assert(mkdtemp(dir) != NULL);
    snprintf(path, sizeof path, "%s/huge.safetensors", dir);
    const char *json = "{\"format\": \"lego-diffusion\", \"version\": 1, \"img_channels\": 1, "
                       "\"label_dim\": 400000, \"hidden_size\": 65536, \"num_heads\": 1, "
                       "\"mlp_ratio\": 1.0, \"frequency_embedding_size\": 4, \"bricks\": "
                       "[{\"brick_size\": 2, \"patch_size\": 2, \"depth\": 1}]}";
    float v = 1.0f;
    st_write_item item = {"model.t_embedder.mlp.0.bias", 1, {1}, &v};
    lego_err err;
    ck_assert(st_write_f32(path, &item, 1, json, &err) == LEGO_OK);

    lego_model *m = NULL;
    ck_assert_int_eq(lego_model_load(path, NULL, &m), LEGO_ERR_SHAPE);
    expect_contains(lego_model_error(m), "missing tensor 'model.t_embedder.mlp.0.weight'");
    lego_model_free(m);

    /* load_weights compares the file's architecture with the model's
     * without building the file's one either. */
    lego_model *small = small_model();
    ck_assert_int_eq(lego_model_load_weights(small, path), LEGO_ERR_SHAPE);
    expect_contains(lego_model_error(small), "differs");
    lego_model_free(small);
    remove(path);
    rmdir(dir);
}
END_TEST

int main(void) {
    Suite *s = suite_create("limits");
    TCase *h = tcase_create("huge");
    tcase_set_timeout(h, 120);
    tcase_add_test(h, test_load_oversized_config);
    suite_add_tcase(s, h);
    return run_suite(s);
}
