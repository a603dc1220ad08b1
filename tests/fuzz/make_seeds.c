/*
 * make_seeds.c -- writes the fuzzers' seed corpus, tests/fuzz/corpus/<harness>/
 * (make fuzz-seeds).  Every seed is a small valid input of its harness, built
 * with the library itself (checkpoints, PNGs) or by hand from the format
 * (idx, zip), so the corpus can be rebuilt byte for byte.
 *
 * Usage: make_seeds OUTDIR
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "lego.h"

#define SPLIT "\n--next--\n"

static const char *outdir;

static void die(const char *what) {
    fprintf(stderr, "make_seeds: %s\n", what);
    exit(1);
}

/* A growable byte string. */
typedef struct bytes {
    uint8_t *p;
    size_t n, cap;
} bytes;

static void put(bytes *b, const void *data, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        if (!b->p) die("out of memory");
    }
    if (n) memcpy(b->p + b->n, data, n);
    b->n += n;
}

static void put_str(bytes *b, const char *s) { put(b, s, strlen(s)); }

static void put_u8(bytes *b, unsigned v) {
    uint8_t c = (uint8_t)v;
    put(b, &c, 1);
}

static void put_le(bytes *b, uint32_t v, int n) {
    for (int i = 0; i < n; i++) put_u8(b, (v >> (8 * i)) & 0xff);
}

static void put_be32(bytes *b, uint32_t v) {
    for (int i = 3; i >= 0; i--) put_u8(b, (v >> (8 * i)) & 0xff);
}

static bytes read_all(const char *path) {
    bytes b = {0};
    FILE *f = fopen(path, "rb");
    if (!f) die(path);
    uint8_t chunk[4096];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) put(&b, chunk, n);
    fclose(f);
    return b;
}

static void save(const char *harness, const char *name, const bytes *b) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", outdir, harness);
    if (mkdir(path, 0755) != 0 && errno != EEXIST) die(path);
    snprintf(path, sizeof path, "%s/%s/%s", outdir, harness, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(b->p, 1, b->n, f) != b->n || fclose(f) != 0) die(path);
}

/* ---- checkpoints ---- */

/* bricks: pairs (brick_size, patch_size). */
static lego_model *seed_model(int channels, int label_dim, int hidden, const int *bricks, int nb) {
    lego_model_config c;
    lego_model_config_init(&c);
    c.img_channels = channels;
    c.label_dim = label_dim;
    c.hidden_size = hidden;
    c.num_heads = 1;
    c.mlp_ratio = 1.0;
    c.frequency_embedding_size = 4;
    c.num_threads = 1;
    lego_model *m = NULL;
    if (lego_model_create(&c, &m) != LEGO_OK) die(lego_model_error(m));
    for (int k = 0; k < nb; k++) {
        lego_brick_config b;
        lego_brick_config_init(&b);
        b.brick_size = bricks[2 * k];
        b.patch_size = bricks[2 * k + 1];
        if (lego_brick_add(m, &b) != LEGO_OK) die(lego_model_error(m));
    }
    if (lego_model_init_weights(m, 1) != LEGO_OK) die(lego_model_error(m));
    return m;
}

static bytes checkpoint(int channels, int label_dim, int hidden, const int *bricks, int nb) {
    lego_model *m = seed_model(channels, label_dim, hidden, bricks, nb);
    char path[512];
    snprintf(path, sizeof path, "%s/.seed.safetensors", outdir);
    if (lego_model_save(m, path) != LEGO_OK) die(lego_model_error(m));
    lego_model_free(m);
    bytes b = read_all(path);
    remove(path);
    return b;
}

