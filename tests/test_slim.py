"""TF-slim InceptionV3 checkpoints -> Keras InceptionV3 (extract.slim, `--cnn-weights slim:PATH`)."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from base.errors import InputError
from extract.encoder import build_encoder
from extract.slim import (
    CheckpointReader,
    check_slim_variables,
    keras_conv_bn_pairs,
    load_slim_weights,
    save_tf1_checkpoint,
    slim_conv_scopes,
    slim_variable_names,
)


def _creation_index(layer) -> int:
    """Keras auto-names layers `conv2d`, `conv2d_1`, ... in creation order (within one model build)."""
    match = re.search(r"_(\d+)$", layer.name)
    return int(match.group(1)) if match else 0


def _by_creation(model, cls):
    return sorted((layer for layer in model._flatten_layers() if isinstance(layer, cls)), key=_creation_index)


@pytest.fixture(scope="module")
def cnn():
    """A bare Keras InceptionV3 (include_top=False) at 75 px, random init."""
    keras.utils.set_random_seed(0)
    return keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(75, 75, 3))


@pytest.fixture(scope="module")
def slim_ckpt(cnn, tmp_path_factory):
    """(prefix, tensors): a slim-zoo-like checkpoint: the 376 variables with small random values, plus the
    classifier heads, global_step and an im2txt decoder variable (all to be ignored)."""
    rng = np.random.default_rng(0)
    tensors = {}
    for name, (conv, bn) in zip(slim_conv_scopes(), keras_conv_bn_pairs(cnn), strict=True):
        tensors[f"{name}/weights"] = rng.normal(0, 0.05, conv.kernel.shape).astype(np.float32)
        n = bn.beta.shape
        tensors[f"{name}/BatchNorm/beta"] = rng.normal(0, 0.1, n).astype(np.float32)
        tensors[f"{name}/BatchNorm/moving_mean"] = rng.normal(0, 0.1, n).astype(np.float32)
        tensors[f"{name}/BatchNorm/moving_variance"] = rng.uniform(0.5, 1.5, n).astype(np.float32)
    tensors["InceptionV3/Logits/Conv2d_1c_1x1/weights"] = np.ones((1, 1, 2048, 3), np.float32)
    tensors["InceptionV3/AuxLogits/Conv2d_2a_5x5/BatchNorm/beta"] = np.ones(3, np.float32)
    tensors["global_step"] = np.int64(7)
    tensors["logits/biases"] = np.ones(5, np.float32)
    prefix = save_tf1_checkpoint(tmp_path_factory.mktemp("slim") / "inception_v3.ckpt", tensors)
    return prefix, tensors


def test_graph_order_is_creation_order(cnn):
    pairs = keras_conv_bn_pairs(cnn)
    assert [conv for conv, _ in pairs] == _by_creation(cnn, keras.layers.Conv2D)
    assert [bn for _, bn in pairs] == _by_creation(cnn, keras.layers.BatchNormalization)
    assert len(slim_conv_scopes()) == 94 and len(set(slim_variable_names())) == 376
    assert all(bn.scale is False and bn.epsilon == 0.001 for _, bn in pairs)  # slim's BatchNorm
    assert all(not conv.use_bias for conv, _ in pairs)


def test_real_index_names_and_shapes_fit(cnn, shared_data):
    prefix = shared_data / "im2txt" / "model.ckpt-2000000"
    reader = CheckpointReader(prefix, need_values=False)
    plan = check_slim_variables(reader, keras_conv_bn_pairs(cnn))
    in_scope = sorted(n for n in reader.shapes if n.startswith("InceptionV3/"))
    assert sorted(name for name, _, _ in plan) == in_scope
    with pytest.raises(InputError, match="has an index but no data file"):
        CheckpointReader(prefix)


def test_slim_path_builds_encoder_with_checkpoint_values(slim_ckpt):
    prefix, t = slim_ckpt
    encoder = build_encoder({"weights": f"slim:{prefix}", "image_size": 75})
    convs = _by_creation(encoder, keras.layers.Conv2D)
    bns = _by_creation(encoder, keras.layers.BatchNormalization)
    expected = {  # creation index: 5 stem convs, then Mixed_5b (B0: 5, B1: 6-7, B2: 8-10, B3: 11), ...
        0: "Conv2d_1a_3x3", 5: "Mixed_5b/Branch_0/Conv2d_0a_1x1", 8: "Mixed_5b/Branch_2/Conv2d_0a_1x1",
        14: "Mixed_5c/Branch_1/Conv_1_0c_5x5", 88: "Mixed_7c/Branch_1/Conv2d_0c_3x1",
        93: "Mixed_7c/Branch_3/Conv2d_0b_1x1"}
    for index, scope in expected.items():  # (5 and 8 have the same shape: only the order tells them apart)
        name = f"InceptionV3/{scope}"
        np.testing.assert_array_equal(convs[index].kernel.numpy(), t[f"{name}/weights"])
        np.testing.assert_array_equal(bns[index].beta.numpy(), t[f"{name}/BatchNorm/beta"])
        np.testing.assert_array_equal(bns[index].moving_variance.numpy(),
                                      t[f"{name}/BatchNorm/moving_variance"])
    features = encoder(np.zeros((1, 75, 75, 3), np.float32)).numpy()
    assert features.shape == (1, 2048) and np.isfinite(features).all()


def test_nested_model_and_im2txt_extras_are_ignored(cnn, slim_ckpt):
    prefix, t = slim_ckpt
    inputs = keras.Input((75, 75, 3))
    wrapper = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(cnn(inputs)))
    used = load_slim_weights(wrapper, prefix)
    assert sorted(used) == sorted(slim_variable_names())
    last = _by_creation(cnn, keras.layers.Conv2D)[-1]
    np.testing.assert_array_equal(last.kernel.numpy(),
                                  t["InceptionV3/Mixed_7c/Branch_3/Conv2d_0b_1x1/weights"])


@pytest.mark.parametrize("change, match", [
    ("drop", r"lacks the variable InceptionV3/Mixed_6e/Branch_2/Conv2d_0d_7x1/BatchNorm/moving_mean"),
    ("shape", r"InceptionV3/Mixed_5b/Branch_1/Conv2d_0b_5x5/weights has shape \[3, 3, 48, 64\], "
              r"expected \[5, 5, 48, 64\]"),
    ("unknown", r"unknown InceptionV3 variable InceptionV3/Mixed_8a/Branch_0/Conv2d_0a_1x1/weights"),
], ids=["missing", "shape", "unknown"])
def test_bad_checkpoints_name_the_variable(cnn, slim_ckpt, tmp_path, change, match):
    _, good = slim_ckpt
    shapes = {n: v.shape for n, v in good.items()}  # 1-byte zeros: validation reads only the index
    if change == "drop":
        del shapes["InceptionV3/Mixed_6e/Branch_2/Conv2d_0d_7x1/BatchNorm/moving_mean"]
    elif change == "shape":
        shapes["InceptionV3/Mixed_5b/Branch_1/Conv2d_0b_5x5/weights"] = (3, 3, 48, 64)
    else:
        shapes["InceptionV3/Mixed_8a/Branch_0/Conv2d_0a_1x1/weights"] = (1, 1, 2, 2)
    prefix = save_tf1_checkpoint(tmp_path / "bad.ckpt", {n: np.zeros(s, np.int8) for n, s in shapes.items()})
    before = [w.numpy() for w in cnn.weights[:2]]
    with pytest.raises(InputError, match=match):
        load_slim_weights(cnn, prefix)
    for old, w in zip(before, cnn.weights[:2], strict=True):  # nothing assigned before validation failed
        np.testing.assert_array_equal(old, w.numpy())


def test_missing_or_unreadable_checkpoint(tmp_path, cnn):
    with pytest.raises(InputError, match="No TensorFlow checkpoint at"):
        load_slim_weights(cnn, tmp_path / "inception_v3.ckpt")
    (tmp_path / "broken.ckpt.index").write_bytes(b"not an index")
    with pytest.raises(InputError, match="Cannot read the checkpoint"):
        load_slim_weights(cnn, tmp_path / "broken.ckpt")
    with pytest.raises(InputError, match="No TensorFlow checkpoint found in directory"):
        load_slim_weights(cnn, tmp_path)
    assert tf.train.latest_checkpoint(str(tmp_path)) is None
