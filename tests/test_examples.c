/*
 * test_examples.c -- the example programs run as a user runs them (from
 * the project root, as make check does; bin/ built by `make examples`).
 *
 * lego-train: a run stopped and resumed ends where a straight run ends,
 * byte for byte (state and EMA checkpoint: the trainer's draws and the
 * data order both follow from the step); SIGTERM stops a run after its
 * step with the state saved and status 128 + 15; a run whose state is
 * past --steps does nothing.
 *
 * lego-sample: without --model it finds the bundled model from the
 * project root and from any other directory.
 */
#define _GNU_SOURCE
#include "testutil.h"

#include <signal.h>
#include <sys/wait.h>

#define TRAIN "bin/lego-train"

/* A Fashion-MNIST style pair of gzip'd idx files with n images of 28 x 28
 * (lego-train pads them to 32) in `dir`; returns the images path. */
static char *write_fmnist_like(const char *dir, int n) {
    static char images[512];
    char labels[512];
    snprintf(images, sizeof images, "%s/train-images-idx3-ubyte.gz", dir);
    snprintf(labels, sizeof labels, "%s/train-labels-idx1-ubyte.gz", dir);
    const unsigned char img_head[16] = {0, 0, 8, 3, 0, 0, 0, (unsigned char)n,
                                        0, 0, 0, 28, 0, 0, 0, 28};
    const unsigned char lab_head[8] = {0, 0, 8, 1, 0, 0, 0, (unsigned char)n};
    gzFile g = gzopen(images, "wb");
    ck_assert(g && gzwrite(g, img_head, sizeof img_head) == (int)sizeof img_head);
    for (int i = 0; i < n; i++)
        for (int p = 0; p < 28 * 28; p++) {
            unsigned char v = (unsigned char)((p * 7 + i * 31) % 256 * ((p / 28 + i) % 3 != 0));
            ck_assert(gzwrite(g, &v, 1) == 1);
        }
    ck_assert(gzclose(g) == Z_OK);
    g = gzopen(labels, "wb");
    ck_assert(g && gzwrite(g, lab_head, sizeof lab_head) == (int)sizeof lab_head);
    for (int i = 0; i < n; i++) {
        unsigned char v = (unsigned char)(i % 10);
        ck_assert(gzwrite(g, &v, 1) == 1);
    }
    ck_assert(gzclose(g) == Z_OK);
    return images;
}

static char *make_temp_dir(void) {
    char *dir = strdup("/tmp/lego-examples-XXXXXX");
    ck_assert(dir && mkdtemp(dir));
    return dir;
}

static void remove_tree(const char *dir) {
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert(system(cmd) == 0);
}

/* Start lego-train with these arguments after the common ones; its
 * standard error comes back through *err_fd when err_fd is not NULL. */
static pid_t start_train(const char *data, const char *out, const char *const *extra,
                         int *err_fd) {
    int fds[2] = {-1, -1};
    if (err_fd) ck_assert(pipe(fds) == 0);
    pid_t pid = fork();
    ck_assert(pid >= 0);
    if (pid == 0) {
        if (err_fd) {
            dup2(fds[1], 2);
            close(fds[0]);
            close(fds[1]);
        }
        const char *argv[32] = {TRAIN, "--data", data, "--out", out, "--batch", "4",
                                "--threads", "2", "--seed", "3", "--every", "1000",
                                "--lr", "1e-3", "--grid", "0"};
        int argc = 17;
        for (int i = 0; extra[i] && argc < 31; i++) argv[argc++] = extra[i];
        argv[argc] = NULL;
        execv(TRAIN, (char *const *)argv);
        _exit(127);
    }
    if (err_fd) {
        close(fds[1]);
        *err_fd = fds[0];
    }
    return pid;
}

