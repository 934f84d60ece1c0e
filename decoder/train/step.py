"""How one training step works: the `Trainable` (what is trained and its loss) and the compiled `TrainStep`
(gradients, all-reduce, clip, loss scaling, optimizer update), plus `perplexity` (the no-dropout validation
pass that the loop, `evaluate` and the benchmarks share).

A `Trainable` names the Keras objects to checkpoint and defines `loss_sums(batch, training, seed) ->
(summed per-word loss float32 [], real words float32 [])`; the step divides by the batch's `global_words`.
train-decoder (DecoderTrainable), finetune (CNN + decoder) and train-scst (sampled captions weighted by their
advantage) differ only there.
"""

from __future__ import annotations

import math

import tensorflow as tf

from data.pipeline import eval_plan
from decoder.train.config import TrainConfig
from decoder.train.optim import make_optimizer, staircase_lr

LOSS_SCALE_PERIOD = 2000  # mixed_float16: the loss scale doubles after this many finite steps in a row


class Trainable:
    """What the loop trains. `objects`: {name: keras model} checkpointed together; "decoder" (the
    decoder.model.ShowAndTell, reached as `.decoder`) is always one of them."""

    def __init__(self, objects: dict):
        self.objects = dict(objects)
        self._eval = None

    @property
    def decoder(self):
        """The decoder being trained (objects["decoder"]): what the model dir's decoder weights are."""
        return self.objects["decoder"]

    @property
    def variables(self) -> list:
        """The trainable variables of every object, in a fixed order."""
        return [v for obj in self.objects.values() for v in obj.trainable_variables]

    def loss_sums(self, batch: dict, training: bool, seed):
        """(sum of the per-word loss over real words float32 [], number of real words float32 [])."""
        raise NotImplementedError

    def live_metrics(self) -> dict:
        """{name: float} the progress bar shows after each step (e.g. SCST's mean reward); {} by default."""
        return {}

    def eval_sums(self, batch: dict, spec: dict):
        """loss_sums without dropout, traced once for batches of `spec`."""
        if self._eval is None:
            self._eval = tf.function(lambda b: self.loss_sums(b, False, None), input_signature=[spec])
        return self._eval(batch)


class DecoderTrainable(Trainable):
    """The decoder alone, trained from cached features (batch["features"] float32 [b, D])."""

    def __init__(self, decoder):
        super().__init__({"decoder": decoder})

    def loss_sums(self, batch, training, seed):
        return self.decoder.loss_sums(batch["features"], batch["input_seqs"], batch["target_seqs"],
                                      batch["mask"], training=training, seed=seed)


def perplexity(trainable: Trainable, source, batch_size: int, max_pairs: int | None = None
               ) -> tuple[float, float]:
    """(perplexity, real target words) of `trainable` on `source`'s pairs: exp(total CE / words), no dropout.

    source: a batch source (data.pipeline.PairBatches or a subclass); the first `max_pairs` pairs (None: all)
    are batched by length (eval_plan)."""
    lengths = source.pairs.lengths[:max_pairs] if max_pairs else source.pairs.lengths
    total, words = 0.0, 0.0
    spec = source.element_spec()
    for batch in source.generator(eval_plan(lengths, batch_size), 0, 0, [0], 1, sample_views=False):
        s, n = trainable.eval_sums(batch, spec)
        total, words = total + float(s), words + float(n)
    if not words:
        return float("nan"), words
    mean = total / words
    return (math.exp(mean) if mean < 709.0 else float("inf")), words  # exp overflows a float beyond ~709.78


