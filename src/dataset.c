/*
 * dataset.c -- training data: Fashion-MNIST / MNIST idx files (gzip or
 * plain), folders of PNG images, and EDM/StyleGAN-style dataset zips, read
 * into a lego_dataset that hands out float32 CHW images in [-1, 1].
 *
 * Everything is decoded when the dataset is opened and kept as uint8
 * (native H x W x C per image); lego_dataset_get converts one image at a
 * time (x / 127.5 - 1, as the reference) and pads it, centred, to the
 * requested resolution.
 *
 * Hostile files: every header field is checked against the bytes that can
 * really be there before anything is allocated, buffers grow only as data
 * actually arrives, and everything decoded (pixels, one file or archive
 * member at a time) is capped by lego_dataset_options.max_bytes.
 */
#define _POSIX_C_SOURCE 200809L
#include "zip.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>

#include <cjson/cJSON.h>
#define ZLIB_CONST
#include <zlib.h>

#include "png_msgs.h"

#define DS_DEFAULT_MAX_BYTES ((uint64_t)1 << 31)
/* Largest image side accepted from any file, and largest resolution. */
#define DS_MAX_SIDE 65535
/* Labels are class indices below this. */
#define DS_MAX_LABEL_DIM (1 << 20)
/* Folder nesting accepted below the dataset folder. */
#define DS_MAX_DEPTH 16
/* libpng's cap on one ancillary chunk's memory. */
#define DS_PNG_CHUNK_MAX (8u << 20)

struct lego_dataset {
    lego_err err;
    int failed;
    int64_t count;
    int channels, height, width;    /* native size of every image           */
    int out_height, out_width;      /* after padding                        */
    int top, left;                  /* where the native image sits          */
    size_t image_bytes;             /* channels * height * width            */
    size_t out_floats;              /* channels * out_height * out_width    */
    uint8_t *pixels;                /* count images, H x W x C each         */
    int32_t *labels;                /* count labels, or NULL                */
    int label_dim;
    float pad_value;
    float lut[256];                 /* byte -> x / 127.5 - 1                */
};

/* ------------------------------------------------------------------------ */
/* Small helpers                                                            */
/* ------------------------------------------------------------------------ */

static uint32_t rd32be(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

lego_status ds_reserve(uint8_t **p, size_t *cap, size_t need, size_t limit, lego_err *err) {
    size_t n;
    uint8_t *q;
    if (need <= *cap) return LEGO_OK;
    if (need > limit)
        return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY,
                         "needs %zu bytes, more than the limit of %zu "
                         "(lego_dataset_options.max_bytes)",
                         need, limit);
    n = *cap < 65536 ? 65536 : *cap;
    while (n < need) n = n > limit / 2 ? limit : n * 2;
    q = realloc(*p, n);
    if (!q) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory for %zu bytes", n);
    *p = q;
    *cap = n;
    return LEGO_OK;
}

/* "a/b", or a copy of b when a is NULL or empty. */
static char *join(const char *a, const char *b) {
    size_t la = a ? strlen(a) : 0, lb = strlen(b), n;
    char *s;
    if (!size_add(la, lb, &n) || !size_add(n, 2, &n)) return NULL;
    s = malloc(n);
    if (!s) return NULL;
    if (la)
        snprintf(s, n, "%s/%s", a, b);
    else
        memcpy(s, b, lb + 1);
    return s;
}

static int ascii_lower(int c) { return c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c; }

/* Does `name` end in `ext` (lower case, with its dot), ignoring case? */
static int has_ext(const char *name, const char *ext) {
    size_t n = strlen(name), e = strlen(ext);
    if (n <= e) return 0;
    for (size_t i = 0; i < e; i++)
        if (ascii_lower((unsigned char)name[n - e + i]) != ext[i]) return 0;
    return 1;
}

/* Image formats this reader cannot decode: refused rather than skipped, so
 * that a folder of JPEGs does not silently become a tiny dataset. */
static int other_image_ext(const char *name) {
    static const char *const exts[] = {".jpg", ".jpeg", ".bmp", ".gif", ".webp",
                                       ".tif", ".tiff", ".ppm", ".pgm"};
    for (size_t i = 0; i < sizeof exts / sizeof exts[0]; i++)
        if (has_ext(name, exts[i])) return 1;
    return 0;
}

/* Hidden files and macOS resource forks ("__MACOSX/", "._x.png"). */
static int hidden_name(const char *name) {
    const char *base = strrchr(name, '/');
    base = base ? base + 1 : name;
    return base[0] == '.' || strncmp(name, "__MACOSX/", 9) == 0;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

typedef struct name_list {
    char **v;
    size_t n, cap;
} name_list;

static lego_status list_push(name_list *l, char *s, lego_err *err) {
    if (!s) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64, bytes;
        char **v;
        if (!size_mul(cap, sizeof *v, &bytes)) {
            free(s);
            return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "too many files");
        }
        v = realloc(l->v, bytes);
        if (!v) {
            free(s);
            return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
        }
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = s;
    return LEGO_OK;
}

static void list_free(name_list *l) {
    for (size_t i = 0; i < l->n; i++) free(l->v[i]);
    free(l->v);
    l->v = NULL;
    l->n = l->cap = 0;
}

/* Read a whole regular file of at most `limit` bytes into *buf. */
static lego_status read_file(const char *path, size_t limit, uint8_t **buf,
                             size_t *cap, size_t *size, lego_err *err) {
    struct stat sb;
    size_t n;
    lego_status st;
    FILE *f = fopen(path, "rb");
    if (!f) return lego_fail(err, LEGO_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    if (fstat(fileno(f), &sb) != 0 || !S_ISREG(sb.st_mode)) {
        fclose(f);
        return lego_fail(err, LEGO_ERR_IO, "%s is not a regular file", path);
    }
    if ((uint64_t)sb.st_size > (uint64_t)limit) {
        fclose(f);
        return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY,
                         "%s has %lld bytes, more than the limit of %zu "
                         "(lego_dataset_options.max_bytes)",
                         path, (long long)sb.st_size, limit);
    }
    n = (size_t)sb.st_size;
    st = ds_reserve(buf, cap, n + 1, limit + 1, err); /* limit <= LEGO_MAX_ALLOC */
    if (st != LEGO_OK) {
        fclose(f);
        return st;
    }
    if (fread(*buf, 1, n, f) != n) {
        int e = ferror(f) ? errno : 0;
        fclose(f);
        return lego_fail(err, LEGO_ERR_IO, "error reading %s: %s", path,
                         e ? strerror(e) : "file shrank while being read");
    }
    fclose(f);
    *size = n;
    return LEGO_OK;
}

