"""The InceptionV3 as finetune trains it: its 11 "mixed" blocks, which of them train, and stable variable
names for checkpoints.

Keras InceptionV3 is a chain of 11 "mixed" blocks whose outputs are the layers named `mixed0` ... `mixed10`.
Block k is every layer after `mixed{k-1}` up to and including `mixed{k}` (block 0 also holds the stem
convolutions). `--trainable-blocks N` trains blocks 11-N ... 10 (the top N); the layers below `mixed{10-N}`
are frozen. None or 11: the whole CNN. 0: the CNN is frozen, only the decoder learns (from distorted images).
"""

from __future__ import annotations

import re

from base.errors import InputError

NUM_BLOCKS = 11
_MIXED = re.compile(r"^mixed(\d+)$")


def block_of_layers(cnn) -> list[int]:
    """Block (0..10) of every layer of a Keras InceptionV3, in `cnn.layers` order (see module docstring).

    Relies on `cnn.layers` being topologically sorted, which Keras guarantees for functional models; the
    avg-pool after mixed10 belongs to block 10."""
    ends = {int(m.group(1)): i for i, layer in enumerate(cnn.layers) if (m := _MIXED.match(layer.name))}
    if sorted(ends) != list(range(NUM_BLOCKS)):
        raise InputError(f"The CNN has no mixed0..mixed10 layers (found {sorted(ends)}): not a Keras "
                         "InceptionV3.")
    blocks, k = [], 0
    for i in range(len(cnn.layers)):
        while k < NUM_BLOCKS - 1 and i > ends[k]:
            k += 1
        blocks.append(k)
    return blocks


def set_trainable_blocks(cnn, n: int | None) -> list[str]:
    """Make only the top `n` blocks trainable (None: all); returns the names of the trainable layers."""
    if n is not None and not 0 <= n <= NUM_BLOCKS:
        raise InputError(f"--trainable-blocks {n} is out of range: InceptionV3 has {NUM_BLOCKS} mixed blocks "
                         "(give 0 to 11).")
    first = 0 if n is None else NUM_BLOCKS - n
    cnn.trainable = True
    names = []
    for layer, block in zip(cnn.layers, block_of_layers(cnn), strict=True):
        layer.trainable = block >= first
        if layer.trainable and layer.weights:
            names.append(layer.name)
    return names


class _Named:
    """A variable seen under another `path` (everything else delegated)."""

    def __init__(self, variable, path: str):
        self._variable, self.path = variable, path

    def __getattr__(self, name):
        return getattr(self._variable, name)


class StableNames:
    """The CNN as the checkpoints see it: variables named `<layer index>/<variable name>` rather than by
    Keras' auto-generated layer names, which depend on what the process built before (`conv2d_94/kernel`
    after another InceptionV3), so a checkpoint resumes in any process."""

    def __init__(self, model):
        self.model = model

    @property
    def weights(self) -> list:
        layers = enumerate(self.model.layers)
        return [_Named(v, f"{i:03d}/{v.name}") for i, layer in layers for v in layer.weights]

    @property
    def trainable_variables(self) -> list:
        return self.model.trainable_variables
