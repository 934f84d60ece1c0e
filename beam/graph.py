"""Beam search as one `tf.while_loop`, for exported SavedModels; same results as `beam.beam_search`.

Not imported by `beam/__init__.py` (`import beam` stays free of TensorFlow). Pure TF ops: traceable in a
`tf.function` with an unknown batch size N, fixed-shape outputs.

Semantics are beam/search.py's (im2txt's caption_generator, same ties): each partial caption is
extended by its own top-`beam_size` words (ties: lower word id first, `tf.math.top_k` is documented stable);
words with log p < log(1e-12) (and NaN log-probs, read as -inf) are never taken; end_id extensions go to the
complete pool (best `beam_size` by logprob / len ** alpha, a stable sort of old pool + new completions in
candidate order); the rest compete (stable sort by logprob, candidates in (parent rank, word rank) order) for
the next `beam_size` partials; the loop stops when no image has partials or after max_length - 1 steps. An
image returns its complete pool, or its partial captions (complete False, score = logprob) when the pool is
empty. Log-probs are accumulated in float64 (as beam/search.py does), so results match it exactly.

Layout: slot (image i, rank r) is row i * beam_size + r of the state. Every step calls step_fn on all
N * beam_size rows, dead slots included (their results are masked out): simple and fixed-shape, at the
cost of up to beam_size times the work of the NumPy search at the first step and on images that finished.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from beam.common import LOG_MIN_PROB, Caption, check_common, length_denominator

_NEG_INF = float("-inf")


def graph_beam_search(initial_state, step_fn, *, start_id: int, end_id: int, beam_size: int = 3,
                      max_length: int = 20, length_normalization: float = 0.0) -> dict[str, tf.Tensor]:
    """Caption N images by beam search inside the TF graph (see the module docstring).

    initial_state: tensor or (nested) tuple/list of tensors, leading dim N (may be unknown, or 0).
    step_fn(tokens int32 [M], state with M rows) -> (log_probs float [M, V] natural log, new_state with the
    same structure, dtypes and trailing shapes); M = N * beam_size at every call.
    Returns a dict of tensors, slots of each image best first, empty slots last:
      tokens   int32 [N, beam_size, max_length]: <S> ... (</S> when complete); 0 at positions >= lengths
               (so an empty slot is all 0).
      lengths  int32 [N, beam_size]: tokens in the caption, <S> and </S> counted; 0 for an empty slot.
      log_probs float64 [N, beam_size]: the caption's log-probability; -inf for an empty slot.
      scores   float64 [N, beam_size]: logprob / lengths ** alpha for complete captions (alpha > 0), else
               logprob; -inf for an empty slot.
      complete bool [N, beam_size]: True for complete captions; False for partials and empty slots.
    An image has either complete captions only, or (none completed) its partials, or nothing at all.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    check_common(max_length, length_normalization, 0, False, None)
    kb, length = beam_size, max_length
    n = tf.shape(tf.nest.flatten(initial_state)[0])[0]
    state = tf.nest.map_structure(lambda x: tf.repeat(tf.convert_to_tensor(x), kb, axis=0), initial_state)
    tokens = tf.pad(tf.fill([n, kb, 1], tf.constant(start_id, tf.int32)), [[0, 0], [0, 0], [0, length - 1]])
    logprob = tf.tile(tf.constant([[0.0] + [_NEG_INF] * (kb - 1)], tf.float64), [n, 1])
    pool = (tf.zeros([n, kb, length], tf.int32), tf.fill([n, kb], tf.constant(_NEG_INF, tf.float64)),
            tf.fill([n, kb], tf.constant(_NEG_INF, tf.float64)), tf.zeros([n, kb], tf.int32))
    dens = tf.constant([length_denominator(i, length_normalization) for i in range(length + 1)], tf.float64)

    def body(t, tokens, logprob, state, pool):
        feed = tf.reshape(tf.gather(tokens, t - 1, axis=2), [-1])
        logp, new_state = step_fn(feed, state)
        part, comp, cand_tok = _candidates(logp, tokens, logprob, t, kb, end_id)
        vals, order = tf.math.top_k(part, kb)  # stable: ties keep candidate order
        rows = tf.reshape(tf.range(n)[:, None] * kb + order // kb, [-1])
        new_state = tf.nest.pack_sequence_as(state, tf.nest.flatten(new_state))
        state = tf.nest.map_structure(lambda x: tf.gather(x, rows), new_state)
        score = comp / dens[t + 1] if length_normalization > 0 else comp
        pool = _merge_pool(pool, cand_tok, comp, score, t + 1, kb)
        return t + 1, tf.gather(cand_tok, order, batch_dims=1), vals, state, pool

    def cond(t, tokens, logprob, state, pool):
        return tf.logical_and(t < length, tf.reduce_any(tf.math.is_finite(logprob)))

    loop = (tf.constant(1), tokens, logprob, state, pool)
    invariants = tf.nest.map_structure(_loose_shape, loop)
    t, tokens, logprob, _, pool = tf.while_loop(cond, body, loop, shape_invariants=invariants,
                                                maximum_iterations=max(length - 1, 0))
    return _outputs(t, tokens, logprob, pool, length)


def _loose_shape(x: tf.Tensor) -> tf.TensorShape:
    """x's static shape with an unknown leading dim (N, or N * beam_size rows of state)."""
    shape = x.shape
    return shape if shape.rank in (None, 0) else tf.TensorShape([None]).concatenate(shape[1:])


def _top_words(logp, k: int):
    """Each row's k best words (ties: lower id first): ids int32 [M, k], log-probs float64 [M, k].

    NaN reads as -inf; rows with fewer than k words are padded with -inf words (never taken).
    """
    logp = tf.convert_to_tensor(logp)
    if logp.dtype not in (tf.float32, tf.float64):
        logp = tf.cast(logp, tf.float32)
    logp = tf.where(tf.math.is_nan(logp), tf.constant(_NEG_INF, logp.dtype), logp)
    if logp.shape[-1] is None or logp.shape[-1] < k:
        pad = tf.maximum(k - tf.shape(logp)[1], 0)
        logp = tf.pad(logp, [[0, 0], [0, pad]], constant_values=_NEG_INF)
    vals, ids = tf.math.top_k(logp, k)
    return ids, tf.cast(vals, tf.float64)


def _candidates(logp, tokens, logprob, t, kb: int, end_id: int):
    """This step's kb * kb candidates per image, in (parent rank, word rank) order.

    Returns part, comp float64 [N, kb*kb] (logprob of a candidate that continues / completes; -inf when it
    does not, or is not taken) and cand_tok int32 [N, kb*kb, L] (the parent's tokens with the word at t).
    """
    n, length = tf.shape(tokens)[0], tokens.shape[2]
    ids, vals = _top_words(logp, kb)
    ids, vals = tf.reshape(ids, [n, kb, kb]), tf.reshape(vals, [n, kb, kb])
    ok = tf.logical_and(vals >= LOG_MIN_PROB, tf.math.is_finite(logprob)[:, :, None])
    end = tf.equal(ids, end_id)
    cand_lp = logprob[:, :, None] + vals
    neg_inf = tf.constant(_NEG_INF, tf.float64)
    part = tf.reshape(tf.where(tf.logical_and(ok, ~end), cand_lp, neg_inf), [n, kb * kb])
    comp = tf.reshape(tf.where(tf.logical_and(ok, end), cand_lp, neg_inf), [n, kb * kb])
    at_t = tf.equal(tf.range(length), t)
    words = tf.reshape(tf.where(ok, ids, 0), [n, kb * kb, 1])
    cand_tok = tf.where(at_t, words, tf.repeat(tokens, kb, axis=1))
    return part, comp, cand_tok


def _merge_pool(pool, cand_tok, comp, score, new_len, kb: int):
    """The best kb of (old pool + this step's completions), a stable sort by score."""
    pool_tok, pool_lp, pool_score, pool_len = pool
    all_score = tf.concat([pool_score, score], axis=1)
    pool_score, order = tf.math.top_k(all_score, kb)

    def pick(old, new):
        return tf.gather(tf.concat([old, new], axis=1), order, batch_dims=1)

    new_lens = tf.fill(tf.shape(comp), new_len)
    return pick(pool_tok, cand_tok), pick(pool_lp, comp), pool_score, pick(pool_len, new_lens)


def _outputs(t, tokens, logprob, pool, length: int) -> dict[str, tf.Tensor]:
    """The result dict of graph_beam_search: per image its complete pool, else its partials (length t)."""
    pool_tok, pool_lp, pool_score, pool_len = pool
    done = tf.math.is_finite(pool_score)
    has = tf.reduce_any(done, axis=1, keepdims=True)
    alive = tf.math.is_finite(logprob)
    lengths = tf.where(has, tf.where(done, pool_len, 0), tf.where(alive, t, 0))
    toks = tf.where(has[:, :, None], pool_tok, tokens)
    toks = tf.where(tf.range(length) < lengths[:, :, None], toks, 0)
    return {"tokens": toks, "lengths": lengths, "log_probs": tf.where(has, pool_lp, logprob),
            "scores": tf.where(has, pool_score, logprob), "complete": tf.logical_and(has, done)}


def captions_from_graph(outputs: dict, index: int) -> list[Caption]:
    """Image `index`'s captions (best first, empty slots skipped) from graph_beam_search's outputs (NumPy
    arrays or eager tensors), as beam.Caption objects comparable with beam.beam_search's."""
    out = {k: np.asarray(v) for k, v in outputs.items()}
    tokens, lengths, lp, score, done = (out[k][index] for k in ("tokens", "lengths", "log_probs", "scores",
                                                                "complete"))
    return [Caption([int(w) for w in tokens[j, :lengths[j]]], float(lp[j]), float(score[j]), bool(done[j]))
            for j in range(lengths.size) if lengths[j] > 0]
