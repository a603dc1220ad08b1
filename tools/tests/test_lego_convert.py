"""Tests of tools/lego-convert, end to end: a model made by liblego is saved,
its tensors are read back and written the ways reference checkpoints come
(npz, safetensors without metadata, the inner network's key names, DDP
prefixes), converted, loaded with liblego, and must denoise exactly as the
original.  Run by `make check-python`; needs numpy.  The PyTorch snapshot
path runs only when torch is importable.
"""

import json
import os
import struct
import subprocess
import sys
import tempfile
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
TOOL = os.path.join(ROOT, "tools", "lego-convert")
sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("LEGO_LIBRARY", os.path.join(ROOT, "lib", "liblego.so"))

import lego  # noqa: E402

try:
    import torch
except ImportError:
    torch = None

BRICKS = [(4, 2, 1), (8, 4, 2)]
SETTINGS = dict(img_channels=2, img_resolution=8, label_dim=5, hidden_size=24, num_heads=3,
                mlp_ratio=2.0, frequency_embedding_size=16, threads=2)
CONFIG = {"img_channels": 2, "img_resolution": 8, "label_dim": 5, "hidden_size": 24,
          "num_heads": 3, "mlp_ratio": 2.0, "frequency_embedding_size": 16,
          "bricks": [{"brick_size": b, "patch_size": p, "depth": d} for b, p, d in BRICKS]}


