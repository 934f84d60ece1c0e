"""Benchmark of the attention decoder (`--arch attend`, decoder/attend.py) on this machine (CPU). One result
per line:

  1. captions/s of the attention train step (decoder.train.step.TrainStep, the loop's step: Adam, clip,
     logits at real positions only) from grids held in memory, 8x8 grid, im2txt sizes (E = U = A = 512,
     vocab 12000, batch 32), and its model FLOP utilisation = useful FLOP/s (real words only) / this
     machine's float32 dense matmul FLOP/s measured in the same run;
  2. the Show and Tell step at the same sizes (pooled features) and the attention / Show and Tell step-time
     ratio: what attention costs per caption;
  3. the same attention step fed by the grid store streamed from the h5 file (a memory budget smaller than the
     store forces it, as `--in-memory auto` does for COCO's 32 GB of grids) and the streamed / in-memory
     ratio: is the input pipeline the bottleneck?
  4. beam search (beam 3, max length 20) images/s of the attention decoder;
headline last: the streamed / in-memory ratio of step 3.
--smoke: the same lines at toy sizes (vocab 200, E = U = A = 32, batch 8, 3x3 grid, 64 images, 256^3 matmul)
in a few seconds, so tests/test_bench.py keeps it running; its numbers mean nothing.

Run: `.venv/bin/python bench/attention.py [--rounds 3] [--smoke]`.
"""

from __future__ import annotations

import os
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
from machine import bench_parser, matmul_rate  # noqa: E402  (bench/, the script's folder)

from base.devices import choose_strategy  # noqa: E402
from beam import beam_search  # noqa: E402
from data.features import create_store, open_store  # noqa: E402
from data.pipeline import FeatureSource, PairBatches, PairSet, PipelineConfig, available_memory  # noqa: E402
from decoder.attend import AttendConfig, build_attend  # noqa: E402
from decoder.config import ModelConfig  # noqa: E402
from decoder.model import build_decoder  # noqa: E402
from decoder.train.config import TrainConfig  # noqa: E402
from decoder.train.step import DecoderTrainable, TrainStep  # noqa: E402

D = 2048


@dataclass(frozen=True)
class Sizes:
    """What the bench runs at."""

    vocab: int
    width: int  # E = U = A
    batch: int
    grid: int  # h = w
    images: int  # images of the grid store (5 captions each)
    matmul: int  # n of the [n, n] @ [n, n] matmul measuring the machine's FLOP/s
    steps: int  # timed train steps per round
    beam_images: int


FULL = Sizes(vocab=12000, width=512, batch=32, grid=8, images=400, matmul=2048, steps=4, beam_images=32)
SMOKE = Sizes(vocab=200, width=32, batch=8, grid=3, images=64, matmul=256, steps=2, beam_images=4)


def make_store(path: Path, sz: Sizes, rng) -> Path:
    """A float16 grid store of sz.images random grids (and their pooled means)."""
    n, cells = sz.images, (sz.grid, sz.grid)
    with create_store(path, [f"{i}.jpg" for i in range(n)], range(n), dim=D, views=1, dtype="float16",
                      attrs={"cnn": {"arch": "InceptionV3"}}, grid=cells) as writer:
        for start in range(0, n, 64):
            k = min(64, n - start)
            grid = rng.normal(size=(k, *cells, D)).astype(np.float16)
            writer.commit(start, grid.astype(np.float32).mean(axis=(1, 2)), np.ones(k, bool), [""] * k, grid)
        writer.finish()
    return path


def pairs_for(sz: Sizes, rng) -> PairSet:
    """5 captions per image, COCO-like lengths (normal(13.3, 2.5) ids, 8..30)."""
    lengths = np.clip(rng.normal(13.3, 2.5, 5 * sz.images).round(), 8, 30).astype(np.int32)
    caps = [rng.integers(3, sz.vocab, size=n).astype(np.int32) for n in lengths]
    return PairSet(np.repeat(np.arange(sz.images), 5), caps, lengths)


def attend_flops(n_words: float, batch: int, sz: Sizes) -> float:
    """Useful FLOPs of one attention train step (real words only; backward = 2x forward where dx is
    needed, 1x for the grid projection, whose input has no gradient)."""
    w, cells = sz.width, sz.grid * sz.grid
    memory = 4 * batch * cells * (D * w + w * w)  # cell embeddings + keys: fwd + dW
    per_word = 2 * w * w + 2 * cells * w + 2 * cells * w + 8 * w * (3 * w)  # query, scores, context, LSTM
    return memory + 3 * n_words * per_word + 6 * n_words * w * sz.vocab


def tell_flops(n_words: float, batch: int, sz: Sizes) -> float:
    """Useful FLOPs of one Show and Tell train step (as bench/train_decoder.py counts them)."""
    w = sz.width
    return 4 * D * w * batch + (batch + n_words) * 6 * (2 * w) * 4 * w + 6 * n_words * w * sz.vocab


