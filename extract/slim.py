"""TF-slim `InceptionV3/...` checkpoint variables -> `keras.applications.InceptionV3(include_top=False)`.

The TF-slim Inception V3 (`inception_v3.ckpt` from the TF-slim model zoo, and the CNN inside every im2txt
checkpoint) and the Keras InceptionV3 are the same network: 94 convolutions without bias, each followed by
a BatchNormalization with `scale=False` and epsilon 0.001 (slim: `beta`, `moving_mean`, `moving_variance`;
Keras: the same three weights), in the same order, mixed-block branches concatenated in the same order
(slim `Branch_0..3` = Keras `branch1x1, branch5x5/7x7/3x3, branch3x3dbl/7x7dbl, branch_pool`). Kernels are
HWIO [kh, kw, in, out] in both. Keras layer names are auto-numbered, so the Keras convolutions are ordered by
walking the model's graph (inputs of each concatenation in order), which reproduces the order they were
created in; every pair is shape-checked.

Checkpoints are read with `tf.train.load_checkpoint` only (no TF1 graph). `save_tf1_checkpoint` writes a V2
checkpoint with exact TF1 names (used by the tests and for round trips).
"""

from __future__ import annotations

import collections
import glob
import os
import re
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from base.errors import InputError

SCOPE = "InceptionV3"
# Classification heads of the slim model zoo checkpoint: not part of include_top=False, skipped.
TOP_SCOPES = ("InceptionV3/AuxLogits/", "InceptionV3/Logits/")
# Optimizer / moving-average state saved next to a variable: training state, skipped.
_TRAINING_STATE = re.compile(
    r"(^|/)(beta1_power|beta2_power)$|/(Momentum|Adam|Adam_1|RMSProp|RMSProp_1|Adagrad|AdagradDA|Ftrl|"
    r"Ftrl_1|ExponentialMovingAverage)$")

_STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3")
_B5 = (("Conv2d_0a_1x1",), ("Conv2d_0a_1x1", "Conv2d_0b_5x5"),
       ("Conv2d_0a_1x1", "Conv2d_0b_3x3", "Conv2d_0c_3x3"), ("Conv2d_0b_1x1",))
_B6 = (("Conv2d_0a_1x1",), ("Conv2d_0a_1x1", "Conv2d_0b_1x7", "Conv2d_0c_7x1"),
       ("Conv2d_0a_1x1", "Conv2d_0b_7x1", "Conv2d_0c_1x7", "Conv2d_0d_7x1", "Conv2d_0e_1x7"),
       ("Conv2d_0b_1x1",))
_B7_BRANCH2 = ("Conv2d_0a_1x1", "Conv2d_0b_3x3", "Conv2d_0c_1x3", "Conv2d_0d_3x1")
# Mixed blocks in network order; per block the branches in concatenation order, per branch its convs in
# order. Slim's own naming quirks are kept (Mixed_5c `Conv_1_0c_5x5`, Mixed_7b `0b_3x1` vs 7c `0c_3x1`).
_MIXED = (
    ("Mixed_5b", _B5),
    ("Mixed_5c", (("Conv2d_0a_1x1",), ("Conv2d_0b_1x1", "Conv_1_0c_5x5")) + _B5[2:]),
    ("Mixed_5d", _B5),
    ("Mixed_6a", (("Conv2d_1a_1x1",), ("Conv2d_0a_1x1", "Conv2d_0b_3x3", "Conv2d_1a_1x1"))),
    ("Mixed_6b", _B6), ("Mixed_6c", _B6), ("Mixed_6d", _B6), ("Mixed_6e", _B6),
    ("Mixed_7a", (("Conv2d_0a_1x1", "Conv2d_1a_3x3"),
                  ("Conv2d_0a_1x1", "Conv2d_0b_1x7", "Conv2d_0c_7x1", "Conv2d_1a_3x3"))),
    ("Mixed_7b", (("Conv2d_0a_1x1",), ("Conv2d_0a_1x1", "Conv2d_0b_1x3", "Conv2d_0b_3x1"), _B7_BRANCH2,
                  ("Conv2d_0b_1x1",))),
    ("Mixed_7c", (("Conv2d_0a_1x1",), ("Conv2d_0a_1x1", "Conv2d_0b_1x3", "Conv2d_0c_3x1"), _B7_BRANCH2,
                  ("Conv2d_0b_1x1",))),
)
_BN_PARTS = ("beta", "moving_mean", "moving_variance")