def read_tensors(path):
    """A safetensors file as {name: float32 array} plus its metadata, read
    here independently of the tool."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    out = {}
    for name, e in header.items():
        assert e["dtype"] == "F32", e
        a, b = e["data_offsets"]
        out[name] = np.frombuffer(data[8 + n + a:8 + n + b], "<f4").reshape(e["shape"])
    return out, meta


def write_plain_safetensors(path, tensors):
    """A state dict without __metadata__, as torch/safetensors would save it."""
    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr, "<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def convert(*args):
    return subprocess.run([sys.executable, TOOL] + [str(a) for a in args],
                          capture_output=True, text=True)


class ConvertTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.dir = cls.tmp.name
        cls.model = lego.Model.create(BRICKS, **SETTINGS)
        # Random weights everywhere (the reference initialisation leaves
        # layers at zero, which would hide a mix-up); fixed pos_embed kept.
        cls.model.init_weights(2)
        params = cls.model.get_params()
        rng = np.random.default_rng(7)
        for t in cls.model.tensors():
            if t.trainable:
                params[t.offset:t.offset + t.numel] = rng.normal(0, 0.2, t.numel)
        cls.model.set_params(params)
        cls.saved = os.path.join(cls.dir, "lego.safetensors")
        cls.model.save(cls.saved)
        cls.tensors, cls.meta = read_tensors(cls.saved)
        rng = np.random.default_rng(1)
        cls.x = rng.standard_normal((3, 2, 8, 8)).astype(np.float32)
        cls.want = cls.model.denoise(cls.x, [0.3, 1.5, 9.0], labels=[0, 4, -1])

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def path(self, name):
        return os.path.join(self.dir, name)

    def check_output(self, out, exact=True):
        m = lego.Model.load(out, threads=2)
        self.assertEqual(m.num_params, self.model.num_params)
        self.assertEqual(m.bricks, self.model.bricks)
        got = m.denoise(self.x, [0.3, 1.5, 9.0], labels=[0, 4, -1])
        if exact:
            np.testing.assert_array_equal(got, self.want)
            np.testing.assert_array_equal(m.get_params(), self.model.get_params())
        return m, got

    def test_reference_tensors_read_back(self):
        self.assertIn("lego.config", self.meta)
        self.assertIn("model.model.1.blocks.1.mlp.fc2.weight", self.tensors)
        self.assertEqual(self.tensors["model.model.1.x_embedder.proj.weight"].shape,
                         (24, 6, 4, 4))

    def test_npz_with_config(self):
        npz = self.path("sd.npz")
        np.savez(npz, **self.tensors)
        out = self.path("from_npz.safetensors")
        r = convert(npz, out, "--config", json.dumps(CONFIG), "--verify")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("liblego loads it", r.stdout)
        self.check_output(out)
        _, meta = read_tensors(out)
        cfg = json.loads(meta["lego.config"])
        self.assertEqual(cfg["format"], "lego-diffusion")
        self.assertEqual(cfg["num_heads"], 3)
        self.assertEqual(cfg["bricks"][1], {"brick_size": 8, "patch_size": 4, "depth": 2})

    def test_config_file_and_overrides(self):
        cfg = dict(CONFIG, img_resolution=32, sigma_data=0.5)
        path = self.path("config.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        npz = self.path("sd2.npz")
        np.savez(npz, **self.tensors)
        out = self.path("from_file.safetensors")
        r = convert(npz, out, "--config", "@" + path, "--resolution", "8")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.check_output(out)
        self.assertEqual(json.loads(read_tensors(out)[1]["lego.config"])["img_resolution"], 8)

    def test_inner_names_ddp_prefix_inferred_architecture(self):
        # The inner LEGO network's state dict ("model.0...", "t_embedder...")
        # under DistributedDataParallel's "module.", in a plain safetensors.
        inner = {"module." + k[len("model."):]: v for k, v in self.tensors.items()}
        self.assertIn("module.model.0.pos_embed", inner)
        st = self.path("inner.safetensors")
        write_plain_safetensors(st, dict(reversed(list(inner.items()))))
        out = self.path("inferred.safetensors")
        r = convert(st, out, "--heads", 3)
        self.assertEqual(r.returncode, 0, r.stderr)
        m, _ = self.check_output(out)
        self.assertEqual(m.config["img_resolution"], 8)
        self.assertEqual(m.config["mlp_ratio"], 2.0)
        self.assertEqual(m.config["frequency_embedding_size"], 16)

    def test_half_precision(self):
        npz = self.path("sd3.npz")
        np.savez(npz, **self.tensors)
        for dtype in ("f16", "bf16"):
            out = self.path("half_%s.safetensors" % dtype)
            r = convert(npz, out, "--config", json.dumps(CONFIG), "--dtype", dtype)
            self.assertEqual(r.returncode, 0, r.stderr)
            m, got = self.check_output(out, exact=False)
            p = self.model.get_params()
            if dtype == "f16":
                want = p.astype(np.float16).astype(np.float32)
            else:  # round to nearest even on the upper 16 bits
                b = p.view(np.uint32).astype(np.uint64)
                want = (((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16).astype(np.uint32)
                want = want.view(np.float32)
            np.testing.assert_array_equal(m.get_params(), want)
            np.testing.assert_allclose(got, self.want, rtol=0, atol=0.1)

    def test_preset(self):
        # fmnist_lego_pg32 with 2 channels and 3 classes: a model made from
        # the preset, saved as npz, converted by name.
        src = lego.Model.preset("fmnist_lego_pg32", img_channels=2, label_dim=3, threads=2)
        src.init_weights(5)
        p = src.get_params()
        p += np.random.default_rng(3).normal(0, 0.01, p.shape).astype(np.float32)
        src.set_params(p)
        st = self.path("preset_src.safetensors")
        src.save(st)
        npz = self.path("preset.npz")
        np.savez(npz, **read_tensors(st)[0])
        out = self.path("preset.safetensors")
        r = convert(npz, out, "--preset", "fmnist_lego_pg32", "--channels", 2, "--classes", 3)
        self.assertEqual(r.returncode, 0, r.stderr)
        m = lego.Model.load(out, threads=2)
        x = np.random.default_rng(2).standard_normal((1, 2, 32, 32)).astype(np.float32)
        np.testing.assert_array_equal(m.denoise(x, 0.8, labels=[2]),
                                      src.denoise(x, 0.8, labels=[2]))
        # The preset's own 1 channel / 10 classes do not fit these weights.
        r = convert(npz, self.path("bad.safetensors"), "--preset", "fmnist_lego_pg32")
        self.assertEqual(r.returncode, 1)
        self.assertIn("model.y_embedder.embedding_table.weight has shape [256, 3]", r.stderr)
        r = convert(npz, self.path("bad.safetensors"), "--preset", "lego_S_PG_65")
        self.assertEqual(r.returncode, 1)
        self.assertIn("unknown preset", r.stderr)

    def test_errors_name_the_tensor(self):
        cfg = json.dumps(CONFIG)
        missing = dict(self.tensors)
        del missing["model.model.1.blocks.1.attn.proj.bias"]
        npz = self.path("missing.npz")
        np.savez(npz, **missing)
        r = convert(npz, self.path("x.safetensors"), "--config", cfg)
        self.assertEqual(r.returncode, 1)
        self.assertIn("missing tensor model.model.1.blocks.1.attn.proj.bias [24]", r.stderr)
        self.assertFalse(os.path.exists(self.path("x.safetensors")))

        extra = dict(self.tensors)
        extra["model.map_augment.weight"] = np.zeros((24, 9), np.float32)
        npz = self.path("extra.npz")
        np.savez(npz, **extra)
        r = convert(npz, self.path("x.safetensors"), "--config", cfg)
        self.assertEqual(r.returncode, 1)
        self.assertIn("model.map_augment.weight", r.stderr)
        r = convert(npz, self.path("x.safetensors"), "--config", cfg, "--ignore-extra")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("dropped 1 extra", r.stdout)
        self.check_output(self.path("x.safetensors"))

        r = convert(npz, self.path("y.safetensors"), "--config", json.dumps(
            dict(CONFIG, hidden_size=32, num_heads=4)), "--ignore-extra")
        self.assertEqual(r.returncode, 1)
        self.assertIn("has shape [24, 16], the architecture needs [32, 16]", r.stderr)
        r = convert(npz, self.path("y.safetensors"), "--heads", 5, "--ignore-extra")
        self.assertEqual(r.returncode, 1)
        self.assertIn("num_heads 5 does not divide hidden_size 24", r.stderr)
        r = convert(self.path("nothing.npz"), self.path("y.safetensors"), "--heads", 3)
        self.assertEqual(r.returncode, 1)
        self.assertIn("no such file", r.stderr)
        r = convert(npz, self.path("y.safetensors"))  # no architecture
        self.assertEqual(r.returncode, 2)

    @unittest.skipIf(torch is None, "PyTorch not installed")
    def test_torch_snapshot(self):
        sd = {k: torch.from_numpy(np.array(v)) for k, v in self.tensors.items()}
        pt = self.path("snapshot.pt")
        torch.save({"ema": sd, "step": 10}, pt)
        out = self.path("from_torch.safetensors")
        r = convert(pt, out, "--config", json.dumps(CONFIG))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.check_output(out)

    def test_torch_missing_is_explained(self):
        if torch is not None:
            self.skipTest("PyTorch is installed")
        pt = self.path("snapshot.pkl")
        with open(pt, "wb") as f:
            f.write(b"not really a pickle")
        r = convert(pt, self.path("z.safetensors"), "--heads", 3)
        self.assertEqual(r.returncode, 1)
        self.assertIn("needs PyTorch", r.stderr)


if __name__ == "__main__":
    unittest.main()
