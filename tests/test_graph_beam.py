"""beam/graph.py: the tf.while_loop beam search equals beam.beam_search (and the per-image reference)."""

import functools
import math

import numpy as np
import pytest
from beam_reference import as_tuples, make_table, reference_beam_search
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

tf = pytest.importorskip("tensorflow")

from beam import beam_search  # noqa: E402
from beam.graph import captions_from_graph, graph_beam_search  # noqa: E402

S, E, A, B, C = 0, 1, 2, 3, 4  # <S>, </S>, a, b, c


def np_step(table: np.ndarray):
    """A fake model: state (node int64 [N], steps float32 [N, 1]); the log-probs are the table row picked by
    a hash of the caption so far and the step count (integer arithmetic, so NumPy and TF agree exactly)."""
    def step(tokens, state):
        node, steps = (np.asarray(s) for s in state)
        node = (node * 31 + np.asarray(tokens).astype(np.int64) * 7 + 1) % 1009
        row = (node + steps[:, 0].astype(np.int64)) % len(table)
        return table[row], (node, steps + 1)
    return step


def tf_step(table):
    """np_step in TF ops (table: float32 tensor [R, V])."""
    def step(tokens, state):
        node, steps = state
        node = (node * 31 + tf.cast(tokens, tf.int64) * 7 + 1) % 1009
        row = (node + tf.cast(steps[:, 0], tf.int64)) % tf.cast(tf.shape(table)[0], tf.int64)
        return tf.gather(table, row), (node, steps + 1)
    return step


def initial_state(images: np.ndarray):
    node = np.asarray(images, np.int64) * 7 + 3
    return node, np.zeros((node.size, 1), np.float32)


@functools.cache
def compiled(beam: int, max_length: int, alpha: float):
    """graph_beam_search in a tf.function with an unknown batch size and vocabulary (traced once)."""
    spec = [tf.TensorSpec([None], tf.int64), tf.TensorSpec([None, 1], tf.float32),
            tf.TensorSpec([None, None], tf.float32)]

    @tf.function(input_signature=spec)
    def run(node, steps, table):
        return graph_beam_search((node, steps), tf_step(table), start_id=S, end_id=E, beam_size=beam,
                                 max_length=max_length, length_normalization=alpha)
    return run


def graph_captions(out) -> list:
    out = {k: v.numpy() for k, v in out.items()}
    return [captions_from_graph(out, i) for i in range(out["lengths"].shape[0])]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), images=st.integers(1, 4), vocab=st.integers(2, 8), rows=st.integers(1, 5),
       beam=st.integers(1, 4), max_length=st.integers(1, 6), alpha=st.sampled_from([0.0, 0.5, 1.0]),
       quantize=st.sampled_from(["none", "round", "dyadic"]), tiny=st.sampled_from([0, 0.3]),
       no_end=st.booleans(), nan=st.booleans())
def test_graph_equals_numpy_beam_search(seed, images, vocab, rows, beam, max_length, alpha, quantize, tiny,
                                        no_end, nan):
    rng = np.random.default_rng(seed)
    table = make_table(rng, rows, vocab, quantize, tiny, E if no_end else None, nan)
    init = initial_state(rng.integers(0, 50, images))
    want = beam_search(init, np_step(table), start_id=S, end_id=E, beam_size=beam, max_length=max_length,
                       length_normalization=alpha)
    out = compiled(beam, max_length, alpha)(*init, table)
    assert as_tuples(graph_captions(out)) == as_tuples(want)  # exact: float64 accumulation in both
    assert as_tuples(want) == reference_beam_search(init, np_step(table), start_id=S, end_id=E,
                                                    beam_size=beam, max_length=max_length, alpha=alpha)
    assert out["tokens"].shape == (images, beam, max_length) and out["tokens"].dtype == tf.int32


def test_empty_batch_keeps_the_shapes():
    node, steps = initial_state(np.zeros([0]))
    out = compiled(3, 5, 0.0)(node, steps, np.zeros([2, 6], np.float32))
    assert out["tokens"].shape == (0, 3, 5) and out["lengths"].shape == (0, 3)
    assert out["log_probs"].shape == out["scores"].shape == out["complete"].shape == (0, 3)


def prob_model(probs: dict, vocab: int = 6):
    """Hand-set probabilities by previous word (probs[last] is word -> p, rest 0); NumPy and TF steps."""
    table = np.full((vocab, vocab), -np.inf, np.float32)
    for last, dist in probs.items():
        for w, p in dist.items():
            table[last, w] = math.log(p)
    tf_table = tf.constant(table)
    return (lambda tok, st: (table[np.asarray(tok)], st)), (lambda tok, st: (tf.gather(tf_table, tok), st))


@pytest.mark.parametrize("beam", [1, 2, 3, 7])
@pytest.mark.parametrize("probs,max_length", [
    ({S: {A: 0.5, B: 0.4, C: 0.1}, A: {E: 0.3, C: 0.7}, B: {E: 0.9, C: 0.1}, C: {E: 1.0}}, 20),
    ({S: {A: 0.6, B: 0.4}, A: {A: 0.5, B: 0.5}, B: {A: 0.5, B: 0.5}}, 4),  # never ends: partials
    ({S: {A: 1 - 2e-12, B: 1e-13, E: 1.9e-12}, A: {E: 1.0}}, 20),  # B (p = 1e-13) is never taken
    ({S: {A: 1e-13}}, 20),  # nothing at all
    ({S: {A: 0.6, B: 0.4}}, 1),  # max_length 1: the partial <S>
    ({S: {A: 0.5, E: 0.25, B: 0.25}, A: {E: 0.5, A: 0.5}, B: {E: 1.0}}, 20),  # exact ties in the pool
])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_eager_static_vocab_matches(probs, max_length, beam, alpha):
    np_fn, tf_fn = prob_model(probs)
    init = np.zeros((2, 3), np.float32)
    out = graph_beam_search(tf.constant(init), tf_fn, start_id=S, end_id=E, beam_size=beam,
                            max_length=max_length, length_normalization=alpha)
    want = beam_search(init, np_fn, start_id=S, end_id=E, beam_size=beam, max_length=max_length,
                       length_normalization=alpha)
    assert as_tuples(graph_captions(out)) == as_tuples(want)
    lengths = out["lengths"].numpy()
    assert (out["tokens"].numpy()[np.arange(max_length) >= lengths[..., None]] == 0).all()  # padding is 0
    assert np.isneginf(out["log_probs"].numpy()[lengths == 0]).all()


def test_top_k_ties_go_to_the_lower_index():
    rng = np.random.default_rng(0)
    for vocab in (3, 9, 40, 300):
        x = np.round(rng.normal(size=(20, vocab))).astype(np.float32)
        x[rng.random(x.shape) < 0.2] = -np.inf
        for k in (1, 2, 3, 5, vocab):
            k = min(k, vocab)
            _, ids = tf.math.top_k(x, k)
            np.testing.assert_array_equal(ids.numpy(), np.argsort(-x, axis=1, kind="stable")[:, :k])
