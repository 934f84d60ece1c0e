"""The Show and Tell decoder: layer names/shapes, inference API, loss over real words, model dir."""

import numpy as np
import pytest
import tensorflow as tf

from base.errors import InputError
from data.vocab import Vocabulary
from decoder.config import ModelConfig
from decoder.model import build_decoder, lstm_sequence
from decoder.modeldir import load_model_dir, save_model_dir
from decoder.train.config import TrainConfig

CFG = ModelConfig(vocab_size=30, embedding_size=16, lstm_units=12, feature_dim=8)


@pytest.fixture(scope="module")
def model():
    return build_decoder(CFG, seed=3)


def test_layer_names_shapes_and_init(model):
    shapes = {w.path: tuple(w.shape) for w in model.weights}
    assert shapes == {"image_embedding/kernel": (8, 16), "seq_embedding/embeddings": (30, 16),
                      "lstm/kernel": (16, 48), "lstm/recurrent_kernel": (12, 48), "lstm/bias": (48,),
                      "logits/kernel": (12, 30), "logits/bias": (30,),
                      "show_and_tell/feature_mean": (8,), "show_and_tell/feature_inv_std": (8,)}
    assert {w.path for w in model.non_trainable_weights} == {"show_and_tell/feature_mean",
                                                             "show_and_tell/feature_inv_std"}
    for w in model.weights:
        values = w.numpy()
        if w.path.startswith("show_and_tell/"):  # feature standardisation: identity until set
            np.testing.assert_array_equal(values, 0.0 if w.path.endswith("mean") else 1.0)
        elif w.path == "lstm/bias":  # zero, forget gate 1 (im2txt's forget_bias folded in)
            np.testing.assert_array_equal(values, np.r_[np.zeros(12), np.ones(12), np.zeros(24)])
        elif w.path == "logits/bias":
            assert not values.any()
        else:
            assert np.abs(values).max() <= 0.08 and np.abs(values).max() > 0.05


def test_seeded_build_is_deterministic():
    a, b = build_decoder(CFG, seed=5), build_decoder(CFG, seed=5)
    for x, y in zip(a.weights, b.weights, strict=False):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_step_api_matches_teacher_forcing(model):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(3, 8)).astype(np.float16)
    seqs = rng.integers(0, 30, size=(3, 5)).astype(np.int32)
    state = model.initial_state(feats)
    assert state[0].dtype == tf.float32 and state[0].shape == (3, 12) and len(state) == 2
    outs = []
    for t in range(5):
        log_probs, state = model.step(seqs[:, t], state)
        assert log_probs.shape == (3, 30) and log_probs.dtype == tf.float32
        outs.append(log_probs.numpy())
    np.testing.assert_allclose(np.exp(outs[0]).sum(1), 1.0, rtol=1e-5)
    full = tf.nn.log_softmax(model((feats.astype(np.float32), seqs))).numpy()
    np.testing.assert_allclose(np.stack(outs, 1), full, atol=1e-5)
    # variable N: a beam of 7 rows works without a new signature
    state7 = model.initial_state(np.repeat(feats[:1], 7, 0))
    assert model.step(np.zeros(7, np.int32), state7)[0].shape == (7, 30)


def test_loss_counts_real_words_only(model):
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(2, 8)).astype(np.float32)
    seqs = rng.integers(0, 30, size=(2, 6)).astype(np.int32)
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], np.float32)
    total, words = model.loss_sums(feats, seqs, seqs, mask)
    assert float(words) == 8.0
    log_probs = tf.nn.log_softmax(model((feats, seqs))).numpy()
    expected = -sum(log_probs[b, t, seqs[b, t]] for b in range(2) for t in range(6) if mask[b, t])
    assert float(total) == pytest.approx(expected, rel=1e-5)
    # whatever sits in the padding changes nothing
    noisy = np.where(mask > 0, seqs, rng.integers(0, 30, size=seqs.shape)).astype(np.int32)
    assert float(model.loss_sums(feats, noisy, noisy, mask)[0]) == pytest.approx(float(total), rel=1e-6)
    # dropout only in training, and seeded
    a = model.loss_sums(feats, seqs, seqs, mask, training=True, seed=tf.constant([1, 2], tf.int64))[0]
    b = model.loss_sums(feats, seqs, seqs, mask, training=True, seed=tf.constant([1, 2], tf.int64))[0]
    assert float(a) == float(b) != float(total)


