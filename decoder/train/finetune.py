"""`finetune`: im2txt's phase 2 — the trained decoder and its InceptionV3 trained end-to-end from images.

The CNN is rebuilt from the model dir's CNN block (or its `cnn.weights.h5`) and must reproduce the recorded
fingerprint; the decoder starts from `decoder.weights.h5`. Training runs in THE loop of `train-decoder`
(decoder.train.loop: checkpoints, exact resume, logging, validation perplexity, tf.distribute, mixed
precision); only the batch source (decoder.train.image_batches.ImageBatches) and the trainable model differ.

Either decoder (decoder.arches): Show and Tell reads the CNN's pooled 2048-d vector; an attention model dir
("arch": "attend") gets the CNN up to Mixed_7c (Keras `mixed10`, built by extract.encoder.build_encoder as
`extract --grid` builds it) and reads its grid's h*w cells, standardised by the decoder's own feature
statistics as at train-decoder time. Its grid_shape is fixed: an --image-size giving another grid is refused.

Blocks (`--trainable-blocks N`): see decoder.train.cnn_blocks.
Batch norm: the CNN is always called with training=False, so every BatchNormalization layer normalises
with its moving mean/variance, which never change; its offset (beta; InceptionV3 has no scale) is trained
with its block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import tensorflow as tf

from base.devices import choose_strategy
from base.digest import file_sha256
from base.errors import InputError
from base.locks import exclusive
from data.captions import load_annotations
from decoder.arches import build_model, grid_shape, model_config_from
from decoder.modeldir import (
    CNN_WEIGHTS,
    cnn_spec,
    derived_run_dirs,
    load_cnn,
    load_model_dir,
    make_config,
    prepare_run_dir,
    save_model_dir,
    start_run_dir,
)
from decoder.train.cnn_blocks import NUM_BLOCKS, StableNames, set_trainable_blocks
from decoder.train.config import TrainConfig
from decoder.train.distribute import worker_dir
from decoder.train.image_batches import BadImages, ImageBatches, ImagePairs, image_pairs
from decoder.train.loop import TrainResult, train_loop
from decoder.train.split_report import pairs_summary, split_report
from decoder.train.step import Trainable
from extract.encoder import MIN_IMAGE_SIZE, grid_size, weights_fingerprint
from extract.inputs import check_root

COMMAND = "finetune"


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
    max_caption_length: int | None = 100  # captions of more tokens are skipped and counted (None: no limit)
    weights: str = "last"  # start from the model dir's "last" (decoder.weights.h5) or "best" weights
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


class FinetuneTrainable(Trainable):
    """CNN + decoder from images: batch["images"] float32 [b, S, S, 3] -> the decoder's features -> caption
    loss. The CNN always runs with training=False (batch norm in inference mode, moving statistics frozen).

    cnn: the pooled InceptionV3 ([b, 2048]) for Show and Tell; for an attention decoder the one ending at
    Mixed_7c ([b, h, w, 2048], extract.encoder.build_encoder with grid=True)."""

    def __init__(self, cnn, decoder):
        super().__init__({"decoder": decoder, "cnn": StableNames(cnn)})
        self.cnn = cnn  # the Keras model (objects["cnn"] is its checkpoint view)
        self.feature_shape = tuple(getattr(decoder, "feature_shape", (decoder.config.feature_dim,)))

    def features(self, images):
        """float32 [b, S, S, 3] in [-1, 1] -> float32 [b, 2048] (attention decoder: the grid's cells float32
        [b, h*w, 2048]). b may be 0 (a replica's share of a last batch smaller than the number of replicas):
        then the CNN is not called, since TensorFlow's CPU (oneDNN) convolution returns a wrongly shaped
        result for an empty batch."""
        def run():
            out = tf.cast(self.cnn(images, training=False), tf.float32)
            return tf.reshape(out, [-1, *self.feature_shape])  # [b, h, w, D] -> [b, L, D]; pooled unchanged

        return tf.cond(tf.shape(images)[0] > 0, run, lambda: tf.zeros([0, *self.feature_shape], tf.float32))

    def loss_sums(self, batch, training, seed):
        return self.decoder.loss_sums(self.features(batch["images"]), batch["input_seqs"],
                                      batch["target_seqs"], batch["mask"], training=training, seed=seed)


def _split_pairs(annotations, split: str, roots, vocab, log, max_words: int | None = None) -> ImagePairs:
    """The ImagePairs of `split`: its captions matched with files under the --images roots (split_report)."""
    return split_report(annotations, split, lambda records: image_pairs(records, roots, vocab, max_words),
                        lambda stats: pairs_summary(stats, "under no --images root", max_words, False),
                        f"No image of the {split} split was found under the --images root(s).", log)


def _check_args(cfg: FinetuneConfig, loaded, model_config) -> int:
    """InputError for a bad option or a model dir without a CNN record; returns the image size."""
    cnn_spec(loaded)  # raises the "records no CNN" error
    image_size = int(cfg.image_size or loaded.image_size)
    if image_size < MIN_IMAGE_SIZE:
        raise InputError(f"--image-size {image_size} is too small: InceptionV3 needs at least 75 px.")
    grid, got = grid_shape(model_config), grid_size(image_size)
    if grid is not None and tuple(grid) != (got, got):
        raise InputError(f"--image-size {image_size} gives a {got}x{got} Mixed_7c grid but the attention "
                         f"model {loaded.model_dir} reads {grid[0]}x{grid[1]} grids: use its image size "
                         f"({loaded.cnn.get('image_size')}) or one with the same grid.")
    if cfg.trainable_blocks is not None and not 0 <= cfg.trainable_blocks <= NUM_BLOCKS:
        raise InputError(f"--trainable-blocks {cfg.trainable_blocks} is out of range: InceptionV3 has "
                         f"{NUM_BLOCKS} mixed blocks (give 0 to {NUM_BLOCKS}).")
    if not cfg.images:
        raise InputError("--images DIR is required (the folder the caption file's image paths are under).")
    return image_size


def finetune(cfg: FinetuneConfig, out, train: TrainConfig, overwrite: bool = False, strategy=None,
             log=print, progress: bool = True) -> TrainResult:
    """Fine-tune the CNN and decoder of `cfg.model_dir` into the new model dir `out` (resuming there).

    train.precision "auto": mixed_float16 on GPUs, else float32. `out` is locked for the whole run."""
    train.resolve_precision("finetune").validate()
    source_dir, out = derived_run_dirs(cfg.model_dir, out)
    strategy = strategy or choose_strategy()
    with exclusive(worker_dir(out, strategy), folder=True):
        return _finetune(cfg, source_dir, out, train, overwrite, strategy, log, progress)


def _finetune(cfg, source_dir: Path, out: Path, train, overwrite, strategy, log, progress) -> TrainResult:
    loaded = load_model_dir(source_dir, cfg.weights)
    model_config = model_config_from(loaded.config)  # ModelConfig, or AttendConfig for an attend model dir
    image_size = _check_args(cfg, loaded, model_config)
    log(f"start {loaded.weights.describe()}")
    roots = [check_root(r) for r in cfg.images]
    annotations = load_annotations(cfg.captions, fmt=cfg.caption_format, split_scheme=cfg.split_scheme)
    log(f"captions: {annotations.summary()}")
    vocab, grid = loaded.vocab, grid_shape(model_config)
    train_pairs = _split_pairs(annotations, "train", roots, vocab, log, cfg.max_caption_length)
    val_pairs = _split_pairs(annotations, "val", roots, vocab, log, cfg.max_caption_length)
    identity = {"source": str(source_dir.resolve()), "source_cnn_fingerprint": loaded.cnn.get("fingerprint"),
                "source_decoder_sha256": file_sha256(loaded.weights.path),
                "trainable_blocks": cfg.trainable_blocks, "image_size": image_size}
    config = make_config(model_config, vocab, loaded.cnn, COMMAND, {
        "train": train.to_dict(), "data": cfg.to_dict(), "finetune": identity})
    prepare_run_dir(out, config, ("model", "finetune"), overwrite, "--out")
    bad = BadImages(log)
    source = ImageBatches(train_pairs, train.batch_size, train.seed, image_size, bad,
                          threads=cfg.decode_threads)
    val_source = ImageBatches(val_pairs, train.val_batch_size, train.seed, image_size, bad,
                              threads=cfg.decode_threads)
    built = {}

    def build():
        # refuses a CNN that is not the recorded one; an attention decoder's ends at Mixed_7c (its grid)
        cnn, built["start"] = load_cnn(loaded, image_size, grid=grid is not None)
        start_run_dir(worker_dir(out, strategy), vocab, config)
        trained_layers = set_trainable_blocks(cnn, cfg.trainable_blocks)
        decoder = build_model(model_config, seed=train.seed)
        decoder.set_weights(loaded.model.get_weights())  # the start weights, feature statistics included
        upto = f" up to Mixed_7c ({grid[0]}x{grid[1]} grid)" if grid else ""
        log(f"CNN: InceptionV3 at {image_size} px{upto} from {built['start']['weights']} (fingerprint "
            f"{built['start']['fingerprint'][:12]}); training {len(trained_layers)} of "
            f"{sum(1 for layer in cnn.layers if layer.weights)} layers with weights"
            + ("" if cfg.trainable_blocks is None else f" (top {cfg.trainable_blocks} mixed blocks)")
            + "; batch norm in inference mode")
        return FinetuneTrainable(cnn, decoder)

    def finish(trainable, directory, result):
        new_block = {**built["start"], "weights": str((Path(directory) / CNN_WEIGHTS).resolve()),
                     "fingerprint": weights_fingerprint(trainable.cnn)}
        extra = {k: config[k] for k in ("train", "data", "finetune")}
        extra["source_cnn"] = built["start"]
        extra["result"] = {**result.result_block(), "train_pairs": train_pairs.stats,
                           "val_pairs": val_pairs.stats, "images": bad.summary()}
        save_model_dir(directory, trainable.decoder, model_config, vocab, new_block, extra=extra,
                       cnn_weights_src=trainable.cnn, command=COMMAND)
        s = bad.summary()
        log(f"bad images: {s['bad_images']} skipped ({s['skipped_pairs']} pairs); new CNN fingerprint "
            f"{new_block['fingerprint'][:12]} -> {Path(directory) / CNN_WEIGHTS}")

    try:
        return train_loop(build, source, val_source, train, out, strategy=strategy, log=log,
                          finish=finish, progress=progress)
    finally:
        source.close()
        val_source.close()
