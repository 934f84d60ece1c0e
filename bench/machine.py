"""What the benches measure against: the CPU's model name (lscpu), whether it runs bfloat16 natively
(base.devices: amx_bf16 / avx512_bf16 in /proc/cpuinfo), and the dense-matmul FLOP/s of a dtype, the
physical limit a FLOP utilisation divides by. A CPU without native bfloat16 runs only the float32 lines."""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

from base.devices import cpu_bfloat16

BF16 = "mixed_bfloat16"


def cpu_model() -> str:
    """lscpu's "Model name" (or "unknown CPU")."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else "unknown CPU"


def precisions() -> tuple[list[str], str]:
    """(the precisions to bench: float32, plus mixed_bfloat16 where the CPU runs it natively, the line that
    says so with the CPU's model name)."""
    flag = cpu_bfloat16()
    if flag:
        return ["float32", BF16], f"CPU: {cpu_model()}; native bfloat16: {flag}"
    return ["float32"], (f"CPU: {cpu_model()}; no native bfloat16 (no amx_bf16/avx512_bf16): the bfloat16 "
                         "lines are skipped")


def compute_dtype(precision: str) -> str:
    """The matmul dtype of a Keras precision policy: "bfloat16" for mixed_bfloat16, etc."""
    return {"float32": "float32", "mixed_float16": "float16", BF16: "bfloat16"}[precision]


_MATMULS: dict = {}  # (n, dtype) -> (matmul tf.function, operand), built and warmed up once


def matmul_rate(n: int, dtype: str = "float32", reps: int = 2) -> float:
    """Dense [n, n] @ [n, n] FLOP/s in `dtype` over `reps` products (the function is traced and warmed up
    on the first call for (n, dtype), so interleaved calls measure only the products)."""
    import tensorflow as tf

    if (n, dtype) not in _MATMULS:
        a = tf.cast(tf.random.normal([n, n]), dtype)
        mm = tf.function(lambda x: tf.matmul(x, x))
        mm(a).numpy()
        _MATMULS[n, dtype] = mm, a
    mm, a = _MATMULS[n, dtype]
    t = time.perf_counter()
    for _ in range(reps):
        out = mm(a)
    out.numpy()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def bench_parser(doc: str, smoke_help: str, shared_data: Path | None = None,
                 shared_help: str = "") -> argparse.ArgumentParser:
    """The argument parser every bench starts from: its docstring's first line as description, `--smoke`
    (toy sizes; what `make test` runs) and, when `shared_data` is given, `--shared-data` (default it)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if shared_data is not None:
        parser.add_argument("--shared-data", type=Path, default=shared_data, help=shared_help)
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    return parser
