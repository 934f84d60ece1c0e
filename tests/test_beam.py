"""beam/: the batched search equals a plain per-image im2txt reference; fake models with set probabilities."""

import math

import numpy as np
import pytest
from beam_reference import as_tuples, make_table, reference_beam_search
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beam import SearchConfig, apply_bans, beam_search, generate, greedy_search, sample_search, top_k
from beam.search import general_beam_search

S, E, A, B, C, U = 0, 1, 2, 3, 4, 5  # <S>, </S>, a, b, c, <UNK>


class TableModel:
    """A fake model whose log-probs come from a table row picked by a hash of the caption so far.

    State: (node int64 [N], step float32 [N, 1]) or just node. Exact integer arithmetic, so the batched
    and per-image searches see bit-identical log-probs. Records N of every call.
    """

    def __init__(self, table: np.ndarray, tuple_state: bool = True):
        self.table, self.tuple_state, self.calls = table.astype(np.float32), tuple_state, []

    def initial_state(self, images: np.ndarray):
        node = np.asarray(images, dtype=np.int64) * 7 + 3
        return (node, np.zeros((node.size, 1), np.float32)) if self.tuple_state else node

    def step(self, tokens, state):
        self.calls.append(len(tokens))
        node, steps = state if self.tuple_state else (state, None)
        node = (np.asarray(node) * 31 + np.asarray(tokens) * 7 + 1) % 1009
        shift = np.asarray(steps)[:, 0].astype(np.int64) if steps is not None else 0
        row = (node + shift) % len(self.table)
        new = (node, np.asarray(steps) + 1) if self.tuple_state else node
        return self.table[row], new


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), images=st.integers(1, 4), vocab=st.integers(2, 7),
       rows=st.integers(1, 5), beam=st.integers(1, 4), max_length=st.integers(1, 7),
       alpha=st.sampled_from([0.0, 0.5, 1.0, 2.0]), quantize=st.booleans(), tiny=st.sampled_from([0, 0.3]),
       ngram=st.sampled_from([0, 0, 1, 2]), suppress=st.booleans(), tuple_state=st.booleans())
def test_batched_equals_per_image_reference(seed, images, vocab, rows, beam, max_length, alpha, quantize,
                                            tiny, ngram, suppress, tuple_state):
    rng = np.random.default_rng(seed)
    model = TableModel(make_table(rng, rows, vocab, "round" if quantize else "none", tiny), tuple_state)
    init = model.initial_state(rng.integers(0, 50, images))
    unk = vocab - 1
    kw = dict(start_id=0, end_id=1 % vocab, max_length=max_length, no_repeat_ngram=ngram)
    want = reference_beam_search(init, model.step, beam_size=beam, alpha=alpha,
                                 banned=(unk,) if suppress else (), **kw)
    model.calls = []
    got = beam_search(init, model.step, beam_size=beam, length_normalization=alpha, suppress_unk=suppress,
                      unk_id=unk, **kw)
    assert as_tuples(got) == want
    assert len(model.calls) <= max(max_length - 1, 0)  # one step call per time step for the whole batch
    assert all(n <= images * beam for n in model.calls) and model.calls[:1] in ([], [images])
    general = general_beam_search(init, model.step, beam_size=beam, alpha=alpha,
                           banned=(unk,) if suppress else (), start_id=0, end_id=1 % vocab,
                           max_length=max_length, no_repeat_ngram=ngram)
    assert as_tuples(general) == want  # beam 1: the greedy fast path equals the general search


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 5), vocab=st.integers(1, 40), k=st.integers(1, 12))
def test_top_k_is_exact_with_ties(seed, n, vocab, k):
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(size=(n, vocab))).astype(np.float32)
    x[rng.random(x.shape) < 0.2] = -np.inf
    ids, vals = top_k(x, k)
    want = np.argsort(-x, axis=1, kind="stable")[:, :min(k, vocab)]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(vals, np.take_along_axis(x, want, axis=1))


class ProbModel:
    """Hand-set probabilities by previous word: probs[last] is a dict word -> p (rest 0)."""

    def __init__(self, probs: dict, vocab: int = 6):
        self.table = np.full((vocab, vocab), -np.inf, np.float32)
        for last, dist in probs.items():
            for w, p in dist.items():
                self.table[last, w] = math.log(p)

    def step(self, tokens, state):
        return self.table[np.asarray(tokens)], state


def run(model, beam=3, max_length=20, images=1, **kw):
    out = beam_search(np.zeros((images, 2), np.float32), model.step, start_id=S, end_id=E, beam_size=beam,
                      max_length=max_length, **kw)
    return out[0] if images == 1 else out


