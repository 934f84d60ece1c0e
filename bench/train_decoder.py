"""Benchmark of decoder training from the feature cache (CPU), at im2txt's sizes. One result per line.

  1. captions/s of the real train step (pipeline + `decoder.train` step: SGD, clip, bucketing, logits only
     at real positions) on real-length captions (COCO val2017 caption lengths when ../shared/data exists);
  2. model FLOP utilisation = that step's useful FLOP/s (real words only) / this machine's dense matmul
     FLOP/s in the step's own precision, measured in the same run;
  1-2 run in float32 and, on a CPU with native bfloat16 (AMX / AVX512-BF16; bench/machine.py), again under
     the mixed_bfloat16 policy, with both matmul rates (both denominators) and the bfloat16 / float32
     captions/s ratio; a CPU without native bfloat16 says so and skips the bfloat16 lines;
  3. captions/s of an im2txt-style step (frozen InceptionV3 on the batch's 299 px images, then the same
     decoder step) and the cache speed-up;
  4. peak memory of a process holding a 120k-image float16 store in memory (synthetic);
headline last: the speed-up of training from the cache over im2txt's step.

The step is `decoder.train.step.TrainStep`, the one the training loop runs, built without XLA: the --xla
option was dropped with TrainConfig's jit_compile field, since bucketed caption lengths give every batch
a new shape and XLA recompiles (0.14-0.38 MFU when tried).
--smoke: the same lines at toy sizes (vocab 200, embedding 32, LSTM 32, batch 8, 64 images, 2 rounds,
512^3 matmul, InceptionV3 at 75 px, a 2k-image store) in about 15 s, so the test suite keeps the bench
running (tests/test_bench.py); its numbers mean nothing.

Run: `.venv/bin/python bench/train_decoder.py [--rounds 8] [--skip-memory] [--shared-data DIR] [--smoke]`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from base.devices import quiet_tensorflow  # noqa: E402

quiet_tensorflow()  # no CUDA/oneDNN start-up lines on a CPU-only machine
import tensorflow as tf  # noqa: E402
from machine import bench_parser, compute_dtype, matmul_rate, precisions  # noqa: E402  (bench/)

from base.devices import choose_strategy, dtype_policy  # noqa: E402
from data.features import create_store  # noqa: E402
from data.pipeline import FeatureSource, PairBatches, PairSet, PipelineConfig  # noqa: E402
from decoder.config import ModelConfig  # noqa: E402
from decoder.model import build_decoder  # noqa: E402
from decoder.train.config import TrainConfig  # noqa: E402
from decoder.train.step import DecoderTrainable, TrainStep  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"
D = 2048  # feature width (InceptionV3's pooled output)


@dataclass(frozen=True)
class Sizes:
    """What the bench runs at."""

    vocab: int
    embed: int
    units: int
    batch: int
    images: int  # images of the timed store (5 captions each)
    matmul: int  # n of the [n, n] @ [n, n] float32 matmul that measures this machine's FLOP/s
    cnn_px: int  # InceptionV3 input size of the im2txt-style step
    memory_images: int  # images of the in-memory store of the memory test


FULL = Sizes(vocab=12000, embed=512, units=512, batch=32, images=2000, matmul=2048, cnn_px=299,
             memory_images=120_000)
SMOKE = Sizes(vocab=200, embed=32, units=32, batch=8, images=64, matmul=512, cnn_px=75, memory_images=2000)


def caption_lengths(n: int, rng, coco: Path) -> tuple[np.ndarray, str]:
    """n caption lengths in ids (words + <S> + </S>): sampled from COCO val2017 when available."""
    if coco.exists():
        from data.tokenizer import tokenize

        anns = json.loads(coco.read_text())["annotations"]
        pool = np.array([len(tokenize(a["caption"])) + 2 for a in anns])
        return rng.choice(pool, n), f"COCO val2017 ({len(pool)} captions, mean {pool.mean():.2f} ids)"
    pool = np.clip(rng.normal(13.3, 2.5, n).round(), 8, 50).astype(int)
    return pool, "synthetic normal(13.3, 2.5)"


def make_source(tmp: Path, sz: Sizes, rng, coco: Path) -> tuple[PairBatches, str]:
    """A PairBatches over a real h5 store of random float16 features, 5 captions per image."""
    n_images = sz.images
    writer = create_store(tmp / "bench.h5", [f"{i}.jpg" for i in range(n_images)], range(n_images), dim=D,
                          views=1, dtype="float16", attrs={"cnn": {"arch": "InceptionV3"}})
    with writer:
        writer.commit(0, rng.normal(size=(n_images, D)).astype(np.float16), np.ones(n_images, bool),
                      [""] * n_images)
        writer.finish()
    from data.features import open_store

    store = open_store(tmp / "bench.h5")
    lengths, where = caption_lengths(5 * n_images, rng, coco)
    caps = [rng.integers(3, sz.vocab, size=n).astype(np.int32) for n in lengths]
    pairs = PairSet(np.repeat(np.arange(n_images), 5), caps, lengths.astype(np.int32))
    features = FeatureSource(store, PipelineConfig(), log=lambda m: None)
    return PairBatches(pairs, features, sz.batch, seed=0), where


def step_flops(mask: np.ndarray, batch: int, sz: Sizes) -> float:
    """Useful training FLOPs of one batch (real words only; backward = 2x forward where dx is needed)."""
    n = float(mask.sum())
    e, u = sz.embed, sz.units
    image = 4 * D * e * batch  # fwd + dW (no gradient w.r.t. the frozen features)
    lstm = (batch + n) * 6 * (e + u) * 4 * u  # input + recurrent matmuls, fwd + dW + dx
    logits = n * 6 * u * sz.vocab
    return image + lstm + logits


def decoder_steps(step: TrainStep, batches, plan, start: int, n: int,
                  sz: Sizes) -> tuple[float, float, float]:
    """Run n train steps from plan[start]: (seconds, captions, useful FLOPs)."""
    caps = flops = 0.0
    t0 = time.perf_counter()
    for i in range(start, start + n):
        batch = next(batches)
        float(step(batch, tf.constant(i, tf.int64))[0])
        caps += len(plan[i])
        flops += step_flops(batch["mask"].numpy(), len(plan[i]), sz)
    return time.perf_counter() - t0, caps, flops


def make_batches(step: TrainStep, source: PairBatches, n: int):
    """(iterator over the distributed train dataset of the first n batches, their plan)."""
    plan = source.plan(0)[:n]
    if len(plan) < n:
        raise SystemExit(f"the bench needs {n} batches, the source has {len(plan)}: use more images")
    dist = step.strategy.distribute_datasets_from_function(lambda ctx: source.dataset(plan, 0))
    step.compile(dist.element_spec)
    return iter(dist), plan


def build_step(sz: Sizes, precision: str) -> TrainStep:
    """The train step of a fresh decoder (seed 0) in `precision` (call under its dtype policy)."""
    config = TrainConfig(batch_size=sz.batch, steps=1, precision=precision)
    strategy = choose_strategy()
    with strategy.scope():
        trainable = DecoderTrainable(build_decoder(
            ModelConfig(vocab_size=sz.vocab, embedding_size=sz.embed, lstm_units=sz.units, feature_dim=D),
            seed=0))
        return TrainStep(trainable, config, strategy, decay_steps=0)


def report_precision(step: TrainStep, batches, plan, rounds: int, sz: Sizes, precision: str) -> float:
    """Time the step in `precision` against the matmul of its own dtype; print the lines; captions/s."""
    dtype = compute_dtype(precision)
    mfu, caps_s, flops_s, peak = time_decoder(step, batches, plan, rounds, sz, dtype)
    other = "bfloat16" if dtype == "float32" else "float32"
    print(f"[{precision}] dense matmul ({sz.matmul}^3), best of the run: {peak / 1e9:.1f} GFLOP/s {dtype}; "
          f"{max(matmul_rate(sz.matmul, other) for _ in range(3)) / 1e9:.1f} GFLOP/s {other} (the other "
          "denominator)")
    print(f"[{precision}] decoder train step from the cache, best round: {caps_s:.1f} captions/s, "
          f"{flops_s / 1e9:.1f} useful GFLOP/s (real words only)")
    print(f"[{precision}] model FLOP utilisation (decoder step / {dtype} dense matmul, median of {rounds} "
          f"interleaved rounds): {mfu:.3f} (target >= 0.70)")
    return caps_s


WARMUP, PER_ROUND, IM2TXT_ROUNDS = 5, 4, 3  # train steps: warm-up, per timing round; im2txt-style pairs


def time_decoder(step: TrainStep, batches, plan, rounds: int, sz: Sizes, dtype: str = "float32"):
    """Interleaved rounds: matmul, PER_ROUND train steps, matmul. Returns (median MFU over rounds, best
    captions/s, best useful FLOP/s, best matmul FLOP/s); each round's MFU divides by the mean of the two
    `dtype` matmul rates measured right around it (the machine is shared and noisy)."""
    i, ratios, best = WARMUP, [], [0.0, 0.0, 0.0]
    decoder_steps(step, batches, plan, 0, i, sz)  # warm-up
    for _ in range(rounds):
        before = matmul_rate(sz.matmul, dtype)
        dt, caps, flops = decoder_steps(step, batches, plan, i, PER_ROUND, sz)
        after = matmul_rate(sz.matmul, dtype)
        i += PER_ROUND
        ratios.append(flops / dt / ((before + after) / 2))
        best = [max(best[0], caps / dt), max(best[1], flops / dt), max(best[2], before, after)]
    return float(np.median(ratios)), *best


def time_im2txt(step: TrainStep, batches, plan, start: int, sz: Sizes) -> tuple[float, float]:
    """Median over IM2TXT_ROUNDS rounds of (cached-step captions/s / im2txt-style captions/s), each pair
    measured back to back, and the best im2txt-style captions/s. The im2txt-style step runs the frozen
    InceptionV3 (sz.cnn_px px, inference) on the batch's images and then the same decoder step."""
    import keras

    px = sz.cnn_px
    cnn = keras.applications.InceptionV3(weights=None, include_top=False, pooling="avg",
                                         input_shape=(px, px, 3))
    cnn.trainable = False
    encode = tf.function(lambda x: cnn(x, training=False))
    images = tf.random.uniform([sz.batch, px, px, 3], -1, 1)
    encode(images).numpy()
    i, ratios, best = start, [], 0.0
    for _ in range(IM2TXT_ROUNDS):
        batch = next(batches)
        t0 = time.perf_counter()
        batch = dict(batch, features=encode(images[: len(plan[i])]))
        float(step(batch, tf.constant(i, tf.int64))[0])
        im2txt = len(plan[i]) / (time.perf_counter() - t0)
        dt, caps, _ = decoder_steps(step, batches, plan, i + 1, PER_ROUND, sz)
        i += 1 + PER_ROUND
        ratios.append(caps / dt / im2txt)
        best = max(best, im2txt)
    return float(np.median(ratios)), best


