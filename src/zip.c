/*
 * zip.c -- the read-only ZIP reader under the dataset zips (zip.h says
 * what it accepts and refuses).  Sizes and offsets come from a hostile
 * file: each is checked against the file's real size before it is used.
 */
#define _POSIX_C_SOURCE 200809L
#include "zip.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>

#define ZLIB_CONST
#include <zlib.h>

#define ZIP_SIG_LOCAL 0x04034b50u
#define ZIP_SIG_CENTRAL 0x02014b50u
#define ZIP_SIG_END 0x06054b50u
#define ZIP_SIG_END64_LOCATOR 0x07064b50u
#define ZIP_SIG_DESCRIPTOR 0x08074b50u
#define ZIP_FLAG_ENCRYPTED 0x0001u
#define ZIP_FLAG_DESCRIPTOR 0x0008u
#define ZIP_FLAG_STRONG_ENCRYPTION 0x0040u
#define ZIP_FLAG_MASKED_HEADERS 0x2000u
#define ZIP_ENCRYPTION_FLAGS \
    (ZIP_FLAG_ENCRYPTED | ZIP_FLAG_STRONG_ENCRYPTION | ZIP_FLAG_MASKED_HEADERS)

/* Little-endian fields. */
static uint32_t rd16(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8; }

static uint32_t rd32(const uint8_t *p) { return rd16(p) | rd16(p + 2) << 16; }

static lego_status zip_read_at(ds_zip *z, uint64_t off, void *buf, size_t n,
                               lego_err *err) {
    if (off > z->file_size || n > z->file_size - off)
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "reading %zu bytes at offset %llu runs past the end of "
                         "the file (%llu bytes)",
                         n, (unsigned long long)off, (unsigned long long)z->file_size);
    if (fseeko(z->f, (off_t)off, SEEK_SET) != 0)
        return lego_fail(err, LEGO_ERR_IO, "cannot seek in %s: %s", z->path, strerror(errno));
    if (n && fread(buf, 1, n, z->f) != n)
        return lego_fail(err, LEGO_ERR_IO, "error reading %s: %s", z->path,
                         ferror(z->f) ? strerror(errno) : "unexpected end of file");
    return LEGO_OK;
}

/* Walk an extra field: (id, length) records.  ZIP64 and AES records are
 * refused; a record running past the field is malformed.  Fewer than four
 * bytes left over are alignment padding (zipalign writes such). */
static lego_status zip_check_extra(const uint8_t *x, size_t len, const char *name,
                                   lego_err *err) {
    size_t pos = 0;
    while (len - pos >= 4) {
        uint32_t id = rd16(x + pos), n = rd16(x + pos + 2);
        if (n > len - pos - 4)
            return lego_fail(err, LEGO_ERR_FORMAT,
                             "entry '%s': malformed extra field (record 0x%04x "
                             "runs past its end)",
                             name, (unsigned)id);
        if (id == 0x0001)
            return lego_fail(err, LEGO_ERR_UNSUPPORTED,
                             "entry '%s' uses ZIP64 (not supported)", name);
        if (id == 0x9901)
            return lego_fail(err, LEGO_ERR_UNSUPPORTED,
                             "entry '%s' is encrypted (not supported)", name);
        pos += 4 + n;
    }
    return LEGO_OK;
}

void ds_zip_close(ds_zip *z) {
    if (!z) return;
    if (z->f) fclose(z->f);
    for (size_t i = 0; i < z->count; i++) free(z->entries[i].name);
    free(z->entries);
    free(z->path);
    free(z);
}

/* Find the end of central directory record: the last signature whose
 * comment ends exactly at the end of the file. */
static lego_status zip_find_end(ds_zip *z, uint8_t end[22], uint64_t *end_pos,
                                lego_err *err) {
    size_t tail_len = z->file_size < 22 + 65535 ? (size_t)z->file_size : 22 + 65535;
    uint8_t *tail;
    lego_status st;
    size_t p;
    int found = 0;

    if (z->file_size < 22)
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "not a ZIP archive: %llu bytes is too small",
                         (unsigned long long)z->file_size);
    tail = malloc(tail_len);
    if (!tail) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    st = zip_read_at(z, z->file_size - tail_len, tail, tail_len, err);
    if (st != LEGO_OK) {
        free(tail);
        return st;
    }
    for (p = tail_len - 22;; p--) {
        if (rd32(tail + p) == ZIP_SIG_END && p + 22 + rd16(tail + p + 20) == tail_len) {
            found = 1;
            break;
        }
        if (p == 0) break;
    }
    if (found) {
        memcpy(end, tail + p, 22);
        *end_pos = z->file_size - tail_len + p;
    }
    free(tail);
    if (!found)
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "no end of central directory record: not a ZIP archive, "
                         "or truncated");
    return LEGO_OK;
}

