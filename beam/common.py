"""Pieces shared by beam search, greedy search and sampling: the result type, state handling, word bans,
an exact top-k, and im2txt's scoring rules.

The model is only seen through `initial_state` (an array, or a tuple/list of arrays, leading dimension B)
and `step_fn(tokens int32 [N], state) -> (log_probs float [N, V], new_state)`; arrays may be NumPy arrays or
TensorFlow tensors. Rows of a state are reordered with NumPy indexing or `tf.gather`, whichever fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# im2txt: "if p < 1e-12: continue  # Avoid log(0)". Here on log-probabilities: a word is taken iff
# log_prob >= log(1e-12) (compared in float64).
LOG_MIN_PROB = math.log(1e-12)


@dataclass
class Caption:
    """One generated caption.

    tokens: word ids, starting with start_id and ending with end_id when complete.
    logprob: natural-log probability of the caption under the model (sum of the chosen words' log-probs).
    score: logprob / len(tokens) ** alpha for complete captions when alpha > 0, else logprob.
    complete: False for the partial captions returned when no caption reached end_id.
    """

    tokens: list[int]
    logprob: float
    score: float
    complete: bool = True

    def to_dict(self) -> dict:
        """JSON-able dict with tokens, logprob, score and complete."""
        return {"tokens": list(self.tokens), "logprob": self.logprob, "score": self.score,
                "complete": self.complete}


def length_denominator(length: int, alpha: float) -> float:
    """What im2txt divides a complete caption's logprob by: len ** alpha (1.0 when alpha is 0).

    `length` counts every token of the caption, <S> and </S> included (im2txt's len(sentence)).
    """
    return float(length) ** alpha if alpha > 0 else 1.0


def check_common(max_length: int, length_normalization: float, no_repeat_ngram: int,
                 suppress_unk: bool, unk_id: int | None) -> None:
    """Raise ValueError on an option no search can honour."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1 (it counts <S>), got {max_length}")
    if length_normalization < 0:
        raise ValueError(f"length_normalization must be >= 0, got {length_normalization}")
    if no_repeat_ngram < 0:
        raise ValueError(f"no_repeat_ngram must be >= 0, got {no_repeat_ngram}")
    if suppress_unk and unk_id is None:
        raise ValueError("suppress_unk needs unk_id")


def _is_seq(state) -> bool:
    return isinstance(state, (tuple, list))


def map_state(fn, state):
    """Apply fn to every array of a state (an array, or a possibly nested tuple/list/namedtuple of arrays)."""
    if _is_seq(state):
        items = [map_state(fn, s) for s in state]
        if hasattr(state, "_fields"):
            return type(state)(*items)
        return type(state)(items)
    return fn(state)


def state_batch_size(state) -> int:
    """Leading dimension B of the first array of a state."""
    while _is_seq(state):
        if not state:
            raise ValueError("initial_state is an empty tuple")
        state = state[0]
    return int(state.shape[0])


def _gather(x, rows: np.ndarray):
    if isinstance(x, np.ndarray):
        return x[rows]
    if type(x).__module__.startswith("tensorflow"):
        import tensorflow as tf  # only when the model hands us tensors

        return tf.gather(x, rows)
    return np.asarray(x)[rows]


def gather_rows(state, rows: np.ndarray):
    """The state rows `rows` (int [M]) of every array of a state, in that order."""
    rows = np.asarray(rows, dtype=np.int64)
    return map_state(lambda x: _gather(x, rows), state)


def to_numpy_logp(log_probs) -> np.ndarray:
    """log_probs (NumPy or TF, [N, V]) as a float32/float64 NumPy array with NaN replaced by -inf."""
    x = np.asarray(log_probs)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    if x.ndim != 2:
        raise ValueError(f"step_fn must return log_probs of shape [N, V], got {x.shape}")
    nan = np.isnan(x)
    if nan.any():
        x = np.where(nan, -np.inf, x)
    return x


def apply_bans(logp: np.ndarray, history: np.ndarray, *, no_repeat_ngram: int = 0,
               banned_ids: tuple[int, ...] = ()) -> np.ndarray:
    """Set to -inf the words a row may not take next (the p < 1e-12 rule then drops them).

    logp: float [N, V]; history: int [N, t], each row's tokens so far (<S> included).
    banned_ids: words never taken (e.g. <UNK>). no_repeat_ngram n > 0: a word that would complete an n-gram
    already present in the row's history is banned (n = 1: no word may appear twice).
    Returns logp itself when nothing is banned, else a modified copy.
    """
    n = no_repeat_ngram
    t = history.shape[1]
    if not banned_ids and not (n > 0 and t >= n):
        return logp
    logp = np.array(logp, copy=True)
    if banned_ids:
        logp[:, list(banned_ids)] = -np.inf
    if n > 0 and t >= n:
        count = t - n + 1  # n-grams already in the history
        if n == 1:
            match = np.ones((history.shape[0], count), dtype=bool)
        else:
            windows = np.lib.stride_tricks.sliding_window_view(history, n - 1, axis=1)[:, :count]
            match = (windows == history[:, None, t - n + 1:]).all(axis=2)
        nxt = history[:, n - 1:]
        r, c = np.nonzero(match)
        logp[r, nxt[r, c]] = -np.inf
    return logp


def top_k(logp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries of each row, best first; ties go to the lower word id.

    logp: float [N, V] without NaN. Returns (ids int64 [N, k'], values [N, k'], logp's dtype), k' = min(k, V).
    Vectorised, no loop over V: for small k, k arg-max passes (arg-max returns the first maximum, i.e. the
    lowest id); otherwise argpartition with an exact repair of ties at the k-th value.
    """
    n, v = logp.shape
    k = min(k, v)
    if 0 < k <= _ARGMAX_PASSES and n > 0:
        ids = _top_k_by_argmax(logp, k)
        if ids is not None:
            return ids, np.take_along_axis(logp, ids, axis=1)
    if k == v or n == 0:
        ids = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    else:
        part = np.argpartition(-logp, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(logp, part, axis=1).min(axis=1, keepdims=True)
        above = logp > kth
        equal = logp == kth
        need = k - above.sum(axis=1, keepdims=True)
        excess = equal.sum(axis=1, keepdims=True) > need
        if excess.any():  # more words tie with the k-th value than fit: keep the lowest ids
            rows = np.nonzero(excess[:, 0])[0]
            equal[rows] &= np.cumsum(equal[rows], axis=1) <= need[rows]
        ids = np.nonzero(above | equal)[1].reshape(n, k)  # ascending ids within each row
        vals = np.take_along_axis(logp, ids, axis=1)
        ids = np.take_along_axis(ids, np.argsort(-vals, axis=1, kind="stable"), axis=1)
    return ids.astype(np.int64), np.take_along_axis(logp, ids, axis=1)


_ARGMAX_PASSES = 8  # up to this k, k arg-max passes beat argpartition (beam sizes are small)


def _top_k_by_argmax(logp: np.ndarray, k: int) -> np.ndarray | None:
    """ids int64 [N, k] by repeated arg-max, or None when a row runs out of values above -inf (an arg-max
    over only -inf could return an id already taken; the caller then uses the exact general path)."""
    x = np.array(logp, copy=True)
    rows = np.arange(x.shape[0])
    ids = np.empty((x.shape[0], k), dtype=np.int64)
    for j in range(k):
        ids[:, j] = np.argmax(x, axis=1)
        if j > 0 and np.isneginf(x[rows, ids[:, j]]).any():
            return None
        if j < k - 1:
            x[rows, ids[:, j]] = -np.inf
    return ids