/* Run lego-train to the end; its exit status. */
static int run_train(const char *data, const char *out, const char *const *extra) {
    pid_t pid = start_train(data, out, extra, NULL);
    int st;
    ck_assert(waitpid(pid, &st, 0) == pid);
    ck_assert_msg(WIFEXITED(st), "lego-train died of signal %d", WIFSIGNALED(st) ? WTERMSIG(st) : 0);
    return WEXITSTATUS(st);
}

static int same_file(const char *a, const char *b) {
    size_t na, nb;
    unsigned char *pa = read_all(a, &na), *pb = read_all(b, &nb);
    ck_assert_msg(pa && pb, "%s or %s missing", a, b);
    int same = na == nb && memcmp(pa, pb, na) == 0;
    free(pa);
    free(pb);
    return same;
}

/* 10 images, batch 4: 5 steps cross two epoch boundaries. */
START_TEST(test_train_resume_equals_straight) {
    if (!path_exists(TRAIN)) {
        printf("examples: %s absent (make examples), skipping\n", TRAIN);
        return;
    }
    char *dir = make_temp_dir();
    const char *data = write_fmnist_like(dir, 10);
    char straight[600], parts[600], a[700], b[700];
    snprintf(straight, sizeof straight, "%s/straight", dir);
    snprintf(parts, sizeof parts, "%s/parts", dir);

    const char *five[] = {"--steps", "5", NULL};
    const char *two[] = {"--steps", "2", NULL};
    const char *resume[] = {"--steps", "5", "--resume", "--grid", "3", NULL};
    ck_assert_int_eq(run_train(data, straight, five), 0);
    ck_assert_int_eq(run_train(data, parts, two), 0);
    ck_assert_int_eq(run_train(data, parts, resume), 0);
    const char *files[] = {"state.safetensors", "ema.safetensors"};
    for (int i = 0; i < 2; i++) {
        snprintf(a, sizeof a, "%s/%s", straight, files[i]);
        snprintf(b, sizeof b, "%s/%s", parts, files[i]);
        ck_assert_msg(same_file(a, b), "%s: 2 + 3 resumed steps differ from 5 straight", files[i]);
    }
    snprintf(a, sizeof a, "%s/grid-000005.png", parts);
    ck_assert(path_exists(a));

    /* Past --steps already: nothing to do, nothing written. */
    snprintf(a, sizeof a, "%s/state.safetensors", parts);
    struct stat before, after;
    ck_assert(stat(a, &before) == 0);
    const char *three[] = {"--steps", "3", "--resume", NULL};
    ck_assert_int_eq(run_train(data, parts, three), 0);
    ck_assert(stat(a, &after) == 0);
    ck_assert(before.st_mtim.tv_sec == after.st_mtim.tv_sec &&
              before.st_mtim.tv_nsec == after.st_mtim.tv_nsec);
    printf("examples: lego-train 2 + 3 resumed steps == 5 straight, byte for byte\n");
    remove_tree(dir);
    free(dir);
}
END_TEST

/* SIGTERM once training has started: the step finishes, the state is
 * saved, the status says which signal; --resume goes on from there. */
