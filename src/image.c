/*
 * image.c -- image output: float to uint8 conversion, PNG files (one image
 * or a grid) through libpng, and .npz archives for numpy.
 *
 * Files are written under a temporary name next to the target and renamed
 * into place only when complete, so a failure never leaves a truncated file
 * where the caller asked for one.  The .npz writer is a small ZIP writer on
 * top of zlib's raw deflate; it refuses anything that would need ZIP64.
 */
#include "common.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ZLIB_CONST
#include <zlib.h>

#include "png_msgs.h"

/* ------------------------------------------------------------------------ */
/* Argument checks and error reporting                                      */
/* ------------------------------------------------------------------------ */

/* Copy the recorded message out to the caller's buffer, if there is one. */
static lego_status report(const lego_err *err, lego_status st, char *errmsg,
                          size_t errmsg_size) {
    if (st != LEGO_OK && errmsg && errmsg_size > 0)
        snprintf(errmsg, errmsg_size, "%s", err->msg);
    return st;
}

static lego_status check_path(const char *path, lego_err *err) {
    if (!path) return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "path is NULL");
    if (!path[0]) return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "path is empty");
    return LEGO_OK;
}

/* Check an N x H x W x C batch and return its byte count in *bytes. */
static lego_status check_images(const void *images, int n, int height,
                                int width, int channels, size_t *bytes,
                                lego_err *err) {
    size_t dims[4];
    if (!images) return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "images is NULL");
    if (n <= 0)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                         "number of images must be positive (got %d)", n);
    if (height <= 0 || width <= 0)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                         "image size must be positive (got %d x %d)", height, width);
    if (channels != 1 && channels != 3 && channels != 4)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                         "channels must be 1, 3 or 4 (got %d)", channels);
    dims[0] = (size_t)n;
    dims[1] = (size_t)height;
    dims[2] = (size_t)width;
    dims[3] = (size_t)channels;
    *bytes = size_prod(dims, 4);
    /* 4 bytes per value covers the float input of lego_images_to_u8 too. */
    if (*bytes == 0 || *bytes > LEGO_MAX_ALLOC / sizeof(float))
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                         "%d images of %d x %d x %d are too large", n, height,
                         width, channels);
    return LEGO_OK;
}

/* ------------------------------------------------------------------------ */
/* Float to uint8                                                           */
/* ------------------------------------------------------------------------ */

/*
 * The reference computes (x * 127.5 + 128).clip(0, 255).to(uint8) in float32
 * with two separate kernels, so the product is rounded to float before the
 * sum.  The volatile stores force exactly those two roundings: a compiler
 * allowed to contract (gcc without -std=c11, most aarch64 builds) would fuse
 * them into one FMA, and values like -0x1.010102p-25 would then come out one
 * lower.  NaN fails both comparisons and becomes 0.
 */
static uint8_t float_to_u8(float x) {
    volatile float product = x * 127.5f;
    volatile float v = product + 128.0f;
    float y = v;
    if (!(y > 0.0f)) return 0;
    if (y >= 255.0f) return 255;
    return (uint8_t)y; /* truncates toward zero */
}

lego_status lego_images_to_u8(const float *images, int n, int channels,
                              int height, int width, uint8_t *out) {
    size_t bytes, plane, c, p;
    if (!out) return LEGO_ERR_INVALID_ARGUMENT;
    if (check_images(images, n, height, width, channels, &bytes, NULL) != LEGO_OK)
        return LEGO_ERR_INVALID_ARGUMENT;

    /* Read the NCHW input in order; scatter into NHWC. */
    plane = (size_t)height * (size_t)width;
    for (size_t i = 0; i < (size_t)n; i++) {
        const float *src = images + i * (size_t)channels * plane;
        uint8_t *dst = out + i * plane * (size_t)channels;
        for (c = 0; c < (size_t)channels; c++)
            for (p = 0; p < plane; p++)
                dst[p * (size_t)channels + c] = float_to_u8(src[c * plane + p]);
    }
    return LEGO_OK;
}

