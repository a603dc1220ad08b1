/*
 * test_safetensors.c -- the safetensors reader and writer (src/safetensors.h)
 * on files built in memory: values and dtype conversions of a valid file
 * (F32, F16 incl. subnormals/inf/NaN exhaustively, BF16, F64, I64, metadata),
 * every malformed or hostile header rejected with the right status and a
 * message naming the problem, truncations and byte flips of a valid file
 * never crashing, st_open on paths, and the F32 writer's round trip.
 *
 * Needs nothing from ../shared.
 */
#define _POSIX_C_SOURCE 200809L
#include "testutil.h"

#include <dirent.h>
#include <stdint.h>

/* ------------------------------------------------------------------------ */
/* helpers                                                                  */
/* ------------------------------------------------------------------------ */

typedef struct buf {
    unsigned char *p;
    size_t n;
} buf;

/* u64 LE header length, the header text, then `data_len` data bytes. */
static buf make_file(const char *header, const void *data, size_t data_len) {
    size_t hl = strlen(header);
    buf b;
    b.n = 8 + hl + data_len;
    b.p = malloc(b.n ? b.n : 1);
    ck_assert(b.p);
    for (int i = 0; i < 8; i++) b.p[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    memcpy(b.p + 8, header, hl);
    if (data_len) memcpy(b.p + 8 + hl, data, data_len);
    return b;
}

/* Parse b; expect `want` and, on failure, a message containing every
 * non-NULL needle. */
static void expect_parse(const buf *b, lego_status want, const char *needle1,
                         const char *needle2) {
    st_file *f = NULL;
    lego_err err;
    lego_err_clear(&err);
    lego_status s = st_parse(b->p, b->n, &f, &err);
    if (want == LEGO_OK) {
        ck_assert_msg(s == LEGO_OK, "expected success, got %d: %s", s, err.msg);
        ck_assert(f != NULL);
        st_close(f);
        return;
    }
    ck_assert_msg(s == want, "expected status %d (%s), got %d; message '%s'", want,
                  lego_status_string(want), s, err.msg);
    ck_assert_msg(f == NULL, "*out set on failure");
    ck_assert_msg(err.msg[0] != '\0', "empty message");
    if (needle1) ck_assert_msg(strstr(err.msg, needle1), "message '%s' lacks '%s'", err.msg, needle1);
    if (needle2) ck_assert_msg(strstr(err.msg, needle2), "message '%s' lacks '%s'", err.msg, needle2);
}

/* One header around one tensor entry, with a data area of data_len zeros. */
static void expect_header(const char *header, size_t data_len, lego_status want,
                          const char *needle1, const char *needle2) {
    unsigned char *zeros = calloc(data_len ? data_len : 1, 1);
    buf b = make_file(header, zeros, data_len);
    expect_parse(&b, want, needle1, needle2);
    free(b.p);
    free(zeros);
}

static char tmpdir[64];

static void make_tmpdir(void) {
    strcpy(tmpdir, "/tmp/lego_st_XXXXXX");
    ck_assert(mkdtemp(tmpdir) != NULL);
}

/* Remove the directory, asserting it holds nothing but `expected` files
 * (the writer must not leave temporaries behind). */
static void remove_tmpdir(int expected) {
    DIR *d = opendir(tmpdir);
    ck_assert(d);
    struct dirent *e;
    int count = 0;
    char path[sizeof tmpdir + 260];
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        count++;
        snprintf(path, sizeof path, "%s/%s", tmpdir, e->d_name);
        remove(path);
    }
    closedir(d);
    rmdir(tmpdir);
    ck_assert_msg(count == expected, "%d files left in the temp dir, expected %d", count, expected);
}

static void write_bytes(const char *path, const void *p, size_t n) {
    FILE *fp = fopen(path, "wb");
    ck_assert(fp);
    ck_assert(n == 0 || fwrite(p, 1, n, fp) == n);
    ck_assert(fclose(fp) == 0);
}

/* ---- an independent fp16 / bf16 decoder in double ---- */

