"""CIDEr-D on token ids, vectorised with NumPy: the reward of self-critical (SCST) training.

The numbers are those of pycocoevalcap's `CiderScorer` (n = 1..4, TF-IDF vectors, the candidate's values
clipped by the reference's, Gaussian length penalty with sigma = 6, x10, averaged over references and n),
including its quirks: the idf of an n-gram is log(number of images of the df corpus) - log(max(1, df)); a
cosine whose norm is 0 is left undivided. (Its penalty compares bigram counts, max(words - 1, 0): the same
difference as word counts whenever both captions are non-empty, and an empty one scores 0 anyway.)

Document frequencies come either from the scored images' own references (`corpus`, as pycocoevalcap's
Cider) or from a precomputed `DocumentFrequency` (e.g. of all training references: the "train" mode of
self-critical.pytorch).

An n-gram (w_1..w_n) of ids, n <= 4, is the uint64 key sum_k (w_k + 1) << 16 (k - 1): ids must lie in
[0, 65535). Counting is np.unique / searchsorted over such keys; no strings are built per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from pathlib import Path

import numpy as np

from data.tokenizer import tokenize

N_MAX = 4
_BITS = 16
MAX_ID = (1 << _BITS) - 2  # id + 1 must fit in 16 bits


def _expand(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """counts int [K] -> (owner int64 [sum], offset within the owner int64 [sum]): k repeated counts[k]."""
    counts = np.asarray(counts, dtype=np.int64)
    owner = np.repeat(np.arange(counts.size), counts)
    starts = np.cumsum(counts) - counts
    return owner, np.arange(owner.size) - starts[owner]


def _flatten(sequences, lengths=None, end_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Id sequences -> (flat int64 ids [S], lengths int64 [M]).

    sequences: a padded int array [M, T] (rows cut at `lengths` int [M] when given) or a list of M id lists.
    end_id: when given, each sequence also stops before its first `end_id` (the end token is not scored).
    """
    if isinstance(sequences, np.ndarray) and sequences.ndim == 2:
        rows, width = sequences.shape
        lens = np.full(rows, width, np.int64) if lengths is None else np.asarray(lengths, np.int64)
        lens = np.clip(lens, 0, width)
        flat = sequences[np.arange(width) < lens[:, None]].astype(np.int64)
    elif lengths is not None:
        raise ValueError("lengths apply to a padded [M, T] array only")
    else:
        lens = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
        flat = np.fromiter(chain.from_iterable(sequences), dtype=np.int64, count=int(lens.sum()))
    if end_id is not None:
        seq, pos = _expand(lens)
        ends = flat == end_id
        np.minimum.at(lens, seq[ends], pos[ends])
        flat = flat[pos < lens[seq]]
    if flat.size and (flat.min() < 0 or flat.max() > MAX_ID):
        raise ValueError(f"token ids must lie in [0, {MAX_ID}], got [{flat.min()}, {flat.max()}]")
    return flat, lens


def _ngrams(flat: np.ndarray, lens: np.ndarray, n_max: int = N_MAX) -> tuple[np.ndarray, np.ndarray]:
    """Every n-gram occurrence (n = 1..n_max) inside a sequence -> (sequence int64 [N], key uint64 [N])."""
    seq, pos = _expand(lens)
    remaining = lens[seq] - pos  # tokens from this position to the end of its sequence, >= 1
    digits = flat.astype(np.uint64) + np.uint64(1)
    key, seqs, keys = digits, [seq], [digits]
    for n in range(2, n_max + 1):
        shifted = np.zeros_like(digits)
        shifted[: max(digits.size - n + 1, 0)] = digits[n - 1:]
        key = key | (shifted << np.uint64(_BITS * (n - 1)))
        keep = remaining >= n
        seqs.append(seq[keep])
        keys.append(key[keep])
    return np.concatenate(seqs), np.concatenate(keys)


