"""data/pipeline.py: pairs from store + captions, epoch plans (shuffle, bucketing), replica shares, views."""

from pathlib import Path

import numpy as np
from helpers import write_store

from data.captions import ImageRecord
from data.features import open_store
from data.pipeline import (
    FeatureSource,
    PairBatches,
    PairSet,
    PipelineConfig,
    epoch_plan,
    eval_plan,
    feature_stats,
    match_pairs,
    pad_captions,
)
from data.vocab import Vocabulary


def test_match_pairs_counts_missing_and_bad_rows():
    vocab = Vocabulary.build(["a red circle"] * 4, min_count=1)
    records = [ImageRecord(1, "x.jpg", "train", ["a red circle", "a circle"]),
               ImageRecord(2, "gone.jpg", "train", ["red"]),
               ImageRecord(3, "bad.jpg", "train", ["a", "b", "c"])]
    pairs = match_pairs(records, ["bad.jpg", "x.jpg"], np.array([False, True]), vocab)
    assert list(pairs.rows) == [1, 1]
    assert pairs.stats["missing_image"] == 1 and pairs.stats["missing_examples"] == ["gone.jpg"]
    assert pairs.stats["bad_image"] == 3 and pairs.stats["pairs"] == 2
    assert pairs.captions[0][0] == vocab.start_id and pairs.captions[0][-1] == vocab.end_id
    assert list(pairs.lengths) == [5, 4]


def test_epoch_plan_shuffles_buckets_and_covers_every_pair():
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 30, size=1000).astype(np.int32)
    plan0 = epoch_plan(lengths, 32, epoch=0, seed=1, pool_batches=8)
    assert sorted(np.concatenate(plan0).tolist()) == list(range(1000))
    assert all(len(b) <= 32 for b in plan0)
    again = epoch_plan(lengths, 32, epoch=0, seed=1, pool_batches=8)
    assert all((a == b).all() for a, b in zip(plan0, again, strict=False))
    plan1 = epoch_plan(lengths, 32, epoch=1, seed=1, pool_batches=8)
    assert not all(len(a) == len(b) and (a == b).all() for a, b in zip(plan0, plan1, strict=False))

    def padding(plan):
        return sum(lengths[b].max() * len(b) - lengths[b].sum() for b in plan)

    unbucketed = epoch_plan(lengths, 32, epoch=0, seed=1, pool_batches=0, bucket_width=1000)
    assert padding(plan0) < 0.25 * padding(unbucketed)
    assert padding(eval_plan(lengths, 32)) <= padding(plan0)


def test_pad_captions_shifts_targets_and_masks_padding():
    inputs, targets, mask = pad_captions([np.array([1, 5, 6, 2]), np.array([1, 2])], 4)
    np.testing.assert_array_equal(inputs, [[1, 5, 6], [1, 0, 0]])
    np.testing.assert_array_equal(targets, [[5, 6, 2], [2, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])


def _source(tmp_path: Path, views=1, in_memory="yes"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shape = (10, views, 4) if views > 1 else (10, 4)
    feats = rng.normal(size=shape).astype(np.float16)
    store = open_store(write_store(tmp_path / f"f{views}.h5", [f"{i}.jpg" for i in range(10)], feats))
    caps = [np.arange(1, 3 + i % 4, dtype=np.int32) for i in range(20)]
    pairs = PairSet(np.repeat(np.arange(10), 2), caps, np.array([len(c) for c in caps], np.int32))
    cfg = PipelineConfig(in_memory=in_memory)
    return PairBatches(pairs, FeatureSource(store, cfg, log=lambda m: None), 4, seed=0, config=cfg), feats


def test_replica_shares_and_streaming_match_memory(tmp_path):
    source, feats = _source(tmp_path)
    plan = source.plan(0)
    shares = list(source.generator(plan, 0, 0, [0, 1], 2))
    assert len(shares) == 2 * len(plan)
    first = plan[0]
    got = np.concatenate([shares[0]["features"], shares[1]["features"]])
    np.testing.assert_array_equal(got, feats[source.pairs.rows[first]].astype(np.float32))
    assert shares[0]["global_words"] == shares[1]["global_words"] == (source.pairs.lengths[first] - 1).sum()
    streamed, _ = _source(tmp_path / "s", in_memory="no")
    assert streamed.features.array is None
    a = [b["features"] for b in streamed.generator(plan, 0, 0, [0], 1)]
    b = [b["features"] for b in source.generator(plan, 0, 0, [0], 1)]
    assert all((x == y).all() for x, y in zip(a, b, strict=False))
    resumed = list(source.generator(plan, 0, 2, [0], 1))
    assert len(resumed) == len(plan) - 2


def test_one_view_sampled_per_example(tmp_path):
    source, feats = _source(tmp_path, views=3)
    idx = np.arange(20)
    train = source.load_inputs(idx, np.random.default_rng(0))[0]["features"]
    assert train.shape == (20, 4)
    picked = [int(np.argmin(np.abs(feats[source.pairs.rows[i]].astype(np.float32) - train[i]).sum(1)))
              for i in idx]
    assert len(set(picked)) > 1
    val = source.load_inputs(idx, None)[0]["features"]
    np.testing.assert_array_equal(val, feats[source.pairs.rows, 0].astype(np.float32))
    ds = source.dataset(source.plan(0), 0)
    assert next(iter(ds))["features"].shape[1] == 4


def test_feature_stats_over_training_rows(tmp_path):
    """Mean / inverse std per dimension over the given rows (each row once, every view); constant -> 0."""
    rng = np.random.default_rng(2)
    feats = rng.normal(3.0, 0.01, size=(10, 2, 4)).astype(np.float32)
    feats[:, :, 3] = 7.0  # a dead unit: constant over every image
    store = open_store(write_store(tmp_path / "f.h5", [f"{i}.jpg" for i in range(10)], feats))
    source = FeatureSource(store, PipelineConfig(in_memory="no"), log=lambda m: None)
    rows = np.array([0, 1, 2, 2, 5, 0], np.int64)  # pairs repeat images: stats count each image once
    mean, inv_std = feature_stats(source, rows, chunk=2)
    ref = store.read_features()[[0, 1, 2, 5]].reshape(-1, 4).astype(np.float64)  # as stored (float16)
    np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-6)
    np.testing.assert_allclose(inv_std[:3], 1 / ref[:, :3].std(0), rtol=1e-3)
    assert inv_std[3] == 0.0 and mean.dtype == inv_std.dtype == np.float32
