/*
 * safetensors.c -- read and write the safetensors container.
 *
 * Layout: u64 little-endian header length N, N bytes of JSON, then the data
 * area.  The JSON maps tensor names to {dtype, shape, data_offsets:[b, e]}
 * with offsets relative to the data area, plus an optional "__metadata__"
 * object of string values.  Files come from anywhere, so nothing in the
 * header is trusted until checked.
 */
#define _POSIX_C_SOURCE 200809L
#include "safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* A header larger than this is not a checkpoint we could sensibly load. */
#define ST_MAX_HEADER ((uint64_t)100 << 20)

static const struct {
    const char *name;
    st_dtype dtype;
    size_t size;
} dtype_table[] = {
    {"F32", ST_F32, 4},  {"F16", ST_F16, 2}, {"BF16", ST_BF16, 2},
    {"F64", ST_F64, 8},  {"I64", ST_I64, 8}, {"I32", ST_I32, 4},
    {"U8", ST_U8, 1},    {"BOOL", ST_BOOL, 1},
};

size_t st_dtype_size(st_dtype dtype) {
    for (size_t i = 0; i < sizeof dtype_table / sizeof dtype_table[0]; i++)
        if (dtype_table[i].dtype == dtype) return dtype_table[i].size;
    return 0;
}

const char *st_dtype_name(st_dtype dtype) {
    for (size_t i = 0; i < sizeof dtype_table / sizeof dtype_table[0]; i++)
        if (dtype_table[i].dtype == dtype) return dtype_table[i].name;
    return "?";
}

static int dtype_from_name(const char *name, st_dtype *out) {
    for (size_t i = 0; i < sizeof dtype_table / sizeof dtype_table[0]; i++)
        if (strcmp(dtype_table[i].name, name) == 0) {
            *out = dtype_table[i].dtype;
            return 1;
        }
    return 0;
}

static uint64_t read_le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

/* JSON numbers are doubles: accept only exact non-negative integers below
 * 2^53, which covers every real offset and dimension. */
static int json_uint(const cJSON *item, uint64_t *out) {
    if (!cJSON_IsNumber(item)) return 0;
    double v = item->valuedouble;
    if (!(v >= 0 && v <= 9007199254740992.0) || v != floor(v)) return 0;
    *out = (uint64_t)v;
    return 1;
}

static int compare_by_offset(const void *a, const void *b) {
    const st_tensor *x = *(const st_tensor *const *)a;
    const st_tensor *y = *(const st_tensor *const *)b;
    const char *px = x->data, *py = y->data;
    return (px > py) - (px < py);
}

static lego_status parse_tensor(const cJSON *entry, const unsigned char *area,
                                size_t area_size, st_tensor *t, lego_err *err) {
    const char *name = t->name;
    if (!cJSON_IsObject(entry))
        return lego_fail(err, LEGO_ERR_FORMAT, "tensor '%s': entry is not an object", name);

    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(entry, "dtype");
    if (!cJSON_IsString(dt))
        return lego_fail(err, LEGO_ERR_FORMAT, "tensor '%s': missing dtype", name);
    if (!dtype_from_name(dt->valuestring, &t->dtype))
        return lego_fail(err, LEGO_ERR_UNSUPPORTED, "tensor '%s': unknown dtype '%.32s'",
                         name, dt->valuestring);

    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(entry, "shape");
    if (!cJSON_IsArray(shape))
        return lego_fail(err, LEGO_ERR_FORMAT, "tensor '%s': missing shape", name);
    int rank = cJSON_GetArraySize(shape);
    if (rank > ST_MAX_RANK)
        return lego_fail(err, LEGO_ERR_FORMAT, "tensor '%s': rank %d is too large", name, rank);
    t->rank = rank;
    size_t numel = 1;
    int d = 0;
    const cJSON *dim;
    cJSON_ArrayForEach(dim, shape) {
        uint64_t v;
        if (!json_uint(dim, &v) || v > (uint64_t)INT64_MAX)
            return lego_fail(err, LEGO_ERR_FORMAT, "tensor '%s': bad dimension %d", name, d);
        t->shape[d++] = (int64_t)v;
        if (v > SIZE_MAX || !size_mul(numel, (size_t)v, &numel))
            return lego_fail(err, LEGO_ERR_FORMAT, "tensor '%s': element count overflows", name);
    }
    t->numel = numel;

    const cJSON *offs = cJSON_GetObjectItemCaseSensitive(entry, "data_offsets");
    uint64_t begin, end;
    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2 ||
        !json_uint(cJSON_GetArrayItem(offs, 0), &begin) ||
        !json_uint(cJSON_GetArrayItem(offs, 1), &end))
        return lego_fail(err, LEGO_ERR_FORMAT, "tensor '%s': bad data_offsets", name);
    if (begin > end || end > area_size)
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "tensor '%s': data_offsets [%llu, %llu] outside the %zu-byte data area",
                         name, (unsigned long long)begin, (unsigned long long)end, area_size);
    size_t nbytes = 0;
    if (!size_mul(numel, st_dtype_size(t->dtype), &nbytes))
        return lego_fail(err, LEGO_ERR_FORMAT, "tensor '%s': byte count overflows", name);
    if (nbytes != end - begin)
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "tensor '%s': %llu bytes stored but shape and dtype need %zu",
                         name, (unsigned long long)(end - begin), nbytes);
    t->nbytes = nbytes;
    t->data = area + begin;
    return LEGO_OK;
}

