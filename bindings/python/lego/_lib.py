"""The C side: finding liblego, the option structs, the prototypes.

Every struct here mirrors one of include/lego.h field for field.  Each
starts with `size`; `new(cls)` fills it through the C `_init` function, so
defaults always come from the library, and the library reads only the fields
this version of the bindings knows (the header's ABI rule).
"""

import ctypes
import ctypes.util
import os

# The library's major version these structs were written against.
ABI_MAJOR = 0

# lego_status values (include/lego.h).
OK = 0
STATUS_NAMES = {
    0: "LEGO_OK",
    1: "LEGO_ERR_INVALID_ARGUMENT",
    2: "LEGO_ERR_OUT_OF_MEMORY",
    3: "LEGO_ERR_IO",
    4: "LEGO_ERR_FORMAT",
    5: "LEGO_ERR_SHAPE",
    6: "LEGO_ERR_UNSUPPORTED",
    7: "LEGO_ERR_CANCELLED",
    8: "LEGO_ERR_BACKEND",
    9: "LEGO_ERR_STATE",
}

MAX_BRICKS = 32

BACKENDS = {"cpu": 0, "cuda": 1}
PRECISIONS = {"fp32": 0, "bf16": 1, "fp16": 2}
SOLVERS = {"heun": 0, "euler": 1, "dpmpp2m": 2}
RNGS = {"philox": 0, "torch": 1}
SKIP_RULES = {"pg": 0, "pr": 1}  # TOP_AT_LOW_NOISE, TOP_AT_HIGH_NOISE
OPTIMIZERS = {"adamw": 0, "adam": 1}

c_int, c_double, c_float, c_size_t = ctypes.c_int, ctypes.c_double, ctypes.c_float, ctypes.c_size_t
c_int32, c_uint32, c_int64, c_uint64 = ctypes.c_int32, ctypes.c_uint32, ctypes.c_int64, ctypes.c_uint64
c_char_p, c_void_p = ctypes.c_char_p, ctypes.c_void_p
P = ctypes.POINTER


class ModelConfig(ctypes.Structure):
    _fields_ = [
        ("size", c_size_t),
        ("img_channels", c_int),
        ("img_resolution", c_int),
        ("label_dim", c_int),
        ("hidden_size", c_int),
        ("num_heads", c_int),
        ("mlp_ratio", c_double),
        ("frequency_embedding_size", c_int),
        ("sigma_data", c_double),
        ("num_threads", c_int),
        ("backend", c_int),
        ("device", c_int),
        ("precision", c_int),
    ]


class BrickConfig(ctypes.Structure):
    _fields_ = [
        ("size", c_size_t),
        ("brick_size", c_int),
        ("patch_size", c_int),
        ("depth", c_int),
    ]


class LoadOptions(ctypes.Structure):
    _fields_ = [
        ("size", c_size_t),
        ("config_json", c_char_p),
        ("num_threads", c_int),
        ("backend", c_int),
        ("device", c_int),
        ("precision", c_int),
    ]


class DenoiseRequest(ctypes.Structure):
    _fields_ = [
        ("size", c_size_t),
        ("n", c_int),
        ("height", c_int),
        ("width", c_int),
        ("x", P(c_float)),
        ("sigma", P(c_float)),
        ("labels", P(c_int32)),
        ("label_vectors", P(c_float)),
        ("guidance", c_float),
        ("num_bricks", c_int),
        ("skip_mask", c_uint32),
        ("out", P(c_float)),
        ("brick_outputs", P(c_float)),
        ("cond", P(c_float)),
    ]


class SkipPolicy(ctypes.Structure):
    _fields_ = [
        ("size", c_size_t),
        ("sigma_min", c_double * MAX_BRICKS),
        ("sigma_max", c_double * MAX_BRICKS),
        ("step_min", c_int * MAX_BRICKS),
        ("step_max", c_int * MAX_BRICKS),
    ]


PROGRESS_FN = ctypes.CFUNCTYPE(c_int, c_int, c_int, c_void_p)


