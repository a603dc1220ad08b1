/*
 * test_image.c -- tests of image output: float to uint8 conversion, PNG
 * files read back with libpng, and .npz archives taken apart with zlib.
 */
#define _POSIX_C_SOURCE 200809L
#include "testutil.h"

#include <dirent.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "lego.h"

/* ------------------------------------------------------------------------ */
/* A scratch directory per test                                             */
/* ------------------------------------------------------------------------ */

static char g_dir[64];

static void make_dir(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/lego_test_image_XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(g_dir));
}

static void remove_dir(void) {
    DIR *d = opendir(g_dir);
    struct dirent *e;
    char p[512];
    if (!d) return;
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(p, sizeof p, "%s/%s", g_dir, e->d_name);
        remove(p);
    }
    closedir(d);
    rmdir(g_dir);
}

static const char *in_dir(const char *name) {
    static char p[512];
    snprintf(p, sizeof p, "%s/%s", g_dir, name);
    return p;
}

/* Files in the scratch directory: shows that no temporary file is left. */
static int count_files(void) {
    DIR *d = opendir(g_dir);
    struct dirent *e;
    int n = 0;
    ck_assert_ptr_nonnull(d);
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) n++;
    closedir(d);
    return n;
}

static void fill_random(uint8_t *p, size_t n, unsigned seed) {
    uint32_t s = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        s = s * 1664525u + 1013904223u;
        p[i] = (uint8_t)(s >> 24);
    }
}

/* ------------------------------------------------------------------------ */
/* lego_images_to_u8                                                        */
/* ------------------------------------------------------------------------ */

/* An independent reference: float32 (x * 127.5) then float32 (+ 128), each
 * rounded once (the double operations are exact for these operands), then
 * clip and truncate.  volatile keeps a contracting compiler (-std=gnu11,
 * -ffp-contract=fast) from fusing the two into one FMA even here. */
static uint8_t ref_u8(float x) {
    volatile float p = (float)((double)x * 127.5);
    volatile float s = (float)((double)p + 128.0);
    if (isnan(s) || s <= 0.0f) return 0;
    if (s >= 255.0f) return 255;
    return (uint8_t)s;
}

START_TEST(test_u8_edge_values) {
    static const struct { float x; uint8_t want; } cases[] = {
        {-1.0f, 0},   /* 0.5 truncates to 0 */
        {1.0f, 255},  /* 255.5 clips to 255 */
        {0.0f, 128},
        {-0.0f, 128},
        {0.5f, 191},  /* 191.75 */
        {-0.5f, 64},  /* 64.25 */
        {-1.00392163f, 0}, /* about -128/127.5: a sum near 0 */
        {2.0f, 255},
        {-2.0f, 0},
        {1e30f, 255},
        {-1e30f, 0},
        {FLT_MAX, 255},
        {-FLT_MAX, 0},
        {FLT_MIN, 128},
        {-FLT_TRUE_MIN, 128},
        /* Where one fused multiply-add would give one less: the product
         * must be rounded on its own, as in the reference. */
        {0x1.01008p-7f, 129},
        {-0x1.010102p-25f, 128},
        {-0x1.010142p-7f, 127},
        {-0x1.8181a2p-6f, 125},
    };
    enum { N = sizeof cases / sizeof cases[0] };
    float in[N + 3];
    uint8_t out[N + 3];
    for (int i = 0; i < N; i++) in[i] = cases[i].x;
    in[N] = NAN;
    in[N + 1] = INFINITY;
    in[N + 2] = -INFINITY;
    memset(out, 0xAB, sizeof out);
    ck_assert_int_eq(lego_images_to_u8(in, 1, 1, 1, N + 3, out), LEGO_OK);
    for (int i = 0; i < N; i++) {
        ck_assert_msg(out[i] == cases[i].want, "x = %a gave %d, want %d",
                      (double)cases[i].x, out[i], cases[i].want);
        ck_assert_int_eq(out[i], ref_u8(cases[i].x));
    }
    ck_assert_int_eq(out[N], 0);       /* NaN */
    ck_assert_int_eq(out[N + 1], 255); /* +inf */
    ck_assert_int_eq(out[N + 2], 0);   /* -inf */
}
END_TEST

