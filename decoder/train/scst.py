"""`train-scst`: self-critical sequence training (Rennie et al. 2017) of a trained decoder on CIDEr-D, from
the feature cache (no CNN).

Per training image the step samples K captions from the model (temperature 1, stateless random ops seeded by
the step's seed, so a resumed run draws the same), scores them with CIDEr-D against the image's references
(decoder.train.scst_data.CiderReward, on token ids), subtracts a baseline ("mean": the mean reward of the
image's other K-1 samples, Luo 2020; "greedy": the reward of the greedy caption) and minimises
-(reward - baseline) * log p(sample), summed over the sampled words (</S> included) and divided by the number
of sampled words of the global batch. log p comes from a teacher-forced pass over the samples, with gradient;
the rewards are constants. No dropout: the captions are drawn from, and the gradient is that of, the model
as it captions. Everything else is THE training loop (decoder.train.loop): checkpoints, exact resume,
tf.distribute, the metrics log; validation = CIDEr-D of greedy captions of the validation images (their own
document frequencies, as `evaluate` computes CIDEr), the best checkpoint = the highest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from base.devices import choose_strategy
from base.digest import file_sha256
from base.errors import InputError
from base.locks import exclusive
from data.captions import load_annotations
from data.features import open_store
from data.pipeline import FeatureSource, PipelineConfig
from decoder.config import ModelConfig
from decoder.model import build_decoder, sparse_cross_entropy
from decoder.modeldir import (
    DECODER_WEIGHTS,
    check_store_fits,
    derived_run_dirs,
    load_model_dir,
    make_config,
    prepare_run_dir,
    save_model_dir,
    start_run_dir,
)
from decoder.train.config import TrainConfig
from decoder.train.distribute import worker_dir
from decoder.train.loop import TrainResult, train_loop
from decoder.train.scst_data import BASELINES, CIDER_DF, CiderReward, ScstBatches, split_images
from decoder.train.step import Trainable
from evaluation.cider import CiderD

COMMAND = "train-scst"


@dataclass
class ScstConfig:
    """Where SCST starts and what it samples (the "scst" and "data" blocks of config.json)."""

    model_dir: str  # the XE-trained model dir (train-decoder, finetune, import-im2txt): the start weights
    features: str  # the feature store of the model's CNN (extract)
    captions: list  # caption file(s) with the train and val splits and ALL their references
    caption_format: str = "auto"  # "auto", "coco", "karpathy" or "flickr8k"
    split_scheme: str = "auto"  # train on the train split, validate on val (data.splits.SPLIT_SCHEMES)
    samples: int = 5  # K captions sampled per training image
    baseline: str = "mean"  # "mean" (the other K-1 samples' mean reward) or "greedy" (greedy caption's)
    max_length: int = 16  # most tokens per sampled (and validation) caption, counting <S> and </S>
    cider_df: str = "train"  # CIDEr-D document frequencies: "train" references or "corpus" (the batch's)
    in_memory: str = "auto"  # hold the features in RAM: "auto" (when they fit), "yes", "no"

    def check(self) -> None:
        """InputError (one sentence) for an impossible setting."""
        if self.baseline not in BASELINES:
            raise InputError(f"Unknown --baseline {self.baseline!r}: use mean or greedy.")
        if self.cider_df not in CIDER_DF:
            raise InputError(f"Unknown --cider-df {self.cider_df!r}: use train or corpus.")
        if self.samples < (2 if self.baseline == "mean" else 1):
            raise InputError(f"--samples {self.samples} is too few: "
                             + ("--baseline mean compares each sample with the image's other samples, so it "
                                "needs --samples >= 2." if self.baseline == "mean" else "give at least 1."))
        if self.max_length < 2:
            raise InputError(f"--max-length {self.max_length} is too small: a caption needs <S> and a word.")

    def identity(self, source_dir: Path) -> dict:
        """The settings a resumed run must share (config.json "scst")."""
        return {"source": str(source_dir.resolve()),
                "source_decoder_sha256": file_sha256(source_dir / DECODER_WEIGHTS), "samples": self.samples,
                "baseline": self.baseline, "max_length": self.max_length,
                "cider_df": self.cider_df}

    def data_block(self) -> dict:
        """The inputs (config.json "data")."""
        return {"features": str(Path(self.features).resolve()), "captions": [str(c) for c in self.captions],
                "caption_format": self.caption_format, "split_scheme": self.split_scheme,
                "in_memory": self.in_memory}


def scst_recipe(**overrides) -> TrainConfig:
    """The SCST recipe (self-critical.pytorch's): Adam lr 5e-5 constant, global-norm clip 5.0 (as the other
    commands), batch 32 images; `overrides` (None: keep the default) win. `max_val_pairs` counts validation
    images here."""
    settings = {"optimizer": "adam", "learning_rate": 5e-5, "lr_decay_factor": 1.0, "clip_gradients": 5.0,
                "batch_size": 32, "val_batch_size": 256}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**settings)


def sample_captions(model, features, num_samples: int, max_length: int, start_id: int, end_id: int,
                    seed=None):
    """Captions of `model` drawn inside the graph: sampled at temperature 1 (seed: int [2], stateless) or
    greedy (seed None: arg-max, lowest id on ties). Each step runs the model only on the captions still
    running (none has ended).

    features float32 [B, D] -> (tokens int32 [B*K, L]: the words after <S> (K = num_samples, the samples of
    image i in rows i*K..), end_id from a caption's </S> on, L <= max_length - 1 steps;
    lengths int32 [B*K]: tokens up to and including </S>, or L for a caption cut at max_length).
    """
    h, c = model.initial_state(features)
    if num_samples > 1:
        h, c = tf.repeat(h, num_samples, axis=0), tf.repeat(c, num_samples, axis=0)
    rows = tf.shape(h)[0]

    def body(t, prev, h, c, running, tokens):
        logp, (h, c) = model.step(prev, (h, c))
        if seed is None:
            word = tf.argmax(logp, axis=-1, output_type=tf.int32)
        else:
            draw = tf.random.stateless_categorical(logp, 1, tf.random.experimental.stateless_fold_in(seed, t))
            word = tf.cast(draw[:, 0], tf.int32)
        where = tf.stack([running, tf.fill(tf.shape(running), t)], axis=1)
        tokens = tf.tensor_scatter_nd_update(tokens, where, word)
        keep = tf.not_equal(word, end_id)
        return (t + 1, tf.boolean_mask(word, keep), tf.boolean_mask(h, keep), tf.boolean_mask(c, keep),
                tf.boolean_mask(running, keep), tokens)

    def cond(t, prev, h, c, running, tokens):
        return tf.logical_or(t < 1, tf.logical_and(t < max_length - 1, tf.size(running) > 0))

    steps = max(max_length - 1, 1)
    loop = (tf.constant(0), tf.fill([rows], tf.constant(start_id, tf.int32)), h, c, tf.range(rows),
            tf.fill([rows, steps], tf.constant(end_id, tf.int32)))
    loose = (tf.TensorShape([]), tf.TensorShape([None]), tf.TensorShape([None, h.shape[1]]),
             tf.TensorShape([None, c.shape[1]]), tf.TensorShape([None]), tf.TensorShape([None, steps]))
    t, _, _, _, _, tokens = tf.while_loop(cond, body, loop, shape_invariants=loose, maximum_iterations=steps)
    tokens = tokens[:, :t]  # [N, L]: the steps taken
    ended = tf.equal(tokens, end_id)
    lengths = tf.where(tf.reduce_any(ended, axis=1), tf.argmax(tf.cast(ended, tf.int32), axis=1,
                                                               output_type=tf.int32) + 1, tf.shape(tokens)[1])
    return tf.stop_gradient(tokens), tf.stop_gradient(lengths)


class ScstTrainable(Trainable):
    """The decoder trained by REINFORCE with a baseline on batches {"features" float32 [b, D], "image_index"
    int32 [b], "global_words" float32 []} (decoder.train.scst_data.ScstBatches)."""

    def __init__(self, model, reward: CiderReward, cfg: ScstConfig, start_id: int, end_id: int):
        super().__init__({"decoder": model})
        self.model, self.reward, self.cfg = model, reward, cfg
        self.start_id, self.end_id = int(start_id), int(end_id)
        self._greedy = None

    def live_metrics(self) -> dict:
        """Mean sample reward (CIDEr-D), baseline and sample length since the last validation."""
        return self.reward.peek_means()

    def _sample(self, features, num_samples, seed):
        return sample_captions(self.model, features, num_samples, self.cfg.max_length, self.start_id,
                               self.end_id, seed)

    def loss_sums(self, batch, training, seed):
        """(-sum of advantage * log p over the sampled words / the global batch's sampled words float32 [],
        this replica's sampled words float32 []). Sampling and reward run here, inside the train step."""
        features = tf.cast(batch["features"], tf.float32)
        seed = tf.zeros([2], tf.int64) if seed is None else seed
        samples, lengths = self._sample(features, self.cfg.samples, seed)
        greedy = (self._sample(features, 1, None)[0] if self.cfg.baseline == "greedy"
                  else tf.zeros([tf.shape(features)[0], 0], tf.int32))
        advantage = tf.numpy_function(self.reward.advantages, [batch["image_index"], samples, greedy],
                                      tf.float32, stateful=True)
        total, words = self.reinforce_sums(features, samples, lengths, tf.reshape(advantage, [-1]))
        global_words = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, words)
        return total / tf.maximum(global_words, 1.0), words

    def reinforce_sums(self, features, samples, lengths, advantage):
        """(-sum over sampled words of advantage * log p(word | image, words before) float32 [], sampled
        words float32 []). features float32 [b, D]; samples int32 [b*K, L], lengths int32 [b*K] (as
        `sample_captions`); advantage float32 [b*K] (a constant: no gradient flows into it). log p comes
        from one teacher-forced pass (no dropout) with gradient."""
        advantage = tf.stop_gradient(advantage)
        k = tf.shape(samples)[0] // tf.maximum(tf.shape(features)[0], 1)
        inputs = tf.concat([tf.fill([tf.shape(samples)[0], 1], self.start_id), samples[:, :-1]], axis=1)
        logits = self.model((tf.repeat(features, k, axis=0), inputs))  # float32 [b*K, L, V]
        real = tf.sequence_mask(lengths, tf.shape(samples)[1])
        nll = sparse_cross_entropy(tf.boolean_mask(logits, real), tf.boolean_mask(samples, real))  # -log p
        weight = tf.boolean_mask(tf.broadcast_to(advantage[:, None], tf.shape(samples)), real)
        return tf.reduce_sum(weight * nll), tf.cast(tf.reduce_sum(lengths), tf.float32)

    def greedy_captions(self, features) -> np.ndarray:
        """features float32 [b, D] -> greedy captions int32 [b, L] (end_id from </S> on)."""
        if self._greedy is None:
            spec = tf.TensorSpec([None, self.model.config.feature_dim], tf.float32)
            self._greedy = tf.function(lambda f: self._sample(f, 1, None)[0], input_signature=[spec])
        return self._greedy(tf.convert_to_tensor(features, tf.float32)).numpy()


