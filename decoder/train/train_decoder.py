"""`train-decoder`: check every input, then run the shared loop on cached features and write the model dir.

All bad arguments (store of another version/dimension/CNN, incomplete store, unparsable vocabulary, empty
split, a model dir holding another configuration) stop here with one InputError sentence, before training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from base.devices import choose_strategy
from base.errors import InputError
from base.locks import exclusive
from data.captions import load_annotations
from data.features import open_store
from data.pipeline import FeatureSource, PairBatches, PipelineConfig, feature_stats, match_pairs
from data.vocab import Vocabulary
from decoder.arches import ATTEND, AttendConfig, build_model
from decoder.config import ModelConfig
from decoder.modeldir import (
    CONFIG_FILE,
    VOCAB_FILE,
    check_grid_fits,
    check_vocab,
    make_config,
    prepare_run_dir,
    read_config,
    save_model_dir,
    start_run_dir,
)
from decoder.train.config import TrainConfig
from decoder.train.distribute import worker_dir
from decoder.train.loop import TrainResult, train_loop
from decoder.train.split_report import pairs_summary, split_records, split_report
from decoder.train.step import DecoderTrainable
from extract.inputs import check_output_dir

COMMAND = "train-decoder"


@dataclass
class DataConfig:
    """Where the training data comes from."""

    features: str  # the feature store written by `extract` (features.h5)
    captions: list  # caption file(s): COCO json, Karpathy dataset_*.json or Flickr8k token file
    caption_format: str = "auto"  # "auto" (detected from the content), "coco", "karpathy" or "flickr8k"
    split_scheme: str = "auto"  # how images are split into train/val/test (data.splits.SPLIT_SCHEMES)
    vocab: str | None = None  # an existing word_counts.txt; None: built from the training captions
    min_word_count: int = 4  # words seen fewer times in training captions map to <UNK> (when building)
    max_caption_length: int | None = 100  # captions of more tokens are skipped and counted (None: no limit)

    def to_dict(self) -> dict:
        """JSON-able dict of every field."""
        return {**self.__dict__, "captions": [str(c) for c in self.captions]}


def _load_vocab(data: DataConfig, model_dir: Path, train_records, overwrite: bool, log) -> Vocabulary:
    saved = read_config(model_dir) if (model_dir / CONFIG_FILE).exists() else None
    resuming = not overwrite and saved is not None and (model_dir / VOCAB_FILE).exists()
    own = check_vocab(model_dir, saved) if resuming else None  # resuming: the run's own, unchanged
    if data.vocab:
        vocab = Vocabulary.load(data.vocab)
        if own is not None and vocab.words != own.words:
            raise InputError(f"--vocab {data.vocab} is not the vocabulary the run in {model_dir} started "
                             f"with ({model_dir / VOCAB_FILE}): give that file, or --overwrite to start "
                             "afresh.")
        return vocab
    if own is not None:
        return own
    vocab = Vocabulary.build((c for r in train_records for c in r.captions), min_count=data.min_word_count)
    log(f"vocabulary: {len(vocab)} words (min count {data.min_word_count}) from the training captions")
    return vocab


def _pairs(annotations, store, vocab, split: str, log, max_words: int | None = None):
    """The PairSet of `split`: its captions matched with the store's good rows (split_report)."""
    return split_report(
        annotations, split, lambda records: match_pairs(records, store.keys, store.ok, vocab, max_words),
        lambda stats: pairs_summary(stats, "not in the store", max_words),
        f"No caption of the {split} split has an image in {store.path}: the store was extracted from other "
        "images.", log)


def train_decoder(data: DataConfig, model_dir, train: TrainConfig, embedding_size: int = 512,
                  lstm_units: int = 512, feature_norm: str = "none", pipeline: PipelineConfig | None = None,
                  overwrite: bool = False, strategy=None, log=print, progress: bool = True,
                  arch: str = "show-and-tell", attention_units: int = 512,
                  attention_penalty: float = 1.0, attention_init: str = "zero",
                  attention_temperature: float = 1.0) -> TrainResult:
    """Train the decoder from cached features into `model_dir` (resuming when it holds a checkpoint).
    arch "attend": the attention decoder (decoder.attend) over the store's grid (extract --grid).

    The model dir (this process's worker dir) is locked for the whole run; it must be writable (checked
    first, with a probe write: a read-only or full disk is refused before any work)."""
    train.resolve_precision().validate()
    check_output_dir(model_dir, "--model-dir")
    strategy = strategy or choose_strategy()
    model_dir = Path(model_dir)
    with exclusive(worker_dir(model_dir, strategy), folder=True), open_store(data.features) as store:
        shape = ModelShape(embedding_size, lstm_units, feature_norm, arch, attention_units, attention_penalty,
                           attention_init, attention_temperature)
        return _train(data, model_dir, train, shape,
                      pipeline or PipelineConfig(), store, overwrite, strategy, log, progress)


