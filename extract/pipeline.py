"""The extraction input pipeline (tf.data) and the batched CNN call, CPU or GPU(s).

Decoding runs in PIL inside `tf.numpy_function` in a parallel `map` (PIL releases the GIL while decoding),
preprocessing is `extract.preprocess.preprocess` as TF ops, then batch + prefetch, so the CNN never waits
for I/O. A file that fails to decode yields a 1x1 black image with ok=False and the reason; its features
are zeroed by the run. Distorted views (--views V) are seeded per (seed, key, view), so they do not depend
on batch size, shard or resume point.
"""

import json
import os
import zlib

import numpy as np
import tensorflow as tf

from base.devices import PRECISIONS, choose_strategy, dtype_policy, inference_precision
from data.shard_readers import SampleError, ShardMember
from extract.encoder import CNNSpec, encoder_and_spec
from extract.preprocess import MAX_PIXELS, BadImage, decode_image, preprocess


def key_seeds(keys: list[str], seed: int) -> np.ndarray:
    """int32 [N, 2]: the per-row stateless seed (seed, crc32(key)) of the distorted views."""
    crc = np.array([zlib.crc32(k.encode("utf-8")) & 0x7FFFFFFF for k in keys], dtype=np.int64)
    return np.stack([np.full_like(crc, int(seed) & 0x7FFFFFFF), crc], axis=1).astype(np.int32)


def read_source(source):
    """What `decode_image` takes for a row's source: a path as is, a shard member's bytes (data.shards);
    BadImage("unreadable: ...") when the shard cannot be read there."""
    if not isinstance(source, ShardMember):
        return source
    try:
        return source.read()
    except SampleError as err:
        raise BadImage(str(err)) from None
    except OSError as err:
        raise BadImage(f"unreadable: {err}") from None


def _loader(files: list, image_size: int, max_pixels: int):
    def load(index):
        path = files[int(index)]
        if path is None:
            return np.zeros((1, 1, 3), np.uint8), False, b"missing: not found under any --images root"
        try:
            return decode_image(read_source(path), image_size, max_pixels), True, b""
        except BadImage as err:
            return np.zeros((1, 1, 3), np.uint8), False, str(err).encode("utf-8")

    return load


def make_dataset(files: list, keys: list[str], start: int, *, image_size: int, views: int, seed: int,
                 batch_size: int, max_pixels: int = MAX_PIXELS) -> tf.data.Dataset:
    """Batches of rows [start, N): (float32 [B, S, S, 3] or [B, V, S, S, 3], ok bool [B], errors str [B])."""
    seeds = tf.constant(key_seeds(keys, seed))
    load = _loader(files, image_size, max_pixels)

    def decode(index):
        image, ok, err = tf.numpy_function(load, [index], [tf.uint8, tf.bool, tf.string], stateful=False)
        image.set_shape([None, None, 3])
        ok.set_shape([])
        err.set_shape([])
        return index, image, ok, err

    def prep(index, image, ok, err):
        out = [preprocess(image, image_size)]
        for view in range(1, views):
            view_seed = tf.random.experimental.stateless_fold_in(seeds[index], view)
            out.append(preprocess(image, image_size, training=True, seed=view_seed))
        return (out[0] if views == 1 else tf.stack(out)), ok, err

    ds = tf.data.Dataset.range(start, len(files))
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def make_infer(model, strategy: tf.distribute.Strategy):
    """float32 [B, S, S, 3] -> np.float32 [B, 2048]; splits the batch over the replicas of `strategy`.

    Every replica gets ceil(B / replicas) rows: the batch is padded with zero images whose rows are dropped
    (the CNN runs in inference mode, so a row does not depend on the others). Never an empty per-replica
    batch: TensorFlow's CPU (oneDNN) convolution returns a wrongly shaped result for one."""

    def call(x):
        return tf.cast(model(x, training=False), tf.float32)

    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        step = tf.function(call, reduce_retracing=True)
        return lambda x: step(x).numpy()

    @tf.function(reduce_retracing=True)
    def step(dist):  # one graph: every replica's CNN call and the gather
        return strategy.gather(strategy.run(call, args=(dist,)), axis=0)

    def infer(x):
        x = np.asarray(x, np.float32)
        n, per = len(x), -(-len(x) // replicas)
        padded = np.concatenate([x, np.zeros((per * replicas - n, *x.shape[1:]), np.float32)])

        def part(ctx):
            rid = ctx.replica_id_in_sync_group
            return tf.constant(padded[rid * per : (rid + 1) * per])

        return step(strategy.experimental_distribute_values_from_function(part)).numpy()[:n]

    return infer


_BUILT: dict = {}  # the last encoders built in this process, keyed by CNN block, weights mtime, devices
_KEEP = 2


def inference_encoder(spec, precision: str | None = None, grid: bool = False):
    """(infer, CNNSpec with its fingerprint) for a CNN block: `infer(float32 [B, S, S, 3]) -> np.float32
    [B, 2048]` (with `grid`: the Mixed_7c map np.float32 [B, h, w, 2048], extract.encoder.build_encoder),
    computed under the Keras dtype policy `precision` (float32, mixed_float16, mixed_bfloat16;
    None: base.devices.inference_precision(), i.e. the command's --precision or auto); the features come
    back float32 whatever the compute dtype. With several accelerators: a MirroredStrategy over them.

    The last two encoders are kept, so several runs in one process (demo, tests, extract then caption)
    build each once. The key is the block without its recorded fingerprint (the built one is returned), the
    weights file's mtime, the compute precision and the strategy: an encoder built for other devices or
    another precision is never reused.
    """
    spec = spec if isinstance(spec, CNNSpec) else CNNSpec.from_dict(spec)
    weights_path = spec.weights.removeprefix("slim:")
    mtime = os.path.getmtime(weights_path) if os.path.isfile(weights_path) else None
    strategy, precision = choose_strategy(local=True), precision or inference_precision("caption")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}")
    key = json.dumps([{**spec.to_dict(), "fingerprint": ""}, mtime, precision, id(strategy), grid],
                     sort_keys=True)
    if key not in _BUILT:
        built = _build_new(spec, strategy, precision, grid)
        while len(_BUILT) >= _KEEP:
            _BUILT.pop(next(iter(_BUILT)))
        _BUILT[key] = built
    return _BUILT[key]


def encode_batch(infer, x: np.ndarray, grid: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """One CNN call of either engine: pixels float32 [B, S, S, 3] -> (pooled np.float32 [B, 2048], grid
    np.float32 [B, h, w, 2048] or None). With `grid` (an encoder from inference_encoder(..., grid=True))
    the pooled row is the mean of the float32 grid over h and w (InceptionV3's average pool)."""
    out = infer(x)
    return (out.mean(axis=(1, 2)), out) if grid else (out, None)


def _build_new(spec, strategy, precision: str, grid: bool = False):
    with dtype_policy(precision), strategy.scope():
        model, spec = encoder_and_spec(spec, grid=grid)
    return make_infer(model, strategy), spec