def slim_conv_scopes() -> list[str]:
    """The 94 slim conv scopes (`InceptionV3/Mixed_5b/Branch_1/Conv2d_0b_5x5`, ...) in network order."""
    scopes = [f"{SCOPE}/{name}" for name in _STEM]
    for block, branches in _MIXED:
        for b, convs in enumerate(branches):
            scopes += [f"{SCOPE}/{block}/Branch_{b}/{conv}" for conv in convs]
    return scopes


def slim_variable_names() -> list[str]:
    """The 376 slim variable names of the include_top=False network (weights + 3 BatchNorm per conv)."""
    return [f"{s}/{part}" for s in slim_conv_scopes() for part in ("weights",) + tuple(
        f"BatchNorm/{p}" for p in _BN_PARTS)]


def is_skippable(name: str) -> bool:
    """True for variables that carry no inference weight: global_step, optimizer/EMA state, slim heads."""
    return name == "global_step" or bool(_TRAINING_STATE.search(name)) or name.startswith(TOP_SCOPES)


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """The absolute checkpoint prefix from a prefix, its `.index`/`.data-*`/`.meta` file, or a directory
    (its latest checkpoint); InputError when there is none."""
    text = str(path)
    text = re.sub(r"\.(index|meta|data-\d+-of-\d+)$", "", text)
    if os.path.isdir(text):
        latest = tf.train.latest_checkpoint(text)
        if latest is None:
            raise InputError(f"No TensorFlow checkpoint found in directory {text}.")
        text = latest
    if not os.path.isfile(text + ".index"):
        raise InputError(f"No TensorFlow checkpoint at {path} (expected the file {text}.index).")
    return os.path.abspath(text)


class CheckpointReader:
    """Names, shapes and values of a TF1 (V2-format) checkpoint; counts every value read.

    `shapes`: dict name -> tuple shape. `get(name, shape)` returns float32 numpy of that shape (InputError
    naming the variable on a missing name or wrong shape) and counts the read in `reads`.
    """

    def __init__(self, path: str | os.PathLike, need_values: bool = True):
        self.prefix = resolve_checkpoint(path)
        try:
            self._reader = tf.train.load_checkpoint(self.prefix)
        except Exception as err:  # any TF failure here: unreadable file
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise InputError(f"Cannot read the checkpoint {self.prefix}: {reason}") from None
        self.shapes = {k: tuple(v) for k, v in self._reader.get_variable_to_shape_map().items()}
        self.reads: collections.Counter = collections.Counter()
        if need_values and not glob.glob(glob.escape(self.prefix) + ".data-*"):
            raise InputError(f"The checkpoint {self.prefix} has an index but no data file "
                             f"({Path(self.prefix).name}.data-00000-of-00001): the values are missing.")

    def check(self, name: str, shape: tuple) -> None:
        """InputError unless `name` exists with exactly `shape`."""
        if name not in self.shapes:
            raise InputError(f"The checkpoint {self.prefix} lacks the variable {name}.")
        if self.shapes[name] != tuple(shape):
            raise InputError(f"The checkpoint {self.prefix} variable {name} has shape "
                             f"{list(self.shapes[name])}, expected {list(shape)}.")

    def get(self, name: str, shape: tuple | None = None, dtype=np.float32) -> np.ndarray:
        """The value of `name` as numpy of `dtype` (shape-checked when `shape` is given)."""
        if shape is not None:
            self.check(name, shape)
        elif name not in self.shapes:
            raise InputError(f"The checkpoint {self.prefix} lacks the variable {name}.")
        self.reads[name] += 1
        try:
            return np.asarray(self._reader.get_tensor(name), dtype=dtype)
        except Exception as err:  # truncated or corrupt data file
            raise InputError(f"Cannot read variable {name} from {self.prefix}: "
                             f"{str(err).splitlines()[0]}") from None


def save_tf1_checkpoint(prefix: str | os.PathLike, tensors: dict[str, np.ndarray]) -> str:
    """Write a V2 checkpoint `prefix.index` + `prefix.data-00000-of-00001` whose names are exactly the keys.

    No TF1 graph is built (one `SaveV2` op). Returns the prefix as str.
    """
    names = sorted(tensors)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.convert_to_tensor(tensors[n]) for n in names])
    return str(prefix)


