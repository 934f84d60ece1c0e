"""What `train-scst` trains on: the images of a split with their references as token ids, the batch source of
images for THE training loop, and the CIDEr-D reward with its baseline.

`split_images` joins caption records with the feature store's rows, one entry per image (not per caption);
each image keeps ALL its reference captions as id arrays without `<S>`/`</S>`, tokenised and mapped with the
model's vocabulary (unknown words -> `<UNK>`), the form evaluation.cider.CiderD scores.
`ScstBatches` is data.pipeline.PairBatches with one "pair" per image: the same seeded per-epoch shuffle and
feature loading (one view sampled per image of a multi-view store), but its elements are images.
`CiderReward` is what the train step calls through `tf.numpy_function`: rewards on token ids (no strings),
the baseline, the advantages, and running means for the metrics log.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from data.pipeline import PairBatches, PairSet
from evaluation.cider import CiderD

BASELINES = ("mean", "greedy")  # mean: the image's other samples (Luo 2020); greedy: Rennie et al. 2017
CIDER_DF = ("train", "corpus")  # document frequencies: all training references, or the scored images' own


@dataclass
class ScstImages:
    """The images of one split that have features, with their references."""

    rows: np.ndarray  # int64 [I]: the image's row in the feature store
    references: list  # I lists of int32 id arrays: the image's captions without <S> and </S>
    image_ids: np.ndarray  # int64 [I]: dataset image ids
    stats: dict = field(default_factory=dict)  # images, captions, missing_image, bad_image, missing_examples

    def __len__(self) -> int:
        return len(self.rows)


def split_images(records, keys, ok, vocab) -> ScstImages:
    """One entry per record whose image is a good row of the store (keys: list[str] the store's `/keys`;
    ok: bool [N]). Images absent from the store or with ok=False are counted in stats (by image)."""
    index = {k: i for i, k in enumerate(keys)}
    rows, refs, ids = [], [], []
    stats = {"images": len(records), "captions": 0, "missing_image": 0, "bad_image": 0,
             "missing_examples": []}
    for rec in records:
        row = index.get(rec.path)
        if row is None:
            stats["missing_image"] += 1
            if len(stats["missing_examples"]) < 5:
                stats["missing_examples"].append(rec.path)
            continue
        if not ok[row]:
            stats["bad_image"] += 1
            continue
        rows.append(row)
        ids.append(rec.image_id)
        refs.append([np.asarray(vocab.encode(text)[1:-1], np.int32) for text in rec.captions])
        stats["captions"] += len(rec.captions)
    stats["with_features"] = len(rows)
    return ScstImages(np.asarray(rows, np.int64), refs, np.asarray(ids, np.int64), stats)


class ScstBatches(PairBatches):
    """Per-replica batches of images: {"features": float32 [b, D], "image_index": int32 [b] (the image's
    index in its ScstImages, = its CiderD image index), "global_words": float32 [] = 1 (the trainable
    divides by the sampled words itself: they are only known inside the step)}."""

    unit = "images"  # what the training log counts

    def __init__(self, images: ScstImages, features, batch_size: int, seed: int, config=None):
        pairs = PairSet(images.rows, [], np.zeros(len(images), np.int32), dict(images.stats))
        super().__init__(pairs, features, batch_size, seed, config)  # equal lengths: plans only shuffle

    def element_spec(self) -> dict:
        """tf.TensorSpec of one element (see the class docstring)."""
        return {**self.input_spec(), "image_index": tf.TensorSpec([None], tf.int32),
                "global_words": tf.TensorSpec([], tf.float32)}

    def generator(self, plan, epoch: int, start: int, replicas: list[int], num_replicas: int,
                  sample_views: bool = True):
        """Yields, for each global batch of plan[start:], the shares of `replicas` (of num_replicas); inputs
        are loaded only for those replicas' images."""
        for b in range(start, len(plan)):
            idx = np.asarray(plan[b], np.int64)
            splits = np.array_split(np.arange(len(idx)), num_replicas)
            rows = np.concatenate([splits[r] for r in replicas]).astype(np.int64)
            rng = np.random.default_rng([self.seed, epoch, b, 13]) if sample_views else None
            loaded, _ = self.load_inputs(idx, rng, rows)
            offset = 0
            for r in replicas:
                part = splits[r]
                share = {k: v[offset:offset + len(part)] for k, v in loaded.items()}
                share.update(image_index=idx[part].astype(np.int32), global_words=np.float32(1.0))
                offset += len(part)
                yield share

    def eval_batches(self, batch_size: int, max_images: int | None = None):
        """Validation: (image indices int64 [b], features float32 [b, D]) in order, view 0."""
        n = min(len(self.pairs), max_images or len(self.pairs))
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(n, start + batch_size), dtype=np.int64)
            yield idx, self.load_inputs(idx, None)[0]["features"]