/* ------------------------------------------------------------------------ */
/* Output files: temporary name, then rename                                */
/* ------------------------------------------------------------------------ */

typedef struct out_file {
    const char *path;
    char *tmp;
    FILE *f;
} out_file;

/* Create "<path>.tmpK" exclusively, trying a few K so that a leftover or a
 * concurrent writer of the same path is never clobbered. */
static lego_status out_open(out_file *o, const char *path, lego_err *err) {
    size_t cap = strlen(path) + 16;
    int e = 0;
    o->path = path;
    o->f = NULL;
    o->tmp = malloc(cap);
    if (!o->tmp) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    for (int k = 0; k < 100; k++) {
        snprintf(o->tmp, cap, "%s.tmp%d", path, k);
        errno = 0;
        o->f = fopen(o->tmp, "wbx");
        if (o->f) return LEGO_OK;
        e = errno;
        if (e != EEXIST) break;
    }
    free(o->tmp);
    o->tmp = NULL;
    return lego_fail(err, LEGO_ERR_IO, "cannot create %s: %s", path,
                     e ? strerror(e) : "unknown error");
}

/* Give up: close and delete the temporary file. */
static void out_abort(out_file *o) {
    if (o->f) fclose(o->f);
    if (o->tmp) remove(o->tmp);
    free(o->tmp);
    o->f = NULL;
    o->tmp = NULL;
}

/* Close the temporary file, checking every write reached it, and move it
 * over the target. */
static lego_status out_commit(out_file *o, lego_err *err) {
    int bad = ferror(o->f) != 0;
    int e;
    if (fclose(o->f) != 0) bad = 1;
    o->f = NULL;
    if (bad) {
        e = errno;
        out_abort(o);
        return lego_fail(err, LEGO_ERR_IO, "error writing %s: %s", o->path,
                         e ? strerror(e) : "unknown error");
    }
    if (rename(o->tmp, o->path) != 0) {
        e = errno;
        out_abort(o);
        return lego_fail(err, LEGO_ERR_IO, "cannot rename temporary file to %s: %s",
                         o->path, e ? strerror(e) : "unknown error");
    }
    free(o->tmp);
    o->tmp = NULL;
    return LEGO_OK;
}

/* ------------------------------------------------------------------------ */
/* PNG                                                                      */
/* ------------------------------------------------------------------------ */

/* Rows are produced on demand so that a grid never needs a full canvas. */
typedef const uint8_t *(*row_fn)(void *ctx, uint32_t y);

void lego_png_on_error(png_structp png, png_const_charp msg) {
    png_msgs *m = png_get_error_ptr(png);
    snprintf(m->error, sizeof m->error, "%s", msg ? msg : "unknown error");
    png_longjmp(png, 1);
}

void lego_png_on_warning(png_structp png, png_const_charp msg) {
    png_msgs *m = png_get_error_ptr(png);
    snprintf(m->warning, sizeof m->warning, "%s", msg ? msg : "");
}

lego_status lego_png_fail(lego_err *err, lego_status status, const char *what,
                          const png_msgs *msgs) {
    if (msgs->warning[0])
        return lego_fail(err, status, "%s: %s (%s)", what, msgs->error, msgs->warning);
    return lego_fail(err, status, "%s: %s", what, msgs->error);
}

/*
 * Encode one 8-bit image to `f`.  Every libpng call sits inside this function
 * so that its longjmp never crosses other frames.  Nothing is allocated and
 * no local is assigned after setjmp except `y`, which the error path does not
 * read, so no local needs to be volatile; the messages the callbacks write
 * live in the caller's frame, which setjmp does not concern.
 */