static double decode_f16(uint16_t h) {
    int sign = h >> 15, e = (h >> 10) & 31, f = h & 1023;
    double v;
    if (e == 0) v = ldexp(f, -24);
    else if (e == 31) v = f ? NAN : INFINITY;
    else v = ldexp(1024 + f, e - 25);
    return sign ? -v : v;
}

static double decode_bf16(uint16_t h) {
    int sign = h >> 15, e = (h >> 7) & 255, f = h & 127;
    double v;
    if (e == 0) v = ldexp(f, -133);
    else if (e == 255) v = f ? NAN : INFINITY;
    else v = ldexp(128 + f, e - 134);
    return sign ? -v : v;
}

/* ------------------------------------------------------------------------ */
/* a valid file                                                             */
/* ------------------------------------------------------------------------ */

START_TEST(test_valid_file) {
    /* Data layout (unaligned on purpose: the header length is odd):
     *   a  F32  [2, 3]   bytes 0..24
     *   h  F16  [10]     24..44
     *   b  BF16 [2, 2]   44..52
     *   d  F64  [3]      52..76
     *   i  I64  [2]      76..92
     *   s  F32  []       92..96  (scalar)
     *   z  F32  [0, 4]   96..96  (empty) */
    unsigned char data[96];
    const float a[6] = {1.5f, -2.25f, 0.0f, 3e-38f, -1e30f, 7.0f};
    const uint16_t h[10] = {0x3c00, 0xc000, 0x0001, 0x03ff, 0x0400, 0x7bff,
                            0x7c00, 0xfc00, 0x8001, 0x3555};
    const double hw[10] = {1.0, -2.0, 5.9604644775390625e-08, 6.0975551605224609e-05,
                           6.103515625e-05, 65504.0, INFINITY, -INFINITY,
                           -5.9604644775390625e-08, 0.333251953125};
    const uint16_t bf[4] = {0x3f80, 0xc040, 0x7f80, 0x0001};
    const double bw[4] = {1.0, -3.0, INFINITY, 9.183549615799121e-41};
    const double d[3] = {3.141592653589793, -1e300, 1e-310};
    const int64_t iv[2] = {-5, (int64_t)1 << 40};
    const float sc = 42.0f;
    memcpy(data, a, 24);
    memcpy(data + 24, h, 20);
    memcpy(data + 44, bf, 8);
    memcpy(data + 52, d, 24);
    memcpy(data + 76, iv, 16);
    memcpy(data + 92, &sc, 4);
    const char *header =
        "{\"__metadata__\":{\"format\":\"pt\",\"lego.config\":\"{\\\"x\\\": 1}\"},"
        "\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
        "\"h\":{\"dtype\":\"F16\",\"shape\":[10],\"data_offsets\":[24,44]},"
        "\"b\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[44,52]},"
        "\"d\":{\"dtype\":\"F64\",\"shape\":[3],\"data_offsets\":[52,76]},"
        "\"i\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[76,92]},"
        "\"s\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[92,96]},"
        "\"z\":{\"dtype\":\"F32\",\"shape\":[0,4],\"data_offsets\":[96,96]}} ";
    ck_assert(strlen(header) % 4 != 0); /* the data area is unaligned */
    buf b = make_file(header, data, sizeof data);
    st_file *f = NULL;
    lego_err err;
    lego_err_clear(&err);
    ck_assert_msg(st_parse(b.p, b.n, &f, &err) == LEGO_OK, "%s", err.msg);
    ck_assert_int_eq(f->num_tensors, 7);
    ck_assert_str_eq(f->metadata_config, "{\"x\": 1}");
    ck_assert(st_find(f, "__metadata__") == NULL);
    ck_assert(st_find(f, "nope") == NULL);

    const st_tensor *t = st_find(f, "a");
    ck_assert(t && t->dtype == ST_F32 && t->rank == 2 && t->shape[0] == 2 && t->shape[1] == 3);
    ck_assert(t->numel == 6 && t->nbytes == 24);
    ck_assert(t->data == b.p + 8 + strlen(header)); /* read in place */
    float f32[10];
    double f64[10];
    ck_assert(st_to_f32(t, f32, &err) == LEGO_OK);
    ck_assert(memcmp(f32, a, sizeof a) == 0);

    t = st_find(f, "h");
    ck_assert(t && t->dtype == ST_F16 && t->numel == 10 && t->nbytes == 20);
    ck_assert(st_to_f32(t, f32, &err) == LEGO_OK);
    ck_assert(st_to_f64(t, f64, &err) == LEGO_OK);
    for (int i = 0; i < 10; i++) {
        ck_assert_msg(f32[i] == (float)hw[i], "F16 0x%04x -> %.9g, want %.9g", h[i],
                      (double)f32[i], hw[i]);
        ck_assert(f64[i] == hw[i]);
    }
    ck_assert(signbit(f32[8]));

    t = st_find(f, "b");
    ck_assert(t && t->dtype == ST_BF16 && t->rank == 2 && t->numel == 4);
    ck_assert(st_to_f32(t, f32, &err) == LEGO_OK);
    for (int i = 0; i < 4; i++)
        ck_assert_msg(f32[i] == (float)bw[i], "BF16 0x%04x -> %g", bf[i], (double)f32[i]);

    t = st_find(f, "d");
    ck_assert(t && t->dtype == ST_F64 && t->numel == 3 && t->nbytes == 24);
    ck_assert(st_to_f64(t, f64, &err) == LEGO_OK);
    ck_assert(f64[0] == d[0] && f64[1] == d[1] && f64[2] == d[2]);
    ck_assert(st_to_f32(t, f32, &err) == LEGO_OK);
    ck_assert(f32[0] == (float)d[0] && isinf(f32[1]) && f32[1] < 0 && f32[2] == 0.0f);

    t = st_find(f, "i");
    ck_assert(t && t->dtype == ST_I64 && t->numel == 2);
    ck_assert(st_to_f64(t, f64, &err) == LEGO_OK);
    ck_assert(f64[0] == -5.0 && f64[1] == 1099511627776.0);
    /* Integers are not float weights. */
    lego_err_clear(&err);
    ck_assert_int_eq(st_to_f32(t, f32, &err), LEGO_ERR_UNSUPPORTED);
    ck_assert_msg(strstr(err.msg, "'i'") && strstr(err.msg, "I64"), "%s", err.msg);

    t = st_find(f, "s");
    ck_assert(t && t->rank == 0 && t->numel == 1);
    ck_assert(st_to_f32(t, f32, &err) == LEGO_OK && f32[0] == 42.0f);

    t = st_find(f, "z");
    ck_assert(t && t->rank == 2 && t->numel == 0 && t->nbytes == 0);
    st_close(f);
    free(b.p);

    ck_assert_str_eq(st_dtype_name(ST_BF16), "BF16");
    ck_assert_int_eq((int)st_dtype_size(ST_F64), 8);
    ck_assert_int_eq((int)st_dtype_size(ST_F16), 2);
    ck_assert_int_eq((int)st_dtype_size(ST_BOOL), 1);
}
END_TEST

