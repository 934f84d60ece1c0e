"""THE training loop, shared by `train-decoder` (cached features), `finetune` (images + CNN) and `train-scst`
(sampled captions, CIDEr-D reward).

What varies is passed in: `build_trainable()` (called under the run's dtype policy, inside the strategy
scope) returns a decoder.train.step.Trainable; `source` gives training batches (`plan(epoch)`,
`stream_dataset(...)`, `steps_per_epoch`, `pairs`; see data.pipeline.PairBatches); `validate(trainable)`
returns the validation metrics and the score that picks the best checkpoint (lower is better; default:
perplexity on `val_source`). Everything else is shared: the recipe, tf.distribute, mixed precision,
checkpoints and exact resume, the metrics log, and the rules below.

- A run that finds its work done (resumed at its last step) says so and changes nothing.
- A non-finite gradient is never applied. In float32 one such step stops the run; under mixed_float16 it is a
  skipped step (the loss scale halves) and only MAX_SKIPPED_IN_A_ROW of them in a row stop it. A stopped run
  writes the last good checkpoint's weights as the model and raises RunStopped (exit status 1). Weights that
  became non-finite (checked before each checkpoint) and a non-finite validation score (e.g. perplexity inf
  from exploded but finite weights) stop it the same way; stopped before any checkpoint, nothing is written.
- Keras' global dtype policy is restored when the loop ends, whatever happens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from base.devices import choose_strategy, dtype_policy
from base.errors import RunStopped
from decoder.train.checkpoints import CheckpointManager
from decoder.train.config import TrainConfig
from decoder.train.distribute import input_replicas, worker_dir, worker_role
from decoder.train.logbook import Logbook
from decoder.train.step import Trainable, TrainStep, perplexity

MAX_SKIPPED_IN_A_ROW = 50  # mixed_float16: this many overflowing steps in a row means the run diverged


@dataclass
class TrainResult:
    """Summary of a finished run."""

    step: int  # optimizer steps done in total (including resumed ones)
    epoch: float  # step / steps_per_epoch
    val_metrics: dict  # the last validation's metrics (e.g. {"val_perplexity": 1.5, "val_words": 900.0})
    best_score: float  # best validation score of the run (lower is better; perplexity by default)
    train_loss: float  # mean train loss since the last evaluation
    resumed_from: int  # step of the checkpoint resumed from (0: fresh start)
    out_dir: Path  # where this process wrote (model dir, or model dir/worker-k)
    trainable: Trainable | None = None
    already_done: bool = False  # the run had reached its last step before this call
    skipped_steps: int = 0  # updates skipped for a non-finite gradient (mixed_float16 overflow)
    extra: dict = field(default_factory=dict)

    @property
    def val_perplexity(self) -> float:
        """The last validation perplexity (NaN when the run validates with another metric)."""
        return float(self.val_metrics.get("val_perplexity", float("nan")))

    @property
    def best_val_perplexity(self) -> float:
        """The best validation perplexity (the best score when the run validates by perplexity)."""
        return self.best_score if "val_perplexity" in self.val_metrics else float("nan")

    def result_block(self) -> dict:
        """JSON-able summary for the model dir's config.json "result"."""
        return {"step": self.step, "epoch": self.epoch, **self.val_metrics, "best_score": self.best_score,
                "skipped_steps": self.skipped_steps, **self.extra}


def run_length(config: TrainConfig, steps_per_epoch: int) -> int:
    """Total optimizer steps of the run (--steps wins over --epochs)."""
    if config.steps:
        return int(config.steps)
    return max(1, math.ceil(float(config.epochs) * steps_per_epoch))


def perplexity_validator(val_source, config: TrainConfig) -> Callable:
    """The default validation: (metrics {"val_perplexity", "val_words"}, score = perplexity)."""
    def validate(trainable: Trainable):
        ppl, words = perplexity(trainable, val_source, config.val_batch_size, config.max_val_pairs)
        return {"val_perplexity": ppl, "val_words": words}, ppl

    validate.score_metric = ("val_perplexity", 1.0)  # the score is this metric times this sign (printed)
    return validate


def weights_finite(trainable: Trainable) -> bool:
    """True when every variable of every checkpointed object is finite."""
    return all(bool(np.isfinite(np.asarray(v.numpy(), np.float32)).all())
               for obj in trainable.objects.values() for v in obj.weights)