static lego_status parse_metadata(const cJSON *meta, st_file *f, lego_err *err) {
    if (!cJSON_IsObject(meta))
        return lego_fail(err, LEGO_ERR_FORMAT, "__metadata__ is not an object");
    const cJSON *cfg = cJSON_GetObjectItemCaseSensitive(meta, "lego.config");
    if (!cfg) return LEGO_OK;
    if (!cJSON_IsString(cfg))
        return lego_fail(err, LEGO_ERR_FORMAT, "__metadata__[\"lego.config\"] is not a string");
    f->metadata_config = strdup(cfg->valuestring);
    if (!f->metadata_config) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    return LEGO_OK;
}

/* Tensors may not share bytes: a hostile file could otherwise alias two
 * parameters.  Sort by start and compare neighbours. */
static lego_status check_overlaps(st_file *f, lego_err *err) {
    if (f->num_tensors < 2) return LEGO_OK;
    st_tensor **order = malloc((size_t)f->num_tensors * sizeof *order);
    if (!order) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    for (int i = 0; i < f->num_tensors; i++) order[i] = &f->tensors[i];
    qsort(order, (size_t)f->num_tensors, sizeof *order, compare_by_offset);
    /* Empty tensors own no bytes and may sit at any offset. */
    lego_status s = LEGO_OK;
    const st_tensor *prev = NULL;
    for (int i = 0; i < f->num_tensors; i++) {
        if (order[i]->nbytes == 0) continue;
        if (prev && (const char *)order[i]->data < (const char *)prev->data + prev->nbytes) {
            s = lego_fail(err, LEGO_ERR_FORMAT, "tensors '%s' and '%s' overlap", prev->name,
                          order[i]->name);
            break;
        }
        prev = order[i];
    }
    free(order);
    return s;
}

