"""import-im2txt: TF1 im2txt checkpoints -> model dir; decoder math equals im2txt's BasicLSTMCell."""

import hashlib

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from helpers import IM2TXT_SIZES, LSTM_IMG, tiny_tensors, write_vocab

from base.errors import InputError
from cli import main
from decoder.im2txt_import import LSTM_NAMES, check_out_dir, convert_decoder, import_im2txt
from decoder.modeldir import load_model_dir
from extract.slim import CheckpointReader, save_tf1_checkpoint, slim_variable_names

D, E, U, V = IM2TXT_SIZES  # tiny decoder: feature dim (InceptionV3's), embedding, LSTM units, rows


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def basic_lstm_cell(x, state, kernel, bias):
    """im2txt's BasicLSTMCell in float64: x [B, E], state [B, 2U] = [c, h] -> (output h, new [c, h])."""
    units = kernel.shape[1] // 4
    c, h = state[:, :units], state[:, units:]
    i, j, f, o = np.split(np.concatenate([x, h], axis=1) @ kernel + bias, 4, axis=1)
    c = c * _sigmoid(f + 1.0) + _sigmoid(i) * np.tanh(j)
    h = np.tanh(c) * _sigmoid(o)
    return h, np.concatenate([c, h], axis=1)


def im2txt_reference(t, features, words):
    """im2txt's inference on checkpoint tensors `t`: initial [c, h] after the image, then per word
    (log-softmax [B, V], [c, h]). float64 numpy."""
    kernel, bias = t["kernel"].astype(np.float64), t["bias"].astype(np.float64)
    zero = np.zeros((features.shape[0], 2 * kernel.shape[1] // 4))
    _, state = basic_lstm_cell(features @ t[LSTM_IMG], zero, kernel, bias)
    states, outs = [state], []
    for w in words:
        h, state = basic_lstm_cell(t["seq_embedding/map"][w], state, kernel, bias)
        logits = h @ t["logits/weights"] + t["logits/biases"]
        logits -= logits.max(axis=1, keepdims=True)
        outs.append(logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)))
        states.append(state)
    return states, outs


def check_steps(model, tensors, lstm_names):
    """Our initial_state/step equal the NumPy BasicLSTMCell on the checkpoint tensors to 1e-5."""
    t = dict(tensors, kernel=tensors[lstm_names[0]], bias=tensors[lstm_names[1]])
    rng = np.random.default_rng(1)
    features = rng.uniform(0, 1, (3, D)).astype(np.float32)
    words = [np.array([1, 1, 1]), np.array([0, 3, V - 1]), np.array([5, 2, 7])]
    states, outs = im2txt_reference(t, features.astype(np.float64), words)
    h, c = model.initial_state(features)
    np.testing.assert_allclose(np.concatenate([c, h], axis=1), states[0], atol=1e-5)
    for w, ref_state, ref_out in zip(words, states[1:], outs, strict=True):
        log_probs, (h, c) = model.step(w.astype(np.int32), (h, c))
        np.testing.assert_allclose(log_probs.numpy(), ref_out, atol=1e-5)
        np.testing.assert_allclose(np.concatenate([c, h], axis=1), ref_state, atol=1e-5)


@pytest.mark.parametrize("lstm_names", LSTM_NAMES, ids=["kernel", "weights", "Matrix"])
def test_decoder_step_equals_basic_lstm_cell(tmp_path, lstm_names):
    tensors = tiny_tensors(lstm_names)
    prefix = save_tf1_checkpoint(tmp_path / "model.ckpt-1234", tensors)
    reader = CheckpointReader(prefix)
    model, config, used = convert_decoder(reader)
    assert (config.vocab_size, config.embedding_size, config.lstm_units) == (V, E, U)
    assert sorted(used) == sorted(set(tensors) - {"global_step"})
    check_steps(model, tensors, lstm_names)