static lego_status png_encode(FILE *f, uint32_t width, uint32_t height,
                              int channels, row_fn row, void *ctx,
                              png_msgs *msgs, lego_err *err) {
    static const int color_types[5] = {0, PNG_COLOR_TYPE_GRAY, 0,
                                       PNG_COLOR_TYPE_RGB, PNG_COLOR_TYPE_RGBA};
    png_structp png;
    png_infop info;

    png = png_create_write_struct(PNG_LIBPNG_VER_STRING, msgs, lego_png_on_error,
                                  lego_png_on_warning);
    if (!png) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory starting libpng");
    info = png_create_info_struct(png);
    if (!info) {
        png_destroy_write_struct(&png, NULL);
        return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory starting libpng");
    }
    if (setjmp(png_jmpbuf(png))) {
        png_destroy_write_struct(&png, &info);
        return lego_png_fail(err, LEGO_ERR_IO, "libpng", msgs);
    }
    png_init_io(png, f);
    png_set_IHDR(png, info, width, height, 8, color_types[channels],
                 PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
                 PNG_FILTER_TYPE_DEFAULT);
    png_write_info(png, info);
    for (uint32_t y = 0; y < height; y++)
        png_write_row(png, row(ctx, y));
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    return LEGO_OK;
}

static lego_status png_file(const char *path, uint32_t width, uint32_t height,
                            int channels, row_fn row, void *ctx, lego_err *err) {
    png_msgs msgs = {{0}, {0}};
    out_file o;
    lego_status st = out_open(&o, path, err);
    if (st != LEGO_OK) return st;
    st = png_encode(o.f, width, height, channels, row, ctx, &msgs, err);
    if (st != LEGO_OK) {
        out_abort(&o);
        lego_err_prefix(err, "writing %s", path);
        return st;
    }
    return out_commit(&o, err);
}

typedef struct plain_rows {
    const uint8_t *pixels;
    size_t stride;
} plain_rows;

static const uint8_t *plain_row(void *ctx, uint32_t y) {
    plain_rows *r = ctx;
    return r->pixels + (size_t)y * r->stride;
}

lego_status lego_write_png(const char *path, const uint8_t *pixels, int height,
                           int width, int channels, char *errmsg,
                           size_t errmsg_size) {
    lego_err err;
    plain_rows rows;
    size_t bytes = 0;
    lego_status st;

    lego_err_clear(&err);
    st = check_path(path, &err);
    if (st == LEGO_OK)
        st = check_images(pixels, 1, height, width, channels, &bytes, &err);
    if (st == LEGO_OK) {
        rows.pixels = pixels;
        rows.stride = (size_t)width * (size_t)channels;
        st = png_file(path, (uint32_t)width, (uint32_t)height, channels,
                      plain_row, &rows, &err);
    }
    return report(&err, st, errmsg, errmsg_size);
}

/* A grid is built one output row at a time in `row`. */
typedef struct grid_rows {
    const uint8_t *images;
    size_t n, height, width, channels, columns, padding;
    uint8_t *row; /* one output row, grid width x channels bytes */
    size_t row_bytes;
} grid_rows;

static const uint8_t *grid_row(void *ctx, uint32_t y) {
    grid_rows *g = ctx;
    size_t cell = g->height + g->padding; /* tile plus the gap below it */
    size_t tile_bytes = g->width * g->channels;
    size_t r, yy;

    memset(g->row, 0, g->row_bytes);
    if (y < g->padding) return g->row;
    r = (y - g->padding) / cell;
    yy = (y - g->padding) % cell;
    if (yy >= g->height) return g->row;
    for (size_t c = 0; c < g->columns; c++) {
        size_t i = r * g->columns + c;
        size_t x0 = g->padding + c * (g->width + g->padding);
        if (i >= g->n) break;
        memcpy(g->row + x0 * g->channels,
               g->images + (i * g->height + yy) * tile_bytes, tile_bytes);
    }
    return g->row;
}