/* ------------------------------------------------------------------------ */
/* PNG decoding from memory                                                 */
/* ------------------------------------------------------------------------ */

typedef struct png_mem {
    const uint8_t *data;
    size_t size, pos;
    png_msgs msgs;
} png_mem;

typedef struct png_shape {
    int c, h, w;
} png_shape;

static void png_mem_read(png_structp png, png_bytep out, size_t len) {
    png_mem *m = png_get_io_ptr(png);
    if (len > m->size - m->pos) png_error(png, "unexpected end of data (truncated file)");
    memcpy(out, m->data + m->pos, len);
    m->pos += len;
}

/*
 * Decode the PNG in m.  With dst NULL only the header is read and *got
 * filled in.  Otherwise the image must have the shape *want (else
 * LEGO_ERR_SHAPE, no message, *got filled in) and is decoded into dst,
 * H x W x C.  Grey of 1, 2, 4 bits and palettes are expanded to 8-bit grey
 * and RGB; 16-bit samples and alpha are refused.  Every libpng call sits in
 * this function so that its longjmp never crosses other frames; the error
 * path reads only `png`, `info` and *m, none of which change after setjmp.
 */
static lego_status png_decode(png_mem *m, const png_shape *want, png_shape *got,
                              uint8_t *dst, lego_err *err) {
    png_structp png;
    png_infop info;
    png_uint_32 w, h;
    int depth, ctype, interlace, passes, channels;
    size_t rowbytes;

    png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &m->msgs, lego_png_on_error,
                                 lego_png_on_warning);
    if (!png) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory starting libpng");
    info = png_create_info_struct(png);
    if (!info) {
        png_destroy_read_struct(&png, NULL, NULL);
        return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory starting libpng");
    }
    if (setjmp(png_jmpbuf(png))) {
        png_destroy_read_struct(&png, &info, NULL);
        return lego_png_fail(err, LEGO_ERR_FORMAT, "not a valid PNG", &m->msgs);
    }
    png_set_read_fn(png, m, png_mem_read);
    png_set_user_limits(png, DS_MAX_SIDE, DS_MAX_SIDE);
    png_set_chunk_malloc_max(png, DS_PNG_CHUNK_MAX);
    png_read_info(png, info);
    png_get_IHDR(png, info, &w, &h, &depth, &ctype, &interlace, NULL, NULL);
    if (depth > 8 || (ctype & PNG_COLOR_MASK_ALPHA) || png_get_valid(png, info, PNG_INFO_tRNS)) {
        png_destroy_read_struct(&png, &info, NULL);
        if (depth > 8)
            return lego_fail(err, LEGO_ERR_UNSUPPORTED,
                             "has %d bits per sample; only 8-bit images are supported",
                             depth);
        return lego_fail(err, LEGO_ERR_UNSUPPORTED,
                         "has transparency (alpha); only grey and RGB images are "
                         "supported");
    }
    if (ctype == PNG_COLOR_TYPE_PALETTE)
        png_set_palette_to_rgb(png);
    else if (ctype == PNG_COLOR_TYPE_GRAY && depth < 8)
        png_set_expand_gray_1_2_4_to_8(png);
    passes = png_set_interlace_handling(png);
    png_read_update_info(png, info);
    channels = png_get_channels(png, info);
    rowbytes = png_get_rowbytes(png, info);
    if ((channels != 1 && channels != 3) || png_get_bit_depth(png, info) != 8 ||
        rowbytes != (size_t)w * (size_t)channels) {
        png_destroy_read_struct(&png, &info, NULL);
        return lego_fail(err, LEGO_ERR_UNSUPPORTED,
                         "has an unsupported layout (colour type %d, %d bits)", ctype,
                         depth);
    }
    got->c = channels;
    got->h = (int)h;
    got->w = (int)w;
    if (!dst || got->c != want->c || got->h != want->h || got->w != want->w) {
        png_destroy_read_struct(&png, &info, NULL);
        return dst ? LEGO_ERR_SHAPE : LEGO_OK;
    }
    for (int p = 0; p < passes; p++)
        for (png_uint_32 y = 0; y < h; y++) png_read_row(png, dst + (size_t)y * rowbytes, NULL);
    png_read_end(png, NULL);
    png_destroy_read_struct(&png, &info, NULL);
    return LEGO_OK;
}

/* ------------------------------------------------------------------------ */
/* Image lists: a PNG folder or a zip                                       */
/* ------------------------------------------------------------------------ */

typedef struct img_source {
    const char *root;       /* folder                                     */
    ds_zip *zip;            /* zip                                        */
    ds_zip_entry **entries; /* zip: entries[i] holds names.v[i]           */
    ds_zip_entry *json;     /* zip: "dataset.json", or NULL               */
    int has_json;           /* folder: root/dataset.json exists           */
    name_list names;        /* sorted image names, '/'-separated          */
} img_source;

static void source_free(img_source *s) {
    list_free(&s->names);
    free(s->entries);
    ds_zip_close(s->zip);
}

/* The bytes of image i (or of dataset.json when i is SIZE_MAX). */
static lego_status source_read(img_source *s, size_t i, size_t limit, uint8_t **buf,
                               size_t *cap, size_t *size, lego_err *err) {
    if (s->zip) {
        const ds_zip_entry *e = i == SIZE_MAX ? s->json : s->entries[i];
        lego_status st = ds_zip_read(s->zip, e, limit, buf, cap, err);
        if (st == LEGO_OK) *size = e->usize;
        return st;
    } else {
        char *path = join(s->root, i == SIZE_MAX ? "dataset.json" : s->names.v[i]);
        lego_status st;
        if (!path) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
        st = read_file(path, limit, buf, cap, size, err);
        free(path);
        return st;
    }
}

