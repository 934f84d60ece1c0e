"""The GPU-only code paths run on the CPU (a helper script of tests/test_gpu_paths.py, not a test module).

`python tests/gpu_scenarios.py SCENARIO WORKDIR` splits the CPU into 2 logical devices before TensorFlow
initialises, then runs one scenario with those devices standing in for 2 GPUs (base.devices.use_fake_gpus,
THE accelerator seam): mixed_float16 compute and a MirroredStrategy over both devices, exactly the branches a
2-GPU machine takes. It prints one JSON line of findings; the test module makes the assertions.

Scenarios: "extract" (mixed precision + 2 replicas against the float32 single-device run, ragged and empty
per-replica batches, two encoders in one process, resume with another precision refused) and "train"
(train-decoder and finetune under mixed_float16 with SGD and Adam and a forced float16 overflow, then
caption).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import numpy as np  # noqa: E402

from base.devices import (  # noqa: E402
    choose_strategy,
    default_precision,
    quiet_tensorflow,
    use_fake_cpu_flags,
    use_fake_gpus,
)

tf = quiet_tensorflow()
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

from base.errors import InputError, RunStopped  # noqa: E402
from data.features import StoreWriter, open_store  # noqa: E402
from data.synthetic import generate_shapes  # noqa: E402
from extract.run import ExtractConfig, run_extract  # noqa: E402

SIZE = 75  # InceptionV3's smallest input


def fake_gpus():
    """The 2 logical CPU devices standing in for 2 GPUs."""
    return use_fake_gpus(tf.config.list_logical_devices("CPU"))


def policy() -> str:
    """Keras' global dtype policy name."""
    return keras.mixed_precision.dtype_policy().name


class Policies:
    """Records Keras' global dtype policy before and after each command: {command: [before, after]}."""

    def __init__(self):
        self.seen: dict[str, list[str]] = {}
        self.seconds: list = []  # [command, wall seconds] (for a look at where the time goes)

    def run(self, name: str, fn, *args, **kwargs):
        before, start = policy(), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seen.setdefault(name, []).append([before, policy()])
            self.seconds.append([name, round(time.perf_counter() - start, 1)])


def _features(path) -> dict:
    """{key: float32 features} and the stored dtype of a complete store."""
    with open_store(path) as store:
        feats = store.read_features()
        return {"rows": dict(zip(store.keys, np.asarray(feats, np.float32), strict=True)),
                "dtype": str(feats.dtype), "ok": bool(np.all(store.ok)), "run": dict(store.attrs["run"])}


def _extract(out, files, seed=0, batch_size=4, dtype="float16") -> ExtractConfig:
    return ExtractConfig(out=str(out), paths=[str(f) for f in files], cnn_weights="none", image_size=SIZE,
                         batch_size=batch_size, dtype=dtype, seed=seed, progress=False)