/* An empty header "{}" and a file of only metadata are valid. */
START_TEST(test_empty_files) {
    expect_header("{}", 0, LEGO_OK, NULL, NULL);
    expect_header("{\"__metadata__\":{\"k\":\"v\"}}", 0, LEGO_OK, NULL, NULL);
    buf b = make_file("{}  ", NULL, 0);
    st_file *f = NULL;
    lego_err err;
    ck_assert(st_parse(b.p, b.n, &f, &err) == LEGO_OK);
    ck_assert_int_eq(f->num_tensors, 0);
    ck_assert(f->metadata_config == NULL);
    st_close(f);
    free(b.p);
}
END_TEST

/* Every fp16 and bf16 bit pattern converts exactly (NaN to NaN). */
START_TEST(test_half_exhaustive) {
    uint16_t *bits = malloc(65536 * sizeof *bits);
    for (uint32_t i = 0; i < 65536; i++) bits[i] = (uint16_t)i;
    float *out = malloc(65536 * sizeof *out);
    for (int kind = 0; kind < 2; kind++) {
        char header[128];
        snprintf(header, sizeof header,
                 "{\"t\":{\"dtype\":\"%s\",\"shape\":[256,256],\"data_offsets\":[0,131072]}}",
                 kind ? "BF16" : "F16");
        buf b = make_file(header, bits, 131072);
        st_file *f = NULL;
        lego_err err;
        ck_assert(st_parse(b.p, b.n, &f, &err) == LEGO_OK);
        ck_assert(st_to_f32(st_find(f, "t"), out, &err) == LEGO_OK);
        for (uint32_t i = 0; i < 65536; i++) {
            double want = kind ? decode_bf16((uint16_t)i) : decode_f16((uint16_t)i);
            if (isnan(want))
                ck_assert_msg(isnan(out[i]), "%s 0x%04x -> %g, want NaN", kind ? "BF16" : "F16",
                              i, (double)out[i]);
            else
                ck_assert_msg((double)out[i] == want && !signbit(out[i]) == !signbit(want),
                              "%s 0x%04x -> %.9g, want %.9g", kind ? "BF16" : "F16", i,
                              (double)out[i], want);
        }
        st_close(f);
        free(b.p);
    }
    free(bits);
    free(out);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* hostile files                                                            */
/* ------------------------------------------------------------------------ */

START_TEST(test_too_short) {
    unsigned char b7[7] = {2, 0, 0, 0, 0, 0, 0};
    for (size_t n = 0; n < 8; n++) {
        buf b = {b7, n};
        expect_parse(&b, LEGO_ERR_FORMAT, "short", NULL);
    }
    /* Eight bytes: a header length with no header. */
    unsigned char b8[8] = {2, 0, 0, 0, 0, 0, 0, 0};
    buf b = {b8, 8};
    expect_parse(&b, LEGO_ERR_FORMAT, "header length", NULL);
}
END_TEST

START_TEST(test_header_length) {
    const char *hdr = "{}";
    /* Past the end of the file, far past, huge, and the largest u64. */
    const uint64_t lens[] = {3, 100, (uint64_t)1 << 32, (uint64_t)1 << 62, UINT64_MAX,
                             UINT64_MAX - 7, 0, 1};
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        buf b = make_file(hdr, NULL, 0);
        for (int j = 0; j < 8; j++) b.p[j] = (unsigned char)(lens[i] >> (8 * j));
        expect_parse(&b, LEGO_ERR_FORMAT, "header length", NULL);
        free(b.p);
    }
}
END_TEST