/* What to do with a file or entry name. */
enum { NAME_IGNORE, NAME_PNG, NAME_JSON };

static lego_status classify(const char *name, int *what, lego_err *err) {
    *what = NAME_IGNORE;
    if (hidden_name(name)) return LEGO_OK;
    if (strcmp(name, "dataset.json") == 0) {
        *what = NAME_JSON;
    } else if (has_ext(name, ".png")) {
        *what = NAME_PNG;
    } else if (other_image_ext(name)) {
        return lego_fail(err, LEGO_ERR_UNSUPPORTED,
                         "'%s' is not a PNG; only PNG images are supported", name);
    }
    return LEGO_OK;
}

static lego_status scan_dir(img_source *s, const char *rel, int depth, lego_err *err) {
    char *dir_path = rel ? join(s->root, rel) : join(NULL, s->root);
    DIR *d;
    struct dirent *de;
    lego_status st = LEGO_OK;

    if (!dir_path) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    d = opendir(dir_path);
    if (!d) {
        st = lego_fail(err, LEGO_ERR_IO, "cannot open folder %s: %s", dir_path, strerror(errno));
        free(dir_path);
        return st;
    }
    for (;;) {
        struct stat sb;
        char *full, *name;
        int what;
        errno = 0;
        de = readdir(d);
        if (!de) {
            if (errno)
                st = lego_fail(err, LEGO_ERR_IO, "cannot read folder %s: %s", dir_path,
                               strerror(errno));
            break;
        }
        if (de->d_name[0] == '.') continue; /* ".", ".." and hidden files */
        name = join(rel, de->d_name);
        full = join(dir_path, de->d_name);
        if (!name || !full) {
            free(name);
            free(full);
            st = lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
            break;
        }
        /* Folders are entered only when they are real ones (no symbolic
         * links, so no cycles); links to files are followed. */
        if (lstat(full, &sb) == 0 && S_ISDIR(sb.st_mode)) {
            free(full);
            if (depth >= DS_MAX_DEPTH) {
                st = lego_fail(err, LEGO_ERR_UNSUPPORTED,
                               "folder '%s' is nested more than %d levels deep", name,
                               DS_MAX_DEPTH);
                free(name);
                break;
            }
            st = scan_dir(s, name, depth + 1, err);
            free(name);
            if (st != LEGO_OK) break;
            continue;
        }
        if (stat(full, &sb) != 0 || !S_ISREG(sb.st_mode)) {
            free(full);
            free(name);
            continue;
        }
        free(full);
        if ((st = classify(name, &what, err)) != LEGO_OK) {
            free(name);
            break;
        }
        if (what == NAME_JSON && depth == 0) {
            s->has_json = 1;
            free(name);
        } else if (what == NAME_PNG) {
            if ((st = list_push(&s->names, name, err)) != LEGO_OK) break;
        } else {
            free(name);
        }
    }
    closedir(d);
    free(dir_path);
    return st;
}

static lego_status folder_list(const char *path, img_source *s, lego_err *err) {
    lego_status st;
    s->root = path;
    if ((st = scan_dir(s, NULL, 0, err)) != LEGO_OK) return st;
    if (s->names.n == 0)
        return lego_fail(err, LEGO_ERR_FORMAT, "the folder holds no PNG images");
    qsort(s->names.v, s->names.n, sizeof *s->names.v, cmp_str);
    return LEGO_OK;
}

static int cmp_entry_name(const void *a, const void *b) {
    return strcmp((*(ds_zip_entry *const *)a)->name, (*(ds_zip_entry *const *)b)->name);
}

static lego_status zip_list(const char *path, uint64_t max_bytes, img_source *s,
                            lego_err *err) {
    lego_status st;
    ds_zip *z;
    size_t n = 0, bytes;

    if ((st = ds_zip_open(path, max_bytes, &s->zip, err)) != LEGO_OK) return st;
    z = s->zip;
    if (!size_mul(z->count + 1, sizeof *s->entries, &bytes) ||
        !(s->entries = malloc(bytes)))
        return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    for (size_t i = 0; i < z->count; i++) {
        ds_zip_entry *e = &z->entries[i];
        size_t len = strlen(e->name);
        int what;
        if (e->name[len - 1] == '/') continue; /* a folder */
        if ((st = classify(e->name, &what, err)) != LEGO_OK) return st;
        if (what == NAME_JSON) {
            if (s->json)
                return lego_fail(err, LEGO_ERR_FORMAT, "the archive holds dataset.json twice");
            s->json = e;
        } else if (what == NAME_PNG) {
            s->entries[n++] = e;
        }
    }
    if (n == 0) return lego_fail(err, LEGO_ERR_FORMAT, "the archive holds no PNG images");
    qsort(s->entries, n, sizeof *s->entries, cmp_entry_name);
    for (size_t i = 0; i < n; i++) {
        if (i && strcmp(s->entries[i - 1]->name, s->entries[i]->name) == 0)
            return lego_fail(err, LEGO_ERR_FORMAT, "the archive holds '%s' twice",
                             s->entries[i]->name);
        if ((st = ds_zip_locate(z, s->entries[i], err)) != LEGO_OK) return st;
    }
    if (s->json) {
        if ((st = ds_zip_locate(z, s->json, err)) != LEGO_OK) return st;
        s->entries[n] = s->json; /* checked for overlap with the images too */
    }
    if ((st = ds_zip_check_overlap(z, s->entries, n + (s->json != NULL), err)) != LEGO_OK)
        return st;

    /* The names, in the same order, for the label matching. */
    s->names.v = malloc(n * sizeof *s->names.v);
    if (!s->names.v) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    s->names.cap = n;
    for (size_t i = 0; i < n; i++) {
        char *copy = join(NULL, s->entries[i]->name);
        if ((st = list_push(&s->names, copy, err)) != LEGO_OK) return st;
    }
    return LEGO_OK;
}

/* ------------------------------------------------------------------------ */
/* dataset.json                                                             */
/* ------------------------------------------------------------------------ */

typedef struct label_pair {
    const char *name;
    int32_t label;
} label_pair;

static int cmp_pair(const void *a, const void *b) {
    return strcmp(((const label_pair *)a)->name, ((const label_pair *)b)->name);
}

