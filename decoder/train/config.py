"""The training recipe (one dataclass, saved as the model dir's config.json "train" block) and what may change
when a run is resumed. Defaults: im2txt phase 1 (SGD 2.0, global-norm clip 5.0, x0.5 every 8 epochs,
batch 32). Option ranges are checked by the command line (cli.py) before TensorFlow is imported and again
by `validate` for callers that build a TrainConfig in Python.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from base.devices import PRECISIONS, resolve_precision
from base.errors import InputError
from decoder.config import config_from_dict


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
    precision: str = "float32"  # "float32", "mixed_float16" (loss-scaled) or "mixed_bfloat16"; "auto" until
    # resolve_precision (base.devices.auto_precision: what this machine runs natively, per command)
    loss_scale: float = 32768.0  # initial dynamic loss scale for mixed_float16
    extra: dict = field(default_factory=dict)  # free-form settings of a caller (e.g. finetune's)

    def resolved_learning_rate(self) -> float:
        """The initial learning rate: the explicit one, else the optimizer's default."""
        if self.learning_rate is not None:
            return float(self.learning_rate)
        return 2.0 if self.optimizer == "sgd" else 0.001

    def resolve_precision(self, command: str = "train-decoder") -> TrainConfig:
        """Turn precision "auto" into what `command` runs in on this machine (base.devices.auto_precision:
        bfloat16 on Ampere+ GPUs and, per command, on CPUs with AMX/AVX512-BF16; float16 on older GPUs;
        else float32); returns self. Other names are kept (validate checks them)."""
        if self.precision == "auto":
            self.precision = resolve_precision("auto", command)[0]
        return self

    def validate(self) -> None:
        """InputError (one sentence) on an impossible setting (the cli checks the same ranges first)."""
        if self.optimizer not in ("sgd", "adam"):
            raise InputError(f"Unknown optimizer {self.optimizer!r}: use sgd or adam.")
        if self.precision not in PRECISIONS:
            raise InputError(f"Unknown precision {self.precision!r}: use float32, mixed_float16 or "
                             "mixed_bfloat16.")
        if not self.steps and not self.epochs:
            raise InputError("Give the run length with --steps N or --epochs N.")
        checks = [("batch_size", 1, None), ("steps", 1, None), ("epochs", 0.0, None),
                  ("learning_rate", 0.0, None), ("clip_gradients", 0.0, None), ("lr_decay_factor", 0.0, 1.0),
                  ("epochs_per_decay", 0.0, None), ("eval_every", 0, None), ("checkpoint_every", 0, None),
                  ("keep_checkpoints", 1, None), ("val_batch_size", 1, None), ("max_val_pairs", 1, None),
                  ("loss_scale", 1.0, None)]
        for name, low, high in checks:
            check_range(name, getattr(self, name), low, high, exclusive_low=name in _POSITIVE)

    def to_dict(self) -> dict:
        """JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Inverse of `to_dict`; InputError on unknown keys."""
        return config_from_dict(cls, dict(data), "The training config")


# Settings that may change between a run and its resumption (run length, logging cadence, speed knobs).
RESUMABLE_CHANGES = frozenset({"epochs", "steps", "eval_every", "checkpoint_every", "keep_checkpoints",
                               "val_batch_size", "max_val_pairs"})


RETIRED = frozenset({"jit_compile", "bucket_width"})  # fields of older versions, ignored when resuming


def recipe_differences(saved: dict, current: dict) -> list[str]:
    """Names of the TrainConfig fields (as dicts) that differ and matter for resuming."""
    keys = (set(saved) | set(current)) - RESUMABLE_CHANGES - RETIRED
    return sorted(k for k in keys if saved.get(k) != current.get(k))


_POSITIVE = {"epochs", "learning_rate", "epochs_per_decay"}  # must be > 0, not only >= 0


def check_range(name: str, value, low, high=None, exclusive_low: bool = False) -> None:
    """InputError unless `value` (None allowed: unset) is finite and within [low, high] (low excluded when
    `exclusive_low`). `name` is the dataclass field; the message names the matching --option."""
    if value is None:
        return
    option = "--" + name.replace("_", "-")
    if not math.isfinite(float(value)):
        raise InputError(f"{option} {value} is not a finite number.")
    too_low = value <= low if exclusive_low else value < low
    if too_low or (high is not None and value > high):
        bound = f"> {low}" if exclusive_low else f">= {low}"
        raise InputError(f"{option} {value} is out of range: it must be {bound}"
                         + (f" and <= {high}." if high is not None else "."))
