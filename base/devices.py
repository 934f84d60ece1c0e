"""The machine as TensorFlow sees it: accelerators, the tf.distribute strategy, compute precision, and a quiet
TensorFlow start-up. Every command and package asks here; nothing else lists devices.

`accelerators()` is THE seam for GPU-only code paths: it returns the local GPUs, and tests replace it
(`use_fake_gpus`) to run the multi-GPU / mixed-precision branches on the CPU's logical devices.
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
def use_fake_gpus(devices: list):
    """Tests: pretend `devices` (e.g. two logical CPU devices) are the GPUs while the block runs."""
    global _FAKE
    old, _FAKE = _FAKE, list(devices)
    try:
        yield
    finally:
        _FAKE = old


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


def default_precision() -> str:
    """"mixed_float16" when accelerators are present (faster on GPUs), else "float32"."""
    return "mixed_float16" if accelerators() else "float32"


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
