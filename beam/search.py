"""Batched beam search with im2txt's exact semantics (inference_utils/caption_generator.py).

Per image, as in im2txt: every partial caption is extended by its own top-`beam_size` words; a word with
p < 1e-12 is never taken; an extension ending in end_id goes to a pool of complete captions (the best
`beam_size` by score = logprob / len ** alpha, len counting <S> and </S>); the other extensions compete for
the `beam_size` partial captions of the next step (score = logprob). The search stops when an image has no
partial captions left or after max_length - 1 steps (max_length counts <S>); it returns the complete pool best
first, or, when no caption was completed, the last partial captions.

Batched: the partial captions of all B images sit in a [B, beam] grid; each time step makes ONE step_fn call
on the N alive rows (row-major over the grid), and ranking is vectorised (no loop over images or words).

Ties (equal scores) are broken deterministically, and tests/beam_reference.py shares the rule: a parent's
words rank by (log-prob descending, word id ascending); candidates are listed parent by parent (parents in
rank order), each parent's words in rank order; the next partials are the first `beam_size` of a stable
sort of that list by score; the complete pool is the first `beam_size` of a stable sort of
(old pool in rank order + this step's completions in list order). im2txt's heap order on ties is
implementation-defined; this rule is one of the orders it can produce.

Note: im2txt's final code reads `np.argsort(p)[:-beam_size][::-1]`, which takes every word *except* the
top beam_size (a slicing bug; earlier im2txt sorted and kept words[0:beam_size]). The intended semantics,
and ours, are the top beam_size words.
"""

from __future__ import annotations

import numpy as np

from beam.common import (
    LOG_MIN_PROB,
    Caption,
    apply_bans,
    check_common,
    gather_rows,
    length_denominator,
    state_batch_size,
    to_numpy_logp,
    top_k,
)
from beam.sampling import greedy_search