lego_status lego_write_png_grid(const char *path, const uint8_t *images, int n,
                                int height, int width, int channels,
                                int columns, int padding, char *errmsg,
                                size_t errmsg_size) {
    lego_err err;
    grid_rows g;
    size_t bytes = 0, rows, gw, gh;
    lego_status st;

    lego_err_clear(&err);
    st = check_path(path, &err);
    if (st == LEGO_OK)
        st = check_images(images, n, height, width, channels, &bytes, &err);
    if (st == LEGO_OK && columns < 0)
        st = lego_fail(&err, LEGO_ERR_INVALID_ARGUMENT,
                       "columns must be 0 or positive (got %d)", columns);
    if (st == LEGO_OK && padding < 0)
        st = lego_fail(&err, LEGO_ERR_INVALID_ARGUMENT,
                       "padding must not be negative (got %d)", padding);
    if (st != LEGO_OK) return report(&err, st, errmsg, errmsg_size);

    g.images = images;
    g.n = (size_t)n;
    g.height = (size_t)height;
    g.width = (size_t)width;
    g.channels = (size_t)channels;
    g.padding = (size_t)padding;
    g.columns = (size_t)columns;
    if (columns == 0) /* smallest c with c * c >= n: ceil(sqrt(n)) exactly */
        for (g.columns = 1; g.columns * g.columns < g.n; g.columns++) {}
    if (g.columns > g.n) g.columns = g.n; /* no empty columns */
    rows = (g.n + g.columns - 1) / g.columns;

    /* grid side = count * (tile + padding) + padding, and it must fit the
     * 31 bits a PNG dimension may use. */
    if (!size_mul(g.columns, g.width + g.padding, &gw) || !size_add(gw, g.padding, &gw) ||
        !size_mul(rows, g.height + g.padding, &gh) || !size_add(gh, g.padding, &gh) ||
        gw > INT_MAX || gh > INT_MAX || !size_mul(gw, g.channels, &g.row_bytes))
        return report(&err,
                      lego_fail(&err, LEGO_ERR_INVALID_ARGUMENT,
                                "a grid of %d images of %d x %d with %zu columns "
                                "and padding %d is too large",
                                n, height, width, g.columns, padding),
                      errmsg, errmsg_size);

    g.row = malloc(g.row_bytes);
    if (!g.row)
        return report(&err, lego_fail(&err, LEGO_ERR_OUT_OF_MEMORY, "out of memory"),
                      errmsg, errmsg_size);
    st = png_file(path, (uint32_t)gw, (uint32_t)gh, channels, grid_row, &g, &err);
    free(g.row);
    return report(&err, st, errmsg, errmsg_size);
}

/* ------------------------------------------------------------------------ */
/* NPZ: a ZIP archive of .npy files                                         */
/* ------------------------------------------------------------------------ */

/* ZIP32 size and offset fields hold values below this; the value itself
 * tells readers to look for ZIP64 records, which this writer never makes. */
#define ZIP32_LIMIT 0xFFFFFFFFu
/* Entries carry a fixed timestamp (1980-01-01 00:00) so that the same
 * arrays always give the same bytes. */
#define ZIP_DOS_TIME 0
#define ZIP_DOS_DATE ((0 << 9) | (1 << 5) | 1)
#define ZIP_MAX_ENTRIES 2
/* General-purpose flag 3: CRC and sizes follow the data, so the archive is
 * written in one pass without seeking back. */
#define ZIP_FLAG_DESCRIPTOR 0x0008
#define ZIP_VERSION 20 /* 2.0: deflate */

typedef struct zip_entry {
    const char *name;
    uint32_t offset, crc, csize, usize;
} zip_entry;

typedef struct zip_writer {
    out_file out;
    uint64_t pos; /* bytes written so far */
    zip_entry entries[ZIP_MAX_ENTRIES];
    int count;
    z_stream zs;
    int deflating; /* zs is initialised and needs deflateEnd */
    uint32_t crc;
    uint64_t usize, csize;
    unsigned char buf[16384];
} zip_writer;

static void put16(unsigned char *p, unsigned v) {
    p[0] = (unsigned char)(v & 0xFF);
    p[1] = (unsigned char)((v >> 8) & 0xFF);
}

