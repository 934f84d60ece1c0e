"""Greedy search (the beam-size-1 fast path) and seeded sampling with temperature / top-k.

Both are batched like beam search: one step_fn call per time step on the N rows still running, with the
same rules: a word with p < 1e-12 (or banned) is never taken, an end_id word completes a caption with score
logprob / len ** alpha, and the partial captions are returned only when an image completed none.
"""

from __future__ import annotations

import numpy as np

import beam.common as common  # the pieces beam/search.py shares: Caption, state rows, bans, top-k, scoring


def greedy_search(initial_state, step_fn, *, start_id: int, end_id: int, max_length: int = 20,
                  alpha: float = 0.0, no_repeat_ngram: int = 0, banned: tuple[int, ...] = ()
                  ) -> list[list[common.Caption]]:
    """Greedy decoding = beam search with beam_size 1 (identical result), without the beam bookkeeping.

    Shapes and step_fn as in beam.beam_search; the arg-max tie goes to the lower word id like top_k.
    Returns per image a list of at most one Caption.
    """
    b = common.state_batch_size(initial_state)
    return _decode(initial_state, step_fn, np.arange(b), b, _pick_greedy, start_id=start_id, end_id=end_id,
                   max_length=max_length, alpha=alpha, no_repeat_ngram=no_repeat_ngram, banned=banned)


def sample_search(initial_state, step_fn, *, start_id: int, end_id: int, num_samples: int = 1,
                  temperature: float = 1.0, top_k_words: int = 0, seed: int | None = 0, max_length: int = 20,
                  length_normalization: float = 0.0, no_repeat_ngram: int = 0, suppress_unk: bool = False,
                  unk_id: int | None = None) -> list[list[common.Caption]]:
    """Sample num_samples captions per image from softmax(log_probs / temperature), optionally restricted to
    each step's top_k_words words (0 = all), with a NumPy Generator seeded by `seed`.

    logprob is the model's (untempered) log-probability. The draws depend on the seed and on the batch
    composition (one random stream for the batch). Returns per image its complete samples best first (by
    score), or its unfinished samples when none completed.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k_words < 0:
        raise ValueError(f"top_k_words must be >= 0, got {top_k_words}")
    common.check_common(max_length, length_normalization, no_repeat_ngram, suppress_unk, unk_id)
    b = common.state_batch_size(initial_state)
    image = np.repeat(np.arange(b), num_samples)
    rng = np.random.default_rng(seed)

    def pick(logp):
        z = logp / temperature
        z = np.where(logp >= common.LOG_MIN_PROB, z, -np.inf)
        if top_k_words and top_k_words < z.shape[1]:
            ids, _ = common.top_k(z, top_k_words)
            keep = np.full(z.shape, -np.inf)
            np.put_along_axis(keep, ids, np.take_along_axis(z, ids, axis=1), axis=1)
            z = keep
        return np.argmax(z + rng.gumbel(size=z.shape), axis=1)  # Gumbel-max = a draw from softmax(z)

    state = common.gather_rows(initial_state, image)
    banned = (int(unk_id),) if suppress_unk else ()
    return _decode(state, step_fn, image, b, pick, start_id=start_id, end_id=end_id, max_length=max_length,
                   alpha=length_normalization, no_repeat_ngram=no_repeat_ngram, banned=banned)


def _pick_greedy(logp: np.ndarray) -> np.ndarray:
    return np.argmax(logp, axis=1)  # first maximum = lowest id on ties


def _decode(state, step_fn, image, b, pick, *, start_id, end_id, max_length, alpha, no_repeat_ngram,
            banned) -> list[list[common.Caption]]:
    """One-word-per-row decoding shared by greedy and sampling.

    image: int [R], the image of each of the R rows of `state`; pick(logp [N, V]) -> word ids int [N].
    """
    r = image.size
    tokens = np.zeros((r, max_length), dtype=np.int64)
    tokens[:, 0] = start_id
    logprob = np.zeros(r)
    length = np.ones(r, dtype=np.int64)
    status = np.zeros(r, dtype=np.int8)  # 0 running, 1 complete, 2 dropped (no word with p >= 1e-12)
    rows = np.arange(r)
    for t in range(1, max_length):
        if rows.size == 0:
            break
        logp, new_state = step_fn(tokens[rows, t - 1].astype(np.int32), state)
        logp = common.apply_bans(common.to_numpy_logp(logp), tokens[rows, :t],
                                 no_repeat_ngram=no_repeat_ngram, banned_ids=banned)
        words = pick(logp)
        vals = logp[np.arange(rows.size), words].astype(np.float64)
        ok = vals >= common.LOG_MIN_PROB
        tokens[rows, t] = words
        logprob[rows] += np.where(ok, vals, 0.0)
        length[rows[ok]] = t + 1
        status[rows[~ok]] = 2
        status[rows[ok & (words == end_id)]] = 1
        keep = ok & (words != end_id)
        state = common.gather_rows(new_state, np.nonzero(keep)[0])
        rows = rows[keep]
    out = []
    for i in range(b):
        mine = np.nonzero(image == i)[0]
        done = mine[status[mine] == 1]
        if done.size:
            caps = [common.Caption([int(w) for w in tokens[j, :length[j]]], float(logprob[j]),
                                   float(logprob[j] / common.length_denominator(length[j], alpha)), True)
                    for j in done]  # the denominator is 1.0 (exact) when alpha is 0
        else:
            caps = [common.Caption([int(w) for w in tokens[j, :length[j]]], float(logprob[j]),
                                   float(logprob[j]), False) for j in mine[status[mine] == 0]]
        out.append(sorted(caps, key=lambda c: -c.score))  # stable: ties keep sample order
    return out