START_TEST(test_u8_layout) {
    enum { n = 2, C = 3, H = 2, W = 3 };
    float in[n * C * H * W];
    uint8_t out[n * H * W * C];
    uint32_t s = 12345;

    /* Channel c constant over the image: -1, 0, 1 -> pixels (0, 128, 255). */
    for (int i = 0; i < n; i++)
        for (int c = 0; c < C; c++)
            for (int p = 0; p < H * W; p++)
                in[(i * C + c) * H * W + p] = (float)(c - 1);
    ck_assert_int_eq(lego_images_to_u8(in, n, C, H, W, out), LEGO_OK);
    for (int k = 0; k < n * H * W; k++) {
        ck_assert_int_eq(out[k * 3 + 0], 0);
        ck_assert_int_eq(out[k * 3 + 1], 128);
        ck_assert_int_eq(out[k * 3 + 2], 255);
    }

    /* Random values, every element against the reference, NCHW -> NHWC. */
    for (size_t k = 0; k < sizeof in / sizeof in[0]; k++) {
        s = s * 1664525u + 1013904223u;
        in[k] = ((float)(s >> 8) / 16777216.0f) * 2.4f - 1.2f;
    }
    ck_assert_int_eq(lego_images_to_u8(in, n, C, H, W, out), LEGO_OK);
    for (int i = 0; i < n; i++)
        for (int c = 0; c < C; c++)
            for (int y = 0; y < H; y++)
                for (int x = 0; x < W; x++)
                    ck_assert_int_eq(out[((i * H + y) * W + x) * C + c],
                                     ref_u8(in[((i * C + c) * H + y) * W + x]));
}
END_TEST

START_TEST(test_u8_many_values) {
    /* A sweep through [-1.1, 1.1] in small steps. */
    enum { K = 100000 };
    float *in = malloc(K * sizeof *in);
    uint8_t *out = malloc(K);
    ck_assert_ptr_nonnull(in);
    ck_assert_ptr_nonnull(out);
    for (int k = 0; k < K; k++) in[k] = -1.1f + 2.2f * (float)k / (float)(K - 1);
    ck_assert_int_eq(lego_images_to_u8(in, 1, 4, 250, 100, out), LEGO_OK);
    for (int k = 0; k < K; k++) {
        int c = k / 25000, p = k % 25000;
        ck_assert_int_eq(out[p * 4 + c], ref_u8(in[k]));
    }
    free(in);
    free(out);
}
END_TEST

START_TEST(test_u8_bad_args) {
    float in[12] = {0};
    uint8_t out[12];
    memset(out, 7, sizeof out);
    ck_assert_int_eq(lego_images_to_u8(NULL, 1, 3, 2, 2, out), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_images_to_u8(in, 1, 3, 2, 2, NULL), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_images_to_u8(in, 0, 3, 2, 2, out), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_images_to_u8(in, -1, 3, 2, 2, out), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_images_to_u8(in, 1, 2, 2, 3, out), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_images_to_u8(in, 1, 0, 2, 2, out), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_images_to_u8(in, 1, 3, 0, 2, out), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_images_to_u8(in, 1, 3, 2, -2, out), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_images_to_u8(in, INT_MAX, 4, INT_MAX, INT_MAX, out),
                     LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_images_to_u8(in, 65536, 4, 65536, 65536, out),
                     LEGO_ERR_INVALID_ARGUMENT);
    for (int i = 0; i < 12; i++) ck_assert_int_eq(out[i], 7); /* untouched */
}
END_TEST

/* ------------------------------------------------------------------------ */
/* PNG                                                                      */
/* ------------------------------------------------------------------------ */

/* Read a PNG with libpng; returns its pixels and, through the pointers, its
 * size and channels.  Fails the test unless it is 8-bit grey, RGB or RGBA. */