class SampleOptions(ctypes.Structure):
    _fields_ = [
        ("size", c_size_t),
        ("solver", c_int),
        ("steps", c_int),
        ("sigma_min", c_double),
        ("sigma_max", c_double),
        ("rho", c_double),
        ("sigmas", P(c_double)),
        ("s_churn", c_double),
        ("s_min", c_double),
        ("s_max", c_double),
        ("s_noise", c_double),
        ("guidance", c_float),
        ("rng", c_int),
        ("skip", P(SkipPolicy)),
        ("progress", PROGRESS_FN),
        ("progress_user", c_void_p),
    ]


class SampleRequest(ctypes.Structure):
    _fields_ = [
        ("size", c_size_t),
        ("n", c_int),
        ("height", c_int),
        ("width", c_int),
        ("seeds", P(c_uint64)),
        ("labels", P(c_int32)),
        ("latents", P(c_float)),
        ("out", P(c_float)),
        ("labels_out", P(c_int32)),
        ("pad", c_int),
    ]


class SampleResult(ctypes.Structure):
    _fields_ = [
        ("size", c_size_t),
        ("network_evals", c_int64),
        ("brick_evals", c_int64),
        ("brick_evals_saved", c_int64),
    ]


class StepRequest(ctypes.Structure):
    _fields_ = [
        ("size", c_size_t),
        ("n", c_int),
        ("height", c_int),
        ("width", c_int),
        ("x", P(c_float)),
        ("t_cur", c_double),
        ("t_next", c_double),
        ("t_prev", c_double),
        ("step", c_int),
        ("labels", P(c_int32)),
        ("noise", P(c_float)),
        ("denoised", P(c_float)),
    ]


class TensorInfo(ctypes.Structure):
    _fields_ = [
        ("size", c_size_t),
        ("name", c_char_p),
        ("rank", c_int),
        ("shape", c_int64 * 4),
        ("offset", c_int64),
        ("numel", c_int64),
        ("trainable", c_int),
    ]


class PresetOptions(ctypes.Structure):
    _fields_ = [
        ("size", c_size_t),
        ("img_channels", c_int),
        ("img_resolution", c_int),
        ("label_dim", c_int),
        ("num_threads", c_int),
        ("backend", c_int),
        ("device", c_int),
        ("precision", c_int),
    ]


class TrainBatch(ctypes.Structure):
    _fields_ = [
        ("size", c_size_t),
        ("n", c_int),
        ("height", c_int),
        ("width", c_int),
        ("y", P(c_float)),
        ("noise", P(c_float)),
        ("sigma", P(c_float)),
        ("labels", P(c_int32)),
        ("label_vectors", P(c_float)),
        ("patch_fraction", c_double),
        ("patch_seed", c_uint64),
    ]


class TrainOptions(ctypes.Structure):
    _fields_ = [
        ("size", c_size_t),
        ("optimizer", c_int),
        ("lr", c_double),
        ("beta1", c_double),
        ("beta2", c_double),
        ("eps", c_double),
        ("weight_decay", c_double),
        ("warmup_steps", c_int),
        ("grad_clip", c_double),
        ("ema_halflife_kimg", c_double),
        ("ema_rampup_ratio", c_double),
        ("p_mean", c_double),
        ("p_std", c_double),
        ("label_dropout", c_double),
        ("hflip", c_int),
        ("height", c_int),
        ("width", c_int),
        ("seed", c_uint64),
        ("patch_fraction", c_double),
    ]


class TrainStats(ctypes.Structure):
    _fields_ = [
        ("size", c_size_t),
        ("step", c_int64),
        ("images_seen", c_int64),
        ("loss", c_double),
        ("grad_norm", c_double),
        ("lr", c_double),
        ("ema_beta", c_double),
        ("skipped", c_int),
        ("skipped_total", c_int64),
    ]


class DatasetOptions(ctypes.Structure):
    _fields_ = [
        ("size", c_size_t),
        ("resolution", c_int),
        ("pad_value", c_float),
        ("max_bytes", c_uint64),
        ("max_images", c_int64),
        ("labels_path", c_char_p),
    ]