START_TEST(test_bad_json) {
    expect_header("{\"a\":", 0, LEGO_ERR_FORMAT, "JSON", NULL);
    expect_header("not json", 0, LEGO_ERR_FORMAT, "JSON", NULL);
    expect_header("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}", 4,
                  LEGO_ERR_FORMAT, "JSON", NULL);
    /* The declared header must be JSON and nothing else: a NUL, or text
     * after the object, is not whitespace padding. */
    unsigned char raw[8 + 5] = {5, 0, 0, 0, 0, 0, 0, 0, '{', '}', 0, '{', '}'};
    buf c = {raw, sizeof raw};
    expect_parse(&c, LEGO_ERR_FORMAT, "JSON", NULL);
    expect_header("{}xyz", 0, LEGO_ERR_FORMAT, "JSON", NULL);
    expect_header("{} {\"w\":1}", 0, LEGO_ERR_FORMAT, "JSON", NULL);
    /* Space padding (what writers add for alignment) is fine. */
    expect_header("{}      ", 0, LEGO_OK, NULL, NULL);
}
END_TEST

START_TEST(test_not_object) {
    expect_header("[1,2,3]", 0, LEGO_ERR_FORMAT, "not a JSON object", NULL);
    expect_header("\"str\"", 0, LEGO_ERR_FORMAT, "not a JSON object", NULL);
    expect_header("12", 0, LEGO_ERR_FORMAT, "not a JSON object", NULL);
    expect_header("{\"w\":[1,2]}", 0, LEGO_ERR_FORMAT, "'w'", "not an object");
    expect_header("{\"w\":null}", 0, LEGO_ERR_FORMAT, "'w'", NULL);
    expect_header("{\"__metadata__\":[1]}", 0, LEGO_ERR_FORMAT, "__metadata__", NULL);
    expect_header("{\"__metadata__\":{\"lego.config\":{\"a\":1}}}", 0, LEGO_ERR_FORMAT,
                  "lego.config", NULL);
}
END_TEST