def cider_validator(val_source: ScstBatches, references: list, reward: CiderReward, config: TrainConfig):
    """validate(trainable) -> ({"val_cider": CIDEr-D of greedy captions (val references' own df),
    "val_caption_length": their mean words, + the training means of CiderReward.take_means}, -val_cider)."""
    cider = CiderD(references)

    def validate(trainable: ScstTrainable):
        scores, words = [], []
        for idx, features in val_source.eval_batches(config.val_batch_size, config.max_val_pairs):
            captions = trainable.greedy_captions(features)
            scores.append(cider.score(idx, captions, end_id=trainable.end_id))
            words.append(reward.words(captions))
        score = float(np.concatenate(scores).mean())
        return ({"val_cider": score, "val_caption_length": float(np.concatenate(words).mean()),
                 **reward.take_means()}, -score)

    return validate


def train_scst(cfg: ScstConfig, out, train: TrainConfig, overwrite: bool = False, strategy=None, log=print,
               progress: bool = True) -> TrainResult:
    """Self-critical training of `cfg.model_dir`'s decoder into the new model dir `out` (resuming there).

    train.precision "auto": mixed_float16 on GPUs, else float32. `out` is locked for the whole run."""
    cfg.check()
    train.resolve_precision().validate()
    source_dir, out = derived_run_dirs(cfg.model_dir, out)
    strategy = strategy or choose_strategy()
    with exclusive(worker_dir(out, strategy), folder=True), open_store(cfg.features) as store:
        return _train_scst(cfg, source_dir, out, train, store, overwrite, strategy, log, progress)