# struct -> the name of its C _init function.
INITS = {
    ModelConfig: "lego_model_config_init",
    BrickConfig: "lego_brick_config_init",
    LoadOptions: "lego_load_options_init",
    DenoiseRequest: "lego_denoise_request_init",
    SkipPolicy: "lego_skip_policy_init",
    SampleOptions: "lego_sample_options_init",
    SampleRequest: "lego_sample_request_init",
    SampleResult: "lego_sample_result_init",
    StepRequest: "lego_step_request_init",
    TensorInfo: "lego_tensor_info_init",
    PresetOptions: "lego_preset_options_init",
    TrainBatch: "lego_train_batch_init",
    TrainOptions: "lego_train_options_init",
    TrainStats: "lego_train_stats_init",
    DatasetOptions: "lego_dataset_options_init",
}

# name: (restype, argtypes)
PROTOTYPES = {
    "lego_status_string": (c_char_p, [c_int]),
    "lego_version": (c_char_p, []),
    "lego_version_number": (c_int, []),
    "lego_model_create": (c_int, [P(ModelConfig), P(c_void_p)]),
    "lego_brick_add": (c_int, [c_void_p, P(BrickConfig)]),
    "lego_model_init_weights": (c_int, [c_void_p, c_uint64]),
    "lego_model_load": (c_int, [c_char_p, P(LoadOptions), P(c_void_p)]),
    "lego_model_load_weights": (c_int, [c_void_p, c_char_p]),
    "lego_model_save": (c_int, [c_void_p, c_char_p]),
    "lego_model_free": (None, [c_void_p]),
    "lego_model_error": (c_char_p, [c_void_p]),
    "lego_model_get_config": (c_int, [c_void_p, P(ModelConfig)]),
    "lego_model_num_bricks": (c_int, [c_void_p]),
    "lego_model_get_brick": (c_int, [c_void_p, c_int, P(BrickConfig)]),
    "lego_model_num_params": (c_int64, [c_void_p]),
    "lego_model_resolution_multiple": (c_int, [c_void_p]),
    "lego_model_check_resolution": (c_int, [c_void_p, c_int, c_int]),
    "lego_model_set_threads": (c_int, [c_void_p, c_int]),
    "lego_backend_available": (c_int, [c_int]),
    "lego_model_set_backend": (c_int, [c_void_p, c_int, c_int]),
    "lego_model_set_precision": (c_int, [c_void_p, c_int]),
    "lego_denoise": (c_int, [c_void_p, P(DenoiseRequest)]),
    "lego_karras_sigmas": (c_int, [c_int, c_double, c_double, c_double, P(c_double)]),
    "lego_skip_policy_preset": (c_int, [P(SkipPolicy), c_void_p, c_int, c_int, c_double, c_double]),
    "lego_sample": (c_int, [c_void_p, P(SampleRequest), P(SampleOptions), P(SampleResult)]),
    "lego_step": (c_int, [c_void_p, P(StepRequest), P(SampleOptions)]),
    "lego_model_num_tensors": (c_int, [c_void_p]),
    "lego_model_tensor_info": (c_int, [c_void_p, c_int, P(TensorInfo)]),
    "lego_model_get_params": (c_int, [c_void_p, P(c_float), c_int64]),
    "lego_model_set_params": (c_int, [c_void_p, P(c_float), c_int64]),
    "lego_images_to_u8": (c_int, [P(c_float), c_int, c_int, c_int, c_int, P(ctypes.c_uint8)]),
    "lego_write_png": (c_int, [c_char_p, P(ctypes.c_uint8), c_int, c_int, c_int, c_char_p, c_size_t]),
    "lego_write_png_grid": (c_int, [c_char_p, P(ctypes.c_uint8), c_int, c_int, c_int, c_int,
                                    c_int, c_int, c_char_p, c_size_t]),
    "lego_write_npz": (c_int, [c_char_p, P(ctypes.c_uint8), c_int, c_int, c_int, c_int,
                               P(c_int32), c_char_p, c_size_t]),
    "lego_preset_count": (c_int, []),
    "lego_preset_name": (c_char_p, [c_int]),
    "lego_preset_config": (c_int, [c_char_p, P(PresetOptions), P(ModelConfig)]),
    "lego_preset_num_bricks": (c_int, [c_char_p]),
    "lego_preset_get_brick": (c_int, [c_char_p, c_int, P(BrickConfig)]),
    "lego_preset_num_params": (c_int, [c_char_p, P(PresetOptions), P(c_int64)]),
    "lego_model_create_preset": (c_int, [c_char_p, P(PresetOptions), P(c_void_p)]),
    "lego_model_set_memory_budget": (c_int, [c_void_p, c_size_t]),
    "lego_model_memory_usage": (c_size_t, [c_void_p]),
    "lego_model_set_device_memory_budget": (c_int, [c_void_p, c_size_t]),
    "lego_model_device_memory_usage": (c_size_t, [c_void_p]),
    "lego_train_loss": (c_int, [c_void_p, P(TrainBatch), P(c_float), P(c_float)]),
    "lego_trainer_create": (c_int, [c_void_p, P(TrainOptions), P(c_void_p)]),
    "lego_trainer_step": (c_int, [c_void_p, P(c_float), P(c_int32), c_int, P(TrainStats)]),
    "lego_trainer_get_stats": (c_int, [c_void_p, P(TrainStats)]),
    "lego_trainer_save_state": (c_int, [c_void_p, c_char_p]),
    "lego_trainer_load_state": (c_int, [c_void_p, c_char_p]),
    "lego_trainer_export_ema": (c_int, [c_void_p, c_char_p]),
    "lego_trainer_free": (None, [c_void_p]),
    "lego_trainer_error": (c_char_p, [c_void_p]),
    "lego_dataset_open": (c_int, [c_char_p, P(DatasetOptions), P(c_void_p)]),
    "lego_dataset_free": (None, [c_void_p]),
    "lego_dataset_error": (c_char_p, [c_void_p]),
    "lego_dataset_count": (c_int64, [c_void_p]),
    "lego_dataset_shape": (c_int, [c_void_p, P(c_int), P(c_int), P(c_int)]),
    "lego_dataset_label_dim": (c_int, [c_void_p]),
    "lego_dataset_get": (c_int, [c_void_p, c_int64, P(c_float), P(c_int32)]),
    "lego_dataset_get_batch": (c_int, [c_void_p, P(c_int64), c_int, P(c_float), P(c_int32)]),
}
for _struct, _init in INITS.items():
    PROTOTYPES[_init] = (None, [P(_struct)])


