"""lego.Model: a liblego model handle and what can be done with it."""

import ctypes
import weakref
from collections import namedtuple

from . import _arrays
from . import _lib
from ._lib import P

Brick = namedtuple("Brick", "brick_size patch_size depth")
Tensor = namedtuple("Tensor", "name shape offset numel trainable")


class LegoError(Exception):
    """A liblego call failed.  `status` is the lego_status code, `status_name`
    its name (LEGO_ERR_SHAPE, ...), and the message is the library's
    (lego_model_error or the like)."""

    def __init__(self, status, message):
        self.status = status
        self.status_name = _lib.STATUS_NAMES.get(status, "LEGO_ERR_%d" % status)
        self.message = message
        super().__init__("%s (%s)" % (message, self.status_name) if message else self.status_name)


def _encode(path):
    if isinstance(path, bytes):
        return path
    return str(path).encode()


def _choice(table, value, what):
    if isinstance(value, int):
        return value
    try:
        return table[value]
    except KeyError:
        raise ValueError("%s must be one of %s, got %r" % (what, ", ".join(table), value)) from None


def _image_batch(value, what, C, H, W, exact=False):
    """`value` as contiguous float32 for n images of C x H x W: a 4-D array
    gives n and (unless `exact`) H and W; anything else is flat in that
    order.  Returns (Buffer, n, H, W); the library reads n*C*H*W floats,
    so a size that is not a whole batch is refused here."""
    buf, shape = _arrays.from_input(value, "f", what)
    if len(shape) == 4:
        n, C2, H2, W2 = shape
        if C2 != C or (exact and (H2, W2) != (H, W)):
            raise ValueError("%s: %s is not n x %d x %d x %d"
                             % (what, "x".join(map(str, shape)), C, H, W))
        H, W = H2, W2
    else:
        n = buf.count // (C * H * W)
        if n < 1 or n * C * H * W != buf.count:
            raise ValueError("%s: %d values is not n x %d x %d x %d" % (what, buf.count, C, H, W))
    return buf, n, H, W


class _Handle:
    """A liblego handle: freed by close(), at the end of a `with`, or when
    collected.  A failing call raises LegoError with the handle's message.
    Subclasses name their C free and error functions and what they are."""

    _free, _error, _what = "lego_model_free", "lego_model_error", "model"

    def __init__(self, status, handle):
        """Take the handle a constructor made, or raise with the failed
        handle's message (and free it)."""
        self._h = None
        if status != _lib.OK:
            lib = _lib.lib()
            msg = getattr(lib, self._error)(handle).decode(errors="replace")
            getattr(lib, self._free)(handle)
            raise LegoError(status, msg)
        self._h = handle

    def close(self):
        if self._h:
            getattr(_lib.lib(), self._free)(self._h)
            self._h = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _handle(self):
        if not self._h:
            raise LegoError(9, "the %s is closed" % self._what)
        return self._h

    def _check(self, status):
        if status != _lib.OK:
            msg = getattr(_lib.lib(), self._error)(self._h).decode(errors="replace")
            raise LegoError(status, msg)


