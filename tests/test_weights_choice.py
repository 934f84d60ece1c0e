"""Which weights a model dir gives (issue 22, items 6 and 9): `--weights last|best` on caption, evaluate,
export and the start of train-scst and finetune, each printing the step and validation score it used; a
model dir without a best checkpoint refused with one line; NaN/Inf weights refused at import-im2txt and on
every model-dir read."""

import json
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import make_dataset, tiny_tensors, train_tiny_decoder, write_vocab

from base.errors import InputError
from cli import main
from decoder.im2txt_import import LSTM_NAMES, import_im2txt
from decoder.modeldir import load_model_dir
from decoder.train.checkpoints import CheckpointManager, read_checkpoint
from extract.slim import save_tf1_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(store, captions, model dir, step) of a 30-step run validated at each epoch end (3 steps), whose best
    checkpoint is made its oldest kept one, at `step` (as when validation peaks early: the last step is not
    the best)."""
    root = tmp_path_factory.mktemp("weights")
    store, captions = make_dataset(root / "d", n_images=30)
    train_tiny_decoder(store, captions, root / "m", 30, learning_rate=0.01, checkpoint_every=0)
    step = CheckpointManager(root / "m" / "checkpoints").steps()[0]
    assert step < 30
    shutil.copyfile(root / "m" / "checkpoints" / f"ckpt-{step}.npz", root / "m" / "checkpoints" / "best.npz")
    return store, captions, root / "m", step


def _val_perplexity(model_dir, step):
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["val_perplexity"] for r in rows if r["step"] == step)


def _arrays(model):
    return {v.path: np.asarray(v.numpy()) for v in model.weights}


@pytest.mark.slow
def test_best_loads_the_best_checkpoint_and_says_which(run):
    _, _, model_dir, step = run
    last, best = load_model_dir(model_dir), load_model_dir(model_dir, "best")
    ckpt = read_checkpoint(model_dir / "checkpoints" / "best.npz")
    for path, value in _arrays(best.model).items():
        np.testing.assert_array_equal(value, ckpt[f"decoder/{path}"])
    final = read_checkpoint(model_dir / "checkpoints" / "ckpt-30.npz")
    for path, value in _arrays(last.model).items():
        np.testing.assert_array_equal(value, final[f"decoder/{path}"])
    assert any(not np.array_equal(a, b) for a, b in zip(_arrays(last.model).values(),
                                                       _arrays(best.model).values(), strict=True))
    assert (best.weights.choice, best.weights.step, last.weights.step) == ("best", step, 30)
    assert best.weights.metrics == {"val_perplexity": pytest.approx(_val_perplexity(model_dir, step))}
    assert last.weights.metrics == {"val_perplexity": pytest.approx(_val_perplexity(model_dir, 30))}
    assert f"weights: best ({model_dir / 'checkpoints' / 'best.npz'}): step {step}, val_perplexity" in \
        best.weights.describe()


@pytest.mark.slow
def test_caption_and_evaluate_print_the_weights_they_used(run, tmp_path):
    store, captions, model_dir, best_step = run
    for choice, step in (("best", best_step), ("last", 30)):
        args = ["caption", "--model-dir", model_dir, "--features", store, "--keys", "img_000.jpg",
                "--weights", choice]
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        assert f"weights: {choice} (" in result.stderr and f"step {step}, val_perplexity" in result.stderr
        assert "Captions for image img_000.jpg:" in result.stdout
    args = ["evaluate", "--model-dir", model_dir, "--features", store, "--captions", captions, "--split",
            "val", "--java", "no", "--out-dir", tmp_path / "eval", "--weights", "best"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "weights: best (" in result.stderr and f"step {best_step}, val_perplexity" in result.stderr


@pytest.mark.slow
def test_best_is_refused_without_a_best_checkpoint(run, tmp_path):
    store, captions, model_dir, _ = run
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns("checkpoints"))
    assert load_model_dir(bare).weights.step == 30  # last still works
    runs = [["caption", "--model-dir", bare, "--features", store],
            ["evaluate", "--model-dir", bare, "--features", store, "--captions", captions, "--split", "val",
             "--java", "no", "--out-dir", tmp_path / "eval"],
            ["export", "--model-dir", bare, "--out", tmp_path / "exported"],
            ["train-scst", "--model-dir", bare, "--features", store, "--captions", captions, "--out",
             tmp_path / "scst", "--steps", "1"],
            ["finetune", "--model-dir", bare, "--images", tmp_path, "--captions", captions, "--out",
             tmp_path / "ft", "--steps", "1"]]
    for args in runs:
        result = CliRunner().invoke(main, [str(a) for a in [*args, "--weights", "best"]])
        assert result.exit_code == 2, (args[0], result.output)
        assert "has no best checkpoint (checkpoints/best.npz" in result.output, result.output
        assert result.output.count("Error:") == 1 and "Traceback" not in result.output
    for name in ("eval", "exported", "scst", "ft"):
        assert not (tmp_path / name).exists()


@pytest.mark.slow
def test_a_finetune_best_checkpoint_is_refused(run, tmp_path):
    _, _, model_dir, _ = run
    copy = tmp_path / "ft"
    shutil.copytree(model_dir, copy)
    arrays = read_checkpoint(copy / "checkpoints" / "best.npz")
    np.savez(copy / "checkpoints" / "best.npz", **arrays, **{"cnn/000/kernel": np.zeros(3, np.float32)})
    with pytest.raises(InputError, match="finetune checkpoint whose CNN differs"):
        load_model_dir(copy, "best")


@pytest.mark.slow
def test_nonfinite_weights_are_refused_on_read(run, tmp_path):
    store, _, model_dir, _ = run
    bad = tmp_path / "nan"
    shutil.copytree(model_dir, bad)
    with h5py.File(bad / "decoder.weights.h5", "r+") as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and o.ndim == 2 else None)
        values = f[names[0]][...]
        values[0, 0] = np.nan
        f[names[0]][...] = values
    result = CliRunner().invoke(main, ["caption", "--model-dir", str(bad), "--features", str(store)])
    assert result.exit_code == 2 and "holds NaN/Inf values: 1 in " in result.output, result.output
    assert result.output.count("Error:") == 1 and "Captions for" not in result.output


def test_import_im2txt_refuses_nonfinite_weights(tmp_path):
    vocab = write_vocab(tmp_path / "word_counts.txt", 10)
    for name, value in ((LSTM_NAMES[0][0], np.nan), ("logits/biases", np.inf)):
        tensors = tiny_tensors(LSTM_NAMES[0])
        tensors[name] = tensors[name].copy()
        tensors[name].flat[3] = value
        prefix = save_tf1_checkpoint(tmp_path / name.replace("/", "_") / "model.ckpt-1", tensors)
        with pytest.raises(InputError, match=f"holds NaN/Inf values: 1 in {name}: it is damaged"):
            import_im2txt(prefix, vocab, tmp_path / "out", cnn_weights="none", image_size=75)
        assert not (tmp_path / "out").exists()
        result = CliRunner().invoke(main, ["import-im2txt", "--checkpoint", prefix, "--vocab", str(vocab),
                                           "--out", str(tmp_path / "out"), "--cnn-weights", "none",
                                           "--image-size", "75"])
        assert result.exit_code == 2 and f"1 in {name}" in result.output and "Traceback" not in result.output
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_train_scst_starts_from_the_best_weights(run, tmp_path):
    store, captions, model_dir, step = run
    args = ["train-scst", "--model-dir", model_dir, "--features", store, "--captions", captions, "--out",
            tmp_path / "scst", "--steps", "2", "--batch-size", "4", "--eval-every", "0", "--no-progress",
            "--weights", "best"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "start weights: best (" in result.stderr and f"step {step}, val_perplexity" in result.stderr
    config = json.loads((tmp_path / "scst" / "config.json").read_text())
    from base.digest import file_sha256

    assert config["scst"]["source_decoder_sha256"] == file_sha256(model_dir / "checkpoints" / "best.npz")
    again = CliRunner().invoke(main, [str(a) for a in args[:-1] + ["last"]])  # another start: refused
    assert again.exit_code == 2 and "different run" in again.output, again.output
