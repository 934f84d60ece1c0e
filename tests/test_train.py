"""train-decoder: learning, overfitting, logging, kill -9 resume, and every bad-input case."""

import json

import h5py
import numpy as np
import pytest
from helpers import (
    TINY,
    assert_same_weights,
    checkpoint_steps,
    cli,
    h5_datasets,
    kill_and_resume,
    make_dataset,
    write_store,
)

from base.errors import InputError
from decoder.train.config import TrainConfig
from decoder.train.train_decoder import DataConfig, train_decoder

pytestmark = pytest.mark.slow  # every test here trains (or runs cli.py in a subprocess)


def _train(store, captions, model_dir, units=16, scheme="auto", overwrite=False, vocab=None, **train):
    cfg = TrainConfig(**{"batch_size": 8, "eval_every": 0, "checkpoint_every": 5, **train})
    data = DataConfig(str(store), [str(captions)], split_scheme=scheme, vocab=vocab, min_word_count=1)
    return train_decoder(data, model_dir, cfg, embedding_size=units, lstm_units=units, overwrite=overwrite,
                         progress=False, log=lambda m: None)


def test_tiny_model_overfits_and_logs(tmp_path):
    store, captions = make_dataset(tmp_path / "d", n_images=12, n_val=0, captions_per_image=1)
    model_dir = tmp_path / "m"
    result = _train(store, captions, model_dir, units=32, scheme="none", batch_size=12, steps=200,
                    optimizer="adam", learning_rate=0.02, eval_every=100, checkpoint_every=100)
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in r and "epoch" in r for r in rows) and rows[-1]["step"] == 200
    ppl = [r["val_perplexity"] for r in rows]
    assert ppl[0] > 5 * ppl[-1] and result.val_perplexity < 1.02  # eval loss < 0.02 nats per word
    assert rows[-1]["train_loss"] < 0.3 * rows[0]["train_loss"]
    assert list((model_dir / "logs").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (model_dir / "checkpoints").iterdir())
    assert "best.npz" in ckpts and len([c for c in ckpts if c.startswith("ckpt-")]) <= 5
    config = json.loads((model_dir / "config.json").read_text())
    assert config["cnn"]["fingerprint"] == "feedc0de"
    assert config["vocab_size"] == config["model"]["vocab_size"]
    assert (model_dir / "decoder.weights.h5").exists() and not list(model_dir.glob("*.tmp-*"))


def test_sgd_recipe_loss_goes_down_and_reports_skipped(tmp_path):
    store, captions = make_dataset(tmp_path / "d", extra_caption_images=2, bad_rows=[0, 1])
    logs = []
    cfg = TrainConfig(batch_size=8, steps=100, eval_every=0, checkpoint_every=50)
    result = train_decoder(DataConfig(str(store), [str(captions)], min_word_count=1), tmp_path / "m", cfg,
                           embedding_size=16, lstm_units=16, progress=False, log=logs.append)
    text = "\n".join(logs)
    assert "skipped 4 captions whose image is not in the store" in text
    assert "4 whose image failed extraction" in text and "held in memory" in text
    rows = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    vocab_size = json.loads((tmp_path / "m" / "config.json").read_text())["model"]["vocab_size"]
    assert rows[-1]["val_perplexity"] < 0.7 * rows[0]["val_perplexity"]
    assert result.val_perplexity < 0.5 * vocab_size
    assert rows[-1]["epoch"] == pytest.approx(result.epoch) == 25.0  # 30 pairs: 4 steps per epoch


def test_kill9_resume_ends_like_an_uninterrupted_run(tmp_path):
    store, captions = make_dataset(tmp_path / "d", n_images=30)
    model_dir = tmp_path / "m"
    args = ["train-decoder", "--features", store, "--captions", captions, "--steps", 150,
            "--checkpoint-every", 5, "--eval-every", 0, "--seed", 3, *TINY, "--model-dir", model_dir,
            "--precision", "float32"]  # as the in-process reference (auto may pick bfloat16 on this CPU)
    run = kill_and_resume(args, lambda: checkpoint_steps(model_dir)[-1:] >= [20], lambda: cli(*args),
                          inspect=lambda: checkpoint_steps(model_dir),
                          reference=lambda: _train(store, captions, tmp_path / "ref", steps=150, seed=3))
    steps, out = run.at_kill, run.resumed
    assert steps and steps[-1] < 150, "the run finished before it could be killed"
    assert f"resuming from checkpoint at step {steps[-1]}" in out.stderr and "step 150," in out.stdout
    rows = [json.loads(line)["step"] for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == sorted(set(rows)) and rows[-1] == 150
    assert_same_weights(model_dir, tmp_path / "ref")


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "d")


