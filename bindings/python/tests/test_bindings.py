"""Tests of the lego package (ctypes bindings of liblego).

Run from the project root with `make check-python`, or
    LEGO_LIBRARY=lib/liblego.so /usr/bin/python3 -m unittest discover -s bindings/python/tests

structs    every mirrored struct has the C size, and defaults written by the
           C _init functions land in the right fields
model      a tiny model built through the API: information, denoise, brick
           outputs, errors as LegoError with the library's message
sample     seeds, labels, solvers, skip rules, progress and cancellation
io         save/load, parameters, uint8 conversion, PNG, npz
train      datasets (idx.gz), the training loss and its gradient, the trainer:
           steps, resume bit for bit, the EMA checkpoint, memory budgets
no_numpy   the same calls with numpy hidden, in a child process
fmnist     ../shared/models/fmnist_lego_pg32: images equal to bin/lego-sample's
           for seeds 0-3 (skipped when ../shared is absent)
"""

import ctypes
import gzip
import json
import math
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))
# liblego threads the GEMMs itself when OpenBLAS is single-threaded; set it
# before the library (and with it OpenBLAS) is loaded, as lego-sample does.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
if "LEGO_LIBRARY" not in os.environ:
    os.environ["LEGO_LIBRARY"] = os.path.join(ROOT, "lib", "liblego.so")

import lego  # noqa: E402
from lego import _lib  # noqa: E402

try:
    import numpy as np
except ImportError:
    np = None

FMNIST = os.path.join(ROOT, "..", "shared", "models", "fmnist_lego_pg32.safetensors")
SMALL = dict(img_channels=3, img_resolution=8, label_dim=10, hidden_size=16, num_heads=2,
             mlp_ratio=2.0, frequency_embedding_size=32, threads=2)
SMALL_BRICKS = [(4, 2, 1), (8, 2, 1), (8, 4, 1)]


def weights(count, seed):
    """Deterministic weights in [-0.1, 0.1] (the reference initialisation
    zeroes the adaLN and output layers, which would hide labels, guidance
    and brick outputs); the same numbers with and without numpy."""
    return [((i * 7919 + seed * 104729) % 201 - 100) / 1000.0 for i in range(count)]


def small_model(seed=1):
    m = lego.Model.create(SMALL_BRICKS, **SMALL)
    m.set_params(weights(m.num_params, seed))
    return m


def noisy(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, 8, 8)).astype(np.float32)