static void put32(unsigned char *p, uint32_t v) {
    put16(p, v & 0xFFFF);
    put16(p + 2, v >> 16);
}

static lego_status zip_put(zip_writer *z, const void *data, size_t len,
                           lego_err *err) {
    if (len && fwrite(data, 1, len, z->out.f) != len) {
        int e = errno;
        return lego_fail(err, LEGO_ERR_IO, "error writing %s: %s", z->out.path,
                         e ? strerror(e) : "unknown error");
    }
    z->pos += len;
    return LEGO_OK;
}

static lego_status zip_too_large(lego_err *err) {
    return lego_fail(err, LEGO_ERR_UNSUPPORTED,
                     "the archive would exceed 4 GiB, which needs ZIP64 "
                     "(not supported)");
}

static lego_status zip_begin(zip_writer *z, const char *name, lego_err *err) {
    unsigned char h[30];
    size_t len = strlen(name);
    zip_entry *e = &z->entries[z->count];
    lego_status st;

    if (z->pos >= ZIP32_LIMIT) return zip_too_large(err);
    e->name = name;
    e->offset = (uint32_t)z->pos;
    put32(h, 0x04034b50);
    put16(h + 4, ZIP_VERSION);
    put16(h + 6, ZIP_FLAG_DESCRIPTOR);
    put16(h + 8, Z_DEFLATED);
    put16(h + 10, ZIP_DOS_TIME);
    put16(h + 12, ZIP_DOS_DATE);
    put32(h + 14, 0); /* crc and sizes: in the data descriptor */
    put32(h + 18, 0);
    put32(h + 22, 0);
    put16(h + 26, (unsigned)len);
    put16(h + 28, 0);
    if ((st = zip_put(z, h, sizeof h, err)) != LEGO_OK) return st;
    if ((st = zip_put(z, name, len, err)) != LEGO_OK) return st;

    memset(&z->zs, 0, sizeof z->zs);
    /* Negative window bits: raw deflate, as ZIP wants (no zlib wrapper). */
    if (deflateInit2(&z->zs, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -MAX_WBITS, 8,
                     Z_DEFAULT_STRATEGY) != Z_OK)
        return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "cannot start zlib deflate");
    z->deflating = 1;
    z->crc = (uint32_t)crc32(0L, Z_NULL, 0);
    z->usize = 0;
    z->csize = 0;
    return LEGO_OK;
}

/* Run deflate on what is in zs.next_in, writing out every full buffer. */
static lego_status zip_deflate(zip_writer *z, int flush, lego_err *err) {
    int ret;
    lego_status st;
    do {
        size_t have;
        z->zs.next_out = z->buf;
        z->zs.avail_out = sizeof z->buf;
        ret = deflate(&z->zs, flush);
        have = sizeof z->buf - z->zs.avail_out;
        /* Z_BUF_ERROR only means "nothing to do" without Z_FINISH; with it
         * and fresh output space it would loop forever, so stop. */
        if (ret == Z_STREAM_ERROR ||
            (flush == Z_FINISH && ret == Z_BUF_ERROR && have == 0))
            return lego_fail(err, LEGO_ERR_IO, "zlib deflate failed");
        if ((st = zip_put(z, z->buf, have, err)) != LEGO_OK) return st;
        z->csize += have;
    } while (z->zs.avail_out == 0 || (flush == Z_FINISH && ret != Z_STREAM_END));
    return LEGO_OK;
}

static lego_status zip_data(zip_writer *z, const void *data, size_t len,
                            lego_err *err) {
    const unsigned char *p = data;
    while (len > 0) {
        /* zlib counts in uInt; 1 GiB pieces fit any uInt of 32 bits. */
        uInt piece = len > (1u << 30) ? (1u << 30) : (uInt)len;
        lego_status st;
        z->crc = (uint32_t)crc32(z->crc, p, piece);
        z->zs.next_in = p;
        z->zs.avail_in = piece;
        if ((st = zip_deflate(z, Z_NO_FLUSH, err)) != LEGO_OK) return st;
        z->usize += piece;
        p += piece;
        len -= piece;
    }
    return LEGO_OK;
}

