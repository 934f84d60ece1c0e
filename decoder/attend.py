"""Show, Attend and Tell (Xu et al. 2015): deterministic soft attention over the CNN's grid (`--arch attend`).

The same contract as decoder.model.ShowAndTell, so the training loop, checkpoints, resume and the searches
serve it unchanged: `initial_state(grid)`, `step(tokens, state)`, `loss_sums(...)`, plus `attention_maps`
(the weights of given captions, for heat-maps). With a = the grid's L = h*w cells, a_i float [D]:

  e_i   = a_i W_enc                                    (cell embedding, [E]; `encode`)
  k_i   = e_i W_k                                      (attention keys, [A]; `att_keys`)
  h_0 = c_0 = 0                                        (`initial_state` "zero", the default, as
                                                        self-critical.pytorch's Att2in: all the image
                                                        reaches the LSTM through the attention), or
  h_0   = tanh(mean_i e_i W_h + b_h),  c_0 = tanh(mean_i e_i W_c + b_c)      ("mean", the paper's;
                                                        `init_h`, `init_c`)
  per word t (x_t = embedding of the previous word):
  s_ti  = w_s . tanh(k_i + h_{t-1} W_q + b_q)          (MLP score of each cell from the LSTM state)
  alpha_t = softmax_i(s_t / tau)                       ([L], rows sum to 1; tau = `temperature`)
  beta_t  = sigmoid(h_{t-1} W_beta + b_beta)           (gating scalar)
  z_t   = beta_t * sum_i alpha_ti e_i                  (context, [E])
  h_t, c_t = LSTM([x_t, z_t], h_{t-1}, c_{t-1})         (Keras gates i, f, c, o; input width 2E)
  p(w_t) = softmax(h_t W_o + b_o)                      ([h_t ; z_t] W_o + b_o with `deep_output`)
Loss: cross-entropy over real words + (training only) the doubly stochastic penalty
lambda * sum_i (1 - sum_t alpha_ti)^2 per caption (`attention_penalty`, the paper's lambda = 1). Dropout
(keep `dropout_keep`) on the word inputs and the LSTM outputs while training. Grids are standardised per
dimension like the pooled features (`feature_norm`). This file imports no data code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import keras
import tensorflow as tf

from base.errors import InputError
from decoder.config import FEATURE_NORMS, config_from_dict
from decoder.model import sparse_cross_entropy

ARCH = "attend"
INITIAL_STATES = ("zero", "mean")


@dataclass
class AttendConfig:
    """The attention decoder's shape (saved as the model dir's config.json "model" block, with "arch")."""

    vocab_size: int  # number of word ids, including <S>, </S> and <UNK>
    grid_shape: list = field(default_factory=lambda: [8, 8])  # [h, w] of the CNN grid (8x8 at 299 px)
    embedding_size: int = 512  # E: word embeddings and grid-cell embeddings
    lstm_units: int = 512  # U: LSTM state size
    attention_units: int = 512  # A: width of the attention MLP
    feature_dim: int = 2048  # D: channels of a grid cell
    dropout_keep: float = 0.7  # keep probability of the dropout on word inputs and LSTM outputs (training)
    init_scale: float = 0.08  # every weight is initialised uniform in [-init_scale, init_scale]
    feature_norm: str = "none"  # "none" or "standardize" (per-channel, from the training grids)
    attention_penalty: float = 1.0  # lambda of the doubly stochastic penalty (0: none)
    deep_output: bool = False  # the logits also read the context z_t (the paper's deep output; docs)
    initial_state: str = "zero"  # "zero": h0 = c0 = 0 (Att2in); "mean": from the mean cell (the paper's)
    temperature: float = 1.0  # tau of softmax(s / tau): below 1 sharpens the attention weights

    def __post_init__(self):
        if self.feature_norm not in FEATURE_NORMS:
            raise InputError(f"Unknown feature normalisation {self.feature_norm!r}: use one of "
                             f"{', '.join(FEATURE_NORMS)}.")
        if self.initial_state not in INITIAL_STATES:
            raise InputError(f"Unknown attention initial state {self.initial_state!r}: use one of "
                             f"{', '.join(INITIAL_STATES)}.")
        if not 0 < self.temperature < float("inf"):
            raise InputError(f"attention temperature {self.temperature} must be a positive number.")
        self.grid_shape = [int(g) for g in self.grid_shape]

    @property
    def cells(self) -> int:
        """L = h * w grid cells."""
        return self.grid_shape[0] * self.grid_shape[1]

    def to_dict(self) -> dict:
        """JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AttendConfig:
        """Inverse of `to_dict`; InputError on unknown keys. A config written before `initial_state`
        existed had the mean-cell start."""
        return config_from_dict(cls, {"initial_state": "mean", **data}, "The attention model config")