def _inception_submodel(model):
    """The (possibly nested) functional model whose own layers are the InceptionV3 convolutions."""
    found = []

    def visit(m):
        if any(isinstance(layer, keras.layers.Conv2D) for layer in m.layers):
            found.append(m)
        for layer in m.layers:
            if isinstance(layer, keras.Model):
                visit(layer)

    visit(model)
    if len(found) != 1:
        raise ValueError(f"Expected one InceptionV3 inside {model.name}, found {len(found)} models with "
                         "convolutions.")
    return found[0]


def _graph_order(model) -> list:
    """The layers of a functional `model` in depth-first post-order from its outputs (inputs in order).

    For keras.applications.InceptionV3 this is the order the layers were created in, i.e. slim's order.
    """
    roots = [t._keras_history for t in model.outputs]
    stack = [(op._inbound_nodes[i], False) for op, i, _ in reversed(roots)]
    seen, order = set(), []
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node.operation)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        stack += [(p, False) for p in reversed(node.parent_nodes) if id(p) not in seen]
    return order


def keras_conv_bn_pairs(model) -> list[tuple]:
    """[(Conv2D, BatchNormalization)] * 94 of the InceptionV3 in `model`, in slim's order."""
    layers = _graph_order(_inception_submodel(model))
    convs = [layer for layer in layers if isinstance(layer, keras.layers.Conv2D)]
    bns = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    if len(convs) != 94 or len(bns) != 94:
        raise ValueError(f"{model.name} is not an InceptionV3: {len(convs)} convolutions and {len(bns)} "
                         "batch norms instead of 94.")
    for conv, bn in zip(convs, bns, strict=True):
        if bn._inbound_nodes[0].parent_nodes[0].operation is not conv:
            raise ValueError(f"{model.name}: batch norm {bn.name} does not follow convolution {conv.name}.")
    return list(zip(convs, bns, strict=True))


def check_slim_variables(reader: CheckpointReader, pairs: list[tuple]) -> list[tuple[str, object, tuple]]:
    """Validate the InceptionV3 part of `reader` against the Keras pairs before any value is read.

    Returns [(slim name, keras variable, shape)] for all 376 weights. InputError naming the variable on a
    missing one, a wrong shape, or an unknown name in the InceptionV3 scope.
    """
    plan = []
    for scope, (conv, bn) in zip(slim_conv_scopes(), pairs, strict=True):
        kernel_shape = tuple(conv.kernel.shape)
        reader.check(f"{scope}/weights", kernel_shape)
        plan.append((f"{scope}/weights", conv.kernel, kernel_shape))
        for part in _BN_PARTS:
            var = getattr(bn, part)
            reader.check(f"{scope}/BatchNorm/{part}", tuple(var.shape))
            plan.append((f"{scope}/BatchNorm/{part}", var, tuple(var.shape)))
    expected = {name for name, _, _ in plan}
    for name in sorted(reader.shapes):
        if name.startswith(SCOPE + "/") and name not in expected and not is_skippable(name):
            raise InputError(f"The checkpoint {reader.prefix} has an unknown InceptionV3 variable {name}.")
    return plan


def assign_slim_weights(model, reader: CheckpointReader) -> list[str]:
    """Fill the InceptionV3 in `model` from `reader` (validated first). Returns the slim names used."""
    pairs = keras_conv_bn_pairs(model)
    plan = check_slim_variables(reader, pairs)
    for name, var, shape in plan:
        var.assign(reader.get(name, shape))
    for conv, bn in pairs:  # equivalent no-ops if a variant of the network has them
        if conv.use_bias:
            conv.bias.assign(np.zeros(conv.bias.shape, np.float32))
        if bn.scale:
            bn.gamma.assign(np.ones(bn.gamma.shape, np.float32))
    return [name for name, _, _ in plan]


def load_slim_weights(model, ckpt_path: str | os.PathLike) -> list[str]:
    """Load a TF-slim `InceptionV3/...` checkpoint into the InceptionV3 in `model` (bare or nested).

    Works with the slim zoo's `inception_v3.ckpt` and with an im2txt checkpoint (its decoder variables,
    outside the InceptionV3 scope, are ignored). Returns the 376 checkpoint names used.
    """
    return assign_slim_weights(model, CheckpointReader(ckpt_path))
