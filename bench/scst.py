"""Benchmark of a self-critical (SCST) train step (CPU), at im2txt's sizes. One result per line.

  1. captions/s of the real SCST step (decoder.train.step.TrainStep over decoder.train.scst.ScstTrainable:
     sampling in a tf.while_loop, CIDEr-D reward through tf.numpy_function, teacher-forced pass, backward,
     Adam, clip), batch 32 images x 5 samples, captions up to 16 tokens;
  2. the share of that step spent in sampling, reward, forward (teacher-forced log-probs) and backward, each
     part timed alone on the same inputs, in interleaved rounds (the machine is shared and noisy);
  3. the cost of an SCST step relative to a train-decoder step (batch 32 pairs, COCO caption lengths);
headline last: the reward's share of the SCST step (target <= 0.15).

The model is untrained (im2txt's init) with its logits bias set to the log unigram frequencies of the
references and a stop probability of ~1/10 per word, so samples look like COCO captions in length and word
mix (mean ~9 words, common words repeat, n-grams match the references as often as real samples do).
References: 5 captions per image of COCO val2017 (../shared/data; synthetic Zipf sentences when absent),
document frequencies over 2000 images ("train" mode).
--smoke: the same lines at toy sizes (vocab 200, 32 units, 4 images x 3 samples, 2 rounds) in a few seconds
(tests/test_bench.py); its numbers mean nothing.

Run: `.venv/bin/python bench/scst.py [--rounds 6] [--shared-data DIR] [--smoke]`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from base.devices import quiet_tensorflow  # noqa: E402

quiet_tensorflow()  # no CUDA/oneDNN start-up lines on a CPU-only machine
import tensorflow as tf  # noqa: E402
from machine import bench_parser  # noqa: E402  (bench/, the script's folder)

from base.devices import choose_strategy  # noqa: E402
from beam.graph_sampling import graph_sample_search  # noqa: E402
from data.tokenizer import tokenize  # noqa: E402
from decoder.config import ModelConfig  # noqa: E402
from decoder.model import build_decoder  # noqa: E402
from decoder.train.config import TrainConfig  # noqa: E402
from decoder.train.scst import ScstConfig, ScstTrainable  # noqa: E402
from decoder.train.scst_data import CiderReward  # noqa: E402
from decoder.train.step import DecoderTrainable, TrainStep  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"
D = 2048  # feature width (InceptionV3's pooled output)
START, END = 1, 2  # ids of <S> and </S> (0 is the most frequent word, as in a word_counts.txt)


@dataclass(frozen=True)
class Sizes:
    """What the bench runs at."""

    vocab: int
    embed: int
    units: int
    images: int  # images per SCST batch
    samples: int  # captions sampled per image
    max_length: int  # tokens per sampled caption, counting <S> and </S>
    pool: int  # images whose references make the reward's document frequencies
    xe_batch: int  # pairs per train-decoder batch


FULL = Sizes(vocab=12000, embed=512, units=512, images=32, samples=5, max_length=16, pool=2000, xe_batch=32)
SMOKE = Sizes(vocab=200, embed=32, units=32, images=4, samples=3, max_length=8, pool=50, xe_batch=8)


def fold(i: int, vocab: int) -> int:
    """A word rank's id in a vocabulary of `vocab` ids, never <S> or </S>."""
    i %= vocab
    return 3 if i in (START, END) else i