/* Turn {"labels": [[name, class], ...]} (or "labels": null, or no
 * "labels") into one label per image of `names`. */
static lego_status parse_labels(const char *json, size_t len, const name_list *names,
                                int32_t **labels_out, int *label_dim, lego_err *err) {
    const char *end = NULL;
    cJSON *root, *arr, *item;
    label_pair *pairs = NULL;
    int32_t *labels = NULL;
    size_t n = 0, bytes;
    int max_label = -1;
    lego_status st = LEGO_OK;

    *labels_out = NULL;
    *label_dim = 0;
    root = cJSON_ParseWithLengthOpts(json, len, &end, 0);
    if (!root)
        return lego_fail(err, LEGO_ERR_FORMAT, "dataset.json is not valid JSON (at byte %td)",
                         end && end >= json ? end - json : (ptrdiff_t)0);
    if (!cJSON_IsObject(root)) {
        st = lego_fail(err, LEGO_ERR_FORMAT, "dataset.json is not a JSON object");
        goto done;
    }
    arr = cJSON_GetObjectItemCaseSensitive(root, "labels");
    if (!arr || cJSON_IsNull(arr)) goto done; /* unlabelled */
    if (!cJSON_IsArray(arr)) {
        st = lego_fail(err, LEGO_ERR_FORMAT, "dataset.json: \"labels\" is not an array");
        goto done;
    }
    n = (size_t)cJSON_GetArraySize(arr);
    if (!size_mul(n ? n : 1, sizeof *pairs, &bytes) || !(pairs = malloc(bytes)) ||
        !size_mul(names->n, sizeof *labels, &bytes) || !(labels = malloc(bytes))) {
        st = lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
        goto done;
    }
    n = 0;
    cJSON_ArrayForEach(item, arr) {
        cJSON *name = cJSON_GetArrayItem(item, 0), *value = cJSON_GetArrayItem(item, 1);
        double v;
        if (!cJSON_IsArray(item) || cJSON_GetArraySize(item) != 2 || !cJSON_IsString(name)) {
            st = lego_fail(err, LEGO_ERR_FORMAT,
                           "dataset.json: labels entry %zu is not a [\"file name\", "
                           "class] pair",
                           n);
            goto done;
        }
        if (cJSON_IsArray(value)) {
            st = lego_fail(err, LEGO_ERR_UNSUPPORTED,
                           "dataset.json: the label of '%s' is a vector; only class "
                           "indices are supported",
                           name->valuestring);
            goto done;
        }
        v = cJSON_IsNumber(value) ? value->valuedouble : -1.0;
        if (!cJSON_IsNumber(value) || !(v >= 0) || v >= DS_MAX_LABEL_DIM || v != floor(v)) {
            st = lego_fail(err, LEGO_ERR_FORMAT,
                           "dataset.json: the label of '%s' is not a class index in "
                           "0..%d",
                           name->valuestring, DS_MAX_LABEL_DIM - 1);
            goto done;
        }
        pairs[n].name = name->valuestring;
        pairs[n].label = (int32_t)v;
        if (pairs[n].label > max_label) max_label = pairs[n].label;
        n++;
    }
    qsort(pairs, n, sizeof *pairs, cmp_pair);
    for (size_t i = 0; i < names->n; i++) labels[i] = -1;
    for (size_t i = 0; i < n; i++) {
        char **hit;
        const char *key = pairs[i].name;
        if (i && strcmp(pairs[i - 1].name, key) == 0) {
            st = lego_fail(err, LEGO_ERR_FORMAT, "dataset.json labels '%s' twice", key);
            goto done;
        }
        hit = bsearch(&key, names->v, names->n, sizeof *names->v, cmp_str);
        if (!hit) {
            st = lego_fail(err, LEGO_ERR_FORMAT,
                           "dataset.json labels '%s', which is not an image of the "
                           "dataset",
                           key);
            goto done;
        }
        labels[hit - names->v] = pairs[i].label;
    }
    for (size_t i = 0; i < names->n; i++)
        if (labels[i] < 0) {
            st = lego_fail(err, LEGO_ERR_FORMAT, "image '%s' has no label in dataset.json",
                           names->v[i]);
            goto done;
        }
    *labels_out = labels;
    labels = NULL;
    *label_dim = max_label + 1;

done:
    free(pairs);
    free(labels);
    cJSON_Delete(root);
    return st;
}

/* ------------------------------------------------------------------------ */
/* Loading PNG datasets                                                     */
/* ------------------------------------------------------------------------ */