static void model_seeds(void) {
    /* The architecture fuzz_model_load's mode 2 loads into. */
    const int two[] = {2, 1, 4, 2}, one[] = {4, 4};
    bytes small = checkpoint(1, 2, 4, two, 2), plain = checkpoint(3, 0, 8, one, 1);
    for (int mode = 0; mode < 3; mode++) {
        bytes b = {0};
        char name[32];
        put_u8(&b, (unsigned)mode);
        if (mode == 1) { /* the architecture as config_json, a NUL, the file */
            put_str(&b, "{\"img_channels\": 1, \"label_dim\": 2, \"hidden_size\": 4, "
                        "\"num_heads\": 1, \"mlp_ratio\": 1.0, \"frequency_embedding_size\": 4, "
                        "\"bricks\": [{\"brick_size\": 2, \"patch_size\": 1, \"depth\": 1}, "
                        "{\"brick_size\": 4, \"patch_size\": 2, \"depth\": 1}]}");
            put_u8(&b, 0);
        }
        put(&b, small.p, small.n);
        snprintf(name, sizeof name, "small-mode%d", mode);
        save("model_load", name, &b);
        free(b.p);
    }
    bytes b = {0};
    put_u8(&b, 0);
    put(&b, plain.p, plain.n);
    save("model_load", "unconditional", &b);
    free(b.p);
    free(small.p);
    free(plain.p);
}

/* ---- trainer states ---- */

/* fuzz_trainer_state's trainer after 1 and 3 steps, and its EMA checkpoint
 * (a model file, which is not a trainer state). */
static void trainer_state_seeds(void) {
    const int two[] = {2, 1, 4, 2};
    lego_model *m = seed_model(1, 2, 4, two, 2);
    lego_train_options o;
    lego_train_options_init(&o);
    o.height = o.width = 4;
    o.seed = 7;
    lego_trainer *t = NULL;
    if (lego_trainer_create(m, &o, &t) != LEGO_OK) die(lego_trainer_error(t));
    float image[16];
    for (int i = 0; i < 16; i++) image[i] = (float)(i % 5) / 2.0f - 1.0f;
    char path[512];
    snprintf(path, sizeof path, "%s/.seed.safetensors", outdir);
    const char *names[3] = {"step1", "step3", "ema-checkpoint"};
    const int more_steps[3] = {1, 2, 0};
    for (int k = 0; k < 3; k++) {
        int32_t label = k == 0 ? 1 : -1;
        for (int step = 0; step < more_steps[k]; step++)
            if (lego_trainer_step(t, image, &label, 1, NULL) != LEGO_OK) die(lego_trainer_error(t));
        lego_status s = k < 2 ? lego_trainer_save_state(t, path) : lego_trainer_export_ema(t, path);
        if (s != LEGO_OK) die(lego_trainer_error(t));
        bytes b = read_all(path);
        save("trainer_state", names[k], &b);
        free(b.p);
    }
    remove(path);
    lego_trainer_free(t);
    lego_model_free(m);
}

/* ---- datasets ---- */

static bytes png_file(int h, int w, int c, int k) {
    uint8_t pix[8 * 8 * 3];
    for (int i = 0; i < h * w * c; i++) pix[i] = (uint8_t)(37 * (i + k) + 11 * k);
    char path[512];
    snprintf(path, sizeof path, "%s/.seed.png", outdir);
    if (lego_write_png(path, pix, h, w, c, NULL, 0) != LEGO_OK) die("write png");
    bytes b = read_all(path);
    remove(path);
    return b;
}

static bytes idx_images(int n, int h, int w) {
    bytes b = {0};
    put_u8(&b, 0);
    put_u8(&b, 0);
    put_u8(&b, 8);
    put_u8(&b, 3);
    put_be32(&b, (uint32_t)n);
    put_be32(&b, (uint32_t)h);
    put_be32(&b, (uint32_t)w);
    for (int i = 0; i < n * h * w; i++) put_u8(&b, (unsigned)(i * 29 % 256));
    return b;
}

static bytes idx_labels(int n) {
    bytes b = {0};
    put_u8(&b, 0);
    put_u8(&b, 0);
    put_u8(&b, 8);
    put_u8(&b, 1);
    put_be32(&b, (uint32_t)n);
    for (int i = 0; i < n; i++) put_u8(&b, (unsigned)(i * 3 % 10));
    return b;
}

/* gzip with a fixed header (no name, time 0), so the bytes never change. */
static bytes gzip(const bytes *in) {
    z_stream zs;
    memset(&zs, 0, sizeof zs);
    if (deflateInit2(&zs, 9, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY) != Z_OK)
        die("deflateInit2");
    bytes out = {0};
    out.cap = deflateBound(&zs, (uLong)in->n) + 64;
    out.p = malloc(out.cap);
    if (!out.p) die("out of memory");
    zs.next_in = in->p;
    zs.avail_in = (uInt)in->n;
    zs.next_out = out.p;
    zs.avail_out = (uInt)out.cap;
    if (deflate(&zs, Z_FINISH) != Z_STREAM_END) die("deflate");
    out.n = zs.total_out;
    deflateEnd(&zs);
    return out;
}

