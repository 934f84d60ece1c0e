"""Image batches for `finetune`: (image, caption) pairs read from image files, through THE preprocessing.

`image_pairs` joins caption records with files under the `--images` roots (captions of images found under no
root are skipped and counted). `ImageBatches` is the training loop's batch source (same interface as
data.pipeline.PairBatches, whose plans it reuses): a Python generator decodes each global batch's images with
PIL on a few threads (`extract.preprocess.decode_image`; a bad file is skipped — its captions get mask 0 —
counted and recorded in `BadImages`), then `extract.preprocess.preprocess` runs as TF ops: im2txt's
training distortions (random crop, flip, colour jitter; seeded per (seed, epoch, batch, row)) for training,
the central crop for validation.

Decoding (PIL, threads) and preprocessing (one traced tf.function per mode) run in the generator, which the
loop's `stream_dataset` prefetches, and which validation iterates directly.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from data.pipeline import PairBatches, PairSet, match_pairs
from extract.inputs import resolve_image
from extract.preprocess import BadImage, decode_image, preprocess


def resolve_files(records, roots: list[Path]) -> tuple[list[str], list[str]]:
    """(keys, files) of the records' images found under a root (first root holding the file wins)."""
    keys, files, seen = [], [], set()
    for rec in records:
        if rec.path in seen:
            continue
        seen.add(rec.path)
        found = resolve_image(rec.path, roots)
        if found is not None:
            keys.append(rec.path)
            files.append(found)
    return keys, files


@dataclass
class ImagePairs(PairSet):
    """A PairSet whose rows index `files` (image paths) instead of feature-store rows."""

    files: list = field(default_factory=list)  # str [F]: the image files found under the --images roots


def image_pairs(records, roots: list[Path], vocab, max_words: int | None = None) -> ImagePairs:
    """The records' pairs whose image is a file under a root; stats as data.pipeline.match_pairs
    ("missing_image": captions whose image is under no root; "too_long": captions of > max_words tokens)."""
    keys, files = resolve_files(records, roots)
    pairs = match_pairs(records, keys, np.ones(len(keys), bool), vocab, max_words=max_words)
    return ImagePairs(pairs.rows, pairs.captions, pairs.lengths, pairs.stats, files)


class BadImages:
    """Thread-safe record of the image files that failed to decode: {path: reason} + skipped pair count."""

    def __init__(self, log=print, show: int = 5):
        self.reasons: dict[str, str] = {}
        self.skipped_pairs = 0
        self._lock = threading.Lock()
        self._log, self._show = log, show

    def known(self, path: str) -> bool:
        return path in self.reasons

    def add(self, path: str, reason: str) -> None:
        """Record a failure (logged for the first few files)."""
        with self._lock:
            if path in self.reasons:
                return
            self.reasons[path] = reason
            if len(self.reasons) <= self._show:
                self._log(f"skipping bad image {path}: {reason}")

    def count_pairs(self, n: int) -> None:
        with self._lock:
            self.skipped_pairs += int(n)

    def summary(self) -> dict:
        """JSON-able counts (and up to 100 examples) for the model dir's config.json."""
        with self._lock:
            examples = dict(list(self.reasons.items())[:100])
            return {"bad_images": len(self.reasons), "skipped_pairs": self.skipped_pairs,
                    "examples": examples}


class ImageBatches(PairBatches):
    """Per-replica batches {"images": float32 [b, S, S, 3] in [-1, 1], "input_seqs": int32 [b, T],
    "target_seqs": int32 [b, T], "mask": float32 [b, T], "global_words": float32 []} (plans, `dataset`
    and `stream_dataset` from PairBatches). Each input pipeline decodes only its own replicas' images."""

    def __init__(self, pairs: ImagePairs, batch_size: int, seed: int, image_size: int, bad: BadImages,
                 config=None, threads: int = 8):
        super().__init__(pairs, None, batch_size, seed, config)
        self.files, self.image_size, self.bad = pairs.files, int(image_size), bad
        self.threads = max(1, int(threads))
        self._pool: ThreadPoolExecutor | None = None
        self._prep = {flag: self._prep_fn(flag) for flag in (False, True)}

    def close(self) -> None:
        """Stop the decoding threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def _prep_fn(self, training: bool):
        """tf.function: (raw uint8 [k, H, W, 3] zero-padded, sizes int32 [k, 2], seeds int32 [k, 2]) ->
        float32 [k, S, S, 3], every image through `preprocess` (distorted when `training`)."""
        s = self.image_size

        def one(args):
            raw, size, seed = args
            return preprocess(raw[:size[0], :size[1]], s, training=training, seed=seed if training else None)

        def prep(raw, sizes, seeds):
            spec = tf.TensorSpec([s, s, 3], tf.float32)
            return tf.map_fn(one, (raw, sizes, seeds), fn_output_signature=spec)

        return tf.function(prep, input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8),
                                                  tf.TensorSpec([None, 2], tf.int32),
                                                  tf.TensorSpec([None, 2], tf.int32)])

    def _decode(self, row: int) -> np.ndarray | None:
        """uint8 [H, W, 3], or None (recorded in `bad`) when the file cannot be used."""
        path = self.files[row]
        if self.bad.known(path):
            return None
        try:
            return decode_image(path, self.image_size)
        except BadImage as err:
            self.bad.add(path, str(err))
            return None

    def load_images(self, pair_idx: np.ndarray, seeds: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Images of pairs: (float32 [k, S, S, 3], ok bool [k]); a bad image is black with ok False.
        seeds: int32 [k, 2] of the training distortions, None for validation (central crop)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")
        decoded = list(self._pool.map(self._decode, self.pairs.rows[pair_idx].tolist()))
        ok = np.array([image is not None for image in decoded], bool)
        self.bad.count_pairs(int((~ok).sum()))
        images = [np.zeros((1, 1, 3), np.uint8) if image is None else image for image in decoded]
        sizes = np.array([im.shape[:2] for im in images], np.int32).reshape(-1, 2)
        raw = np.zeros((len(images), *sizes.max(axis=0, initial=1), 3), np.uint8)
        for i, im in enumerate(images):
            raw[i, :im.shape[0], :im.shape[1]] = im
        training = seeds is not None
        seeds = seeds if training else np.zeros((len(images), 2), np.int32)
        return self._prep[training](raw, sizes, seeds).numpy(), ok

    def load_inputs(self, pair_idx: np.ndarray, rng: np.random.Generator | None,
                    rows: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
        """({"images": float32 [k, S, S, 3]}, ok bool [k]) of pair_idx[rows]; distortion seeds per (seed,
        epoch, batch, row) drawn for the whole global batch (independent of the replica layout); rng None:
        the central crop (validation)."""
        rows = np.arange(len(pair_idx)) if rows is None else np.asarray(rows)
        seeds = None
        if rng is not None:
            seeds = rng.integers(0, 2**31 - 1, (len(pair_idx), 2)).astype(np.int32)[rows]
        images, ok = self.load_images(pair_idx[rows], seeds)
        return {"images": images}, ok

    def input_spec(self) -> dict:
        """tf.TensorSpec of the inputs: {"images": float32 [None, S, S, 3]}."""
        s = self.image_size
        return {"images": tf.TensorSpec([None, s, s, 3], tf.float32)}
