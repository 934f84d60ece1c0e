"""THE training loop, shared by `train-decoder` (features from the cache) and `finetune` (images + CNN).

What varies is passed in: `build_trainable()` (called inside the strategy scope) returns a `Trainable`
(the Keras objects to checkpoint, their trainable variables, and `loss_sums(batch, training, seed)`), and
`source` / `val_source` give batches (`plan(epoch)`, `dataset(...)`, `steps_per_epoch`, `pairs`; see
data.pipeline.PairBatches). Everything else is shared: the recipe (SGD/Adam, global-norm clip, staircase
decay), tf.distribute, mixed precision, checkpoints + exact resume, validation perplexity, logging.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from data.pipeline import eval_plan
from decoder.checkpoints import CheckpointManager
from decoder.config import TrainConfig
from decoder.distribute import input_replicas, make_strategy, worker_dir, worker_role
from decoder.logbook import Logbook
from decoder.optim import make_optimizer, staircase_lr


class Trainable:
    """What the loop trains. `objects`: {name: keras model} checkpointed together (e.g. {"decoder": m});
    subclasses define `loss_sums(batch, training, seed) -> (sum of CE over real words float32 [], count)`."""

    def __init__(self, objects: dict):
        self.objects = dict(objects)

    @property
    def variables(self) -> list:
        return [v for obj in self.objects.values() for v in obj.trainable_variables]

    def loss_sums(self, batch: dict, training: bool, seed):
        raise NotImplementedError


class DecoderTrainable(Trainable):
    """The decoder alone, trained from cached features (batch["features"] float32 [b, D])."""

    def __init__(self, model):
        super().__init__({"decoder": model})

    def loss_sums(self, batch, training, seed):
        return self.objects["decoder"].loss_sums(batch["features"], batch["input_seqs"], batch["target_seqs"],
                                                 batch["mask"], training=training, seed=seed)


@dataclass
class TrainResult:
    """Summary of a finished run."""

    step: int  # optimizer steps done in total (including resumed ones)
    epoch: float  # step / steps_per_epoch
    val_perplexity: float  # at the end
    best_val_perplexity: float
    train_loss: float  # mean train loss since the last evaluation
    resumed_from: int  # step of the checkpoint resumed from (0: fresh start)
    out_dir: Path  # where this process wrote (model dir, or model dir/worker-k)
    trainable: Trainable | None = None


def run_length(config: TrainConfig, steps_per_epoch: int) -> int:
    """Total optimizer steps of the run (--steps wins over --epochs)."""
    if config.steps:
        return int(config.steps)
    return max(1, math.ceil(float(config.epochs) * steps_per_epoch))


class _Loop:
    """State and compiled steps of one run (built inside the strategy scope)."""

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
        single = strategy.num_replicas_in_sync == 1 and not isinstance(
            strategy, tf.distribute.MultiWorkerMirroredStrategy)
        self.jit = bool(config.jit_compile and single)
        self._compiled = None
        self._eval = None

    def eval_step(self, batch: dict, spec: dict):
        """(summed CE, real words) of one validation batch without dropout; traced once for `spec`."""
        if self._eval is None:
            self._eval = tf.function(lambda b: self.trainable.loss_sums(b, False, None),
                                     input_signature=[spec])
        return self._eval(batch)

    def lr(self, step):
        return staircase_lr(step, self.lr0, self.config.lr_decay_factor, self.decay_steps)

    def slots(self) -> list:
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
        finite = tf.constant(True)
        if self.fp16:  # unscale, and skip the update when float16 overflowed
            inv = 1.0 / self.loss_scale
            grads = [tf.IndexedSlices(g.values * inv, g.indices, g.dense_shape)
                     if isinstance(g, tf.IndexedSlices) else g * inv for g in grads]
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(
                g.values if isinstance(g, tf.IndexedSlices) else g)) for g in grads])
        norm = tf.linalg.global_norm(grads)
        scale = tf.constant(1.0)
        if self.config.clip_gradients > 0:  # global-norm clip, folded into the update as a scalar
            scale = self.config.clip_gradients / tf.maximum(norm, self.config.clip_gradients)
        ctx.merge_call(self._apply, args=(grads, self.lr(step), scale, finite))
        return loss, norm

    def _apply(self, strategy, grads, lr, scale, finite):
        self.optimizer.apply(strategy, grads, lr, scale, finite)
        if self.fp16:
            def rescale(scale, good, ok):
                grow = tf.logical_and(ok, good + 1 >= 2000)
                new = tf.where(ok, tf.where(grow, scale * 2.0, scale), tf.maximum(scale * 0.5, 1.0))
                return scale.assign(new)

            def count(good, ok):
                return good.assign(tf.where(ok, (good + 1) % 2000, tf.zeros_like(good)))

            strategy.extended.update(self.loss_scale, rescale, args=(self.good_steps, finite), group=False)
            strategy.extended.update(self.good_steps, count, args=(finite,), group=False)

    def compile(self, element_spec) -> None:
        """Trace the train step once for batches of `element_spec` (the distributed dataset's)."""
        if self._compiled is None:
            self._compiled = tf.function(self._train_step, jit_compile=self.jit,
                                         input_signature=[element_spec, tf.TensorSpec([], tf.int64)])

    def train_step(self, batch, step):
        """One optimizer step on a distributed batch (call `compile` first).
        Returns (global mean loss float32 [], gradient global norm float32 [])."""
        return self._compiled(batch, step)

    def _train_step(self, batch, step):
        loss, norm = self.strategy.run(self._replica_step, args=(batch, step))
        loss = self.strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
        return loss, self.strategy.reduce(tf.distribute.ReduceOp.MEAN, norm, axis=None)


def evaluate(loop: _Loop, val_source, batch_size: int, max_pairs: int | None) -> tuple[float, float]:
    """(perplexity, words) over the validation pairs: exp(total CE / real target words), no dropout."""
    lengths = val_source.pairs.lengths[:max_pairs] if max_pairs else val_source.pairs.lengths
    plan = eval_plan(lengths, batch_size)
    total, words = 0.0, 0.0
    spec = val_source.element_spec()
    for batch in val_source.generator(plan, 0, 0, [0], 1, sample_views=False):
        s, n = loop.eval_step(batch, spec)
        total, words = total + float(s), words + float(n)
    return (math.exp(total / words) if words else float("nan")), words


def perplexity(trainable: Trainable, source, batch_size: int, max_pairs: int | None = None) -> float:
    """Perplexity of `trainable` on `source`'s pairs outside a training run, computed exactly as the loop's
    validation (`evaluate`: exp(total CE / real target words), no dropout)."""
    loop = _Loop(trainable, TrainConfig(steps=1), tf.distribute.get_strategy(), decay_steps=0)
    return evaluate(loop, source, batch_size, max_pairs)[0]


def train_loop(build_trainable: Callable[[], Trainable], source, val_source, config: TrainConfig, model_dir,
               strategy=None, log=print, finish: Callable[[Trainable, Path, TrainResult], None] | None = None,
               progress: bool = True) -> TrainResult:
    """Train until `run_length` steps, resuming from the newest checkpoint of the model dir.

    Checkpoints every `checkpoint_every` steps, at each evaluation, at each epoch end and at the end;
    validation perplexity every `eval_every` steps, at each epoch end and at the end. `finish` (chief and
    workers, each in its own dir) writes the final artefacts.
    """
    strategy = strategy or make_strategy()
    chief, _ = worker_role(strategy)
    out_dir = worker_dir(Path(model_dir), strategy)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.precision != "float32":
        keras.mixed_precision.set_global_policy(config.precision)
    spe = source.steps_per_epoch
    total_steps = run_length(config, spe)
    decays = config.optimizer == "sgd" or config.decay_adam
    decay_steps = int(round(config.epochs_per_decay * spe)) if decays else 0
    with strategy.scope():
        trainable = build_trainable()
        loop = _Loop(trainable, config, strategy, decay_steps)
    manager = CheckpointManager(out_dir / "checkpoints", config.keep_checkpoints)
    book = Logbook(out_dir, enabled=True)
    meta = manager.restore_latest(trainable.objects, loop.slots()) or {}
    step, epoch, pos = meta.get("step", 0), meta.get("epoch", 0), meta.get("pos", 0)
    best = meta.get("best_val_perplexity", float("inf"))
    resumed_from = step
    book.truncate_after(step)
    if step:
        log(f"resuming from checkpoint at step {step} (epoch {epoch}, batch {pos})")
    log(f"training {total_steps} steps ({spe} steps per epoch, {len(source.pairs)} pairs, batch "
        f"{config.batch_size}, {strategy.num_replicas_in_sync} replica(s), {config.optimizer})")
    bar = tqdm(total=total_steps, initial=step, unit="step", disable=not (progress and chief),
               dynamic_ncols=True)
    run_loss, run_n, run_pairs, t0 = 0.0, 0, 0, time.perf_counter()
    last = {"val_perplexity": float("nan"), "train_loss": float("nan")}
    dist = strategy.distribute_datasets_from_function(
        lambda ctx: source.stream_dataset(epoch, pos, input_replicas(ctx), ctx.num_replicas_in_sync))
    loop.compile(dist.element_spec)
    batches = iter(dist)
    plan = source.plan(epoch)
    while step < total_steps:
        loss, _ = loop.train_step(next(batches), tf.constant(step, tf.int64))
        run_loss, run_n, run_pairs = run_loss + float(loss), run_n + 1, run_pairs + len(plan[pos])
        step, pos = step + 1, pos + 1
        epoch_end = pos >= len(plan)
        if epoch_end:
            epoch, pos = epoch + 1, 0
            plan = source.plan(epoch)
        rate = run_pairs / max(time.perf_counter() - t0, 1e-9)
        lr = float(loop.lr(step - 1))
        bar.update(1)
        bar.set_postfix(loss=f"{run_loss / run_n:.3f}", ppl=f"{last['val_perplexity']:.2f}",
                        lr=f"{lr:.3g}", caps_s=f"{rate:.0f}", refresh=False)
        evaluate_now = (epoch_end or step >= total_steps
                        or (config.eval_every and step % config.eval_every == 0))
        is_best = False
        if evaluate_now:
            ppl, words = evaluate(loop, val_source, config.val_batch_size, config.max_val_pairs)
            is_best = ppl < best
            best = min(best, ppl)
            last = {"val_perplexity": ppl, "train_loss": run_loss / run_n}
            book.write(step, step / spe, "eval", {
                "val_perplexity": ppl, "val_words": words, "best_val_perplexity": best,
                "train_loss": run_loss / run_n, "train_perplexity": math.exp(min(run_loss / run_n, 50)),
                "learning_rate": round(lr, 8), "captions_per_s": rate})
            bar.set_postfix(loss=f"{run_loss / run_n:.3f}", ppl=f"{ppl:.2f}", lr=f"{lr:.3g}",
                            caps_s=f"{rate:.0f}")
            run_loss, run_n, run_pairs, t0 = 0.0, 0, 0, time.perf_counter()
        if evaluate_now or (config.checkpoint_every and step % config.checkpoint_every == 0):
            manager.save(trainable.objects, loop.slots(), {
                "step": step, "epoch": epoch, "pos": pos, "best_val_perplexity": best}, best=is_best)
    bar.close()
    book.close()
    if not np.isfinite(last["val_perplexity"]) and step:  # resumed at the very end: evaluate once
        last["val_perplexity"], _ = evaluate(loop, val_source, config.val_batch_size, config.max_val_pairs)
    result = TrainResult(step=step, epoch=step / spe, val_perplexity=last["val_perplexity"],
                         best_val_perplexity=min(best, last["val_perplexity"]), train_loss=last["train_loss"],
                         resumed_from=resumed_from, out_dir=out_dir, trainable=trainable)
    if finish is not None:
        finish(trainable, out_dir, result)
    log(f"trained {step} steps ({result.epoch:.2f} epochs): val perplexity {result.val_perplexity:.3f} "
        f"(best {result.best_val_perplexity:.3f}), train loss {result.train_loss:.4f} -> {out_dir}")
    return result
