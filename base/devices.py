"""The machine as TensorFlow sees it: accelerators, the tf.distribute strategy, compute precision, and a quiet
TensorFlow start-up. Every command and package asks here; nothing else lists devices.

`accelerators()` is THE seam for GPU-only code paths: it returns the local GPUs, and tests replace it
(`use_fake_gpus`) to run the multi-GPU / mixed-precision branches on the CPU's logical devices.
`cpu_flags()` is the seam for the CPU's features (tests fake it with `use_fake_cpu_flags`), and
`use_fake_gpus(devices, capability)` also fakes the GPUs' compute capability: together they decide what
`--precision auto` means (`auto_precision`, the one home of that choice, per command: AUTO_ON_BF16_CPU).
`choose_strategy()`: MultiWorkerMirroredStrategy when TF_CONFIG is set (training; `local=True`, used by
extract and inference, ignores it), MirroredStrategy over several accelerators, OneDeviceStrategy on one,
else the default strategy. Strategies are made once per device set and reused: a second MirroredStrategy
in one process gets colliding collective keys (TF issue; it broke multi-GPU extract on an uneven batch),
so `choose_strategy` always returns the first one made.

Module import is cheap: TensorFlow is imported inside the functions (keeps `cli.py --help` fast).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

_FAKE: list | None = None  # devices that tests substitute for the GPUs (see use_fake_gpus)
_FAKE_CAPABILITY: tuple | None = None  # their compute capability, e.g. (8, 0); None: unknown (pre-Ampere)
_FAKE_CPU: frozenset | None = None  # CPU flags that tests substitute for /proc/cpuinfo's (use_fake_cpu_flags)
_STRATEGIES: dict = {}  # one strategy per device tuple, reused for the whole process

# TensorFlow start-up lines that are not problems on a machine without a GPU (they read as failures).
_NOISE = [re.compile(p) for p in (
    r"All log messages before absl::InitializeLog\(\) is called",
    r"oneDNN custom operations are on",
    r"cudart_stub\.cc.*Could not find cuda drivers",
    r"cpu_feature_guard\.cc",
    r"^To enable the following instructions",
    r"failed call to cuInit",
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"computation placer already registered",
    r"TF-TRT Warning",
)]


def has_gpu_driver() -> bool:
    """True when an NVIDIA driver is loaded (then CUDA messages are real and are never filtered)."""
    return os.path.exists("/proc/driver/nvidia/version")


def quiet_tensorflow():
    """Import TensorFlow with its start-up noise filtered: on a machine without a GPU driver, the oneDNN,
    CPU-feature and "failed call to cuInit" lines are dropped; every other line of stderr is passed on.
    Returns the tensorflow module. Idempotent."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if has_gpu_driver():
        import tensorflow as tf

        return tf
    with _filtered_stderr():
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # the cuInit attempt happens here
    return tf


@contextlib.contextmanager
def _filtered_stderr():
    """Capture file descriptor 2 (C++ logging writes there) and re-emit the lines that are not noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode("utf-8", "replace").splitlines()
                    if line.strip() and not any(p.search(line) for p in _NOISE)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")


def accelerators() -> list:
    """The local accelerators (logical GPU devices), or the fakes a test installed. Sets memory growth on
    real GPUs first, so that extract and training can share one GPU (TensorFlow otherwise reserves all)."""
    if _FAKE is not None:
        return list(_FAKE)
    tf = quiet_tensorflow()
    for gpu in tf.config.list_physical_devices("GPU"):
        with contextlib.suppress(RuntimeError, ValueError):  # already initialised: the setting stays
            tf.config.experimental.set_memory_growth(gpu, True)
    return tf.config.list_logical_devices("GPU")


@contextlib.contextmanager
def use_fake_gpus(devices: list, capability: tuple | None = None):
    """Tests: pretend `devices` (e.g. two logical CPU devices) are the GPUs while the block runs, of compute
    capability `capability` ((8, 0) = Ampere; None = unknown, treated as pre-Ampere)."""
    global _FAKE, _FAKE_CAPABILITY
    old, _FAKE = _FAKE, list(devices)
    old_cap, _FAKE_CAPABILITY = _FAKE_CAPABILITY, capability
    try:
        yield
    finally:
        _FAKE, _FAKE_CAPABILITY = old, old_cap


def choose_strategy(local: bool = False):
    """THE tf.distribute strategy of this process (see the module docstring); the same object each call.
    `local`: this machine's devices only, even under TF_CONFIG (extract and inference: no collective
    with the other workers; extraction scales out by --shard)."""
    tf = quiet_tensorflow()
    if os.environ.get("TF_CONFIG") and not local:
        key = ("multi-worker",)
        make = tf.distribute.MultiWorkerMirroredStrategy
    else:
        devices = accelerators()
        key = tuple(d.name for d in devices)
        if len(devices) > 1:
            def make():
                return tf.distribute.MirroredStrategy([d.name for d in devices])
        elif len(devices) == 1:
            def make():
                return tf.distribute.OneDeviceStrategy(devices[0].name)
        else:
            return tf.distribute.get_strategy()
    if key not in _STRATEGIES:
        _STRATEGIES[key] = make()
    return _STRATEGIES[key]




@contextlib.contextmanager
def dtype_policy(name: str):
    """Run the block under Keras' global dtype policy `name`, restoring the previous policy afterwards
    (whatever happens), so nothing built later in the process inherits it."""
    import keras

    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy(previous)


# ---- compute precision ---------------------------------------------------------------------------------
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")  # Keras dtype policies a command may run under
PRECISION_CHOICES = ("auto", *PRECISIONS)  # what --precision accepts
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bfloat16 matmuls (AMX first)
# What `auto` runs on a CPU with native bfloat16, per command. Measured on a 2-core Xeon with AMX (the
# numbers and the accuracy cost: docs/precision.md): the InceptionV3 runs 2-3x faster in bfloat16 and its
# features keep a cosine >= 0.9999 to float32 ones, so every command whose cost is the CNN takes it; the
# decoder's train step runs 1.3-1.9x faster with the same validation perplexity. The inference decoder
# (initial_state/step: beam search, sampling) computes in float32 in every precision.
AUTO_ON_BF16_CPU = {
    "extract": "mixed_bfloat16",  # the CNN is all the work
    "caption": "mixed_bfloat16",  # the CNN on image files (cached features: no CNN, nothing changes)
    "evaluate": "mixed_bfloat16",  # likewise
    "export": "mixed_bfloat16",  # the exported graph's CNN; outputs stay float32
    "finetune": "mixed_bfloat16",  # the CNN's forward + backward passes dominate: 2.3-2.4x float32
    "train-decoder": "mixed_bfloat16",  # 1.3-1.9x float32 captions/s, same validation perplexity
    "train-scst": "float32",  # its time is the sampling (float32 decoder steps) and CIDEr: nothing to gain
}


def cpu_flags() -> frozenset:
    """The CPU's feature flags (the `flags` line of /proc/cpuinfo; empty where there is none), or the fakes
    a test installed (use_fake_cpu_flags)."""
    if _FAKE_CPU is not None:
        return _FAKE_CPU
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@contextlib.contextmanager
def use_fake_cpu_flags(flags):
    """Tests: pretend the CPU has exactly `flags` (e.g. {"amx_bf16"} or ()) while the block runs."""
    global _FAKE_CPU
    old, _FAKE_CPU = _FAKE_CPU, frozenset(flags)
    try:
        yield
    finally:
        _FAKE_CPU = old


def cpu_bfloat16() -> str:
    """The CPU flag that makes bfloat16 matmuls native ("amx_bf16" or "avx512_bf16"), or "" when none."""
    flags = cpu_flags()
    return next((f for f in BF16_CPU_FLAGS if f in flags), "")


def _has_gpus() -> bool:
    """True when there are GPUs (or test fakes). Lists physical devices only: unlike `accelerators()` it does
    not start TensorFlow's runtime, which a multi-worker strategy must configure first (collective ops)."""
    if _FAKE is not None:
        return bool(_FAKE)
    return bool(quiet_tensorflow().config.list_physical_devices("GPU"))