def test_cli_import_tiny_checkpoint_round_trip(tmp_path):
    tensors = tiny_tensors(LSTM_NAMES[2], seed=3)
    prefix = save_tf1_checkpoint(tmp_path / "train" / "model.ckpt-1234", tensors)
    vocab = write_vocab(tmp_path / "word_counts.txt", V - 3)  # + <UNK> = V - 2 ids < V rows
    out = tmp_path / "model"
    args = ["import-im2txt", "--checkpoint", prefix + ".index", "--vocab", str(vocab), "--out", str(out),
            "--cnn-weights", "none", "--image-size", "75"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "at step 1234" in result.output
    loaded = load_model_dir(out)
    assert loaded.config["model"]["vocab_size"] == V and len(loaded.vocab) == V - 2
    assert loaded.vocab.words[:4] == ["a", "<S>", "</S>", "dog"] and loaded.vocab.unk_id == V - 3
    assert loaded.cnn["weights"] == "none" and loaded.cnn["image_size"] == 75 and loaded.cnn["fingerprint"]
    assert loaded.cnn_weights_path is None
    assert loaded.config["import"]["lstm_variables"] == list(LSTM_NAMES[2])
    check_steps(loaded.model, tensors, LSTM_NAMES[2])
    check_out_dir(out, loaded.config["import"]["checkpoint"])  # rerunning the same import may overwrite it


def _expect(tmp_path, tensors, match, vocab_lines=V - 3, cnn_weights="none"):
    prefix = save_tf1_checkpoint(tmp_path / "bad" / "model.ckpt-1", tensors)
    vocab = write_vocab(tmp_path / "word_counts.txt", vocab_lines)
    with pytest.raises(InputError, match=match):
        import_im2txt(prefix, vocab, tmp_path / "out", cnn_weights=cnn_weights, image_size=75)
    assert not (tmp_path / "out" / "config.json").exists()


def test_bad_checkpoints_name_the_variable(tmp_path):
    names = LSTM_NAMES[0]
    good = tiny_tensors(names)
    _expect(tmp_path, {k: v for k, v in good.items() if k != "logits/biases"},
            "lacks the variable logits/biases")
    _expect(tmp_path, dict(good, **{names[0]: np.zeros((E + U + 1, 4 * U), np.float32)}),
            r"lstm/basic_lstm_cell/kernel has shape \[15, 24\], expected \[14, 24\]")
    _expect(tmp_path, dict(good, **{"logits/weights": np.zeros((U, V + 1), np.float32)}),
            r"logits/weights has shape \[6, 14\], expected \[6, 13\]")
    _expect(tmp_path, dict(good, **{"lstm_2/extra": np.zeros(3, np.float32)}),
            "unknown variable lstm_2/extra")
    _expect(tmp_path, dict(good, **{"lstm/BasicLSTMCell/Linear/Bias": good[names[1]]}), "two LSTMs")
    _expect(tmp_path, {k: v for k, v in good.items() if not k.startswith("lstm/")}, "lacks the LSTM variable")
    _expect(tmp_path, good, r"has 14 words .* seq_embedding/map has only 13 rows", vocab_lines=V)
    _expect(tmp_path, good, "has no InceptionV3 variables: give --cnn-weights", cnn_weights=None)
    _expect(tmp_path, dict(good, **{"image_embedding/weights": np.zeros((7, E), np.float32)}),
            r"image_embedding/weights has shape \[7, 8\], expected \[2048, 8\]")


def test_bad_arguments_exit_2(tmp_path):
    vocab = write_vocab(tmp_path / "word_counts.txt", 5)
    args = ["import-im2txt", "--checkpoint", str(tmp_path / "nope" / "model.ckpt-5"), "--vocab", str(vocab),
            "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "No TensorFlow checkpoint at" in result.output
    prefix = save_tf1_checkpoint(tmp_path / "ck" / "model.ckpt-9", tiny_tensors(LSTM_NAMES[1]))
    (tmp_path / "ck" / "model.ckpt-9.data-00000-of-00001").unlink()
    result = CliRunner().invoke(main, args[:2] + [prefix] + args[3:])
    assert result.exit_code == 2 and "has an index but no data file" in result.output
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"format": "showtell-model"}')
    prefix = save_tf1_checkpoint(tmp_path / "ck2" / "model.ckpt-9", tiny_tensors(LSTM_NAMES[1]))
    result = CliRunner().invoke(main, args[:2] + [prefix, "--vocab", str(vocab), "--out", str(other),
                                                  "--cnn-weights", "none", "--image-size", "75"])
    assert result.exit_code == 2 and "already holds a model dir" in result.output


# ---- the community checkpoint's exact names and shapes (random values) -------------------------------------


@pytest.fixture(scope="module")
def real_import(shared_data, tmp_path_factory):
    """(checkpoint tensors, ImportReport, model dir) for a checkpoint shaped like model.ckpt-2000000."""
    shapes = tf.train.list_variables(str(shared_data / "im2txt" / "model.ckpt-2000000"))
    rng = np.random.default_rng(0)
    tensors = {n: np.int64(2000000) if n == "global_step" else rng.standard_normal(s, dtype=np.float32)
               for n, s in shapes}
    root = tmp_path_factory.mktemp("real")
    prefix = save_tf1_checkpoint(root / "model.ckpt-2000000", tensors)
    report = import_im2txt(prefix, shared_data / "im2txt" / "word_counts.txt", root / "model")
    return tensors, report, root / "model"


def test_real_index_lists_383_variables(shared_data):
    shapes = dict(tf.train.list_variables(str(shared_data / "im2txt" / "model.ckpt-2000000")))
    assert len(shapes) == 383 and shapes["lstm/basic_lstm_cell/weights"] == [1024, 2048]
    assert set(slim_variable_names()) == {n for n in shapes if n.startswith("InceptionV3/")}


@pytest.mark.slow
def test_real_names_every_variable_used_once(real_import):
    tensors, report, _ = real_import
    assert len(tensors) == 383
    assert dict(report.reads) == {n: 1 for n in tensors}  # global_step read once for the record only
    assert sorted(report.used) == sorted(set(tensors) - {"global_step"})
    assert report.skipped == ["global_step"] and report.global_step == 2000000


@pytest.mark.slow
def test_real_names_every_cnn_weight_filled(real_import):
    from extract.encoder import encoder_and_spec

    tensors, report, model_dir = real_import
    assert report.cnn["weights"] == f"slim:{report.checkpoint}" and report.cnn["image_size"] == 299
    # the model dir's cnn.weights.h5 rebuilds the encoder with the recorded fingerprint ...
    cnn, _ = encoder_and_spec(dict(report.cnn, weights=str(model_dir / "cnn.weights.h5")),
                              expect_fingerprint=True)
    # ... and each of its weights is one checkpoint variable's value, every InceptionV3 variable once
    by_bytes = {hashlib.sha1(v.tobytes()).hexdigest(): n for n, v in tensors.items() if n != "global_step"}
    matched = [by_bytes.get(hashlib.sha1(w.numpy().tobytes()).hexdigest()) for w in cnn.weights]
    assert None not in matched and len(matched) == 376
    assert sorted(matched) == sorted(slim_variable_names())


@pytest.mark.slow
def test_real_names_model_dir_loads_with_file_ids(real_import, shared_data):
    tensors, report, model_dir = real_import
    loaded = load_model_dir(model_dir)
    lines = (shared_data / "im2txt" / "word_counts.txt").read_text().split("\n")
    assert loaded.vocab.words[: len(lines)] == [line.split(" ")[0] for line in lines]
    assert len(loaded.vocab) == len(lines) + 1 and loaded.vocab.unk_id == len(lines)
    assert loaded.vocab.id("<S>") == 1 and loaded.vocab.id("</S>") == 2
    assert loaded.config["model"]["vocab_size"] == 12000 and loaded.cnn == report.cnn
    np.testing.assert_array_equal(loaded.model.seq_embedding.embeddings.numpy(), tensors["seq_embedding/map"])
    np.testing.assert_array_equal(loaded.model.logits.kernel.numpy(), tensors["logits/weights"])
    np.testing.assert_array_equal(loaded.model.image_embedding.kernel.numpy(), tensors[LSTM_IMG])
