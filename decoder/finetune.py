"""`finetune`: im2txt's phase 2 — the trained decoder and its InceptionV3 trained end-to-end from images.

The CNN is rebuilt from the model dir's CNN block (or its `cnn.weights.h5`) and must reproduce the recorded
fingerprint; the decoder starts from `decoder.weights.h5`. Training runs in THE loop of `train-decoder`
(decoder.train.train_loop: checkpoints, exact resume, logging, validation perplexity, tf.distribute, mixed
precision); only the batch source (decoder.finetune_data.ImageBatches) and the trainable model differ.

Blocks (`--trainable-blocks N`): Keras InceptionV3 is a chain of 11 "mixed" blocks whose outputs are the
layers named `mixed0` ... `mixed10`. Block k is every layer after `mixed{k-1}` up to and including `mixed{k}`
(block 0 also holds the stem convolutions). N trains blocks 11-N ... 10 (the top N); the layers below
`mixed{10-N}` are frozen. Default (None) or 11: the whole CNN. 0: the CNN is frozen, only the decoder learns
(from distorted images).
Batch norm: the CNN is always called with training=False, so every BatchNormalization layer normalises
with its moving mean/variance, which never change; its offset (beta; InceptionV3 has no scale) is trained
with its block.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import tensorflow as tf

from data.atomic import atomic_write_json
from data.captions import load_annotations
from data.errors import InputError
from decoder.config import ModelConfig, TrainConfig, recipe_differences
from decoder.distribute import make_strategy, worker_dir
from decoder.finetune_data import BadImages, ImageBatches, image_pairs
from decoder.model import build_decoder
from decoder.modeldir import (
    CNN_WEIGHTS,
    CONFIG_FILE,
    DECODER_WEIGHTS,
    VOCAB_FILE,
    load_model_dir,
    make_config,
    read_config,
    save_model_dir,
)
from decoder.train import Trainable, TrainResult, train_loop

NUM_BLOCKS = 11
_MIXED = re.compile(r"^mixed(\d+)$")


@dataclass
class FinetuneConfig:
    """What is fine-tuned, on which images."""

    model_dir: str  # the trained model dir (train-decoder, import-im2txt or an earlier finetune)
    images: list  # images roots, looked up in turn for each caption file path
    captions: list  # caption file(s): COCO json, Karpathy dataset_*.json or Flickr8k token file
    caption_format: str = "auto"  # "auto" (detected from the content), "coco", "karpathy" or "flickr8k"
    split_scheme: str = "auto"  # train on the train split, validate on val (data.splits.SPLIT_SCHEMES)
    trainable_blocks: int | None = None  # train only the top N of the 11 mixed blocks; None: the whole CNN
    image_size: int | None = None  # CNN input size; None: the model dir's CNN image size
    decode_threads: int = 8  # threads decoding each batch's image files (PIL releases the GIL)
    extra: dict = field(default_factory=dict)  # free-form notes recorded in config.json

    def to_dict(self) -> dict:
        """JSON-able dict of every field."""
        return {**self.__dict__, "images": [str(p) for p in self.images],
                "captions": [str(c) for c in self.captions]}


def phase2_recipe(**overrides) -> TrainConfig:
    """im2txt's phase 2: SGD, lr 0.0005 constant, global-norm clip 5.0, batch 32; `overrides` (None:
    keep the default) win. Validation on at most 2000 pairs (max_val_pairs=0: all); keeps 3 checkpoints."""
    settings = {"optimizer": "sgd", "learning_rate": 0.0005, "lr_decay_factor": 1.0, "clip_gradients": 5.0,
                "batch_size": 32, "keep_checkpoints": 3, "max_val_pairs": 2000}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    settings["max_val_pairs"] = settings["max_val_pairs"] or None  # 0: every validation pair
    settings.setdefault("val_batch_size", settings["batch_size"])
    return TrainConfig(**settings)


def resolve_precision(precision: str) -> str:
    """"auto" -> mixed_float16 when a GPU is visible, else float32; other values unchanged."""
    if precision != "auto":
        return precision
    return "mixed_float16" if tf.config.list_logical_devices("GPU") else "float32"


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


class FinetuneTrainable(Trainable):
    """CNN + decoder from images: batch["images"] float32 [b, S, S, 3] -> pooled features -> caption loss.
    The CNN always runs with training=False (batch norm in inference mode, moving statistics frozen)."""

    def __init__(self, cnn, decoder):
        super().__init__({"decoder": decoder, "cnn": StableNames(cnn)})
        self.cnn, self.decoder = cnn, decoder

    def features(self, images):
        """float32 [b, S, S, 3] in [-1, 1] -> float32 [b, 2048]."""
        return tf.cast(self.cnn(images, training=False), tf.float32)

    def loss_sums(self, batch, training, seed):
        return self.decoder.loss_sums(self.features(batch["images"]), batch["input_seqs"],
                                      batch["target_seqs"], batch["mask"], training=training, seed=seed)


def rebuild_cnn(model_dir, cnn: dict, weights_path=None, image_size: int | None = None):
    """(InceptionV3 with the model dir's CNN weights, its CNN block) — InputError when it has no CNN record,
    cannot be built, or does not reproduce the recorded fingerprint. `weights_path`: the dir's
    cnn.weights.h5 (preferred over the block's `weights`); `image_size` overrides the block's."""
    from extract.encoder import CNNSpec, build_encoder, weights_fingerprint
    from extract.preprocess import resize_size

    if not cnn or not cnn.get("arch"):
        raise InputError(f"{Path(model_dir) / CONFIG_FILE} has no CNN record: fine-tuning needs the CNN the "
                         "features were extracted with (train the model dir from an extract feature store).")
    spec = CNNSpec.from_dict(cnn)
    if weights_path is not None:
        spec.weights = str(weights_path)
    if image_size:
        spec.image_size, spec.resize_size = int(image_size), resize_size(int(image_size))
    try:
        model = build_encoder(spec)
    except Exception as err:  # noqa: BLE001 - any failure to rebuild is a bad model dir
        raise InputError(f"The CNN of {model_dir} cannot be rebuilt ({err}).") from None
    got = weights_fingerprint(model)
    if cnn.get("fingerprint") and got != cnn["fingerprint"]:
        raise InputError(f"The CNN of {model_dir} cannot be rebuilt: weights {spec.weights} give fingerprint "
                         f"{got[:12]}, config.json records {cnn['fingerprint'][:12]}.")
    return model, {**spec.to_dict(), "fingerprint": got}


def load_cnn(model_dir, image_size: int | None = None):
    """(CNN, CNN block) of a model dir: its cnn.weights.h5 when present (fine-tuned or imported), else the
    block's weights; fingerprint checked (see rebuild_cnn)."""
    loaded = load_model_dir(model_dir)
    return rebuild_cnn(model_dir, loaded.cnn, loaded.cnn_weights_path, image_size)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_out_dir(out: Path, config: dict, overwrite: bool) -> None:
    """Resume only a run of the same fine-tuning (source, blocks, size, model, recipe); else InputError
    unless `overwrite`, which clears what a previous run wrote."""
    saved = read_config(out) if out.is_dir() else None
    if saved is None:
        return
    diffs = [k for k in ("model", "finetune") if saved.get(k) != config.get(k)]
    diffs += [f"train.{k}" for k in recipe_differences(saved.get("train", {}), config["train"])]
    if diffs and not overwrite:
        raise InputError(f"{out} holds a different run ({', '.join(diffs)}): use another --out, or "
                         "--overwrite to start it afresh.")
    if overwrite:
        for name in (CONFIG_FILE, VOCAB_FILE, DECODER_WEIGHTS, CNN_WEIGHTS, "metrics.jsonl"):
            (out / name).unlink(missing_ok=True)
        for sub in ["checkpoints", "logs", *[p.name for p in out.glob("worker-*")]]:
            shutil.rmtree(out / sub, ignore_errors=True)


def _split_pairs(annotations, split: str, roots, vocab, log):
    records = annotations.part(split)
    if not records:
        raise InputError(f"The {split} split of the caption file(s) is empty: check --split-scheme.")
    pairs, files = image_pairs(records, roots, vocab)
    s = pairs.stats
    log(f"{split}: {s['pairs']} (image, caption) pairs from {s['images']} images; skipped "
        f"{s['missing_image']} captions whose image is under no --images root"
        + (f" (e.g. {s['missing_examples'][0]})" if s["missing_examples"] else ""))
    if not len(pairs):
        raise InputError(f"No image of the {split} split was found under the --images root(s).")
    return pairs, files


def _check_args(cfg: FinetuneConfig, loaded) -> int:
    """InputError for a bad option or a model dir without a CNN record; returns the image size."""
    from extract.encoder import MIN_IMAGE_SIZE

    if not loaded.cnn or not loaded.cnn.get("arch"):
        rebuild_cnn(cfg.model_dir, loaded.cnn)  # raises the "no CNN record" error
    image_size = int(cfg.image_size or loaded.cnn.get("image_size") or 299)
    if image_size < MIN_IMAGE_SIZE:
        raise InputError(f"--image-size {image_size} is too small: InceptionV3 needs at least 75 px.")
    if cfg.trainable_blocks is not None and not 0 <= cfg.trainable_blocks <= NUM_BLOCKS:
        raise InputError(f"--trainable-blocks {cfg.trainable_blocks} is out of range: InceptionV3 has "
                         f"{NUM_BLOCKS} mixed blocks (give 0 to {NUM_BLOCKS}).")
    if not cfg.images:
        raise InputError("--images DIR is required (the folder the caption file's image paths are under).")
    return image_size


def finetune(cfg: FinetuneConfig, out, train: TrainConfig, overwrite: bool = False, strategy=None,
             log=print, progress: bool = True) -> TrainResult:
    """Fine-tune the CNN and decoder of `cfg.model_dir` into the new model dir `out` (resuming there)."""
    from extract.inputs import check_root

    train.validate()
    strategy = strategy or make_strategy()
    source_dir, out = Path(cfg.model_dir), Path(out)
    if out.resolve() == source_dir.resolve():
        raise InputError(f"--out {out} is the trained model dir itself: give a new folder.")
    loaded = load_model_dir(source_dir)
    image_size = _check_args(cfg, loaded)
    roots = [check_root(r) for r in cfg.images]
    annotations = load_annotations(cfg.captions, fmt=cfg.caption_format, split_scheme=cfg.split_scheme)
    log(f"captions: {annotations.summary()}")
    vocab, model_config = loaded.vocab, ModelConfig.from_dict(loaded.config["model"])
    train_pairs, train_files = _split_pairs(annotations, "train", roots, vocab, log)
    val_pairs, val_files = _split_pairs(annotations, "val", roots, vocab, log)
    identity = {"source": str(source_dir.resolve()), "source_cnn_fingerprint": loaded.cnn.get("fingerprint"),
                "source_decoder_sha256": _sha256(source_dir / DECODER_WEIGHTS),
                "trainable_blocks": cfg.trainable_blocks, "image_size": image_size}
    config = make_config(model_config, len(vocab), loaded.cnn, {
        "train": train.to_dict(), "data": cfg.to_dict(), "finetune": identity})
    _check_out_dir(out, config, overwrite)

    if train.precision != "float32":
        import keras

        keras.mixed_precision.set_global_policy(train.precision)
    with strategy.scope():  # variables of every replica
        cnn, start_block = rebuild_cnn(source_dir, loaded.cnn, loaded.cnn_weights_path, image_size)
        trained_layers = set_trainable_blocks(cnn, cfg.trainable_blocks)
        decoder = build_decoder(model_config, seed=train.seed)
        decoder.load_weights(str(source_dir / DECODER_WEIGHTS))
        trainable = FinetuneTrainable(cnn, decoder)
    log(f"CNN: InceptionV3 at {image_size} px from {start_block['weights']} (fingerprint "
        f"{start_block['fingerprint'][:12]}); training {len(trained_layers)} of "
        f"{sum(1 for layer in cnn.layers if layer.weights)} layers with weights"
        + ("" if cfg.trainable_blocks is None else f" (top {cfg.trainable_blocks} mixed blocks)")
        + "; batch norm in inference mode")

    out_dir = worker_dir(out, strategy)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab.save(out_dir / VOCAB_FILE)
    atomic_write_json(out_dir / CONFIG_FILE, config)
    bad = BadImages(log)
    source = ImageBatches(train_pairs, train_files, train.batch_size, train.seed, image_size, bad,
                          threads=cfg.decode_threads)
    val_source = ImageBatches(val_pairs, val_files, train.val_batch_size, train.seed, image_size, bad,
                              threads=cfg.decode_threads)

    def finish(trainable, directory, result):
        from extract.encoder import weights_fingerprint

        cnn_model = trainable.cnn
        new_block = {**start_block, "weights": str((Path(directory) / CNN_WEIGHTS).resolve()),
                     "fingerprint": weights_fingerprint(cnn_model)}
        extra = {k: config[k] for k in ("train", "data", "finetune")}
        extra["source_cnn"] = start_block
        extra["result"] = {"step": result.step, "epoch": result.epoch,
                           "val_perplexity": result.val_perplexity,
                           "best_val_perplexity": result.best_val_perplexity,
                           "train_pairs": train_pairs.stats, "val_pairs": val_pairs.stats,
                           "images": bad.summary()}
        save_model_dir(directory, trainable.decoder, model_config, vocab, new_block, extra=extra,
                       cnn_weights_src=cnn_model)
        s = bad.summary()
        log(f"bad images: {s['bad_images']} skipped ({s['skipped_pairs']} pairs); new CNN fingerprint "
            f"{new_block['fingerprint'][:12]} -> {Path(directory) / CNN_WEIGHTS}")

    try:
        return train_loop(lambda: trainable, source, val_source, train, out, strategy=strategy, log=log,
                          finish=finish, progress=progress)
    finally:
        source.close()
        val_source.close()