/* Parse one central directory record at cd[pos..], which has `avail` bytes
 * left; returns its length in *rec. */
static lego_status zip_parse_central(ds_zip *z, const uint8_t *h, size_t avail,
                                     size_t index, ds_zip_entry *e, size_t *rec,
                                     lego_err *err) {
    uint32_t nlen, xlen, clen, disk;
    lego_status st;

    if (avail < 46)
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "the central directory is truncated at entry %zu", index);
    if (rd32(h) != ZIP_SIG_CENTRAL)
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "central directory entry %zu has a bad signature", index);
    e->flags = (uint16_t)rd16(h + 8);
    e->method = (uint16_t)rd16(h + 10);
    e->crc = rd32(h + 16);
    e->csize = rd32(h + 20);
    e->usize = rd32(h + 24);
    nlen = rd16(h + 28);
    xlen = rd16(h + 30);
    clen = rd16(h + 32);
    disk = rd16(h + 34);
    e->header_offset = rd32(h + 42);
    *rec = 46 + (size_t)nlen + xlen + clen;
    if (*rec > avail)
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "central directory entry %zu runs past the end of the "
                         "central directory",
                         index);
    if (nlen == 0)
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "central directory entry %zu has an empty name", index);
    if (memchr(h + 46, 0, nlen))
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "central directory entry %zu has a NUL byte in its name", index);
    e->name = malloc(nlen + 1);
    if (!e->name) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    memcpy(e->name, h + 46, nlen);
    e->name[nlen] = '\0';

    if (e->csize == 0xFFFFFFFFu || e->usize == 0xFFFFFFFFu ||
        e->header_offset == 0xFFFFFFFFu || disk == 0xFFFFu)
        return lego_fail(err, LEGO_ERR_UNSUPPORTED, "entry '%s' uses ZIP64 (not supported)",
                         e->name);
    if ((st = zip_check_extra(h + 46 + nlen, xlen, e->name, err)) != LEGO_OK) return st;
    if (e->flags & ZIP_ENCRYPTION_FLAGS)
        return lego_fail(err, LEGO_ERR_UNSUPPORTED, "entry '%s' is encrypted (not supported)",
                         e->name);
    if (disk != 0)
        return lego_fail(err, LEGO_ERR_UNSUPPORTED,
                         "entry '%s' is on disk %u: multi-disk archives are not "
                         "supported",
                         e->name, (unsigned)disk);
    if (e->header_offset + 30 + nlen > z->cd_offset)
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "entry '%s': local header offset %llu lies outside the "
                         "entry area (the central directory starts at %llu)",
                         e->name, (unsigned long long)e->header_offset,
                         (unsigned long long)z->cd_offset);
    if (e->method == 0 && e->csize != e->usize)
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "stored entry '%s' has compressed size %lu but size %lu",
                         e->name, (unsigned long)e->csize, (unsigned long)e->usize);
    return LEGO_OK;
}

