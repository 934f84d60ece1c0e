"""--precision auto|float32|mixed_float16|mixed_bfloat16 (docs/precision.md).

What `auto` means is decided in base.devices from the machine's capabilities, which the tests fake (CPU flags,
GPUs and their compute capability). The slow tests run the commands in bfloat16 at toy sizes on this CPU
(in-process) and compare with float32 within the documented tolerances. The CNN has random weights here
(--cnn-weights none): the measurement on real photos with real statistics is in docs/precision.md.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import coco_ramp_images, make_dataset, make_good_images, tiny_caption_model, tiny_model_dir_for

import cli
from base import devices
from base.devices import AUTO_ON_BF16_CPU, PRECISIONS, auto_precision, resolve_precision

COMMANDS = ("extract", "caption", "evaluate", "export", "train-decoder", "train-scst", "finetune")
# Tolerances (docs/precision.md): bfloat16 has an 8-bit mantissa (relative step 2**-8 = 0.0039).
FEATURE_COSINE = 0.99  # per-row cosine of bfloat16 vs float32 CNN features, the worst row
BF16 = "mixed_bfloat16"
FEATURE_REL = 0.05  # |bf16 - f32| / |f32| per row (L2), the worst row
CAPTION_SAME = 0.75  # share of images whose best caption is the same in bfloat16 and float32 (at least)
LOGPROB_GAP = 0.25  # |log p| difference of an image's best caption when it is the same caption (at most)


def _fakes(flags=(), gpus=(), capability=None):
    """Context: the CPU has `flags`, the GPUs are `gpus` (placeholders) of compute capability `capability`."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(devices.use_fake_cpu_flags(flags))
    stack.enter_context(devices.use_fake_gpus(list(gpus), capability))
    return stack


@pytest.mark.parametrize("flags, gpus, capability, want", [
    ({"amx_bf16", "avx512_bf16"}, (), None, "table"),  # AMX Xeon: per command (AUTO_ON_BF16_CPU)
    ({"avx512_bf16"}, (), None, "table"),  # AVX512-BF16 without AMX: native bfloat16 as well
    ({"avx2", "fma"}, (), None, "float32"),  # a CPU without bfloat16
    ({"amx_bf16"}, ("gpu0",), (8, 0), "mixed_bfloat16"),  # Ampere: bfloat16 for every command
    ({"amx_bf16"}, ("gpu0", "gpu1"), (9, 0), "mixed_bfloat16"),  # Hopper
    ((), ("gpu0",), (7, 0), "mixed_float16"),  # Volta: float16 with loss scaling
    ((), ("gpu0",), None, "mixed_float16"),  # a GPU of unknown capability: as before bfloat16 GPUs
])
def test_auto_is_resolved_from_the_machine(flags, gpus, capability, want):
    with _fakes(flags, gpus, capability):
        for command in COMMANDS:
            chosen, why = auto_precision(command)
            assert chosen == (AUTO_ON_BF16_CPU[command] if want == "table" else want), (command, why)
            assert resolve_precision("auto", command) == (chosen, why)
            assert why  # the reason printed with the choice
            for name in PRECISIONS:  # an explicit precision is taken as given, whatever the machine
                assert resolve_precision(name, command)[0] == name


def test_the_bf16_cpu_table_runs_the_cnn_commands_in_bfloat16():
    """Measured (docs/precision.md): every command whose cost is the CNN runs bfloat16 on an AMX CPU."""
    assert set(AUTO_ON_BF16_CPU) == set(COMMANDS)
    for command in ("extract", "caption", "evaluate", "export", "finetune"):
        assert AUTO_ON_BF16_CPU[command] == "mixed_bfloat16"
    with _fakes({"amx_bf16"}):
        line = devices.precision_line("auto", "extract")[1]
    assert line == "precision: mixed_bfloat16 (auto: CPU with amx_bf16)"


def test_real_cpu_flags_are_read_from_proc_cpuinfo():
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    flags = devices.cpu_flags()
    assert ("amx_bf16" in flags) == (" amx_bf16" in text) and ("sse2" in flags) == (" sse2" in text)
    with devices.use_fake_cpu_flags(()):
        assert devices.cpu_flags() == frozenset() and devices.cpu_bfloat16() == ""
    assert devices.cpu_flags() == flags  # the fake is gone


@pytest.mark.parametrize("command", COMMANDS)
def test_every_network_command_takes_precision(command):
    option = next(p for p in cli.main.commands[command].params if p.name == "precision")
    assert list(option.type.choices) == ["auto", *PRECISIONS] and option.default == "auto"
    result = CliRunner().invoke(cli.main, [command, "--precision", "float8"])
    assert result.exit_code == 2 and "'float8' is not one of" in result.output


