// test_header_cxx.cpp -- include/lego.h compiles as strict C++17 and keeps
// C linkage.  A compile check:
//
//   g++ -std=c++17 -Wall -Wextra -Werror -pedantic -Iinclude -fsyntax-only tests/test_header_cxx.cpp
//
// It also links and runs (it then returns 0) against the library:
//
//   g++ -std=c++17 -Wall -Wextra -Werror -pedantic -Iinclude tests/test_header_cxx.cpp
//       -o build/tests/header_cxx lib/liblego.a -fopenmp $(LDLIBS)
#include "lego.h"
#include "lego.h"  // include guard

#include <cstddef>
#include <cstring>
#include <type_traits>

static_assert(std::is_standard_layout<lego_model_config>::value, "C layout");
static_assert(std::is_standard_layout<lego_brick_config>::value, "C layout");
static_assert(std::is_standard_layout<lego_load_options>::value, "C layout");
static_assert(std::is_standard_layout<lego_denoise_request>::value, "C layout");
static_assert(std::is_trivially_copyable<lego_denoise_request>::value, "POD request");
static_assert(offsetof(lego_model_config, size) == 0, "size first");
static_assert(offsetof(lego_denoise_request, size) == 0, "size first");
static_assert(LEGO_VERSION_NUMBER == LEGO_VERSION_MAJOR * 10000 + LEGO_VERSION_MINOR * 100 +
                                         LEGO_VERSION_PATCH,
              "version number");
static_assert(LEGO_OK == 0 && LEGO_ERR_STATE == 9, "status values");
static_assert(sizeof(lego_status) == sizeof(int), "enum is int-sized");

// Prototypes, with C linkage types.
static_assert(std::is_same<decltype(&lego_model_create),
                           lego_status (*)(const lego_model_config *, lego_model **)>::value,
              "lego_model_create");
static_assert(std::is_same<decltype(&lego_denoise),
                           lego_status (*)(lego_model *, const lego_denoise_request *)>::value,
              "lego_denoise");
static_assert(std::is_same<decltype(&lego_model_num_params),
                           int64_t (*)(const lego_model *)>::value,
              "lego_model_num_params");

int main() {
    lego_model_config c;
    lego_model_config_init(&c);
    lego_brick_config b;
    lego_brick_config_init(&b);
    lego_load_options o;
    lego_load_options_init(&o);
    lego_denoise_request r;
    lego_denoise_request_init(&r);
    lego_model *m = nullptr;
    lego_status s = lego_model_create(&c, &m);
    if (s == LEGO_OK) s = lego_brick_add(m, &b);
    int ok = s == LEGO_OK && lego_model_num_bricks(m) == 1 &&
             std::strcmp(lego_version(), LEGO_VERSION_STRING) == 0 && r.guidance == 1.0f &&
             o.config_json == nullptr && lego_status_string(LEGO_ERR_IO)[0] != '\0';
    lego_model_free(m);
    return ok ? 0 : 1;
}