static lego_status load_pngs(lego_dataset *ds, img_source *s, const lego_dataset_options *o,
                             size_t limit, lego_err *err) {
    uint8_t *file = NULL;
    size_t file_cap = 0, file_size = 0, pix_cap = 0, n_use = s->names.n, total;
    png_shape shape = {0, 0, 0};
    lego_status st = LEGO_OK;

    if (s->has_json || s->json) {
        /* dataset.json for N images needs some tens of bytes each; refusing
         * far larger files bounds what cJSON builds from them. */
        size_t json_limit = 1u << 20;
        for (size_t i = 0; i < s->names.n; i++)
            if (!size_add(json_limit, 2 * strlen(s->names.v[i]) + 64, &json_limit)) break;
        if (json_limit > limit) json_limit = limit;
        st = source_read(s, SIZE_MAX, json_limit, &file, &file_cap, &file_size, err);
        if (st == LEGO_OK)
            st = parse_labels((const char *)file, file_size, &s->names, &ds->labels,
                              &ds->label_dim, err);
        if (st != LEGO_OK) goto done; /* the messages name dataset.json */
    }

    if (o->max_images > 0 && (uint64_t)o->max_images < (uint64_t)n_use)
        n_use = (size_t)o->max_images;
    for (size_t i = 0; i < n_use; i++) {
        png_mem m;
        png_shape got = {0, 0, 0};
        if ((st = source_read(s, i, limit, &file, &file_cap, &file_size, err)) != LEGO_OK)
            goto done;
        memset(&m, 0, sizeof m);
        m.data = file;
        m.size = file_size;
        if (i == 0) {
            if ((st = png_decode(&m, NULL, &shape, NULL, err)) != LEGO_OK) {
                lego_err_prefix(err, "%s", s->names.v[i]);
                goto done;
            }
            total = (size_t)shape.c * (size_t)shape.h * (size_t)shape.w;
            /* Like deflate itself, a PNG cannot hold more than about 1032
             * pixel bytes per file byte: a larger IHDR is lying. */
            if ((uint64_t)total > (uint64_t)file_size * DS_MAX_RATIO + 65536) {
                st = lego_fail(err, LEGO_ERR_FORMAT,
                               "%s: the header claims %d x %d pixels, more than a "
                               "%zu-byte PNG can hold",
                               s->names.v[i], shape.h, shape.w, file_size);
                goto done;
            }
            if (!size_mul(total, n_use, &total) || total > limit) {
                st = lego_fail(err, LEGO_ERR_OUT_OF_MEMORY,
                               "%zu image%s of %d x %d x %d need%s more than the limit "
                               "of %zu bytes (lego_dataset_options.max_bytes)",
                               n_use, n_use == 1 ? "" : "s", shape.c, shape.h, shape.w,
                               n_use == 1 ? "s" : "", limit);
                goto done;
            }
            ds->channels = shape.c;
            ds->height = shape.h;
            ds->width = shape.w;
            ds->image_bytes = (size_t)shape.c * (size_t)shape.h * (size_t)shape.w;
            memset(&m, 0, sizeof m);
            m.data = file;
            m.size = file_size;
        }
        if ((st = ds_reserve(&ds->pixels, &pix_cap, (i + 1) * ds->image_bytes, limit, err)) !=
            LEGO_OK)
            goto done;
        st = png_decode(&m, &shape, &got, ds->pixels + i * ds->image_bytes, err);
        if (st == LEGO_ERR_SHAPE) {
            st = lego_fail(err, LEGO_ERR_SHAPE,
                           "'%s' is %d x %d with %d channel%s but '%s' is %d x %d with "
                           "%d channel%s: all images must have the same size and "
                           "channels",
                           s->names.v[i], got.h, got.w, got.c, got.c == 1 ? "" : "s",
                           s->names.v[0], shape.h, shape.w, shape.c,
                           shape.c == 1 ? "" : "s");
            goto done;
        }
        if (st != LEGO_OK) {
            lego_err_prefix(err, "%s", s->names.v[i]);
            goto done;
        }
    }
    ds->count = (int64_t)n_use;
    if (pix_cap > n_use * ds->image_bytes) { /* give back the doubling slack */
        uint8_t *p = realloc(ds->pixels, n_use * ds->image_bytes);
        if (p) ds->pixels = p;
    }

done:
    free(file);
    return st;
}

/* ------------------------------------------------------------------------ */
/* idx files (MNIST, Fashion-MNIST), gzip-compressed or plain               */
/* ------------------------------------------------------------------------ */

/* zlib's message for the last gz* failure, without the path it starts with. */
static lego_status gz_fail(gzFile g, const char *path, const char *what, lego_err *err) {
    int code = Z_OK;
    const char *msg = gzerror(g, &code);
    size_t plen = strlen(path);
    if (code == Z_OK || code == Z_STREAM_END)
        return lego_fail(err, LEGO_ERR_FORMAT, "%s: unexpected end of file in %s (truncated)",
                         path, what);
    if (strncmp(msg, path, plen) == 0 && strncmp(msg + plen, ": ", 2) == 0) msg += plen + 2;
    if (code == Z_MEM_ERROR) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory in zlib");
    return lego_fail(err, code == Z_ERRNO ? LEGO_ERR_IO : LEGO_ERR_FORMAT,
                     "%s: %s in %s (truncated or corrupt)", path, msg, what);
}

static lego_status gz_read_exact(gzFile g, uint8_t *dst, size_t n, const char *path,
                                 const char *what, lego_err *err) {
    while (n) {
        unsigned piece = n > (1u << 20) ? (1u << 20) : (unsigned)n;
        int r = gzread(g, dst, piece);
        if (r <= 0) return gz_fail(g, path, what, err);
        dst += r;
        n -= (size_t)r;
    }
    return LEGO_OK;
}

/* After the last record: the file must end here, cleanly (gzip trailer and
 * CRC included). */
static lego_status gz_expect_end(gzFile g, const char *path, const char *what,
                                 lego_err *err) {
    uint8_t c;
    int code = Z_OK;
    int r = gzread(g, &c, 1);
    if (r > 0)
        return lego_fail(err, LEGO_ERR_FORMAT, "%s has data after its %s", path, what);
    gzerror(g, &code);
    if (r < 0 || (code != Z_OK && code != Z_STREAM_END)) return gz_fail(g, path, what, err);
    return LEGO_OK;
}

typedef struct gz_in {
    gzFile g;
    uint64_t file_size;
} gz_in;

static lego_status gz_open(const char *path, gz_in *in, lego_err *err) {
    struct stat sb;
    if (stat(path, &sb) != 0)
        return lego_fail(err, LEGO_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    if (!S_ISREG(sb.st_mode)) return lego_fail(err, LEGO_ERR_IO, "%s is not a regular file", path);
    in->file_size = (uint64_t)sb.st_size;
    in->g = gzopen(path, "rb");
    if (!in->g)
        return lego_fail(err, LEGO_ERR_IO, "cannot open %s: %s", path,
                         errno ? strerror(errno) : "out of memory");
    gzbuffer(in->g, 1u << 17);
    return LEGO_OK;
}

/* Read an idx header: magic 0 0 type ndims, then ndims big-endian sizes.
 * The type must be unsigned bytes (0x08). */
static lego_status idx_header(gz_in *in, const char *path, int ndims, uint32_t *dims,
                              lego_err *err) {
    uint8_t h[4 + 4 * 3];
    lego_status st = gz_read_exact(in->g, h, 4, path, "the idx header", err);
    if (st != LEGO_OK) return st;
    if (h[0] != 0 || h[1] != 0)
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "%s is not an idx file (magic %02x %02x %02x %02x)", path, h[0],
                         h[1], h[2], h[3]);
    if (h[2] != 0x08)
        return lego_fail(err, LEGO_ERR_UNSUPPORTED,
                         "%s: idx data type 0x%02x is not supported (only unsigned "
                         "bytes, 0x08)",
                         path, h[2]);
    if (h[3] != ndims) {
        if (ndims == 3 && h[3] == 1)
            return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                             "%s is an idx labels file; open the images file", path);
        return lego_fail(err, LEGO_ERR_FORMAT, "%s: idx file has %d dimensions, expected %d",
                         path, h[3], ndims);
    }
    st = gz_read_exact(in->g, h + 4, 4 * (size_t)ndims, path, "the idx header", err);
    if (st != LEGO_OK) return st;
    for (int i = 0; i < ndims; i++) dims[i] = rd32be(h + 4 + 4 * i);
    return LEGO_OK;
}

