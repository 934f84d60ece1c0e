"""tf.data input for decoder training: (image row, caption) pairs, per-epoch shuffle, length bucketing.

The pieces are small pure functions plus one `PairBatches` class:
  `match_pairs` joins caption records with the feature store's rows (skipping `/ok`=false rows and captions
  whose image is not in the store, counting both); `epoch_plan` orders one epoch's pairs into global batches
  (seeded shuffle, then length bucketing inside pools of batches); `PairBatches` turns a plan into a
  `tf.data.Dataset` of per-replica batches. Its `load_inputs` + `input_spec` (features from memory or streamed
  from the h5 file, one view sampled per example) are the one thing an image-based source (finetune's
  decoder.train.image_batches.ImageBatches) overrides.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from base.errors import InputError


@dataclass
class PipelineConfig:
    """How batches are formed from the feature store and captions."""

    bucket_width: int = 1  # caption lengths within one bucket of this width are batched together
    pool_batches: int = 64  # bucketing sorts pools of this many batches by length (then shuffles batches)
    in_memory: str = "auto"  # "auto" (hold the features in RAM when they fit), "yes" or "no" (stream h5)
    memory_fraction: float = 0.5  # "auto": features fit when they take at most this share of available RAM

    def to_dict(self) -> dict:
        """JSON-able dict of every field."""
        return dict(self.__dict__)


@dataclass
class PairSet:
    """The (image row, caption) pairs of one split; captions as id arrays with `<S>` ... `</S>`."""

    rows: np.ndarray  # int64 [P]: row of the pair's image in the feature store
    captions: list  # P int32 arrays of ids (length >= 2)
    lengths: np.ndarray  # int32 [P]: len of each id array
    stats: dict = field(default_factory=dict)  # counts: captions, pairs, missing_image, bad_image, ...

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, n: int) -> PairSet:
        """The first n pairs (same stats)."""
        return PairSet(self.rows[:n], self.captions[:n], self.lengths[:n], dict(self.stats))


def match_pairs(records, keys, ok, vocab, max_words: int | None = None) -> PairSet:
    """Join caption records (`ImageRecord`s) with store rows by relative image path.

    keys: list[str] the store's `/keys`; ok: bool [N]. Captions of images absent from the store are counted
    in stats["missing_image"] (their paths' first few in stats["missing_examples"]); those of rows with
    ok=False in stats["bad_image"]; captions of more than `max_words` tokens (None: no limit; `<S>`/`</S>`
    not counted) in stats["too_long"] (the longest in stats["longest_skipped"]: tokens). Returns the pairs
    in record order.
    """
    index = {k: i for i, k in enumerate(keys)}
    rows, caps = [], []
    stats = {"images": 0, "captions": 0, "missing_image": 0, "bad_image": 0, "missing_examples": [],
             "too_long": 0, "longest_skipped": 0}
    for rec in records:
        stats["images"] += 1
        stats["captions"] += len(rec.captions)
        row = index.get(rec.path)
        if row is None:
            stats["missing_image"] += len(rec.captions)
            if len(stats["missing_examples"]) < 5:
                stats["missing_examples"].append(rec.path)
            continue
        if not ok[row]:
            stats["bad_image"] += len(rec.captions)
            continue
        for text in rec.captions:
            ids = vocab.encode(text)
            if max_words is not None and len(ids) - 2 > max_words:
                stats["too_long"] += 1
                stats["longest_skipped"] = max(stats["longest_skipped"], len(ids) - 2)
                continue
            rows.append(row)
            caps.append(np.asarray(ids, np.int32))
    stats["pairs"] = len(rows)
    lengths = np.array([len(c) for c in caps], np.int32)
    return PairSet(np.asarray(rows, np.int64), caps, lengths, stats)


def epoch_plan(lengths: np.ndarray, batch_size: int, epoch: int, seed: int, bucket_width: int = 1,
               pool_batches: int = 64) -> list[np.ndarray]:
    """One epoch's global batches: a list of int64 arrays of pair indices (every pair exactly once).

    Shuffled with a generator seeded by (seed, epoch); pools of `pool_batches` batches are sorted by
    bucketed length and cut into batches, then the batch order is shuffled.
    """
    rng = np.random.default_rng([seed, epoch, 11])
    order = rng.permutation(len(lengths))
    pool = max(1, pool_batches) * batch_size
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start:start + pool]
        buckets = lengths[chunk] // max(1, bucket_width)
        chunk = chunk[np.argsort(buckets, kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def eval_plan(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Validation batches: pairs sorted by length (little padding), deterministic."""
    order = np.argsort(lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_captions(captions: list, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Id arrays -> (input_seqs int32 [b, T], target_seqs int32 [b, T], mask float32 [b, T]).

    T = max_len - 1; targets are the inputs shifted by one; padding is 0 with mask 0.
    """
    t = max(1, max_len - 1)
    inputs = np.zeros((len(captions), t), np.int32)
    targets = np.zeros((len(captions), t), np.int32)
    mask = np.zeros((len(captions), t), np.float32)
    for i, ids in enumerate(captions):
        n = len(ids) - 1
        inputs[i, :n] = ids[:-1]
        targets[i, :n] = ids[1:]
        mask[i, :n] = 1.0
    return inputs, targets, mask


def available_memory() -> int:
    """Bytes of RAM available now (MemAvailable, else total physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class FeatureSource:
    """Per-row features of the store: an in-memory array when it fits, else streamed from the h5 file.
    With `grid` the rows are the store's grids (extract --grid) as L = h*w cells: [L, D] per view.

    Every read is checked by the store (chunk checksums, NaN/Inf: data.features), all rows at once when held
    in memory, per batch when streamed. A streamed batch that fails keeps its InputError in `self.error`:
    tf.data wraps exceptions raised inside its generator, so the caller re-raises this one."""

    def __init__(self, store, config: PipelineConfig, log=print, grid: bool = False):
        self.store, self.error, self.grid = store, None, grid
        self.views = int(store.views)
        if grid and store.grid_shape is None:
            store.read_grid([0])  # the InputError naming the pooled-only store
        cells = int(np.prod(store.grid_shape)) if grid else 0
        self.item_shape = (cells, int(store.dim)) if grid else (int(store.dim),)  # one view of one row
        need = int(store.nbytes_in_memory("grid" if grid else "features"))
        fits = need <= config.memory_fraction * available_memory()
        self.in_memory = config.in_memory == "yes" or (config.in_memory == "auto" and fits)
        self.array = self._read(None) if self.in_memory else None
        how = "held in memory" if self.in_memory else "streamed from the file (they do not fit in memory)"
        if config.in_memory == "no":
            how = "streamed from the file (--no in-memory)"
        what = f"grids: {len(store.keys)} rows x {store.views} view(s) x {cells} cells" if grid else \
            f"features: {len(store.keys)} rows x {store.views} view(s)"
        log(f"{what} x {store.dim} ({store.dtype}), "
            f"{need / 2**20:.0f} MiB, {how}")

    def _read(self, rows):
        """Store rows (None: all) as [n, (V,) *item_shape] in the stored dtype."""
        if not self.grid:
            return self.store.read_features(rows)
        values = self.store.read_grid(rows)
        return values.reshape(values.shape[:-3] + self.item_shape)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """rows: int64 [b] (any order, repeats allowed) -> features [b, D] or [b, V, D] (grid: [b, L, D] or
        [b, V, L, D]) in the stored dtype."""
        if self.array is not None:
            return self.array[rows]
        uniq, inverse = np.unique(rows, return_inverse=True)
        try:
            return np.asarray(self._read(uniq))[inverse]
        except InputError as err:
            self.error = err
            raise


def feature_stats(features: FeatureSource, rows: np.ndarray, chunk: int = 4096) -> tuple:
    """Per-dimension mean and inverse std of the features of `rows` (all views), for standardisation.

    rows: int64 [R] store rows (duplicates are counted once). Returns (mean float32 [D], inv_std float32 [D]);
    a dimension that is constant over these rows gets inv_std 0 (it carries no information).
    """
    rows = np.unique(rows)
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, len(rows), chunk):
        block = np.asarray(features.rows(rows[start:start + chunk]), np.float64)
        block = block.reshape(-1, block.shape[-1])
        total = total + block.sum(0)
        total_sq = total_sq + np.square(block).sum(0)
        count += len(block)
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(total_sq / max(count, 1) - np.square(mean), 0.0))
    inv_std = np.where(std > 1e-12 * max(float(np.abs(mean).max()), 1e-30), 1.0 / np.maximum(std, 1e-30), 0.0)
    return mean.astype(np.float32), inv_std.astype(np.float32)


class PairBatches:
    """Batches of (features, caption) pairs for the training loop (the features-from-cache source).

    Each element of a dataset is one replica's share of a global batch: {"features": float32 [b, D],
    "input_seqs": int32 [b, T], "target_seqs": int32 [b, T], "mask": float32 [b, T],
    "global_words": float32 [] (real target words in the whole global batch)}.
    """

    def __init__(self, pairs: PairSet, features: FeatureSource, batch_size: int, seed: int,
                 config: PipelineConfig | None = None):
        self.pairs, self.features, self.batch_size, self.seed = pairs, features, batch_size, seed
        self.config = config or PipelineConfig()

    def plan(self, epoch: int) -> list[np.ndarray]:
        """The global batches of `epoch` (deterministic in seed and epoch)."""
        return epoch_plan(self.pairs.lengths, self.batch_size, epoch, self.seed, self.config.bucket_width,
                          self.config.pool_batches)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.plan(0))

    def load_inputs(self, pair_idx: np.ndarray, rng: np.random.Generator | None,
                    rows: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
        """THE one thing a batch source specialises: the model inputs of a global batch's pairs.

        pair_idx: int [b] the global batch; rows: int [k] positions in it to load (None: all), in order;
        rng: the batch's generator for random views (None: view 0, validation). Returns ({"features":
        float32 [k, D]}, ok bool [k]); the view of pair i is drawn for the whole global batch, so it does not
        depend on the replica layout."""
        rows = np.arange(len(pair_idx)) if rows is None else np.asarray(rows)
        feats = self.features.rows(self.pairs.rows[pair_idx[rows]])
        if feats.ndim == 2 + len(self.item_shape()):  # [k, V, ...]: one view per example
            views = rng.integers(0, feats.shape[1], len(pair_idx))[rows] if rng is not None else 0
            feats = feats[np.arange(len(rows)), views]
        return {"features": feats.astype(np.float32)}, np.ones(len(rows), bool)

    def input_spec(self) -> dict:
        """tf.TensorSpec of the inputs `load_inputs` returns."""
        return {"features": tf.TensorSpec([None, *self.item_shape()], tf.float32)}

    def item_shape(self) -> tuple:
        """The features of one example: (D,) pooled, (L, D) grid cells (FeatureSource.item_shape; a source
        without one has pooled rows of its store's width)."""
        return tuple(getattr(self.features, "item_shape", None) or (self.features.store.dim,))

    def element_spec(self) -> dict:
        """tf.TensorSpec of one element (see the class docstring)."""
        seqs = tf.TensorSpec([None, None], tf.int32)
        return {**self.input_spec(), "input_seqs": seqs, "target_seqs": seqs,
                "mask": tf.TensorSpec([None, None], tf.float32),
                "global_words": tf.TensorSpec([], tf.float32)}

    def generator(self, plan: list[np.ndarray], epoch: int, start: int, replicas: list[int],
                  num_replicas: int, sample_views: bool = True):
        """Yields, for each global batch of plan[start:], the shares of `replicas` (of num_replicas). Inputs
        are loaded only for those replicas' rows; captions of rows that failed to load get mask 0 and do not
        count in global_words (exact when one pipeline feeds every replica)."""
        for b in range(start, len(plan)):
            idx = np.asarray(plan[b])
            inputs, targets, mask = pad_captions([self.pairs.captions[i] for i in idx],
                                                 int(self.pairs.lengths[idx].max()))
            splits = np.array_split(np.arange(len(idx)), num_replicas)
            rows = np.concatenate([splits[r] for r in replicas]).astype(np.int64)
            rng = np.random.default_rng([self.seed, epoch, b, 13]) if sample_views else None
            loaded, ok = self.load_inputs(idx, rng, rows)
            mask[rows[~ok]] = 0.0
            words, offset = np.float32(mask.sum()), 0
            for r in replicas:
                part = splits[r]
                share = {k: v[offset:offset + len(part)] for k, v in loaded.items()}
                share.update(input_seqs=inputs[part], target_seqs=targets[part], mask=mask[part],
                             global_words=words)
                offset += len(part)
                yield share

    def stream(self, epoch: int, start: int, replicas, num_replicas: int):
        """Endless generator of per-replica shares: epoch `epoch` from batch `start`, then the next epochs."""
        while True:
            yield from self.generator(self.plan(epoch), epoch, start, list(replicas), num_replicas)
            epoch, start = epoch + 1, 0

    def stream_dataset(self, epoch: int, start: int = 0, replicas=(0,),
                       num_replicas: int = 1) -> tf.data.Dataset:
        """tf.data.Dataset over `stream` (prefetched): the training loop's one dataset for the whole run."""
        ds = tf.data.Dataset.from_generator(lambda: self.stream(epoch, start, replicas, num_replicas),
                                            output_signature=self.element_spec())
        return ds.prefetch(tf.data.AUTOTUNE)

    def dataset(self, plan, epoch: int, start: int = 0, replicas=(0,), num_replicas: int = 1,
                sample_views: bool = True) -> tf.data.Dataset:
        """tf.data.Dataset of per-replica shares of plan[start:] (prefetched)."""
        ds = tf.data.Dataset.from_generator(
            lambda: self.generator(plan, epoch, start, list(replicas), num_replicas, sample_views),
            output_signature=self.element_spec())
        return ds.prefetch(tf.data.AUTOTUNE)
