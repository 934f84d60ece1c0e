"""The decoder network's configuration (saved as JSON in the model dir's config.json).

`ModelConfig` fixes the network (what a checkpoint needs to be rebuilt); the training recipe is
decoder.train.config.TrainConfig.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from base.errors import InputError


def config_from_dict(cls, data: dict, what: str):
    """Build dataclass `cls` from `data`, refusing unknown keys with one sentence."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"{what} has unknown setting(s) {', '.join(unknown)}.")
    return cls(**data)


FEATURE_NORMS = ("none", "standardize")


@dataclass
class ModelConfig:
    """The Show and Tell decoder's shape (im2txt sizes by default)."""

    vocab_size: int  # number of word ids, including <S>, </S> and <UNK>
    embedding_size: int = 512  # E: width of the image embedding and of the word embeddings
    lstm_units: int = 512  # U: LSTM state size (h and c are each [B, U])
    feature_dim: int = 2048  # D: width of the pooled CNN feature fed to `image_embedding`
    dropout_keep: float = 0.7  # keep probability of the dropout on LSTM input and output (training only)
    init_scale: float = 0.08  # every weight is initialised uniform in [-init_scale, init_scale]
    # "none" (im2txt): features enter `image_embedding` as extracted. "standardize": (f - mean) / std per
    # dimension, mean/std measured on the training features by train-decoder and stored in the model
    # (needed for --cnn-weights none, whose random-CNN features are ~1e-4 with a large common component).
    feature_norm: str = "none"

    def __post_init__(self):
        if self.feature_norm not in FEATURE_NORMS:
            raise InputError(f"Unknown feature normalisation {self.feature_norm!r}: use one of "
                             f"{', '.join(FEATURE_NORMS)}.")

    def to_dict(self) -> dict:
        """JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Inverse of `to_dict`; InputError on unknown keys."""
        return config_from_dict(cls, dict(data), "The model config")