/* "x/train-images-idx3-ubyte.gz" -> "x/train-labels-idx1-ubyte.gz" (then
 * without or with ".gz") into *out; NULL when the name does not follow the
 * pattern or no such file exists.  Running out of memory is an error, not
 * "no labels": the set would silently lose them. */
static lego_status find_labels(const char *images, char **out, lego_err *err) {
    const char *base = strrchr(images, '/');
    char *p, *a, *b;
    size_t len = strlen(images);
    struct stat sb;

    *out = NULL;
    base = base ? base + 1 : images;
    a = strstr(base, "images");
    b = strstr(base, "idx3");
    if (!a || !b) return LEGO_OK;
    p = malloc(len + 4);
    if (!p) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    memcpy(p, images, len + 1);
    memcpy(p + (a - images), "labels", 6);
    p[(b - images) + 3] = '1';
    if (stat(p, &sb) == 0 && S_ISREG(sb.st_mode)) {
        *out = p;
        return LEGO_OK;
    }
    if (has_ext(p, ".gz"))
        p[len - 3] = '\0';
    else
        memcpy(p + len, ".gz", 4);
    if (stat(p, &sb) == 0 && S_ISREG(sb.st_mode)) {
        *out = p;
        return LEGO_OK;
    }
    free(p);
    return LEGO_OK;
}

/* Read the labels file: its count must match the images; all labels are
 * read (label_dim is the largest + 1 over the whole file, and the file is
 * checked to its end), the first n_use kept. */
static lego_status idx_labels(const char *path, uint32_t n_images, const char *images_path,
                              size_t n_use, lego_dataset *ds, lego_err *err) {
    gz_in in = {NULL, 0};
    uint32_t count = 0;
    uint8_t chunk[65536];
    size_t bytes, done = 0;
    int dim = 0;
    lego_status st;

    if ((st = gz_open(path, &in, err)) != LEGO_OK) return st;
    if ((st = idx_header(&in, path, 1, &count, err)) != LEGO_OK) goto done;
    if (count != n_images) {
        st = lego_fail(err, LEGO_ERR_SHAPE, "%s has %lu labels but %s has %lu images", path,
                       (unsigned long)count, images_path, (unsigned long)n_images);
        goto done;
    }
    if (!size_mul(n_use, sizeof *ds->labels, &bytes) || !(ds->labels = malloc(bytes))) {
        st = lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory for %zu labels", n_use);
        goto done;
    }
    while (done < count) {
        size_t piece = count - done < sizeof chunk ? count - done : sizeof chunk;
        if ((st = gz_read_exact(in.g, chunk, piece, path, "the labels", err)) != LEGO_OK)
            goto done;
        for (size_t j = 0; j < piece; j++) {
            if (chunk[j] + 1 > dim) dim = chunk[j] + 1;
            if (done + j < n_use) ds->labels[done + j] = chunk[j];
        }
        done += piece;
    }
    if ((st = gz_expect_end(in.g, path, "labels", err)) != LEGO_OK) goto done;
    ds->label_dim = dim;

done:
    if (st != LEGO_OK) {
        free(ds->labels);
        ds->labels = NULL;
        ds->label_dim = 0;
    }
    gzclose(in.g);
    return st;
}

static lego_status load_idx(lego_dataset *ds, const char *path, const lego_dataset_options *o,
                            size_t limit, lego_err *err) {
    gz_in in = {NULL, 0};
    uint32_t dims[3] = {0, 0, 0};
    uint64_t claimed, room;
    size_t n_use, total, pix_cap = 0, done_bytes = 0;
    char *labels_path = NULL;
    lego_status st;

    if ((st = gz_open(path, &in, err)) != LEGO_OK) return st;
    if ((st = idx_header(&in, path, 3, dims, err)) != LEGO_OK) goto done;
    if (dims[0] == 0 || dims[1] == 0 || dims[2] == 0 || dims[1] > DS_MAX_SIDE ||
        dims[2] > DS_MAX_SIDE) {
        st = lego_fail(err, LEGO_ERR_FORMAT,
                       "%s: implausible idx header: %lu images of %lu x %lu", path,
                       (unsigned long)dims[0], (unsigned long)dims[1], (unsigned long)dims[2]);
        goto done;
    }
    /* Products of three 32-bit numbers below 2^16 * 2^16 * 2^32 fit. */
    claimed = (uint64_t)dims[0] * dims[1] * dims[2];
    room = in.file_size > (UINT64_MAX - 65536) / DS_MAX_RATIO
               ? UINT64_MAX
               : in.file_size * DS_MAX_RATIO + 65536;
    if (claimed > room) {
        st = lego_fail(err, LEGO_ERR_FORMAT,
                       "%s: the idx header claims %lu images of %lu x %lu (%llu bytes), "
                       "more than a %llu-byte file can hold",
                       path, (unsigned long)dims[0], (unsigned long)dims[1],
                       (unsigned long)dims[2], (unsigned long long)claimed,
                       (unsigned long long)in.file_size);
        goto done;
    }
    n_use = dims[0];
    if (o->max_images > 0 && (uint64_t)o->max_images < dims[0]) n_use = (size_t)o->max_images;
    ds->channels = 1;
    ds->height = (int)dims[1];
    ds->width = (int)dims[2];
    ds->image_bytes = (size_t)dims[1] * dims[2];
    if (!size_mul(n_use, ds->image_bytes, &total) || total > limit) {
        st = lego_fail(err, LEGO_ERR_OUT_OF_MEMORY,
                       "%s: %zu images of %lu x %lu need more than the limit of %zu "
                       "bytes (lego_dataset_options.max_bytes)",
                       path, n_use, (unsigned long)dims[1], (unsigned long)dims[2], limit);
        goto done;
    }
    /* Read in pieces, growing the buffer only as data really arrives. */
    while (done_bytes < total) {
        size_t piece = total - done_bytes > (4u << 20) ? (4u << 20) : total - done_bytes;
        if ((st = ds_reserve(&ds->pixels, &pix_cap, done_bytes + piece, limit, err)) != LEGO_OK)
            goto done;
        st = gz_read_exact(in.g, ds->pixels + done_bytes, piece, path, "the images", err);
        if (st != LEGO_OK) goto done;
        done_bytes += piece;
    }
    if (n_use == dims[0] && (st = gz_expect_end(in.g, path, "images", err)) != LEGO_OK)
        goto done;
    if (pix_cap > total) {
        uint8_t *p = realloc(ds->pixels, total);
        if (p) ds->pixels = p;
    }
    ds->count = (int64_t)n_use;

    if (o->labels_path) {
        st = idx_labels(o->labels_path, dims[0], path, n_use, ds, err);
    } else if ((st = find_labels(path, &labels_path, err)) == LEGO_OK && labels_path) {
        st = idx_labels(labels_path, dims[0], path, n_use, ds, err);
    }

done:
    free(labels_path);
    gzclose(in.g);
    return st;
}