def test_unknown_names_are_refused_where_the_cli_is_bypassed():
    from base.errors import InputError
    from decoder.train.config import TrainConfig

    with pytest.raises(ValueError, match="unknown precision 'half'"):
        resolve_precision("half", "extract")
    with pytest.raises(InputError, match="Unknown precision 'half'"):
        TrainConfig(precision="half", steps=1).validate()
    with _fakes({"amx_bf16"}):
        assert TrainConfig(precision="auto", steps=1).resolve_precision("finetune").precision == BF16
    with _fakes(()):
        assert TrainConfig(precision="auto", steps=1).resolve_precision("finetune").precision == "float32"


# ---- the commands in bfloat16 on this CPU (in-process, toy sizes) ----------------------------------------


def _policy() -> str:
    import keras

    return keras.mixed_precision.dtype_policy().name


def _extract(out, images, precision, batch_size=4):
    from extract.run import ExtractConfig, run_extract

    cfg = ExtractConfig(out=str(out), paths=[str(images)], cnn_weights="none", image_size=75, dtype="float32",
                        batch_size=batch_size, precision=precision, progress=False)
    lines = []
    run_extract(cfg, log=lines.append)
    return lines


def _features(path):
    from data.features import open_store

    with open_store(path) as store:
        return np.asarray(store.read_features(), np.float32), dict(store.attrs["run"])


@pytest.mark.slow
def test_extract_in_bfloat16_agrees_with_float32_and_never_mixes(tmp_path):
    from base.errors import InputError

    images = tmp_path / "images"
    make_good_images(images, n=8, size=(90, 80))
    lines = _extract(tmp_path / "bf16.h5", images, "mixed_bfloat16")
    assert "precision: mixed_bfloat16 (asked for)" in lines and _policy() == "float32"
    _extract(tmp_path / "f32.h5", images, "float32")
    _extract(tmp_path / "f32b.h5", images, "float32")
    bf16, run = _features(tmp_path / "bf16.h5")
    f32, run32 = _features(tmp_path / "f32.h5")
    assert run["precision"] == "mixed_bfloat16" and run32["precision"] == "float32"
    assert np.array_equal(f32, _features(tmp_path / "f32b.h5")[0])  # float32 stays bit-reproducible
    cosine = (bf16 * f32).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(f32, axis=1)
    rel = np.linalg.norm(bf16 - f32, axis=1) / np.linalg.norm(f32, axis=1)
    assert cosine.min() >= FEATURE_COSINE and rel.max() <= FEATURE_REL, (cosine.min(), rel.max())
    assert rel.max() > 1e-4  # bfloat16 did run (float32 twice: identical)
    # A store started in one precision is not resumed in another (an incomplete one: a complete one is done).
    import h5py

    with h5py.File(tmp_path / "bf16.h5", "r+") as f:
        f.attrs.modify("rows_done", np.int64(4))
        f.attrs.modify("complete", np.bool_(False))
    with pytest.raises(InputError, match=r"compute precision \(mixed_bfloat16 in the file, float32 on this "
                                         r"machine\) - resume with --precision mixed_bfloat16"):
        _extract(tmp_path / "bf16.h5", images, "float32")
    _extract(tmp_path / "bf16.h5", images, "mixed_bfloat16")  # the same precision resumes
    assert np.allclose(_features(tmp_path / "bf16.h5")[0], bf16, rtol=0, atol=1e-6)


def _train_decoder(store, captions, model_dir, precision, steps=12):
    from decoder.train.config import TrainConfig
    from decoder.train.train_decoder import DataConfig, train_decoder

    cfg = TrainConfig(batch_size=8, steps=steps, optimizer="adam", learning_rate=0.01, eval_every=0,
                      checkpoint_every=6, precision=precision)
    return train_decoder(DataConfig(str(store), [str(captions)], min_word_count=1), model_dir, cfg,
                         embedding_size=16, lstm_units=16, progress=False, log=lambda m: None)


