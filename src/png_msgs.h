/*
 * png_msgs.h -- where libpng's error and warning callbacks leave their
 * messages, for the PNG reader (dataset.c) and writer (image.c).  Internal.
 */
#ifndef LEGO_PNG_MSGS_H
#define LEGO_PNG_MSGS_H

#include <png.h>

#include "common.h"

typedef struct png_msgs {
    char warning[200];
    char error[200];
} png_msgs;

/* The callbacks for png_create_{read,write}_struct; their error pointer
 * must be a png_msgs.  The error callback longjmps to the setjmp. */
void lego_png_on_error(png_structp png, png_const_charp msg);
/* libpng explains some errors (such as an oversized IHDR) only in a
 * warning just before; keep the last one for the message. */
void lego_png_on_warning(png_structp png, png_const_charp msg);

/* lego_fail with what libpng said: "<what>: error (last warning)". */
lego_status lego_png_fail(lego_err *err, lego_status status, const char *what,
                          const png_msgs *msgs);

#endif /* LEGO_PNG_MSGS_H */
