/*
 * test_fuzz.c -- the libFuzzer harnesses of tests/fuzz/ as ordinary tests:
 * every committed input (the seeds in tests/fuzz/corpus/<harness>/ and the
 * inputs that once crashed the library, tests/fuzz/regress/<harness>/) runs
 * through its harness, with its checks, under this build (so under ASan +
 * UBSan with SANITIZE=1, and under valgrind).  `make fuzz` explores further
 * with clang's libFuzzer.
 *
 * Runs from the project root (make check); skips when tests/fuzz is absent.
 */
#define _GNU_SOURCE
#include "testutil.h"

#include <dirent.h>

#define LLVMFuzzerTestOneInput fuzz_model_load_one
#include "fuzz/fuzz_model_load.c"
#undef LLVMFuzzerTestOneInput

#define LLVMFuzzerTestOneInput fuzz_dataset_one
#include "fuzz/fuzz_dataset.c"
#undef LLVMFuzzerTestOneInput

#define LLVMFuzzerTestOneInput fuzz_trainer_state_one
#include "fuzz/fuzz_trainer_state.c"
#undef LLVMFuzzerTestOneInput

#define LLVMFuzzerTestOneInput fuzz_request_one
#define LLVMFuzzerInitialize fuzz_request_init
#include "fuzz/fuzz_request.c"
#undef LLVMFuzzerTestOneInput
#undef LLVMFuzzerInitialize

typedef int (*fuzz_entry)(const uint8_t *, size_t);

/* Every file of `dir`, in name order; the number run. */
static int replay_dir(const char *dir, fuzz_entry entry) {
    struct dirent **names = NULL;
    int n = scandir(dir, &names, NULL, alphasort), ran = 0;
    for (int i = 0; i < n; i++) {
        char path[512];
        if (names[i]->d_name[0] != '.') {
            size_t len;
            snprintf(path, sizeof path, "%s/%s", dir, names[i]->d_name);
            uint8_t *data = read_all(path, &len);
            entry(data, len); /* a broken promise aborts: the test fails */
            free(data);
            ran++;
        }
        free(names[i]);
    }
    free(names);
    return ran;
}

static void replay(const char *harness, fuzz_entry entry) {
    char dir[256];
    int ran = 0;
    const char *kinds[2] = {"corpus", "regress"};
    for (int k = 0; k < 2; k++) {
        snprintf(dir, sizeof dir, "tests/fuzz/%s/%s", kinds[k], harness);
        int n = replay_dir(dir, entry);
        if (n > 0) printf("fuzz replay: %s: %d input(s) of %s\n", harness, n, dir);
        ran += n;
    }
    if (!path_exists("tests/fuzz/corpus")) {
        printf("fuzz replay: tests/fuzz/corpus absent (not run from the project root?), "
               "skipping\n");
        return;
    }
    ck_assert_msg(ran > 0, "no inputs for %s", harness);
}

START_TEST(test_replay_model_load) { replay("model_load", fuzz_model_load_one); }
END_TEST

START_TEST(test_replay_dataset) { replay("dataset", fuzz_dataset_one); }
END_TEST

START_TEST(test_replay_trainer_state) { replay("trainer_state", fuzz_trainer_state_one); }
END_TEST

START_TEST(test_replay_request) {
    fuzz_request_init(NULL, NULL);
    replay("request", fuzz_request_one);
    lego_model_free(models[0]);
    lego_model_free(models[1]);
}
END_TEST

int main(void) {
    Suite *s = suite_create("fuzz");
    TCase *t = tcase_create("replay");
    tcase_set_timeout(t, 300);
    tcase_add_test(t, test_replay_model_load);
    tcase_add_test(t, test_replay_dataset);
    tcase_add_test(t, test_replay_trainer_state);
    tcase_add_test(t, test_replay_request);
    suite_add_tcase(s, t);
    return run_suite(s);
}