static uint8_t *read_png(const char *path, int *height, int *width, int *channels) {
    png_image img;
    uint8_t *buf;
    memset(&img, 0, sizeof img);
    img.version = PNG_IMAGE_VERSION;
    ck_assert_msg(png_image_begin_read_from_file(&img, path), "%s", img.message);
    ck_assert_msg(img.format == PNG_FORMAT_GRAY || img.format == PNG_FORMAT_RGB ||
                      img.format == PNG_FORMAT_RGBA,
                  "unexpected PNG format %u", img.format);
    *height = (int)img.height;
    *width = (int)img.width;
    *channels = (int)PNG_IMAGE_PIXEL_CHANNELS(img.format);
    buf = malloc(PNG_IMAGE_SIZE(img));
    ck_assert_ptr_nonnull(buf);
    ck_assert_msg(png_image_finish_read(&img, NULL, buf, 0, NULL), "%s", img.message);
    png_image_free(&img);
    return buf;
}

static void png_round_trip(int height, int width, int channels) {
    size_t size = (size_t)height * (size_t)width * (size_t)channels;
    uint8_t *pixels = malloc(size);
    uint8_t *back;
    char msg[256] = "";
    int h, w, c;
    const char *path = in_dir("img.png");

    ck_assert_ptr_nonnull(pixels);
    fill_random(pixels, size, (unsigned)channels);
    ck_assert_int_eq(lego_write_png(path, pixels, height, width, channels, msg,
                                    sizeof msg), LEGO_OK);
    back = read_png(path, &h, &w, &c);
    ck_assert_int_eq(h, height);
    ck_assert_int_eq(w, width);
    ck_assert_int_eq(c, channels);
    ck_assert_mem_eq(back, pixels, size);
    free(back);

    /* Writing again replaces the file, and no temporary file stays. */
    for (size_t i = 0; i < size; i++) pixels[i] = (uint8_t)(255 - pixels[i]);
    ck_assert_int_eq(lego_write_png(path, pixels, height, width, channels, NULL, 0),
                     LEGO_OK);
    back = read_png(path, &h, &w, &c);
    ck_assert_mem_eq(back, pixels, size);
    ck_assert_int_eq(count_files(), 1);
    free(back);
    free(pixels);
}

START_TEST(test_png_grey) { png_round_trip(17, 23, 1); }
END_TEST

START_TEST(test_png_rgb) { png_round_trip(32, 40, 3); }
END_TEST

START_TEST(test_png_rgba) { png_round_trip(5, 3, 4); }
END_TEST

START_TEST(test_png_one_pixel) { png_round_trip(1, 1, 3); }
END_TEST

