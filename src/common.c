/* common.c -- error records and checked arithmetic shared by all modules. */
#define _POSIX_C_SOURCE 200809L
#include "common.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

lego_status lego_fail(lego_err *err, lego_status status, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->status = status;
    }
    return status;
}

void lego_err_prefix(lego_err *err, const char *fmt, ...) {
    char prefix[128];
    char old[sizeof err->msg];
    va_list ap;
    if (!err) return;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, err->msg, sizeof old);
    /* Truncation is acceptable: the message is for people. */
    size_t n = strlen(prefix);
    memcpy(err->msg, prefix, n);
    memcpy(err->msg + n, ": ", 2);
    size_t room = sizeof err->msg - n - 3;
    size_t len = strnlen(old, room);
    memcpy(err->msg + n + 2, old, len);
    err->msg[n + 2 + len] = '\0';
}

size_t size_prod(const size_t *dims, int n) {
    size_t p = 1;
    for (int i = 0; i < n; i++)
        if (!size_mul(p, dims[i], &p)) return 0;
    return p;
}

lego_status lego_check_batch_size(lego_err *err, int n) {
    if (n < 1 || n > LEGO_MAX_BATCH)
        return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT, "batch size %d is out of range [1, %d]",
                         n, LEGO_MAX_BATCH);
    return LEGO_OK;
}

lego_status lego_check_sigmas(lego_err *err, const float *sigma, int n) {
    for (int i = 0; i < n; i++)
        if (!(sigma[i] > 0) || !isfinite(sigma[i]))
            return lego_fail(err, LEGO_ERR_INVALID_ARGUMENT,
                             "sigma[%d] = %g: noise levels must be finite and positive", i,
                             (double)sigma[i]);
    return LEGO_OK;
}

void lego_copy_options(void *ours, size_t ours_size, const void *theirs,
                       size_t their_size) {
    /* The leading size field is the caller's; everything after it is copied
     * up to the smaller of the two struct versions. */
    size_t n = their_size < ours_size ? their_size : ours_size;
    if (n > sizeof(size_t))
        memcpy((char *)ours + sizeof(size_t), (const char *)theirs + sizeof(size_t),
               n - sizeof(size_t));
}