@pytest.mark.slow
def test_training_commands_run_in_bfloat16_and_never_mix(tmp_path):
    """train-decoder, train-scst and finetune in mixed_bfloat16 at toy sizes: the precision is recorded in
    config.json, the weights stay float32 and finite, Keras' policy is restored, and a model dir is never
    resumed in another precision."""
    from base.errors import InputError
    from data.captions import load_annotations
    from data.synthetic import generate_shapes
    from decoder.train.finetune import FinetuneConfig, finetune, phase2_recipe
    from decoder.train.scst import ScstConfig, scst_recipe, train_scst

    store, captions = make_dataset(tmp_path / "d", n_images=30)
    result = _train_decoder(store, captions, tmp_path / "xe", "mixed_bfloat16")
    assert _policy() == "float32" and np.isfinite(result.val_perplexity)
    config = json.loads((tmp_path / "xe" / "config.json").read_text())
    assert config["train"]["precision"] == "mixed_bfloat16"
    with pytest.raises(InputError, match=r"different configuration: train\.precision"):
        _train_decoder(store, captions, tmp_path / "xe", "float32", steps=18)
    quiet = {"progress": False, "log": lambda m: None}
    scst = train_scst(ScstConfig(str(tmp_path / "xe"), str(store), [str(captions)], samples=2),
                      tmp_path / "sc", scst_recipe(batch_size=8, steps=3, eval_every=0, checkpoint_every=3,
                                                   precision=BF16), **quiet)
    assert _policy() == "float32" and scst.step == 3
    assert json.loads((tmp_path / "sc" / "config.json").read_text())["train"]["precision"] == "mixed_bfloat16"
    shapes = generate_shapes(tmp_path / "shapes", n_images=8, image_size=75, seed=0)
    ann = load_annotations(shapes)
    model = tiny_model_dir_for(tmp_path / "ft-start", ann)  # the shapes' vocabulary, a 75 px random CNN
    ft = finetune(FinetuneConfig(str(model), [str(tmp_path / "shapes" / "images")], [str(shapes)],
                                 trainable_blocks=1), tmp_path / "ft",
                  phase2_recipe(batch_size=4, steps=2, eval_every=0, checkpoint_every=2, max_val_pairs=4,
                                precision="mixed_bfloat16"), **quiet)
    assert _policy() == "float32" and ft.step == 2
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["train"]["precision"] == "mixed_bfloat16"


def _best(run):
    return [(item.texts[0], item.captions[0].logprob) for item in run.results]


@pytest.mark.slow
def test_caption_evaluate_and_export_in_bfloat16_agree_with_float32(tmp_path):
    """caption on image files with the CNN in bfloat16 vs float32 (same tiny model; random CNN); evaluate
    and the SavedModel exported in bfloat16 (float32 outputs) give caption's bfloat16 captions."""
    import tensorflow as tf

    from base.devices import using_precision
    from decoder.infer.captioner import Captioner, caption_files
    from decoder.infer.export import export_model

    images = tmp_path / "images"
    images.mkdir()
    paths = coco_ramp_images(images, range(1, 13))
    _, model_dir = tiny_caption_model(tmp_path, images)
    runs = {}
    for precision in ("float32", BF16, "float32"):
        with using_precision(precision):
            run = caption_files(Captioner(model_dir), [str(p) for p in paths], batch_size=4, progress=False)
        assert run.n_ok == len(paths) and _policy() == "float32"
        runs.setdefault(precision, []).append(_best(run))
    f32, bf16 = runs["float32"][0], runs[BF16][0]
    assert runs["float32"][1] == f32  # float32 is reproducible
    same = [i for i in range(len(paths)) if f32[i][0] == bf16[i][0]]
    assert len(same) >= CAPTION_SAME * len(paths), (f32, bf16)
    assert max(abs(f32[i][1] - bf16[i][1]) for i in same) <= LOGPROB_GAP
    # evaluate on the same images (its CNN is caption's feature source): the same best captions in bfloat16
    from decoder.infer.evaluate import EvalConfig, run_evaluate

    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({"images": [{"id": i + 1, "file_name": p.name} for i, p in enumerate(paths)],
                                "annotations": [{"id": i + 1, "image_id": i + 1, "caption": "a red square"}
                                                for i in range(len(paths))]}))
    (tmp_path / "val2014").symlink_to(images)  # where a COCO_val2014_* file name is looked up
    with using_precision(BF16):
        result = run_evaluate(EvalConfig(str(model_dir), [str(refs)], images=[str(tmp_path)],
                                         split_scheme="none", out_dir=str(tmp_path / "eval"), batch_size=4,
                                         use_java=False, progress=False), log=lambda m: None)
    assert _policy() == "float32" and not result.skipped
    same_eval = sum(it.caption == b[0] for it, b in zip(result.items, bf16, strict=True))
    assert same_eval >= CAPTION_SAME * len(paths)
    with using_precision(BF16):
        export_model(model_dir, tmp_path / "exported", log=None)
    assert _policy() == "float32"
    served = tf.saved_model.load(str(tmp_path / "exported")).signatures["serving_default"](
        images=tf.constant([p.read_bytes() for p in paths]))
    assert served["log_probs"].dtype == tf.float32
    texts = [c.decode() for c in served["captions"].numpy()[:, 0]]
    assert sum(t == b[0] for t, b in zip(texts, bf16, strict=True)) >= CAPTION_SAME * len(paths)
