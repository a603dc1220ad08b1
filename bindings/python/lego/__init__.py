"""Python bindings for liblego, a runtime for LEGO Diffusion (stackable,
skippable diffusion "bricks").  ctypes only; numpy is used when present.

    import lego
    m = lego.Model.load("model.safetensors", threads=2)
    out = m.sample(seeds=range(16), labels=3, steps=18, guidance=1.5, skip="pg:0.5")
    lego.write_png_grid("grid.png", lego.to_uint8(out.images))

    data = lego.Dataset("train-images-idx3-ubyte.gz", resolution=32)
    t = lego.Trainer(m, lr=2e-4, label_dropout=0.1, seed=1)
    images, labels = data.get_batch(range(64))
    print(t.step(images, labels).loss)

The library is found through $LEGO_LIBRARY, then a liblego.so.0 next to
this package, then the system's linker.  Failures raise lego.LegoError
carrying the library's message.
"""

from ._lib import find_library
from .images import to_uint8, write_npz, write_png, write_png_grid
from .model import (Brick, LegoError, Model, Samples, Tensor, backend_available,
                    karras_sigmas, preset_info, presets, version)
from .train import Dataset, Trainer, TrainStats

__all__ = [
    "Brick", "Dataset", "LegoError", "Model", "Samples", "Tensor", "Trainer", "TrainStats",
    "backend_available", "find_library", "karras_sigmas", "preset_info", "presets",
    "to_uint8", "version", "write_npz", "write_png", "write_png_grid",
]