class CiderReward:
    """CIDEr-D rewards of sampled captions, their baseline and advantages (NumPy, token ids).

    references: per image its reference id arrays (ScstImages.references). df "train": document frequencies
    of all these references (computed once); "corpus": of the references of the images scored in one call
    (one replica's share of a batch), as self-critical.pytorch's corpus mode.
    """

    def __init__(self, references: list, end_id: int, samples: int, baseline: str = "mean",
                 df: str = "train"):
        if baseline not in BASELINES or df not in CIDER_DF:
            raise ValueError(f"baseline {baseline!r} / df {df!r}: use {BASELINES} / {CIDER_DF}")
        self.references, self.end_id, self.samples = references, int(end_id), int(samples)
        self.baseline, self.df = baseline, df
        self.cider = CiderD(references) if df == "train" else None
        self._lock = threading.Lock()
        self._sums = np.zeros(4)  # samples, reward, baseline, words

    def scores(self, image_index: np.ndarray, captions: np.ndarray) -> np.ndarray:
        """image_index int [M]; captions int [M, L] (cut at end_id) -> CIDEr-D float64 [M]."""
        image_index = np.asarray(image_index, np.int64)
        if self.cider is not None:
            return self.cider.score(image_index, captions, end_id=self.end_id)
        images, local = np.unique(image_index, return_inverse=True)
        return CiderD([self.references[i] for i in images]).score(local, captions, end_id=self.end_id)

    def words(self, captions: np.ndarray) -> np.ndarray:
        """Words before the first end_id (or all L) of each row of captions int [M, L]: int64 [M]."""
        ended = captions == self.end_id
        return np.where(ended.any(1), ended.argmax(1), captions.shape[1]).astype(np.int64)

    def advantages(self, image_index: np.ndarray, samples: np.ndarray, greedy: np.ndarray) -> np.ndarray:
        """reward - baseline of each sample: float32 [b*K].

        image_index int32 [b]; samples int32 [b*K, L] (the K samples of image i are rows i*K..i*K+K-1);
        greedy int32 [b, L'] (baseline "greedy": each image's greedy caption; unused for "mean").
        """
        k, b = self.samples, len(image_index)
        if b == 0:
            return np.zeros(0, np.float32)
        reward = self.scores(np.repeat(image_index, k), samples).reshape(b, k)
        if self.baseline == "mean":
            base = (reward.sum(1, keepdims=True) - reward) / (k - 1)
        else:
            base = np.repeat(self.scores(image_index, greedy)[:, None], k, axis=1)
        with self._lock:
            self._sums += [reward.size, reward.sum(), base.sum(), self.words(samples).sum()]
        return (reward - base).reshape(-1).astype(np.float32)

    def peek_means(self) -> dict:
        """The running means of take_means without resetting them (for the progress bar)."""
        with self._lock:
            sums = self._sums.copy()
        if not sums[0]:
            return {}
        return {"reward": sums[1] / sums[0], "baseline": sums[2] / sums[0], "length": sums[3] / sums[0]}

    def take_means(self) -> dict:
        """Means since the last call ({} when no step ran): {"avg_reward": sample CIDEr-D, "avg_baseline",
        "avg_sample_length": words}; resets the sums."""
        with self._lock:
            sums, self._sums = self._sums, np.zeros(4)
        if not sums[0]:
            return {}
        return {"avg_reward": sums[1] / sums[0], "avg_baseline": sums[2] / sums[0],
                "avg_sample_length": sums[3] / sums[0]}