class Model(_Handle):
    """A LEGO network.  Build one with Model.load, Model.create or
    Model.preset.  Not for two threads at once (the model owns its scratch
    memory); separate models are independent.  close() (or `with`) frees it
    at once; otherwise it is freed when collected."""

    def __init__(self, status, handle):
        self._trainers = weakref.WeakSet()  # closed before the model is
        super().__init__(status, handle)

    # ---- construction ---------------------------------------------------

    @classmethod
    def load(cls, path, config_json=None, threads=0, backend="cpu", device=0, precision="fp32"):
        """Read a safetensors checkpoint.  `config_json` gives the
        architecture for a plain state dict (lego.config JSON form);
        `precision` (fp32, bf16, fp16) is the arithmetic on a GPU."""
        lib = _lib.lib()
        o = _lib.new(_lib.LoadOptions)
        o.config_json = config_json.encode() if isinstance(config_json, str) else config_json
        o.num_threads = threads
        o.backend = _choice(_lib.BACKENDS, backend, "backend")
        o.device = device
        o.precision = _choice(_lib.PRECISIONS, precision, "precision")
        h = ctypes.c_void_p()
        return cls(lib.lego_model_load(_encode(path), ctypes.byref(o), ctypes.byref(h)), h)

    @classmethod
    def create(cls, bricks, img_channels=3, img_resolution=32, label_dim=0, hidden_size=384,
               num_heads=6, mlp_ratio=4.0, frequency_embedding_size=256, sigma_data=0.5,
               threads=0, backend="cpu", device=0, precision="fp32"):
        """An architecture of your own: `bricks` is a list of (brick_size,
        patch_size, depth), bottom brick first.  Weights are zero until
        init_weights() or load_weights()."""
        lib = _lib.lib()
        c = _lib.new(_lib.ModelConfig)
        c.img_channels, c.img_resolution, c.label_dim = img_channels, img_resolution, label_dim
        c.hidden_size, c.num_heads, c.mlp_ratio = hidden_size, num_heads, mlp_ratio
        c.frequency_embedding_size, c.sigma_data = frequency_embedding_size, sigma_data
        c.num_threads, c.device = threads, device
        c.backend = _choice(_lib.BACKENDS, backend, "backend")
        c.precision = _choice(_lib.PRECISIONS, precision, "precision")
        h = ctypes.c_void_p()
        model = cls(lib.lego_model_create(ctypes.byref(c), ctypes.byref(h)), h)
        for b in bricks:
            bc = _lib.new(_lib.BrickConfig)
            bc.brick_size, bc.patch_size, bc.depth = b
            model._check(lib.lego_brick_add(model._h, ctypes.byref(bc)))
        return model

    @classmethod
    def preset(cls, name, img_channels=0, img_resolution=0, label_dim=-1, threads=0,
               backend="cpu", device=0, precision="fp32"):
        """A reference architecture by name (lego.presets()); 0 / -1 keep the
        preset's channels, resolution and classes.  Weights are zero."""
        lib = _lib.lib()
        o = _preset_options(img_channels, img_resolution, label_dim, threads, backend, device)
        o.precision = _choice(_lib.PRECISIONS, precision, "precision")
        h = ctypes.c_void_p()
        return cls(lib.lego_model_create_preset(_encode(name), ctypes.byref(o), ctypes.byref(h)),
                   h)

    def close(self):
        """Free the model now, and first any Trainer that borrows it."""
        for t in list(self._trainers):
            t.close()
        super().close()

    # ---- weights ----------------------------------------------------------

    def init_weights(self, seed=0):
        self._check(_lib.lib().lego_model_init_weights(self._handle(), seed))

    def load_weights(self, path):
        self._check(_lib.lib().lego_model_load_weights(self._handle(), _encode(path)))

    def save(self, path):
        self._check(_lib.lib().lego_model_save(self._handle(), _encode(path)))

    def tensors(self):
        """Every parameter tensor (reference key name, shape, place in the
        flat parameter array), in checkpoint order."""
        lib = _lib.lib()
        out = []
        for i in range(lib.lego_model_num_tensors(self._handle())):
            t = _lib.new(_lib.TensorInfo)
            self._check(lib.lego_model_tensor_info(self._h, i, ctypes.byref(t)))
            out.append(Tensor(t.name.decode(), tuple(t.shape[:t.rank]), t.offset, t.numel,
                              bool(t.trainable)))
        return out

    def get_params(self):
        """The flat float32 parameter array (num_params values)."""
        buf = _arrays.empty("f", (self.num_params,))
        self._check(_lib.lib().lego_model_get_params(self._handle(), buf.ptr, buf.count))
        return buf.value

    def set_params(self, params):
        buf, _ = _arrays.from_input(params, "f", "params", (self.num_params,))
        self._check(_lib.lib().lego_model_set_params(self._handle(), buf.ptr, buf.count))

    # ---- information ------------------------------------------------------

    @property
    def config(self):
        """The global settings as a dict (the lego.config keys, plus
        num_threads, backend, device, precision)."""
        c = _lib.new(_lib.ModelConfig)
        self._check(_lib.lib().lego_model_get_config(self._handle(), ctypes.byref(c)))
        backends = {v: k for k, v in _lib.BACKENDS.items()}
        precisions = {v: k for k, v in _lib.PRECISIONS.items()}
        return {
            "img_channels": c.img_channels, "img_resolution": c.img_resolution,
            "label_dim": c.label_dim, "hidden_size": c.hidden_size, "num_heads": c.num_heads,
            "mlp_ratio": c.mlp_ratio, "frequency_embedding_size": c.frequency_embedding_size,
            "sigma_data": c.sigma_data, "num_threads": c.num_threads,
            "backend": backends.get(c.backend, c.backend), "device": c.device,
            "precision": precisions.get(c.precision, c.precision),
        }

    @property
    def bricks(self):
        lib = _lib.lib()
        out = []
        for k in range(lib.lego_model_num_bricks(self._handle())):
            b = _lib.new(_lib.BrickConfig)
            self._check(lib.lego_model_get_brick(self._h, k, ctypes.byref(b)))
            out.append(Brick(b.brick_size, b.patch_size, b.depth))
        return out

    @property
    def num_params(self):
        return _lib.lib().lego_model_num_params(self._handle())

    @property
    def resolution_multiple(self):
        return _lib.lib().lego_model_resolution_multiple(self._handle())

    def check_resolution(self, height, width):
        self._check(_lib.lib().lego_model_check_resolution(self._handle(), height, width))

    def info(self):
        """Everything at once, for printing."""
        d = self.config
        d["bricks"] = [tuple(b) for b in self.bricks]
        d["num_params"] = self.num_params
        d["resolution_multiple"] = self.resolution_multiple
        return d

    @property
    def memory_usage(self):
        """Host bytes the model holds now."""
        return _lib.lib().lego_model_memory_usage(self._handle())

    def set_memory_budget(self, nbytes):
        """Cap the host bytes the model may hold (0: no limit); a request
        that would need more fails with LEGO_ERR_OUT_OF_MEMORY."""
        self._check(_lib.lib().lego_model_set_memory_budget(self._handle(), nbytes))

    @property
    def device_memory_usage(self):
        """GPU bytes the model holds now (0 on the CPU)."""
        return _lib.lib().lego_model_device_memory_usage(self._handle())

    def set_device_memory_budget(self, nbytes):
        """Cap the GPU bytes the model may hold (0: no limit)."""
        self._check(_lib.lib().lego_model_set_device_memory_budget(self._handle(), nbytes))

    def set_threads(self, threads):
        self._check(_lib.lib().lego_model_set_threads(self._handle(), threads))

    def set_backend(self, backend, device=0):
        self._check(_lib.lib().lego_model_set_backend(
            self._handle(), _choice(_lib.BACKENDS, backend, "backend"), device))

    def set_precision(self, precision):
        """The arithmetic on a GPU: fp32, bf16 or fp16 (the CPU computes in
        fp32 whatever this says)."""
        self._check(_lib.lib().lego_model_set_precision(
            self._handle(), _choice(_lib.PRECISIONS, precision, "precision")))

    # ---- the denoiser -----------------------------------------------------

    def _size(self, height, width):
        c = self.config
        h = height or c["img_resolution"]
        w = width or c["img_resolution"]
        return c["img_channels"], h, w

    def denoise(self, x, sigma, labels=None, guidance=1.0, num_bricks=0, skip_mask=0,
                brick_outputs=False, height=None, width=None):
        """D(x; sigma) for n images x (n x C x H x W; with numpy H and W come
        from x's shape, without it from height/width or the model's
        resolution).  `sigma` is one level for all or n levels; `labels` n
        class indices (-1 = null label) or None.  With brick_outputs=True
        returns (D, F) where F holds every brick's raw output,
        K x n x C x H x W (bricks not run are zero)."""
        lib = _lib.lib()
        C, H, W = self._size(height, width)
        xb, n, H, W = _image_batch(x, "x", C, H, W)
        sigmas = [float(sigma)] * n if isinstance(sigma, (int, float)) else sigma
        sb, _ = _arrays.from_input(sigmas, "f", "sigma", (n,))
        r = _lib.new(_lib.DenoiseRequest)
        r.n, r.height, r.width = n, H, W
        r.x, r.sigma = xb.ptr, sb.ptr
        lb = None
        if labels is not None:
            lb, _ = _arrays.from_input(labels, "i", "labels", (n,))
            r.labels = lb.ptr
        r.guidance = guidance
        r.num_bricks = num_bricks
        r.skip_mask = skip_mask
        out = _arrays.empty("f", (n, C, H, W))
        r.out = out.ptr
        fb = None
        if brick_outputs:
            fb = _arrays.empty("f", (lib.lego_model_num_bricks(self._handle()), n, C, H, W))
            r.brick_outputs = fb.ptr
        self._check(lib.lego_denoise(self._handle(), ctypes.byref(r)))
        return (out.value, fb.value) if brick_outputs else out.value

    # ---- training ---------------------------------------------------------

    def train_loss(self, y, noise, sigma, labels=None, patch_fraction=0.0, patch_seed=0,
                   grads=True):
        """The reference LEGO training loss of one batch: clean images y and
        standard normal noise (both n x C x H x W), n noise levels, labels
        as in denoise.  patch_fraction in (0, 1) trains each brick on that
        fraction of its patches (drawn from patch_seed).  Returns (loss,
        gradient as a flat num_params array, zero for fixed parameters), or
        the loss alone with grads=False."""
        lib = _lib.lib()
        C, H, W = self._size(None, None)
        yb, n, H, W = _image_batch(y, "y", C, H, W)
        nb, _ = _arrays.from_input(noise, "f", "noise", (n, C, H, W))
        sigmas = [float(sigma)] * n if isinstance(sigma, (int, float)) else sigma
        sb, _ = _arrays.from_input(sigmas, "f", "sigma", (n,))
        b = _lib.new(_lib.TrainBatch)
        b.n, b.height, b.width = n, H, W
        b.y, b.noise, b.sigma = yb.ptr, nb.ptr, sb.ptr
        lb = None
        if labels is not None:
            lb, _ = _arrays.from_input(labels, "i", "labels", (n,))
            b.labels = lb.ptr
        b.patch_fraction, b.patch_seed = patch_fraction, patch_seed
        loss = ctypes.c_float()
        gb = _arrays.empty("f", (self.num_params,)) if grads else None
        self._check(lib.lego_train_loss(self._handle(), ctypes.byref(b), ctypes.byref(loss),
                                        gb.ptr if gb else None))
        return (loss.value, gb.value) if grads else loss.value

    # ---- sampling ---------------------------------------------------------

    def skip_policy(self, rule, steps, fraction=0.0, break_sigma=0.0):
        """The paper's skip presets for the top brick: rule "pg" (skip it at
        low noise) or "pr" (at high noise), break point a fraction of the
        steps or, with break_sigma > 0, a noise level."""
        p = _lib.new(_lib.SkipPolicy)
        self._check(_lib.lib().lego_skip_policy_preset(
            ctypes.byref(p), self._handle(), _choice(_lib.SKIP_RULES, rule, "rule"), steps,
            fraction, break_sigma))
        return p

    def _parse_skip(self, skip, steps):
        """None, a SkipPolicy struct, a dict of per-brick lists (sigma_min,
        sigma_max, step_min, step_max), or lego-sample's strings: "none",
        "pg:0.5" / "pr:0.3" (fraction of steps), "pg@1.0" / "pr@2.0" (sigma)."""
        if skip is None or skip == "none":
            return None
        if isinstance(skip, _lib.SkipPolicy):
            return skip
        if isinstance(skip, dict):
            p = _lib.new(_lib.SkipPolicy)
            for key, values in skip.items():
                if key not in ("sigma_min", "sigma_max", "step_min", "step_max"):
                    raise ValueError("skip: unknown key %r" % key)
                for k, v in enumerate(values):
                    getattr(p, key)[k] = v
            return p
        if isinstance(skip, str) and len(skip) > 3 and skip[:2] in _lib.SKIP_RULES \
                and skip[2] in ":@":
            value = float(skip[3:])
            if skip[2] == ":":
                return self.skip_policy(skip[:2], steps, fraction=value)
            return self.skip_policy(skip[:2], steps, break_sigma=value)
        raise ValueError("skip: expected None, 'pg:F', 'pr:F', 'pg@S', 'pr@S', a dict or a "
                         "SkipPolicy, got %r" % (skip,))

    def _sample_options(self, solver, steps, sigma_min, sigma_max, rho, sigmas, churn,
                        guidance, rng, skip):
        o = _lib.new(_lib.SampleOptions)
        o.solver = _choice(_lib.SOLVERS, solver, "solver")
        o.steps = steps
        o.sigma_min, o.sigma_max, o.rho = sigma_min, sigma_max, rho
        keep = []
        if sigmas is not None:
            sb, _ = _arrays.from_input(sigmas, "d", "sigmas", (steps,))
            o.sigmas = sb.ptr
            keep.append(sb)
        if churn is not None:
            o.s_churn, o.s_min, o.s_max, o.s_noise = churn
        o.guidance = guidance
        o.rng = _choice(_lib.RNGS, rng, "rng")
        policy = self._parse_skip(skip, steps)
        if policy is not None:
            o.skip = ctypes.pointer(policy)
            keep.append(policy)
        return o, keep

    def sample(self, n=None, seeds=None, labels=None, height=None, width=None,
               solver="heun", steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0,
               sigmas=None, churn=None, guidance=1.0, rng="philox", skip=None,
               latents=None, pad=False, progress=None):
        """Draw images.  `seeds` gives one generator per image (default
        0..n-1); `labels` n class indices (-1 = null label), one index for
        all, or None for random labels from each image's generator;
        `churn` is (S_churn, S_min, S_max, S_noise); `skip` as in
        _parse_skip; `progress(step, total)` may return True to cancel.
        Returns a Samples: images (n x C x H x W floats, nominally [-1, 1]),
        labels (those used), network_evals, brick_evals, brick_evals_saved."""
        lib = _lib.lib()
        C, H, W = self._size(height, width)
        if seeds is None:
            if n is None:
                raise ValueError("give n or seeds")
            seeds = list(range(n))
        sdb, _ = _arrays.from_input(seeds, "Q", "seeds")
        n = sdb.count if n is None else n
        if sdb.count != n:
            raise ValueError("%d seeds for %d images" % (sdb.count, n))
        o, keep = self._sample_options(solver, steps, sigma_min, sigma_max, rho, sigmas, churn,
                                       guidance, rng, skip)
        r = _lib.new(_lib.SampleRequest)
        r.n, r.height, r.width, r.pad = n, H, W, int(bool(pad))
        r.seeds = sdb.ptr
        if labels is not None:
            if isinstance(labels, int):
                labels = [labels] * n
            lb, _ = _arrays.from_input(labels, "i", "labels", (n,))
            r.labels = lb.ptr
            keep.append(lb)
        if latents is not None:
            latb, _ = _arrays.from_input(latents, "f", "latents", (n, C, H, W))
            r.latents = latb.ptr
            keep.append(latb)
        out = _arrays.empty("f", (n, C, H, W))
        used = _arrays.empty("i", (n,))
        r.out, r.labels_out = out.ptr, used.ptr
        error = []
        if progress is not None:
            def trampoline(step, total, _user):
                try:
                    return 1 if progress(step, total) else 0
                except BaseException as e:  # stop, and re-raise below
                    error.append(e)
                    return 1
            o.progress = _lib.PROGRESS_FN(trampoline)
            keep.append(o.progress)
        res = _lib.new(_lib.SampleResult)
        status = lib.lego_sample(self._handle(), ctypes.byref(r), ctypes.byref(o),
                                 ctypes.byref(res))
        if error:
            raise error[0]
        self._check(status)
        return Samples(out.value, used.value, res.network_evals, res.brick_evals,
                       res.brick_evals_saved)

    def step(self, x, t_cur, t_next, step=0, t_prev=0.0, labels=None, noise=None,
             denoised=None, solver="heun", churn=None, guidance=1.0, skip=None, steps=18):
        """One solver step in place on x (n x C x H x W float32, a numpy
        array, or a flat array.array('f') without numpy).  `denoised`, when
        given, is an array of x's shape that receives the step's last D
        (and for DPM-Solver++(2M) with t_prev > 0 holds the previous one).
        `steps` is only used to build a skip policy from a string."""
        lib = _lib.lib()
        C, H, W = self._size(None, None)
        if _arrays.have_numpy():
            if x.dtype != _arrays.np.float32 or not x.flags["C_CONTIGUOUS"]:
                raise ValueError("x must be a C-contiguous float32 array (updated in place)")
            n, C, H, W = x.shape
        else:
            n = len(x) // (C * H * W)
        xb = _arrays.Buffer(x, "f")
        o, keep = self._sample_options(solver, steps, 0.002, 80.0, 7.0, None, churn, guidance,
                                       "philox", skip)
        r = _lib.new(_lib.StepRequest)
        r.n, r.height, r.width = n, H, W
        r.x, r.t_cur, r.t_next, r.t_prev, r.step = xb.ptr, t_cur, t_next, t_prev, step
        if labels is not None:
            lb, _ = _arrays.from_input(labels, "i", "labels", (n,))
            r.labels = lb.ptr
            keep.append(lb)
        if noise is not None:
            nb, _ = _arrays.from_input(noise, "f", "noise", (n, C, H, W))
            r.noise = nb.ptr
            keep.append(nb)
        if denoised is not None:
            db = _arrays.Buffer(denoised, "f")
            if db.count != n * C * H * W:
                raise ValueError("denoised must have x's size")
            r.denoised = db.ptr
        self._check(lib.lego_step(self._handle(), ctypes.byref(r), ctypes.byref(o)))
        return x


