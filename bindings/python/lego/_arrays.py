"""Arrays with or without numpy.

With numpy, inputs may be anything numpy.asarray takes and outputs are
ndarrays of the documented shape.  Without it, inputs are flat sequences
(lists, array.array, anything iterable) in C order and outputs are flat
array.array objects; the shapes are then the caller's to know.
"""

import array
import ctypes

try:
    import numpy as np
except ImportError:  # numpy is optional
    np = None

_CTYPES = {"f": ctypes.c_float, "d": ctypes.c_double, "i": ctypes.c_int32,
           "q": ctypes.c_int64, "Q": ctypes.c_uint64, "B": ctypes.c_uint8}
_NUMPY = {"f": "float32", "d": "float64", "i": "int32", "q": "int64", "Q": "uint64",
          "B": "uint8"}


def have_numpy():
    return np is not None


class Buffer:
    """Contiguous memory of one C type and its pointer; `value` is what the
    caller gets back (an ndarray, or a flat array.array)."""

    def __init__(self, value, code):
        self.value = value
        self.code = code
        if np is not None and isinstance(value, np.ndarray):
            addr = value.ctypes.data
            self.count = value.size
        else:
            addr, self.count = value.buffer_info()
        self.ptr = ctypes.cast(ctypes.c_void_p(addr), ctypes.POINTER(_CTYPES[code]))


def empty(code, shape):
    """A zeroed output buffer of the given shape."""
    count = 1
    for d in shape:
        count *= d
    if np is not None:
        return Buffer(np.zeros(shape, dtype=_NUMPY[code]), code)
    return Buffer(array.array(code, bytes(count * array.array(code).itemsize)), code)


def _typecode_matches(value, code):
    return isinstance(value, array.array) and value.typecode == code


def from_input(value, code, what, shape=None):
    """An input as a C-contiguous buffer (copied only when needed).  Returns
    (Buffer, shape) where shape is the array's shape with numpy, else
    (len,)."""
    if np is not None:
        arr = np.ascontiguousarray(value, dtype=_NUMPY[code])
        if shape is not None:
            if arr.size != _prod(shape):
                raise ValueError("%s: %d values, expected %s = %d"
                                 % (what, arr.size, "x".join(map(str, shape)), _prod(shape)))
            arr = arr.reshape(shape)
        return Buffer(arr, code), arr.shape
    if _typecode_matches(value, code):
        arr = value
    else:
        try:
            arr = array.array(code, _flatten(value))
        except TypeError as e:
            raise TypeError("%s: expected a flat sequence of numbers (numpy is not "
                            "installed): %s" % (what, e)) from None
    if shape is not None and len(arr) != _prod(shape):
        raise ValueError("%s: %d values, expected %s = %d"
                         % (what, len(arr), "x".join(map(str, shape)), _prod(shape)))
    return Buffer(arr, code), tuple(shape) if shape is not None else (len(arr),)


def _prod(shape):
    p = 1
    for d in shape:
        p *= d
    return p


def _flatten(value):
    for v in value:
        if isinstance(v, (list, tuple)):
            yield from _flatten(v)
        else:
            yield v