class StructTest(unittest.TestCase):
    def test_sizes_match_the_library(self):
        for cls in _lib.INITS:
            self.assertEqual(_lib.c_size_of(cls), ctypes.sizeof(cls), cls.__name__)

    def test_defaults_land_in_their_fields(self):
        c = _lib.new(_lib.ModelConfig)
        self.assertEqual((c.img_channels, c.img_resolution, c.label_dim, c.hidden_size,
                          c.num_heads, c.mlp_ratio, c.frequency_embedding_size, c.sigma_data,
                          c.num_threads, c.backend, c.device),
                         (3, 32, 0, 384, 6, 4.0, 256, 0.5, 0, 0, 0))
        b = _lib.new(_lib.BrickConfig)
        self.assertEqual((b.brick_size, b.patch_size, b.depth), (32, 2, 1))
        o = _lib.new(_lib.SampleOptions)
        self.assertEqual((o.solver, o.steps, o.sigma_min, o.sigma_max, o.rho, o.s_churn,
                          o.s_min, o.s_noise, o.guidance, o.rng),
                         (0, 18, 0.002, 80.0, 7.0, 0.0, 0.0, 1.0, 1.0, 0))
        self.assertTrue(math.isinf(o.s_max))
        self.assertFalse(o.sigmas)
        self.assertFalse(o.skip)
        p = _lib.new(_lib.SkipPolicy)
        self.assertTrue(all(math.isinf(v) for v in p.sigma_max))
        self.assertTrue(all(v == 0 for v in p.sigma_min))
        self.assertTrue(all(v == 2**31 - 1 for v in p.step_max))
        self.assertEqual(_lib.new(_lib.DenoiseRequest).guidance, 1.0)
        po = _lib.new(_lib.PresetOptions)
        self.assertEqual((po.img_channels, po.img_resolution, po.label_dim, po.backend),
                         (0, 0, -1, 0))
        t = _lib.new(_lib.TrainOptions)
        self.assertEqual((t.optimizer, t.lr, t.beta1, t.beta2, t.eps, t.ema_halflife_kimg,
                          t.ema_rampup_ratio, t.p_mean, t.p_std, t.patch_fraction),
                         (0, 1e-4, 0.9, 0.999, 1e-8, 500.0, 0.05, -1.2, 1.2, 0.0))
        d = _lib.new(_lib.DatasetOptions)
        self.assertEqual((d.resolution, d.pad_value, d.max_bytes, d.max_images),
                         (0, -1.0, 2 << 30, 0))
        self.assertFalse(d.labels_path)

    def test_config_round_trip(self):
        # Every field of lego_model_config goes into the library and comes
        # back through lego_model_get_config: offsets agree.
        m = lego.Model.create([(8, 4, 1)], img_channels=5, img_resolution=24, label_dim=7,
                              hidden_size=24, num_heads=3, mlp_ratio=1.5,
                              frequency_embedding_size=10, sigma_data=0.75, threads=3)
        c = m.config
        self.assertEqual((c["img_channels"], c["img_resolution"], c["label_dim"],
                          c["hidden_size"], c["num_heads"], c["mlp_ratio"],
                          c["frequency_embedding_size"], c["sigma_data"], c["num_threads"],
                          c["backend"], c["device"]),
                         (5, 24, 7, 24, 3, 1.5, 10, 0.75, 3, "cpu", 0))
        self.assertEqual(m.bricks, [lego.Brick(8, 4, 1)])