Samples = namedtuple("Samples", "images labels network_evals brick_evals brick_evals_saved")


def _preset_options(img_channels, img_resolution, label_dim, threads, backend, device):
    o = _lib.new(_lib.PresetOptions)
    o.img_channels, o.img_resolution, o.label_dim = img_channels, img_resolution, label_dim
    o.num_threads, o.device = threads, device
    o.backend = _choice(_lib.BACKENDS, backend, "backend")
    return o


def presets():
    """The names of the library's preset architectures."""
    lib = _lib.lib()
    return [lib.lego_preset_name(i).decode() for i in range(lib.lego_preset_count())]


def preset_info(name, img_channels=0, img_resolution=0, label_dim=-1):
    """A preset's settings, bricks and exact parameter count, without
    building it."""
    lib = _lib.lib()
    o = _preset_options(img_channels, img_resolution, label_dim, 0, "cpu", 0)
    c = _lib.new(_lib.ModelConfig)
    status = lib.lego_preset_config(_encode(name), ctypes.byref(o), ctypes.byref(c))
    if status != _lib.OK:
        raise LegoError(status, "unknown preset %r or bad options (presets: %s)"
                        % (name, ", ".join(presets())))
    count = ctypes.c_int64()
    status = lib.lego_preset_num_params(_encode(name), ctypes.byref(o), ctypes.byref(count))
    if status != _lib.OK:
        raise LegoError(status, "preset %r: options out of range" % name)
    bricks = []
    for k in range(lib.lego_preset_num_bricks(_encode(name))):
        b = _lib.new(_lib.BrickConfig)
        lib.lego_preset_get_brick(_encode(name), k, ctypes.byref(b))
        bricks.append(Brick(b.brick_size, b.patch_size, b.depth))
    return {"img_channels": c.img_channels, "img_resolution": c.img_resolution,
            "label_dim": c.label_dim, "hidden_size": c.hidden_size, "num_heads": c.num_heads,
            "mlp_ratio": c.mlp_ratio, "frequency_embedding_size": c.frequency_embedding_size,
            "sigma_data": c.sigma_data, "bricks": bricks, "num_params": count.value}


def karras_sigmas(steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """The EDM noise levels, steps + 1 values ending in 0, as a list."""
    out = (ctypes.c_double * (steps + 1))()
    status = _lib.lib().lego_karras_sigmas(steps, sigma_min, sigma_max, rho, out)
    if status != _lib.OK:
        raise LegoError(status, "bad Karras schedule (steps %d, sigmas %g..%g, rho %g)"
                        % (steps, sigma_min, sigma_max, rho))
    return list(out)


def backend_available(backend):
    return bool(_lib.lib().lego_backend_available(_choice(_lib.BACKENDS, backend, "backend")))


def version():
    return _lib.lib().lego_version().decode()