def test_model_dir_roundtrip(tmp_path, model):
    vocab = Vocabulary.build(["a b c d e f g h"] * 4, min_count=1)
    cfg = ModelConfig(vocab_size=len(vocab), embedding_size=16, lstm_units=12, feature_dim=8)
    m = build_decoder(cfg, seed=1)
    cnn = {"arch": "InceptionV3", "weights": "none", "fingerprint": "abc"}
    save_model_dir(tmp_path, m, cfg, vocab, cnn, extra={"train": TrainConfig(steps=3).to_dict()})
    loaded = load_model_dir(tmp_path)
    assert loaded.cnn == cnn and loaded.cnn_weights_path is None and len(loaded.vocab) == len(vocab)
    assert loaded.config["train"]["steps"] == 3
    feats = np.ones((2, 8), np.float32)
    a = m.step([1, 2], m.initial_state(feats))[0].numpy()
    b = loaded.model.step([1, 2], loaded.model.initial_state(feats))[0].numpy()
    np.testing.assert_array_equal(a, b)
    assert not list(tmp_path.glob("*.tmp-*"))
    (tmp_path / "decoder.weights.h5").unlink()
    with pytest.raises(InputError, match="decoder.weights.h5"):
        load_model_dir(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        load_model_dir(tmp_path / "nope")


def test_fused_lstm_gradient_matches_autodiff():
    rng = np.random.default_rng(2)
    steps, batch, units = 5, 3, 4
    xw = tf.constant(rng.normal(size=(steps, batch, 4 * units)), tf.float32)
    rk = tf.constant(rng.normal(size=(units, 4 * units)) * 0.5, tf.float32)
    weights = tf.constant(rng.normal(size=(steps, batch, units)), tf.float32)

    def unrolled(xw, rk):  # Keras LSTMCell math, step by step, differentiated by TF
        h = c = tf.zeros([batch, units])
        out = []
        for t in range(steps):
            i, f, g, o = tf.split(xw[t] + h @ rk, 4, -1)
            c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
            h = tf.sigmoid(o) * tf.tanh(c)
            out.append(h)
        return tf.stack(out)

    results = []
    for fn in (unrolled, lstm_sequence):
        with tf.GradientTape() as tape:
            tape.watch([xw, rk])
            loss = tf.reduce_sum(fn(xw, rk) * weights)
        results.append([loss.numpy(), *[g.numpy() for g in tape.gradient(loss, [xw, rk])]])
    for ref, got in zip(*results, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_feature_standardisation_is_applied_everywhere_and_saved(tmp_path):
    """With stats set, initial_state and the training loss see (f - mean) * inv_std; saved and reloaded."""
    rng = np.random.default_rng(1)
    mean, inv_std = rng.normal(size=8).astype(np.float32), rng.uniform(0.5, 2, size=8).astype(np.float32)
    feats = rng.normal(size=(3, 8)).astype(np.float32)
    seqs = rng.integers(0, 30, size=(3, 4)).astype(np.int32)
    plain = build_decoder(CFG, seed=4)
    normed = build_decoder(ModelConfig(**{**CFG.to_dict(), "feature_norm": "standardize"}), seed=4)
    normed.set_feature_stats(mean, inv_std)
    want = (feats - mean) * inv_std
    np.testing.assert_allclose(normed.initial_state(feats)[0], plain.initial_state(want)[0], atol=1e-6)
    mask = np.ones_like(seqs)
    np.testing.assert_allclose(normed.loss_sums(feats, seqs, seqs, mask)[0],
                               plain.loss_sums(want, seqs, seqs, mask)[0], rtol=1e-6)
    assert not np.allclose(normed.initial_state(feats)[0], plain.initial_state(feats)[0])
    vocab = Vocabulary.build(["a b c"] * 4)
    config = ModelConfig(vocab_size=len(vocab), embedding_size=16, lstm_units=12, feature_dim=8,
                         feature_norm="standardize")
    model = build_decoder(config, seed=0)
    model.set_feature_stats(mean, inv_std)
    save_model_dir(tmp_path / "m", model, config, vocab, cnn={})
    loaded = load_model_dir(tmp_path / "m").model
    np.testing.assert_array_equal(loaded.feature_mean.numpy(), mean)
    np.testing.assert_array_equal(loaded.feature_inv_std.numpy(), inv_std)
    with pytest.raises(InputError, match="feature normalisation"):
        ModelConfig(vocab_size=5, feature_norm="whiten")


def test_sparse_cross_entropy_matches_tensorflow():
    """The custom CE (values and gradient) equals tf.nn.sparse_softmax_cross_entropy_with_logits."""
    from decoder.model import sparse_cross_entropy

    rng = np.random.default_rng(7)
    logits = tf.constant(rng.normal(scale=30.0, size=(6, 50)).astype(np.float32))  # peaked rows included
    labels = tf.constant(rng.integers(0, 50, size=6).astype(np.int32))
    weights = tf.constant(rng.uniform(size=6).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits)
        ours = sparse_cross_entropy(logits, labels)
        ref = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        ours_w, ref_w = tf.reduce_sum(ours * weights), tf.reduce_sum(ref * weights)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tape.gradient(ours_w, logits).numpy(), tape.gradient(ref_w, logits).numpy(),
                               atol=1e-6)
