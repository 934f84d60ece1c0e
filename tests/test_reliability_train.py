"""Issue 14, training side: diverged runs stop (exit 1) on the last good checkpoint, damaged checkpoints
fall back, the vocabulary digest, model-dir locks, non-finite or damaged features refused by train-decoder,
caption and evaluate, over-long captions skipped, the training recipe's ranges."""

import json
import os
import shutil
import signal

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import (
    TINY,
    damaged_copy,
    h5_datasets,
    hold_lock,
    make_dataset,
    only_error_line,
    tiny_tensors,
    without_checksums,
    write_vocab,
)

from base.errors import InputError
from cli import main
from data.features import ROWS_DIGEST
from data.integrity import rows_digest
from data.pipeline import PipelineConfig
from decoder.im2txt_import import LSTM_NAMES, import_im2txt
from decoder.infer.evaluate import EvalConfig, run_evaluate
from decoder.modeldir import load_model_dir
from decoder.train.config import TrainConfig
from decoder.train.finetune import FinetuneConfig, finetune
from decoder.train.train_decoder import DataConfig, train_decoder
from extract.slim import save_tf1_checkpoint


def _train(store, captions, model_dir, logs=None, pipeline=None, **train):
    cfg = TrainConfig(**{"batch_size": 8, "eval_every": 0, "checkpoint_every": 5, "steps": 10, **train})
    data = DataConfig(str(store), [str(captions)], min_word_count=1)
    return train_decoder(data, model_dir, cfg, embedding_size=8, lstm_units=8, pipeline=pipeline,
                         progress=False, log=(logs if logs is not None else []).append)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(store, captions, model dir trained 10 steps with checkpoints at 5 and 10)."""
    root = tmp_path_factory.mktemp("reliability")
    store, captions = make_dataset(root / "d")
    _train(store, captions, root / "m")
    return store, captions, root / "m"


def _copy(model_dir, to):
    shutil.copytree(model_dir, to)
    return to


@pytest.mark.slow
def test_a_diverging_run_stops_with_exit_1_on_the_last_good_checkpoint(trained, tmp_path):
    store, captions, _ = trained
    args = ["train-decoder", "--features", store, "--captions", captions, "--steps", "40", "--learning-rate",
            "1e30", "--clip-gradients", "0", "--eval-every", "0", "--precision", "float32", *TINY]
    result = CliRunner().invoke(main, [*map(str, args), "--model-dir", str(tmp_path / "m"),
                                       "--checkpoint-every", "2"])
    assert result.exit_code == 1, result.output
    assert ("Error: training stopped at step 5: the validation score became inf. The model files hold the "
            "last good checkpoint (step 4); lower --learning-rate") in result.output
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["result"]["step"] == 4
    assert all(np.isfinite(w).all() for w in h5_datasets(tmp_path / "m" / "decoder.weights.h5").values())
    result = CliRunner().invoke(main, [*map(str, args), "--model-dir", str(tmp_path / "m0"),
                                       "--checkpoint-every", "0"])
    assert result.exit_code == 1 and "No checkpoint had been saved yet, so no model files" in result.output
    assert not (tmp_path / "m0" / "decoder.weights.h5").exists()


@pytest.mark.slow
def test_a_truncated_or_empty_newest_checkpoint_falls_back_to_an_older_one(trained, tmp_path):
    store, captions, model_dir = trained
    model_dir = _copy(model_dir, tmp_path / "m")
    newest = model_dir / "checkpoints" / "ckpt-10.npz"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    logs = []
    _train(store, captions, model_dir, logs, steps=12)
    text = "\n".join(logs)
    assert f"warning: Checkpoint {newest} cannot be read" in text and "Falling back" in text
    assert "resuming from checkpoint at step 5" in text
    (model_dir / "checkpoints" / "ckpt-12.npz").write_bytes(b"")
    logs.clear()
    assert _train(store, captions, model_dir, logs, steps=14).step == 14
    assert "resuming from checkpoint at step 10" in "\n".join(logs)


@pytest.mark.slow
def test_a_changed_vocabulary_is_refused_naming_the_file(trained, tmp_path):
    store, captions, model_dir = trained
    for change in ("shuffled", "shortened"):
        bad = _copy(model_dir, tmp_path / change)
        lines = (bad / "word_counts.txt").read_text().splitlines()
        lines = lines[1:2] + lines[:1] + lines[2:] if change == "shuffled" else lines[:-3]
        (bad / "word_counts.txt").write_text("\n".join(lines))
        message = f"{bad / 'word_counts.txt'} changed after the model was trained"
        with pytest.raises(InputError, match=message):
            load_model_dir(bad)
        with pytest.raises(InputError, match=message):  # a resumed train-decoder checks it too
            _train(store, captions, bad, steps=12)
        result = CliRunner().invoke(main, ["caption", "--model-dir", str(bad), "--features", str(store)])
        assert result.exit_code == 2 and only_error_line(result.output).startswith(f"Error: {message}")
    resumed = _copy(model_dir, tmp_path / "given")  # resuming with another --vocab file
    (tmp_path / "other.txt").write_text("\n".join(lines))
    with pytest.raises(InputError, match=f"--vocab {tmp_path / 'other.txt'} is not the vocabulary the run"):
        train_decoder(DataConfig(str(store), [str(captions)], vocab=str(tmp_path / "other.txt")), resumed,
                      TrainConfig(batch_size=8, eval_every=0, checkpoint_every=5, steps=12),
                      embedding_size=8, lstm_units=8, progress=False, log=lambda m: None)


@pytest.mark.slow
def test_model_dirs_are_locked_and_a_dead_lock_does_not_block(trained, tmp_path):
    store, captions, model_dir = trained
    out = tmp_path / "m"
    holder = hold_lock(out, folder=True)
    in_use = rf"{out} is in use by another showtell process \(pid {holder.pid}\)"
    try:
        with pytest.raises(InputError, match=in_use):
            _train(store, captions, out)
        with pytest.raises(InputError, match=in_use):
            finetune(FinetuneConfig(str(model_dir), [str(tmp_path)], [str(captions)]), out,
                     TrainConfig(steps=1), progress=False, log=lambda m: None)
        prefix = save_tf1_checkpoint(tmp_path / "ckpt" / "model.ckpt-1", tiny_tensors(LSTM_NAMES[2]))
        with pytest.raises(InputError, match=in_use):
            import_im2txt(prefix, write_vocab(tmp_path / "wc.txt", 10), out, cnn_weights="none",
                          image_size=75)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert _train(store, captions, out, steps=2).step == 2  # the killed holder's lock is gone


@pytest.mark.slow
def test_nonfinite_features_are_refused_by_train_caption_and_evaluate(trained, tmp_path):
    store, captions, model_dir = trained
    bad = without_checksums(store, tmp_path / "old.h5")  # a store written before checksums existed
    with h5py.File(bad, "r+") as f:
        f["features"][2, 3] = np.nan  # a training image (img_002.jpg)
    message = f"feature store {bad} holds non-finite feature values"
    for in_memory in ("yes", "no"):  # all rows at once / per streamed batch inside tf.data
        with pytest.raises(InputError, match=message):
            _train(bad, captions, tmp_path / f"m-{in_memory}", pipeline=PipelineConfig(in_memory=in_memory))
    result = CliRunner().invoke(main, ["caption", "--model-dir", str(model_dir), "--features", str(bad),
                                       "--no-progress"])
    assert result.exit_code == 2 and f"Error: {message}" in result.output, result.output
    with pytest.raises(InputError, match=message):
        run_evaluate(EvalConfig(str(model_dir), [str(captions)], features=str(bad), split="train",
                                out_dir=str(tmp_path / "eval"), use_java=False, progress=False), log=print)
    assert not (tmp_path / "eval" / "metrics.json").exists()


@pytest.mark.slow
def test_damaged_store_metadata_is_one_error_line_in_train_decoder_and_caption(trained, tmp_path):
    store, captions, model_dir = trained
    damaged = damaged_copy(store, tmp_path / "f.h5")
    runs = [["train-decoder", "--features", damaged, "--captions", captions, "--model-dir", tmp_path / "m",
             "--steps", "2", *TINY], ["caption", "--model-dir", model_dir, "--features", damaged]]
    for args in runs:
        result = CliRunner().invoke(main, list(map(str, args)))
        assert result.exit_code == 2, result.output
        error = only_error_line(result.output)
        assert error.startswith(f"Error: feature store {damaged} is damaged and cannot be read ("), error


@pytest.mark.slow
def test_an_absurd_caption_is_skipped_and_counted(tmp_path):
    store, captions = make_dataset(tmp_path / "d")
    data = json.loads(captions.read_text())
    data["annotations"].append({"id": 999, "image_id": 1, "caption": "dog " * 262_144})  # 1 MB, one caption
    captions.write_text(json.dumps(data))
    logs = []
    assert _train(store, captions, tmp_path / "m", logs, steps=3).step == 3
    assert "1 longer than --max-caption-length 100 (longest: 262144 tokens)" in "\n".join(logs)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["result"]["train_pairs"]["too_long"] == 1 and config["data"]["max_caption_length"] == 100


@pytest.mark.parametrize("setting, message", [
    ({"steps": -1}, "--steps -1 is out of range"), ({"epochs": float("nan"), "steps": None}, "--epochs nan"),
    ({"learning_rate": float("nan")}, "--learning-rate nan is not a finite"),
    ({"learning_rate": 0.0}, "--learning-rate 0.0 is out of range: it must be > 0"),
    ({"checkpoint_every": -1}, "--checkpoint-every -1"), ({"max_val_pairs": 0}, "--max-val-pairs 0"),
    ({"batch_size": 0}, "--batch-size 0"), ({"clip_gradients": float("inf")}, "--clip-gradients inf")])
def test_the_training_recipe_refuses_what_the_cli_refuses(setting, message):
    with pytest.raises(InputError, match=message):
        TrainConfig(**{"steps": 10, **setting}).validate()


@pytest.mark.slow
def test_caption_json_writes_an_unknown_image_id_as_minus_one_with_the_file_name(trained, tmp_path):
    store, _, model_dir = trained
    negative = tmp_path / "neg.h5"
    shutil.copy(store, negative)
    with h5py.File(negative, "r+") as f:
        f["image_ids"][0] = -5  # e.g. from a caption file with a negative id (written so: digest updated)
        f.attrs[ROWS_DIGEST] = rows_digest([k.decode() for k in f["keys"][...]], f["image_ids"][...])
    out = tmp_path / "results.json"
    result = CliRunner().invoke(main, ["caption", "--model-dir", str(model_dir), "--features", str(negative),
                                       "--keys", "img_000.jpg", "--keys", "img_001.jpg", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [(r["image_id"], r["file_name"]) for r in rows] == [(-1, "img_000.jpg"), (2, "img_001.jpg")]