START_TEST(test_missing_fields) {
    expect_header("{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, LEGO_ERR_FORMAT, "'w'",
                  "dtype");
    expect_header("{\"w\":{\"dtype\":7,\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
                  LEGO_ERR_FORMAT, "'w'", "dtype");
    expect_header("{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, LEGO_ERR_FORMAT, "'w'",
                  "shape");
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":4,\"data_offsets\":[0,4]}}", 4,
                  LEGO_ERR_FORMAT, "'w'", "shape");
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, LEGO_ERR_FORMAT, "'w'",
                  "data_offsets");
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4,
                  LEGO_ERR_FORMAT, "'w'", "data_offsets");
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 8,
                  LEGO_ERR_FORMAT, "'w'", "data_offsets");
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[\"0\",\"4\"]}}", 4,
                  LEGO_ERR_FORMAT, "'w'", "data_offsets");
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4,
                  LEGO_ERR_FORMAT, "'w'", "data_offsets");
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0.5,4.5]}}", 8,
                  LEGO_ERR_FORMAT, "'w'", "data_offsets");
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,1e300]}}", 4,
                  LEGO_ERR_FORMAT, "'w'", "data_offsets");
}
END_TEST

START_TEST(test_offsets_outside) {
    /* Ends past the data area; begins past it; one byte past. */
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 12,
                  LEGO_ERR_FORMAT, "'w'", "data_offsets");
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[100,104]}}", 8,
                  LEGO_ERR_FORMAT, "'w'", "outside");
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],"
                  "\"data_offsets\":[9007199254740988,9007199254740992]}}",
                  8, LEGO_ERR_FORMAT, "'w'", "outside");
    /* Exactly fitting is fine. */
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[4,16]}}", 16,
                  LEGO_OK, NULL, NULL);
}
END_TEST

START_TEST(test_begin_after_end) {
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", 16,
                  LEGO_ERR_FORMAT, "'w'", "data_offsets");
    /* begin > end with a shape claiming the wrapped-around size. */
    expect_header("{\"w\":{\"dtype\":\"U8\",\"shape\":[18446744073709551612],"
                  "\"data_offsets\":[8,4]}}",
                  16, LEGO_ERR_FORMAT, "'w'", NULL);
}
END_TEST

START_TEST(test_byte_count) {
    /* 16 bytes stored, [3] F32 needs 12. */
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,16]}}", 16,
                  LEGO_ERR_FORMAT, "'w'", "bytes");
    /* F16 needs 2 per element: 8 bytes hold [4], not [8]. */
    expect_header("{\"w\":{\"dtype\":\"F16\",\"shape\":[8],\"data_offsets\":[0,8]}}", 16,
                  LEGO_ERR_FORMAT, "'w'", "bytes");
    /* An empty tensor must span no bytes. */
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,4]}}", 4,
                  LEGO_ERR_FORMAT, "'w'", "bytes");
}
END_TEST

START_TEST(test_overlap) {
    expect_header("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                  "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}",
                  24, LEGO_ERR_FORMAT, "overlap", "'a'");
    /* Same region twice, listed in either order. */
    expect_header("{\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]},"
                  "\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}",
                  16, LEGO_ERR_FORMAT, "overlap", NULL);
    expect_header("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                  "\"b\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]}}",
                  8, LEGO_ERR_FORMAT, "overlap", NULL);
    /* Adjacent is fine. */
    expect_header("{\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]},"
                  "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
                  16, LEGO_OK, NULL, NULL);
}
END_TEST

/* A zero-byte tensor shares no bytes with anything, so it may sit at the
 * start of another tensor (PyTorch/safetensors writes an empty tensor at
 * the offset where the next one begins). */
START_TEST(test_empty_tensor_not_overlap) {
    expect_header("{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                  "\"y\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]},"
                  "\"e\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,8]}}",
                  16, LEGO_OK, NULL, NULL);
    expect_header("{\"e\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,8]},"
                  "\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                  "\"y\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
                  16, LEGO_OK, NULL, NULL);
}
END_TEST

