"""Configuration dataclasses of the decoder: one per concern, saved as JSON in the model dir.

`ModelConfig` fixes the network (what a checkpoint needs to be rebuilt); `TrainConfig` is the recipe
(im2txt phase 1 by default: SGD 2.0, global-norm clip 5.0, x0.5 every 8 epochs, batch 32).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from data.errors import InputError


def _from_dict(cls, data: dict, what: str):
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
        return _from_dict(cls, dict(data), "The model config")


@dataclass
class TrainConfig:
    """The training recipe and run length (defaults: im2txt phase 1)."""

    batch_size: int = 32  # global batch size in (image, caption) pairs, split over all replicas
    optimizer: str = "sgd"  # "sgd" (im2txt) or "adam" (Keras defaults: lr 0.001, b1 0.9, b2 0.999, eps 1e-7)
    learning_rate: float | None = None  # None: 2.0 for sgd, 0.001 for adam
    clip_gradients: float = 5.0  # global-norm clip of the gradients (0 disables)
    lr_decay_factor: float = 0.5  # learning rate multiplied by this every `epochs_per_decay` epochs (sgd)
    epochs_per_decay: float = 8.0  # staircase decay period in epochs (epoch = number of training pairs)
    decay_adam: bool = False  # also apply the staircase decay when the optimizer is adam
    epochs: float | None = None  # run length in epochs (one of epochs/steps; steps wins when both are set)
    steps: int | None = None  # run length in optimizer steps
    seed: int = 0  # seeds weight init, per-epoch shuffles, view sampling and dropout
    eval_every: int = 1000  # validation perplexity every N steps (and at each epoch end); 0: epoch ends only
    checkpoint_every: int = 500  # checkpoint every N steps (and at each epoch end and at the end)
    keep_checkpoints: int = 5  # keep the last N step checkpoints (the best-by-validation one is extra)
    val_batch_size: int = 256  # batch size of the validation pass
    max_val_pairs: int | None = None  # evaluate on at most this many validation pairs (None: all)
    bucket_width: int = 1  # captions of lengths within one bucket are batched together (1: exact lengths)
    precision: str = "float32"  # "float32", "mixed_float16" (GPU) or "mixed_bfloat16"
    jit_compile: bool = False  # XLA-compile the train step (one compile per caption length)
    loss_scale: float = 32768.0  # initial dynamic loss scale for mixed_float16
    extra: dict = field(default_factory=dict)  # free-form settings of a caller (e.g. finetune's)

    def resolved_learning_rate(self) -> float:
        """The initial learning rate: the explicit one, else the optimizer's default."""
        if self.learning_rate is not None:
            return float(self.learning_rate)
        return 2.0 if self.optimizer == "sgd" else 0.001

    def validate(self) -> None:
        """InputError (one sentence) on an impossible setting."""
        if self.optimizer not in ("sgd", "adam"):
            raise InputError(f"Unknown optimizer {self.optimizer!r}: use sgd or adam.")
        if self.precision not in ("float32", "mixed_float16", "mixed_bfloat16"):
            raise InputError(f"Unknown precision {self.precision!r}: use float32, mixed_float16 or "
                             "mixed_bfloat16.")
        if self.batch_size < 1:
            raise InputError("--batch-size must be at least 1.")
        if not self.steps and not self.epochs:
            raise InputError("Give the run length with --steps N or --epochs N.")

    def to_dict(self) -> dict:
        """JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Inverse of `to_dict`; InputError on unknown keys."""
        return _from_dict(cls, dict(data), "The training config")


# Settings that may change between a run and its resumption (run length, logging cadence, speed knobs).
RESUMABLE_CHANGES = frozenset({"epochs", "steps", "eval_every", "checkpoint_every", "keep_checkpoints",
                               "val_batch_size", "max_val_pairs", "jit_compile"})


def recipe_differences(saved: dict, current: dict) -> list[str]:
    """Names of the TrainConfig fields (as dicts) that differ and matter for resuming."""
    keys = (set(saved) | set(current)) - RESUMABLE_CHANGES
    return sorted(k for k in keys if saved.get(k) != current.get(k))
