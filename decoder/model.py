"""The Show and Tell decoder (im2txt): image projection, word embeddings, one LSTM, logits.

Layer names are fixed (the TF1 importer relies on them):
  `image_embedding` Dense(E, no bias), kernel [D, E];  `seq_embedding` Embedding(V, E), embeddings [V, E];
  `lstm` LSTMCell(U): kernel [E, 4U], recurrent_kernel [U, 4U], bias [4U], Keras gate order (i, f, c, o),
  sigma(f) with no +1 (the forget bias lives in `bias`: Keras' unit_forget_bias gives im2txt's +1 at init);
  `logits` Dense(V), kernel [U, V], bias [V].
The image embedding is the first LSTM input, fed to a zero state; the state after it starts the caption.
Training applies dropout (keep 0.7) to every LSTM input and output and computes logits only for real
(unpadded) positions. This file imports no data code.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from decoder.config import ModelConfig


@tf.custom_gradient
def lstm_sequence(xw, recurrent_kernel):
    """The Keras-LSTMCell recurrence over a sequence from a zero state, with a fused backward pass.

    xw: [T, B, 4U] = x @ kernel + bias per step; recurrent_kernel: [U, 4U]. Returns h: [T, B, U].
    The backward pass computes the per-step gate gradients dz in a reverse scan and then the recurrent
    kernel's gradient as ONE [U, T*B] @ [T*B, 4U] matmul (autodiff would accumulate a [U, 4U] matmul + add
    per step), so nearly all training FLOPs run in large matmuls.
    """
    rk = recurrent_kernel
    zeros = tf.zeros_like(xw[0, :, : tf.shape(rk)[0]])  # [B, U]

    def forward(carry, xw_t):
        h, c = carry[0], carry[1]
        i, f, g, o = tf.split(xw_t + tf.matmul(h, rk), 4, axis=-1)
        i, f, g, o = tf.sigmoid(i), tf.sigmoid(f), tf.tanh(g), tf.sigmoid(o)
        c = f * c + i * g
        return tf.tanh(c) * o, c, i, f, g, o

    h, c, i, f, g, o = tf.scan(forward, xw, initializer=(zeros,) * 6)

    def grad(dh_out):
        c_prev = tf.concat([zeros[None], c[:-1]], 0)
        h_prev = tf.concat([zeros[None], h[:-1]], 0)
        tanh_c = tf.tanh(c)
        rk_t = tf.transpose(rk)  # [4U, U] once: a plain matmul per step is ~2x faster than transpose_b

        def backward(carry, step):
            dh_next, dc_next = carry[0], carry[1]
            dh_t, i_t, f_t, g_t, o_t, tc_t, cp_t = step
            dh = dh_t + dh_next
            dc = dc_next + dh * o_t * (1 - tc_t * tc_t)
            dz = tf.concat([dc * g_t * i_t * (1 - i_t), dc * cp_t * f_t * (1 - f_t),
                            dc * i_t * (1 - g_t * g_t), dh * tc_t * o_t * (1 - o_t)], -1)
            return tf.matmul(dz, rk_t), dc * f_t, dz

        zeros4 = tf.zeros_like(xw[0])
        _, _, dz = tf.scan(backward, (dh_out, i, f, g, o, tanh_c, c_prev), initializer=(zeros, zeros, zeros4),
                           reverse=True)
        units = tf.shape(rk)[0]
        d_rk = tf.matmul(tf.reshape(h_prev, [-1, units]), tf.reshape(dz, [-1, 4 * units]), transpose_a=True)
        return dz, d_rk

    return h, grad


@tf.custom_gradient
def sparse_cross_entropy(logits, labels):
    """Per-row softmax cross-entropy, as tf.nn.sparse_softmax_cross_entropy_with_logits (same values to
    float rounding) but ~2x faster on CPU: TF's fused kernel runs single-threaded Eigen, while oneDNN's
    softmax is vectorised and multi-threaded.

    logits: float32 [N, V]; labels: int32 [N]. Returns float32 [N] = logsumexp(logits) - logits[label],
    computed as (max - logits[label]) - log(max softmax) (no underflow: the largest probability is >= 1/V).
    Gradient w.r.t. logits: (softmax - one_hot(label)) * upstream.
    """
    probs = tf.nn.softmax(logits)
    top = tf.reduce_max(logits, -1)
    loss = (top - tf.gather(logits, labels, batch_dims=1)) - tf.math.log(tf.reduce_max(probs, -1))

    def grad(upstream):
        one_hot = tf.one_hot(labels, tf.shape(logits)[1], dtype=logits.dtype)
        return (probs - one_hot) * upstream[:, None], None

    return loss, grad


class ShowAndTell(keras.Model):
    """The decoder. Inference API: `initial_state(features)` and `step(tokens, state)` (tf.functions)."""

    def __init__(self, config: ModelConfig, seed: int | None = None, **kwargs):
        super().__init__(name="show_and_tell", **kwargs)
        self.config = config
        s = config.init_scale

        def init(k):
            return keras.initializers.RandomUniform(-s, s, seed=None if seed is None else seed * 7 + k)

        self.image_embedding = keras.layers.Dense(config.embedding_size, use_bias=False,
                                                  kernel_initializer=init(1), name="image_embedding")
        self.seq_embedding = keras.layers.Embedding(config.vocab_size, config.embedding_size,
                                                    embeddings_initializer=init(2), name="seq_embedding")
        self.lstm = keras.layers.LSTMCell(config.lstm_units, kernel_initializer=init(3),
                                          recurrent_initializer=init(4), bias_initializer="zeros",
                                          unit_forget_bias=True, name="lstm")
        self.logits = keras.layers.Dense(config.vocab_size, kernel_initializer=init(5),
                                         bias_initializer="zeros", name="logits")
        # Per-dimension feature standardisation (identity unless config.feature_norm == "standardize"):
        # non-trainable, saved with the weights, set by `set_feature_stats`.
        self.feature_mean = self.add_weight(shape=(config.feature_dim,), initializer="zeros", trainable=False,
                                            name="feature_mean")
        self.feature_inv_std = self.add_weight(shape=(config.feature_dim,), initializer="ones",
                                               trainable=False, name="feature_inv_std")
        self.image_embedding.build((None, config.feature_dim))
        self.seq_embedding.build((None,))
        self.lstm.build((None, config.embedding_size))
        self.logits.build((None, config.lstm_units))
        self.built = True
        units = config.lstm_units
        state_spec = (tf.TensorSpec([None, units], tf.float32), tf.TensorSpec([None, units], tf.float32))
        self._initial_state_fn = tf.function(
            self._initial_state_impl, input_signature=[tf.TensorSpec([None, config.feature_dim], tf.float32)],
            reduce_retracing=True)
        self._step_fn = tf.function(
            self._step_impl, input_signature=[tf.TensorSpec([None], tf.int32), state_spec],
            reduce_retracing=True)

    # ---- one LSTM step, for the inference API (training and `call` run `lstm_sequence` instead) ---------
    def _cell(self, xw, h, c):
        """One LSTM step of `initial_state` / `step`. xw: [B, 4U] = x @ kernel + bias (compute dtype); h, c:
        [B, U]. The same gates as `lstm_sequence`, which training and `call` use."""
        kernel_dtype = xw.dtype
        z = xw + tf.matmul(h, tf.cast(self.lstm.recurrent_kernel, kernel_dtype))
        i, f, g, o = tf.split(z, 4, axis=-1)
        c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
        h = tf.sigmoid(o) * tf.tanh(c)
        return h, c

    def _project(self, x):
        """x: [..., E] -> x @ kernel + bias: [..., 4U], in x's dtype."""
        w = tf.cast(self.lstm.kernel, x.dtype)
        b = tf.cast(self.lstm.bias, x.dtype)
        return tf.tensordot(x, w, axes=1) + b

    def set_feature_stats(self, mean, inv_std) -> None:
        """Set the feature standardisation: mean, inv_std float [D]; inputs become (f - mean) * inv_std."""
        self.feature_mean.assign(tf.cast(mean, self.feature_mean.dtype))
        self.feature_inv_std.assign(tf.cast(inv_std, self.feature_inv_std.dtype))

    def _normalize(self, features):
        """features: float [B, D] -> float32 [B, D], standardised with the stored statistics."""
        f = tf.cast(features, tf.float32)
        return (f - tf.cast(self.feature_mean, tf.float32)) * tf.cast(self.feature_inv_std, tf.float32)

    # ---- inference API ---------------------------------------------------------------------------
    def _initial_state_impl(self, features):
        x = tf.matmul(self._normalize(features), tf.cast(self.image_embedding.kernel, tf.float32))
        zeros = tf.zeros([tf.shape(features)[0], self.config.lstm_units], tf.float32)
        return self._cell(self._project(x), zeros, zeros)

    def _step_impl(self, tokens, state):
        h, c = state
        x = tf.gather(tf.cast(self.seq_embedding.embeddings, tf.float32), tokens)
        h, c = self._cell(self._project(x), h, c)
        logits = tf.matmul(h, tf.cast(self.logits.kernel, tf.float32)) + tf.cast(self.logits.bias, tf.float32)
        return tf.nn.log_softmax(logits), (h, c)

    def initial_state(self, features):
        """features: float [B, D] (any float dtype) -> state (h, c), each float32 [B, U] (tf.Tensor)."""
        return self._initial_state_fn(tf.cast(tf.convert_to_tensor(features), tf.float32))

    def step(self, tokens, state):
        """tokens: int [N]; state: (h, c) float32 [N, U] -> (log_probs float32 [N, V], new state)."""
        h, c = state
        return self._step_fn(tf.cast(tf.convert_to_tensor(tokens), tf.int32),
                             (tf.convert_to_tensor(h, tf.float32), tf.convert_to_tensor(c, tf.float32)))

    # ---- training ------------------------------------------------------------------------------------
    def _run_lstm(self, features, input_seqs, training, seed):
        """Teacher-forced LSTM outputs: [B, T, U] (compute dtype), one per input word."""
        dtype = self.compute_dtype
        img = tf.matmul(tf.cast(self._normalize(features), dtype),
                        tf.cast(self.image_embedding.kernel, dtype))  # [B, E]
        words = tf.gather(tf.cast(self.seq_embedding.embeddings, dtype), input_seqs)  # [B, T, E]
        x = tf.concat([img[:, None, :], words], axis=1)  # [B, T+1, E]
        if training:
            x = tf.nn.experimental.stateless_dropout(x, 1.0 - self.config.dropout_keep, seed=seed)
        xw = tf.transpose(self._project(x), [1, 0, 2])  # [T+1, B, 4U], time-major, one big matmul
        outputs = lstm_sequence(xw, tf.cast(self.lstm.recurrent_kernel, dtype))
        return tf.transpose(outputs[1:], [1, 0, 2])  # [B, T, U]; the image step's output is not used

    def loss_sums(self, features, input_seqs, target_seqs, mask, training=False, seed=None):
        """Summed cross-entropy over real target words, and their count.

        features: float [B, D]; input_seqs, target_seqs: int32 [B, T]; mask: [B, T] (1 real, 0 padding);
        seed: int32 [2] for the stateless dropout (required when training). Returns (float32 [], float32 []).
        Logits are computed only at real positions (padding costs no [*, V] work).
        """
        outputs = self._run_lstm(features, input_seqs, training, seed)
        real = tf.cast(mask, tf.bool)
        h = tf.boolean_mask(outputs, real)  # [N, U]
        targets = tf.boolean_mask(target_seqs, real)  # [N]
        if training:
            h = tf.nn.experimental.stateless_dropout(h, 1.0 - self.config.dropout_keep, seed=seed + 1)
        dtype = h.dtype
        logits = tf.matmul(h, tf.cast(self.logits.kernel, dtype)) + tf.cast(self.logits.bias, dtype)
        ce = sparse_cross_entropy(tf.cast(logits, tf.float32), targets)
        return tf.reduce_sum(ce), tf.cast(tf.shape(targets)[0], tf.float32)

    def call(self, inputs, training=False):
        """Teacher-forced logits. inputs: (features [B, D], input_seqs int32 [B, T]) -> float32 [B, T, V]."""
        features, input_seqs = inputs
        outputs = self._run_lstm(features, input_seqs, False, None)
        return tf.cast(self.logits(outputs), tf.float32)


def build_decoder(config: ModelConfig, seed: int | None = None) -> ShowAndTell:
    """A ShowAndTell decoder with its weights created (uniform +-init_scale; seeded when `seed` is given)."""
    return ShowAndTell(config, seed=seed)
