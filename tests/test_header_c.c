/*
 * test_header_c.c -- include/lego.h is self-contained, idempotent, strict
 * C11 and declares what the documentation promises.  Built as a normal
 * Check program by `make check`, and also compiled on its own with
 *
 *   cc -std=c11 -Wall -Wextra -Werror -pedantic -Iinclude -fsyntax-only tests/test_header_c.c
 *
 * so that nothing but the public header (and check.h, itself pedantic-clean)
 * is seen.
 */
#include "lego.h" /* first: it must need nothing before it */
#include "lego.h" /* and twice: include guard */

#include <check.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

/* Every option/request struct starts with its size field. */
_Static_assert(offsetof(lego_model_config, size) == 0, "size first");
_Static_assert(offsetof(lego_brick_config, size) == 0, "size first");
_Static_assert(offsetof(lego_load_options, size) == 0, "size first");
_Static_assert(offsetof(lego_denoise_request, size) == 0, "size first");
_Static_assert(offsetof(lego_preset_options, size) == 0, "size first");
_Static_assert(LEGO_VERSION_NUMBER ==
                   LEGO_VERSION_MAJOR * 10000 + LEGO_VERSION_MINOR * 100 + LEGO_VERSION_PATCH,
               "version number");
_Static_assert(LEGO_MAX_BRICKS == 32, "skip masks are 32-bit");
_Static_assert(LEGO_OK == 0 && LEGO_ERR_STATE == 9, "status values are ABI");
_Static_assert(LEGO_BACKEND_CPU == 0 && LEGO_BACKEND_CUDA == 1, "backend values are ABI");

/* The exact prototypes (a mismatch is a compile error). */
static lego_status (*const p_create)(const lego_model_config *, lego_model **) = lego_model_create;
static lego_status (*const p_brick_add)(lego_model *, const lego_brick_config *) = lego_brick_add;
static lego_status (*const p_init)(lego_model *, uint64_t) = lego_model_init_weights;
static lego_status (*const p_load)(const char *, const lego_load_options *, lego_model **) =
    lego_model_load;
static lego_status (*const p_load_weights)(lego_model *, const char *) = lego_model_load_weights;
static lego_status (*const p_save)(lego_model *, const char *) = lego_model_save;
static void (*const p_free)(lego_model *) = lego_model_free;
static const char *(*const p_error)(const lego_model *) = lego_model_error;
static lego_status (*const p_get_config)(const lego_model *, lego_model_config *) =
    lego_model_get_config;
static int (*const p_num_bricks)(const lego_model *) = lego_model_num_bricks;
static lego_status (*const p_get_brick)(const lego_model *, int, lego_brick_config *) =
    lego_model_get_brick;
static int64_t (*const p_num_params)(const lego_model *) = lego_model_num_params;
static int (*const p_multiple)(const lego_model *) = lego_model_resolution_multiple;
static lego_status (*const p_check_res)(lego_model *, int, int) = lego_model_check_resolution;
static lego_status (*const p_threads)(lego_model *, int) = lego_model_set_threads;
static lego_status (*const p_denoise)(lego_model *, const lego_denoise_request *) = lego_denoise;
static void (*const p_req_init)(lego_denoise_request *) = lego_denoise_request_init;
static lego_status (*const p_to_u8)(const float *, int, int, int, int, uint8_t *) =
    lego_images_to_u8;
static lego_status (*const p_png)(const char *, const uint8_t *, int, int, int, char *, size_t) =
    lego_write_png;
static lego_status (*const p_grid)(const char *, const uint8_t *, int, int, int, int, int, int,
                                   char *, size_t) = lego_write_png_grid;
static lego_status (*const p_npz)(const char *, const uint8_t *, int, int, int, int,
                                  const int32_t *, char *, size_t) = lego_write_npz;
static lego_status (*const p_create_preset)(const char *, const lego_preset_options *,
                                            lego_model **) = lego_model_create_preset;
static lego_status (*const p_preset_params)(const char *, const lego_preset_options *,
                                            int64_t *) = lego_preset_num_params;
static lego_status (*const p_preset_config)(const char *, const lego_preset_options *,
                                            lego_model_config *) = lego_preset_config;
static lego_status (*const p_preset_brick)(const char *, int, lego_brick_config *) =
    lego_preset_get_brick;
static const char *(*const p_preset_name)(int) = lego_preset_name;

START_TEST(test_header_links) {
    ck_assert(p_create && p_brick_add && p_init && p_load && p_load_weights && p_save && p_free &&
              p_error && p_get_config && p_num_bricks && p_get_brick && p_num_params &&
              p_multiple && p_check_res && p_threads && p_denoise && p_req_init && p_to_u8 &&
              p_png && p_grid && p_npz && p_create_preset && p_preset_params &&
              p_preset_config && p_preset_brick && p_preset_name);
    ck_assert_str_eq(lego_version(), LEGO_VERSION_STRING);
    ck_assert_int_eq(lego_version_number(), LEGO_VERSION_NUMBER);
    lego_denoise_request r;
    p_req_init(&r);
    ck_assert(r.size == sizeof r);
    ck_assert(strlen(lego_status_string(LEGO_ERR_FORMAT)) > 0);
}
END_TEST

int main(void) {
    Suite *s = suite_create("header_c");
    TCase *tc = tcase_create("header");
    tcase_add_test(tc, test_header_links);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