lego_status ds_zip_open(const char *path, uint64_t max_bytes, ds_zip **out,
                        lego_err *err) {
    struct stat sb;
    uint8_t end[22] = {0};
    uint64_t end_pos = 0;
    uint32_t n_disk, n_total, cd_size, cd_off;
    uint8_t *cd = NULL;
    size_t pos = 0;
    lego_status st;
    ds_zip *z;

    *out = NULL;
    z = calloc(1, sizeof *z);
    if (!z) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    z->path = strdup(path);
    if (!z->path) {
        ds_zip_close(z);
        return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    }
    z->f = fopen(path, "rb");
    if (!z->f) {
        st = lego_fail(err, LEGO_ERR_IO, "cannot open: %s", strerror(errno));
        goto fail;
    }
    if (fstat(fileno(z->f), &sb) != 0 || !S_ISREG(sb.st_mode)) {
        st = lego_fail(err, LEGO_ERR_IO, "not a regular file");
        goto fail;
    }
    z->file_size = (uint64_t)sb.st_size;
    if ((st = zip_find_end(z, end, &end_pos, err)) != LEGO_OK) goto fail;

    /* A ZIP64 end record locator sits just before the end record. */
    if (end_pos >= 20) {
        uint8_t loc[4];
        if ((st = zip_read_at(z, end_pos - 20, loc, 4, err)) != LEGO_OK) goto fail;
        if (rd32(loc) == ZIP_SIG_END64_LOCATOR) {
            st = lego_fail(err, LEGO_ERR_UNSUPPORTED, "ZIP64 archives are not supported");
            goto fail;
        }
    }
    n_disk = rd16(end + 8);
    n_total = rd16(end + 10);
    cd_size = rd32(end + 12);
    cd_off = rd32(end + 16);
    if (n_disk == 0xFFFFu || n_total == 0xFFFFu || cd_size == 0xFFFFFFFFu ||
        cd_off == 0xFFFFFFFFu) {
        st = lego_fail(err, LEGO_ERR_UNSUPPORTED, "ZIP64 archives are not supported");
        goto fail;
    }
    if (rd16(end + 4) != 0 || rd16(end + 6) != 0 || n_disk != n_total) {
        st = lego_fail(err, LEGO_ERR_UNSUPPORTED, "multi-disk archives are not supported");
        goto fail;
    }
    if ((uint64_t)cd_off + cd_size != end_pos) {
        st = lego_fail(err, LEGO_ERR_FORMAT,
                       "the central directory (offset %lu, %lu bytes) does not end "
                       "where the end record starts (offset %llu): truncated or "
                       "inconsistent archive",
                       (unsigned long)cd_off, (unsigned long)cd_size,
                       (unsigned long long)end_pos);
        goto fail;
    }
    if (cd_size > max_bytes) {
        st = lego_fail(err, LEGO_ERR_OUT_OF_MEMORY,
                       "the central directory has %lu bytes, more than the limit "
                       "(lego_dataset_options.max_bytes)",
                       (unsigned long)cd_size);
        goto fail;
    }
    if (n_total > cd_size / 46) {
        st = lego_fail(err, LEGO_ERR_FORMAT,
                       "the end record claims %lu entries, more than a central "
                       "directory of %lu bytes can hold",
                       (unsigned long)n_total, (unsigned long)cd_size);
        goto fail;
    }
    z->cd_offset = cd_off;
    cd = malloc(cd_size ? cd_size : 1);
    z->entries = calloc(n_total ? n_total : 1, sizeof *z->entries);
    if (!cd || !z->entries) {
        st = lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
        goto fail;
    }
    if ((st = zip_read_at(z, cd_off, cd, cd_size, err)) != LEGO_OK) goto fail;
    for (size_t i = 0; i < n_total; i++) {
        size_t rec = 0;
        z->count = i + 1; /* so that a half-parsed name is freed */
        st = zip_parse_central(z, cd + pos, cd_size - pos, i, &z->entries[i], &rec, err);
        if (st != LEGO_OK) goto fail;
        pos += rec;
    }
    if (pos != cd_size) {
        st = lego_fail(err, LEGO_ERR_FORMAT,
                       "the central directory has %zu bytes after its %lu entries",
                       cd_size - pos, (unsigned long)n_total);
        goto fail;
    }
    free(cd);
    *out = z;
    return LEGO_OK;

fail:
    free(cd);
    ds_zip_close(z);
    return st;
}

/* Do a data descriptor's CRC and sizes match the central directory? */
static int descriptor_matches(const uint8_t *d, const ds_zip_entry *e) {
    return rd32(d) == e->crc && rd32(d + 4) == e->csize && rd32(d + 8) == e->usize;
}