def _stop_after_one_batch(cfg: ExtractConfig) -> int:
    """Run `cfg` with the second commit failing (disk full): a partial store; returns its rows_done."""
    real, calls = StoreWriter.commit, []

    def flaky(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(self, *args)

    StoreWriter.commit = flaky
    try:
        run_extract(cfg)
    except RunStopped:
        pass
    finally:
        StoreWriter.commit = real
    with open_store(cfg.out, require_complete=False) as store:
        return int(store.rows_done)


def _refusal(cfg: ExtractConfig) -> str:
    try:
        run_extract(cfg)
    except InputError as err:
        return str(err)
    return ""


def scenario_extract(work: Path) -> dict:
    generate_shapes(work / "data", n_images=5, image_size=SIZE, seed=0)
    files = sorted((work / "data" / "images").glob("*.jpg"))
    calls = Policies()
    ref = {seed: _features(calls.run("extract", run_extract,
                                     _extract(work / f"ref{seed}.h5", files, seed, dtype="float32")).out)
           for seed in (0, 1)}
    out: dict = {"cpu_precision": default_precision(), "runs": []}
    # (seed, images, batch size): ragged (3 over 2 replicas) and empty (1 image) per-replica batches, then a
    # second encoder (seed 1) with batch 5 after batch 4: the old collective-key collision. The first run
    # stores float32, so its difference to the reference is the mixed_float16 compute alone.
    plan = [(0, 5, 4, "float32"), (0, 3, 4, "float16"), (0, 1, 4, "float16"), (1, 5, 5, "float16")]
    with fake_gpus():
        first = choose_strategy()
        out.update(replicas=first.num_replicas_in_sync, same_strategy=choose_strategy() is first,
                   strategy=type(first).__name__, fake_precision=default_precision())
        for i, (seed, n, batch, dtype) in enumerate(plan):
            cfg = _extract(work / f"fake{i}.h5", files[:n], seed, batch, dtype)
            keras.mixed_precision.set_dtype_policy("float64" if i == 1 else "float32")  # restored, not reset
            got = _features(calls.run("extract", run_extract, cfg).out)
            keras.mixed_precision.set_dtype_policy("float32")
            rel = max(float(np.abs(got["rows"][k] - ref[seed]["rows"][k]).max()) for k in got["rows"])
            scale = max(float(np.abs(ref[seed]["rows"][k]).max()) for k in got["rows"])
            out["runs"].append({"seed": seed, "images": n, "batch": batch, "rows": len(got["rows"]),
                                "dtype": got["dtype"], "ok": got["ok"], "rel_diff": rel / scale,
                                "finite": all(np.isfinite(v).all() for v in got["rows"].values()),
                                "precision": got["run"].get("precision")})
    out["ref_precision"] = ref[0]["run"].get("precision")
    # A store started on the CPU (float32) and resumed on the "GPUs" (mixed_float16), and the reverse.
    cpu_cfg = _extract(work / "cpu_first.h5", files, dtype="float32")
    out["cpu_partial_rows"] = _stop_after_one_batch(cpu_cfg)
    with fake_gpus():
        out["cpu_then_gpu"] = _refusal(cpu_cfg)
        gpu_cfg = _extract(work / "gpu_first.h5", files, dtype="float32")
        out["gpu_partial_rows"] = _stop_after_one_batch(gpu_cfg)
        # a finished store is reported complete on a machine of the other kind (nothing would be mixed)
        done = calls.run("extract", run_extract, _extract(work / "ref0.h5", files, dtype="float32"))
        out["complete_elsewhere"] = [done.already_complete, done.done_now]
    out["gpu_then_cpu"] = _refusal(gpu_cfg)
    resumed = calls.run("extract", run_extract, cpu_cfg)  # same precision: resumes to identical bytes
    with open_store(resumed.out) as a, open_store(work / "ref0.h5") as b:  # the same command, not stopped
        out["resume_identical"] = a.read_features().tobytes() == b.read_features().tobytes()
    out["resumed_skipped"] = resumed.skipped
    out["policies"], out["seconds"] = calls.seen, calls.seconds
    return out


def _trained(result, model_dir: Path, logs: list[str]) -> dict:
    """What a training run left: steps, skipped steps, finite weights, the loss scale of its last
    checkpoint (the slot before good_steps, the last slot), the recorded precision, the replicas."""
    from decoder.train.checkpoints import CheckpointManager, read_checkpoint
    from decoder.train.loop import weights_finite

    manager = CheckpointManager(model_dir / "checkpoints")
    arrays = read_checkpoint(manager.path(manager.steps()[-1]))
    slots = sorted(int(k[4:]) for k in arrays if k.startswith("opt/"))
    config = json.loads((model_dir / "config.json").read_text())
    return {"step": result.step, "skipped": result.skipped_steps, "finite": weights_finite(result.trainable),
            "loss_scale": float(arrays[f"opt/{slots[-2]}"]), "val_perplexity": result.val_perplexity,
            "precision": config["train"]["precision"], "two_replicas": any("2 replica(s)" in m for m in logs)}


def _single_pair_batch(pairs: int) -> int:
    """A batch size >= 8 leaving a last batch of 1 pair: one replica's share of it is empty."""
    return next(b for b in range(8, pairs) if pairs % b == 1)


def scenario_train(work: Path) -> dict:
    from data.captions import load_annotations
    from decoder.infer.captioner import Captioner, caption_files
    from decoder.train.config import TrainConfig
    from decoder.train.finetune import FinetuneConfig, finetune, phase2_recipe
    from decoder.train.train_decoder import DataConfig, train_decoder

    captions = generate_shapes(work / "data", n_images=12, image_size=SIZE, seed=0)
    images = work / "data" / "images"
    pairs = sum(len(r.captions) for r in load_annotations([captions]).part("train"))
    odd = _single_pair_batch(pairs)
    calls, out = Policies(), {"pairs": pairs, "odd_batch": odd}
    with fake_gpus():
        store = calls.run("extract", run_extract, ExtractConfig(
            out=str(work / "features.h5"), images=[str(images)], captions=[str(captions)], cnn_weights="none",
            image_size=SIZE, batch_size=8, progress=False)).out
        # The reproduction: mixed_float16 and an initial loss scale of 1e12 (every gradient overflows
        # float16 until the scale has come down), with SGD (the default recipe) and with Adam.
        for opt, lr, batch in (("sgd", 1.0, 8), ("adam", 0.01, odd)):
            logs: list[str] = []
            train = TrainConfig(batch_size=batch, steps=30, optimizer=opt, learning_rate=lr, eval_every=0,
                                checkpoint_every=10, precision="mixed_float16", loss_scale=1e12)
            result = calls.run("train-decoder", train_decoder, DataConfig(store, [str(captions)],
                                                                          min_word_count=1),
                               work / f"decoder-{opt}", train, embedding_size=16, lstm_units=16,
                               progress=False, log=logs.append)
            out[f"train-decoder {opt}"] = _trained(result, work / f"decoder-{opt}", logs)
        # finetune, precision "auto" (mixed_float16 on the fake GPUs): SGD with the overflow; Adam without,
        # one whole epoch of `odd` batches (its last one has 1 pair: replica 1 gets none).
        for opt, scale, lr, batch, steps in (("sgd", 1e12, 0.01, 8, 3), ("adam", 32768.0, 1e-4, odd,
                                                                          -(-pairs // odd))):
            logs = []
            train = phase2_recipe(batch_size=batch, steps=steps, optimizer=opt, learning_rate=lr,
                                  eval_every=0, checkpoint_every=2, precision="auto", loss_scale=scale,
                                  max_val_pairs=8)
            cfg = FinetuneConfig(model_dir=str(work / "decoder-sgd"), images=[str(images)],
                                 captions=[str(captions)], trainable_blocks=1, decode_threads=2)
            result = calls.run("finetune", finetune, cfg, work / f"finetune-{opt}", train, progress=False,
                               log=logs.append)
            out[f"finetune {opt}"] = _trained(result, work / f"finetune-{opt}", logs)
        captioner = Captioner(work / "finetune-adam")
        run = calls.run("caption", caption_files, captioner, [str(images)], batch_size=5, progress=False)
        out["captioned"] = [run.n_ok, len(run.results)]
    out["policies"], out["seconds"] = calls.seen, calls.seconds
    return out


SCENARIOS = {"extract": scenario_extract, "train": scenario_train}


if __name__ == "__main__":
    name, workdir = sys.argv[1], Path(sys.argv[2])
    workdir.mkdir(parents=True, exist_ok=True)
    with use_fake_cpu_flags(()):  # the CPU reference runs float32 also on a CPU with native bfloat16
        print(json.dumps(SCENARIOS[name](workdir)))