def train_loop(build_trainable: Callable[[], Trainable], source, val_source, config: TrainConfig, model_dir,
               strategy=None, log=print, finish: Callable[[Trainable, Path, TrainResult], None] | None = None,
               progress: bool = True, validate: Callable | None = None) -> TrainResult:
    """Train until `run_length` steps, resuming from the newest readable checkpoint of the model dir.

    Checkpoints every `checkpoint_every` steps, at each validation and at the end; validates every
    `eval_every` steps, at each epoch end and at the end. `finish(trainable, out_dir, result)` (chief and
    workers, each in its own dir) writes the final artefacts; it also runs before RunStopped is raised.
    """
    strategy = strategy or choose_strategy()
    with dtype_policy(config.precision):
        run = _Run(build_trainable, source, config, model_dir, strategy, log, progress)
        run.validate = validate or perplexity_validator(val_source, config)
        result = run.train()
        if finish is not None and not (run.stopped and run.kept is None):
            finish(run.trainable, run.out_dir, result)
    if run.stopped:
        kept = (f"The model files hold the last good checkpoint (step {run.kept})" if run.kept is not None
                else "No checkpoint had been saved yet, so no model files were written")
        raise RunStopped(f"{run.stopped} {kept}; lower --learning-rate or check the input features.")
    if result.already_done:
        log(f"nothing to do: {run.out_dir} already holds this run's {result.step} steps (raise --steps or "
            "--epochs to train further); the model files were rewritten from its last checkpoint")
    else:
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in result.val_metrics.items() if k != "val_words")
        name, sign = getattr(run.validate, "score_metric", ("val_perplexity", 1.0))
        log(f"trained {result.step} steps ({result.epoch:.2f} epochs): {metrics} (best {name} "
            f"{sign * result.best_score:.4g}), train loss {result.train_loss:.4f} -> {run.out_dir}")
    return result