def find_library():
    """The path (or name) of liblego: $LEGO_LIBRARY, else a copy next to
    this package, else wherever the system's linker finds "lego"."""
    env = os.environ.get("LEGO_LIBRARY")
    if env:
        if not os.path.exists(env):
            raise OSError("LEGO_LIBRARY=%s: no such file" % env)
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("liblego.so.0", "liblego.so", "liblego.dylib", "lego.dll"):
        path = os.path.join(here, name)
        if os.path.exists(path):
            return path
    found = ctypes.util.find_library("lego")
    if found:
        return found
    raise OSError("liblego not found: set LEGO_LIBRARY to the path of liblego.so, copy "
                  "liblego.so.0 next to the lego package, or install liblego where the "
                  "dynamic linker looks (make install; ldconfig)")


def load(path=None):
    """Open liblego, declare every prototype, check the ABI version."""
    lib = ctypes.CDLL(path or find_library())
    for name, (restype, argtypes) in PROTOTYPES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    major = lib.lego_version_number() // 10000
    if major != ABI_MAJOR:
        raise OSError("liblego %s has ABI %d; these bindings need %d"
                      % (lib.lego_version().decode(), major, ABI_MAJOR))
    return lib


_lib = None


def lib():
    """The library, opened on first use."""
    global _lib
    if _lib is None:
        _lib = load()
    return _lib


def new(cls):
    """A struct filled with the library's defaults (its _init function)."""
    s = cls()
    getattr(lib(), INITS[cls])(ctypes.byref(s))
    return s


def c_size_of(cls):
    """The struct's size as this library's _init writes it: the C sizeof
    of the library's own version of the struct."""
    buf = ctypes.create_string_buffer(4096)
    getattr(lib(), INITS[cls])(ctypes.cast(buf, P(cls)))
    return c_size_t.from_buffer(buf).value