START_TEST(test_png_bad_args) {
    uint8_t px[12] = {0};
    char msg[256];
    char small[8];
    const char *path = in_dir("bad.png");

    msg[0] = '\0';
    ck_assert_int_eq(lego_write_png(NULL, px, 2, 2, 3, msg, sizeof msg),
                     LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(msg, "path"));
    msg[0] = '\0';
    ck_assert_int_eq(lego_write_png("", px, 2, 2, 3, msg, sizeof msg),
                     LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(msg, "empty"));
    msg[0] = '\0';
    ck_assert_int_eq(lego_write_png(path, NULL, 2, 2, 3, msg, sizeof msg),
                     LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(msg, "NULL"));
    msg[0] = '\0';
    ck_assert_int_eq(lego_write_png(path, px, 2, 2, 2, msg, sizeof msg),
                     LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(msg, "channels"));
    msg[0] = '\0';
    ck_assert_int_eq(lego_write_png(path, px, 0, 2, 3, msg, sizeof msg),
                     LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(msg, "positive"));
    ck_assert_int_eq(lego_write_png(path, px, 2, -5, 3, NULL, 0),
                     LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_write_png(path, px, INT_MAX, INT_MAX, 4, NULL, 100),
                     LEGO_ERR_INVALID_ARGUMENT);

    /* A short buffer gets a truncated, terminated message. */
    memset(small, 'x', sizeof small);
    ck_assert_int_eq(lego_write_png(path, px, 2, 2, 5, small, sizeof small),
                     LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_uint_eq(strlen(small), sizeof small - 1);

    ck_assert_int_eq(count_files(), 0);
}
END_TEST

START_TEST(test_png_io_errors) {
    uint8_t *wide;
    char msg[256] = "";
    char missing[512];

    snprintf(missing, sizeof missing, "%s/no/such/dir/x.png", g_dir);
    ck_assert_int_eq(lego_write_png(missing, (const uint8_t *)"abc", 1, 1, 3, msg,
                                    sizeof msg), LEGO_ERR_IO);
    ck_assert_ptr_nonnull(strstr(msg, "x.png"));

    /* libpng refuses this width by default; its error travels back through
     * the longjmp path, and neither the file nor a temporary one remains. */
    wide = calloc(1000001, 1);
    ck_assert_ptr_nonnull(wide);
    msg[0] = '\0';
    ck_assert_int_eq(lego_write_png(in_dir("wide.png"), wide, 1, 1000001, 1, msg,
                                    sizeof msg), LEGO_ERR_IO);
    ck_assert_ptr_nonnull(strstr(msg, "libpng"));
    ck_assert_ptr_nonnull(strstr(msg, "wide.png"));
    free(wide);
    ck_assert_int_eq(count_files(), 0);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* PNG grids                                                                */
/* ------------------------------------------------------------------------ */

/* Write a grid, read it back and check every pixel against the layout. */
static void grid_check(int n, int height, int width, int channels, int columns,
                       int padding, int want_cols, int want_rows) {
    size_t tile = (size_t)height * (size_t)width * (size_t)channels;
    uint8_t *images = malloc(tile * (size_t)n);
    uint8_t *back;
    char msg[256] = "";
    int gh, gw, gc;
    const char *path = in_dir("grid.png");

    ck_assert_ptr_nonnull(images);
    /* Never 0, so that padding and tiles cannot be confused. */
    fill_random(images, tile * (size_t)n, 99);
    for (size_t i = 0; i < tile * (size_t)n; i++)
        if (images[i] == 0) images[i] = 1;
    ck_assert_msg(lego_write_png_grid(path, images, n, height, width, channels,
                                      columns, padding, msg, sizeof msg) == LEGO_OK,
                  "%s", msg);
    back = read_png(path, &gh, &gw, &gc);
    ck_assert_int_eq(gc, channels);
    ck_assert_int_eq(gw, want_cols * (width + padding) + padding);
    ck_assert_int_eq(gh, want_rows * (height + padding) + padding);

    for (int y = 0; y < gh; y++)
        for (int x = 0; x < gw; x++)
            for (int c = 0; c < channels; c++) {
                uint8_t want = 0;
                int ty = y - padding, tx = x - padding;
                int r = ty / (height + padding), q = tx / (width + padding);
                int yy = ty % (height + padding), xx = tx % (width + padding);
                int i = r * want_cols + q;
                if (ty >= 0 && tx >= 0 && yy < height && xx < width && i < n)
                    want = images[(size_t)i * tile +
                                  ((size_t)yy * (size_t)width + (size_t)xx) *
                                      (size_t)channels + (size_t)c];
                ck_assert_int_eq(back[((size_t)y * (size_t)gw + (size_t)x) *
                                      (size_t)channels + (size_t)c], want);
            }
    ck_assert_int_eq(count_files(), 1);
    free(back);
    free(images);
}

START_TEST(test_grid_square) {
    grid_check(5, 4, 3, 3, 0, 2, 3, 2);  /* ceil(sqrt(5)) = 3 columns */
    grid_check(9, 2, 2, 1, 0, 1, 3, 3);  /* a perfect square */
    grid_check(10, 2, 2, 4, 0, 1, 4, 3); /* just past one */
    grid_check(1, 6, 7, 3, 0, 3, 1, 1);  /* one image, framed */
}
END_TEST

START_TEST(test_grid_columns) {
    grid_check(3, 4, 5, 3, 10, 1, 3, 1); /* more columns than images */
    grid_check(4, 3, 2, 1, 1, 2, 1, 4);  /* one column */
    grid_check(7, 3, 3, 3, 2, 0, 2, 4);  /* no padding */
}
END_TEST

START_TEST(test_grid_bad_args) {
    uint8_t px[48] = {0};
    char msg[256];
    const char *path = in_dir("g.png");

    msg[0] = '\0';
    ck_assert_int_eq(lego_write_png_grid(path, px, 4, 2, 2, 3, -1, 0, msg, sizeof msg),
                     LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(msg, "columns"));
    msg[0] = '\0';
    ck_assert_int_eq(lego_write_png_grid(path, px, 4, 2, 2, 3, 0, -1, msg, sizeof msg),
                     LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(msg, "padding"));
    msg[0] = '\0';
    ck_assert_int_eq(lego_write_png_grid(path, px, 4, 2, 2, 3, 0, INT_MAX, msg,
                                         sizeof msg), LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(msg, "too large"));
    ck_assert_int_eq(lego_write_png_grid(path, px, 4, 2, INT_MAX / 2, 1, 4, 0, NULL, 0),
                     LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_write_png_grid(path, NULL, 4, 2, 2, 3, 0, 0, NULL, 0),
                     LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_write_png_grid(path, px, 0, 2, 2, 3, 0, 0, NULL, 0),
                     LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_write_png_grid(path, px, 4, 2, 2, 7, 0, 0, NULL, 0),
                     LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_write_png_grid(NULL, px, 4, 2, 2, 3, 0, 0, NULL, 0),
                     LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(count_files(), 0);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* NPZ                                                                      */
/* ------------------------------------------------------------------------ */

static unsigned get16(const unsigned char *p) { return p[0] | (unsigned)p[1] << 8; }
static uint32_t get32(const unsigned char *p) {
    return get16(p) | (uint32_t)get16(p + 2) << 16;
}

typedef struct member {
    char name[64];
    unsigned char *data;
    size_t size;
} member;

/* Take a ZIP archive apart by its central directory, inflating each member
 * and checking its CRC, sizes and data descriptor. */
static int unzip(const unsigned char *z, size_t size, member *out, int max) {
    const unsigned char *eocd, *cd;
    int count;
    ck_assert_uint_ge(size, 22);
    eocd = z + size - 22; /* no archive comment */
    ck_assert_uint_eq(get32(eocd), 0x06054b50);
    count = (int)get16(eocd + 10);
    ck_assert_int_eq(count, (int)get16(eocd + 8));
    ck_assert_int_le(count, max);
    ck_assert_uint_eq((size_t)get32(eocd + 16) + get32(eocd + 12), size - 22);
    cd = z + get32(eocd + 16);
    for (int i = 0; i < count; i++) {
        unsigned nlen = get16(cd + 28);
        uint32_t crc = get32(cd + 16), csize = get32(cd + 20), usize = get32(cd + 24);
        const unsigned char *lh = z + get32(cd + 42);
        const unsigned char *data;
        z_stream zs;

        ck_assert_uint_eq(get32(cd), 0x02014b50);
        ck_assert_uint_eq(get16(cd + 10), 8); /* deflate */
        ck_assert_uint_lt(nlen, sizeof out[i].name);
        memcpy(out[i].name, cd + 46, nlen);
        out[i].name[nlen] = '\0';

        ck_assert_uint_eq(get32(lh), 0x04034b50);
        ck_assert_uint_eq(get16(lh + 26), nlen);
        ck_assert_int_eq(memcmp(lh + 30, out[i].name, nlen), 0);
        data = lh + 30 + nlen + get16(lh + 28);

        out[i].size = usize;
        out[i].data = malloc(usize ? usize : 1);
        ck_assert_ptr_nonnull(out[i].data);
        memset(&zs, 0, sizeof zs);
        ck_assert_int_eq(inflateInit2(&zs, -MAX_WBITS), Z_OK);
        zs.next_in = (Bytef *)data;
        zs.avail_in = csize;
        zs.next_out = out[i].data;
        zs.avail_out = usize;
        ck_assert_int_eq(inflate(&zs, Z_FINISH), Z_STREAM_END);
        ck_assert_uint_eq(zs.total_out, usize);
        ck_assert_uint_eq(zs.total_in, csize);
        inflateEnd(&zs);
        ck_assert_uint_eq(crc32(0, out[i].data, usize), crc);

        if (get16(lh + 6) & 8) { /* data descriptor after the data */
            const unsigned char *dd = data + csize;
            ck_assert_uint_eq(get32(dd), 0x08074b50);
            ck_assert_uint_eq(get32(dd + 4), crc);
            ck_assert_uint_eq(get32(dd + 8), csize);
            ck_assert_uint_eq(get32(dd + 12), usize);
        }
        cd += 46 + nlen + get16(cd + 30) + get16(cd + 32);
    }
    return count;
}

/* Check an NPY 1.0 header against the dict numpy would write; returns a
 * pointer to the data and its length. */
static const unsigned char *npy_data(const member *m, const char *dict, size_t *len) {
    size_t hlen, dlen = strlen(dict);
    ck_assert_uint_ge(m->size, 10);
    ck_assert_int_eq(memcmp(m->data, "\x93NUMPY\x01\x00", 8), 0);
    hlen = get16(m->data + 8);
    ck_assert_uint_eq((10 + hlen) % 64, 0);
    ck_assert_uint_le(10 + hlen, m->size);
    ck_assert_uint_ge(hlen, dlen + 1);
    ck_assert_int_eq(memcmp(m->data + 10, dict, dlen), 0);
    for (size_t i = 10 + dlen; i < 10 + hlen - 1; i++) ck_assert_int_eq(m->data[i], ' ');
    ck_assert_int_eq(m->data[10 + hlen - 1], '\n');
    *len = m->size - 10 - hlen;
    return m->data + 10 + hlen;
}

static void npz_check(int n, int height, int width, int channels, const int32_t *labels) {
    size_t bytes = (size_t)n * (size_t)height * (size_t)width * (size_t)channels;
    uint8_t *images = malloc(bytes);
    unsigned char *file;
    size_t fsize, dlen;
    const unsigned char *d;
    member m[4];
    char msg[256] = "", dict[200];
    int count;

    ck_assert_ptr_nonnull(images);
    fill_random(images, bytes, 7);
    /* Make part of it compressible, so deflate has something to do. */
    memset(images, 42, bytes / 2);
    ck_assert_msg(lego_write_npz(in_dir("x.npz"), images, n, height, width, channels,
                                 labels, msg, sizeof msg) == LEGO_OK, "%s", msg);
    ck_assert_int_eq(count_files(), 1);

    file = read_all(in_dir("x.npz"), &fsize);
    count = unzip(file, fsize, m, 4);
    ck_assert_int_eq(count, labels ? 2 : 1);

    ck_assert_str_eq(m[0].name, "arr_0.npy");
    snprintf(dict, sizeof dict,
             "{'descr': '|u1', 'fortran_order': False, 'shape': (%d, %d, %d, %d), }",
             n, height, width, channels);
    d = npy_data(&m[0], dict, &dlen);
    ck_assert_uint_eq(dlen, bytes);
    ck_assert_mem_eq(d, images, bytes);

    if (labels) {
        ck_assert_str_eq(m[1].name, "labels.npy");
        snprintf(dict, sizeof dict,
                 "{'descr': '<i8', 'fortran_order': False, 'shape': (%d,), }", n);
        d = npy_data(&m[1], dict, &dlen);
        ck_assert_uint_eq(dlen, (size_t)n * 8);
        for (int i = 0; i < n; i++) {
            uint64_t v = get32(d + 8 * i) | (uint64_t)get32(d + 8 * i + 4) << 32;
            ck_assert_int_eq((int64_t)v, labels[i]);
        }
    }
    for (int i = 0; i < count; i++) free(m[i].data);
    free(file);
    free(images);
}

START_TEST(test_npz_labels) {
    static const int32_t labels[3] = {0, -1, INT32_MAX};
    npz_check(3, 4, 5, 3, labels);
}
END_TEST

START_TEST(test_npz_no_labels) { npz_check(2, 3, 3, 1, NULL); }
END_TEST

START_TEST(test_npz_large) {
    /* Larger than the writer's buffers: many deflate rounds and a long
     * label array that is widened in several chunks. */
    int32_t *labels = malloc(1500 * sizeof *labels);
    ck_assert_ptr_nonnull(labels);
    for (int i = 0; i < 1500; i++) labels[i] = i % 10 - 1;
    npz_check(1500, 16, 16, 4, labels);
    free(labels);
}
END_TEST

START_TEST(test_npz_errors) {
    uint8_t px[16] = {0};
    char msg[256];
    char missing[512];

    msg[0] = '\0';
    ck_assert_int_eq(lego_write_npz(NULL, px, 1, 2, 2, 4, NULL, msg, sizeof msg),
                     LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(msg, "path"));
    ck_assert_int_eq(lego_write_npz(in_dir("a.npz"), NULL, 1, 2, 2, 4, NULL, NULL, 0),
                     LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_write_npz(in_dir("a.npz"), px, 1, 2, 2, 2, NULL, NULL, 0),
                     LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_write_npz(in_dir("a.npz"), px, -3, 2, 2, 4, NULL, NULL, 0),
                     LEGO_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(lego_write_npz(in_dir("a.npz"), px, 1, 2, 0, 4, NULL, NULL, 0),
                     LEGO_ERR_INVALID_ARGUMENT);

    /* 4 GiB of pixels would need ZIP64: refused before anything is read or
     * written, so the small buffer is safe here. */
    msg[0] = '\0';
    ck_assert_int_eq(lego_write_npz(in_dir("a.npz"), px, 1, 65536, 65536, 1, NULL,
                                    msg, sizeof msg), LEGO_ERR_UNSUPPORTED);
    ck_assert_ptr_nonnull(strstr(msg, "ZIP64"));

    snprintf(missing, sizeof missing, "%s/missing/a.npz", g_dir);
    msg[0] = '\0';
    ck_assert_int_eq(lego_write_npz(missing, px, 1, 2, 2, 4, NULL, msg, sizeof msg),
                     LEGO_ERR_IO);
    ck_assert_ptr_nonnull(strstr(msg, "a.npz"));
    ck_assert_int_eq(count_files(), 0);
}
END_TEST

/* ------------------------------------------------------------------------ */

static Suite *image_suite(void) {
    Suite *s = suite_create("image");
    TCase *tc = tcase_create("u8");
    tcase_add_test(tc, test_u8_edge_values);
    tcase_add_test(tc, test_u8_layout);
    tcase_add_test(tc, test_u8_many_values);
    tcase_add_test(tc, test_u8_bad_args);
    suite_add_tcase(s, tc);

    tc = tcase_create("png");
    tcase_add_checked_fixture(tc, make_dir, remove_dir);
    tcase_add_test(tc, test_png_grey);
    tcase_add_test(tc, test_png_rgb);
    tcase_add_test(tc, test_png_rgba);
    tcase_add_test(tc, test_png_one_pixel);
    tcase_add_test(tc, test_png_bad_args);
    tcase_add_test(tc, test_png_io_errors);
    tcase_add_test(tc, test_grid_square);
    tcase_add_test(tc, test_grid_columns);
    tcase_add_test(tc, test_grid_bad_args);
    suite_add_tcase(s, tc);

    tc = tcase_create("npz");
    tcase_add_checked_fixture(tc, make_dir, remove_dir);
    tcase_add_test(tc, test_npz_labels);
    tcase_add_test(tc, test_npz_no_labels);
    tcase_add_test(tc, test_npz_large);
    tcase_add_test(tc, test_npz_errors);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return run_suite(image_suite()); }
