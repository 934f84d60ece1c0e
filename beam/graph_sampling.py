"""Caption sampling (and greedy decoding) as one `tf.while_loop`, for use inside a compiled train step
(train-scst draws its captions here, under the step's stateless seed).

Not imported by `beam/__init__.py` (`import beam` stays free of TensorFlow). The model is seen only through
`initial_state` and `step_fn`, as in beam/graph.py. Unlike beam.sample_search (NumPy, for `caption
--sample`), every word is taken as drawn (no 1e-12 floor, no bans, no length normalisation) and the result is
token tensors, not Captions: what a REINFORCE step needs.
"""

from __future__ import annotations

import tensorflow as tf

from beam.graph import _loose_shape


def graph_sample_search(initial_state, step_fn, *, start_id: int, end_id: int, num_samples: int = 1,
                        max_length: int = 16, seed=None) -> tuple[tf.Tensor, tf.Tensor]:
    """Captions drawn inside the graph: sampled at temperature 1 (seed: int [2], stateless; the draw at step
    t uses stateless_fold_in(seed, t)) or greedy (seed None: arg-max, lowest id on ties). Each step runs
    step_fn only on the captions still running (none has ended).

    initial_state: tensor or (nested) tuple/list of tensors, leading dim B (may be unknown).
    step_fn(tokens int32 [M], state with M rows) -> (log_probs float [M, V] natural log, new state of the
    same structure). Returns (tokens int32 [B*K, L]: the words after <S> (K = num_samples, the samples of
    image i in rows i*K..), end_id from a caption's </S> on, L <= max_length - 1 steps; lengths int32 [B*K]:
    tokens up to and including </S>, or L for a caption cut at max_length), both without gradient.
    """
    state = tf.nest.map_structure(tf.convert_to_tensor, initial_state)
    if num_samples > 1:
        state = tf.nest.map_structure(lambda x: tf.repeat(x, num_samples, axis=0), state)
    rows = tf.shape(tf.nest.flatten(state)[0])[0]

    def body(t, prev, state, running, tokens):
        logp, new_state = step_fn(prev, state)
        if seed is None:
            word = tf.argmax(logp, axis=-1, output_type=tf.int32)
        else:
            draw = tf.random.stateless_categorical(logp, 1, tf.random.experimental.stateless_fold_in(seed, t))
            word = tf.cast(draw[:, 0], tf.int32)
        where = tf.stack([running, tf.fill(tf.shape(running), t)], axis=1)
        tokens = tf.tensor_scatter_nd_update(tokens, where, word)
        keep = tf.not_equal(word, end_id)
        new_state = tf.nest.pack_sequence_as(state, tf.nest.flatten(new_state))
        state = tf.nest.map_structure(lambda x: tf.boolean_mask(x, keep), new_state)
        return t + 1, tf.boolean_mask(word, keep), state, tf.boolean_mask(running, keep), tokens

    def cond(t, prev, state, running, tokens):
        return tf.logical_or(t < 1, tf.logical_and(t < max_length - 1, tf.size(running) > 0))

    steps = max(max_length - 1, 1)
    loop = (tf.constant(0), tf.fill([rows], tf.constant(start_id, tf.int32)), state, tf.range(rows),
            tf.fill([rows, steps], tf.constant(end_id, tf.int32)))
    invariants = tf.nest.map_structure(_loose_shape, loop)
    t, _, _, _, tokens = tf.while_loop(cond, body, loop, shape_invariants=invariants,
                                       maximum_iterations=steps)
    tokens = tokens[:, :t]  # [B*K, L]: the steps taken
    ended = tf.equal(tokens, end_id)
    first_end = tf.argmax(tf.cast(ended, tf.int32), axis=1, output_type=tf.int32)
    lengths = tf.where(tf.reduce_any(ended, axis=1), first_end + 1, tf.shape(tokens)[1])
    return tf.stop_gradient(tokens), tf.stop_gradient(lengths)