def references(sz: Sizes, coco: Path, rng) -> tuple[list, np.ndarray, str]:
    """(per image 5 reference id arrays, unigram counts float64 [V], where they came from). COCO words get ids
    by frequency (0 = most frequent; <S> and </S> are 1 and 2 as in a vocabulary file), folded into the
    vocabulary size."""
    if coco.exists():
        data = json.loads(coco.read_text())
        by_image: dict[int, list] = {}
        for ann in data["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(tokenize(ann["caption"]))
        caps = [c[:5] for c in by_image.values() if len(c) >= 5][: sz.pool]
        counts = Counter(w for refs in caps for c in refs for w in c)
        word_id = {w: fold(0 if i == 0 else i + 2, sz.vocab) for i, (w, _) in enumerate(counts.most_common())}
        refs = [[np.array([word_id[w] for w in c], np.int32) for c in image] for image in caps]
        where = f"COCO val2017 ({len(refs)} images x 5 captions)"
    else:
        ranks = np.arange(1, sz.vocab + 1, dtype=np.float64)
        p = 1 / ranks / (1 / ranks).sum()
        sentence = lambda: [fold(i, sz.vocab) for i in rng.choice(sz.vocab, rng.integers(8, 14), p=p)]  # noqa: E731
        refs = [[np.array(sentence(), np.int32) for _ in range(5)] for _ in range(sz.pool)]
        where = f"synthetic Zipf sentences ({sz.pool} images x 5)"
    unigram = np.bincount(np.concatenate([c for image in refs for c in image]), minlength=sz.vocab)
    return refs, unigram.astype(np.float64), where


def make_model(sz: Sizes, unigram: np.ndarray):
    """An untrained decoder whose first words follow the unigram distribution, stopping w.p. ~0.1 per word."""
    model = build_decoder(ModelConfig(vocab_size=sz.vocab, embedding_size=sz.embed, lstm_units=sz.units,
                                      feature_dim=D), seed=0)
    p = (unigram + 0.01) / (unigram + 0.01).sum() * 0.9
    p[END] = 0.1
    model.logits.bias.assign(np.log(p).astype(np.float32))
    return model


def median_ms(fn, rounds: int) -> float:
    """Median wall time of fn() over rounds, in ms."""
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


class Parts:
    """The SCST step and each of its parts, compiled once for one batch of images."""

    def __init__(self, sz: Sizes, refs: list, unigram: np.ndarray, rng):
        self.sz, self.strategy = sz, choose_strategy()
        with self.strategy.scope():
            model = make_model(sz, unigram)
            reward = CiderReward(refs, END, sz.samples, "mean", "train")
            cfg = ScstConfig("-", "-", [], samples=sz.samples, max_length=sz.max_length)
            self.trainable = ScstTrainable(model, reward, cfg, START, END)
            self.step = TrainStep(self.trainable, TrainConfig(optimizer="adam", learning_rate=5e-5, steps=1),
                                  self.strategy, 0)
        self.reward = reward
        spec = {"features": tf.TensorSpec([None, D], tf.float32),
                "image_index": tf.TensorSpec([None], tf.int32), "global_words": tf.TensorSpec([], tf.float32)}
        self.step.compile(spec)
        self.batch = {"features": tf.constant(rng.normal(size=(sz.images, D)), tf.float32),
                      "image_index": tf.constant(rng.choice(len(refs), sz.images, replace=False), tf.int32),
                      "global_words": tf.constant(1.0)}
        self.sample = tf.function(lambda f, seed: graph_sample_search(
            model.initial_state(f), model.step, start_id=START, end_id=END, num_samples=sz.samples,
            max_length=sz.max_length, seed=seed))
        self.forward = tf.function(self.trainable.reinforce_sums)
        self.backward = tf.function(self._grads)
        self.calls = 0

    def _grads(self, features, samples, lengths, advantage):
        with tf.GradientTape() as tape:
            total, _ = self.trainable.reinforce_sums(features, samples, lengths, advantage)
        return tape.gradient(total, self.trainable.variables)

    def run_step(self):
        self.calls += 1
        return float(self.step(self.batch, tf.constant(self.calls, tf.int64))[0])

    def inputs(self):
        """A fresh sample of the batch and its advantages (numpy), for the parts timed alone."""
        self.calls += 1
        samples, lengths = self.sample(self.batch["features"], tf.constant([0, self.calls], tf.int64))
        index = self.batch["image_index"].numpy()
        return samples, lengths, self.reward.advantages(index, samples.numpy(), np.zeros((len(index), 0)))

    def time_round(self, rounds: int) -> dict:
        """Median ms of the step and of each part (each on its own fresh inputs)."""
        f, index = self.batch["features"], self.batch["image_index"].numpy()
        samples, lengths, adv = self.inputs()
        out = {"step": median_ms(self.run_step, rounds)}
        out["sampling"] = median_ms(lambda: self.sample(f, tf.constant([1, self.calls], tf.int64))[0].numpy(),
                                    rounds)
        out["reward"] = median_ms(lambda: self.reward.advantages(index, samples.numpy(),
                                                                 np.zeros((len(index), 0))), rounds)
        out["forward"] = median_ms(lambda: self.forward(f, samples, lengths, adv)[0].numpy(), rounds)
        fwd_bwd = median_ms(lambda: [g.numpy() for g in self.backward(f, samples, lengths, adv)
                                     if isinstance(g, tf.Tensor)], rounds)
        out["backward"] = max(fwd_bwd - out["forward"], 0.0)
        out["words"] = float(self.reward.words(samples.numpy()).mean())
        return out


def xe_step_ms(sz: Sizes, unigram: np.ndarray, rng, rounds: int) -> float:
    """Median ms of a train-decoder step (DecoderTrainable, SGD) on xe_batch pairs of ~COCO lengths."""
    strategy = choose_strategy()
    with strategy.scope():
        model = make_model(sz, unigram)
        step = TrainStep(DecoderTrainable(model), TrainConfig(steps=1), strategy, 0)
    n = sz.xe_batch
    lengths = np.clip(rng.normal(13.3, 2.5, n).round(), 8, 50).astype(int)
    t = int(lengths.max()) - 1
    ids = rng.integers(3, sz.vocab, (n, t + 1)).astype(np.int32)
    mask = (np.arange(t)[None] < (lengths - 1)[:, None]).astype(np.float32)
    batch = {"features": tf.constant(rng.normal(size=(n, D)), tf.float32), "input_seqs": ids[:, :-1],
             "target_seqs": ids[:, 1:], "mask": mask, "global_words": np.float32(mask.sum())}
    seqs = tf.TensorSpec([None, None], tf.int32)
    step.compile({"features": tf.TensorSpec([None, D], tf.float32), "input_seqs": seqs, "target_seqs": seqs,
                  "mask": tf.TensorSpec([None, None], tf.float32),
                  "global_words": tf.TensorSpec([], tf.float32)})
    calls = iter(range(10**9))
    run = lambda: float(step(batch, tf.constant(next(calls), tf.int64))[0])  # noqa: E731
    run()
    return median_ms(run, rounds)


def main() -> None:
    parser = bench_parser(__doc__, "toy sizes, 2 rounds: checks the bench runs", SHARED_DATA,
                          "folder with captions_val2017.json (synthetic references when absent)")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per part per round (median)")
    args = parser.parse_args()
    sz = SMOKE if args.smoke else FULL
    if args.smoke:
        args.rounds, args.reps = min(args.rounds, 2), min(args.reps, 2)
    rng = np.random.default_rng(0)
    refs, unigram, where = references(sz, args.shared_data / "captions_val2017.json", rng)
    print(f"setup{' (smoke)' if args.smoke else ''}: vocab {sz.vocab}, embedding {sz.embed}, "
          f"lstm {sz.units}, batch {sz.images} images x {sz.samples} samples, max length {sz.max_length}, "
          f"references {where}, "
          f"{tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()} threads")
    parts = Parts(sz, refs, unigram, rng)
    t = time.perf_counter()
    parts.run_step()
    parts.time_round(1)  # traces every part
    print(f"tracing + first call of the step and its parts: {time.perf_counter() - t:.1f} s")
    rounds = [parts.time_round(args.reps) for _ in range(args.rounds)]
    med = {k: float(np.median([r[k] for r in rounds])) for k in rounds[0]}
    share = {k: float(np.median([r[k] / r["step"] for r in rounds]))
             for k in ("sampling", "reward", "forward", "backward")}
    caps = sz.images * sz.samples
    print(f"SCST step: {caps / med['step'] * 1000:.0f} sampled captions/s ({caps} per step, mean "
          f"{med['words']:.1f} words, {med['step']:.0f} ms per step)")
    for name, what in (("sampling", f"{sz.samples} samples per image, tf.while_loop"),
                       ("reward", "CIDEr-D on token ids, NumPy"), ("forward", "teacher-forced log-probs"),
                       ("backward", "gradients of the REINFORCE loss")):
        print(f"{name}: {share[name]:.1%} of the step ({med[name]:.1f} ms; {what})")
    rest = 1 - sum(share.values())
    print(f"rest (Adam, clip, all-reduce, numpy_function hand-over): {rest:.1%} of the step")
    xe = xe_step_ms(sz, unigram, rng, args.reps * args.rounds)
    print(f"train-decoder step ({sz.xe_batch} pairs): {xe:.0f} ms; an SCST step costs {med['step'] / xe:.1f} "
          f"of them ({med['step'] / caps / (xe / sz.xe_batch):.2f}x per caption)")
    print(f"headline: reward share of the SCST step {share['reward']:.3f} (target <= 0.15)")


if __name__ == "__main__":
    main()
