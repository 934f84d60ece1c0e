"""Benchmark: batched beam search vs. the per-image im2txt-style loop, on a decoder at im2txt's sizes.

Decoder (vocab 12000, embedding 512, LSTM 512, feature 2048, random weights uniform +-0.08) written with
plain TF ops here (default; --backend numpy: NumPy) so the bench depends on nothing but beam/;
--backend decoder uses the project's decoder/model.py instead.
64 images, beam 3, max length 20 (im2txt defaults).
--smoke: the same lines at toy sizes (vocab 200, embedding 32, LSTM 32, 8 images, 1 repeat) in a few seconds,
so the test suite keeps the bench running (tests/test_bench.py); its numbers mean nothing.
The reference (tests/beam_reference.py) is im2txt's loop: per image, one step call per time step on that
image's partial captions (batched as im2txt did), a full argsort of each partial's word probabilities.
Both searches use the same step function. Prints one result per line, the headline ratio last.

    python bench/beam.py [--images 64] [--beam 3] [--max-length 20] [--repeats 2] [--backend tf|numpy|decoder]
                         [--smoke]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from machine import bench_parser, precisions  # noqa: E402  (bench/, the script's folder)

FULL = dict(vocab=12000, embed=512, units=512)  # im2txt's sizes
SMOKE = dict(vocab=200, embed=32, units=32)

from beam_reference import reference_beam_search  # noqa: E402

from beam import beam_search  # noqa: E402


def _weights(vocab, embed, units, feature, seed):
    """im2txt-sized random weights, uniform +-0.08 (im2txt's initialiser), float32."""
    rng = np.random.default_rng(seed)

    def u(*shape):
        return rng.uniform(-0.08, 0.08, size=shape).astype(np.float32)

    return dict(image_embedding=u(feature, embed), seq_embedding=u(vocab, embed),
                kernel=u(embed + units, 4 * units), bias=np.zeros(4 * units, np.float32),
                logits_w=u(units, vocab), logits_b=np.zeros(vocab, np.float32))


class NumpyDecoder:
    """Show and Tell decoder in NumPy float32: image embedding, word embedding, one BasicLSTMCell, logits."""

    def __init__(self, vocab=12000, embed=512, units=512, feature=2048, seed=0):
        self.units, self.w = units, _weights(vocab, embed, units, feature, seed)

    def _lstm(self, x, c, h):
        z = np.concatenate([x, h], axis=1) @ self.w["kernel"] + self.w["bias"]
        i, j, f, o = np.split(z, 4, axis=1)
        sig = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
        c = c * sig(f + 1.0) + sig(i) * np.tanh(j)
        return c, np.tanh(c) * sig(o)

    def initial_state(self, features):
        """features float32 [B, 2048] -> (c, h) float32 [B, U] each."""
        zeros = np.zeros((features.shape[0], self.units), np.float32)
        return self._lstm(features @ self.w["image_embedding"], zeros, zeros)

    def step(self, tokens, state):
        """tokens int32 [N], (c, h) [N, U] -> (log_probs float32 [N, V], (c, h))."""
        c, h = self._lstm(self.w["seq_embedding"][tokens], *state)
        logits = h @ self.w["logits_w"] + self.w["logits_b"]
        logits -= logits.max(axis=1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)), (c, h)


class TFDecoder:
    """The same decoder in plain TF ops; `step` is one tf.function (no retracing across N). `dtype`
    "bfloat16": the matmuls run in bfloat16 (weights and inputs cast), the LSTM state, the gates and the
    log-softmax stay float32 (what a mixed_bfloat16 decoder step would do)."""

    def __init__(self, vocab=12000, embed=512, units=512, feature=2048, seed=0, dtype="float32"):
        import tensorflow as tf

        self.tf, self.units, self.dtype = tf, units, dtype
        self.w = {k: tf.constant(v) for k, v in _weights(vocab, embed, units, feature, seed).items()}
        for k in ("image_embedding", "kernel", "logits_w"):
            self.w[k] = tf.cast(self.w[k], dtype)
        spec = tf.TensorSpec([None, units], tf.float32)
        self.step = tf.function(self._step, input_signature=[tf.TensorSpec([None], tf.int32), (spec, spec)])

    def _mm(self, x, w):
        """float32 [N, K] @ w (in self.dtype) -> float32 [N, M]."""
        return self.tf.cast(self.tf.matmul(self.tf.cast(x, self.dtype), w), self.tf.float32)

    def _lstm(self, x, c, h):
        tf = self.tf
        z = self._mm(tf.concat([x, h], axis=1), self.w["kernel"]) + self.w["bias"]
        i, j, f, o = tf.split(z, 4, axis=1)
        c = c * tf.sigmoid(f + 1.0) + tf.sigmoid(i) * tf.tanh(j)
        return c, tf.tanh(c) * tf.sigmoid(o)

    def initial_state(self, features):
        """features float32 [B, 2048] -> (c, h) float32 tf.Tensor [B, U] each."""
        zeros = self.tf.zeros((features.shape[0], self.units))
        return self._lstm(self._mm(features, self.w["image_embedding"]), zeros, zeros)

    def _step(self, tokens, state):
        """tokens int32 [N], (c, h) [N, U] -> (log_probs float32 [N, V], (c, h))."""
        tf = self.tf
        c, h = self._lstm(tf.gather(self.w["seq_embedding"], tokens), *state)
        logits = self._mm(h, self.w["logits_w"]) + self.w["logits_b"]
        return tf.nn.log_softmax(logits), (c, h)


