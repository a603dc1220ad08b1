/*
 * common.h -- what every module of liblego shares: the error record, checked
 * size arithmetic and small helpers.  Internal; not installed.
 */
#ifndef LEGO_COMMON_H
#define LEGO_COMMON_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "lego.h"

/* Where a failing internal call leaves its code and a human message.  Each
 * handle embeds one, so messages never live in global state. */
typedef struct lego_err {
    lego_status status;
    char msg[512];
} lego_err;

/* Record a failure (printf-style message) and return `status`.  `err` may be
 * NULL, in which case only the code is returned. */
lego_status lego_fail(lego_err *err, lego_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Prefix the message already in `err` with more context ("loading x: ..."). */
void lego_err_prefix(lego_err *err, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

static inline void lego_err_clear(lego_err *err) {
    if (err) {
        err->status = LEGO_OK;
        err->msg[0] = '\0';
    }
}

/* Overflow-checked size arithmetic: return 0 and leave *out alone on
 * overflow, 1 on success. */
static inline int size_mul(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return 0;
    *out = a * b;
    return 1;
}

static inline int size_add(size_t a, size_t b, size_t *out) {
    if (b > SIZE_MAX - a) return 0;
    *out = a + b;
    return 1;
}

/* Product of n sizes, 0 on overflow (callers reject 0-sized requests
 * separately, so 0 is never a valid product here). */
size_t size_prod(const size_t *dims, int n);

/* Largest byte count one tensor or buffer may have: a guard against absurd
 * requests long before malloc would see them. */
#define LEGO_MAX_ALLOC ((size_t)1 << 40)

/* The largest batch one call accepts: far above any real use, low enough
 * that n * 2 and n * label_dim stay comfortably inside int and size_t. */
#define LEGO_MAX_BATCH (1 << 20)

/* LEGO_ERR_INVALID_ARGUMENT, with a message in err, unless
 * 1 <= n <= LEGO_MAX_BATCH. */
lego_status lego_check_batch_size(lego_err *err, int n);

/* LEGO_ERR_INVALID_ARGUMENT, with a message naming the first bad one,
 * unless every noise level sigma[0 .. n-1] is finite and positive. */
lego_status lego_check_sigmas(lego_err *err, const float *sigma, int n);

/* Read the caller's option struct safely whatever its version: copy the
 * first min(caller_size, ours) bytes over our defaults. */
void lego_copy_options(void *ours, size_t ours_size, const void *theirs,
                       size_t their_size);

#endif /* LEGO_COMMON_H */