MEMORY_CHILD = """
import sys, numpy as np
sys.path.insert(0, {repo!r})
from data.features import open_store
from data.pipeline import FeatureSource, PairBatches, PairSet, PipelineConfig
def hwm():  # peak RSS of this process in kB (VmHWM; ru_maxrss would include the parent's, kept over exec)
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
base = hwm()
store = open_store({path!r})
src = FeatureSource(store, PipelineConfig(in_memory="yes"), log=lambda m: None)
n = len(store.keys)
rng = np.random.default_rng(0)
lengths = rng.integers(8, 20, 5 * n).astype(np.int32)
caps = [rng.integers(3, {vocab}, k).astype(np.int32) for k in lengths]
pairs = PairSet(np.repeat(np.arange(n), 5), caps, lengths)
pb = PairBatches(pairs, src, 32, 0)
plan = pb.plan(0)
for i, b in zip(range(50), pb.generator(plan, 0, 0, [0], 1)):
    pass
print(hwm() * 1024, base * 1024, src.array.nbytes)
"""


def peak_memory(tmp: Path, n_images: int, vocab: int) -> tuple[int, int, int]:
    """(peak RSS bytes, RSS after imports, feature bytes) of a child holding an n-image float16 store."""
    path = tmp / "big.h5"
    rng = np.random.default_rng(1)
    writer = create_store(path, [f"{i}.jpg" for i in range(n_images)], range(n_images), dim=D, views=1,
                          dtype="float16", attrs={"cnn": {"arch": "InceptionV3"}})
    with writer:
        step = 20_000
        for s in range(0, n_images, step):
            writer.commit(s, rng.normal(size=(min(step, n_images - s), D)).astype(np.float16),
                          np.ones(min(step, n_images - s), bool), [""] * min(step, n_images - s))
        writer.finish()
    child = MEMORY_CHILD.format(repo=str(REPO), path=str(path), vocab=vocab)
    out = subprocess.run([sys.executable, "-c", child],
                         capture_output=True, text=True, check=True)
    peak, base, nbytes = map(int, out.stdout.split())
    return peak, base, nbytes


