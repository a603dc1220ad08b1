"""Image output: liblego's uint8 conversion, PNG, PNG grids and .npz.

With numpy, `images` are n x C x H x W float arrays and uint8 images are
n x H x W x C (one image H x W x C, or H x W for grey).  Without numpy,
everything is flat and the shape is passed as `shape`.
"""

import ctypes

from . import _arrays
from . import _lib
from .model import LegoError, _encode


def _fail(status, msg):
    raise LegoError(status, msg.value.decode(errors="replace"))


def to_uint8(images, shape=None):
    """Float images (n x C x H x W, nominally [-1, 1]) to uint8 n x H x W x C
    exactly as the reference does (x*127.5+128, clipped, truncated)."""
    buf, got = _arrays.from_input(images, "f", "images", shape)
    if len(got) == 3:  # one image
        got = (1,) + tuple(got)
    if len(got) != 4:
        raise ValueError("images must be n x C x H x W (or pass shape=(n, C, H, W))")
    n, c, h, w = got
    out = _arrays.empty("B", (n, h, w, c))
    status = _lib.lib().lego_images_to_u8(buf.ptr, n, c, h, w, out.ptr)
    if status != _lib.OK:
        raise LegoError(status, "to_uint8: cannot convert %d x %d x %d x %d images (channels "
                        "must be 1, 3 or 4)" % (n, c, h, w))
    return out.value


def _u8(pixels, shape, rank, what):
    buf, got = _arrays.from_input(pixels, "B", what, shape)
    got = tuple(got)
    if len(got) == rank - 1:  # grey without a channel axis
        got = got + (1,)
    if len(got) != rank:
        raise ValueError("%s: expected %d dimensions (or pass shape=)" % (what, rank))
    return buf, got


def write_png(path, pixels, shape=None):
    """One image, H x W x C uint8 (C = 1, 3 or 4; H x W for grey)."""
    buf, (h, w, c) = _u8(pixels, shape, 3, "pixels")
    msg = ctypes.create_string_buffer(512)
    status = _lib.lib().lego_write_png(_encode(path), buf.ptr, h, w, c, msg, len(msg))
    if status != _lib.OK:
        _fail(status, msg)


def write_png_grid(path, images, columns=0, padding=2, shape=None):
    """n images (n x H x W x C uint8) tiled in a grid; columns 0 = about
    square."""
    buf, (n, h, w, c) = _u8(images, shape, 4, "images")
    msg = ctypes.create_string_buffer(512)
    status = _lib.lib().lego_write_png_grid(_encode(path), buf.ptr, n, h, w, c, columns,
                                            padding, msg, len(msg))
    if status != _lib.OK:
        _fail(status, msg)


def write_npz(path, images, labels=None, shape=None):
    """An ADM-style .npz: arr_0 = the n x H x W x C uint8 images, and
    "labels" (int64) when labels are given."""
    buf, (n, h, w, c) = _u8(images, shape, 4, "images")
    lptr = None
    if labels is not None:
        lb, _ = _arrays.from_input(labels, "i", "labels", (n,))
        lptr = lb.ptr
    msg = ctypes.create_string_buffer(512)
    status = _lib.lib().lego_write_npz(_encode(path), buf.ptr, n, h, w, c, lptr, msg, len(msg))
    if status != _lib.OK:
        _fail(status, msg)