static bytes deflate_raw(const bytes *in) {
    z_stream zs;
    memset(&zs, 0, sizeof zs);
    if (deflateInit2(&zs, 9, Z_DEFLATED, -MAX_WBITS, 8, Z_DEFAULT_STRATEGY) != Z_OK)
        die("deflateInit2");
    bytes out = {0};
    out.cap = deflateBound(&zs, (uLong)in->n) + 64;
    out.p = malloc(out.cap);
    if (!out.p) die("out of memory");
    zs.next_in = in->p;
    zs.avail_in = (uInt)in->n;
    zs.next_out = out.p;
    zs.avail_out = (uInt)out.cap;
    if (deflate(&zs, Z_FINISH) != Z_STREAM_END) die("deflate");
    out.n = zs.total_out;
    deflateEnd(&zs);
    return out;
}

/* A zip of named members: local headers and data, the central directory,
 * the end record (PKWARE APPNOTE 4.3). */
typedef struct zip_member {
    const char *name;
    bytes data;
    int deflated;
} zip_member;

static bytes zip(const zip_member *m, int n) {
    bytes z = {0}, cd = {0};
    for (int i = 0; i < n; i++) {
        uint32_t crc = (uint32_t)crc32(0, m[i].data.p, (uInt)m[i].data.n);
        bytes packed = m[i].deflated ? deflate_raw(&m[i].data) : (bytes){0};
        const bytes *payload = m[i].deflated ? &packed : &m[i].data;
        uint32_t offset = (uint32_t)z.n, nlen = (uint32_t)strlen(m[i].name);
        unsigned method = m[i].deflated ? 8 : 0;
        put_le(&z, 0x04034b50, 4);
        put_le(&z, 20, 2);     /* version needed */
        put_le(&z, 0, 2);      /* flags */
        put_le(&z, method, 2);
        put_le(&z, 0, 2);      /* time */
        put_le(&z, 0x21, 2);   /* date: 1980-01-01 */
        put_le(&z, crc, 4);
        put_le(&z, (uint32_t)payload->n, 4);
        put_le(&z, (uint32_t)m[i].data.n, 4);
        put_le(&z, nlen, 2);
        put_le(&z, 0, 2);      /* extra */
        put(&z, m[i].name, nlen);
        put(&z, payload->p, payload->n);

        put_le(&cd, 0x02014b50, 4);
        put_le(&cd, 20, 2);    /* made by */
        put_le(&cd, 20, 2);    /* needed */
        put_le(&cd, 0, 2);
        put_le(&cd, method, 2);
        put_le(&cd, 0, 2);
        put_le(&cd, 0x21, 2);
        put_le(&cd, crc, 4);
        put_le(&cd, (uint32_t)payload->n, 4);
        put_le(&cd, (uint32_t)m[i].data.n, 4);
        put_le(&cd, nlen, 2);
        put_le(&cd, 0, 2);     /* extra */
        put_le(&cd, 0, 2);     /* comment */
        put_le(&cd, 0, 2);     /* disk */
        put_le(&cd, 0, 2);     /* internal attributes */
        put_le(&cd, 0, 4);     /* external attributes */
        put_le(&cd, offset, 4);
        put(&cd, m[i].name, nlen);
        free(packed.p);
    }
    uint32_t cd_offset = (uint32_t)z.n;
    put(&z, cd.p, cd.n);
    put_le(&z, 0x06054b50, 4);
    put_le(&z, 0, 2);
    put_le(&z, 0, 2);
    put_le(&z, (uint32_t)n, 2);
    put_le(&z, (uint32_t)n, 2);
    put_le(&z, (uint32_t)cd.n, 4);
    put_le(&z, cd_offset, 4);
    put_le(&z, 0, 2);
    free(cd.p);
    return z;
}

/* The four option bytes of fuzz_dataset: mode, resolution, max_images,
 * max_bytes exponent (2^(10 + 14) = 16 MiB). */
