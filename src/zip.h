/*
 * zip.h -- the read-only ZIP reader (zip.c) under the dataset reader
 * (dataset.c), and the buffer growth they share.  Internal; not installed.
 *
 * The ZIP reader handles what EDM/StyleGAN dataset archives use: entries
 * stored or deflated, optional data descriptors.  It refuses ZIP64,
 * encryption, multi-disk archives, data before the first entry or between
 * the entries and the central directory that the directory does not
 * account for, and anything where the central directory, the local headers
 * and the data disagree.  Every size and offset is checked against the
 * file before it is used; every entry's CRC-32 is verified when it is read.
 */
#ifndef LEGO_ZIP_H
#define LEGO_ZIP_H

#include <stdint.h>
#include <stdio.h>

#include "common.h"

/* Deflate cannot expand by more than about 1032:1; a header claiming more
 * data than that from the bytes present is lying. */
#define DS_MAX_RATIO 1032u

/* Grow *p to hold at least `need` bytes, doubling, never beyond `limit`
 * (lego_dataset_options.max_bytes, named in the message). (dataset.c) */
lego_status ds_reserve(uint8_t **p, size_t *cap, size_t need, size_t limit, lego_err *err);

typedef struct ds_zip_entry {
    char *name;             /* NUL-terminated; contains no NUL              */
    uint64_t header_offset; /* local file header                            */
    uint64_t data_offset;   /* first byte of the data (ds_zip_locate)       */
    uint64_t span_end;      /* one past the data and any data descriptor    */
    uint32_t crc, csize, usize;
    uint16_t method;        /* 0 stored, 8 deflated                         */
    uint16_t flags;
    int located;            /* data_offset and span_end are valid           */
} ds_zip_entry;

typedef struct ds_zip {
    FILE *f;
    char *path;
    uint64_t file_size;
    uint64_t cd_offset;     /* the central directory; entries end before it */
    ds_zip_entry *entries;  /* in central directory order                   */
    size_t count;
} ds_zip;

/* Open an archive and read its central directory (at most max_bytes of
 * it).  On failure *out is NULL. */
lego_status ds_zip_open(const char *path, uint64_t max_bytes, ds_zip **out,
                        lego_err *err);

/* Read and check an entry's local header: name, method and sizes must agree
 * with the central directory, and the data (plus descriptor) must lie
 * before the central directory. */
lego_status ds_zip_locate(ds_zip *z, ds_zip_entry *e, lego_err *err);

/* Check that the located entries e[0..n) do not overlap one another
 * (overlapping entries are a zip-bomb technique).  Reorders nothing. */
lego_status ds_zip_check_overlap(ds_zip *z, ds_zip_entry *const *e, size_t n,
                                 lego_err *err);

/* Decompress a located entry into *buf (grown as needed; *cap is its size),
 * refusing entries larger than `limit` bytes, and verify its CRC-32. */
lego_status ds_zip_read(ds_zip *z, const ds_zip_entry *e, size_t limit,
                        uint8_t **buf, size_t *cap, lego_err *err);

void ds_zip_close(ds_zip *z);

#endif /* LEGO_ZIP_H */