class TrainStep:
    """The optimizer, loss scale and compiled train step of one run (build inside the strategy scope)."""

    def __init__(self, trainable: Trainable, config: TrainConfig, strategy, decay_steps: int):
        self.trainable, self.config, self.strategy = trainable, config, strategy
        self.keras_vars = trainable.variables
        self.tf_vars = [getattr(v, "value", v) for v in self.keras_vars]
        self.optimizer = make_optimizer(config.optimizer, self.tf_vars)
        self.fp16 = config.precision == "mixed_float16"
        self.loss_scale = tf.Variable(config.loss_scale if self.fp16 else 1.0, trainable=False,
                                      dtype=tf.float32, name="loss_scale")
        self.good_steps = tf.Variable(0, trainable=False, dtype=tf.int64, name="good_steps")
        self.lr0, self.decay_steps = config.resolved_learning_rate(), decay_steps
        self._compiled = None

    def lr(self, step):
        """The learning rate at `step` (float32 [])."""
        return staircase_lr(step, self.lr0, self.config.lr_decay_factor, self.decay_steps)

    def slots(self) -> list:
        """Every non-model variable a checkpoint must hold (optimizer slots, loss scale)."""
        return [*self.optimizer.slot_variables(), self.loss_scale, self.good_steps]

    def _replica_step(self, batch, step):
        ctx = tf.distribute.get_replica_context()
        seed = tf.stack([tf.cast(self.config.seed, tf.int64),
                         tf.cast(step, tf.int64) * 4096 + tf.cast(ctx.replica_id_in_sync_group, tf.int64)])
        with tf.GradientTape() as tape:
            total, _ = self.trainable.loss_sums(batch, True, seed)
            loss = total / tf.maximum(batch["global_words"], 1.0)
            scaled = loss * self.loss_scale
        grads = tape.gradient(scaled, self.keras_vars)
        grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        if self.fp16:  # unscale
            inv = 1.0 / self.loss_scale
            grads = [tf.IndexedSlices(g.values * inv, g.indices, g.dense_shape)
                     if isinstance(g, tf.IndexedSlices) else g * inv for g in grads]
        # A gradient whose global norm is not finite (a NaN/Inf in it, or values so large that their squares
        # overflow) is never applied: float16 overflow skips the step and halves the scale; in float32 the
        # loop sees the skipped step and stops the run. The norm is needed for clipping anyway: no extra pass.
        norm = tf.linalg.global_norm(grads)
        finite = tf.math.is_finite(norm)
        scale = tf.constant(1.0)
        if self.config.clip_gradients > 0:  # global-norm clip, folded into the update as a scalar
            scale = self.config.clip_gradients / tf.maximum(norm, self.config.clip_gradients)
        ctx.merge_call(self._apply, args=(grads, self.lr(step), scale, finite))
        return loss, norm, tf.cast(finite, tf.float32)

    def _apply(self, strategy, grads, lr, scale, finite):
        self.optimizer.apply(strategy, grads, lr, scale, finite)
        if self.fp16:
            def rescale(scale, good, ok):
                grow = tf.logical_and(ok, good + 1 >= LOSS_SCALE_PERIOD)
                new = tf.where(ok, tf.where(grow, scale * 2.0, scale), tf.maximum(scale * 0.5, 1.0))
                return scale.assign(new)

            def count(good, ok):
                return good.assign(tf.where(ok, (good + 1) % LOSS_SCALE_PERIOD, tf.zeros_like(good)))

            strategy.extended.update(self.loss_scale, rescale, args=(self.good_steps, finite), group=False)
            strategy.extended.update(self.good_steps, count, args=(finite,), group=False)

    def compile(self, element_spec) -> None:
        """Trace the train step once for batches of `element_spec` (the distributed dataset's)."""
        if self._compiled is None:
            self._compiled = tf.function(self._train_step,
                                         input_signature=[element_spec, tf.TensorSpec([], tf.int64)])

    def __call__(self, batch, step):
        """One optimizer step on a distributed batch (call `compile` first). Returns (global mean loss
        float32 [], gradient global norm float32 [], applied bool []: False when the update was skipped)."""
        loss, norm, applied = self._compiled(batch, step)
        return loss, norm, bool(applied >= 1.0)

    def _train_step(self, batch, step):
        loss, norm, finite = self.strategy.run(self._replica_step, args=(batch, step))
        reduce = self.strategy.reduce
        return (reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
                reduce(tf.distribute.ReduceOp.MEAN, norm, axis=None),
                reduce(tf.distribute.ReduceOp.MEAN, finite, axis=None))  # equal on replicas