def test_bad_store_version_dim_and_incomplete(tmp_path, dataset):
    store, captions = dataset
    with h5py.File(store, "r+") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(InputError, match="version"):
        _train(store, captions, tmp_path / "m", steps=1)
    partial = write_store(tmp_path / "partial.h5", ["a.jpg", "b.jpg"], np.zeros((2, 8)), complete=False)
    with pytest.raises(InputError, match="incomplete"):
        _train(partial, captions, tmp_path / "m", steps=1)
    store8, captions = make_dataset(tmp_path / "d8", dim=8)
    store6, _ = make_dataset(tmp_path / "d6", dim=6)
    _train(store8, captions, tmp_path / "m", steps=2)
    with pytest.raises(InputError, match="6-d features"):
        _train(store6, captions, tmp_path / "m", steps=4)


def test_bad_vocab_empty_split_and_other_config(tmp_path, dataset):
    store, captions = dataset
    bad_vocab = tmp_path / "word_counts.txt"
    bad_vocab.write_text("a 10\nthis line has four fields\n")
    with pytest.raises(InputError, match="word_counts.txt"):
        _train(store, captions, tmp_path / "m", steps=1, vocab=bad_vocab)
    store_nv, captions_nv = make_dataset(tmp_path / "nv", n_val=0)
    with pytest.raises(InputError, match="val split"):
        _train(store_nv, captions_nv, tmp_path / "m", steps=1)
    _train(store, captions, tmp_path / "m", steps=2)
    with pytest.raises(InputError, match="different configuration.*model"):
        _train(store, captions, tmp_path / "m", units=12, steps=2)
    with pytest.raises(InputError, match="different configuration.*train.optimizer"):
        _train(store, captions, tmp_path / "m", steps=2, optimizer="adam")
    assert _train(store, captions, tmp_path / "m", units=12, steps=1, overwrite=True).resumed_from == 0


def test_cli_bad_input_is_one_sentence_exit_2(tmp_path, dataset):
    store, captions = dataset
    out = cli("train-decoder", "--features", tmp_path / "missing.h5", "--captions", captions, "--model-dir",
              tmp_path / "m", "--steps", 1, check=False)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "missing.h5" in lines[0]
    assert not (tmp_path / "m").exists()


def test_feature_norm_standardize_uses_training_rows_only(tmp_path):
    """--feature-norm standardize: the saved model holds mean/inv_std of the TRAIN images' features."""
    store, captions = make_dataset(tmp_path / "d", n_images=12, n_val=4)
    cfg = TrainConfig(batch_size=8, eval_every=0, checkpoint_every=5, steps=3)
    data = DataConfig(str(store), [str(captions)], min_word_count=1)
    train_decoder(data, tmp_path / "m", cfg, embedding_size=8, lstm_units=8, feature_norm="standardize",
                  progress=False, log=lambda m: None)
    with h5py.File(store, "r") as f:
        train_feats = f["features"][:8].astype(np.float64)  # make_dataset: the last n_val images are val
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model"]["feature_norm"] == "standardize"
    from decoder.modeldir import load_model_dir

    loaded = load_model_dir(tmp_path / "m").model
    np.testing.assert_allclose(loaded.feature_mean.numpy(), train_feats.mean(0), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(loaded.feature_inv_std.numpy(), 1 / train_feats.std(0), rtol=1e-2)


def test_finished_run_says_so_and_changes_nothing(tmp_path):
    store, captions = make_dataset(tmp_path / "d")
    first = _train(store, captions, tmp_path / "m", steps=6)
    weights = h5_datasets(tmp_path / "m" / "decoder.weights.h5")
    rows = (tmp_path / "m" / "metrics.jsonl").read_text()
    logs = []
    cfg = TrainConfig(batch_size=8, eval_every=0, checkpoint_every=5, steps=6)
    again = train_decoder(DataConfig(str(store), [str(captions)], min_word_count=1), tmp_path / "m", cfg,
                          embedding_size=16, lstm_units=16, progress=False, log=logs.append)
    text = "\n".join(logs)
    assert again.already_done and "nothing to do" in text and "nan" not in text.lower()
    assert again.val_perplexity == pytest.approx(first.val_perplexity) and np.isfinite(again.train_loss)
    assert (tmp_path / "m" / "metrics.jsonl").read_text() == rows
    for name, value in h5_datasets(tmp_path / "m" / "decoder.weights.h5").items():
        np.testing.assert_array_equal(value, weights[name])