def test_beam_size_finds_what_greedy_misses():
    model = ProbModel({S: {A: 0.5, B: 0.4, C: 0.1}, A: {E: 0.3, C: 0.7}, B: {E: 0.9, C: 0.1}, C: {E: 1.0}})
    greedy = run(model, beam=1)
    assert [c.tokens for c in greedy] == [[S, A, C, E]]
    assert greedy[0].logprob == pytest.approx(math.log(0.5 * 0.7))
    caps = run(model, beam=2)
    assert [c.tokens for c in caps] == [[S, B, E], [S, A, C, E]]  # pool of 2, best first
    assert caps[0].logprob == pytest.approx(math.log(0.36)) and caps[0].score == caps[0].logprob
    assert len(run(model, beam=3)) == 3


def test_each_partial_takes_only_its_own_top_words():
    # beam 2: from <S> only A and B are tried, never C, although C -> </S> would be the best caption.
    model = ProbModel({S: {A: 0.4, B: 0.35, C: 0.25}, A: {E: 0.1, A: 0.9}, B: {E: 0.1, B: 0.9}, C: {E: 1.0}})
    assert [S, C, E] not in [c.tokens for c in run(model, beam=2, max_length=3)]
    assert [S, C, E] == run(model, beam=3, max_length=3)[0].tokens


def test_max_length_counts_start_and_falls_back_to_partials():
    model = ProbModel({S: {A: 0.6, B: 0.4}, A: {A: 0.5, B: 0.5}, B: {A: 0.5, B: 0.5}})  # never ends
    caps = run(model, beam=2, max_length=4)
    assert all(len(c.tokens) == 4 and not c.complete for c in caps) and len(caps) == 2
    assert caps[0].tokens[:2] == [S, A] and caps[0].score == caps[0].logprob
    assert [c.score for c in caps] == sorted((c.score for c in caps), reverse=True)
    assert run(model, max_length=1) and run(model, max_length=1)[0].tokens == [S]


def test_partials_are_dropped_when_a_caption_completed():
    # the only complete caption is much worse than the partials, but it is still the answer (im2txt).
    model = ProbModel({S: {A: 0.98, E: 0.02}, A: {A: 1.0}})
    caps = run(model, beam=2, max_length=5)
    assert [c.tokens for c in caps] == [[S, E]] and caps[0].complete


def test_length_normalization_scores_completes_only():
    model = ProbModel({S: {E: 0.4, A: 0.6}, A: {A: 0.5, E: 0.5}})
    plain = run(model, beam=3, max_length=4)
    assert [c.tokens for c in plain] == [[S, E], [S, A, E], [S, A, A, E]]
    assert [c.score for c in plain] == pytest.approx([math.log(0.4), math.log(0.3), math.log(0.15)])
    normed = run(model, beam=3, max_length=4, length_normalization=1.0)
    # len counts <S> and </S>: log(0.3)/3 = -0.401 beats log(0.4)/2 = -0.458 and log(0.15)/4 = -0.474
    assert [c.tokens for c in normed] == [[S, A, E], [S, E], [S, A, A, E]]
    assert [c.score for c in normed] == pytest.approx([c.logprob / len(c.tokens) for c in normed])
    assert [c.logprob for c in normed] == pytest.approx([math.log(0.3), math.log(0.4), math.log(0.15)])
    squared = run(model, beam=3, max_length=4, length_normalization=2.0)
    assert [c.score for c in squared] == pytest.approx([c.logprob / len(c.tokens) ** 2 for c in squared])
    endless = ProbModel({S: {A: 0.6, B: 0.4}, A: {A: 1.0}, B: {B: 1.0}})
    partial = run(endless, beam=2, max_length=3, length_normalization=1.0)
    assert all(not c.complete and c.score == c.logprob for c in partial)  # partials are never normalised


def test_words_below_1e12_are_never_taken():
    model = ProbModel({S: {A: 1 - 2e-12, B: 1e-13, E: 1.9e-12}, A: {E: 1.0}})
    caps = run(model, beam=3)
    assert [c.tokens for c in caps] == [[S, A, E], [S, E]]  # B (p = 1e-13) is never taken; 1.9e-12 is
    dead = ProbModel({S: {A: 1e-13}})
    assert run(dead, beam=3) == [] and run(dead, beam=1) == []  # like im2txt: nothing to return


def test_complete_pool_keeps_the_best_over_all_steps():
    model = ProbModel({S: {E: 0.1, A: 0.9}, A: {E: 0.5, B: 0.5}, B: {E: 0.9, C: 0.1}, C: {E: 1.0}})
    caps = run(model, beam=2)
    assert [c.tokens for c in caps] == [[S, A, E], [S, A, B, E]]  # 0.45, 0.405 beat 0.1 and 0.045


def test_apply_bans_on_a_known_history():
    logp = np.zeros((1, 6), np.float32)
    history = np.array([[S, A, B, A, B]])
    assert np.isinf(apply_bans(logp, history, no_repeat_ngram=2)).nonzero()[1].tolist() == [A]
    assert np.isinf(apply_bans(logp, history, no_repeat_ngram=3)).nonzero()[1].tolist() == [A]
    assert np.isinf(apply_bans(logp, history, no_repeat_ngram=1)).nonzero()[1].tolist() == [S, A, B]
    assert not np.isinf(apply_bans(logp, history, no_repeat_ngram=4)).any()
    assert np.isinf(apply_bans(logp, history, banned_ids=(U,))).nonzero()[1].tolist() == [U]
    assert not np.isinf(logp).any()  # the input is not modified


