/*
 * test_dataset.c -- the dataset reader (lego_dataset_*):
 *
 *   api        option defaults, NULL arguments, failed handles refuse every
 *              call with LEGO_ERR_STATE and keep their message
 *   idx        gzip and plain idx files written here: pixels, padding,
 *              labels found beside the images, labels_path, max_images,
 *              batches; the real Fashion-MNIST t10k files when Debian's
 *              dataset-fashion-mnist is installed (skipped otherwise)
 *   folder     PNG folders (grey and RGB, nested, sorted), dataset.json
 *   zip        stored, deflated and data-descriptor entries, dataset.json;
 *              the same pixels as the folder
 *   hostile    truncated / corrupt gzip, lying idx headers, label counts,
 *              wrong PNG sizes, bad CRCs, truncated central directories,
 *              offsets outside the file, lying sizes, ZIP64, encryption,
 *              overlapping entries, deflate bombs, bad dataset.json
 *
 * Every file is generated in a scratch directory that is removed after each
 * test; everything is small so that the suite is fast under valgrind.
 */
#define _POSIX_C_SOURCE 200809L
#include "testutil.h"

#include <dirent.h>
#include <png.h>
#include <stddef.h>
#include <stdint.h>
#include <zlib.h>

#include "lego.h"

/* ------------------------------------------------------------------------ */
/* Scratch directory                                                        */
/* ------------------------------------------------------------------------ */

static char g_dir[64];

static void make_dir(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/lego_test_dataset_XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(g_dir));
}

static void remove_tree(const char *path) {
    struct stat sb;
    if (lstat(path, &sb) != 0) return;
    if (S_ISDIR(sb.st_mode)) {
        DIR *d = opendir(path);
        struct dirent *e;
        char p[1024];
        if (d) {
            while ((e = readdir(d)) != NULL) {
                if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
                snprintf(p, sizeof p, "%s/%s", path, e->d_name);
                remove_tree(p);
            }
            closedir(d);
        }
        rmdir(path);
    } else {
        remove(path);
    }
}

static void remove_dir(void) { remove_tree(g_dir); }

/* A path in the scratch directory, in one of eight rotating buffers: for
 * use within a call or two.  Paths kept longer go through dpath(). */
static const char *in_dir(const char *name) {
    static char p[8][512];
    static int k;
    k = (k + 1) % 8;
    snprintf(p[k], sizeof p[k], "%s/%s", g_dir, name);
    return p[k];
}

typedef char path_buf[512];

static const char *dpath(path_buf out, const char *name) {
    snprintf(out, sizeof(path_buf), "%s/%s", g_dir, name);
    return out;
}

static void mkdir_in(const char *name) { ck_assert_int_eq(mkdir(in_dir(name), 0700), 0); }

static float px(unsigned v) { return (float)v / 127.5f - 1.0f; }

/* ------------------------------------------------------------------------ */
/* Expected failures                                                        */
/* ------------------------------------------------------------------------ */

/* Open must fail with `want`, leave a failed handle whose message contains
 * `needle`, and that handle must refuse every call. */
static void expect_open_fail(const char *path, const lego_dataset_options *o,
                             lego_status want, const char *needle) {
    lego_dataset *ds = NULL;
    float buf[16];
    int c = -5;
    lego_status st = lego_dataset_open(path, o, &ds);
    ck_assert_ptr_nonnull(ds);
    ck_assert_msg(st == want, "status %d (%s), want %d; message: %s", (int)st,
                  lego_status_string(st), (int)want, lego_dataset_error(ds));
    ck_assert_msg(strstr(lego_dataset_error(ds), needle) != NULL,
                  "message \"%s\" lacks \"%s\"", lego_dataset_error(ds), needle);
    if (getenv("LEGO_TEST_SHOW_MESSAGES")) fprintf(stderr, "[%d] %s\n", (int)st, lego_dataset_error(ds));
    ck_assert_int_eq(lego_dataset_count(ds), 0);
    ck_assert_int_eq(lego_dataset_label_dim(ds), 0);
    ck_assert_int_eq(lego_dataset_get(ds, 0, buf, NULL), LEGO_ERR_STATE);
    ck_assert_int_eq(lego_dataset_shape(ds, &c, NULL, NULL), LEGO_ERR_STATE);
    ck_assert_int_eq(c, -5);
    lego_dataset_free(ds);
}

static lego_dataset *open_ok(const char *path, const lego_dataset_options *o) {
    lego_dataset *ds = NULL;
    lego_status st = lego_dataset_open(path, o, &ds);
    ck_assert_msg(st == LEGO_OK, "open %s: %s", path, lego_dataset_error(ds));
    return ds;
}

/* ------------------------------------------------------------------------ */
/* idx files                                                                */
/* ------------------------------------------------------------------------ */

static void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint8_t pixel(int k, int y, int x, int c) {
    return (uint8_t)((k * 53 + y * 17 + x * 5 + c * 101) % 256);
}

/* n images h x w: header and pixel(k, y, x, 0). */
static uint8_t *idx_images(uint32_t n, uint32_t h, uint32_t w, size_t *len) {
    size_t total = 16 + (size_t)n * h * w;
    uint8_t *b = malloc(total);
    ck_assert_ptr_nonnull(b);
    put_be32(b, 0x00000803);
    put_be32(b + 4, n);
    put_be32(b + 8, h);
    put_be32(b + 12, w);
    for (uint32_t k = 0; k < n; k++)
        for (uint32_t y = 0; y < h; y++)
            for (uint32_t x = 0; x < w; x++)
                b[16 + ((size_t)k * h + y) * w + x] = pixel((int)k, (int)y, (int)x, 0);
    *len = total;
    return b;
}

static void write_idx_labels(const char *path, const uint8_t *labels, uint32_t n, int gz) {
    uint8_t *b = malloc(8 + (size_t)n);
    ck_assert_ptr_nonnull(b);
    put_be32(b, 0x00000801);
    put_be32(b + 4, n);
    memcpy(b + 8, labels, n);
    if (gz)
        write_gz(path, b, 8 + (size_t)n);
    else
        write_file(path, b, 8 + (size_t)n);
    free(b);
}

/* The standard pair: 3 images of 4 x 5, labels 0 7 2. */
static void write_idx_pair(const char *images, const char *labels, int gz) {
    static const uint8_t lab[3] = {0, 7, 2};
    size_t len;
    uint8_t *b = idx_images(3, 4, 5, &len);
    if (gz)
        write_gz(images, b, len);
    else
        write_file(images, b, len);
    free(b);
    if (labels) write_idx_labels(labels, lab, 3, gz);
}