lego_status st_parse(const void *data, size_t size, st_file **out, lego_err *err) {
    const unsigned char *bytes = data;
    if (size < 8)
        return lego_fail(err, LEGO_ERR_FORMAT, "file too short for a safetensors header (%zu bytes)", size);
    uint64_t header_len = read_le64(bytes);
    if (header_len < 2 || header_len > ST_MAX_HEADER || header_len > size - 8)
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "header length %llu does not fit the %zu-byte file",
                         (unsigned long long)header_len, size);

    /* cJSON stops at the end of the first value; anything but padding
     * after it means the header is not what it claims to be. */
    const char *json = (const char *)bytes + 8, *json_end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(json, (size_t)header_len, &json_end, 0);
    if (!root) return lego_fail(err, LEGO_ERR_FORMAT, "header is not valid JSON");
    for (const char *c = json_end; c < json + header_len; c++)
        if (*c != ' ' && *c != '\t' && *c != '\n' && *c != '\r') {
            cJSON_Delete(root);
            return lego_fail(err, LEGO_ERR_FORMAT,
                             "header is not valid JSON: stray byte 0x%02x at header offset %zu",
                             (unsigned char)*c, (size_t)(c - json));
        }
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return lego_fail(err, LEGO_ERR_FORMAT, "header is not a JSON object");
    }

    lego_status s = LEGO_OK;
    st_file *f = calloc(1, sizeof *f);
    int count = cJSON_GetArraySize(root);
    if (!f || (count > 0 && !(f->tensors = calloc((size_t)count, sizeof *f->tensors)))) {
        s = lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
        goto fail;
    }

    const unsigned char *area = bytes + 8 + header_len;
    size_t area_size = size - 8 - (size_t)header_len;
    const cJSON *entry;
    cJSON_ArrayForEach(entry, root) {
        if (!entry->string) continue;
        if (strcmp(entry->string, "__metadata__") == 0) {
            if ((s = parse_metadata(entry, f, err)) != LEGO_OK) goto fail;
            continue;
        }
        st_tensor *t = &f->tensors[f->num_tensors];
        if (!(t->name = strdup(entry->string))) {
            s = lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
            goto fail;
        }
        f->num_tensors++;
        if ((s = parse_tensor(entry, area, area_size, t, err)) != LEGO_OK) goto fail;
        for (int i = 0; i < f->num_tensors - 1; i++)
            if (strcmp(f->tensors[i].name, t->name) == 0) {
                s = lego_fail(err, LEGO_ERR_FORMAT, "tensor '%s' appears twice", t->name);
                goto fail;
            }
    }
    if ((s = check_overlaps(f, err)) != LEGO_OK) goto fail;
    cJSON_Delete(root);
    *out = f;
    return LEGO_OK;

fail:
    cJSON_Delete(root);
    st_close(f);
    return s;
}

lego_status st_open(const char *path, st_file **out, lego_err *err) {
    if (!path || !out) return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "path is NULL");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return lego_fail(err, LEGO_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return lego_fail(err, LEGO_ERR_IO, "'%s' is not a regular file", path);
    }
    size_t size = (size_t)sb.st_size;
    if (size < 8) {
        close(fd);
        return lego_fail(err, LEGO_ERR_FORMAT, "'%s' is too short (%zu bytes) to be safetensors",
                         path, size);
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED)
        return lego_fail(err, LEGO_ERR_IO, "cannot map '%s': %s", path, strerror(errno));

    st_file *f = NULL;
    lego_status s = st_parse(map, size, &f, err);
    if (s != LEGO_OK) {
        munmap(map, size);
        lego_err_prefix(err, "%s", path);
        return s;
    }
    f->map = map;
    f->map_size = size;
    *out = f;
    return LEGO_OK;
}

void st_close(st_file *f) {
    if (!f) return;
    for (int i = 0; i < f->num_tensors; i++) free(f->tensors[i].name);
    free(f->tensors);
    free(f->metadata_config);
    if (f->map) munmap(f->map, f->map_size);
    free(f);
}

const st_tensor *st_find(const st_file *f, const char *name) {
    for (int i = 0; i < f->num_tensors; i++)
        if (strcmp(f->tensors[i].name, name) == 0) return &f->tensors[i];
    return NULL;
}

/* Half-precision conversions, done bitwise so results do not depend on the
 * compiler's _Float16 support. */
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) {
                mant <<= 1;
                exp--;
            }
            bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Element i of a tensor as double; memcpy because mapped data may be
 * unaligned and stored little-endian (the only order we build for). */
static double element(const st_tensor *t, size_t i) {
    const unsigned char *p = (const unsigned char *)t->data + i * st_dtype_size(t->dtype);
    switch (t->dtype) {
    case ST_F32: { float v; memcpy(&v, p, 4); return v; }
    case ST_F64: { double v; memcpy(&v, p, 8); return v; }
    case ST_F16: { uint16_t v; memcpy(&v, p, 2); return half_to_float(v); }
    case ST_BF16: { uint16_t v; memcpy(&v, p, 2); return bf16_to_float(v); }
    case ST_I64: { int64_t v; memcpy(&v, p, 8); return (double)v; }
    case ST_I32: { int32_t v; memcpy(&v, p, 4); return v; }
    case ST_U8: case ST_BOOL: return *p;
    }
    return 0;
}