def thousands(n: int) -> str:
    """120000 -> "120k"."""
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def main() -> None:
    parser = bench_parser(__doc__,
                          "toy sizes (vocab 200, 32 units, batch 8, 2 rounds): checks the bench runs",
                          SHARED_DATA,
                          "folder with captions_val2017.json (synthetic caption lengths when absent)")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved matmul/decoder timing rounds")
    parser.add_argument("--skip-memory", action="store_true", help="skip the in-memory store test")
    args = parser.parse_args()
    sz = SMOKE if args.smoke else FULL
    if args.smoke:
        args.rounds = min(args.rounds, 2)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source, where = make_source(tmp, sz, rng, args.shared_data / "captions_val2017.json")
        print(f"setup{' (smoke)' if args.smoke else ''}: vocab {sz.vocab}, embedding {sz.embed}, "
              f"lstm {sz.units}, batch {sz.batch}, caption lengths from {where}, "
              f"{tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()} threads")
        names, cpu_line = precisions()
        print(cpu_line)
        im2txt_start = WARMUP + args.rounds * PER_ROUND
        rates = {}
        for precision in names:  # float32 first: its step, batches and plan go on to the im2txt comparison
            with dtype_policy(precision):
                step = build_step(sz, precision)
                batches, plan = make_batches(step, source, im2txt_start + IM2TXT_ROUNDS * (1 + PER_ROUND))
                rates[precision] = report_precision(step, batches, plan, args.rounds, sz, precision)
            if precision == "float32":
                kept = step, batches, plan
        if len(rates) > 1:
            ratio = rates["mixed_bfloat16"] / rates["float32"]
            print(f"bfloat16 / float32 training: {ratio:.2f}x captions/s (target >= 1.5 on an AMX CPU)")
        step, batches, plan = kept
        speedup, im2txt = time_im2txt(step, batches, plan, im2txt_start, sz)
        print(f"im2txt-style step (frozen InceptionV3 at {sz.cnn_px} px + the same decoder step), best: "
              f"{im2txt:.2f} captions/s")
        if not args.skip_memory:
            peak_rss, base_rss, nbytes = peak_memory(tmp, sz.memory_images, sz.vocab)
            print(f"{thousands(sz.memory_images)}-image float16 store in memory: features "
                  f"{nbytes / 2**20:.0f} MiB, peak RSS {peak_rss / 2**20:.0f} MiB "
                  f"({base_rss / 2**20:.0f} MiB after imports, {thousands(5 * sz.memory_images)} pairs)")
        print(f"headline: training from the feature cache is {speedup:.1f}x faster than the im2txt-style "
              f"step (median of {IM2TXT_ROUNDS} back-to-back pairs)")


if __name__ == "__main__":
    main()