class _Run:
    """One call of train_loop: state, checkpoints, log, the step loop."""

    def __init__(self, build_trainable, source, config, model_dir, strategy, log, progress):
        self.source, self.config, self.strategy, self.log = source, config, strategy, log
        self.chief = worker_role(strategy)[0]
        self.out_dir = worker_dir(Path(model_dir), strategy)
        self.spe = source.steps_per_epoch
        self.total = run_length(config, self.spe)
        decays = config.optimizer == "sgd" or config.decay_adam
        decay_steps = int(round(config.epochs_per_decay * self.spe)) if decays else 0
        with strategy.scope():
            self.trainable = build_trainable()
            self.step_fn = TrainStep(self.trainable, config, strategy, decay_steps)
        self.out_dir.mkdir(parents=True, exist_ok=True)  # after build_trainable, which may refuse its inputs
        self.manager = CheckpointManager(self.out_dir / "checkpoints", config.keep_checkpoints, log=log)
        self.book = Logbook(self.out_dir, enabled=True)
        self.progress, self.stopped, self.skipped = progress and self.chief, "", 0
        self.kept = None  # step of the checkpoint restored after a stop (None: there was none)

    def restore(self) -> dict:
        meta = self.manager.restore_latest(self.trainable.objects, self.step_fn.slots()) or {}
        self.book.truncate_after(meta.get("step", 0))
        return meta

    def train(self) -> TrainResult:
        meta = self.restore()
        step, epoch, pos = meta.get("step", 0), meta.get("epoch", 0), meta.get("pos", 0)
        best = meta.get("best_score", meta.get("best_val_perplexity", float("inf")))
        last = {"val": meta.get("val_metrics", {}), "loss": meta.get("train_loss", float("nan"))}
        resumed_from, self.skipped = step, meta.get("skipped_steps", 0)
        if step >= self.total:
            if not last["val"]:
                last["val"], _ = self.validate(self.trainable)
            return self._result(step, last, best, resumed_from, already_done=True)
        if step:
            self.log(f"resuming from checkpoint at step {step} (epoch {epoch}, batch {pos})")
        unit = getattr(self.source, "unit", "pairs")
        self.log(f"training {self.total} steps ({self.spe} steps per epoch, {len(self.source.pairs)} {unit}, "
                 f"batch {self.config.batch_size}, {self.strategy.num_replicas_in_sync} replica(s), "
                 f"{self.config.optimizer}, {self.config.precision})")
        step, best, last = self._steps(step, epoch, pos, best, last)
        return self._result(step, last, best, resumed_from)

    def _result(self, step, last, best, resumed_from, already_done=False) -> TrainResult:
        return TrainResult(step=step, epoch=step / self.spe, val_metrics=dict(last["val"]),
                           best_score=float(best), train_loss=float(last["loss"]), resumed_from=resumed_from,
                           out_dir=self.out_dir, trainable=self.trainable, already_done=already_done,
                           skipped_steps=self.skipped)

    def _steps(self, step, epoch, pos, best, last):
        source, config = self.source, self.config
        dist = self.strategy.distribute_datasets_from_function(
            lambda ctx: source.stream_dataset(epoch, pos, input_replicas(ctx), ctx.num_replicas_in_sync))
        self.step_fn.compile(dist.element_spec)
        batches, plan = iter(dist), source.plan(epoch)
        bar = tqdm(total=self.total, initial=step, unit="step", disable=not self.progress, dynamic_ncols=True)
        run_loss, run_n, run_pairs, t0, in_a_row = 0.0, 0, 0, time.perf_counter(), 0
        while step < self.total:
            loss, _, applied = self.step_fn(next(batches), tf.constant(step, tf.int64))
            loss = float(loss)
            in_a_row = 0 if applied else in_a_row + 1
            self.skipped += 0 if applied else 1
            if self._diverged(step, loss, applied, in_a_row):
                break
            if applied and math.isfinite(loss):
                run_loss, run_n = run_loss + loss, run_n + 1
            run_pairs += len(plan[pos])
            step, pos = step + 1, pos + 1
            epoch_end = pos >= len(plan)
            if epoch_end:
                epoch, pos = epoch + 1, 0
                plan = source.plan(epoch)
            rate = run_pairs / max(time.perf_counter() - t0, 1e-9)
            lr = float(self.step_fn.lr(step - 1))
            mean = run_loss / max(run_n, 1)
            bar.update(1)
            bar.set_postfix(loss=f"{mean:.3f}", lr=f"{lr:.3g}", caps_s=f"{rate:.0f}",
                            **{k: f"{v:.3f}" for k, v in self.trainable.live_metrics().items()},
                            **{k[4:]: f"{v:.3f}" for k, v in last["val"].items()
                               if k.startswith("val_") and k != "val_words"},
                            refresh=False)
            evaluate_now = (epoch_end or step >= self.total
                            or (config.eval_every and step % config.eval_every == 0))
            is_best = False
            if evaluate_now:
                metrics, score = self.validate(self.trainable)
                if not math.isfinite(score):  # e.g. perplexity inf: finite but exploded weights
                    self.stopped = f"training stopped at step {step}: the validation score became {score}."
                    break
                is_best, best = score < best, min(best, score)
                last = {"val": metrics, "loss": mean}
                self.book.write(step, step / self.spe, "eval", {
                    **metrics, "best_score": best, "train_loss": mean,
                    "train_perplexity": math.exp(min(mean, 50)), "learning_rate": round(lr, 8),
                    "captions_per_s": rate, "skipped_steps": self.skipped})
                run_loss, run_n, run_pairs, t0 = 0.0, 0, 0, time.perf_counter()
            if evaluate_now or (config.checkpoint_every and step % config.checkpoint_every == 0):
                if not self._checkpoint({"step": step, "epoch": epoch, "pos": pos, "best_score": best,
                                         "val_metrics": last["val"], "train_loss": last["loss"],
                                         "skipped_steps": self.skipped}, is_best):
                    break
        bar.close()
        self.book.close()
        if self.stopped:
            meta = self.restore()
            self.kept = meta.get("step")
            step, last = meta.get("step", 0), {"val": meta.get("val_metrics", {}), "loss": float("nan")}
        return step, best, last

    def _diverged(self, step: int, loss: float, applied: bool, in_a_row: int) -> bool:
        """Set self.stopped (and return True) when the run can no longer produce a right result."""
        fp16 = self.step_fn.fp16
        if (fp16 and in_a_row < MAX_SKIPPED_IN_A_ROW) or (applied and math.isfinite(loss)):
            return False
        why = (f"{in_a_row} steps in a row overflowed float16" if fp16 else
               f"the loss became {loss}" if not math.isfinite(loss) else "a gradient became non-finite")
        self.stopped = f"training stopped at step {step + 1}: {why}."
        return True

    def _checkpoint(self, meta: dict, is_best: bool) -> bool:
        """Save a checkpoint; False (and self.stopped set) when the weights are no longer finite."""
        if not weights_finite(self.trainable):  # never let a checkpoint hold NaN weights
            self.stopped = f"training stopped at step {meta['step']}: the weights became non-finite."
            return False
        self.manager.save(self.trainable.objects, self.step_fn.slots(), meta, best=is_best)
        return True