START_TEST(test_api_basics) {
    lego_dataset_options o;
    lego_dataset *ds = (lego_dataset *)&o;
    float buf[4];
    int64_t idx = 0;

    lego_dataset_options_init(&o);
    ck_assert_uint_eq(o.size, sizeof o);
    ck_assert_int_eq(o.resolution, 0);
    ck_assert(o.pad_value == -1.0f);
    ck_assert(o.max_bytes == (uint64_t)1 << 31);
    ck_assert_int_eq(o.max_images, 0);
    ck_assert_ptr_null(o.labels_path);
    lego_dataset_options_init(NULL);

    ck_assert_int_eq(lego_dataset_open("x", NULL, NULL), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_dataset_open(NULL, NULL, &ds), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(ds);
    ck_assert_ptr_nonnull(strstr(lego_dataset_error(ds), "NULL"));
    lego_dataset_free(ds);
    expect_open_fail("", NULL, LEGO_ERR_INVALID_ARGUMENT, "empty");
    expect_open_fail(in_dir("missing"), NULL, LEGO_ERR_IO, "cannot open");

    o.resolution = -1;
    expect_open_fail(g_dir, &o, LEGO_ERR_INVALID_ARGUMENT, "resolution");
    lego_dataset_options_init(&o);
    o.max_bytes = 0;
    expect_open_fail(g_dir, &o, LEGO_ERR_INVALID_ARGUMENT, "max_bytes");
    lego_dataset_options_init(&o);
    o.pad_value = NAN;
    expect_open_fail(g_dir, &o, LEGO_ERR_INVALID_ARGUMENT, "pad_value");
    lego_dataset_options_init(&o);
    o.max_images = -2;
    expect_open_fail(g_dir, &o, LEGO_ERR_INVALID_ARGUMENT, "max_images");

    /* NULL handles. */
    ck_assert_ptr_nonnull(lego_dataset_error(NULL));
    ck_assert_int_eq(lego_dataset_count(NULL), 0);
    ck_assert_int_eq(lego_dataset_label_dim(NULL), 0);
    ck_assert_int_eq(lego_dataset_shape(NULL, NULL, NULL, NULL), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_dataset_get(NULL, 0, buf, NULL), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_dataset_get_batch(NULL, &idx, 1, buf, NULL),
                     LEGO_ERR_INVALID_ARGUMENT);
    lego_dataset_free(NULL);

    /* Not a dataset. */
    write_file(in_dir("junk.bin"), "hello world", 11);
    expect_open_fail(in_dir("junk.bin"), NULL, LEGO_ERR_FORMAT, "unrecognised");
    {
        uint8_t grey[4] = {1, 2, 3, 4};
        ck_assert_int_eq(lego_write_png(in_dir("one.png"), grey, 2, 2, 1, NULL, 0), LEGO_OK);
        expect_open_fail(in_dir("one.png"), NULL, LEGO_ERR_INVALID_ARGUMENT, "single PNG");
    }
    /* An empty folder. */
    mkdir_in("empty");
    expect_open_fail(in_dir("empty"), NULL, LEGO_ERR_FORMAT, "no PNG");
}
END_TEST

START_TEST(test_idx_roundtrip) {
    path_buf ib, lb;
    const char *images = dpath(ib, "train-images-idx3-ubyte.gz");
    const char *labels = dpath(lb, "train-labels-idx1-ubyte.gz");
    lego_dataset_options o;
    lego_dataset *ds;
    float out[8 * 8], batch[3 * 8 * 8];
    int32_t label = 99, blabels[3];
    int64_t idx[3] = {2, 0, 2};
    int c, h, w;

    write_idx_pair(images, labels, 1);

    /* Native size. */
    ds = open_ok(images, NULL);
    ck_assert_int_eq(lego_dataset_count(ds), 3);
    ck_assert_int_eq(lego_dataset_shape(ds, &c, &h, &w), LEGO_OK);
    ck_assert_int_eq(c, 1);
    ck_assert_int_eq(h, 4);
    ck_assert_int_eq(w, 5);
    ck_assert_int_eq(lego_dataset_label_dim(ds), 8);
    for (int k = 0; k < 3; k++) {
        static const int32_t want[3] = {0, 7, 2};
        ck_assert_int_eq(lego_dataset_get(ds, k, out, &label), LEGO_OK);
        ck_assert_int_eq(label, want[k]);
        for (int y = 0; y < 4; y++)
            for (int x = 0; x < 5; x++)
                ck_assert(out[y * 5 + x] == px(pixel(k, y, x, 0)));
    }
    ck_assert_int_eq(lego_dataset_get(ds, 1, out, NULL), LEGO_OK);
    /* Bad calls keep the handle usable and explain themselves. */
    ck_assert_int_eq(lego_dataset_get(ds, 3, out, NULL), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(lego_dataset_error(ds), "out of range"));
    ck_assert_int_eq(lego_dataset_get(ds, -1, out, NULL), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_dataset_get(ds, 0, NULL, NULL), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_dataset_get_batch(ds, idx, 0, batch, NULL), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_dataset_get_batch(ds, NULL, 1, batch, NULL), LEGO_ERR_INVALID_ARGUMENT);
    idx[1] = 5;
    batch[0] = 1234.0f;
    ck_assert_int_eq(lego_dataset_get_batch(ds, idx, 3, batch, NULL), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(lego_dataset_error(ds), "indices[1]"));
    ck_assert(batch[0] == 1234.0f); /* nothing written */
    idx[1] = 0;
    ck_assert_int_eq(lego_dataset_get_batch(ds, idx, 3, batch, blabels), LEGO_OK);
    ck_assert_int_eq(blabels[0], 2);
    ck_assert_int_eq(blabels[1], 0);
    ck_assert_int_eq(blabels[2], 2);
    ck_assert(batch[20 + 3] == px(pixel(0, 0, 3, 0)));
    ck_assert(batch[40 + 19] == px(pixel(2, 3, 4, 0)));
    lego_dataset_free(ds);

    /* Padded to 8 x 8: 4 rows -> 2 above, 2 below; 5 columns -> 1 left,
     * 2 right. */
    lego_dataset_options_init(&o);
    o.resolution = 8;
    ds = open_ok(images, &o);
    ck_assert_int_eq(lego_dataset_shape(ds, &c, &h, &w), LEGO_OK);
    ck_assert_int_eq(h, 8);
    ck_assert_int_eq(w, 8);
    ck_assert_int_eq(lego_dataset_get(ds, 2, out, &label), LEGO_OK);
    ck_assert_int_eq(label, 2);
    for (int y = 0; y < 8; y++)
        for (int x = 0; x < 8; x++) {
            int inside = y >= 2 && y < 6 && x >= 1 && x < 6;
            float want = inside ? px(pixel(2, y - 2, x - 1, 0)) : -1.0f;
            ck_assert_msg(out[y * 8 + x] == want, "(%d, %d): %g != %g", y, x,
                          (double)out[y * 8 + x], (double)want);
        }
    lego_dataset_free(ds);

    /* Another pad value; resolution equal to the native size does nothing. */
    o.pad_value = 0.25f;
    ds = open_ok(images, &o);
    ck_assert_int_eq(lego_dataset_get(ds, 0, out, NULL), LEGO_OK);
    ck_assert(out[0] == 0.25f && out[63] == 0.25f);
    lego_dataset_free(ds);

    /* Too small a resolution: refused (no cropping). */
    o.resolution = 4;
    expect_open_fail(images, &o, LEGO_ERR_SHAPE, "larger than the requested resolution");

    /* max_images. */
    lego_dataset_options_init(&o);
    o.max_images = 2;
    ds = open_ok(images, &o);
    ck_assert_int_eq(lego_dataset_count(ds), 2);
    ck_assert_int_eq(lego_dataset_label_dim(ds), 8); /* over all labels */
    ck_assert_int_eq(lego_dataset_get(ds, 1, out, &label), LEGO_OK);
    ck_assert_int_eq(label, 7);
    ck_assert_int_eq(lego_dataset_get(ds, 2, out, NULL), LEGO_ERR_INVALID_ARGUMENT);
    lego_dataset_free(ds);

    /* A caller built against an older, shorter struct: fields past its
     * `size` are not read (max_bytes = 1 would refuse the file). */
    lego_dataset_options_init(&o);
    o.resolution = 8;
    o.max_bytes = 1;
    o.size = offsetof(lego_dataset_options, max_bytes);
    ds = open_ok(images, &o);
    ck_assert_int_eq(lego_dataset_shape(ds, NULL, &h, NULL), LEGO_OK);
    ck_assert_int_eq(h, 8);
    lego_dataset_free(ds);
}
END_TEST

START_TEST(test_idx_28_to_32) {
    path_buf ib;
    const char *images = dpath(ib, "t10k-images-idx3-ubyte.gz");
    size_t len;
    uint8_t *b = idx_images(2, 28, 28, &len);
    lego_dataset_options o;
    lego_dataset *ds;
    float out[32 * 32];
    int32_t label;

    write_gz(images, b, len);
    free(b);
    lego_dataset_options_init(&o);
    o.resolution = 32;
    ds = open_ok(images, &o);
    ck_assert_int_eq(lego_dataset_label_dim(ds), 0); /* no labels file */
    ck_assert_int_eq(lego_dataset_get(ds, 1, out, &label), LEGO_OK);
    ck_assert_int_eq(label, -1);
    for (int y = 0; y < 32; y++)
        for (int x = 0; x < 32; x++) {
            int inside = y >= 2 && y < 30 && x >= 2 && x < 30;
            float want = inside ? px(pixel(1, y - 2, x - 2, 0)) : -1.0f;
            ck_assert(out[y * 32 + x] == want);
        }
    lego_dataset_free(ds);
}
END_TEST

START_TEST(test_idx_plain_and_labels_path) {
    lego_dataset_options o;
    lego_dataset *ds;
    int32_t label;
    float out[20];

    /* Plain (not gzip) files; the labels file is found as .gz too. */
    write_idx_pair(in_dir("a-images-idx3-ubyte"), NULL, 0);
    {
        static const uint8_t lab[3] = {4, 1, 3};
        write_idx_labels(in_dir("a-labels-idx1-ubyte.gz"), lab, 3, 1);
        write_idx_labels(in_dir("other-labels"), lab + 1, 2, 0);
    }
    ds = open_ok(in_dir("a-images-idx3-ubyte"), NULL);
    ck_assert_int_eq(lego_dataset_count(ds), 3);
    ck_assert_int_eq(lego_dataset_label_dim(ds), 5);
    ck_assert_int_eq(lego_dataset_get(ds, 0, out, &label), LEGO_OK);
    ck_assert_int_eq(label, 4);
    ck_assert(out[7] == px(pixel(0, 1, 2, 0)));
    lego_dataset_free(ds);

    /* An explicit labels file wins; its count must match. */
    lego_dataset_options_init(&o);
    o.labels_path = in_dir("other-labels");
    expect_open_fail(in_dir("a-images-idx3-ubyte"), &o, LEGO_ERR_SHAPE, "has 2 labels");
    o.labels_path = in_dir("nope");
    expect_open_fail(in_dir("a-images-idx3-ubyte"), &o, LEGO_ERR_IO, "nope");

    /* A labels file given as the images. */
    expect_open_fail(in_dir("other-labels"), NULL, LEGO_ERR_INVALID_ARGUMENT, "labels file");
    /* labels_path is for idx only. */
    mkdir_in("pngs");
    o.labels_path = in_dir("other-labels");
    expect_open_fail(in_dir("pngs"), &o, LEGO_ERR_INVALID_ARGUMENT, "idx files only");
}
END_TEST

/* The first label and image of a Fashion-MNIST file, read independently. */
static int read_first(const char *path, size_t skip, uint8_t *out, size_t n) {
    gzFile g = gzopen(path, "rb");
    uint8_t hdr[16];
    int ok;
    if (!g) return 0;
    ok = gzread(g, hdr, (unsigned)skip) == (int)skip && gzread(g, out, (unsigned)n) == (int)n;
    gzclose(g);
    return ok;
}

START_TEST(test_fashion_mnist) {
    const char *dir = "/usr/share/datasets/fashion-mnist";
    char images[256], labels[256];
    uint8_t first_label = 255, first_image[784];
    lego_dataset_options o;
    lego_dataset *ds;
    float *out;
    int32_t label = -7;
    int c, h, w, seen[10] = {0};

    snprintf(images, sizeof images, "%s/t10k-images-idx3-ubyte.gz", dir);
    snprintf(labels, sizeof labels, "%s/t10k-labels-idx1-ubyte.gz", dir);
    if (!path_exists(images) || !path_exists(labels)) {
        fprintf(stderr, "test_fashion_mnist: %s absent, skipped\n", dir);
        return;
    }
    ck_assert(read_first(labels, 8, &first_label, 1));
    ck_assert(read_first(images, 16, first_image, sizeof first_image));
    ck_assert_int_eq(first_label, 9); /* "ankle boot", as the dataset documents */

    lego_dataset_options_init(&o);
    o.resolution = 32;
    ds = open_ok(images, &o);
    ck_assert_int_eq(lego_dataset_count(ds), 10000);
    ck_assert_int_eq(lego_dataset_shape(ds, &c, &h, &w), LEGO_OK);
    ck_assert_int_eq(c, 1);
    ck_assert_int_eq(h, 32);
    ck_assert_int_eq(w, 32);
    ck_assert_int_eq(lego_dataset_label_dim(ds), 10);
    out = malloc(32 * 32 * sizeof *out);
    ck_assert_ptr_nonnull(out);
    ck_assert_int_eq(lego_dataset_get(ds, 0, out, &label), LEGO_OK);
    ck_assert_int_eq(label, first_label);
    for (int y = 0; y < 32; y++)
        for (int x = 0; x < 32; x++) {
            int inside = y >= 2 && y < 30 && x >= 2 && x < 30;
            float want = inside ? px(first_image[(y - 2) * 28 + (x - 2)]) : -1.0f;
            ck_assert(out[y * 32 + x] == want);
        }
    for (int64_t i = 0; i < 10000; i += 37) {
        ck_assert_int_eq(lego_dataset_get(ds, i, out, &label), LEGO_OK);
        ck_assert(label >= 0 && label <= 9);
        seen[label] = 1;
        for (int p = 0; p < 32 * 32; p++) ck_assert(out[p] >= -1.0f && out[p] <= 1.0f);
    }
    for (int k = 0; k < 10; k++) ck_assert(seen[k]);
    free(out);
    lego_dataset_free(ds);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Hostile idx files                                                        */
/* ------------------------------------------------------------------------ */

START_TEST(test_idx_hostile) {
    path_buf ib, lb;
    const char *images = dpath(ib, "x-images-idx3-ubyte.gz");
    const char *labels = dpath(lb, "x-labels-idx1-ubyte.gz");
    lego_dataset_options o;
    uint8_t *gz;
    size_t len, gzlen;
    uint8_t hdr[16];

    /* Truncated gzip: cut in the middle, and cut only the trailer (CRC and
     * length), which the data alone would not show. */
    write_idx_pair(images, labels, 1);
    gz = read_all(images, &gzlen);
    write_file(images, gz, gzlen / 2);
    expect_open_fail(images, NULL, LEGO_ERR_FORMAT, "x-images-idx3-ubyte.gz");
    write_file(images, gz, gzlen - 4);
    expect_open_fail(images, NULL, LEGO_ERR_FORMAT, "truncated");
    /* A flipped byte in the deflate data or the CRC. */
    gz[gzlen - 6] ^= 0x55;
    write_file(images, gz, gzlen);
    expect_open_fail(images, NULL, LEGO_ERR_FORMAT, "x-images");
    free(gz);

    /* A truncated plain file. */
    {
        uint8_t *b = idx_images(3, 4, 5, &len);
        write_file(in_dir("p-images-idx3-ubyte"), b, len - 1);
        expect_open_fail(in_dir("p-images-idx3-ubyte"), NULL, LEGO_ERR_FORMAT, "truncated");
        /* Trailing data after the images. */
        uint8_t *longer = malloc(len + 1);
        memcpy(longer, b, len);
        longer[len] = 7;
        write_gz(images, longer, len + 1);
        expect_open_fail(images, NULL, LEGO_ERR_FORMAT, "data after");
        free(longer);
        free(b);
    }

    /* Wrong magic. */
    write_idx_pair(images, labels, 1);
    put_be32(hdr, 0x01000803);
    put_be32(hdr + 4, 3);
    put_be32(hdr + 8, 4);
    put_be32(hdr + 12, 5);
    write_gz(images, hdr, 16);
    expect_open_fail(images, NULL, LEGO_ERR_FORMAT, "not an idx file");
    put_be32(hdr, 0x00000D03); /* float data */
    write_gz(images, hdr, 16);
    expect_open_fail(images, NULL, LEGO_ERR_UNSUPPORTED, "data type");
    put_be32(hdr, 0x00000804); /* four dimensions */
    write_gz(images, hdr, 16);
    expect_open_fail(images, NULL, LEGO_ERR_FORMAT, "dimensions");
    put_be32(hdr, 0x00000803);
    write_gz(images, hdr, 6); /* header itself truncated */
    expect_open_fail(images, NULL, LEGO_ERR_FORMAT, "truncated");

    /* Absurd dimensions: lying header in a tiny file, no huge allocation. */
    put_be32(hdr, 0x00000803);
    put_be32(hdr + 4, 0xFFFFFFFFu);
    put_be32(hdr + 8, 65535);
    put_be32(hdr + 12, 65535);
    write_gz(images, hdr, 16);
    expect_open_fail(images, NULL, LEGO_ERR_FORMAT, "more than a");
    put_be32(hdr + 8, 0x7FFFFFFF);
    write_gz(images, hdr, 16);
    expect_open_fail(images, NULL, LEGO_ERR_FORMAT, "implausible");
    put_be32(hdr + 4, 0);
    put_be32(hdr + 8, 28);
    write_gz(images, hdr, 16);
    expect_open_fail(images, NULL, LEGO_ERR_FORMAT, "implausible");
    /* A plausible claim that still exceeds the data: truncated. */
    put_be32(hdr + 4, 10);
    put_be32(hdr + 8, 28);
    put_be32(hdr + 12, 28);
    write_gz(images, hdr, 16);
    expect_open_fail(images, NULL, LEGO_ERR_FORMAT, "truncated");

    /* max_bytes caps the decoded size. */
    write_idx_pair(images, labels, 1);
    lego_dataset_options_init(&o);
    o.max_bytes = 59; /* 3 x 4 x 5 = 60 */
    expect_open_fail(images, &o, LEGO_ERR_OUT_OF_MEMORY, "max_bytes");
    o.max_bytes = 60;
    lego_dataset_free(open_ok(images, &o));

    /* Labels: count mismatch, wrong magic, truncated, trailing, corrupt. */
    {
        static const uint8_t lab[4] = {1, 2, 3, 4};
        write_idx_labels(labels, lab, 4, 1);
        expect_open_fail(images, NULL, LEGO_ERR_SHAPE, "has 4 labels but");
        write_idx_labels(labels, lab, 2, 1);
        expect_open_fail(images, NULL, LEGO_ERR_SHAPE, "has 2 labels but");
        put_be32(hdr, 0x00000803);
        put_be32(hdr + 4, 3);
        write_gz(labels, hdr, 8);
        expect_open_fail(images, NULL, LEGO_ERR_FORMAT, "x-labels-idx1-ubyte.gz");
        put_be32(hdr, 0x00000801);
        write_gz(labels, hdr, 8 + 0); /* no label bytes */
        expect_open_fail(images, NULL, LEGO_ERR_FORMAT, "truncated");
        uint8_t more[12];
        put_be32(more, 0x00000801);
        put_be32(more + 4, 3);
        memcpy(more + 8, lab, 4);
        write_gz(labels, more, 12);
        expect_open_fail(images, NULL, LEGO_ERR_FORMAT, "data after");
        write_file(labels, "\x1f\x8b\x08\x00garbage", 11);
        expect_open_fail(images, NULL, LEGO_ERR_FORMAT, "x-labels");
    }
}
END_TEST

/* ------------------------------------------------------------------------ */
/* PNG folders                                                              */
/* ------------------------------------------------------------------------ */

/* Image k of h x w x c, pixel(k, y, x, c), as a PNG file. */
static void write_png_k(const char *path, int k, int h, int w, int c) {
    uint8_t *p = malloc((size_t)h * w * c);
    char msg[256] = "";
    ck_assert_ptr_nonnull(p);
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            for (int ch = 0; ch < c; ch++) p[(y * w + x) * c + ch] = pixel(k, y, x, ch);
    ck_assert_msg(lego_write_png(path, p, h, w, c, msg, sizeof msg) == LEGO_OK, "%s", msg);
    free(p);
}

/* The dataset's image i must be image k (C x H x W, unpadded). */
static void check_image(lego_dataset *ds, int64_t i, int k, int h, int w, int c,
                        int32_t want_label) {
    float *out = malloc((size_t)h * w * c * sizeof *out);
    int32_t label = -99;
    ck_assert_ptr_nonnull(out);
    ck_assert_int_eq(lego_dataset_get(ds, i, out, &label), LEGO_OK);
    ck_assert_int_eq(label, want_label);
    for (int ch = 0; ch < c; ch++)
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++)
                ck_assert_msg(out[(ch * h + y) * w + x] == px(pixel(k, y, x, ch)),
                              "image %lld: channel %d (%d, %d)", (long long)i, ch, y, x);
    free(out);
}

START_TEST(test_folder) {
    lego_dataset *ds;
    lego_dataset_options o;
    int c, h, w;

    /* Grey, nested, listed out of order; other files ignored. */
    mkdir_in("grey");
    mkdir_in("grey/a");
    write_png_k(in_dir("grey/img1.png"), 1, 6, 7, 1);
    write_png_k(in_dir("grey/img0.PNG"), 0, 6, 7, 1);
    write_png_k(in_dir("grey/a/img2.png"), 2, 6, 7, 1);
    write_file(in_dir("grey/notes.txt"), "x", 1);
    write_file(in_dir("grey/.hidden.png"), "x", 1);
    ds = open_ok(in_dir("grey"), NULL);
    ck_assert_int_eq(lego_dataset_count(ds), 3);
    ck_assert_int_eq(lego_dataset_label_dim(ds), 0);
    ck_assert_int_eq(lego_dataset_shape(ds, &c, &h, &w), LEGO_OK);
    ck_assert(c == 1 && h == 6 && w == 7);
    /* Byte order: "a/img2.png" < "img0.PNG" < "img1.png". */
    check_image(ds, 0, 2, 6, 7, 1, -1);
    check_image(ds, 1, 0, 6, 7, 1, -1);
    check_image(ds, 2, 1, 6, 7, 1, -1);
    lego_dataset_free(ds);

    /* RGB, padded, with labels. */
    mkdir_in("rgb");
    mkdir_in("rgb/00000");
    write_png_k(in_dir("rgb/00000/img00000000.png"), 0, 5, 4, 3);
    write_png_k(in_dir("rgb/00000/img00000001.png"), 1, 5, 4, 3);
    {
        const char *json = "{\"labels\": [[\"00000/img00000001.png\", 3], "
                           "[\"00000/img00000000.png\", 6]]}";
        write_file(in_dir("rgb/dataset.json"), json, strlen(json));
    }
    lego_dataset_options_init(&o);
    o.resolution = 8;
    o.pad_value = 0.5f;
    ds = open_ok(in_dir("rgb"), &o);
    ck_assert_int_eq(lego_dataset_count(ds), 2);
    ck_assert_int_eq(lego_dataset_label_dim(ds), 7);
    ck_assert_int_eq(lego_dataset_shape(ds, &c, &h, &w), LEGO_OK);
    ck_assert(c == 3 && h == 8 && w == 8);
    {
        float out[3 * 8 * 8];
        int32_t label;
        ck_assert_int_eq(lego_dataset_get(ds, 1, out, &label), LEGO_OK);
        ck_assert_int_eq(label, 3);
        /* 5 rows -> 1 above, 2 below; 4 columns -> 2 each side. */
        for (int ch = 0; ch < 3; ch++)
            for (int y = 0; y < 8; y++)
                for (int x = 0; x < 8; x++) {
                    int inside = y >= 1 && y < 6 && x >= 2 && x < 6;
                    float want = inside ? px(pixel(1, y - 1, x - 2, ch)) : 0.5f;
                    ck_assert(out[(ch * 8 + y) * 8 + x] == want);
                }
    }
    lego_dataset_free(ds);

    /* "labels": null is unlabelled. */
    write_file(in_dir("rgb/dataset.json"), "{\"labels\": null}", 16);
    ds = open_ok(in_dir("rgb"), NULL);
    ck_assert_int_eq(lego_dataset_label_dim(ds), 0);
    check_image(ds, 0, 0, 5, 4, 3, -1);
    lego_dataset_free(ds);
}
END_TEST

START_TEST(test_folder_hostile) {
    mkdir_in("f");
    write_png_k(in_dir("f/a.png"), 0, 6, 6, 1);
    write_png_k(in_dir("f/b.png"), 1, 6, 6, 1);

    /* A PNG of the wrong size, and one with other channels. */
    write_png_k(in_dir("f/c.png"), 2, 6, 5, 1);
    expect_open_fail(in_dir("f"), NULL, LEGO_ERR_SHAPE, "'c.png' is 6 x 5");
    write_png_k(in_dir("f/c.png"), 2, 6, 6, 3);
    expect_open_fail(in_dir("f"), NULL, LEGO_ERR_SHAPE, "'c.png' is 6 x 6 with 3 channels");
    /* RGBA is refused. */
    write_png_k(in_dir("f/c.png"), 2, 6, 6, 4);
    expect_open_fail(in_dir("f"), NULL, LEGO_ERR_UNSUPPORTED, "alpha");
    /* A truncated PNG, and garbage named .png. */
    {
        size_t n;
        uint8_t *b;
        write_png_k(in_dir("f/c.png"), 2, 6, 6, 1);
        b = read_all(in_dir("f/c.png"), &n);
        write_file(in_dir("f/c.png"), b, n - 20);
        expect_open_fail(in_dir("f"), NULL, LEGO_ERR_FORMAT, "c.png");
        b[n - 30] ^= 0xFF; /* inside IDAT or its CRC */
        write_file(in_dir("f/c.png"), b, n);
        expect_open_fail(in_dir("f"), NULL, LEGO_ERR_FORMAT, "c.png");
        free(b);
        write_file(in_dir("f/c.png"), "not a png at all", 16);
        expect_open_fail(in_dir("f"), NULL, LEGO_ERR_FORMAT, "not a valid PNG");
        write_file(in_dir("f/c.png"), "", 0);
        expect_open_fail(in_dir("f"), NULL, LEGO_ERR_FORMAT, "c.png");
        remove(in_dir("f/c.png"));
    }
    /* Other image formats are refused, not skipped. */
    write_file(in_dir("f/d.jpg"), "x", 1);
    expect_open_fail(in_dir("f"), NULL, LEGO_ERR_UNSUPPORTED, "d.jpg");
    remove(in_dir("f/d.jpg"));
    {
        /* max_bytes caps the pixels (2 x 32 x 32 = 2048 bytes) and each
         * file (these PNGs are smaller). */
        lego_dataset_options o;
        mkdir_in("g");
        write_png_k(in_dir("g/a.png"), 0, 32, 32, 1);
        write_png_k(in_dir("g/b.png"), 1, 32, 32, 1);
        lego_dataset_options_init(&o);
        o.max_bytes = 2047;
        expect_open_fail(in_dir("g"), &o, LEGO_ERR_OUT_OF_MEMORY, "max_bytes");
        o.max_bytes = 2048;
        lego_dataset_free(open_ok(in_dir("g"), &o));
        o.max_bytes = 100; /* smaller than a file */
        expect_open_fail(in_dir("g"), &o, LEGO_ERR_OUT_OF_MEMORY, "a.png has");
    }

    /* Bad dataset.json. */
    static const struct {
        const char *json;
        lego_status want;
        const char *needle;
    } bad[] = {
        {"{\"labels\": [[\"a.png\", 1], [\"b.png\", 2], [\"z.png\", 3]]}", LEGO_ERR_FORMAT,
         "'z.png', which is not an image"},
        {"{\"labels\": [[\"a.png\", 1]]}", LEGO_ERR_FORMAT, "'b.png' has no label"},
        {"{\"labels\": [[\"a.png\", 1], [\"a.png\", 1], [\"b.png\", 2]]}", LEGO_ERR_FORMAT,
         "twice"},
        {"{\"labels\": [[\"a.png\", -1], [\"b.png\", 2]]}", LEGO_ERR_FORMAT, "class index"},
        {"{\"labels\": [[\"a.png\", 1.5], [\"b.png\", 2]]}", LEGO_ERR_FORMAT, "class index"},
        {"{\"labels\": [[\"a.png\", \"cat\"], [\"b.png\", 2]]}", LEGO_ERR_FORMAT, "class index"},
        {"{\"labels\": [[\"a.png\", 1e12], [\"b.png\", 2]]}", LEGO_ERR_FORMAT, "class index"},
        {"{\"labels\": [[\"a.png\", [0.5, 1]], [\"b.png\", 2]]}", LEGO_ERR_UNSUPPORTED,
         "vector"},
        {"{\"labels\": [[\"a.png\"], [\"b.png\", 2]]}", LEGO_ERR_FORMAT, "pair"},
        {"{\"labels\": [[1, 1], [\"b.png\", 2]]}", LEGO_ERR_FORMAT, "pair"},
        {"{\"labels\": {\"a.png\": 1}}", LEGO_ERR_FORMAT, "not an array"},
        {"[1, 2]", LEGO_ERR_FORMAT, "not a JSON object"},
        {"{\"labels\": [[\"a.png\", 1], ", LEGO_ERR_FORMAT, "not valid JSON"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        write_file(in_dir("f/dataset.json"), bad[i].json, strlen(bad[i].json));
        expect_open_fail(in_dir("f"), NULL, bad[i].want, bad[i].needle);
    }
    /* A huge dataset.json for two images is refused before parsing. */
    {
        size_t n = 3u << 20;
        char *big = malloc(n);
        ck_assert_ptr_nonnull(big);
        memset(big, ' ', n);
        big[0] = '{';
        big[n - 1] = '}';
        write_file(in_dir("f/dataset.json"), big, n);
        free(big);
        expect_open_fail(in_dir("f"), NULL, LEGO_ERR_OUT_OF_MEMORY, "dataset.json");
    }
}
END_TEST

static uint8_t *png_bytes_file(const char *path, size_t *n) { return read_all(path, n); }

static void set_be32(uint8_t *p, uint32_t v) { put_be32(p, v); }

/* Recompute the IHDR chunk's CRC (bytes 12..28 are type and data). */
static void fix_ihdr_crc(uint8_t *b) {
    uint32_t crc = (uint32_t)crc32(0, b + 12, 17);
    put_be32(b + 29, crc);
}

/* A PNG written with libpng directly, for layouts lego_write_png does not
 * make: rows of `rowbytes` packed samples as libpng takes them. */
static void write_png_raw(const char *path, int w, int h, int depth, int ctype, int interlace,
                          const uint8_t *rows, size_t rowbytes, const png_color *palette,
                          int npalette, int trns) {
    FILE *f = fopen(path, "wb");
    png_structp png;
    png_infop info;
    ck_assert_ptr_nonnull(f);
    png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    ck_assert_ptr_nonnull(png);
    info = png_create_info_struct(png);
    ck_assert_ptr_nonnull(info);
    if (setjmp(png_jmpbuf(png))) ck_abort_msg("libpng failed writing %s", path);
    png_init_io(png, f);
    png_set_IHDR(png, info, (png_uint_32)w, (png_uint_32)h, depth, ctype, interlace,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    if (palette) png_set_PLTE(png, info, palette, npalette);
    if (trns) {
        png_color_16 t;
        memset(&t, 0, sizeof t);
        png_set_tRNS(png, info, NULL, 0, &t);
    }
    png_write_info(png, info);
    if (depth == 16) png_set_swap(png); /* our rows are little-endian */
    {
        int passes = png_set_interlace_handling(png);
        for (int p = 0; p < passes; p++)
            for (int y = 0; y < h; y++) png_write_row(png, rows + (size_t)y * rowbytes);
    }
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    ck_assert_int_eq(fclose(f), 0);
}

START_TEST(test_png_variants) {
    uint8_t rgb[9 * 7 * 3], pal_rows[9 * 7], grey2_rows[9 * 2];
    uint16_t deep[9 * 7];
    png_color palette[4] = {{0, 0, 0}, {255, 0, 0}, {10, 200, 30}, {255, 255, 255}};
    lego_dataset *ds;
    float out[3 * 9 * 7];

    /* Adam7-interlaced RGB, 9 rows x 7 columns. */
    for (int y = 0; y < 9; y++)
        for (int x = 0; x < 7; x++)
            for (int c = 0; c < 3; c++) rgb[(y * 7 + x) * 3 + c] = pixel(0, y, x, c);
    mkdir_in("inter");
    write_png_raw(in_dir("inter/a.png"), 7, 9, 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_ADAM7, rgb,
                  7 * 3, NULL, 0, 0);
    ds = open_ok(in_dir("inter"), NULL);
    check_image(ds, 0, 0, 9, 7, 3, -1);
    lego_dataset_free(ds);

    /* A palette image becomes RGB. */
    for (int i = 0; i < 9 * 7; i++) pal_rows[i] = (uint8_t)(i % 4);
    mkdir_in("pal");
    write_png_raw(in_dir("pal/a.png"), 7, 9, 8, PNG_COLOR_TYPE_PALETTE, PNG_INTERLACE_NONE,
                  pal_rows, 7, palette, 4, 0);
    ds = open_ok(in_dir("pal"), NULL);
    ck_assert_int_eq(lego_dataset_get(ds, 0, out, NULL), LEGO_OK);
    for (int i = 0; i < 9 * 7; i++) {
        const png_color *col = &palette[i % 4];
        ck_assert(out[i] == px(col->red));
        ck_assert(out[63 + i] == px(col->green));
        ck_assert(out[126 + i] == px(col->blue));
    }
    lego_dataset_free(ds);

    /* 2-bit grey: values 0..3 become 0, 85, 170, 255. */
    memset(grey2_rows, 0, sizeof grey2_rows);
    for (int y = 0; y < 9; y++)
        for (int x = 0; x < 7; x++) {
            int v = (x + y) % 4;
            grey2_rows[y * 2 + x / 4] |= (uint8_t)(v << (6 - 2 * (x % 4)));
        }
    mkdir_in("grey2");
    write_png_raw(in_dir("grey2/a.png"), 7, 9, 2, PNG_COLOR_TYPE_GRAY, PNG_INTERLACE_NONE,
                  grey2_rows, 2, NULL, 0, 0);
    ds = open_ok(in_dir("grey2"), NULL);
    ck_assert_int_eq(lego_dataset_get(ds, 0, out, NULL), LEGO_OK);
    for (int y = 0; y < 9; y++)
        for (int x = 0; x < 7; x++) ck_assert(out[y * 7 + x] == px((unsigned)((x + y) % 4) * 85));
    lego_dataset_free(ds);

    /* 16-bit samples and transparency are refused. */
    for (int i = 0; i < 9 * 7; i++) deep[i] = (uint16_t)(i * 1000);
    mkdir_in("deep");
    write_png_raw(in_dir("deep/a.png"), 7, 9, 16, PNG_COLOR_TYPE_GRAY, PNG_INTERLACE_NONE,
                  (const uint8_t *)deep, 14, NULL, 0, 0);
    expect_open_fail(in_dir("deep"), NULL, LEGO_ERR_UNSUPPORTED, "16 bits");
    mkdir_in("trns");
    write_png_raw(in_dir("trns/a.png"), 7, 9, 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE, rgb,
                  7 * 3, NULL, 0, 1);
    expect_open_fail(in_dir("trns"), NULL, LEGO_ERR_UNSUPPORTED, "transparency");

    /* An IHDR claiming 65536 x 65536 (over the side limit) in a tiny file. */
    {
        size_t n;
        uint8_t *b = png_bytes_file(in_dir("inter/a.png"), &n);
        set_be32(b + 16, 65536);
        set_be32(b + 20, 65536);
        fix_ihdr_crc(b);
        write_file(in_dir("inter/a.png"), b, n);
        expect_open_fail(in_dir("inter"), NULL, LEGO_ERR_FORMAT, "a.png");
        /* 60000 x 60000 is within libpng's limits, not within what the file
         * can hold. */
        set_be32(b + 16, 60000);
        set_be32(b + 20, 60000);
        fix_ihdr_crc(b);
        write_file(in_dir("inter/a.png"), b, n);
        expect_open_fail(in_dir("inter"), NULL, LEGO_ERR_FORMAT, "more than a");
        /* 250 x 250 is plausible for the file, but not for max_bytes, and
         * then the data runs out. */
        set_be32(b + 16, 250);
        set_be32(b + 20, 250);
        fix_ihdr_crc(b);
        write_file(in_dir("inter/a.png"), b, n);
        {
            lego_dataset_options o;
            lego_dataset_options_init(&o);
            o.max_bytes = 250 * 250 * 3 - 1;
            expect_open_fail(in_dir("inter"), &o, LEGO_ERR_OUT_OF_MEMORY, "max_bytes");
        }
        expect_open_fail(in_dir("inter"), NULL, LEGO_ERR_FORMAT, "a.png");
        free(b);
    }
}
END_TEST

/* ------------------------------------------------------------------------ */
/* ZIP archives                                                             */
/* ------------------------------------------------------------------------ */

typedef struct zb_entry {
    char name[64];
    uint32_t offset, crc, csize, usize, cd_pos;
    uint16_t method, flags;
} zb_entry;

typedef struct zbuild {
    uint8_t *buf;
    size_t len, cap;
    zb_entry e[16];
    int n;
    size_t cd_off, end_off;
} zbuild;

static void zb_put(zbuild *z, const void *p, size_t n) {
    if (z->len + n > z->cap) {
        z->cap = (z->len + n) * 2 + 256;
        z->buf = realloc(z->buf, z->cap);
        ck_assert_ptr_nonnull(z->buf);
    }
    if (n) memcpy(z->buf + z->len, p, n);
    z->len += n;
}

static void zb_16(zbuild *z, unsigned v) {
    uint8_t b[2] = {(uint8_t)v, (uint8_t)(v >> 8)};
    zb_put(z, b, 2);
}

static void zb_32(zbuild *z, uint32_t v) {
    zb_16(z, v & 0xFFFF);
    zb_16(z, v >> 16);
}

static void set16(uint8_t *p, unsigned v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void set32(uint8_t *p, uint32_t v) {
    set16(p, v & 0xFFFF);
    set16(p + 2, v >> 16);
}

/* Raw deflate of data. */
static uint8_t *deflate_raw(const uint8_t *data, size_t len, size_t *out_len) {
    z_stream zs;
    uint8_t *out;
    size_t cap;
    memset(&zs, 0, sizeof zs);
    ck_assert_int_eq(deflateInit2(&zs, 9, Z_DEFLATED, -MAX_WBITS, 8, Z_DEFAULT_STRATEGY), Z_OK);
    cap = deflateBound(&zs, (uLong)len) + 16;
    out = malloc(cap);
    ck_assert_ptr_nonnull(out);
    zs.next_in = (Bytef *)(uintptr_t)data;
    zs.avail_in = (uInt)len;
    zs.next_out = out;
    zs.avail_out = (uInt)cap;
    ck_assert_int_eq(deflate(&zs, Z_FINISH), Z_STREAM_END);
    *out_len = zs.total_out;
    deflateEnd(&zs);
    return out;
}

/* Append a local header and the data; `descriptor`: sizes and CRC in a
 * data descriptor after the data (with its signature). */
static zb_entry *zb_add(zbuild *z, const char *name, const void *data, size_t len,
                        int method, int descriptor) {
    zb_entry *e = &z->e[z->n++];
    size_t clen = len;
    uint8_t *packed = NULL;
    const uint8_t *payload = data;
    ck_assert_int_le(z->n, 16);
    snprintf(e->name, sizeof e->name, "%s", name);
    e->offset = (uint32_t)z->len;
    e->crc = (uint32_t)crc32(0, data, (uInt)len);
    e->usize = (uint32_t)len;
    e->method = (uint16_t)method;
    e->flags = descriptor ? 8 : 0;
    if (method == 8) {
        packed = deflate_raw(data, len, &clen);
        payload = packed;
    }
    e->csize = (uint32_t)clen;
    zb_32(z, 0x04034b50);
    zb_16(z, 20);
    zb_16(z, e->flags);
    zb_16(z, e->method);
    zb_16(z, 0);
    zb_16(z, 0x21);
    zb_32(z, descriptor ? 0 : e->crc);
    zb_32(z, descriptor ? 0 : e->csize);
    zb_32(z, descriptor ? 0 : e->usize);
    zb_16(z, (unsigned)strlen(name));
    zb_16(z, 0);
    zb_put(z, name, strlen(name));
    zb_put(z, payload, clen);
    if (descriptor) {
        zb_32(z, 0x08074b50);
        zb_32(z, e->crc);
        zb_32(z, e->csize);
        zb_32(z, e->usize);
    }
    free(packed);
    return e;
}

static void zb_finish(zbuild *z) {
    z->cd_off = z->len;
    for (int i = 0; i < z->n; i++) {
        zb_entry *e = &z->e[i];
        e->cd_pos = (uint32_t)z->len;
        zb_32(z, 0x02014b50);
        zb_16(z, 20);
        zb_16(z, 20);
        zb_16(z, e->flags);
        zb_16(z, e->method);
        zb_16(z, 0);
        zb_16(z, 0x21);
        zb_32(z, e->crc);
        zb_32(z, e->csize);
        zb_32(z, e->usize);
        zb_16(z, (unsigned)strlen(e->name));
        zb_16(z, 0);
        zb_16(z, 0);
        zb_16(z, 0);
        zb_16(z, 0);
        zb_32(z, 0);
        zb_32(z, e->offset);
        zb_put(z, e->name, strlen(e->name));
    }
    z->end_off = z->len;
    zb_32(z, 0x06054b50);
    zb_16(z, 0);
    zb_16(z, 0);
    zb_16(z, (unsigned)z->n);
    zb_16(z, (unsigned)z->n);
    zb_32(z, (uint32_t)(z->end_off - z->cd_off));
    zb_32(z, (uint32_t)z->cd_off);
    zb_16(z, 0);
}

/* Bytes of a PNG of image k. */
static uint8_t *png_bytes(int k, int h, int w, int c, size_t *len) {
    const char *tmp = in_dir("tmp.png");
    uint8_t *b;
    write_png_k(tmp, k, h, w, c);
    b = read_all(tmp, len);
    remove(tmp);
    return b;
}

static const char *k_json = "{\"labels\": [[\"00000/img00000000.png\", 6], "
                            "[\"00000/img00000001.png\", 0], "
                            "[\"00001/img00000002.png\", 9]]}";

/* Three 5 x 6 RGB images in "0000d/imgN.png" (stored out of order) and
 * dataset.json, with the given method for every entry. */
static void build_zip(zbuild *z, int method, int descriptor, int with_json) {
    static const struct {
        const char *name;
        int k;
    } files[3] = {{"00001/img00000002.png", 2},
                  {"00000/img00000000.png", 0},
                  {"00000/img00000001.png", 1}};
    memset(z, 0, sizeof *z);
    if (with_json) zb_add(z, "dataset.json", k_json, strlen(k_json), method, descriptor);
    zb_add(z, "00000/", "", 0, 0, 0); /* a folder entry */
    for (int i = 0; i < 3; i++) {
        size_t len;
        uint8_t *p = png_bytes(files[i].k, 5, 6, 3, &len);
        zb_add(z, files[i].name, p, len, method, descriptor);
        free(p);
    }
    zb_finish(z);
}

static void check_zip_dataset(const char *path, int labelled) {
    lego_dataset *ds = open_ok(path, NULL);
    int c, h, w;
    ck_assert_int_eq(lego_dataset_count(ds), 3);
    ck_assert_int_eq(lego_dataset_shape(ds, &c, &h, &w), LEGO_OK);
    ck_assert(c == 3 && h == 5 && w == 6);
    ck_assert_int_eq(lego_dataset_label_dim(ds), labelled ? 10 : 0);
    check_image(ds, 0, 0, 5, 6, 3, labelled ? 6 : -1);
    check_image(ds, 1, 1, 5, 6, 3, labelled ? 0 : -1);
    check_image(ds, 2, 2, 5, 6, 3, labelled ? 9 : -1);
    lego_dataset_free(ds);
}

START_TEST(test_zip) {
    zbuild z;
    path_buf pb;
    const char *path = dpath(pb, "ds.zip");

    build_zip(&z, 0, 0, 1); /* stored */
    write_file(path, z.buf, z.len);
    free(z.buf);
    check_zip_dataset(path, 1);

    build_zip(&z, 8, 0, 1); /* deflated */
    write_file(path, z.buf, z.len);
    free(z.buf);
    check_zip_dataset(path, 1);

    build_zip(&z, 8, 1, 1); /* deflated, data descriptors */
    write_file(path, z.buf, z.len);
    free(z.buf);
    check_zip_dataset(path, 1);

    build_zip(&z, 0, 1, 0); /* stored, descriptors, no dataset.json */
    write_file(path, z.buf, z.len);
    free(z.buf);
    check_zip_dataset(path, 0);

    /* The same images as a folder give the same dataset. */
    mkdir_in("same");
    mkdir_in("same/00000");
    mkdir_in("same/00001");
    write_png_k(in_dir("same/00000/img00000000.png"), 0, 5, 6, 3);
    write_png_k(in_dir("same/00000/img00000001.png"), 1, 5, 6, 3);
    write_png_k(in_dir("same/00001/img00000002.png"), 2, 5, 6, 3);
    write_file(in_dir("same/dataset.json"), k_json, strlen(k_json));
    check_zip_dataset(in_dir("same"), 1);

    /* An archive comment is fine; max_images keeps the first images. */
    {
        lego_dataset_options o;
        lego_dataset *ds;
        build_zip(&z, 8, 0, 1);
        set16(z.buf + z.end_off + 20, 5);
        zb_put(&z, "hello", 5);
        write_file(path, z.buf, z.len);
        free(z.buf);
        lego_dataset_options_init(&o);
        o.max_images = 1;
        ds = open_ok(path, &o);
        ck_assert_int_eq(lego_dataset_count(ds), 1);
        ck_assert_int_eq(lego_dataset_label_dim(ds), 10);
        check_image(ds, 0, 0, 5, 6, 3, 6);
        lego_dataset_free(ds);
    }
}
END_TEST

/* Write z (patched by the caller) and expect failure. */
static void zip_expect(zbuild *z, lego_status want, const char *needle) {
    write_file(in_dir("bad.zip"), z->buf, z->len);
    expect_open_fail(in_dir("bad.zip"), NULL, want, needle);
}

START_TEST(test_zip_hostile) {
    zbuild z;
    zb_entry *img; /* the first image entry, 00001/img00000002.png */

    /* Bad CRC: one byte of stored data changed. */
    build_zip(&z, 0, 0, 1);
    img = &z.e[2];
    z.buf[img->offset + 30 + strlen(img->name) + 40] ^= 1;
    zip_expect(&z, LEGO_ERR_FORMAT, "CRC");
    free(z.buf);
    /* Bad CRC recorded for a deflated entry. */
    build_zip(&z, 8, 0, 1);
    img = &z.e[2];
    set32(z.buf + img->cd_pos + 16, img->crc ^ 1);
    set32(z.buf + img->offset + 14, img->crc ^ 1);
    zip_expect(&z, LEGO_ERR_FORMAT, "CRC");
    free(z.buf);

    /* Corrupt deflate data. */
    build_zip(&z, 8, 0, 1);
    img = &z.e[2];
    memset(z.buf + img->offset + 30 + strlen(img->name), 0xFF, 8);
    zip_expect(&z, LEGO_ERR_FORMAT, "00001/img00000002.png");
    free(z.buf);

    /* Truncated: the end record gone, or the file cut inside the
     * central directory, or the count claiming more entries. */
    build_zip(&z, 0, 0, 1);
    z.len -= 10;
    zip_expect(&z, LEGO_ERR_FORMAT, "end of central directory");
    z.len += 10;
    {
        zbuild cut;
        memset(&cut, 0, sizeof cut);
        zb_put(&cut, z.buf, z.cd_off + 30);    /* half of the first record */
        zb_put(&cut, z.buf + z.end_off, 22);   /* then the end record */
        zip_expect(&cut, LEGO_ERR_FORMAT, "central directory");
        set32(cut.buf + cut.len - 22 + 12, 30); /* its size, made consistent */
        set32(cut.buf + cut.len - 22 + 16, (uint32_t)z.cd_off);
        zip_expect(&cut, LEGO_ERR_FORMAT, "claims");
        free(cut.buf);
    }
    set16(z.buf + z.end_off + 8, (unsigned)z.n + 1);
    set16(z.buf + z.end_off + 10, (unsigned)z.n + 1);
    zip_expect(&z, LEGO_ERR_FORMAT, "central directory");
    set16(z.buf + z.end_off + 8, (unsigned)z.n - 1);
    set16(z.buf + z.end_off + 10, (unsigned)z.n - 1);
    zip_expect(&z, LEGO_ERR_FORMAT, "bytes after");
    free(z.buf);

    /* Offsets outside the file or the entry area. */
    build_zip(&z, 0, 0, 1);
    img = &z.e[2];
    set32(z.buf + img->cd_pos + 42, 0x7FFFFFF0u);
    zip_expect(&z, LEGO_ERR_FORMAT, "outside");
    set32(z.buf + img->cd_pos + 42, img->offset + 1);
    zip_expect(&z, LEGO_ERR_FORMAT, "no local header");
    set32(z.buf + img->cd_pos + 42, img->offset);
    set32(z.buf + z.end_off + 16, (uint32_t)z.cd_off + 1);
    zip_expect(&z, LEGO_ERR_FORMAT, "does not end where");
    set32(z.buf + z.end_off + 16, 0xFFFFFF00u);
    zip_expect(&z, LEGO_ERR_FORMAT, "central directory");
    free(z.buf);

    /* Sizes that lie.  Stored: compressed size != size; both changed
     * (the data runs into the next entry or past the entries). */
    build_zip(&z, 0, 0, 1);
    img = &z.e[2];
    set32(z.buf + img->cd_pos + 20, img->csize + 1);
    zip_expect(&z, LEGO_ERR_FORMAT, "stored entry");
    set32(z.buf + img->cd_pos + 24, img->usize + 1);
    zip_expect(&z, LEGO_ERR_FORMAT, "disagrees");
    set32(z.buf + img->offset + 18, img->csize + 1);
    set32(z.buf + img->offset + 22, img->usize + 1);
    zip_expect(&z, LEGO_ERR_FORMAT, "overlap");
    free(z.buf);
    build_zip(&z, 0, 0, 1);
    img = &z.e[z.n - 1]; /* the last entry: its data would run into the directory */
    set32(z.buf + img->cd_pos + 20, img->csize + 100);
    set32(z.buf + img->cd_pos + 24, img->usize + 100);
    set32(z.buf + img->offset + 18, img->csize + 100);
    set32(z.buf + img->offset + 22, img->usize + 100);
    zip_expect(&z, LEGO_ERR_FORMAT, "run past");
    free(z.buf);
    /* Deflated: the recorded size larger or smaller than the data. */
    build_zip(&z, 8, 1, 1);
    img = &z.e[2];
    set32(z.buf + img->cd_pos + 24, img->usize + 1);
    zip_expect(&z, LEGO_ERR_FORMAT, "descriptor");
    set32(z.buf + img->offset + 30 + strlen(img->name) + img->csize + 12, img->usize + 1);
    zip_expect(&z, LEGO_ERR_FORMAT, "decompresses to");
    set32(z.buf + img->cd_pos + 24, img->usize - 1);
    set32(z.buf + img->offset + 30 + strlen(img->name) + img->csize + 12, img->usize - 1);
    zip_expect(&z, LEGO_ERR_FORMAT, "more than its recorded");
    /* Compressed size too small: the stream ends early. */
    set32(z.buf + img->cd_pos + 24, img->usize);
    set32(z.buf + img->offset + 30 + strlen(img->name) + img->csize + 12, img->usize);
    set32(z.buf + img->cd_pos + 20, img->csize - 10);
    zip_expect(&z, LEGO_ERR_FORMAT, "descriptor");
    free(z.buf);

    /* A deflate bomb's claim: far more than deflate can give, or more than
     * max_bytes. */
    build_zip(&z, 8, 0, 1);
    img = &z.e[2];
    set32(z.buf + img->cd_pos + 24, 0x7FFFFFFFu);
    set32(z.buf + img->offset + 22, 0x7FFFFFFFu);
    zip_expect(&z, LEGO_ERR_FORMAT, "more than deflate can produce");
    {
        lego_dataset_options o;
        lego_dataset_options_init(&o);
        o.max_bytes = 1000; /* room for the directory and the pixels */
        write_file(in_dir("bad.zip"), z.buf, z.len);
        expect_open_fail(in_dir("bad.zip"), &o, LEGO_ERR_OUT_OF_MEMORY,
                         "has 2147483647 bytes, more than the limit of 1000");
        o.max_bytes = 100; /* not even the central directory fits */
        expect_open_fail(in_dir("bad.zip"), &o, LEGO_ERR_OUT_OF_MEMORY, "central directory");
    }
    free(z.buf);

    /* ZIP64: markers in the end record, in an entry, an extra field, and
     * a ZIP64 locator. */
    build_zip(&z, 0, 0, 1);
    set32(z.buf + z.end_off + 16, 0xFFFFFFFFu);
    zip_expect(&z, LEGO_ERR_UNSUPPORTED, "ZIP64");
    free(z.buf);
    build_zip(&z, 0, 0, 1);
    set16(z.buf + z.end_off + 10, 0xFFFF);
    zip_expect(&z, LEGO_ERR_UNSUPPORTED, "ZIP64");
    free(z.buf);
    build_zip(&z, 0, 0, 1);
    set32(z.buf + z.e[3].cd_pos + 24, 0xFFFFFFFFu);
    zip_expect(&z, LEGO_ERR_UNSUPPORTED, "ZIP64");
    free(z.buf);
    {
        /* An entry whose central record carries a ZIP64 extra field. */
        zbuild y;
        size_t rec;
        uint8_t extra[12] = {0x01, 0x00, 8, 0, 1, 2, 3, 4, 5, 6, 7, 8};
        build_zip(&z, 0, 0, 0);
        memset(&y, 0, sizeof y);
        zb_put(&y, z.buf, z.cd_off);
        rec = 46 + strlen(z.e[0].name);
        zb_put(&y, z.buf + z.cd_off, rec);
        set16(y.buf + y.len - rec + 30, sizeof extra);
        zb_put(&y, extra, sizeof extra);
        zb_put(&y, z.buf + z.cd_off + rec, z.len - z.cd_off - rec);
        set32(y.buf + y.len - 22 + 12, (uint32_t)(z.end_off - z.cd_off + sizeof extra));
        zip_expect(&y, LEGO_ERR_UNSUPPORTED, "ZIP64");
        free(y.buf);
        /* A ZIP64 end locator before the end record. */
        memset(&y, 0, sizeof y);
        zb_put(&y, z.buf, z.end_off);
        zb_32(&y, 0x07064b50);
        zb_32(&y, 0);
        zb_32(&y, 0);
        zb_32(&y, 0);
        zb_32(&y, 1);
        zb_put(&y, z.buf + z.end_off, 22);
        zip_expect(&y, LEGO_ERR_UNSUPPORTED, "ZIP64");
        free(y.buf);
        free(z.buf);
    }

    /* Encryption; other methods; multi-disk. */
    build_zip(&z, 0, 0, 1);
    set16(z.buf + z.e[2].cd_pos + 8, 1);
    zip_expect(&z, LEGO_ERR_UNSUPPORTED, "encrypted");
    set16(z.buf + z.e[2].cd_pos + 8, 0);
    set16(z.buf + z.e[2].offset + 6, 1);
    zip_expect(&z, LEGO_ERR_UNSUPPORTED, "encrypted");
    set16(z.buf + z.e[2].offset + 6, 0);
    set16(z.buf + z.e[2].cd_pos + 10, 12); /* bzip2 */
    set16(z.buf + z.e[2].offset + 8, 12);
    zip_expect(&z, LEGO_ERR_UNSUPPORTED, "method");
    set16(z.buf + z.e[2].cd_pos + 10, 0);
    set16(z.buf + z.e[2].offset + 8, 8);
    zip_expect(&z, LEGO_ERR_FORMAT, "method");
    set16(z.buf + z.e[2].offset + 8, 0);
    set16(z.buf + z.end_off + 4, 1);
    zip_expect(&z, LEGO_ERR_UNSUPPORTED, "multi-disk");
    set16(z.buf + z.end_off + 4, 0);
    /* A local header naming another file. */
    z.buf[z.e[2].offset + 30] = 'X';
    zip_expect(&z, LEGO_ERR_FORMAT, "different name");
    free(z.buf);

    /* Overlapping entries: a second central record pointing into the data
     * of the first (a zip-bomb trick).  The first entry's data holds a
     * complete local entry for the second. */
    {
        zbuild inner, y;
        size_t len;
        uint8_t *p = png_bytes(0, 5, 6, 3, &len);
        memset(&inner, 0, sizeof inner);
        zb_add(&inner, "b.png", p, len, 0, 0);
        memset(&y, 0, sizeof y);
        zb_add(&y, "a.png", inner.buf, inner.len, 0, 0);
        y.e[y.n] = inner.e[0];
        y.e[y.n].offset += 30 + 5; /* inside a.png's data */
        y.n++;
        zb_finish(&y);
        zip_expect(&y, LEGO_ERR_FORMAT, "overlap");
        free(y.buf);
        free(inner.buf);
        free(p);
    }

    /* Duplicate names; dataset.json twice; a JPEG. */
    build_zip(&z, 0, 0, 1);
    memcpy(z.buf + z.e[3].cd_pos + 46, z.e[2].name, strlen(z.e[2].name));
    zip_expect(&z, LEGO_ERR_FORMAT, "twice");
    free(z.buf);
    {
        size_t len;
        uint8_t *p = png_bytes(0, 5, 6, 3, &len);
        memset(&z, 0, sizeof z);
        zb_add(&z, "a.png", p, len, 0, 0);
        zb_add(&z, "b.jpg", p, len, 0, 0);
        zb_finish(&z);
        zip_expect(&z, LEGO_ERR_UNSUPPORTED, "b.jpg");
        free(z.buf);
        memset(&z, 0, sizeof z);
        zb_add(&z, "a.png", p, len, 0, 0);
        zb_add(&z, "dataset.json", "{}", 2, 0, 0);
        zb_add(&z, "dataset.json", "{}", 2, 0, 0);
        zb_finish(&z);
        zip_expect(&z, LEGO_ERR_FORMAT, "dataset.json twice");
        free(z.buf);
        /* No images at all. */
        memset(&z, 0, sizeof z);
        zb_add(&z, "readme.txt", "hi", 2, 0, 0);
        zb_finish(&z);
        zip_expect(&z, LEGO_ERR_FORMAT, "no PNG");
        free(z.buf);
        /* An empty archive. */
        memset(&z, 0, sizeof z);
        zb_finish(&z);
        zip_expect(&z, LEGO_ERR_FORMAT, "no PNG");
        free(z.buf);
        /* Images of different sizes. */
        {
            size_t len2;
            uint8_t *q = png_bytes(1, 6, 6, 3, &len2);
            memset(&z, 0, sizeof z);
            zb_add(&z, "a.png", p, len, 8, 0);
            zb_add(&z, "b.png", q, len2, 8, 0);
            zb_finish(&z);
            zip_expect(&z, LEGO_ERR_SHAPE, "'b.png' is 6 x 6");
            free(z.buf);
            free(q);
        }
        free(p);
    }

    /* dataset.json naming a file the archive lacks, and with bad labels. */
    {
        static const char *bad_json[] = {
            "{\"labels\": [[\"00000/img00000000.png\", 6], [\"00000/img00000001.png\", 0], "
            "[\"00001/img00000002.png\", 9], [\"00002/img00000003.png\", 1]]}",
            "{\"labels\": [[\"00000/img00000000.png\", 6], [\"00000/img00000001.png\", "
            "true], [\"00001/img00000002.png\", 9]]}",
        };
        static const char *needles[] = {"00002/img00000003.png", "class index"};
        for (int i = 0; i < 2; i++) {
            size_t len;
            uint8_t *p = png_bytes(0, 5, 6, 3, &len);
            memset(&z, 0, sizeof z);
            zb_add(&z, "dataset.json", bad_json[i], strlen(bad_json[i]), 8, 0);
            zb_add(&z, "00000/img00000000.png", p, len, 0, 0);
            zb_add(&z, "00000/img00000001.png", p, len, 0, 0);
            zb_add(&z, "00001/img00000002.png", p, len, 0, 0);
            zb_finish(&z);
            zip_expect(&z, LEGO_ERR_FORMAT, needles[i]);
            free(z.buf);
            free(p);
        }
    }

    /* Every prefix of a valid archive fails cleanly (a sweep over the
     * truncation points), and so does every single-byte corruption of the
     * central directory and end record. */
    build_zip(&z, 8, 1, 1);
    for (size_t cut = 0; cut < z.len; cut += (cut < 64 || cut > z.cd_off - 8) ? 1 : 97) {
        lego_dataset *ds = NULL;
        write_file(in_dir("bad.zip"), z.buf, cut);
        ck_assert_int_ne(lego_dataset_open(in_dir("bad.zip"), NULL, &ds), LEGO_OK);
        ck_assert(lego_dataset_error(ds)[0] != '\0');
        lego_dataset_free(ds);
    }
    for (size_t pos = z.cd_off; pos < z.len; pos++) {
        lego_dataset *ds = NULL;
        lego_status st;
        z.buf[pos] ^= 0xA5;
        write_file(in_dir("bad.zip"), z.buf, z.len);
        st = lego_dataset_open(in_dir("bad.zip"), NULL, &ds);
        ck_assert_ptr_nonnull(ds);
        if (st != LEGO_OK) ck_assert(lego_dataset_error(ds)[0] != '\0');
        lego_dataset_free(ds);
        z.buf[pos] ^= 0xA5;
    }
    free(z.buf);
}
END_TEST

static Suite *dataset_suite(void) {
    Suite *s = suite_create("dataset");
    TCase *tc = tcase_create("dataset");
    tcase_add_checked_fixture(tc, make_dir, remove_dir);
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_api_basics);
    tcase_add_test(tc, test_idx_roundtrip);
    tcase_add_test(tc, test_idx_28_to_32);
    tcase_add_test(tc, test_idx_plain_and_labels_path);
    tcase_add_test(tc, test_fashion_mnist);
    tcase_add_test(tc, test_idx_hostile);
    tcase_add_test(tc, test_folder);
    tcase_add_test(tc, test_folder_hostile);
    tcase_add_test(tc, test_png_variants);
    tcase_add_test(tc, test_zip);
    tcase_add_test(tc, test_zip_hostile);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return run_suite(dataset_suite()); }