lego_status ds_zip_locate(ds_zip *z, ds_zip_entry *e, lego_err *err) {
    uint8_t h[30];
    uint32_t flags, method, nlen, xlen, crc, csize, usize;
    uint64_t data_end;
    uint8_t *var;
    size_t name_len = strlen(e->name);
    lego_status st;

    if ((st = zip_read_at(z, e->header_offset, h, sizeof h, err)) != LEGO_OK) {
        lego_err_prefix(err, "entry '%s'", e->name);
        return st;
    }
    if (rd32(h) != ZIP_SIG_LOCAL)
        return lego_fail(err, LEGO_ERR_FORMAT, "entry '%s': no local header at offset %llu",
                         e->name, (unsigned long long)e->header_offset);
    flags = rd16(h + 6);
    method = rd16(h + 8);
    crc = rd32(h + 14);
    csize = rd32(h + 18);
    usize = rd32(h + 22);
    nlen = rd16(h + 26);
    xlen = rd16(h + 28);
    if (flags & ZIP_ENCRYPTION_FLAGS)
        return lego_fail(err, LEGO_ERR_UNSUPPORTED, "entry '%s' is encrypted (not supported)",
                         e->name);
    if (method != e->method)
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "entry '%s': the local header says compression method %lu, "
                         "the central directory %u",
                         e->name, (unsigned long)method, (unsigned)e->method);
    if ((flags ^ e->flags) & ZIP_FLAG_DESCRIPTOR)
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "entry '%s': the local header and the central directory "
                         "disagree on the data descriptor flag",
                         e->name);
    if (nlen != name_len)
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "entry '%s': the local header has a different name", e->name);
    e->data_offset = e->header_offset + 30 + nlen + xlen;
    if (e->data_offset > z->cd_offset)
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "entry '%s': the local header runs into the central directory",
                         e->name);
    var = malloc((size_t)nlen + xlen + 1);
    if (!var) return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    st = zip_read_at(z, e->header_offset + 30, var, (size_t)nlen + xlen, err);
    if (st == LEGO_OK && memcmp(var, e->name, nlen) != 0)
        st = lego_fail(err, LEGO_ERR_FORMAT,
                       "entry '%s': the local header has a different name", e->name);
    if (st == LEGO_OK) st = zip_check_extra(var + nlen, xlen, e->name, err);
    free(var);
    if (st != LEGO_OK) return st;

    if (!(flags & ZIP_FLAG_DESCRIPTOR)) {
        if (crc != e->crc || csize != e->csize || usize != e->usize)
            return lego_fail(err, LEGO_ERR_FORMAT,
                             "entry '%s': the local header (CRC %08lx, %lu -> %lu "
                             "bytes) disagrees with the central directory (CRC "
                             "%08lx, %lu -> %lu bytes)",
                             e->name, (unsigned long)crc, (unsigned long)csize,
                             (unsigned long)usize, (unsigned long)e->crc,
                             (unsigned long)e->csize, (unsigned long)e->usize);
    } else if ((crc && crc != e->crc) || (csize && csize != e->csize) ||
               (usize && usize != e->usize)) {
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "entry '%s': the local header disagrees with the central "
                         "directory on CRC or sizes",
                         e->name);
    }

    data_end = e->data_offset + e->csize;
    if (data_end > z->cd_offset)
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "entry '%s': its %lu bytes of data at offset %llu run past "
                         "the entry area (the central directory starts at %llu)",
                         e->name, (unsigned long)e->csize,
                         (unsigned long long)e->data_offset,
                         (unsigned long long)z->cd_offset);
    e->span_end = data_end;
    if (flags & ZIP_FLAG_DESCRIPTOR) {
        uint8_t d[16];
        uint64_t avail = z->cd_offset - data_end;
        size_t n = avail < 16 ? (size_t)avail : 16;
        if (n < 12)
            return lego_fail(err, LEGO_ERR_FORMAT, "entry '%s': the data descriptor is missing",
                             e->name);
        if ((st = zip_read_at(z, data_end, d, n, err)) != LEGO_OK) return st;
        if (n == 16 && rd32(d) == ZIP_SIG_DESCRIPTOR && descriptor_matches(d + 4, e))
            e->span_end = data_end + 16;
        else if (descriptor_matches(d, e))
            e->span_end = data_end + 12;
        else
            return lego_fail(err, LEGO_ERR_FORMAT,
                             "entry '%s': the data descriptor disagrees with the "
                             "central directory",
                             e->name);
    }
    e->located = 1;
    return LEGO_OK;
}

static int cmp_entry_offset(const void *a, const void *b) {
    const ds_zip_entry *x = *(ds_zip_entry *const *)a, *y = *(ds_zip_entry *const *)b;
    return x->header_offset < y->header_offset ? -1 : x->header_offset > y->header_offset;
}

lego_status ds_zip_check_overlap(ds_zip *z, ds_zip_entry *const *e, size_t n,
                                 lego_err *err) {
    ds_zip_entry **v;
    size_t bytes;
    lego_status st = LEGO_OK;
    (void)z;
    if (n < 2) return LEGO_OK;
    if (!size_mul(n, sizeof *v, &bytes) || !(v = malloc(bytes)))
        return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory");
    memcpy(v, e, bytes);
    qsort(v, n, sizeof *v, cmp_entry_offset);
    for (size_t i = 0; i + 1 < n; i++)
        if (v[i]->span_end > v[i + 1]->header_offset) {
            st = lego_fail(err, LEGO_ERR_FORMAT,
                           "entries '%s' and '%s' overlap in the archive", v[i]->name,
                           v[i + 1]->name);
            break;
        }
    free(v);
    return st;
}

