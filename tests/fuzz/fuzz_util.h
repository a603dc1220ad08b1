/*
 * fuzz_util.h -- what the libFuzzer harnesses share: file names for bytes
 * held in memory, a reader that turns the input into typed fields, and the
 * one way a harness reports a broken contract (abort, which libFuzzer
 * records as a crash with the input that caused it).
 */
#ifndef LEGO_FUZZ_UTIL_H
#define LEGO_FUZZ_UTIL_H

#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "lego.h"

/* A broken promise of the library: say which and crash. */
#define FUZZ_REQUIRE(cond, ...)                                                \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "fuzz: %s:%d: %s: ", __FILE__, __LINE__, #cond);   \
            fprintf(stderr, __VA_ARGS__);                                      \
            fputc('\n', stderr);                                               \
            abort();                                                           \
        }                                                                      \
    } while (0)

/* A failed call must name a known code and say why. */
static inline int fuzz_known_status(lego_status s) {
    return s >= LEGO_OK && s <= LEGO_ERR_STATE;
}

/* A regular file that lives in memory (memfd), reachable by a path the
 * library opens like any other: "/proc/self/fd/N".  Reused between inputs,
 * so a harness costs no disk traffic. */
typedef struct fuzz_file {
    int fd;
    char path[64];
} fuzz_file;

static inline void fuzz_file_set(fuzz_file *f, const void *data, size_t size) {
    if (f->fd <= 0) {
        f->fd = memfd_create("lego-fuzz", MFD_CLOEXEC);
        FUZZ_REQUIRE(f->fd > 0, "memfd_create failed");
        snprintf(f->path, sizeof f->path, "/proc/self/fd/%d", f->fd);
    }
    FUZZ_REQUIRE(ftruncate(f->fd, 0) == 0, "ftruncate failed");
    const uint8_t *p = data;
    size_t done = 0;
    while (done < size) {
        ssize_t n = pwrite(f->fd, p + done, size - done, (off_t)done);
        FUZZ_REQUIRE(n > 0, "pwrite failed");
        done += (size_t)n;
    }
}

/* Typed fields from the input, front to back; zeros once it runs out, so
 * every input decodes to something. */
typedef struct fuzz_reader {
    const uint8_t *p;
    size_t left;
} fuzz_reader;

static inline uint8_t fuzz_u8(fuzz_reader *r) {
    if (!r->left) return 0;
    r->left--;
    return *r->p++;
}

static inline uint32_t fuzz_u32(fuzz_reader *r) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) v |= (uint32_t)fuzz_u8(r) << (8 * i);
    return v;
}

static inline uint64_t fuzz_u64(fuzz_reader *r) {
    uint64_t lo = fuzz_u32(r);
    return lo | (uint64_t)fuzz_u32(r) << 32;
}

/* Raw bit patterns: NaN, infinities, negatives and subnormals included. */
static inline float fuzz_f32(fuzz_reader *r) {
    uint32_t bits = fuzz_u32(r);
    float v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static inline double fuzz_f64(fuzz_reader *r) {
    uint64_t bits = fuzz_u64(r);
    double v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* The small conditional model that fuzz_model_load (mode 2) loads weights
 * into and fuzz_trainer_state trains: 1 channel, 2 classes, width 4, bricks
 * 2/1 and 4/2 of depth 1 (make_seeds.c writes its files). */
static inline lego_model *fuzz_small_model(void) {
    lego_model_config c;
    lego_model_config_init(&c);
    c.img_channels = 1;
    c.label_dim = 2;
    c.hidden_size = 4;
    c.num_heads = 1;
    c.mlp_ratio = 1.0;
    c.frequency_embedding_size = 4;
    c.num_threads = 1;
    lego_model *m = NULL;
    FUZZ_REQUIRE(lego_model_create(&c, &m) == LEGO_OK, "%s", lego_model_error(m));
    const int sizes[2][2] = {{2, 1}, {4, 2}};
    for (int k = 0; k < 2; k++) {
        lego_brick_config b;
        lego_brick_config_init(&b);
        b.brick_size = sizes[k][0];
        b.patch_size = sizes[k][1];
        FUZZ_REQUIRE(lego_brick_add(m, &b) == LEGO_OK, "%s", lego_model_error(m));
    }
    FUZZ_REQUIRE(lego_model_init_weights(m, 1) == LEGO_OK, "%s", lego_model_error(m));
    return m;
}

/* A page nothing may touch: what a harness passes for caller buffers of a
 * request the library must refuse before reading or writing them. */
static inline void *fuzz_guard_page(void) {
    static void *page;
    if (!page) {
        page = mmap(NULL, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        FUZZ_REQUIRE(page != MAP_FAILED, "mmap failed");
    }
    return page;
}

#endif /* LEGO_FUZZ_UTIL_H */
