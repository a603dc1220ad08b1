/*
 * fuzz_trainer_state.c -- libFuzzer harness for training-state files:
 * lego_trainer_load_state into a fixed small trainer (the safetensors
 * reader, the architecture check, the tensor set, the counters and the
 * values).
 *
 * The input is the file.  A load that fails must say why and leave the
 * trainer as it was: its saved state (weights, EMA, moments, counters, seed)
 * the same bytes.  A load that succeeds must give a trainer whose saved
 * state loads back to the same bytes and which takes a step.  Every input
 * starts from the same trainer.
 */
#include "fuzz_util.h"

static fuzz_file state_in;
static lego_model *state_model;
static lego_trainer *trainer;
static char state_dir[64], state_path[96];
static uint8_t *initial; /* the trainer's state before any input */
static size_t initial_size;

/* One step on a fixed 4 x 4 image; its loss may be anything. */
static lego_status trainer_step(void) {
    float image[16];
    for (int i = 0; i < 16; i++) image[i] = (float)(i % 5) / 2.0f - 1.0f;
    int32_t label = 1;
    return lego_trainer_step(trainer, image, &label, 1, NULL);
}

/* The trainer's saved state, whole (malloc'd). */
static uint8_t *saved_state(size_t *size) {
    FUZZ_REQUIRE(lego_trainer_save_state(trainer, state_path) == LEGO_OK, "save: %s",
                 lego_trainer_error(trainer));
    FILE *f = fopen(state_path, "rb");
    FUZZ_REQUIRE(f && fseek(f, 0, SEEK_END) == 0, "cannot read %s", state_path);
    long n = ftell(f);
    FUZZ_REQUIRE(n > 0 && fseek(f, 0, SEEK_SET) == 0, "cannot read %s", state_path);
    uint8_t *b = malloc((size_t)n);
    FUZZ_REQUIRE(b && fread(b, 1, (size_t)n, f) == (size_t)n, "cannot read %s", state_path);
    fclose(f);
    *size = (size_t)n;
    return b;
}

/* At exit: the temporary folder goes, and leak checkers see no leak. */
static void trainer_teardown(void) {
    lego_trainer_free(trainer);
    lego_model_free(state_model);
    free(initial);
    remove(state_path);
    rmdir(state_dir);
}

static void trainer_setup(void) {
    if (trainer) return;
    const char *base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    snprintf(state_dir, sizeof state_dir, "%s/lego-fuzz-state-XXXXXX", base);
    FUZZ_REQUIRE(mkdtemp(state_dir), "mkdtemp failed");
    atexit(trainer_teardown);
    snprintf(state_path, sizeof state_path, "%s/state.safetensors", state_dir);
    state_model = fuzz_small_model();
    lego_train_options o;
    lego_train_options_init(&o);
    o.height = o.width = 4;
    o.seed = 7;
    FUZZ_REQUIRE(lego_trainer_create(state_model, &o, &trainer) == LEGO_OK, "%s",
                 lego_trainer_error(trainer));
    FUZZ_REQUIRE(trainer_step() == LEGO_OK, "%s", lego_trainer_error(trainer));
    initial = saved_state(&initial_size);
}

static int same_state(void) {
    size_t n;
    uint8_t *now = saved_state(&n);
    int same = n == initial_size && memcmp(now, initial, n) == 0;
    free(now);
    return same;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    trainer_setup();
    fuzz_file_set(&state_in, data, size);
    lego_status s = lego_trainer_load_state(trainer, state_in.path);
    FUZZ_REQUIRE(fuzz_known_status(s), "status %d", (int)s);
    if (s != LEGO_OK) {
        FUZZ_REQUIRE(lego_trainer_error(trainer)[0] != '\0', "failure %d without a message", (int)s);
        FUZZ_REQUIRE(same_state(), "a failed load_state changed the trainer");
        return 0;
    }
    /* A loaded state saves as a state that loads back to the same bytes,
     * and steps (or refuses counters at their limit).  A step from extreme
     * finite moments may overflow a weight to inf, as in PyTorch. */
    size_t n1, n2;
    uint8_t *saved = saved_state(&n1);
    fuzz_file_set(&state_in, saved, n1);
    FUZZ_REQUIRE(lego_trainer_load_state(trainer, state_in.path) == LEGO_OK,
                 "a saved state does not load: %s", lego_trainer_error(trainer));
    uint8_t *again = saved_state(&n2);
    FUZZ_REQUIRE(n1 == n2 && memcmp(saved, again, n1) == 0, "save, load, save changed the state");
    free(saved);
    free(again);
    s = trainer_step();
    FUZZ_REQUIRE(s == LEGO_OK || s == LEGO_ERR_STATE, "step after load: %s",
                 lego_trainer_error(trainer));
    fuzz_file_set(&state_in, initial, initial_size);
    FUZZ_REQUIRE(lego_trainer_load_state(trainer, state_in.path) == LEGO_OK && same_state(),
                 "the initial state does not come back: %s", lego_trainer_error(trainer));
    return 0;
}