def test_no_repeat_ngram_and_suppress_unk():
    model = ProbModel({S: {U: 0.5, A: 0.45, E: 0.05}, A: {A: 0.6, B: 0.3, E: 0.1}, B: {A: 0.7, E: 0.3},
                       U: {U: 0.9, E: 0.1}})
    assert run(model, beam=1, max_length=6)[0].tokens[:3] == [S, U, U]
    opts = dict(beam=2, max_length=8, suppress_unk=True, unk_id=U, no_repeat_ngram=2)
    caps = run(model, **opts)
    for c in caps:
        assert U not in c.tokens
        grams = list(zip(c.tokens, c.tokens[1:], strict=False))
        assert len(grams) == len(set(grams))
    want = reference_beam_search(np.zeros((1, 2)), model.step, start_id=S, end_id=E, beam_size=2,
                                 max_length=8, banned=(U,), no_repeat_ngram=2)
    assert as_tuples([caps]) == want
    assert all(len(set(c.tokens)) == len(c.tokens)
               for c in run(model, beam=2, max_length=8, no_repeat_ngram=1))
    assert run(model, beam=1, max_length=6, suppress_unk=True, unk_id=U)[0].tokens[:3] == [S, A, A]


def test_tensorflow_tensors_work():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(3)
    model = TableModel(make_table(rng, 4, 9, "round", 0.1))
    init = model.initial_state(np.arange(5))

    def tf_step(tokens, state):
        logp, (node, steps) = model.step(tokens, tuple(np.asarray(s) for s in state))
        return tf.constant(logp), (tf.constant(node), tf.constant(steps))

    want = beam_search(init, model.step, start_id=0, end_id=1, max_length=6)
    got = beam_search(tuple(tf.constant(s) for s in init), tf_step, start_id=0, end_id=1, max_length=6)
    assert as_tuples(got) == as_tuples(want)


def test_sampling_is_seeded_and_follows_the_probabilities():
    model = ProbModel({S: {A: 0.6, B: 0.3, C: 0.1}, A: {E: 1.0}, B: {E: 1.0}, C: {E: 1.0}})
    kw = dict(start_id=S, end_id=E, max_length=5, num_samples=3000)
    draws = sample_search(np.zeros((1, 1)), model.step, seed=7, **kw)[0]
    assert as_tuples([draws]) == as_tuples([sample_search(np.zeros((1, 1)), model.step, seed=7, **kw)[0]])
    first = np.array([c.tokens[1] for c in draws])
    assert [np.mean(first == w) for w in (A, B, C)] == pytest.approx([0.6, 0.3, 0.1], abs=0.03)
    assert all(c.logprob == pytest.approx(math.log({A: 0.6, B: 0.3, C: 0.1}[c.tokens[1]])) for c in draws)
    top1 = sample_search(np.zeros((1, 1)), model.step, seed=1, top_k_words=1, **kw)[0]
    assert {tuple(c.tokens) for c in top1} == {(S, A, E)}
    cold = sample_search(np.zeros((1, 1)), model.step, seed=2, temperature=0.05, **kw)[0]
    assert np.mean([c.tokens[1] == A for c in cold]) > 0.99
    other = sample_search(np.zeros((1, 1)), model.step, seed=8, **kw)[0]
    assert as_tuples([other]) != as_tuples([draws])


def test_generate_dispatches_and_bad_options_raise():
    model = ProbModel({S: {A: 0.5, B: 0.4, C: 0.1}, A: {E: 0.3, C: 0.7}, B: {E: 0.9, C: 0.1}, C: {E: 1.0}})
    init = np.zeros((2, 1))
    beam = generate(init, model.step, SearchConfig(beam_size=2), start_id=S, end_id=E)
    assert as_tuples(beam) == as_tuples(beam_search(init, model.step, start_id=S, end_id=E, beam_size=2))
    greedy = generate(init, model.step, SearchConfig(beam_size=1), start_id=S, end_id=E)
    assert as_tuples(greedy) == as_tuples(greedy_search(init, model.step, start_id=S, end_id=E))
    cfg = SearchConfig(sample=True, num_samples=4, seed=5)
    assert SearchConfig.from_dict(cfg.to_dict()) == cfg
    assert all(len(c) == 4 for c in generate(init, model.step, cfg, start_id=S, end_id=E))
    for bad in (dict(beam_size=0), dict(max_length=0), dict(length_normalization=-1.0),
                dict(suppress_unk=True), dict(no_repeat_ngram=-1)):
        with pytest.raises(ValueError):
            beam_search(init, model.step, start_id=S, end_id=E, **bad)
    for bad in (dict(temperature=0.0), dict(num_samples=0), dict(top_k_words=-1)):
        with pytest.raises(ValueError):
            sample_search(init, model.step, start_id=S, end_id=E, **bad)