def project_decoder(vocab=12000, embed=512, units=512, feature=2048):
    """decoder/model.py's ShowAndTell (default: im2txt sizes), random weights, seed 0."""
    from decoder.config import ModelConfig
    from decoder.model import build_decoder

    return build_decoder(ModelConfig(vocab_size=vocab, embedding_size=embed, lstm_units=units,
                                     feature_dim=feature), seed=0)


def timed(fn, repeats):
    """(best wall time in s over `repeats` runs, the last result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def step_share(model, init, beam, kw):
    """Share of the batched search's time spent inside step_fn (the model: the floor for any search)."""
    inside = [0.0]

    def timed_step(tokens, state):
        t0 = time.perf_counter()
        logp, new_state = model.step(tokens, state)
        logp = np.asarray(logp)  # include the device-to-host copy of log_probs
        inside[0] += time.perf_counter() - t0
        return logp, new_state

    total, _ = timed(lambda: beam_search(init, timed_step, beam_size=beam, **kw), 1)
    return inside[0] / total


def parity(model, init, beam, kw, got, want):
    """(images with identical captions, differing images, of those: identical when searched alone)."""
    tokens = lambda caps: [c.tokens if hasattr(c, "tokens") else c[0] for c in caps]  # noqa: E731
    diff = [i for i in range(len(got)) if tokens(got[i]) != tokens(want[i])]
    alone = 0
    for i in diff:  # one image alone feeds the model the same row counts as the reference
        caps = beam_search(tuple(np.asarray(s)[i:i + 1] for s in init), model.step, beam_size=beam, **kw)[0]
        alone += tokens(caps) == tokens(want[i])
    return len(got) - len(diff), len(diff), alone


def bfloat16_lines(args, sizes, feats, kw, t_f32: float, got) -> None:
    """The batched search with bfloat16 matmuls (TFDecoder(dtype="bfloat16")) against float32: images/s,
    their ratio, identical best captions and the largest |log p| difference of the best captions."""
    names, cpu_line = precisions()
    print(cpu_line)
    if "mixed_bfloat16" not in names or args.backend != "tf":
        print("bfloat16 lines skipped" + ("" if "mixed_bfloat16" not in names else " (--backend tf only)"))
        return
    model = TFDecoder(**sizes, dtype="bfloat16")
    init = model.initial_state(feats)
    for n in (1, args.beam, args.images * args.beam):  # warm-up
        model.step(np.ones(n, np.int32), tuple(np.repeat(np.asarray(s)[:1], n, 0) for s in init))
    t_bf16, bf16 = timed(lambda: beam_search(init, model.step, beam_size=args.beam, **kw), args.repeats)
    same = sum(a[0].tokens == b[0].tokens for a, b in zip(got, bf16, strict=True))
    gap = max(abs(a[0].logprob - b[0].logprob) for a, b in zip(got, bf16, strict=True))
    print(f"[bfloat16 matmuls, float32 state] batched beam search: {args.images / t_bf16:.1f} images/s; "
          f"bfloat16 / float32: {t_f32 / t_bf16:.2f}x; identical best captions {same}/{args.images}, "
          f"max |log p difference| of the best captions {gap:.3f}")


def main():
    ap = bench_parser(__doc__, "toy sizes (vocab 200, 32 units, 8 images, 1 repeat): checks the bench runs")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--backend", choices=["tf", "numpy", "decoder"], default="tf",
                    help="the decoder: plain TF ops, NumPy, or the project's decoder/model.py")
    args = ap.parse_args()
    sizes = SMOKE if args.smoke else FULL
    if args.smoke:
        args.images, args.repeats = min(args.images, 8), 1
    model = {"tf": TFDecoder, "numpy": NumpyDecoder, "decoder": project_decoder}[args.backend](**sizes)
    feats = np.random.default_rng(1).normal(size=(args.images, 2048)).astype(np.float32)
    init = model.initial_state(feats)
    kw = dict(start_id=1, end_id=2, max_length=args.max_length)
    for n in (1, args.beam, args.images * args.beam):  # warm-up
        model.step(np.ones(n, np.int32), tuple(np.repeat(np.asarray(s)[:1], n, 0) for s in init))
    t_batch, got = timed(lambda: beam_search(init, model.step, beam_size=args.beam, **kw), args.repeats)
    t_ref, want = timed(lambda: reference_beam_search(init, model.step, beam_size=args.beam, **kw), 1)
    share = step_share(model, init, args.beam, kw)
    same, ndiff, alone = parity(model, init, args.beam, kw, got, want)
    print(f"config{' (smoke)' if args.smoke else ''}: vocab {sizes['vocab']}, embedding {sizes['embed']}, "
          f"LSTM {sizes['units']}, {args.images} images, beam {args.beam}, max length {args.max_length}, "
          f"{args.backend} float32 ops, random weights")
    print(f"batched beam search: {args.images / t_batch:.1f} images/s ({t_batch:.2f} s)")
    print(f"per-image im2txt reference: {args.images / t_ref:.1f} images/s ({t_ref:.2f} s)")
    print(f"batched: {share:.0%} of the time inside step_fn (the model, the floor), search {1 - share:.0%}")
    print(f"identical captions, batched vs per-image: {same}/{args.images}")
    print(f"differing images searched alone (same row counts, so same float round-off as the reference): "
          f"{alone}/{ndiff} identical")
    bfloat16_lines(args, sizes, feats, kw, t_batch, got)
    print(f"speed-up batched / per-image: {t_ref / t_batch:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