/* ------------------------------------------------------------------------ */
/* The public API                                                           */
/* ------------------------------------------------------------------------ */

/* Calls that succeed write nothing to the handle (not even to clear the
 * message), so that several threads may read one dataset at once. */
#define DS_CHECK(ds)                                                           \
    do {                                                                       \
        if (!(ds)) return LEGO_ERR_INVALID_ARGUMENT;                           \
        if ((ds)->failed) return LEGO_ERR_STATE;                               \
    } while (0)

LEGO_API void lego_dataset_options_init(lego_dataset_options *o) {
    if (!o) return;
    memset(o, 0, sizeof *o);
    o->size = sizeof *o;
    o->resolution = 0;
    o->pad_value = -1.0f;
    o->max_bytes = DS_DEFAULT_MAX_BYTES;
    o->max_images = 0;
    o->labels_path = NULL;
}

static lego_status check_options(const lego_dataset_options *o, lego_err *err) {
    if (o->resolution < 0 || o->resolution > DS_MAX_SIDE)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                         "resolution must be 0 (native) or 1..%d (got %d)", DS_MAX_SIDE,
                         o->resolution);
    if (!isfinite(o->pad_value))
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "pad_value must be finite");
    if (o->max_bytes == 0)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "max_bytes must be positive");
    if (o->max_images < 0)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                         "max_images must be 0 (all) or positive (got %lld)",
                         (long long)o->max_images);
    return LEGO_OK;
}

/* Which reader a path needs, from what it is and its first bytes. */
enum { KIND_FOLDER, KIND_ZIP, KIND_IDX };

static lego_status sniff(const char *path, int *kind, lego_err *err) {
    struct stat sb;
    uint8_t m[8] = {0};
    size_t n;
    FILE *f;
    if (stat(path, &sb) != 0) return lego_fail(err, LEGO_ERR_IO, "cannot open: %s", strerror(errno));
    if (S_ISDIR(sb.st_mode)) {
        *kind = KIND_FOLDER;
        return LEGO_OK;
    }
    if (!S_ISREG(sb.st_mode))
        return lego_fail(err, LEGO_ERR_IO, "not a regular file or a folder");
    f = fopen(path, "rb");
    if (!f) return lego_fail(err, LEGO_ERR_IO, "cannot open: %s", strerror(errno));
    n = fread(m, 1, sizeof m, f);
    fclose(f);
    if (n >= 4 && m[0] == 'P' && m[1] == 'K' &&
        ((m[2] == 3 && m[3] == 4) || (m[2] == 5 && m[3] == 6))) {
        *kind = KIND_ZIP;
    } else if (n >= 2 && m[0] == 0x1f && m[1] == 0x8b) {
        *kind = KIND_IDX; /* the idx reader checks what is inside */
    } else if (n >= 4 && m[0] == 0 && m[1] == 0 && m[2] == 0x08) {
        *kind = KIND_IDX;
    } else if (n >= 8 && memcmp(m, "\x89PNG\r\n\x1a\n", 8) == 0) {
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                         "a single PNG is not a dataset; give its folder");
    } else {
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "unrecognised format: not a folder, a ZIP archive or an idx "
                         "file (gzip or plain)");
    }
    return LEGO_OK;
}

/* Sizes after padding, and the conversion table. */
static lego_status finish(lego_dataset *ds, const lego_dataset_options *o, lego_err *err) {
    size_t plane;
    int res = o->resolution;
    if (res > 0) {
        if (ds->height > res || ds->width > res)
            return lego_fail(err, LEGO_ERR_SHAPE,
                             "the images are %d x %d, larger than the requested "
                             "resolution %d (images are padded, never resized or "
                             "cropped)",
                             ds->height, ds->width, res);
        ds->out_height = ds->out_width = res;
    } else {
        ds->out_height = ds->height;
        ds->out_width = ds->width;
    }
    ds->top = (ds->out_height - ds->height) / 2;
    ds->left = (ds->out_width - ds->width) / 2;
    if (!size_mul((size_t)ds->out_height, (size_t)ds->out_width, &plane) ||
        !size_mul(plane, (size_t)ds->channels, &ds->out_floats) ||
        ds->out_floats > LEGO_MAX_ALLOC / sizeof(float))
        return lego_fail(err, LEGO_ERR_SHAPE, "images of %d x %d are too large",
                         ds->out_height, ds->out_width);
    ds->pad_value = o->pad_value;
    for (int v = 0; v < 256; v++) ds->lut[v] = (float)v / 127.5f - 1.0f;
    return LEGO_OK;
}