lego_status st_to_f32(const st_tensor *t, float *out, lego_err *err) {
    if (t->dtype != ST_F32 && t->dtype != ST_F16 && t->dtype != ST_BF16 && t->dtype != ST_F64)
        return lego_fail(err, LEGO_ERR_UNSUPPORTED, "tensor '%s': dtype %s is not a float type",
                         t->name, st_dtype_name(t->dtype));
    if (t->dtype == ST_F32) {
        memcpy(out, t->data, t->nbytes);
        return LEGO_OK;
    }
    for (size_t i = 0; i < t->numel; i++) out[i] = (float)element(t, i);
    return LEGO_OK;
}

lego_status st_to_f64(const st_tensor *t, double *out, lego_err *err) {
    (void)err;
    for (size_t i = 0; i < t->numel; i++) out[i] = element(t, i);
    return LEGO_OK;
}

/* ---- writer ---- */

static void write_le64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static lego_status build_header(const st_write_item *items, int n, const char *config_json,
                                char **out_json, lego_err *err) {
    cJSON *root = cJSON_CreateObject();
    if (!root) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    if (config_json) {
        cJSON *meta = cJSON_AddObjectToObject(root, "__metadata__");
        if (!meta || !cJSON_AddStringToObject(meta, "lego.config", config_json)) goto oom;
    }
    uint64_t offset = 0;
    for (int i = 0; i < n; i++) {
        cJSON *t = cJSON_AddObjectToObject(root, items[i].name);
        if (!t || !cJSON_AddStringToObject(t, "dtype", "F32")) goto oom;
        cJSON *shape = cJSON_AddArrayToObject(t, "shape");
        if (!shape) goto oom;
        uint64_t numel = 1;
        for (int d = 0; d < items[i].rank; d++) {
            cJSON *v = cJSON_CreateNumber((double)items[i].shape[d]);
            if (!v || !cJSON_AddItemToArray(shape, v)) {
                cJSON_Delete(v);
                goto oom;
            }
            numel *= (uint64_t)items[i].shape[d];
        }
        const double offs[2] = {(double)offset, (double)(offset + 4 * numel)};
        cJSON *arr = cJSON_CreateDoubleArray(offs, 2);
        if (!arr || !cJSON_AddItemToObject(t, "data_offsets", arr)) {
            cJSON_Delete(arr);
            goto oom;
        }
        offset += 4 * numel;
    }
    *out_json = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (!*out_json) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    return LEGO_OK;
oom:
    cJSON_Delete(root);
    return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
}

lego_status st_write_f32(const char *path, const st_write_item *items, int num_items,
                         const char *config_json, lego_err *err) {
    char *json = NULL;
    lego_status s = build_header(items, num_items, config_json, &json, err);
    if (s != LEGO_OK) return s;

    /* Pad the header with spaces so the data area starts 8-byte aligned, as
     * the reference writer does; readers may then use it in place. */
    size_t json_len = strlen(json), padded = (json_len + 7) & ~(size_t)7;
    size_t tmp_len = strlen(path) + 16;
    char *tmp = malloc(tmp_len);
    if (!tmp) {
        free(json);
        return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    }
    snprintf(tmp, tmp_len, "%s.tmp%ld", path, (long)getpid());
    FILE *fp = fopen(tmp, "wb");
    if (!fp) {
        s = lego_fail(err, LEGO_ERR_IO, "cannot create '%s': %s", tmp, strerror(errno));
        goto done;
    }
    unsigned char len_bytes[8];
    write_le64(len_bytes, padded);
    int ok = fwrite(len_bytes, 1, 8, fp) == 8 && fwrite(json, 1, json_len, fp) == json_len;
    for (size_t i = json_len; ok && i < padded; i++) ok = fputc(' ', fp) != EOF;
    for (int i = 0; ok && i < num_items; i++) {
        size_t numel = 1;
        for (int d = 0; d < items[i].rank; d++) numel *= (size_t)items[i].shape[d];
        ok = fwrite(items[i].data, sizeof(float), numel, fp) == numel;
    }
    if (fclose(fp) != 0) ok = 0;
    if (!ok || rename(tmp, path) != 0) {
        s = lego_fail(err, LEGO_ERR_IO, "cannot write '%s': %s", path, strerror(errno));
        remove(tmp);
    }
done:
    free(tmp);
    free(json);
    return s;
}