lego_status ds_zip_read(ds_zip *z, const ds_zip_entry *e, size_t limit,
                        uint8_t **buf, size_t *cap, lego_err *err) {
    uint32_t crc;
    lego_status st;

    if (!e->located)
        return lego_fail(err, LEGO_ERR_STATE, "entry '%s' was not located", e->name);
    if (e->method != 0 && e->method != 8)
        return lego_fail(err, LEGO_ERR_UNSUPPORTED,
                         "entry '%s' uses compression method %u; only stored (0) and "
                         "deflate (8) are supported",
                         e->name, (unsigned)e->method);
    if (e->usize > limit)
        return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY,
                         "entry '%s' has %lu bytes, more than the limit of %zu "
                         "(lego_dataset_options.max_bytes)",
                         e->name, (unsigned long)e->usize, limit);
    if (e->method == 8 && (uint64_t)e->usize > (uint64_t)e->csize * DS_MAX_RATIO + 1024)
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "entry '%s' claims %lu bytes from %lu compressed bytes, more "
                         "than deflate can produce",
                         e->name, (unsigned long)e->usize, (unsigned long)e->csize);
    /* One spare byte shows an entry that inflates to more than it says. */
    st = ds_reserve(buf, cap, (size_t)e->usize + 1, (size_t)e->usize + 1, err);
    if (st != LEGO_OK) return st;
    if (fseeko(z->f, (off_t)e->data_offset, SEEK_SET) != 0)
        return lego_fail(err, LEGO_ERR_IO, "cannot seek in %s: %s", z->path, strerror(errno));

    if (e->method == 0) {
        if (e->usize && fread(*buf, 1, e->usize, z->f) != e->usize)
            return lego_fail(err, LEGO_ERR_IO, "entry '%s': error reading %s", e->name,
                             z->path);
    } else {
        uint8_t in[65536];
        uint32_t remaining = e->csize;
        z_stream zs;
        int ret = Z_OK;
        memset(&zs, 0, sizeof zs);
        if (inflateInit2(&zs, -MAX_WBITS) != Z_OK)
            return lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "cannot start zlib inflate");
        zs.next_out = *buf;
        zs.avail_out = (uInt)e->usize + 1;
        st = LEGO_OK;
        while (ret != Z_STREAM_END) {
            if (zs.avail_in == 0) {
                size_t n = remaining < sizeof in ? remaining : sizeof in;
                if (n == 0) {
                    st = lego_fail(err, LEGO_ERR_FORMAT,
                                   "entry '%s': the compressed data ends early "
                                   "(truncated, or the sizes are wrong)",
                                   e->name);
                    break;
                }
                if (fread(in, 1, n, z->f) != n) {
                    st = lego_fail(err, LEGO_ERR_IO, "entry '%s': error reading %s",
                                   e->name, z->path);
                    break;
                }
                zs.next_in = in;
                zs.avail_in = (uInt)n;
                remaining -= (uint32_t)n;
            }
            ret = inflate(&zs, Z_NO_FLUSH);
            if (ret == Z_MEM_ERROR) {
                st = lego_fail(err, LEGO_ERR_OUT_OF_MEMORY, "out of memory in zlib");
                break;
            }
            if (ret != Z_OK && ret != Z_STREAM_END && ret != Z_BUF_ERROR) {
                st = lego_fail(err, LEGO_ERR_FORMAT, "entry '%s': corrupt deflate data (%s)",
                               e->name, zs.msg ? zs.msg : "unknown error");
                break;
            }
            if (zs.avail_out == 0) {
                st = lego_fail(err, LEGO_ERR_FORMAT,
                               "entry '%s' decompresses to more than its recorded "
                               "%lu bytes",
                               e->name, (unsigned long)e->usize);
                break;
            }
        }
        if (st == LEGO_OK && zs.total_out != e->usize)
            st = lego_fail(err, LEGO_ERR_FORMAT,
                           "entry '%s' decompresses to %lu bytes, not its recorded %lu",
                           e->name, (unsigned long)zs.total_out, (unsigned long)e->usize);
        if (st == LEGO_OK && (zs.avail_in != 0 || remaining != 0))
            st = lego_fail(err, LEGO_ERR_FORMAT,
                           "entry '%s' has data after the end of its deflate stream",
                           e->name);
        inflateEnd(&zs);
        if (st != LEGO_OK) return st;
    }
    crc = (uint32_t)crc32(0L, Z_NULL, 0);
    {
        /* crc32 counts in uInt: feed it pieces. */
        const uint8_t *p = *buf;
        size_t left = e->usize;
        while (left) {
            uInt piece = left > (1u << 30) ? (1u << 30) : (uInt)left;
            crc = (uint32_t)crc32(crc, p, piece);
            p += piece;
            left -= piece;
        }
    }
    if (crc != e->crc)
        return lego_fail(err, LEGO_ERR_FORMAT,
                         "entry '%s' is corrupt: CRC-32 %08lx, the archive says %08lx",
                         e->name, (unsigned long)crc, (unsigned long)e->crc);
    return LEGO_OK;
}