LEGO_API lego_status lego_dataset_open(const char *path, const lego_dataset_options *options,
                                       lego_dataset **out) {
    lego_dataset_options o;
    lego_dataset *ds;
    lego_err *err;
    lego_status st;
    size_t limit;
    int kind = 0;

    if (!out) return LEGO_ERR_INVALID_ARGUMENT;
    *out = NULL;
    ds = calloc(1, sizeof *ds);
    if (!ds) return LEGO_ERR_OUT_OF_MEMORY;
    *out = ds;
    err = &ds->err;
    lego_dataset_options_init(&o);
    if (options) lego_copy_options(&o, sizeof o, options, options->size);
    o.size = sizeof o;

    if (!path)
        st = lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "path is NULL");
    else if (!path[0])
        st = lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "path is empty");
    else
        st = check_options(&o, err);
    if (st != LEGO_OK) goto fail;

    limit = o.max_bytes > (uint64_t)LEGO_MAX_ALLOC ? LEGO_MAX_ALLOC : (size_t)o.max_bytes;
    if ((st = sniff(path, &kind, err)) != LEGO_OK) goto fail_prefix;
    if (kind == KIND_IDX) {
        st = load_idx(ds, path, &o, limit, err);
        if (st != LEGO_OK) goto fail; /* messages name their files */
    } else {
        img_source s;
        memset(&s, 0, sizeof s);
        if (o.labels_path) {
            st = lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                           "labels_path applies to idx files only; folders and zips "
                           "carry their labels in dataset.json");
        } else if (kind == KIND_FOLDER) {
            st = folder_list(path, &s, err);
        } else {
            st = zip_list(path, o.max_bytes, &s, err);
        }
        if (st == LEGO_OK) st = load_pngs(ds, &s, &o, limit, err);
        source_free(&s);
        if (st != LEGO_OK) goto fail_prefix;
    }
    if ((st = finish(ds, &o, err)) != LEGO_OK) goto fail_prefix;
    return LEGO_OK;

fail_prefix:
    lego_err_prefix(err, "%s", path);
fail:
    free(ds->pixels);
    free(ds->labels);
    ds->pixels = NULL;
    ds->labels = NULL;
    ds->count = 0;
    ds->label_dim = 0;
    ds->failed = 1;
    return st;
}

LEGO_API void lego_dataset_free(lego_dataset *ds) {
    if (!ds) return;
    free(ds->pixels);
    free(ds->labels);
    free(ds);
}

LEGO_API const char *lego_dataset_error(const lego_dataset *ds) {
    if (!ds) return "dataset handle is NULL (out of memory?)";
    return ds->err.msg;
}

LEGO_API int64_t lego_dataset_count(const lego_dataset *ds) {
    return ds && !ds->failed ? ds->count : 0;
}

LEGO_API int lego_dataset_label_dim(const lego_dataset *ds) {
    return ds && !ds->failed ? ds->label_dim : 0;
}

LEGO_API lego_status lego_dataset_shape(const lego_dataset *ds, int *channels, int *height,
                                        int *width) {
    if (!ds) return LEGO_ERR_INVALID_ARGUMENT;
    if (ds->failed) return LEGO_ERR_STATE;
    if (channels) *channels = ds->channels;
    if (height) *height = ds->out_height;
    if (width) *width = ds->out_width;
    return LEGO_OK;
}

/* Image i as float CHW, padded. */
static void convert(const lego_dataset *ds, size_t i, float *out) {
    const uint8_t *src = ds->pixels + i * ds->image_bytes;
    size_t c_n = (size_t)ds->channels, h_n = (size_t)ds->height, w_n = (size_t)ds->width;
    size_t ow = (size_t)ds->out_width, plane = (size_t)ds->out_height * ow;
    int padded = ds->out_height != ds->height || ds->out_width != ds->width;
    for (size_t c = 0; c < c_n; c++) {
        float *dst = out + c * plane;
        if (padded)
            for (size_t p = 0; p < plane; p++) dst[p] = ds->pad_value;
        for (size_t y = 0; y < h_n; y++) {
            float *row = dst + (y + (size_t)ds->top) * ow + (size_t)ds->left;
            const uint8_t *s = src + y * w_n * c_n + c;
            for (size_t x = 0; x < w_n; x++) row[x] = ds->lut[s[x * c_n]];
        }
    }
}

LEGO_API lego_status lego_dataset_get(lego_dataset *ds, int64_t index, float *chw_out,
                                      int32_t *label_out) {
    DS_CHECK(ds);
    if (!chw_out) return lego_fail(&ds->err, LEGO_ERR_INVALID_ARGUMENT, "output is NULL");
    if (index < 0 || index >= ds->count)
        return lego_fail(&ds->err, LEGO_ERR_INVALID_ARGUMENT,
                         "index %lld is out of range (the dataset has %lld images)",
                         (long long)index, (long long)ds->count);
    convert(ds, (size_t)index, chw_out);
    if (label_out) *label_out = ds->labels ? ds->labels[index] : -1;
    return LEGO_OK;
}

LEGO_API lego_status lego_dataset_get_batch(lego_dataset *ds, const int64_t *indices, int n,
                                            float *out, int32_t *labels_out) {
    size_t total;
    DS_CHECK(ds);
    if (!indices || !out)
        return lego_fail(&ds->err, LEGO_ERR_INVALID_ARGUMENT, "%s is NULL",
                         indices ? "output" : "indices");
    if (n <= 0)
        return lego_fail(&ds->err, LEGO_ERR_INVALID_ARGUMENT,
                         "batch size must be positive (got %d)", n);
    if (!size_mul((size_t)n, ds->out_floats, &total) || total > LEGO_MAX_ALLOC / sizeof(float))
        return lego_fail(&ds->err, LEGO_ERR_INVALID_ARGUMENT, "a batch of %d is too large", n);
    for (int k = 0; k < n; k++)
        if (indices[k] < 0 || indices[k] >= ds->count)
            return lego_fail(&ds->err, LEGO_ERR_INVALID_ARGUMENT,
                             "indices[%d] = %lld is out of range (the dataset has %lld "
                             "images)",
                             k, (long long)indices[k], (long long)ds->count);
    for (int k = 0; k < n; k++) {
        convert(ds, (size_t)indices[k], out + (size_t)k * ds->out_floats);
        if (labels_out) labels_out[k] = ds->labels ? ds->labels[indices[k]] : -1;
    }
    return LEGO_OK;
}
