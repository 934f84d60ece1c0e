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
from beam.graph_sampling import graph_sample_search
from data.captions import load_annotations
from data.features import open_store
from data.pipeline import FeatureSource, PipelineConfig
from decoder.arches import build_model, grid_shape, model_config_from
from decoder.model import sparse_cross_entropy
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
from decoder.train.scst_data import BASELINES, CIDER_DF, CiderReward, ScstBatches, ScstImages, split_images
from decoder.train.split_report import example, split_report
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
    weights: str = "last"  # start from the model dir's "last" (decoder.weights.h5) or "best" weights

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

    def identity(self, source_dir: Path, weights_file: Path | None = None) -> dict:
        """The settings a resumed run must share (config.json "scst"); weights_file: the start weights
        (default the source's decoder.weights.h5; checkpoints/best.npz with --weights best)."""
        return {"source": str(source_dir.resolve()),
                "source_decoder_sha256": file_sha256(weights_file or source_dir / DECODER_WEIGHTS),
                "samples": self.samples,
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


class ScstTrainable(Trainable):
    """The decoder trained by REINFORCE with a baseline on batches {"features" float32 [b, D], "image_index"
    int32 [b], "global_words" float32 []} (decoder.train.scst_data.ScstBatches)."""

    def __init__(self, decoder, reward: CiderReward, cfg: ScstConfig, start_id: int, end_id: int):
        super().__init__({"decoder": decoder})
        self.reward, self.cfg = reward, cfg
        self.start_id, self.end_id = int(start_id), int(end_id)
        self._greedy = None

    def live_metrics(self) -> dict:
        """Mean sample reward (CIDEr-D), baseline and sample length since the last validation."""
        return self.reward.peek_means()

    def _sample(self, features, num_samples, seed):
        """(tokens int32 [b*K, L], lengths int32 [b*K]) of beam.graph_sampling.graph_sample_search."""
        return graph_sample_search(self.decoder.initial_state(features), self.decoder.step,
                                   start_id=self.start_id, end_id=self.end_id, num_samples=num_samples,
                                   max_length=self.cfg.max_length, seed=seed)

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
        `graph_sample_search`); advantage float32 [b*K] (a constant: no gradient flows into it). log p comes
        from one teacher-forced pass (no dropout) with gradient."""
        advantage = tf.stop_gradient(advantage)
        k = tf.shape(samples)[0] // tf.maximum(tf.shape(features)[0], 1)
        inputs = tf.concat([tf.fill([tf.shape(samples)[0], 1], self.start_id), samples[:, :-1]], axis=1)
        logits = self.decoder((tf.repeat(features, k, axis=0), inputs))  # float32 [b*K, L, V]
        real = tf.sequence_mask(lengths, tf.shape(samples)[1])
        nll = sparse_cross_entropy(tf.boolean_mask(logits, real), tf.boolean_mask(samples, real))  # -log p
        weight = tf.boolean_mask(tf.broadcast_to(advantage[:, None], tf.shape(samples)), real)
        return tf.reduce_sum(weight * nll), tf.cast(tf.reduce_sum(lengths), tf.float32)

    def greedy_captions(self, features) -> np.ndarray:
        """features float32 [b, D] -> greedy captions int32 [b, L] (end_id from </S> on)."""
        if self._greedy is None:
            shape = getattr(self.decoder, "feature_shape", (self.decoder.config.feature_dim,))  # attend: L, D
            spec = tf.TensorSpec([None, *shape], tf.float32)
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

    validate.score_metric = ("val_cider", -1.0)  # lower is better in the loop: the score is -val_cider
    return validate


def train_scst(cfg: ScstConfig, out, train: TrainConfig, overwrite: bool = False, strategy=None, log=print,
               progress: bool = True) -> TrainResult:
    """Self-critical training of `cfg.model_dir`'s decoder into the new model dir `out` (resuming there).

    train.precision "auto": mixed_float16 on GPUs, else float32. `out` is locked for the whole run."""
    cfg.check()
    train.resolve_precision("train-scst").validate()
    source_dir, out = derived_run_dirs(cfg.model_dir, out)
    strategy = strategy or choose_strategy()
    with exclusive(worker_dir(out, strategy), folder=True), open_store(cfg.features) as store:
        return _train_scst(cfg, source_dir, out, train, store, overwrite, strategy, log, progress)


def _split(annotations, split: str, store, vocab, log) -> ScstImages:
    """The ScstImages of `split`: its images with features in the store, with references (split_report)."""
    return split_report(
        annotations, split, lambda records: split_images(records, store.keys, store.ok, vocab),
        lambda s: (f"{s['with_features']} images with {s['captions']} reference captions; skipped "
                   f"{s['missing_image']} images not in the store{example(s)}, {s['bad_image']} whose "
                   "extraction failed"),
        f"The {split} split has no image with features and references in {store.path}: check --captions, "
        "--split-scheme and --features.", log)


def _train_scst(cfg, source_dir: Path, out: Path, train, store, overwrite, strategy, log, progress):
    loaded = load_model_dir(source_dir, cfg.weights)
    check_store_fits(store, loaded, cfg.features)
    log(f"start {loaded.weights.describe()}")
    vocab, model_config = loaded.vocab, model_config_from(loaded.config)
    annotations = load_annotations(cfg.captions, fmt=cfg.caption_format, split_scheme=cfg.split_scheme)
    log(f"captions: {annotations.summary()}")
    train_images = _split(annotations, "train", store, vocab, log)
    val_images = _split(annotations, "val", store, vocab, log)
    config = make_config(model_config, vocab, loaded.cnn, COMMAND, {
        "train": train.to_dict(), "data": cfg.data_block(),
        "scst": cfg.identity(source_dir, loaded.weights.path)})
    prepare_run_dir(out, config, ("model", "scst"), overwrite, "--out")
    features = FeatureSource(store, PipelineConfig(in_memory=cfg.in_memory), log=log,
                             grid=grid_shape(model_config) is not None)  # an attention decoder reads grids
    source = ScstBatches(train_images, features, train.batch_size, train.seed)
    val_source = ScstBatches(val_images, features, train.val_batch_size, train.seed)
    reward = CiderReward(train_images.references, vocab.end_id, cfg.samples, cfg.baseline, cfg.cider_df)
    log(f"SCST: {cfg.samples} samples per image, baseline {cfg.baseline}, CIDEr-D df {cfg.cider_df}, "
        f"captions up to {cfg.max_length} tokens; start {source_dir}")

    def build():
        start_run_dir(worker_dir(out, strategy), vocab, config)
        decoder = build_model(model_config, seed=train.seed)
        decoder.set_weights(loaded.model.get_weights())  # the start weights (--weights last or best)
        return ScstTrainable(decoder, reward, cfg, vocab.start_id, vocab.end_id)

    def finish(trainable, directory, result):
        extra = {k: config[k] for k in ("train", "data", "scst")}
        extra["result"] = {**result.result_block(), "train_images": train_images.stats,
                           "val_images": val_images.stats}
        save_model_dir(directory, trainable.decoder, model_config, vocab, loaded.cnn, extra=extra,
                       cnn_weights_src=loaded.cnn_weights_path, command=COMMAND)

    return train_loop(build, source, val_source, train, out, strategy=strategy, log=log, finish=finish,
                      progress=progress, validate=cider_validator(val_source, val_images.references, reward,
                                                                  train))
