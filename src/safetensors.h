/*
 * safetensors.h -- a validating reader and a writer for the safetensors
 * format (8-byte little-endian header length, JSON header, raw data).
 *
 * The reader maps the file and hands out pointers into the mapping: tensor
 * data is read in place, never copied.  Every header field is checked before
 * use: offsets inside the data area, byte sizes matching dtype x shape,
 * no two tensors overlapping, known dtypes, sane ranks and dimensions.
 */
#ifndef LEGO_SAFETENSORS_H
#define LEGO_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"

typedef enum st_dtype {
    ST_F32, ST_F16, ST_BF16, ST_F64, ST_I64, ST_I32, ST_U8, ST_BOOL
} st_dtype;

#define ST_MAX_RANK 8

typedef struct st_tensor {
    char *name;
    st_dtype dtype;
    int rank;
    int64_t shape[ST_MAX_RANK];
    size_t numel;
    const void *data; /* inside the mapping; may be unaligned */
    size_t nbytes;
} st_tensor;

typedef struct st_file {
    void *map;
    size_t map_size;
    st_tensor *tensors;
    int num_tensors;
    char *metadata_config; /* __metadata__["lego.config"], or NULL */
} st_file;

/* Open and validate `path`.  On failure returns a code and fills `err`;
 * *out is untouched. */
lego_status st_open(const char *path, st_file **out, lego_err *err);
/* Validate an in-memory image (used by st_open and by fuzzers); the
 * st_file borrows `data`, which must outlive it. */
lego_status st_parse(const void *data, size_t size, st_file **out,
                     lego_err *err);
void st_close(st_file *f);

const st_tensor *st_find(const st_file *f, const char *name);
size_t st_dtype_size(st_dtype dtype);
const char *st_dtype_name(st_dtype dtype);

/* Convert a floating tensor (F32, F16, BF16, F64) to float32. */
lego_status st_to_f32(const st_tensor *t, float *out, lego_err *err);
/* Convert any numeric tensor to float64 (tests and tools). */
lego_status st_to_f64(const st_tensor *t, double *out, lego_err *err);

/* Writer: tensors are float32. */
typedef struct st_write_item {
    const char *name;
    int rank;
    int64_t shape[ST_MAX_RANK];
    const float *data;
} st_write_item;

lego_status st_write_f32(const char *path, const st_write_item *items,
                         int num_items, const char *config_json,
                         lego_err *err);

#endif /* LEGO_SAFETENSORS_H */