def build_step(model) -> TrainStep:
    """The loop's train step (Adam, clip 5, float32) over `model`."""
    strategy = choose_strategy()
    with strategy.scope():
        return TrainStep(DecoderTrainable(model), TrainConfig(batch_size=8, steps=1, optimizer="adam"),
                         strategy, decay_steps=0)


def time_steps(step: TrainStep, source: PairBatches, sz: Sizes, rounds: int, flops_of) -> tuple:
    """(best captions/s, median MFU) over `rounds` rounds of sz.steps steps, each between two matmuls."""
    plan = source.plan(0)
    need = 2 + rounds * sz.steps
    plan = (plan * (need // len(plan) + 1))[:need]
    dist = step.strategy.distribute_datasets_from_function(lambda ctx: source.dataset(plan, 0))
    step.compile(dist.element_spec)
    batches, i = iter(dist), 0
    for _ in range(2):  # warm-up (tracing)
        float(step(next(batches), tf.constant(i, tf.int64))[0])
        i += 1
    best, ratios = 0.0, []
    for _ in range(rounds):
        before = matmul_rate(sz.matmul)
        caps = flops = 0.0
        t0 = time.perf_counter()
        for _ in range(sz.steps):
            batch = next(batches)
            float(step(batch, tf.constant(i, tf.int64))[0])
            words = float(batch["mask"].numpy().sum())
            caps, flops, i = caps + len(plan[i]), flops + flops_of(words, len(plan[i]), sz), i + 1
        dt = time.perf_counter() - t0
        after = matmul_rate(sz.matmul)
        best = max(best, caps / dt)
        ratios.append(flops / dt / ((before + after) / 2))
    return best, float(np.median(ratios))


def main() -> None:
    parser = bench_parser(__doc__, "toy sizes, a few seconds (tests)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds per measurement")
    args = parser.parse_args()
    sz = SMOKE if args.smoke else FULL
    rng = np.random.default_rng(0)
    print(f"attention bench{' (smoke)' if args.smoke else ''}: vocab {sz.vocab}, E = U = A = {sz.width}, "
          f"batch {sz.batch}, grid {sz.grid}x{sz.grid}, {sz.images} images x 5 captions, float32")
    attend = AttendConfig(vocab_size=sz.vocab, grid_shape=[sz.grid, sz.grid], embedding_size=sz.width,
                          lstm_units=sz.width, attention_units=sz.width)
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(make_store(Path(tmp) / "grid.h5", sz, rng))
        pairs, quiet = pairs_for(sz, rng), (lambda m: None)
        held = FeatureSource(store, PipelineConfig(in_memory="yes"), log=quiet, grid=True)
        caps_s, mfu = time_steps(build_step(build_attend(attend, seed=0)),
                                 PairBatches(pairs, held, sz.batch, seed=0), sz, args.rounds, attend_flops)
        print(f"attention train step, grids in memory: {caps_s:.1f} captions/s; model FLOP utilisation "
              f"(useful FLOP/s / float32 dense matmul, median of {args.rounds} rounds): {mfu:.3f}")
        pooled = FeatureSource(store, PipelineConfig(in_memory="yes"), log=quiet)
        tell = build_decoder(ModelConfig(vocab_size=sz.vocab, embedding_size=sz.width, lstm_units=sz.width),
                             seed=0)
        tell_s, tell_mfu = time_steps(build_step(tell), PairBatches(pairs, pooled, sz.batch, seed=0), sz,
                                      args.rounds, tell_flops)
        print(f"Show and Tell train step, same sizes: {tell_s:.1f} captions/s (MFU {tell_mfu:.3f}); "
              f"attention costs {tell_s / caps_s:.2f}x its step time")
        need = store.nbytes_in_memory("grid")  # a budget of half the store: `auto` must stream it
        budget = PipelineConfig(in_memory="auto", memory_fraction=0.5 * need / available_memory())
        streamed = FeatureSource(store, budget, log=quiet, grid=True)
        assert not streamed.in_memory, "the memory budget must force streaming"
        source = PairBatches(pairs, streamed, sz.batch, seed=0)
        stream_s, _ = time_steps(build_step(build_attend(attend, seed=0)), source, sz, args.rounds,
                                 attend_flops)
        ratio = stream_s / caps_s
        print(f"attention train step, grids streamed from the store ({need / 2**20:.0f} MiB, memory budget "
              f"{need / 2**21:.0f} MiB): {stream_s:.1f} captions/s")
        model = build_attend(attend, seed=1)
        grids = held.rows(np.arange(sz.beam_images)).astype(np.float32)
        beam_search(model.initial_state(grids[:2]), model.step, start_id=1, end_id=2, beam_size=3)  # trace
        t0 = time.perf_counter()
        beam_search(model.initial_state(grids), model.step, start_id=1, end_id=2, beam_size=3, max_length=20)
        print(f"attention beam search (beam 3, max length 20, batch {sz.beam_images}): "
              f"{sz.beam_images / (time.perf_counter() - t0):.1f} images/s")
        store.close()
    print(f"headline: streamed / in-memory attention train step: {ratio:.2f} (target >= 0.90)")


if __name__ == "__main__":
    main()