@dataclass
class ModelShape:
    """The decoder sizes chosen on the command line."""

    embedding_size: int
    lstm_units: int
    feature_norm: str
    arch: str = "show-and-tell"  # decoder.arches: show-and-tell (pooled features) or attend (the grid)
    attention_units: int = 512  # attend: width of the attention MLP
    attention_penalty: float = 1.0  # attend: lambda of the doubly stochastic attention penalty
    attention_init: str = "zero"  # attend: the LSTM's initial state, "zero" or "mean" (decoder.attend)
    attention_temperature: float = 1.0  # attend: tau of the attention softmax(s / tau)

    def model_config(self, vocab_size: int, store):
        """The ModelConfig (or AttendConfig) of these sizes for a store's features (or grid)."""
        if self.arch != ATTEND:
            return ModelConfig(vocab_size=vocab_size, embedding_size=self.embedding_size,
                               lstm_units=self.lstm_units, feature_dim=store.dim,
                               feature_norm=self.feature_norm)
        config = AttendConfig(vocab_size=vocab_size, grid_shape=list(store.grid_shape or (0, 0)),
                              embedding_size=self.embedding_size, lstm_units=self.lstm_units,
                              attention_units=self.attention_units, feature_dim=store.dim,
                              feature_norm=self.feature_norm, attention_penalty=self.attention_penalty,
                              initial_state=self.attention_init, temperature=self.attention_temperature)
        check_grid_fits(store, config, store.path, "--arch attend")
        return config


def _train(data, model_dir: Path, train, shape: ModelShape, pipeline, store, overwrite, strategy, log,
           progress) -> TrainResult:
    annotations = load_annotations(data.captions, fmt=data.caption_format, split_scheme=data.split_scheme)
    log(f"captions: {annotations.summary()}")
    vocab = _load_vocab(data, model_dir, split_records(annotations, "train"), overwrite, log)
    model_config = shape.model_config(len(vocab), store)
    saved = read_config(model_dir) if model_dir.is_dir() else None
    if saved and saved["model"].get("feature_dim") != store.dim and not overwrite:
        raise InputError(f"{data.features} holds {store.dim}-d features but the model in {model_dir} takes "
                         f"{saved['model'].get('feature_dim')}-d ones.")
    config = make_config(model_config, vocab, store.cnn, COMMAND, {
        "train": train.to_dict(), "data": data.to_dict(), "pipeline": pipeline.to_dict()})
    prepare_run_dir(model_dir, config, ("model", "cnn"), overwrite, "--model-dir")
    train_pairs = _pairs(annotations, store, vocab, "train", log, data.max_caption_length)
    val_pairs = _pairs(annotations, store, vocab, "val", log, data.max_caption_length)
    start_run_dir(worker_dir(model_dir, strategy), vocab, config)
    features = FeatureSource(store, pipeline, log=log, grid=shape.arch == ATTEND)
    source = PairBatches(train_pairs, features, train.batch_size, train.seed, pipeline)
    val_source = PairBatches(val_pairs, features, train.val_batch_size, train.seed, pipeline)

    def finish(trainable, directory, result):
        extra = {k: v for k, v in config.items() if k in ("train", "data", "pipeline")}
        extra["result"] = {**result.result_block(), "train_pairs": train_pairs.stats,
                           "val_pairs": val_pairs.stats}
        save_model_dir(directory, trainable.decoder, model_config, vocab, store.cnn, extra=extra,
                       command=COMMAND)

    stats = None
    if shape.feature_norm == "standardize":
        stats = feature_stats(features, train_pairs.rows)
        log(f"feature standardisation: mean |f| {float(abs(stats[0]).mean()):.3g}, "
            f"{int((stats[1] == 0).sum())} constant dimension(s) ignored")

    def build():
        model = build_model(model_config, seed=train.seed)
        if stats is not None:
            model.set_feature_stats(*stats)
        return DecoderTrainable(model)

    try:
        return train_loop(build, source, val_source, train, model_dir, strategy=strategy, log=log,
                          finish=finish, progress=progress)
    except Exception:
        if features.error is not None:  # a streamed batch failed its integrity check inside tf.data
            raise features.error from None
        raise