static bytes dataset_head(int mode, int resolution) {
    bytes b = {0};
    put_u8(&b, (unsigned)mode);
    put_u8(&b, (unsigned)resolution);
    put_u8(&b, 0);
    put_u8(&b, 14);
    return b;
}

static void dataset_seeds(void) {
    bytes images = idx_images(3, 4, 5), labels = idx_labels(3);
    bytes images_gz = gzip(&images), labels_gz = gzip(&labels);

    bytes b = dataset_head(0, 0);
    put(&b, images.p, images.n);
    save("dataset", "idx", &b);
    free(b.p);

    b = dataset_head(0, 8);
    put(&b, images_gz.p, images_gz.n);
    save("dataset", "idx-gz-padded", &b);
    free(b.p);

    b = dataset_head(1, 0);
    put(&b, images_gz.p, images_gz.n);
    put_str(&b, SPLIT);
    put(&b, labels_gz.p, labels_gz.n);
    save("dataset", "idx-gz-labels", &b);
    free(b.p);

    b = dataset_head(1, 0);
    put(&b, images.p, images.n);
    put_str(&b, SPLIT);
    put(&b, labels.p, labels.n);
    save("dataset", "idx-labels", &b);
    free(b.p);

    const char *json = "{\"labels\": [[\"a.png\", 3], [\"b/c.png\", 0]]}";
    bytes json_b = {0};
    put_str(&json_b, json);
    bytes grey0 = png_file(4, 3, 1, 0), grey1 = png_file(4, 3, 1, 1);
    bytes rgb0 = png_file(2, 2, 3, 2), rgb1 = png_file(2, 2, 3, 3);

    zip_member members[3] = {{"dataset.json", json_b, 1}, {"a.png", grey0, 0},
                             {"b/c.png", grey1, 1}};
    bytes z = zip(members, 3);
    b = dataset_head(0, 0);
    put(&b, z.p, z.n);
    save("dataset", "zip-labels", &b);
    free(b.p);
    free(z.p);

    zip_member plain[2] = {{"x/0.png", rgb0, 0}, {"x/1.png", rgb1, 0}};
    z = zip(plain, 2);
    b = dataset_head(0, 4);
    put(&b, z.p, z.n);
    save("dataset", "zip-rgb", &b);
    free(b.p);
    free(z.p);

    b = dataset_head(2, 0); /* dataset.json, a.png, b/c.png */
    put_str(&b, json);
    put_str(&b, SPLIT);
    put(&b, grey0.p, grey0.n);
    put_str(&b, SPLIT);
    put(&b, grey1.p, grey1.n);
    save("dataset", "folder-labels", &b);
    free(b.p);

    b = dataset_head(2, 0); /* no dataset.json: a.png, b/c.png */
    put_str(&b, SPLIT);
    put(&b, rgb0.p, rgb0.n);
    put_str(&b, SPLIT);
    put(&b, rgb1.p, rgb1.n);
    save("dataset", "folder-rgb", &b);
    free(b.p);

    bytes *all[] = {&images, &labels, &images_gz, &labels_gz, &json_b,
                    &grey0, &grey1, &rgb0, &rgb1};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) free(all[i]->p);
}

/* ---- requests ---- */

/* fuzz_request decodes zeros as a valid small request of each kind; a few
 * patterns make the other fields take their special values. */
static void request_seeds(void) {
    for (int op = 0; op < 3; op++)
        for (int variant = 0; variant < 3; variant++) {
            bytes b = {0};
            char name[32];
            put_u8(&b, (unsigned)op);
            for (int i = 0; i < 160; i++)
                put_u8(&b, variant == 0 ? 0 : variant == 1 ? (unsigned)(i * 7 % 13)
                                                           : (unsigned)(i * 131 % 251));
            snprintf(name, sizeof name, "op%d-%d", op, variant);
            save("request", name, &b);
            free(b.p);
        }
}

int main(int argc, char **argv) {
    if (argc != 2) die("usage: make_seeds OUTDIR");
    outdir = argv[1];
    if (mkdir(outdir, 0755) != 0 && errno != EEXIST) die(outdir);
    model_seeds();
    trainer_state_seeds();
    dataset_seeds();
    request_seeds();
    return 0;
}
