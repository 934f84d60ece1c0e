"""The model dir: config.json, word_counts.txt, decoder.weights.h5 (+ cnn.weights.h5); atomic writes.

config.json = {"format": "showtell-model", "version": 1, "model": ModelConfig dict, "vocab_size": int,
               "cnn": the feature store's CNN block, ...extra (e.g. "train": TrainConfig dict, "data": ...)}.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from data.atomic import atomic_write_json
from data.errors import InputError
from decoder.config import ModelConfig
from decoder.model import ShowAndTell, build_decoder

FORMAT_NAME = "showtell-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
VOCAB_FILE = "word_counts.txt"
DECODER_WEIGHTS = "decoder.weights.h5"
CNN_WEIGHTS = "cnn.weights.h5"


@dataclass
class LoadedModel:
    """What `load_model_dir` returns."""

    model: ShowAndTell  # the decoder with its trained weights
    config: dict  # the whole config.json
    vocab: object  # data.vocab.Vocabulary
    cnn: dict  # the CNN block (arch, weights, seed, image_size, resize_size, fingerprint)
    cnn_weights_path: Path | None  # cnn.weights.h5 when the CNN was fine-tuned or imported


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_weights_atomic(model, path: Path) -> None:
    """`model.save_weights` to a temp `.weights.h5` name, fsync, rename to `path`."""
    path = Path(path)
    tmp = path.with_name(f"{path.name[:-len('.weights.h5')]}.tmp-{os.getpid()}.weights.h5")
    model.save_weights(str(tmp))
    _fsync_file(tmp)
    os.replace(tmp, path)


def read_config(model_dir: Path) -> dict | None:
    """The model dir's config.json, None when absent; InputError when unreadable or of another format."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{path} is not a readable JSON model config ({err}).") from None
    if config.get("format") != FORMAT_NAME:
        raise InputError(f"{path} is not a showtell model config (format {config.get('format')!r}).")
    if config.get("version") != FORMAT_VERSION:
        raise InputError(f"{path} has model-dir version {config.get('version')!r}; this showtell reads "
                         f"version {FORMAT_VERSION}.")
    return config


def make_config(model_config: ModelConfig, vocab_size: int, cnn: dict, extra: dict | None = None) -> dict:
    """The config.json content."""
    config = dict(extra or {})
    config.update({"format": FORMAT_NAME, "version": FORMAT_VERSION, "model": model_config.to_dict(),
                   "vocab_size": int(vocab_size), "cnn": dict(cnn or {})})
    return config


def save_model_dir(model_dir, model, model_config: ModelConfig, vocab, cnn: dict, extra: dict | None = None,
                   cnn_weights_src=None) -> Path:
    """Write config.json, word_counts.txt, decoder.weights.h5 and optionally cnn.weights.h5, atomically.

    cnn_weights_src: None, a path to a `.weights.h5` file (copied), or a Keras model (its save_weights).
    Returns the model dir.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    vocab.save(model_dir / VOCAB_FILE)
    save_weights_atomic(model, model_dir / DECODER_WEIGHTS)
    if cnn_weights_src is not None:
        if hasattr(cnn_weights_src, "save_weights"):
            save_weights_atomic(cnn_weights_src, model_dir / CNN_WEIGHTS)
        else:
            tmp = model_dir / f"{CNN_WEIGHTS}.tmp-{os.getpid()}"
            shutil.copyfile(cnn_weights_src, tmp)
            _fsync_file(tmp)
            os.replace(tmp, model_dir / CNN_WEIGHTS)
    atomic_write_json(model_dir / CONFIG_FILE, make_config(model_config, len(vocab), cnn, extra))
    return model_dir


def load_model_dir(model_dir) -> LoadedModel:
    """Rebuild the decoder from a model dir; InputError naming the file when something is missing or wrong."""
    from data.vocab import Vocabulary

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"Model dir {model_dir} does not exist.")
    config = read_config(model_dir)
    if config is None:
        raise InputError(f"{model_dir} has no {CONFIG_FILE}: not a trained model dir.")
    weights = model_dir / DECODER_WEIGHTS
    if not weights.exists():
        raise InputError(f"{weights} is missing: the model dir holds no trained decoder yet.")
    vocab = Vocabulary.load(model_dir / VOCAB_FILE)
    model_config = ModelConfig.from_dict(config["model"])
    # An imported im2txt model has more embedding rows (12000) than vocabulary ids (11520): the extra rows
    # are never produced by encode() and decode to <UNK>. Fewer rows than ids cannot work.
    if len(vocab) > model_config.vocab_size:
        raise InputError(f"{model_dir / VOCAB_FILE} has {len(vocab)} words but the model was built for "
                         f"{model_config.vocab_size}.")
    model = build_decoder(model_config)
    try:
        model.load_weights(str(weights))
    except (ValueError, OSError) as err:
        raise InputError(f"{weights} does not fit the model in {CONFIG_FILE} ({err}).") from None
    cnn_path = model_dir / CNN_WEIGHTS
    return LoadedModel(model=model, config=config, vocab=vocab, cnn=dict(config.get("cnn") or {}),
                       cnn_weights_path=cnn_path if cnn_path.exists() else None)
