"""The optimizers of the training loop (SGD for im2txt's recipe, Adam) and the learning-rate schedule.

They are small and explicit so that one code path works under every tf.distribute strategy: the loop
all-reduces and clips the gradients itself, then calls `apply` in cross-replica context (via merge_call),
where `strategy.extended.update` runs the update on every copy of each variable. Slots are plain
variables listed by `slot_variables()` for the checkpoints. Sparse (IndexedSlices) gradients of the word
embeddings are applied sparsely by SGD.
"""

from __future__ import annotations

import tensorflow as tf


def staircase_lr(step, initial: float, decay_factor: float, decay_steps: int):
    """initial * decay_factor ** floor(step / decay_steps) (no decay when decay_steps <= 0). float32 []."""
    lr = tf.constant(initial, tf.float32)
    if decay_steps <= 0 or decay_factor == 1.0:
        return lr
    exponent = tf.floor(tf.cast(step, tf.float32) / float(decay_steps))
    return lr * tf.pow(tf.constant(decay_factor, tf.float32), exponent)


def _dense(g):
    return tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g


class SGD:
    """Plain gradient descent: var -= lr * grad."""

    def __init__(self, variables):
        self.variables = list(variables)

    def slot_variables(self) -> list:
        return []

    def _update(self, var, grad, lr, scale, apply):
        """var -= lr * scale * grad, only when `apply` (a cond, not lr * 0: 0 * inf would be NaN)."""
        lr = tf.cast(lr * scale, var.dtype)

        def step():
            if isinstance(grad, tf.IndexedSlices):
                var.scatter_sub(tf.IndexedSlices(grad.values * lr, grad.indices, grad.dense_shape))
            else:  # one fused pass
                tf.raw_ops.ResourceApplyGradientDescent(var=var.handle, alpha=lr, delta=grad)
            return tf.constant(True)

        return tf.cond(tf.cast(apply, tf.bool), step, lambda: tf.constant(False))

    def apply(self, strategy, grads, lr, scale, apply):
        """Cross-replica: update every variable. grads: list matching `variables` (unclipped); scale:
        float32 [] global-norm clip factor; apply: bool [] (skip the update when False, e.g. a non-finite
        float16 step)."""
        for var, grad in zip(self.variables, grads, strict=True):
            if grad is not None:
                strategy.extended.update(var, self._update, args=(grad, lr, scale, apply), group=False)


class Adam(SGD):
    """Adam with Keras' defaults (beta1 0.9, beta2 0.999, epsilon 1e-7); sparse gradients densified."""

    def __init__(self, variables, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        super().__init__(variables)
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon
        self.t = tf.Variable(0.0, trainable=False, name="adam_t", dtype=tf.float32)
        self.m = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name="adam_m") for v in variables]
        self.v = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name="adam_v") for v in variables]

    def slot_variables(self) -> list:
        return [self.t, *self.m, *self.v]

    def _update_slots(self, var, grad, m, v, t, lr, scale, apply):
        grad = _dense(grad) * tf.cast(scale, var.dtype)
        ok = tf.cast(apply, tf.bool)
        new_m = self.beta_1 * m + (1 - self.beta_1) * grad
        new_v = self.beta_2 * v + (1 - self.beta_2) * tf.square(grad)
        t = tf.maximum(tf.convert_to_tensor(t), 1.0)
        alpha = lr * tf.sqrt(1 - tf.pow(self.beta_2, t)) / (1 - tf.pow(self.beta_1, t))
        new_var = var - tf.cast(alpha, var.dtype) * new_m / (tf.sqrt(new_v) + self.epsilon)
        m.assign(tf.where(ok, new_m, m))
        v.assign(tf.where(ok, new_v, v))
        return var.assign(tf.where(ok, new_var, var))

    def apply(self, strategy, grads, lr, scale, apply):
        strategy.extended.update(self.t, lambda t, a: t.assign_add(tf.cast(a, tf.float32)), args=(apply,),
                                 group=False)
        for i, (var, grad) in enumerate(zip(self.variables, grads, strict=False)):
            if grad is not None:
                strategy.extended.update(var, self._update_slots,
                                         args=(grad, self.m[i], self.v[i], self.t, lr, scale, apply),
                                         group=False)


def make_optimizer(kind: str, variables):
    """'sgd' or 'adam' over `variables` (tf.Variables; create inside strategy.scope())."""
    return SGD(variables) if kind == "sgd" else Adam(variables)