class ModelTest(unittest.TestCase):
    def test_info(self):
        m = small_model()
        info = m.info()
        self.assertEqual(info["bricks"], SMALL_BRICKS)
        self.assertEqual(info["resolution_multiple"], 8)
        # Embedders + bricks, counted by hand: D 16, MLP 32, C 3, 10 classes.
        D, H, C = 16, 32, 3
        n = 32 * D + D + D * D + D + 10 * D + D
        for k, (b, p, d) in enumerate(SMALL_BRICKS):
            cin = (C if k == 0 else 2 * C) + 2
            n += (b // p) ** 2 * D + D * cin * p * p + D
            n += d * (3 * D * D + 3 * D + D * D + D + D * H + H + H * D + D + 6 * D * D + 6 * D)
            n += D * p * p * C + p * p * C + 2 * D * D + 2 * D
        self.assertEqual(m.num_params, n)
        tensors = m.tensors()
        self.assertEqual(tensors[0].name, "model.t_embedder.mlp.0.weight")
        self.assertEqual(tensors[0].shape, (16, 32))
        self.assertEqual(sum(t.numel for t in tensors), n)
        self.assertFalse([t for t in tensors if t.name.endswith("pos_embed")][0].trainable)
        self.assertEqual(lego.version(), "%d.%d.%d" % tuple(
            int(v) for v in lego.version().split(".")))
        self.assertTrue(lego.backend_available("cpu"))

    @unittest.skipIf(np is None, "numpy not installed")
    def test_denoise(self):
        m = small_model()
        x = noisy(3)
        d = m.denoise(x, [0.5, 1.0, 2.0], labels=[1, -1, 9])
        self.assertEqual(d.shape, (3, 3, 8, 8))
        self.assertEqual(d.dtype, np.float32)
        self.assertTrue(np.all(np.isfinite(d)))
        # Deterministic, and image i depends on its own inputs only.
        np.testing.assert_array_equal(d, m.denoise(x, [0.5, 1.0, 2.0], labels=[1, -1, 9]))
        one = m.denoise(x[1:2], 1.0, labels=[-1])
        np.testing.assert_allclose(one[0], d[1], rtol=0, atol=1e-5)
        # Labels matter; D(x) = c_skip x + c_out F_K with F_K the top brick's output.
        self.assertGreater(np.abs(m.denoise(x, 1.0, labels=[0, 0, 0]) -
                                  m.denoise(x, 1.0, labels=[5, 5, 5])).max(), 1e-6)
        d, F = m.denoise(x, 1.0, labels=[1, 2, 3], brick_outputs=True)
        self.assertEqual(F.shape, (3, 3, 3, 8, 8))
        s, sd = 1.0, 0.5
        c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / math.sqrt(s**2 + sd**2)
        np.testing.assert_allclose(d, c_skip * x + c_out * F[2], rtol=0, atol=1e-5)
        # num_bricks=1 stops after brick 0.
        d1 = m.denoise(x, 1.0, labels=[1, 2, 3], num_bricks=1)
        np.testing.assert_allclose(d1, c_skip * x + c_out * F[0], rtol=0, atol=1e-5)
        # Guidance 1 is the conditional output.
        np.testing.assert_array_equal(m.denoise(x, 1.0, labels=[1, 2, 3], guidance=1.0),
                                      m.denoise(x, 1.0, labels=[1, 2, 3]))

    def test_errors_carry_the_library_message(self):
        m = small_model()
        with self.assertRaises(lego.LegoError) as cm:
            m.denoise([0.0] * (3 * 12 * 12), 1.0, height=12, width=12)
        self.assertEqual(cm.exception.status_name, "LEGO_ERR_SHAPE")
        self.assertIn("multiple of 8", str(cm.exception))
        with self.assertRaises(lego.LegoError) as cm:
            lego.Model.load("/nonexistent/model.safetensors")
        self.assertEqual(cm.exception.status, 3)
        self.assertIn("/nonexistent/model.safetensors", cm.exception.message)
        with self.assertRaises(lego.LegoError) as cm:
            lego.Model.create([(8, 3, 1)], **SMALL)
        self.assertIn("patch_size 3", cm.exception.message)
        with self.assertRaises(lego.LegoError) as cm:
            lego.Model.preset("lego_S_PG_65")
        self.assertEqual(cm.exception.status_name, "LEGO_ERR_INVALID_ARGUMENT")
        self.assertIn("unknown preset", cm.exception.message)
        with self.assertRaises(ValueError):
            m.sample(n=1, solver="rk4")
        m.close()
        with self.assertRaises(lego.LegoError):
            m.num_params

    def test_presets(self):
        names = lego.presets()
        self.assertIn("lego_XL_U_64", names)
        self.assertEqual(lego.preset_info("lego_XL_U_32")["num_params"], 1261977392)
        self.assertEqual(lego.preset_info("lego_S_PG_64", img_channels=3, label_dim=1000)
                         ["num_params"], 34134744)
        info = lego.preset_info("lego_L_PR_64")
        self.assertEqual(info["bricks"], [(64, 2, 12), (16, 8, 8), (4, 2, 6)])
        self.assertEqual((info["hidden_size"], info["num_heads"]), (1024, 16))
        m = lego.Model.preset("fmnist_lego_pg32", threads=2)
        self.assertEqual(m.num_params, lego.preset_info("fmnist_lego_pg32")["num_params"])
        with self.assertRaises(lego.LegoError):
            lego.preset_info("nope")


@unittest.skipIf(np is None, "numpy not installed")
class SampleTest(unittest.TestCase):
    def setUp(self):
        self.m = small_model(seed=4)

    def test_seeds_and_labels(self):
        a = self.m.sample(seeds=[0, 1, 2, 3], labels=[0, 1, 2, 3], steps=6)
        self.assertEqual(a.images.shape, (4, 3, 8, 8))
        self.assertEqual(list(a.labels), [0, 1, 2, 3])
        self.assertEqual(a.network_evals, 11)  # Heun: 2 per step but the last
        b = self.m.sample(seeds=[0, 1, 2, 3], labels=[0, 1, 2, 3], steps=6)
        np.testing.assert_array_equal(a.images, b.images)
        c = self.m.sample(seeds=[2, 3], labels=[2, 3], steps=6)
        np.testing.assert_allclose(c.images, a.images[2:], rtol=0, atol=1e-5)
        self.assertGreater(np.abs(a.images[0] - a.images[1]).max(), 1e-3)
        r = self.m.sample(n=8, steps=3)  # random labels from each image's generator
        self.assertTrue(all(0 <= v < 10 for v in r.labels))
        np.testing.assert_array_equal(r.labels, self.m.sample(n=8, steps=3).labels)
        self.assertEqual(list(self.m.sample(n=2, labels=7, steps=2).labels), [7, 7])

    def test_options(self):
        base = self.m.sample(n=2, labels=[1, 2], steps=5)
        for solver in ("euler", "dpmpp2m"):
            s = self.m.sample(n=2, labels=[1, 2], steps=5, solver=solver)
            self.assertEqual(s.network_evals, 5)
            self.assertTrue(np.all(np.isfinite(s.images)))
        g = self.m.sample(n=2, labels=[1, 2], steps=5, guidance=2.0)
        self.assertGreater(np.abs(g.images - base.images).max(), 1e-5)
        t = self.m.sample(n=2, labels=[1, 2], steps=5, rng="torch")
        self.assertGreater(np.abs(t.images - base.images).max(), 1e-3)
        churn = self.m.sample(n=2, labels=[1, 2], steps=5, churn=(10, 0, float("inf"), 1.0))
        self.assertGreater(np.abs(churn.images - base.images).max(), 1e-5)
        sig = lego.karras_sigmas(5)
        self.assertEqual(len(sig), 6)
        self.assertEqual(sig[-1], 0.0)
        same = self.m.sample(n=2, labels=[1, 2], steps=5, sigmas=sig[:5])
        np.testing.assert_allclose(same.images, base.images, rtol=0, atol=1e-6)
        big = self.m.sample(n=1, labels=[1], steps=2, height=16, width=24)
        self.assertEqual(big.images.shape, (1, 3, 16, 24))
        padded = self.m.sample(n=1, labels=[1], steps=2, height=10, width=10, pad=True)
        self.assertEqual(padded.images.shape, (1, 3, 10, 10))
        lat = np.zeros((1, 3, 8, 8), np.float32)
        z = self.m.sample(n=1, labels=[1], steps=2, latents=lat)
        self.assertTrue(np.all(np.isfinite(z.images)))

    def test_skip(self):
        full = self.m.sample(n=1, labels=[3], steps=10)
        pg = self.m.sample(n=1, labels=[3], steps=10, skip="pg:0.5")
        self.assertGreater(pg.brick_evals_saved, 0)
        self.assertEqual(full.brick_evals_saved, 0)
        self.assertEqual(pg.brick_evals + pg.brick_evals_saved, 3 * pg.network_evals)
        pr = self.m.sample(n=1, labels=[3], steps=10, skip="pr@5.0")
        self.assertGreater(pr.brick_evals_saved, 0)
        same = self.m.sample(n=1, labels=[3], steps=10, skip=self.m.skip_policy("pg", 10, 0.5))
        np.testing.assert_array_equal(same.images, pg.images)
        # Per-brick lists: brick 1 never runs.
        d = self.m.sample(n=1, labels=[3], steps=10, skip={"step_max": [2**31 - 1, -1]})
        self.assertEqual(d.brick_evals_saved, d.network_evals)
        with self.assertRaises(ValueError):
            self.m.sample(n=1, skip="xx:1")

    def test_progress_and_cancel(self):
        seen = []
        self.m.sample(n=1, steps=4, progress=lambda i, total: seen.append((i, total)))
        self.assertEqual(seen, [(1, 4), (2, 4), (3, 4), (4, 4)])
        with self.assertRaises(lego.LegoError) as cm:
            self.m.sample(n=1, steps=4, progress=lambda i, total: i >= 2)
        self.assertEqual(cm.exception.status_name, "LEGO_ERR_CANCELLED")

        def boom(i, total):
            raise KeyError("from the callback")
        with self.assertRaises(KeyError):
            self.m.sample(n=1, steps=4, progress=boom)

    def test_step_loop_equals_sample(self):
        steps = 4
        sig = lego.karras_sigmas(steps)
        x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
        ref = self.m.sample(n=1, labels=[2], steps=steps, latents=x, solver="euler")
        y = (x.astype(np.float64) * sig[0]).astype(np.float32)
        for i in range(steps):
            self.m.step(y, sig[i], sig[i + 1], step=i, labels=[2], solver="euler")
        np.testing.assert_allclose(y, ref.images, rtol=0, atol=1e-4)


@unittest.skipIf(np is None, "numpy not installed")
class IoTest(unittest.TestCase):
    def test_save_load_params(self):
        m = small_model(seed=9)
        x = noisy(2, seed=5)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "m.safetensors")
            m.save(path)
            back = lego.Model.load(path, threads=2)
            self.assertEqual(back.info(), m.info())
            np.testing.assert_array_equal(back.denoise(x, 0.7, labels=[1, 2]),
                                          m.denoise(x, 0.7, labels=[1, 2]))
            other = small_model(seed=10)
            other.load_weights(path)
            np.testing.assert_array_equal(other.get_params(), m.get_params())
        p = m.get_params()
        self.assertEqual(p.shape, (m.num_params,))
        other = small_model(seed=11)
        other.set_params(p)
        np.testing.assert_array_equal(other.denoise(x, 0.7), m.denoise(x, 0.7))
        with self.assertRaises(ValueError):
            other.set_params(p[:-1])

    def test_images(self):
        x = np.array([-1.0, 0.0, 1.0, 2.0, -3.0, 0.5, -0.004, np.nan, 0.999, 0.1, 0.2, 0.3],
                     np.float32).reshape(1, 3, 2, 2)
        u = lego.to_uint8(x)
        self.assertEqual(u.shape, (1, 2, 2, 3))
        self.assertEqual(u.dtype, np.uint8)
        want = np.clip(x * 127.5 + 128, 0, 255)
        want = np.where(np.isnan(want), 0, want).astype(np.uint8).transpose(0, 2, 3, 1)
        np.testing.assert_array_equal(u, want)
        with tempfile.TemporaryDirectory() as tmp:
            lego.write_png(os.path.join(tmp, "a.png"), u[0])
            with open(os.path.join(tmp, "a.png"), "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
            lego.write_png_grid(os.path.join(tmp, "g.png"), np.repeat(u, 5, axis=0), columns=2)
            self.assertTrue(os.path.getsize(os.path.join(tmp, "g.png")) > 0)
            lego.write_npz(os.path.join(tmp, "s.npz"), np.repeat(u, 2, axis=0), labels=[4, 5])
            with np.load(os.path.join(tmp, "s.npz")) as z:
                np.testing.assert_array_equal(z["arr_0"], np.repeat(u, 2, axis=0))
                self.assertEqual(z["labels"].dtype, np.int64)
                self.assertEqual(list(z["labels"]), [4, 5])
            with self.assertRaises(lego.LegoError) as cm:
                lego.write_png(os.path.join(tmp, "no", "such", "dir.png"), u[0])
            self.assertIn("dir.png", cm.exception.message)


def write_idx(folder, images, labels):
    """Fashion-MNIST's file pair (gzip'd idx3 images, idx1 labels) for uint8
    images n x h x w; returns the images file's path."""
    n, h, w = len(images), len(images[0]), len(images[0][0])
    head = bytes([0, 0, 8, 3]) + n.to_bytes(4, "big") + h.to_bytes(4, "big") + w.to_bytes(4, "big")
    pixels = bytes(v for image in images for row in image for v in row)
    path = os.path.join(folder, "train-images-idx3-ubyte.gz")
    with gzip.open(path, "wb") as f:
        f.write(head + pixels)
    with gzip.open(os.path.join(folder, "train-labels-idx1-ubyte.gz"), "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + bytes(labels))
    return path


@unittest.skipIf(np is None, "numpy not installed")
class TrainTest(unittest.TestCase):
    def test_dataset(self):
        rng = np.random.default_rng(3)
        pixels = rng.integers(0, 256, (3, 6, 6), dtype=np.uint8)
        with tempfile.TemporaryDirectory() as tmp:
            path = write_idx(tmp, pixels.tolist(), [2, 0, 9])
            with lego.Dataset(path, resolution=8) as d:
                self.assertEqual((len(d), d.shape, d.label_dim), (3, (1, 8, 8), 10))
                want = np.full((3, 1, 8, 8), -1.0, np.float32)
                want[:, 0, 1:7, 1:7] = pixels / np.float32(127.5) - 1
                image, label = d.get(2)
                self.assertEqual(label, 9)
                np.testing.assert_allclose(image, want[2], atol=1e-6)
                images, labels = d.get_batch([1, 2, 1])
                self.assertEqual(list(labels), [0, 9, 0])
                np.testing.assert_array_equal(images, np.stack([want[1], want[2], want[1]]))
                with self.assertRaises(lego.LegoError) as cm:
                    d.get_batch([0, 3])
                self.assertEqual(cm.exception.status_name, "LEGO_ERR_INVALID_ARGUMENT")
            d = lego.Dataset(path, max_images=2)
            self.assertEqual((len(d), d.shape), (2, (1, 6, 6)))
            d.close()
            with self.assertRaises(lego.LegoError):
                d.get(0)
            with self.assertRaises(lego.LegoError) as cm:
                lego.Dataset(os.path.join(tmp, "none.gz"))
            self.assertIn("none.gz", cm.exception.message)

    def batch(self, n, seed):
        rng = np.random.default_rng(seed)
        y = rng.uniform(-1, 1, (n, 3, 8, 8)).astype(np.float32)
        return y, rng.integers(-1, 10, n).astype(np.int32)

    def test_train_loss_and_gradient(self):
        m = small_model(seed=4)
        y, labels = self.batch(2, 1)
        noise = np.random.default_rng(2).standard_normal(y.shape).astype(np.float32)
        sigma = [0.4, 1.7]
        loss, grads = m.train_loss(y, noise, sigma, labels=labels)
        self.assertTrue(math.isfinite(loss) and loss > 0)
        self.assertEqual(grads.shape, (m.num_params,))
        self.assertEqual(m.train_loss(y, noise, sigma, labels=labels, grads=False), loss)
        for t in m.tensors():
            if not t.trainable:
                self.assertFalse(grads[t.offset:t.offset + t.numel].any(), t.name)
        # The steepest weight against central differences in float64 terms.
        p = m.get_params().astype(np.float64)
        i = int(np.argmax(np.abs(grads)))
        eps = 1e-3
        side = []
        for sign in (1, -1):
            q = p.copy()
            q[i] += sign * eps
            m.set_params(q.astype(np.float32))
            side.append(m.train_loss(y, noise, sigma, labels=labels, grads=False))
        numeric = (side[0] - side[1]) / (2 * eps)
        self.assertAlmostEqual(numeric / grads[i], 1.0, delta=0.03)
        m.set_params(p.astype(np.float32))
        half = m.train_loss(y, noise, sigma, labels=labels, patch_fraction=0.5, patch_seed=3,
                            grads=False)
        self.assertTrue(math.isfinite(half) and half != loss)
        with self.assertRaises(ValueError):
            m.train_loss(y[:, :2], noise, sigma)
        with self.assertRaises(ValueError):
            m.train_loss(y, noise[:1], sigma)
        with self.assertRaises(lego.LegoError) as cm:
            m.train_loss(y, noise, [0.4, -1.0])
        self.assertIn("sigma", cm.exception.message)

    def test_trainer_resumes_bit_for_bit(self):
        y, labels = self.batch(3, 7)
        opts = dict(lr=2e-3, warmup_steps=2, grad_clip=50.0, ema_halflife_kimg=0.01,
                    label_dropout=0.3, hflip=1, seed=1234, optimizer="adam")
        straight = small_model(seed=2)
        t = lego.Trainer(straight, **opts)
        self.assertEqual(t.image_shape, (3, 8, 8))
        losses = [t.step(y, labels).loss for _ in range(4)]
        with tempfile.TemporaryDirectory() as tmp:
            state = os.path.join(tmp, "state.safetensors")
            first = small_model(seed=2)
            with lego.Trainer(first, **opts) as t1:
                s1 = t1.step(y, labels)
                s2 = t1.step(y.reshape(-1), labels)  # flat images too
                self.assertEqual((s1.step, s2.step, s2.images_seen), (1, 2, 6))
                self.assertAlmostEqual(s1.lr, 1e-3)
                self.assertEqual([s1.loss, s2.loss], losses[:2])
                t1.save_state(state)
            resumed = small_model(seed=99)  # other weights: the state brings them
            t2 = lego.Trainer(resumed, **opts)
            t2.load_state(state)
            self.assertEqual(t2.stats[:3], (2, 6, 0.0))
            self.assertEqual([t2.step(y, labels).loss for _ in range(2)], losses[2:])
            self.assertEqual((t2.stats.step, t2.stats.loss), (4, losses[3]))
            np.testing.assert_array_equal(resumed.get_params(), straight.get_params())
            ema = os.path.join(tmp, "ema.safetensors")
            t2.export_ema(ema)
            e = lego.Model.load(ema, threads=2)
            self.assertEqual(e.info(), resumed.info())
            self.assertFalse(np.array_equal(e.get_params(), resumed.get_params()))
            with self.assertRaises(lego.LegoError) as cm:
                t2.load_state(os.path.join(tmp, "none.safetensors"))
            self.assertEqual(cm.exception.status_name, "LEGO_ERR_IO")
            self.assertIn("none.safetensors", cm.exception.message)
        with self.assertRaises(ValueError):
            t2.step(y[:, :2], labels)
        with self.assertRaises(lego.LegoError) as cm:
            t2.step(y, [0, 1, 10])
        self.assertIn("out of range", cm.exception.message)
        with self.assertRaises(TypeError):
            lego.Trainer(resumed, learning_rate=1.0)
        with self.assertRaises(lego.LegoError) as cm:
            lego.Trainer(resumed, lr=-1.0)
        self.assertEqual(cm.exception.status_name, "LEGO_ERR_INVALID_ARGUMENT")
        resumed.close()  # closes its trainer first
        with self.assertRaises(lego.LegoError):
            t2.step(y, labels)

    def test_memory(self):
        m = small_model()
        self.assertGreater(m.memory_usage, m.num_params * 4)
        self.assertEqual(m.device_memory_usage, 0)
        with self.assertRaises(lego.LegoError) as cm:
            m.set_memory_budget(1)
        self.assertEqual(cm.exception.status_name, "LEGO_ERR_OUT_OF_MEMORY")
        m.set_memory_budget(m.memory_usage + (64 << 20))
        m.denoise(noisy(1), 1.0)
        m.set_memory_budget(0)


class NoNumpyTest(unittest.TestCase):
    """The package imports and works with numpy hidden (flat sequences in,
    array.array out)."""

    SCRIPT = r"""
import sys, json
sys.modules["numpy"] = None  # import numpy now fails
sys.path.insert(0, sys.argv[1])
import lego, array
m = lego.Model.create(%r, **%r)
m.set_params([((i * 7919 + 104729) %% 201 - 100) / 1000.0 for i in range(m.num_params)])
x = [((i * 37) %% 11) / 5.0 - 1.0 for i in range(2 * 3 * 8 * 8)]
d = m.denoise(x, [0.5, 2.0], labels=[1, -1])
s = m.sample(seeds=[5, 6], labels=[1, 2], steps=3)
u = lego.to_uint8(s.images, shape=(2, 3, 8, 8))
assert isinstance(d, array.array) and d.typecode == "f", type(d)
loss, grads = m.train_loss(x, x[::-1], [0.5, 2.0], labels=[1, -1])
t = lego.Trainer(m, seed=3)
st = t.step(x, [4, 5])
assert isinstance(grads, array.array) and len(grads) == m.num_params
print(json.dumps({"d": list(d), "s": list(s.images), "labels": list(s.labels), "u": list(u),
                  "loss": loss, "step": [st.step, st.images_seen]}))
""" % (SMALL_BRICKS, SMALL)

    def test_without_numpy(self):
        out = subprocess.run([sys.executable, "-c", self.SCRIPT,
                              os.path.join(ROOT, "bindings", "python")],
                             capture_output=True, text=True, check=True)
        got = json.loads(out.stdout)
        self.assertEqual(len(got["d"]), 2 * 3 * 64)
        self.assertEqual(got["labels"], [1, 2])
        self.assertTrue(all(0 <= v <= 255 for v in got["u"]))
        self.assertEqual(got["step"], [1, 2])
        if np is None:
            return
        m = small_model(seed=1)
        x = np.array([((i * 37) % 11) / 5.0 - 1.0 for i in range(2 * 3 * 64)],
                     np.float32).reshape(2, 3, 8, 8)
        np.testing.assert_array_equal(np.array(got["d"], np.float32).reshape(2, 3, 8, 8),
                                      m.denoise(x, [0.5, 2.0], labels=[1, -1]))
        s = m.sample(seeds=[5, 6], labels=[1, 2], steps=3)
        np.testing.assert_array_equal(np.array(got["s"], np.float32).reshape(2, 3, 8, 8),
                                      s.images)
        xr = np.ascontiguousarray(x.reshape(-1)[::-1]).reshape(x.shape)
        self.assertEqual(got["loss"], m.train_loss(x, xr, [0.5, 2.0], labels=[1, -1],
                                                   grads=False))


@unittest.skipUnless(os.path.exists(FMNIST), "../shared/models absent")
@unittest.skipIf(np is None, "numpy not installed")
class FmnistTest(unittest.TestCase):
    def test_same_images_as_lego_sample(self):
        m = lego.Model.load(FMNIST, threads=2)
        self.assertEqual(m.config["label_dim"], 10)
        # Random labels, Heun; 8 steps rather than 18 keep the test short.
        s = m.sample(seeds=range(4), steps=8)
        self.assertEqual(s.images.shape, (4, 1, 32, 32))
        self.assertEqual(s.network_evals, 15)
        self.assertTrue(np.all(np.isfinite(s.images)))
        # Samples of a trained model sit near [-1, 1] (8 steps overshoot a little)
        # and use the whole range (background -1, garment bright).
        self.assertGreater(s.images.min(), -2.5)
        self.assertLess(s.images.max(), 2.5)
        self.assertLess(np.percentile(s.images, 5), -0.9)
        self.assertGreater(s.images.max(), 0.0)
        self.assertTrue(all(0 <= v < 10 for v in s.labels))
        u = lego.to_uint8(s.images)
        with tempfile.TemporaryDirectory() as tmp:
            npz = os.path.join(tmp, "c.npz")
            env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
            subprocess.run([os.path.join(ROOT, "bin", "lego-sample"), "--model", FMNIST,
                            "--seeds", "0-3", "--steps", "8", "--threads", "2", "--quiet",
                            "--npz", npz],
                           check=True, env=env, capture_output=True)
            with np.load(npz) as z:
                np.testing.assert_array_equal(z["arr_0"], u)
                np.testing.assert_array_equal(z["labels"], s.labels)


if __name__ == "__main__":
    unittest.main()