def _split(annotations, split: str, store, vocab, log):
    records = annotations.part(split)
    images = split_images(records, store.keys, store.ok, vocab)
    s = images.stats
    log(f"{split}: {len(images)} images with {s['captions']} reference captions; skipped "
        f"{s['missing_image']} images not in the store"
        + (f" (e.g. {s['missing_examples'][0]})" if s["missing_examples"] else "")
        + f", {s['bad_image']} whose extraction failed")
    if not len(images):
        raise InputError(f"The {split} split has no image with features and references in {store.path}: "
                         "check --captions, --split-scheme and --features.")
    return images


def _train_scst(cfg, source_dir: Path, out: Path, train, store, overwrite, strategy, log, progress):
    loaded = load_model_dir(source_dir)
    check_store_fits(store, loaded, cfg.features)
    vocab, model_config = loaded.vocab, ModelConfig.from_dict(loaded.config["model"])
    annotations = load_annotations(cfg.captions, fmt=cfg.caption_format, split_scheme=cfg.split_scheme)
    log(f"captions: {annotations.summary()}")
    train_images = _split(annotations, "train", store, vocab, log)
    val_images = _split(annotations, "val", store, vocab, log)
    config = make_config(model_config, vocab, loaded.cnn, COMMAND, {
        "train": train.to_dict(), "data": cfg.data_block(), "scst": cfg.identity(source_dir)})
    prepare_run_dir(out, config, ("model", "scst"), overwrite, "--out")
    features = FeatureSource(store, PipelineConfig(in_memory=cfg.in_memory), log=log)
    source = ScstBatches(train_images, features, train.batch_size, train.seed)
    val_source = ScstBatches(val_images, features, train.val_batch_size, train.seed)
    reward = CiderReward(train_images.references, vocab.end_id, cfg.samples, cfg.baseline, cfg.cider_df)
    log(f"SCST: {cfg.samples} samples per image, baseline {cfg.baseline}, CIDEr-D df {cfg.cider_df}, "
        f"captions up to {cfg.max_length} tokens; start {source_dir}")

    def build():
        start_run_dir(worker_dir(out, strategy), vocab, config)
        model = build_decoder(model_config, seed=train.seed)
        model.load_weights(str(source_dir / DECODER_WEIGHTS))
        return ScstTrainable(model, reward, cfg, vocab.start_id, vocab.end_id)

    def finish(trainable, directory, result):
        extra = {k: config[k] for k in ("train", "data", "scst")}
        extra["result"] = {**result.result_block(), "train_images": train_images.stats,
                           "val_images": val_images.stats}
        save_model_dir(directory, trainable.model, model_config, vocab, loaded.cnn, extra=extra,
                       cnn_weights_src=loaded.cnn_weights_path, command=COMMAND)

    return train_loop(build, source, val_source, train, out, strategy=strategy, log=log, finish=finish,
                      progress=progress, validate=cider_validator(val_source, val_images.references, reward,
                                                                  train))