class ShowAttendTell(keras.Model):
    """The attention decoder. Inference API: `initial_state(grid)`, `step(tokens, state)` with state
    (h [N, U], c [N, U], cells [N, L, E], keys [N, L, A]) — the per-image memory rides in the state, so a
    search reorders it with the beams — and `attention_maps(grid, tokens)`."""

    def __init__(self, config: AttendConfig, seed: int | None = None, **kwargs):
        super().__init__(name="show_attend_tell", **kwargs)
        self.config = config
        s, e, u, a = config.init_scale, config.embedding_size, config.lstm_units, config.attention_units

        def dense(units, k, bias=True, name=None):
            init = keras.initializers.RandomUniform(-s, s, seed=None if seed is None else seed * 11 + k)
            return keras.layers.Dense(units, use_bias=bias, kernel_initializer=init, name=name)

        self.encode, self.att_keys = dense(e, 1, False, "encode"), dense(a, 2, False, "att_keys")
        self.att_query, self.att_score = dense(a, 3, name="att_query"), dense(1, 4, False, "att_score")
        self.gate, self.logits = dense(1, 5, name="gate"), dense(config.vocab_size, 6, name="logits")
        mean_start = config.initial_state == "mean"  # "zero" has no start layers (nothing to train)
        self.init_h, self.init_c = (dense(u, 7, name="init_h"), dense(u, 8, name="init_c")) if mean_start \
            else (None, None)
        init = keras.initializers.RandomUniform(-s, s, seed=None if seed is None else seed * 11 + 9)
        self.seq_embedding = keras.layers.Embedding(config.vocab_size, e, embeddings_initializer=init,
                                                    name="seq_embedding")
        init = keras.initializers.RandomUniform(-s, s, seed=None if seed is None else seed * 11 + 10)
        self.lstm = keras.layers.LSTMCell(u, kernel_initializer=init, recurrent_initializer=init,
                                          unit_forget_bias=True, name="lstm")
        d = config.feature_dim
        self.feature_mean = self.add_weight(shape=(d,), initializer="zeros", trainable=False,
                                            name="feature_mean")
        self.feature_inv_std = self.add_weight(shape=(d,), initializer="ones", trainable=False,
                                               name="feature_inv_std")
        for layer, width in ((self.encode, d), (self.att_keys, e), (self.att_query, u), (self.att_score, a),
                             (self.gate, u), (self.logits, u + (e if config.deep_output else 0)),
                             (self.init_h, e), (self.init_c, e),
                             (self.lstm, 2 * e)):
            if layer is not None:
                layer.build((None, width))
        self.seq_embedding.build((None,))
        self.built = True
        state = (tf.TensorSpec([None, u], tf.float32), tf.TensorSpec([None, u], tf.float32),
                 tf.TensorSpec([None, config.cells, e], tf.float32),
                 tf.TensorSpec([None, config.cells, a], tf.float32))
        grid = tf.TensorSpec([None, config.cells, d], tf.float32)
        self._initial_state_fn = tf.function(self._initial_state_impl, input_signature=[grid],
                                             reduce_retracing=True)
        self._step_fn = tf.function(self._step_impl, input_signature=[tf.TensorSpec([None], tf.int32), state],
                                    reduce_retracing=True)
        self._maps_fn = tf.function(lambda g, t: self._unroll(g, t, False, None)[1],
                                    input_signature=[grid, tf.TensorSpec([None, None], tf.int32)],
                                    reduce_retracing=True)

    @property
    def feature_shape(self) -> tuple[int, int]:
        """The input of one image: (L, D) grid cells (the pooled decoder's is (D,))."""
        return self.config.cells, self.config.feature_dim

    def set_feature_stats(self, mean, inv_std) -> None:
        """Set the per-channel standardisation: mean, inv_std float [D]; cells become (a - mean) * inv_std."""
        self.feature_mean.assign(tf.cast(mean, self.feature_mean.dtype))
        self.feature_inv_std.assign(tf.cast(inv_std, self.feature_inv_std.dtype))

    # ---- the pieces (dtype: the compute dtype of the call) -------------------------------------------
    def _w(self, var, dtype):
        return tf.cast(var, dtype)

    def _memory(self, grid, dtype):
        """grid float [B, L, D] -> (cells [B, L, E], keys [B, L, A]) in `dtype`."""
        g = (tf.cast(grid, tf.float32) - tf.cast(self.feature_mean, tf.float32)) \
            * tf.cast(self.feature_inv_std, tf.float32)
        cells = tf.tensordot(tf.cast(g, dtype), self._w(self.encode.kernel, dtype), axes=1)
        return cells, tf.tensordot(cells, self._w(self.att_keys.kernel, dtype), axes=1)

    def _dense(self, layer, x):
        y = tf.tensordot(x, self._w(layer.kernel, x.dtype), axes=1)
        return y + self._w(layer.bias, x.dtype) if layer.use_bias else y

    def _start(self, cells):
        """cells [B, L, E] -> (h0, c0) [B, U] (zeros, or from the mean cell: `initial_state`)."""
        if self.init_h is None:
            zeros = tf.zeros([tf.shape(cells)[0], self.config.lstm_units], cells.dtype)
            return zeros, zeros
        mean = tf.reduce_mean(cells, axis=1)
        return tf.tanh(self._dense(self.init_h, mean)), tf.tanh(self._dense(self.init_c, mean))

    def _attend(self, h, cells, keys):
        """h [B, U] -> (alpha float32 [B, L], gated context [B, E])."""
        q = self._dense(self.att_query, h)  # [B, A]
        scores = tf.tensordot(tf.tanh(keys + q[:, None, :]), self._w(self.att_score.kernel, h.dtype), axes=1)
        alpha = tf.nn.softmax(tf.cast(scores[..., 0], tf.float32) / self.config.temperature, axis=-1)
        context = tf.reduce_sum(tf.cast(alpha, h.dtype)[..., None] * cells, axis=1)
        return alpha, tf.sigmoid(self._dense(self.gate, h)) * context

    def _word_inputs(self, tokens, dtype):
        """tokens int [...] -> x @ kernel[:E] + bias: [..., 4U] (the word's share of the LSTM input)."""
        e = self.config.embedding_size
        x = tf.gather(self._w(self.seq_embedding.embeddings, dtype), tokens)
        return x, self._w(self.lstm.kernel[:e], dtype), self._w(self.lstm.bias, dtype)

    def _cell(self, xw, context, h, c):
        """One LSTM step: xw [B, 4U] (word part incl. bias), context [B, E] -> (h, c) [B, U]."""
        e, dtype = self.config.embedding_size, xw.dtype
        z = xw + tf.matmul(context, self._w(self.lstm.kernel[e:], dtype)) \
            + tf.matmul(h, self._w(self.lstm.recurrent_kernel, dtype))
        i, f, g, o = tf.split(z, 4, axis=-1)
        c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
        return tf.sigmoid(o) * tf.tanh(c), c

    # ---- inference API ------------------------------------------------------------------------------
    def _initial_state_impl(self, grid):
        cells, keys = self._memory(grid, tf.float32)
        h, c = self._start(cells)
        return h, c, cells, keys

    def _step_impl(self, tokens, state):
        h, c, cells, keys = state
        _, context = self._attend(h, cells, keys)
        x, kernel, bias = self._word_inputs(tokens, tf.float32)
        h, c = self._cell(tf.matmul(x, kernel) + bias, context, h, c)
        return tf.nn.log_softmax(self._dense(self.logits, self._output(h, context))), (h, c, cells, keys)

    def _output(self, h, context):
        """What the logits read: [h ; z] (deep output) or h."""
        return tf.concat([h, context], -1) if self.config.deep_output else h

    def initial_state(self, features):
        """features: float [B, L, D] grid cells -> state (h, c float32 [B, U], cells [B, L, E], keys
        [B, L, A])."""
        return self._initial_state_fn(tf.cast(tf.convert_to_tensor(features), tf.float32))

    def step(self, tokens, state):
        """tokens int [N]; state with N rows -> (log_probs float32 [N, V], new state)."""
        return self._step_fn(tf.cast(tf.convert_to_tensor(tokens), tf.int32),
                             tuple(tf.convert_to_tensor(s, tf.float32) for s in state))

    def attention_maps(self, features, input_seqs):
        """The attention weights while each word is emitted: features float [B, L, D]; input_seqs int32
        [B, T] (<S> w1 ... w_{T-1}) -> float32 [B, T, L], row t = the weights used to emit word t+1 (each
        row sums to 1). Equal to what `step` computes along the same words."""
        return self.attention_weights(features, input_seqs).numpy()

    def attention_weights(self, features, input_seqs):
        """`attention_maps` as a tensor (TF ops: usable inside a traced graph, e.g. the export)."""
        return self._maps_fn(tf.cast(tf.convert_to_tensor(features), tf.float32),
                             tf.cast(tf.convert_to_tensor(input_seqs), tf.int32))

    # ---- training -------------------------------------------------------------------------------------
    def _unroll(self, grid, input_seqs, training, seed):
        """Teacher-forced pass: (what the logits read [B, T, U (+E)], compute dtype; alpha float32
        [B, T, L])."""
        dtype = self.compute_dtype
        cells, keys = self._memory(grid, dtype)
        h, c = self._start(cells)
        x, kernel, bias = self._word_inputs(input_seqs, dtype)  # [B, T, E]
        if training:
            x = tf.nn.experimental.stateless_dropout(x, 1.0 - self.config.dropout_keep, seed=seed)
        xw = tf.transpose(tf.tensordot(x, kernel, axes=1) + bias, [1, 0, 2])  # [T, B, 4U], one matmul

        def body(carry, xw_t):
            alpha, context = self._attend(carry[0], cells, keys)
            h, c = self._cell(xw_t, context, carry[0], carry[1])
            return h, c, alpha, self._output(h, context)

        zeros = tf.zeros(tf.shape(cells)[:2], tf.float32)
        width = self.config.lstm_units + (self.config.embedding_size if self.config.deep_output else 0)
        out0 = tf.zeros([tf.shape(h)[0], width], h.dtype)
        _, _, alphas, outputs = tf.scan(body, xw, initializer=(h, c, zeros, out0))
        return tf.transpose(outputs, [1, 0, 2]), tf.transpose(alphas, [1, 0, 2])

    def loss_sums(self, features, input_seqs, target_seqs, mask, training=False, seed=None):
        """(summed cross-entropy over real target words [+ the attention penalty when training], their
        count), float32 []. features float [B, L, D]; input_seqs, target_seqs int32 [B, T]; mask [B, T];
        seed int32 [2] (training)."""
        outputs, alphas = self._unroll(features, input_seqs, training, seed)
        real = tf.cast(mask, tf.bool)
        h = tf.boolean_mask(outputs, real)
        targets = tf.boolean_mask(target_seqs, real)
        if training:
            h = tf.nn.experimental.stateless_dropout(h, 1.0 - self.config.dropout_keep, seed=seed + 1)
        total = tf.reduce_sum(sparse_cross_entropy(tf.cast(self._dense(self.logits, h), tf.float32), targets))
        if training and self.config.attention_penalty > 0:
            coverage = tf.reduce_sum(alphas * tf.cast(mask, tf.float32)[..., None], axis=1)  # [B, L]
            total += self.config.attention_penalty * tf.reduce_sum(tf.square(1.0 - coverage))
        return total, tf.cast(tf.shape(targets)[0], tf.float32)

    def call(self, inputs, training=False):
        """Teacher-forced logits: (grid [B, L, D], input_seqs int32 [B, T]) -> float32 [B, T, V]."""
        outputs, _ = self._unroll(inputs[0], inputs[1], False, None)
        return tf.cast(self._dense(self.logits, outputs), tf.float32)


def build_attend(config: AttendConfig, seed: int | None = None) -> ShowAttendTell:
    """A ShowAttendTell decoder, its weights created (uniform +-init_scale; seeded when `seed` is given)."""
    return ShowAttendTell(config, seed=seed)