START_TEST(test_train_stops_on_sigterm) {
    if (!path_exists(TRAIN)) {
        printf("examples: %s absent (make examples), skipping\n", TRAIN);
        return;
    }
    char *dir = make_temp_dir();
    const char *data = write_fmnist_like(dir, 10);
    char out[600], state[700];
    snprintf(out, sizeof out, "%s/run", dir);
    snprintf(state, sizeof state, "%s/state.safetensors", out);
    const char *many[] = {"--steps", "100000", NULL};
    int fd;
    pid_t pid = start_train(data, out, many, &fd);
    /* The line that names the data comes once the handler is in place. */
    FILE *err = fdopen(fd, "r");
    ck_assert(err);
    char line[1024];
    int started = 0;
    while (!started && fgets(line, sizeof line, err))
        started = strstr(line, "images 1x32x32") != NULL;
    ck_assert_msg(started, "lego-train did not start");
    ck_assert(kill(pid, SIGTERM) == 0);
    char tail[4096] = "";
    size_t used = 0, n;
    while ((n = fread(tail + used, 1, sizeof tail - 1 - used, err)) > 0) used += n;
    tail[used] = '\0';
    fclose(err);
    int st;
    ck_assert(waitpid(pid, &st, 0) == pid);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 128 + SIGTERM, "status %d: %s", st, tail);
    ck_assert_msg(strstr(tail, "stopped by signal 15") != NULL, "%s", tail);
    ck_assert(path_exists(state));

    /* The state holds the step it stopped at; a resumed run continues. */
    lego_load_options lo;
    lego_load_options_init(&lo);
    lo.num_threads = 1;
    lego_model *m = NULL;
    char ema[700];
    snprintf(ema, sizeof ema, "%s/ema.safetensors", out);
    ck_assert_msg(lego_model_load(ema, &lo, &m) == LEGO_OK, "%s", lego_model_error(m));
    lego_trainer *t = NULL;
    ck_assert(lego_trainer_create(m, NULL, &t) == LEGO_OK);
    ck_assert_msg(lego_trainer_load_state(t, state) == LEGO_OK, "%s", lego_trainer_error(t));
    lego_train_stats s;
    lego_train_stats_init(&s);
    ck_assert(lego_trainer_get_stats(t, &s) == LEGO_OK);
    ck_assert(s.step >= 1 && s.images_seen == 4 * s.step);
    char upto[32];
    snprintf(upto, sizeof upto, "%lld", (long long)s.step + 1);
    const char *one_more[] = {"--steps", upto, "--resume", NULL};
    ck_assert_int_eq(run_train(data, out, one_more), 0);
    ck_assert(lego_trainer_load_state(t, state) == LEGO_OK);
    lego_train_stats next;
    lego_train_stats_init(&next);
    ck_assert(lego_trainer_get_stats(t, &next) == LEGO_OK);
    ck_assert(next.step == s.step + 1 && next.images_seen == s.images_seen + 4);
    printf("examples: SIGTERM stopped lego-train at step %lld, state saved; resumed to %lld\n",
           (long long)s.step, (long long)next.step);
    lego_trainer_free(t);
    lego_model_free(m);
    remove_tree(dir);
    free(dir);
}
END_TEST

/* Without --model, lego-sample draws from the bundled model: found in the
 * working directory's models/, and from any other directory beside the
 * program (bin/../models in the source tree). */
START_TEST(test_sample_default_model) {
    char root[4096], cmd[8400];
    ck_assert(getcwd(root, sizeof root));
    char *dir = make_temp_dir();
    const char *where[] = {root, dir};
    for (int i = 0; i < 2; i++) {
        snprintf(cmd, sizeof cmd,
                 "cd '%s' && '%s/bin/lego-sample' --seeds 3 --steps 1 --threads 1 --quiet "
                 "--npz '%s/one.npz' 2>/dev/null",
                 where[i], root, dir);
        ck_assert_msg(system(cmd) == 0, "lego-sample without --model failed in %s", where[i]);
        snprintf(cmd, sizeof cmd, "%s/one.npz", dir);
        ck_assert_msg(path_exists(cmd), "no samples from lego-sample run in %s", where[i]);
        ck_assert(unlink(cmd) == 0);
    }
    remove_tree(dir);
    free(dir);
}
END_TEST

int main(void) {
    Suite *s = suite_create("examples");
    TCase *t = tcase_create("lego-train");
    tcase_set_timeout(t, 600);
    tcase_add_test(t, test_train_resume_equals_straight);
    tcase_add_test(t, test_train_stops_on_sigterm);
    suite_add_tcase(s, t);
    TCase *sample = tcase_create("lego-sample");
    tcase_set_timeout(sample, 120);
    tcase_add_test(sample, test_sample_default_model);
    suite_add_tcase(s, sample);
    return run_suite(s);
}
