/*
 * fuzz_dataset.c -- libFuzzer harness for lego_dataset_open: idx files
 * (plain or gzip), EDM-style zips of PNGs with dataset.json, and folders of
 * PNGs.
 *
 * Input: four option bytes, then the payload.
 *   byte 0  what the payload is: 0 one file (idx, idx.gz or zip: the
 *           library recognises it); 1 an idx images file, FUZZ_SPLIT, its
 *           labels file (given as labels_path); 2 a folder: dataset.json,
 *           then PNG files, separated by FUZZ_SPLIT
 *   byte 1  resolution (byte % 40; 0 = native)
 *   byte 2  max_images (byte % 6; 0 = all)
 *   byte 3  max_bytes = 2^(10 + byte % 18)
 * A dataset that opens must hand out every image, alone and in one batch,
 * with the same values, and labels in [-1, label_dim).
 */
#include "fuzz_util.h"

#include <math.h>
#include <sys/stat.h>

#define FUZZ_SPLIT "\n--next--\n"

static fuzz_file file_a, file_b;
static char folder[64];

/* Where payload chunk i of a folder goes: dataset.json, then images at two
 * depths (names sort in this order). */
static const char *const folder_names[] = {"dataset.json", "a.png", "b/c.png", "b/d.png",
                                           "e.png"};
#define FOLDER_FILES (sizeof folder_names / sizeof folder_names[0])

static const uint8_t *next_chunk(const uint8_t **p, size_t *left, size_t *len) {
    const uint8_t *start = *p;
    size_t sl = strlen(FUZZ_SPLIT);
    for (size_t i = 0; i + sl <= *left; i++)
        if (memcmp(start + i, FUZZ_SPLIT, sl) == 0) {
            *len = i;
            *p += i + sl;
            *left -= i + sl;
            return start;
        }
    *len = *left;
    *p += *left;
    *left = 0;
    return start;
}

static void write_folder_file(const char *name, const uint8_t *data, size_t len) {
    char path[128];
    snprintf(path, sizeof path, "%s/%s", folder, name);
    FILE *f = fopen(path, "wb");
    FUZZ_REQUIRE(f, "cannot write %s", path);
    FUZZ_REQUIRE(fwrite(data, 1, len, f) == len && fclose(f) == 0, "cannot write %s", path);
}

static void clear_folder(void) {
    char path[128];
    for (size_t i = 0; i < FOLDER_FILES; i++) {
        snprintf(path, sizeof path, "%s/%s", folder, folder_names[i]);
        remove(path);
    }
}

static void remove_folder(void) {
    char sub[96];
    clear_folder();
    snprintf(sub, sizeof sub, "%s/b", folder);
    rmdir(sub);
    rmdir(folder);
}

static const char *make_folder(const uint8_t *p, size_t left) {
    if (!folder[0]) {
        const char *base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
        snprintf(folder, sizeof folder, "%s/lego-fuzz-XXXXXX", base);
        FUZZ_REQUIRE(mkdtemp(folder), "mkdtemp failed");
        char sub[96];
        snprintf(sub, sizeof sub, "%s/b", folder);
        FUZZ_REQUIRE(mkdir(sub, 0700) == 0, "mkdir failed");
        atexit(remove_folder);
    }
    clear_folder();
    for (size_t i = 0; i < FOLDER_FILES && left > 0; i++) {
        size_t len;
        const uint8_t *c = next_chunk(&p, &left, &len);
        if (i == 0 && len == 0) continue; /* no dataset.json */
        write_folder_file(folder_names[i], c, len);
    }
    return folder;
}

static void check_dataset(lego_dataset *ds) {
    int64_t count = lego_dataset_count(ds);
    int c = 0, h = 0, w = 0, dim = lego_dataset_label_dim(ds);
    FUZZ_REQUIRE(count >= 1, "an open dataset has images (count %lld)", (long long)count);
    FUZZ_REQUIRE(lego_dataset_shape(ds, &c, &h, &w) == LEGO_OK, "shape");
    FUZZ_REQUIRE((c == 1 || c == 3) && h >= 1 && w >= 1, "shape %d x %d x %d", c, h, w);
    int n = count < 8 ? (int)count : 8;
    size_t one = (size_t)c * (size_t)h * (size_t)w;
    if (one > ((size_t)1 << 22)) return; /* large but valid: not worth the time */
    float *img = malloc(one * sizeof *img), *batch = malloc((size_t)n * one * sizeof *batch);
    int64_t idx[8];
    int32_t labels[8], label;
    FUZZ_REQUIRE(img && batch, "out of memory in the harness");
    for (int i = 0; i < n; i++) idx[i] = n - 1 - i;
    FUZZ_REQUIRE(lego_dataset_get_batch(ds, idx, n, batch, labels) == LEGO_OK, "%s",
                 lego_dataset_error(ds));
    for (int i = 0; i < n; i++) {
        FUZZ_REQUIRE(lego_dataset_get(ds, idx[i], img, &label) == LEGO_OK, "%s",
                     lego_dataset_error(ds));
        FUZZ_REQUIRE(memcmp(img, batch + (size_t)i * one, one * sizeof *img) == 0,
                     "image %lld differs alone and in a batch", (long long)idx[i]);
        FUZZ_REQUIRE(label == labels[i], "label of %lld differs", (long long)idx[i]);
        FUZZ_REQUIRE(label >= -1 && label < (dim > 0 ? dim : 0), "label %d, label_dim %d",
                     label, dim);
        for (size_t j = 0; j < one; j++)
            FUZZ_REQUIRE(img[j] >= -1.0f && img[j] <= 1.0f, "pixel %g outside [-1, 1]",
                         (double)img[j]);
    }
    FUZZ_REQUIRE(lego_dataset_get(ds, count, img, NULL) == LEGO_ERR_INVALID_ARGUMENT,
                 "index past the end accepted");
    free(img);
    free(batch);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_reader r = {data, size};
    int mode = fuzz_u8(&r) % 3;
    lego_dataset_options o;
    lego_dataset_options_init(&o);
    o.resolution = fuzz_u8(&r) % 40;
    o.max_images = fuzz_u8(&r) % 6;
    o.max_bytes = (uint64_t)1 << (10 + fuzz_u8(&r) % 18);

    const char *path;
    if (mode == 0) {
        fuzz_file_set(&file_a, r.p, r.left);
        path = file_a.path;
    } else if (mode == 1) {
        const uint8_t *p = r.p;
        size_t left = r.left, len;
        const uint8_t *images = next_chunk(&p, &left, &len);
        fuzz_file_set(&file_a, images, len);
        fuzz_file_set(&file_b, p, left);
        o.labels_path = file_b.path;
        path = file_a.path;
    } else {
        path = make_folder(r.p, r.left);
    }

    lego_dataset *ds = NULL;
    lego_status s = lego_dataset_open(path, &o, &ds);
    FUZZ_REQUIRE(fuzz_known_status(s), "status %d", (int)s);
    FUZZ_REQUIRE(ds != NULL, "no handle");
    if (s == LEGO_OK) {
        check_dataset(ds);
    } else {
        FUZZ_REQUIRE(lego_dataset_error(ds)[0] != '\0', "failure %d without a message", (int)s);
        FUZZ_REQUIRE(lego_dataset_count(ds) == 0, "a failed dataset has images");
    }
    lego_dataset_free(ds);
    return 0;
}
