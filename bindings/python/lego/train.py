"""lego.Dataset and lego.Trainer: training data and the optimiser over a
Model (lego_dataset_*, lego_trainer_* of include/lego.h)."""

import ctypes
from collections import namedtuple

from . import _arrays
from . import _lib
from .model import Model, _choice, _encode, _Handle, _image_batch

TrainStats = namedtuple("TrainStats", "step images_seen loss grad_norm lr ema_beta skipped "
                                      "skipped_total")


def _stats(st):
    return TrainStats(st.step, st.images_seen, st.loss, st.grad_norm, st.lr, st.ema_beta,
                      bool(st.skipped), st.skipped_total)


class Dataset(_Handle):
    """Training images decoded once into memory: a Fashion-MNIST style idx
    file (plain or .gz, labels found beside it or given), a folder of PNGs
    or an EDM-style zip (labels from dataset.json).  Images come out as
    float32 C x H x W in [-1, 1], padded to `resolution` when given."""

    _free, _error, _what = "lego_dataset_free", "lego_dataset_error", "dataset"

    def __init__(self, path, resolution=0, pad_value=-1.0, max_images=0, max_bytes=None,
                 labels_path=None):
        o = _lib.new(_lib.DatasetOptions)
        o.resolution, o.pad_value, o.max_images = resolution, pad_value, max_images
        if max_bytes is not None:
            o.max_bytes = max_bytes
        o.labels_path = _encode(labels_path) if labels_path is not None else None
        h = ctypes.c_void_p()
        super().__init__(_lib.lib().lego_dataset_open(_encode(path), ctypes.byref(o),
                                                      ctypes.byref(h)), h)

    def __len__(self):
        return _lib.lib().lego_dataset_count(self._handle())

    @property
    def shape(self):
        """(channels, height, width) of one image."""
        c, h, w = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        self._check(_lib.lib().lego_dataset_shape(self._handle(), ctypes.byref(c),
                                                  ctypes.byref(h), ctypes.byref(w)))
        return c.value, h.value, w.value

    @property
    def label_dim(self):
        """Number of classes (largest label + 1); 0 when unlabelled."""
        return _lib.lib().lego_dataset_label_dim(self._handle())

    def get(self, index):
        """(image C x H x W, label); the label is -1 when unlabelled."""
        out = _arrays.empty("f", self.shape)
        label = ctypes.c_int32()
        self._check(_lib.lib().lego_dataset_get(self._handle(), index, out.ptr,
                                                ctypes.byref(label)))
        return out.value, label.value

    def get_batch(self, indices):
        """(images n x C x H x W, labels n) for these indices."""
        ib, _ = _arrays.from_input(indices, "q", "indices")
        out = _arrays.empty("f", (ib.count,) + self.shape)
        labels = _arrays.empty("i", (ib.count,))
        self._check(_lib.lib().lego_dataset_get_batch(self._handle(), ib.ptr, ib.count, out.ptr,
                                                      labels.ptr))
        return out.value, labels.value


class Trainer(_Handle):
    """Trains a Model in place: the EDM/LEGO loss, Adam or AdamW with
    warm-up and clipping, an EMA of the weights, label dropout and flips,
    all drawn from the seed and the step number so a run resumes exactly
    (save_state / load_state).  The model must keep its bricks while the
    trainer lives; Model.close() closes the trainer first.  Options (see
    lego_train_options in lego.h): optimizer ("adamw", "adam"), lr, beta1,
    beta2, eps, weight_decay, warmup_steps, grad_clip, ema_halflife_kimg,
    ema_rampup_ratio, p_mean, p_std, label_dropout, hflip, height, width,
    seed, patch_fraction."""

    _free, _error, _what = "lego_trainer_free", "lego_trainer_error", "trainer"

    def __init__(self, model, **options):
        if not isinstance(model, Model):
            raise TypeError("Trainer needs a lego.Model")
        o = _lib.new(_lib.TrainOptions)
        for key, value in options.items():
            if key == "size" or key not in dict(o._fields_):
                raise TypeError("Trainer: unknown option %r" % key)
            if key == "optimizer":
                value = _choice(_lib.OPTIMIZERS, value, "optimizer")
            setattr(o, key, value)
        h = ctypes.c_void_p()
        super().__init__(_lib.lib().lego_trainer_create(model._handle(), ctypes.byref(o),
                                                        ctypes.byref(h)), h)
        self.model = model
        res = model.config["img_resolution"]
        self.image_shape = (model.config["img_channels"], o.height or res, o.width or res)
        model._trainers.add(self)

    def step(self, images, labels=None):
        """One optimiser step on n images (n x C x H x W at the trainer's
        size, or flat in that order) with n class labels (-1 = null; None =
        all null).  Returns a TrainStats; a non-finite gradient skips the
        update (stats.skipped)."""
        ib, n, _, _ = _image_batch(images, "images", *self.image_shape, exact=True)
        lb = None
        if labels is not None:
            lb, _ = _arrays.from_input(labels, "i", "labels", (n,))
        st = _lib.new(_lib.TrainStats)
        self._check(_lib.lib().lego_trainer_step(self._handle(), ib.ptr, lb.ptr if lb else None,
                                                 n, ctypes.byref(st)))
        return _stats(st)

    @property
    def stats(self):
        """Where the trainer stands (a TrainStats): the step and image
        counters, and the last step's loss, grad_norm, lr and ema_beta (0
        before this trainer's first step and after load_state)."""
        st = _lib.new(_lib.TrainStats)
        self._check(_lib.lib().lego_trainer_get_stats(self._handle(), ctypes.byref(st)))
        return _stats(st)

    def save_state(self, path):
        """Everything needed to resume bit-exactly, as safetensors."""
        self._check(_lib.lib().lego_trainer_save_state(self._handle(), _encode(path)))

    def load_state(self, path):
        """Resume from save_state's file (same architecture, same options);
        nothing changes when it fails."""
        self._check(_lib.lib().lego_trainer_load_state(self._handle(), _encode(path)))

    def export_ema(self, path):
        """The EMA weights as a checkpoint Model.load reads."""
        self._check(_lib.lib().lego_trainer_export_ema(self._handle(), _encode(path)))