def beam_search(initial_state, step_fn, *, start_id: int, end_id: int, beam_size: int = 3,
                max_length: int = 20, length_normalization: float = 0.0, no_repeat_ngram: int = 0,
                suppress_unk: bool = False, unk_id: int | None = None) -> list[list[Caption]]:
    """Caption B images by batched beam search (im2txt's algorithm; see the module docstring).

    initial_state: array or (nested) tuple of arrays, leading dim B (NumPy or TF).
    step_fn(tokens int32 [N], state with N rows) -> (log_probs float [N, V] natural log, new_state).
    beam_size 1 takes the greedy fast path (same result). no_repeat_ngram n > 0 bans words that would repeat
    an n-gram of the caption; suppress_unk bans unk_id. Banned words count as p = 0.
    Returns, per image, up to beam_size Captions sorted best first.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    check_common(max_length, length_normalization, no_repeat_ngram, suppress_unk, unk_id)
    banned = (int(unk_id),) if suppress_unk else ()
    args = dict(start_id=start_id, end_id=end_id, max_length=max_length, alpha=length_normalization,
                no_repeat_ngram=no_repeat_ngram, banned=banned)
    if beam_size == 1:
        return greedy_search(initial_state, step_fn, **args)
    return general_beam_search(initial_state, step_fn, beam_size=beam_size, **args)


def general_beam_search(initial_state, step_fn, *, start_id, end_id, beam_size, max_length, alpha,
                        no_repeat_ngram=0, banned=()) -> list[list[Caption]]:
    """The general batched search (any beam_size >= 1, no greedy fast path; tests compare the two); see
    beam_search."""
    b, kb, length = state_batch_size(initial_state), beam_size, max_length
    tokens = np.zeros((b, kb, length), dtype=np.int64)  # partial grid: tokens of slot (image, rank)
    tokens[:, 0, 0] = start_id
    logprob = np.full((b, kb), -np.inf)
    logprob[:, 0] = 0.0
    pool_tok = np.zeros((b, kb, length), dtype=np.int64)  # complete pool, best first
    pool_lp = np.full((b, kb), -np.inf)
    pool_score = np.full((b, kb), -np.inf)
    pool_len = np.zeros((b, kb), dtype=np.int64)
    state, cur = initial_state, 1  # cur = length of the current partial captions
    for t in range(1, length):
        rb, rs = np.nonzero(np.isfinite(logprob))  # alive slots, row-major = row order of `state`
        if rb.size == 0:
            break
        logp, new_state = step_fn(tokens[rb, rs, t - 1].astype(np.int32), state)
        logp = apply_bans(to_numpy_logp(logp), tokens[rb, rs, :t], no_repeat_ngram=no_repeat_ngram,
                          banned_ids=banned)
        ids, vals = top_k(logp, kb)
        k = ids.shape[1]
        vals = vals.astype(np.float64)
        cand_lp = logprob[rb, rs][:, None] + vals  # [n, k]
        ok = vals >= LOG_MIN_PROB
        end = ids == end_id
        part = _grid(b, kb, k, rb, rs, np.where(ok & ~end, cand_lp, -np.inf))  # [B, kb*k]
        comp_lp = _grid(b, kb, k, rb, rs, np.where(ok & end, cand_lp, -np.inf))
        cand_tok = np.repeat(tokens, k, axis=1)  # [B, kb*k, L]: candidate j extends slot j // k
        cand_tok[:, :, t] = _grid(b, kb, k, rb, rs, ids, fill=0)
        # partial captions of the next step
        order = np.argsort(-part, axis=1, kind="stable")[:, :kb]
        logprob = np.take_along_axis(part, order, axis=1)
        tokens = np.take_along_axis(cand_tok, order[:, :, None], axis=1)
        row_of_slot = np.full((b, kb), -1, dtype=np.int64)
        row_of_slot[rb, rs] = np.arange(rb.size)
        nb, ns = np.nonzero(np.isfinite(logprob))
        state = gather_rows(new_state, row_of_slot[nb, order[nb, ns] // k])
        cur = t + 1
        # complete pool
        den = length_denominator(t + 1, alpha)
        comp_score = comp_lp / den if alpha > 0 else comp_lp
        all_score = np.concatenate([pool_score, comp_score], axis=1)
        order = np.argsort(-all_score, axis=1, kind="stable")[:, :kb]
        pool_score = np.take_along_axis(all_score, order, axis=1)
        pool_lp = np.take_along_axis(np.concatenate([pool_lp, comp_lp], axis=1), order, axis=1)
        pool_len = np.take_along_axis(
            np.concatenate([pool_len, np.full(comp_lp.shape, t + 1)], axis=1), order, axis=1)
        pool_tok = np.take_along_axis(np.concatenate([pool_tok, cand_tok], axis=1), order[:, :, None], axis=1)
    return [_collect(i, pool_tok, pool_lp, pool_score, pool_len, tokens, logprob, cur) for i in range(b)]


def _grid(b: int, kb: int, k: int, rb: np.ndarray, rs: np.ndarray, rows: np.ndarray,
          fill=-np.inf) -> np.ndarray:
    """Scatter per-row candidate values rows [n, k] of slots (rb, rs) into a [B, kb * k] grid."""
    out = np.full((b, kb, k), fill, dtype=rows.dtype)
    out[rb, rs] = rows
    return out.reshape(b, kb * k)


def _collect(i, pool_tok, pool_lp, pool_score, pool_len, tokens, logprob, cur) -> list[Caption]:
    """Image i's result: its complete pool, or its partial captions when the pool is empty."""
    done = np.isfinite(pool_score[i])
    if done.any():
        return [Caption([int(w) for w in pool_tok[i, j, :pool_len[i, j]]], float(pool_lp[i, j]),
                        float(pool_score[i, j]), True) for j in np.nonzero(done)[0]]
    alive = np.nonzero(np.isfinite(logprob[i]))[0]
    return [Caption([int(w) for w in tokens[i, j, :cur]], float(logprob[i, j]), float(logprob[i, j]), False)
            for j in alive]