def _count(seq: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Occurrences -> (sequence int64 [D], key index int64 [D], count int64 [D], keys uint64 [U] sorted):
    the distinct (sequence, n-gram) pairs, sorted by sequence then key; pair d has the key keys[index[d]]."""
    unique_keys, code = np.unique(key, return_inverse=True)
    size = max(unique_keys.size, 1)
    pairs, counts = np.unique(seq * size + code, return_counts=True)
    return pairs // size, pairs % size, counts, unique_keys


def ngram_order(keys: np.ndarray) -> np.ndarray:
    """n - 1 (int64 [K], 0..3) of n-gram keys (uint64 [K]): the highest non-zero 16-bit digit."""
    keys = np.asarray(keys, dtype=np.uint64)
    return sum((keys >> np.uint64(_BITS * k) > 0).astype(np.int64) for k in range(1, N_MAX))


def ngram_keys(ids: Sequence[int], n_max: int = N_MAX) -> tuple[np.ndarray, np.ndarray]:
    """The distinct n-grams (n = 1..n_max <= 4) of one id sequence, as pycocoevalcap's `precook` on words.

    Returns (keys uint64 [K] sorted, counts int64 [K]); key = sum_k (ids[i + k] + 1) << 16 k.
    """
    if not 1 <= n_max <= N_MAX:
        raise ValueError(f"n_max must be in 1..{N_MAX}")
    flat, lens = _flatten([list(ids)])
    _, index, counts, keys = _count(*_ngrams(flat, lens, n_max))
    return keys[index], counts


def _lookup(table: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where queries [Q] would sit in a sorted table and whether they are there: (int64 [Q], bool [Q])."""
    if table.size == 0:
        return np.zeros(queries.shape, np.int64), np.zeros(queries.shape, bool)
    pos = np.minimum(np.searchsorted(table, queries), table.size - 1)
    return pos, table[pos] == queries


def _norms(owner: np.ndarray, order: np.ndarray, values: np.ndarray, rows: int) -> np.ndarray:
    """sqrt of the sum of values**2 per (owner, n): float64 [rows, N_MAX]."""
    sums = np.bincount(owner * N_MAX + order, weights=values * values, minlength=rows * N_MAX)
    return np.sqrt(sums).reshape(rows, N_MAX)


class DocumentFrequency:
    """Per n-gram, the number of images whose references contain it, and the number of images.

    Attributes:
      keys: uint64 [D], sorted n-gram keys; counts: int64 [D], their document frequencies.
      num_images: int, images of the corpus; log_ref_len: float, log(num_images) (pycocoevalcap's ref_len).
    """

    def __init__(self, keys: np.ndarray, counts: np.ndarray, num_images: int):
        self.keys = np.asarray(keys, dtype=np.uint64)
        self.counts = np.asarray(counts, dtype=np.int64)
        if self.keys.shape != self.counts.shape or np.any(self.keys[1:] < self.keys[:-1]):
            raise ValueError("keys must be sorted and match counts in shape")
        self.num_images = int(num_images)
        if self.num_images < 1:
            raise ValueError("document frequencies need at least one image")
        self.log_ref_len = float(np.log(float(self.num_images)))

    @classmethod
    def from_references(cls, reference_ids: Sequence[Sequence[Sequence[int]]]) -> DocumentFrequency:
        """reference_ids: per image, its reference id lists (e.g. all training captions, without <S>/</S>)."""
        flat, lens, ref_image = _flatten_references(reference_ids)
        seq, key = _ngrams(flat, lens)
        return cls._from_occurrences(ref_image[seq], key, len(reference_ids))

    @classmethod
    def _from_occurrences(cls, image: np.ndarray, key: np.ndarray, num_images: int) -> DocumentFrequency:
        """image int64 [N], key uint64 [N]: n-gram occurrences and the image whose references hold them."""
        unique_keys, code = np.unique(key, return_inverse=True)
        size = max(unique_keys.size, 1)
        pairs = np.sort(image * size + code)  # sort-based: NumPy 2.4's hashing np.unique(x) is far slower
        pairs = pairs[np.append(True, pairs[1:] != pairs[:-1])] if pairs.size else pairs
        return cls(unique_keys, np.bincount(pairs % size, minlength=unique_keys.size), num_images)

    def idf(self, keys: np.ndarray) -> np.ndarray:
        """keys uint64 [K] -> float64 [K]: log_ref_len - log(max(1, df)); df = 0 for an unseen n-gram."""
        pos, found = _lookup(self.keys, np.asarray(keys, dtype=np.uint64))
        df = np.where(found, self.counts[pos] if self.counts.size else 0, 0)
        return self.log_ref_len - np.log(np.maximum(1.0, df))

    def save(self, path: str | Path) -> Path:
        """Write keys, counts and num_images to an .npz file; returns its path."""
        path = Path(path)
        with path.open("wb") as f:
            np.savez(f, keys=self.keys, counts=self.counts, num_images=np.int64(self.num_images))
        return path

    @classmethod
    def load(cls, path: str | Path) -> DocumentFrequency:
        """Read a file written by `save`."""
        with np.load(Path(path)) as data:
            return cls(data["keys"], data["counts"], int(data["num_images"]))


def _flatten_references(reference_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image reference lists -> (flat ids int64 [S], lengths int64 [R], image of each ref int64 [R])."""
    per_image = np.fromiter(map(len, reference_ids), dtype=np.int64, count=len(reference_ids))
    if np.any(per_image == 0):
        raise ValueError(f"image {int(np.argmin(per_image))} has no reference")
    flat, lens = _flatten([ref for refs in reference_ids for ref in refs])
    return flat, lens, np.repeat(np.arange(per_image.size), per_image)


class CiderD:
    """CIDEr-D of id sequences against fixed per-image references, scoring many batches.

    Sequences are scored as given: references and candidates should both leave out <S> and </S> (a padded
    candidate array is cut at `end_id`).

    The references' n-gram vectors, norms and lengths are computed once here; `score` only counts the
    candidates' n-grams. With `df=None` the document frequencies are those of these references
    (pycocoevalcap's Cider on the same image set); pass a `DocumentFrequency` (e.g. of the training
    references) otherwise.
    """

    def __init__(self, reference_ids: Sequence[Sequence[Sequence[int]]], df: DocumentFrequency | None = None,
                 sigma: float = 6.0):
        """reference_ids: per image (index = image index of `score`), a non-empty list of id lists."""
        flat, lens, ref_image = _flatten_references(reference_ids)
        seq, key = _ngrams(flat, lens)
        self.df = df if df is not None else DocumentFrequency._from_occurrences(ref_image[seq], key,
                                                                                 len(reference_ids))
        self.sigma = float(sigma)
        per_image = np.bincount(ref_image, minlength=len(reference_ids))
        self._ref_start = np.concatenate([[0], np.cumsum(per_image)])  # image i: refs [start[i], start[i+1])
        self._ref_len = lens
        ref, g, counts, self._keys = _count(seq, key)  # self._keys: all distinct reference n-grams, [G]
        self._idf = self.df.idf(self._keys)
        self._entry_start = np.searchsorted(ref, np.arange(lens.size + 1))  # ref r: entries [start[r], ..)
        self._entry_g = g.astype(np.int32 if self._keys.size < 2**31 else np.int64)
        self._entry_count = counts.astype(np.uint16 if counts.max(initial=0) < 2**16 else np.int64)
        self._ref_norm = _norms(ref, ngram_order(self._keys)[g], counts * self._idf[g], lens.size)

    @classmethod
    def from_captions(cls, captions: Sequence[Sequence[str]], vocab, df: DocumentFrequency | None = None,
                      sigma: float = 6.0) -> CiderD:
        """captions: per image, raw reference strings, tokenised by data.tokenizer and mapped with
        `vocab.id` (a data.vocab.Vocabulary: unknown words -> <UNK>), without <S> and </S>."""
        return cls([[[vocab.id(w) for w in tokenize(c)] for c in refs] for refs in captions], df, sigma)

    @property
    def num_images(self) -> int:
        return self._ref_start.size - 1

    def score(self, image_index, candidates, lengths=None, end_id: int | None = None) -> np.ndarray:
        """CIDEr-D of each candidate against the references of its image.

        image_index: int [M], the image (index into reference_ids) of candidate m.
        candidates: a padded int array [M, T] or a list of M id lists (e.g. [B*K, T] SCST samples).
        lengths: int [M], optional, tokens of each padded row to score; end_id: optional, each candidate
          stops before its first end_id (so padding after the end token is ignored).
        Returns float64 [M].
        """
        image_index = np.asarray(image_index, dtype=np.int64).ravel()
        flat, lens = _flatten(candidates, lengths, end_id)
        if lens.size != image_index.size:
            raise ValueError(f"{lens.size} candidates but {image_index.size} image indices")
        if image_index.size and (image_index.min() < 0 or image_index.max() >= self.num_images):
            raise ValueError(f"image indices must lie in [0, {self.num_images})")
        cand, index, counts, keys = _count(*_ngrams(flat, lens))
        g, known = _lookup(self._keys, keys)  # n-grams that occur in some reference: their index g
        idf = self._idf[g] if self._keys.size else np.zeros(keys.size)
        idf[~known] = self.df.idf(keys[~known])
        order, values = ngram_order(keys)[index], counts * idf[index]
        n_refs = self._ref_start[image_index + 1] - self._ref_start[image_index]
        pair_cand, k = _expand(n_refs)  # pair p = (candidate pair_cand[p], its image's k-th reference)
        pair_ref = self._ref_start[image_index][pair_cand] + k
        dot = self._clipped_dots(pair_ref, n_refs, cand, g[index], known[index], values, order)
        norms = _norms(cand, order, values, lens.size)[pair_cand] * self._ref_norm[pair_ref]
        cosine = np.where(norms != 0, dot / np.where(norms != 0, norms, 1.0), dot)
        delta = (lens[pair_cand] - self._ref_len[pair_ref]).astype(np.float64)
        per_pair = cosine.sum(axis=1) * np.exp(-(delta**2) / (2 * self.sigma**2))
        total = np.bincount(pair_cand, weights=per_pair, minlength=lens.size)
        return total / (N_MAX * np.maximum(n_refs, 1)) * 10.0

    def _clipped_dots(self, pair_ref, n_refs, cand, g, known, values, order) -> np.ndarray:
        """Sum of min(v_cand, v_ref) * v_ref over the candidate's n-grams per (pair, n): float64 [P, 4]."""
        table_key, table_value, slot = self._reference_table(pair_ref)
        if table_key.size == 0:
            return np.zeros((pair_ref.size, N_MAX))
        entry = np.flatnonzero(known)
        owner, k = _expand(n_refs[cand[entry]])  # each known n-gram x each reference of its image
        entry = entry[owner]
        pair = (np.cumsum(n_refs) - n_refs)[cand[entry]] + k
        hit, found = _lookup(table_key, slot[pair] * self._keys.size + g[entry])
        ref_value = np.where(found, table_value[hit], 0.0)
        clipped = np.minimum(values[entry], ref_value) * ref_value
        return np.bincount(pair * N_MAX + order[entry], weights=clipped,
                           minlength=pair_ref.size * N_MAX).reshape(pair_ref.size, N_MAX)

    def _reference_table(self, pair_ref) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The n-grams of the batch's distinct references: (sorted key slot * G + g int64, tf-idf float64,
        slot of each pair int64 [P])."""
        refs, slot = np.unique(pair_ref, return_inverse=True)
        starts = self._entry_start[refs]
        owner, offset = _expand(self._entry_start[refs + 1] - starts)
        idx = starts[owner] + offset
        g = self._entry_g[idx].astype(np.int64)
        return owner * self._keys.size + g, self._entry_count[idx] * self._idf[g], slot