START_TEST(test_duplicate_name) {
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                  "\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                  8, LEGO_ERR_FORMAT, "'w'", "twice");
}
END_TEST

START_TEST(test_unknown_dtype) {
    expect_header("{\"w\":{\"dtype\":\"F8_E4M3\",\"shape\":[4],\"data_offsets\":[0,4]}}", 4,
                  LEGO_ERR_UNSUPPORTED, "'w'", "F8_E4M3");
    expect_header("{\"w\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
                  LEGO_ERR_UNSUPPORTED, "'w'", "f32");
    expect_header("{\"w\":{\"dtype\":\"\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
                  LEGO_ERR_UNSUPPORTED, "'w'", "dtype");
    /* A very long dtype string is quoted, not overflowed. */
    char hdr[2048], name[1200];
    memset(name, 'Q', sizeof name - 1);
    name[sizeof name - 1] = '\0';
    snprintf(hdr, sizeof hdr, "{\"w\":{\"dtype\":\"%s\",\"shape\":[1],\"data_offsets\":[0,4]}}",
             name);
    expect_header(hdr, 4, LEGO_ERR_UNSUPPORTED, "'w'", "QQQQ");
}
END_TEST

START_TEST(test_bad_dims) {
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[-1,4],\"data_offsets\":[0,16]}}", 16,
                  LEGO_ERR_FORMAT, "'w'", "dimension");
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[2,-2],\"data_offsets\":[0,16]}}", 16,
                  LEGO_ERR_FORMAT, "'w'", "dimension");
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4,
                  LEGO_ERR_FORMAT, "'w'", "dimension");
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[\"4\"],\"data_offsets\":[0,16]}}", 16,
                  LEGO_ERR_FORMAT, "'w'", "dimension");
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1e300],\"data_offsets\":[0,16]}}", 16,
                  LEGO_ERR_FORMAT, "'w'", "dimension");
    /* Rank 9; rank 8 is the limit. */
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],"
                  "\"data_offsets\":[0,4]}}",
                  4, LEGO_ERR_FORMAT, "'w'", "rank");
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1],"
                  "\"data_offsets\":[0,4]}}",
                  4, LEGO_OK, NULL, NULL);
}
END_TEST

START_TEST(test_dims_overflow) {
    /* 2^32 * 2^32 overflows 64 bits... */
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],"
                  "\"data_offsets\":[0,4]}}",
                  4, LEGO_ERR_FORMAT, "'w'", "overflow");
    /* ...and so does a product that wraps to a small number: 2^52 * 2^12
     * elements would be 0 mod 2^64. */
    expect_header("{\"w\":{\"dtype\":\"U8\",\"shape\":[4503599627370496,4096],"
                  "\"data_offsets\":[0,0]}}",
                  0, LEGO_ERR_FORMAT, "'w'", "overflow");
    /* The element count fits but the byte count does not: 2^62 F32s. */
    expect_header("{\"w\":{\"dtype\":\"F32\",\"shape\":[4503599627370496,1024],"
                  "\"data_offsets\":[0,0]}}",
                  0, LEGO_ERR_FORMAT, "'w'", NULL);
}
END_TEST

/* Every prefix of a valid file fails cleanly, and random byte flips of the
 * header never crash (valgrind/ASan catch what a return code cannot). */
