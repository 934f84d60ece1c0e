"""The GPU-only code paths, run on the CPU (see docs/gpu.md).

Every branch taken only with a GPU goes through THE seam `base.devices.accelerators()`; the scenarios of
tests/gpu_scenarios.py replace it (`use_fake_gpus`) with the CPU split into 2 logical devices, so extract,
train-decoder, finetune and caption run with mixed_float16 compute and a MirroredStrategy over 2 replicas.
Each scenario runs in its own subprocess (the logical devices must be set before TensorFlow initialises).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
# max|mixed_float16 - float32| / max|float32| of InceptionV3 features (measured 3.2e-3 to 3.8e-3 at 75 px).
MIXED_TOLERANCE = 1e-2
# ... and above this, the mixed_float16 compute did run (float32 on 2 replicas differs by ~1e-7).
MIXED_FOOTPRINT = 1e-4


def _scenario(name: str, work: Path) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "gpu_scenarios.py"), name, str(work)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _policies_kept(seen: dict) -> None:
    for command, calls in seen.items():
        for before, after in calls:
            assert before == after, f"{command} left Keras' dtype policy at {after} (was {before})"


@pytest.mark.slow
def test_extract_mixed_precision_on_two_replicas(tmp_path):
    out = _scenario("extract", tmp_path)
    assert out["cpu_precision"] == "float32" and out["fake_precision"] == "mixed_float16"
    assert out["strategy"] == "MirroredStrategy" and out["replicas"] == 2 and out["same_strategy"]
    assert out["ref_precision"] == "float32"
    # 5 images batch 4 (4 + 1: an empty replica), 3 images (2 + 1), 1 image (1 + 0), then a second encoder
    # (seed 1) with batch 5: all in one process, against the float32 single-device features.
    assert [(r["seed"], r["images"], r["batch"]) for r in out["runs"]] == [(0, 5, 4), (0, 3, 4), (0, 1, 4),
                                                                           (1, 5, 5)]
    for run in out["runs"]:
        assert run["rows"] == run["images"] and run["ok"] and run["finite"], run
        assert run["precision"] == "mixed_float16", run
        assert run["rel_diff"] <= MIXED_TOLERANCE, run
    assert [r["dtype"] for r in out["runs"]] == ["float32", "float16", "float16", "float16"]
    assert out["runs"][0]["rel_diff"] > MIXED_FOOTPRINT  # not a float32 encoder reused from the cache
    # A store started with one precision is not resumed with the other; the same precision resumes.
    assert out["cpu_partial_rows"] == 4 and out["gpu_partial_rows"] == 4
    assert "differs in: compute precision (float32 in the file, mixed_float16 on this machine)" in \
        out["cpu_then_gpu"]
    assert "differs in: compute precision (mixed_float16 in the file, float32 on this machine)" in \
        out["gpu_then_cpu"]
    assert out["resumed_skipped"] == 4 and out["resume_identical"]
    assert out["complete_elsewhere"] == [True, 0]  # a finished float32 store rerun on the "GPUs": complete
    _policies_kept(out["policies"])
    assert any(before == "float64" for before, _ in out["policies"]["extract"])  # restored, not reset


def _skipped_and_scaled(run: dict, steps: int, initial_scale: float) -> None:
    assert run["step"] == steps and run["finite"] and math.isfinite(run["val_perplexity"]), run
    assert run["precision"] == "mixed_float16" and run["two_replicas"], run
    # every skipped step halved the scale (no growth: fewer than 2000 good steps)
    assert run["loss_scale"] == pytest.approx(initial_scale * 0.5 ** run["skipped"], rel=1e-6), run


@pytest.mark.slow
def test_training_mixed_float16_on_two_replicas_skips_overflowing_steps(tmp_path):
    out = _scenario("train", tmp_path)
    pairs, odd = out["pairs"], out["odd_batch"]
    assert pairs % odd == 1  # batches of `odd` pairs end with a 1-pair batch: replica 1's share is empty
    for opt in ("sgd", "adam"):  # the reproduction: loss scale 1e12 overflows float16
        run = out[f"train-decoder {opt}"]
        assert 10 <= run["skipped"] < run["step"], run  # skipped until the scale came down, then trained
        _skipped_and_scaled(run, 30, 1e12)
    run = out["finetune sgd"]  # precision "auto" on the fake GPUs; scale 1e12; batch 8
    assert run["skipped"] >= 1, run
    _skipped_and_scaled(run, 3, 1e12)
    run = out["finetune adam"]  # default scale 32768; one epoch of `odd` batches
    assert run["skipped"] < run["step"], run
    _skipped_and_scaled(run, math.ceil(pairs / odd), 32768.0)
    assert out["captioned"] == [12, 12]
    assert set(out["policies"]) == {"extract", "train-decoder", "finetune", "caption"}
    _policies_kept(out["policies"])


def test_optimizers_never_apply_a_skipped_step():
    """apply=False with inf/NaN gradients leaves every variable (and Adam's slots) as it was; the old SGD
    multiplied the learning rate by 0, and 0 * inf = NaN."""
    import tensorflow as tf

    from decoder.train.optim import SGD, Adam

    strategy = tf.distribute.get_strategy()
    for kind in (SGD, Adam):
        dense, table = tf.Variable(np.ones((2, 3), np.float32)), tf.Variable(np.ones((4, 2), np.float32))
        opt = kind([dense, table])
        bad = [tf.constant([[np.inf, 1.0, np.nan]] * 2, tf.float32),
               tf.IndexedSlices(tf.constant([[np.inf, -np.inf]]), tf.constant([1]), tf.constant([4, 2]))]
        opt.apply(strategy, bad, tf.constant(0.5), tf.constant(1.0), tf.constant(False))
        assert (dense.numpy() == 1).all() and (table.numpy() == 1).all()
        assert all(np.isfinite(s.numpy()).all() for s in opt.slot_variables())
        good = [tf.ones((2, 3)), tf.IndexedSlices(tf.ones((1, 2)), tf.constant([1]), tf.constant([4, 2]))]
        opt.apply(strategy, good, tf.constant(0.5), tf.constant(1.0), tf.constant(True))
        assert (dense.numpy() < 1).all() and (table.numpy()[1] < 1).all() and (table.numpy()[0] == 1).all()


def test_the_seam_selects_precision_and_local_strategy(monkeypatch):
    import tensorflow as tf

    from base import devices
    from base.devices import accelerators, choose_strategy, default_precision, use_fake_gpus

    with use_fake_gpus([]), devices.use_fake_cpu_flags(()):  # CPU without native bfloat16 (docs/precision.md)
        assert accelerators() == [] and default_precision() == "float32"
    with use_fake_gpus(tf.config.list_logical_devices("CPU")[:1]):
        assert len(accelerators()) == 1 and default_precision() == "mixed_float16"
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                                                "task": {"type": "worker", "index": 0}}))
    with use_fake_gpus([]):  # extract and inference never join the training cluster of TF_CONFIG
        assert choose_strategy(local=True) is tf.distribute.get_strategy()


def test_real_gpus_get_memory_growth(monkeypatch):
    import tensorflow as tf

    from base import devices

    grown = []
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["gpu0", "gpu1"])
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", lambda d, on: grown.append((d, on)))
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: ["logical0", "logical1"])
    assert devices.accelerators() == ["logical0", "logical1"]
    assert grown == [("gpu0", True), ("gpu1", True)]


_BYPASS = re.compile(r"list_physical_devices\(|list_logical_devices\(|set_dtype_policy\(|set_global_policy\("
                     r"|distribute\.(MultiWorker)?MirroredStrategy|OneDeviceStrategy\(|set_memory_growth\("
                     r"|[\"']mixed_float16[\"'] if ")


def test_every_gpu_branch_goes_through_the_seam():
    """Device listing, strategies and the global dtype policy live in base/devices.py only."""
    files = [REPO / "cli.py", *(p for d in ("data", "extract", "decoder", "beam", "evaluation")
                                for p in (REPO / d).rglob("*.py"))]
    found = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in files if p.name != "devices.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if _BYPASS.search(line)]
    assert not found, "GPU branches outside base.devices:\n" + "\n".join(found)