static lego_status zip_end(zip_writer *z, lego_err *err) {
    unsigned char d[16];
    zip_entry *e = &z->entries[z->count];
    lego_status st = zip_deflate(z, Z_FINISH, err);
    deflateEnd(&z->zs);
    z->deflating = 0;
    if (st != LEGO_OK) return st;
    if (z->usize >= ZIP32_LIMIT || z->csize >= ZIP32_LIMIT) return zip_too_large(err);
    e->crc = z->crc;
    e->csize = (uint32_t)z->csize;
    e->usize = (uint32_t)z->usize;
    z->count++;
    put32(d, 0x08074b50);
    put32(d + 4, e->crc);
    put32(d + 8, e->csize);
    put32(d + 12, e->usize);
    return zip_put(z, d, sizeof d, err);
}

/* Central directory and end record. */
static lego_status zip_finish(zip_writer *z, lego_err *err) {
    uint64_t dir_start = z->pos, dir_size;
    unsigned char h[46];
    lego_status st;

    if (dir_start >= ZIP32_LIMIT) return zip_too_large(err);
    for (int i = 0; i < z->count; i++) {
        const zip_entry *e = &z->entries[i];
        size_t len = strlen(e->name);
        put32(h, 0x02014b50);
        put16(h + 4, ZIP_VERSION); /* made by: MS-DOS attributes, 2.0 */
        put16(h + 6, ZIP_VERSION);
        put16(h + 8, ZIP_FLAG_DESCRIPTOR);
        put16(h + 10, Z_DEFLATED);
        put16(h + 12, ZIP_DOS_TIME);
        put16(h + 14, ZIP_DOS_DATE);
        put32(h + 16, e->crc);
        put32(h + 20, e->csize);
        put32(h + 24, e->usize);
        put16(h + 28, (unsigned)len);
        put16(h + 30, 0); /* extra field */
        put16(h + 32, 0); /* comment */
        put16(h + 34, 0); /* disk */
        put16(h + 36, 0); /* internal attributes */
        put32(h + 38, 0); /* external attributes */
        put32(h + 42, e->offset);
        if ((st = zip_put(z, h, sizeof h, err)) != LEGO_OK) return st;
        if ((st = zip_put(z, e->name, len, err)) != LEGO_OK) return st;
    }
    dir_size = z->pos - dir_start;
    if (dir_size >= ZIP32_LIMIT) return zip_too_large(err);

    put32(h, 0x06054b50);
    put16(h + 4, 0); /* this disk */
    put16(h + 6, 0); /* disk with the directory */
    put16(h + 8, (unsigned)z->count);
    put16(h + 10, (unsigned)z->count);
    put32(h + 12, (uint32_t)dir_size);
    put32(h + 16, (uint32_t)dir_start);
    put16(h + 20, 0); /* comment */
    return zip_put(z, h, 22, err);
}

/*
 * NPY format 1.0 header for a C-order array: magic, version, little-endian
 * header length, then the dict padded with spaces and ended by a newline so
 * that the data starts at a multiple of 64 bytes, as numpy itself writes it.
 * Returns the header's length in `buf` (at most 256).
 */
#define NPY_ALIGN 64
#define NPY_HEADER_MAX 256

