"""Batched beam search over an abstract step function (knows nothing of Keras models or files)."""