def gpu_capability() -> tuple | None:
    """The lowest compute capability (major, minor) of the accelerators; None when unknown or none."""
    if _FAKE is not None:
        return _FAKE_CAPABILITY if _FAKE else None
    tf = quiet_tensorflow()
    caps = []
    for gpu in tf.config.list_physical_devices("GPU"):
        with contextlib.suppress(Exception):  # a device without details: unknown
            caps.append(tuple(tf.config.experimental.get_device_details(gpu)["compute_capability"]))
    return min(caps) if caps else None


def auto_precision(command: str) -> tuple[str, str]:
    """(precision, why) that `--precision auto` runs `command` in on this machine. GPUs: compute capability
    >= 8.0 (Ampere and later) mixed_bfloat16 (float16's speed, no loss scaling), older or unknown ones
    mixed_float16 (with loss scaling); a CPU with native bfloat16: AUTO_ON_BF16_CPU; else float32."""
    if command not in AUTO_ON_BF16_CPU:
        raise ValueError(f"no auto precision for command {command!r}")
    if _has_gpus():
        cap = gpu_capability()
        if cap is not None and tuple(cap) >= (8, 0):
            return "mixed_bfloat16", f"GPU compute capability {cap[0]}.{cap[1]} >= 8.0"
        named = f"{cap[0]}.{cap[1]}" if cap else "unknown"
        return "mixed_float16", f"GPU compute capability {named} < 8.0: no native bfloat16"
    flag = cpu_bfloat16()
    if not flag:
        return "float32", "CPU without native bfloat16"
    chosen = AUTO_ON_BF16_CPU[command]
    kept = f"; {command} stays float32 (docs/precision.md)" if chosen == "float32" else ""
    return chosen, f"CPU with {flag}{kept}"


def resolve_precision(requested: str, command: str) -> tuple[str, str]:
    """(precision, why) for a --precision value: "auto" through `auto_precision`, any other name as given.
    ValueError for a name that is not a precision (the command line offers only PRECISION_CHOICES)."""
    if requested == "auto":
        return auto_precision(command)
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}: use one of {', '.join(PRECISION_CHOICES)}")
    return requested, "asked for"


def precision_line(requested: str, command: str) -> tuple[str, str]:
    """(precision, the one line a command prints at its start, e.g. "precision: mixed_bfloat16 (auto: CPU
    with amx_bf16)")."""
    chosen, why = resolve_precision(requested, command)
    return chosen, f"precision: {chosen} ({'auto: ' + why if requested == 'auto' else 'asked for'})"


_SCOPED: list = []  # stack of precisions set by `using_precision` (inference code deep below a command)


@contextlib.contextmanager
def using_precision(precision: str):
    """Run the block with `precision` (a resolved name) as the inference precision: the CNN encoders that
    caption, evaluate and export build inside it read it with `inference_precision`."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}")
    _SCOPED.append(precision)
    try:
        yield precision
    finally:
        _SCOPED.pop()


def inference_precision(command: str = "extract") -> str:
    """The precision of a CNN built now: the innermost `using_precision`, else auto for `command`."""
    return _SCOPED[-1] if _SCOPED else auto_precision(command)[0]


def default_precision(command: str = "extract") -> str:
    """What `auto` runs `command` in on this machine (auto_precision without the reason)."""
    return auto_precision(command)[0]