static size_t npy_header(unsigned char buf[NPY_HEADER_MAX], const char *descr,
                         const size_t *shape, int rank) {
    char dict[NPY_HEADER_MAX];
    size_t len, total;
    int k = snprintf(dict, sizeof dict,
                     "{'descr': '%s', 'fortran_order': False, 'shape': (", descr);
    for (int i = 0; i < rank; i++)
        k += snprintf(dict + k, sizeof dict - (size_t)k, "%s%zu", i ? ", " : "",
                      shape[i]);
    /* A one-element tuple needs its trailing comma. */
    k += snprintf(dict + k, sizeof dict - (size_t)k, "%s), }", rank == 1 ? "," : "");
    len = (size_t)k;
    total = (10 + len + 1 + NPY_ALIGN - 1) / NPY_ALIGN * NPY_ALIGN;

    memcpy(buf, "\x93NUMPY\x01\x00", 8);
    put16(buf + 8, (unsigned)(total - 10));
    memcpy(buf + 10, dict, len);
    memset(buf + 10 + len, ' ', total - 10 - len - 1);
    buf[total - 1] = '\n';
    return total;
}

static lego_status npz_write(zip_writer *z, const uint8_t *images,
                             const size_t shape[4], size_t image_bytes,
                             const int32_t *labels, lego_err *err) {
    unsigned char hdr[NPY_HEADER_MAX];
    size_t len;
    lego_status st;

    len = npy_header(hdr, "|u1", shape, 4);
    if ((st = zip_begin(z, "arr_0.npy", err)) != LEGO_OK) return st;
    if ((st = zip_data(z, hdr, len, err)) != LEGO_OK) return st;
    if ((st = zip_data(z, images, image_bytes, err)) != LEGO_OK) return st;
    if ((st = zip_end(z, err)) != LEGO_OK) return st;

    if (labels) {
        unsigned char chunk[512 * 8];
        size_t n = shape[0];
        len = npy_header(hdr, "<i8", shape, 1);
        if ((st = zip_begin(z, "labels.npy", err)) != LEGO_OK) return st;
        if ((st = zip_data(z, hdr, len, err)) != LEGO_OK) return st;
        /* Widen to little-endian int64 a chunk at a time. */
        for (size_t i = 0; i < n;) {
            size_t m = 0;
            for (; i < n && m < sizeof chunk; i++, m += 8) {
                uint64_t v = (uint64_t)(int64_t)labels[i];
                put32(chunk + m, (uint32_t)(v & 0xFFFFFFFFu));
                put32(chunk + m + 4, (uint32_t)(v >> 32));
            }
            if ((st = zip_data(z, chunk, m, err)) != LEGO_OK) return st;
        }
        if ((st = zip_end(z, err)) != LEGO_OK) return st;
    }
    return zip_finish(z, err);
}

lego_status lego_write_npz(const char *path, const uint8_t *images, int n,
                           int height, int width, int channels,
                           const int32_t *labels, char *errmsg,
                           size_t errmsg_size) {
    lego_err err;
    zip_writer *z;
    size_t bytes = 0;
    size_t shape[4];
    lego_status st;

    lego_err_clear(&err);
    st = check_path(path, &err);
    if (st == LEGO_OK)
        st = check_images(images, n, height, width, channels, &bytes, &err);
    /* Refuse before writing anything when the images alone (plus a header)
     * would already need ZIP64. */
    if (st == LEGO_OK && bytes >= ZIP32_LIMIT - NPY_HEADER_MAX)
        st = zip_too_large(&err);
    if (st != LEGO_OK) return report(&err, st, errmsg, errmsg_size);

    shape[0] = (size_t)n;
    shape[1] = (size_t)height;
    shape[2] = (size_t)width;
    shape[3] = (size_t)channels;

    z = calloc(1, sizeof *z);
    if (!z)
        return report(&err, lego_fail(&err, LEGO_ERR_OUT_OF_MEMORY, "out of memory"),
                      errmsg, errmsg_size);
    st = out_open(&z->out, path, &err);
    if (st == LEGO_OK) {
        st = npz_write(z, images, shape, bytes, labels, &err);
        if (z->deflating) deflateEnd(&z->zs);
        if (st == LEGO_OK)
            st = out_commit(&z->out, &err);
        else
            out_abort(&z->out);
    }
    free(z);
    return report(&err, st, errmsg, errmsg_size);
}
