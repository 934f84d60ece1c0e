"""A plain per-image reference of im2txt's beam search (caption_generator.py), for tests and bench/beam.py.

It follows im2txt's loop literally: for each image, one step call per time step on that image's partial
captions; each partial is extended by its own top-`beam_size` words (im2txt's final code has the
`[:-beam_size]` slicing bug); p < 1e-12 skipped; end_id extensions go to the complete pool; stop when no
partials remain or after max_length - 1 steps; return the complete pool, else the partials.

im2txt keeps both pools in heaps, whose order on equal scores is implementation-defined. Here the pools are
plain lists sorted stably, which fixes the tie rule that beam.search shares: words by (log-prob desc, id asc),
candidates in (parent rank, word rank) order, the complete pool as old pool + new completions.

For the tests that compare a search with it: `make_table` (random log-prob tables full of the cases the tie
and probability rules decide) and `as_tuples` (a search's captions in the reference's output format).
"""

from __future__ import annotations

import math

import numpy as np

LOG_MIN_PROB = math.log(1e-12)


class _Cap:
    def __init__(self, sentence, state, logprob, score):
        self.sentence, self.state, self.logprob, self.score = sentence, state, logprob, score


def _rows(state, i):
    """Row i of an array or a tuple of arrays."""
    if isinstance(state, tuple):
        return tuple(np.asarray(s)[i] for s in state)
    return np.asarray(state)[i]


def _stack(states):
    if isinstance(states[0], tuple):
        return tuple(np.stack([s[j] for s in states]) for j in range(len(states[0])))
    return np.stack(states)


def ngram_bans(sentence: list[int], n: int) -> set[int]:
    """Words that would repeat an n-gram of `sentence` (n = 0: none)."""
    if n <= 0:
        return set()
    tail = sentence[len(sentence) - n + 1:] if n > 1 else []
    return {sentence[i + n - 1] for i in range(len(sentence) - n + 1) if sentence[i:i + n - 1] == tail}


def reference_one(state_row, step_fn, *, start_id, end_id, beam_size=3, max_length=20, alpha=0.0,
                  no_repeat_ngram=0, banned=()):
    """Beam search for ONE image; state_row is its state without the batch dim. Returns a list of
    (tokens, logprob, score, complete) sorted best first."""
    partials = [_Cap([start_id], state_row, 0.0, 0.0)]
    completes = []
    for _ in range(max_length - 1):
        feed = np.array([c.sentence[-1] for c in partials], dtype=np.int32)
        logp, new_state = step_fn(feed, _stack([c.state for c in partials]))
        logp = np.asarray(logp)
        new_partials, new_completes = [], []
        for i, cap in enumerate(partials):
            row = np.where(np.isnan(logp[i]), -np.inf, logp[i])
            for w in set(banned) | ngram_bans(cap.sentence, no_repeat_ngram):
                row[w] = -np.inf
            for w in np.argsort(-row, kind="stable")[:beam_size]:
                lp = float(row[w])
                if lp < LOG_MIN_PROB:
                    continue
                sentence = cap.sentence + [int(w)]
                logprob = cap.logprob + lp
                if w == end_id:
                    score = logprob
                    if alpha > 0:
                        score /= len(sentence) ** alpha
                    new_completes.append(_Cap(sentence, None, logprob, score))
                else:
                    new_partials.append(_Cap(sentence, _rows(new_state, i), logprob, logprob))
        partials = sorted(new_partials, key=lambda c: -c.score)[:beam_size]
        completes = sorted(completes + new_completes, key=lambda c: -c.score)[:beam_size]
        if not partials:
            break
    out = [(c.sentence, c.logprob, c.score, True) for c in completes]
    return out or [(c.sentence, c.logprob, c.score, False) for c in partials]


def reference_beam_search(initial_state, step_fn, **kwargs):
    """reference_one for every image of a batched initial_state (array or tuple of arrays, leading dim B)."""
    b = (initial_state[0] if isinstance(initial_state, tuple) else initial_state).shape[0]
    return [reference_one(_rows(initial_state, i), step_fn, **kwargs) for i in range(b)]


def as_tuples(result) -> list:
    """Captions of a batched search ([[Caption]]) as the reference returns them: [[(tokens, logprob, score,
    complete)]]."""
    return [[(c.tokens, c.logprob, c.score, c.complete) for c in caps] for caps in result]


def make_table(rng: np.random.Generator, rows: int, vocab: int, quantize="none", tiny: float = 0.0,
               no_end_id: int | None = None, nan: bool = False) -> np.ndarray:
    """Random log-prob rows float32 [rows, vocab]. quantize "round": log-softmax of rounded logits (words
    tie); "dyadic": log-probs in {0, 1, 2, 4} * log(1/2), so that sums of different captions tie exactly
    (the pool's tie rule). `tiny` is the share of words with p ~ 1e-26 (< 1e-12); `no_end_id` makes that
    word (</S>) unreachable (the partial fallback); `nan` sprinkles NaN log-probs."""
    logits = rng.normal(size=(rows, vocab)) * 2
    if quantize == "round":
        logits = np.round(logits)
    if quantize == "dyadic":
        logits = rng.choice([0.0, 1.0, 2.0, 4.0], size=(rows, vocab)) * np.float32(np.log(0.5))
    logits[rng.random((rows, vocab)) < tiny] = -60.0
    if no_end_id is not None:
        logits[:, no_end_id] = -60.0
    if quantize != "dyadic":
        logits -= logits.max(axis=1, keepdims=True)
        logits -= np.log(np.exp(logits).sum(axis=1, keepdims=True))
    table = logits.astype(np.float32)
    if nan:
        table[rng.random(table.shape) < 0.15] = np.nan
    return table