START_TEST(test_truncation_and_flips) {
    float vals[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    const char *header = "{\"__metadata__\":{\"lego.config\":\"{}\"},"
                         "\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
                         "\"b\":{\"dtype\":\"F16\",\"shape\":[8],\"data_offsets\":[16,32]}}";
    buf b = make_file(header, vals, sizeof vals);
    for (size_t n = 0; n < b.n; n++) {
        st_file *f = NULL;
        lego_err err;
        lego_err_clear(&err);
        /* A fresh copy of exactly n bytes, so reading past it is an error
         * valgrind sees. */
        unsigned char *cut = malloc(n ? n : 1);
        memcpy(cut, b.p, n);
        lego_status s = st_parse(cut, n, &f, &err);
        ck_assert_msg(s == LEGO_ERR_FORMAT, "prefix %zu: status %d", n, s);
        ck_assert(err.msg[0]);
        free(cut);
    }
    uint64_t r = 12345;
    size_t hl = strlen(header);
    for (int iter = 0; iter < 2000; iter++) {
        unsigned char *copy = malloc(b.n);
        memcpy(copy, b.p, b.n);
        for (int k = 0; k < 1 + iter % 3; k++) {
            r = r * 6364136223846793005ull + 1442695040888963407ull;
            size_t at = 8 + (size_t)(r >> 33) % hl;
            static const char pool[] = "{}[]\",:0123456789-.e \\aZ";
            copy[at] = (unsigned char)pool[(r >> 20) % (sizeof pool - 1)];
        }
        st_file *f = NULL;
        lego_err err;
        lego_err_clear(&err);
        lego_status s = st_parse(copy, b.n, &f, &err);
        if (s == LEGO_OK) {
            /* Whatever parsed must lie inside the buffer. */
            for (int i = 0; i < f->num_tensors; i++) {
                const st_tensor *t = &f->tensors[i];
                const unsigned char *p = t->data;
                ck_assert(p >= copy + 8 && p + t->nbytes <= copy + b.n);
                ck_assert(t->nbytes == t->numel * st_dtype_size(t->dtype));
            }
            st_close(f);
        } else {
            ck_assert(s == LEGO_ERR_FORMAT || s == LEGO_ERR_UNSUPPORTED);
            ck_assert(err.msg[0]);
        }
        free(copy);
    }
    free(b.p);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* files on disk                                                            */
/* ------------------------------------------------------------------------ */

START_TEST(test_open_paths) {
    make_tmpdir();
    char path[256];
    st_file *f = NULL;
    lego_err err;

    snprintf(path, sizeof path, "%s/missing.safetensors", tmpdir);
    lego_err_clear(&err);
    ck_assert_int_eq(st_open(path, &f, &err), LEGO_ERR_IO);
    ck_assert_msg(strstr(err.msg, "missing.safetensors"), "%s", err.msg);

    lego_err_clear(&err);
    ck_assert_int_eq(st_open(tmpdir, &f, &err), LEGO_ERR_IO); /* a directory */
    ck_assert(err.msg[0]);

    snprintf(path, sizeof path, "%s/short.safetensors", tmpdir);
    write_bytes(path, "\x02\0\0", 3);
    lego_err_clear(&err);
    ck_assert_int_eq(st_open(path, &f, &err), LEGO_ERR_FORMAT);
    ck_assert_msg(strstr(err.msg, "short.safetensors"), "%s", err.msg);

    snprintf(path, sizeof path, "%s/empty.safetensors", tmpdir);
    write_bytes(path, "", 0);
    lego_err_clear(&err);
    ck_assert_int_eq(st_open(path, &f, &err), LEGO_ERR_FORMAT);

    /* A hostile file's message is prefixed with its path. */
    snprintf(path, sizeof path, "%s/bad.safetensors", tmpdir);
    unsigned char zeros[16] = {0};
    buf b = make_file("{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,20]}}", zeros,
                      16);
    write_bytes(path, b.p, b.n);
    free(b.p);
    lego_err_clear(&err);
    ck_assert_int_eq(st_open(path, &f, &err), LEGO_ERR_FORMAT);
    ck_assert_msg(strstr(err.msg, "bad.safetensors") && strstr(err.msg, "'w'"), "%s", err.msg);

    /* A valid one opens and maps. */
    snprintf(path, sizeof path, "%s/good.safetensors", tmpdir);
    float v[2] = {0.25f, -8.0f};
    b = make_file("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", v, 8);
    write_bytes(path, b.p, b.n);
    free(b.p);
    ck_assert(st_open(path, &f, &err) == LEGO_OK);
    float got[2];
    ck_assert(st_to_f32(st_find(f, "w"), got, &err) == LEGO_OK);
    ck_assert(got[0] == 0.25f && got[1] == -8.0f);
    st_close(f);
    st_close(NULL);
    remove_tmpdir(4);
}
END_TEST

START_TEST(test_writer_round_trip) {
    make_tmpdir();
    char path[256];
    snprintf(path, sizeof path, "%s/w.safetensors", tmpdir);
    float a[6] = {1, -2, 3.5f, 1e-40f, -0.0f, 3.4e38f}, s = 7.0f, c[3] = {9, 8, 7};
    float nanv = NAN, infv = -INFINITY;
    float odd[2];
    odd[0] = nanv;
    odd[1] = infv;
    st_write_item items[4] = {
        {"model.a", 2, {2, 3}, a},
        {"scalar", 0, {0}, &s},
        {"c", 3, {1, 3, 1}, c},
        {"odd \"quoted\" name", 1, {2}, odd},
    };
    const char *config = "{\"format\": \"lego-diffusion\", \"q\": \"a\\\"b\"}";
    lego_err err;
    lego_err_clear(&err);
    ck_assert_msg(st_write_f32(path, items, 4, config, &err) == LEGO_OK, "%s", err.msg);

    st_file *f = NULL;
    ck_assert_msg(st_open(path, &f, &err) == LEGO_OK, "%s", err.msg);
    ck_assert_int_eq(f->num_tensors, 4);
    ck_assert_str_eq(f->metadata_config, config);
    /* The data area starts 8-byte aligned. */
    const unsigned char *base = f->map;
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = hl << 8 | base[i];
    ck_assert_int_eq((int)(hl % 8), 0);
    for (int i = 0; i < 4; i++) {
        const st_tensor *t = st_find(f, items[i].name);
        ck_assert_msg(t, "%s missing", items[i].name);
        ck_assert(t->dtype == ST_F32 && t->rank == items[i].rank);
        size_t numel = 1;
        for (int d = 0; d < t->rank; d++) {
            ck_assert(t->shape[d] == items[i].shape[d]);
            numel *= (size_t)t->shape[d];
        }
        ck_assert(t->numel == numel);
        float got[8];
        ck_assert(st_to_f32(t, got, &err) == LEGO_OK);
        ck_assert_msg(memcmp(got, items[i].data, numel * sizeof(float)) == 0, "%s differs",
                      items[i].name);
    }
    st_close(f);

    /* Without config: no metadata.  Overwrites the same path. */
    ck_assert(st_write_f32(path, items, 1, NULL, &err) == LEGO_OK);
    ck_assert(st_open(path, &f, &err) == LEGO_OK);
    ck_assert(f->metadata_config == NULL && f->num_tensors == 1);
    st_close(f);

    /* An unwritable place fails with IO and leaves nothing behind. */
    char bad[300];
    snprintf(bad, sizeof bad, "%s/no/such/dir/x.safetensors", tmpdir);
    lego_err_clear(&err);
    ck_assert_int_eq(st_write_f32(bad, items, 1, NULL, &err), LEGO_ERR_IO);
    ck_assert(err.msg[0]);
    remove_tmpdir(1);
}
END_TEST

int main(void) {
    Suite *s = suite_create("safetensors");
    TCase *v = tcase_create("valid");
    tcase_set_timeout(v, 60);
    tcase_add_test(v, test_valid_file);
    tcase_add_test(v, test_empty_files);
    tcase_add_test(v, test_half_exhaustive);
    suite_add_tcase(s, v);
    TCase *h = tcase_create("hostile");
    tcase_set_timeout(h, 120);
    tcase_add_test(h, test_too_short);
    tcase_add_test(h, test_header_length);
    tcase_add_test(h, test_bad_json);
    tcase_add_test(h, test_not_object);
    tcase_add_test(h, test_missing_fields);
    tcase_add_test(h, test_offsets_outside);
    tcase_add_test(h, test_begin_after_end);
    tcase_add_test(h, test_byte_count);
    tcase_add_test(h, test_overlap);
    tcase_add_test(h, test_empty_tensor_not_overlap);
    tcase_add_test(h, test_duplicate_name);
    tcase_add_test(h, test_unknown_dtype);
    tcase_add_test(h, test_bad_dims);
    tcase_add_test(h, test_dims_overflow);
    tcase_add_test(h, test_truncation_and_flips);
    suite_add_tcase(s, h);
    TCase *d = tcase_create("disk");
    tcase_add_test(d, test_open_paths);
    tcase_add_test(d, test_writer_round_trip);
    suite_add_tcase(s, d);
    return run_suite(s);
}
