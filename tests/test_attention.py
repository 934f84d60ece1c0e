"""Attention over the cached InceptionV3 grid (issue 18): the grid store (`extract --grid`), the `attend`
decoder (decoder.attend) behind the Show and Tell contract, and `caption` with an attend model dir."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
from attend_data import SIZE, extract_grid, grid_shapes, train_tiny_attend
from helpers import assert_same_weights, checkpoint_steps, cli, kill_and_resume

from base.errors import InputError
from beam import beam_search
from data.features import create_store, open_store
from decoder.attend import AttendConfig, build_attend
from extract.encoder import grid_size
from extract.merge import merge_shards


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A small synthetic shapes set at 160 px: (root, captions.json)."""
    root = tmp_path_factory.mktemp("shapes")
    return root, grid_shapes(root)


@pytest.fixture(scope="module")
def grid_store(shapes):
    """A float16 grid store of the shapes set (the default dtype)."""
    root, captions = shapes
    extract_grid(root / "grid.h5", root / "images", captions)
    return root / "grid.h5"


def test_grid_size_formula():
    assert [grid_size(s) for s in (299, 160, 96, 75)] == [8, 3, 1, 1]


@pytest.mark.slow
def test_grid_store_pooled_is_grid_mean(shapes, grid_store, tmp_path):
    """The grid store: /grid [N, 3, 3, 2048] float16, one image per chunk, Fletcher32; the pooled row is the
    grid's mean (float32 exactly, float16 within its rounding); a pooled-only store equals its /features."""
    root, _ = shapes
    with open_store(grid_store) as store:
        assert store.grid_shape == (3, 3) and store.attrs["grid_shape"] == [3, 3]
        grid, pooled = store.read_grid(), store.read_features()
        assert grid.shape == (40, 3, 3, 2048) and grid.dtype == np.float16 and store.ok.all()
        mean = grid.astype(np.float32).mean(axis=(1, 2))
        assert np.allclose(mean, pooled.astype(np.float32), rtol=2e-3, atol=1e-3 * np.abs(pooled).max())
        assert np.abs(grid.astype(np.float32)).max() > 0  # real values, not the zero fill
    with h5py.File(grid_store) as f:
        assert f["grid"].chunks == (1, 3, 3, 2048) and f["grid"].fletcher32
    out = extract_grid(tmp_path / "f32.h5", root / "images", dtype="float32")
    plain = extract_grid(tmp_path / "plain.h5", root / "images", dtype="float32", grid=False)
    assert out.done_now == 40 and plain.done_now == 40
    with open_store(tmp_path / "f32.h5") as g, open_store(tmp_path / "plain.h5") as p:
        assert p.grid_shape is None
        np.testing.assert_allclose(g.read_grid().mean(axis=(1, 2)), g.read_features(), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(g.read_features(), p.read_features(), rtol=1e-4, atol=1e-7)
        with pytest.raises(InputError, match="holds no grid"):
            p.read_grid([0])
    with pytest.raises(InputError, match="--grid"):  # resuming a pooled store with --grid
        extract_grid(tmp_path / "plain.h5", root / "images", dtype="float32")


@pytest.mark.slow
def test_grid_store_shards_merge_and_resume(shapes, grid_store, tmp_path):
    """Two --grid shards merge into the unsharded store's grids, byte for byte; a torn commit is resumed."""
    root, captions = shapes
    parts = [tmp_path / f"s{k}.h5" for k in range(2)]
    for k, part in enumerate(parts):
        extract_grid(part, root / "images", captions, shard=k, num_shards=2)
    merge_shards([str(p) for p in parts], tmp_path / "merged.h5")
    with open_store(tmp_path / "merged.h5") as m, open_store(grid_store) as ref:
        assert m.keys == ref.keys and m.grid_shape == (3, 3)
        np.testing.assert_array_equal(m.read_grid(), ref.read_grid())
        np.testing.assert_array_equal(m.read_features(), ref.read_features())
    # an interrupted run: rows_done rolled back to 8 -> a rerun redoes rows 8.. and gives the same grids
    partial = tmp_path / "partial.h5"
    extract_grid(partial, root / "images", captions)
    with h5py.File(partial, "r+") as f:
        f["grid"][8:] = 0
        f.attrs.modify("rows_done", np.int64(8))
        f.attrs.modify("complete", np.bool_(False))
    result = extract_grid(partial, root / "images", captions)
    assert (result.skipped, result.done_now) == (8, 32)
    with open_store(partial) as p, open_store(grid_store) as ref:
        np.testing.assert_array_equal(p.read_grid(), ref.read_grid())
    manifest = json.loads(json.dumps(dict(open_store(grid_store).attrs["run"])))
    assert manifest["grid"] is True


@pytest.mark.slow
def test_grid_store_kill9_then_rerun_equals_uninterrupted(shapes, tmp_path):
    """extract --grid killed with SIGKILL mid-run, then rerun: the store equals an uninterrupted run's, byte
    for byte, grids included, every chunk's checksum valid."""
    root, _ = shapes
    out, ref = tmp_path / "killed.h5", tmp_path / "ref.h5"
    args = ["extract", root / "images", "--out", out, "--grid", "--cnn-weights", "none", "--image-size", SIZE,
            "--batch-size", "2", "--dtype", "float32", "--precision", "float32", "--no-progress"]

    def rows_done():
        try:
            with h5py.File(out, "r", locking=False) as f:
                return int(f.attrs["rows_done"])
        except (OSError, KeyError):
            return -1

    run = kill_and_resume(args, lambda: out.exists() and rows_done() >= 4,
                          lambda: extract_grid(out, root / "images", dtype="float32", batch_size=2),
                          inspect=rows_done,
                          reference=lambda: extract_grid(ref, root / "images", dtype="float32", batch_size=2),
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""})
    assert 4 <= run.at_kill < 40 and run.resumed.skipped == run.at_kill
    with open_store(out) as a, open_store(ref) as b:
        assert a.read_grid().tobytes() == b.read_grid().tobytes()
        assert a.read_features().tobytes() == b.read_features().tobytes()
    with h5py.File(out, "r") as f:
        assert f["grid"].fletcher32


# ---- the attend decoder behind the Show and Tell contract --------------------------------------------------


def _tiny(seed=0, penalty=1.0, **kw):
    config = AttendConfig(vocab_size=11, grid_shape=[3, 3], embedding_size=8, lstm_units=8, attention_units=6,
                          feature_dim=16, init_scale=0.5, attention_penalty=penalty, **kw)
    return build_attend(config, seed=seed)


def test_attend_initial_state_and_temperature():
    """"zero" (the default) starts the LSTM at 0 and has no start layers; "mean" starts it from the mean
    cell; a config written before the option existed reads as "mean". A temperature below 1 sharpens every
    attention row (same weights, same scores); a bad value is one InputError."""
    grid = np.random.default_rng(4).normal(size=(2, 9, 16)).astype(np.float32)
    zero, mean = _tiny(), _tiny(initial_state="mean")
    h, c, _, _ = zero.initial_state(grid)
    assert not np.asarray(h).any() and not np.asarray(c).any()
    assert np.abs(np.asarray(mean.initial_state(grid)[0])).max() > 1e-3
    assert len(mean.get_weights()) == len(zero.get_weights()) + 4  # init_h, init_c: kernel and bias
    old = {k: v for k, v in zero.config.to_dict().items() if k != "initial_state"}
    assert AttendConfig.from_dict(old).initial_state == "mean"
    seqs = np.array([[1, 4, 5], [1, 7, 3]], np.int32)
    sharp = _tiny(temperature=0.25)
    sharp.set_weights(zero.get_weights())
    soft, hard = zero.attention_maps(grid, seqs), sharp.attention_maps(grid, seqs)
    np.testing.assert_allclose(hard.sum(-1), 1.0, atol=1e-5)
    assert (hard.max(-1) > soft.max(-1)).all()
    for bad in ({"temperature": 0.0}, {"temperature": float("nan")}, {"initial_state": "ones"}):
        with pytest.raises(InputError):
            _tiny(**bad)


def test_attend_step_matches_teacher_forcing_and_rows_sum_to_one():
    """`step` along given words gives the teacher-forced log-probs; attention rows are distributions."""
    model = _tiny()
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(2, 9, 16)).astype(np.float32)
    seqs = np.array([[1, 4, 5, 6], [1, 7, 7, 3]], np.int32)
    logits = np.asarray(model((grid, seqs)))
    state = model.initial_state(grid)
    for t in range(seqs.shape[1]):
        log_probs, state = model.step(seqs[:, t], state)
        want = logits[:, t] - np.log(np.exp(logits[:, t]).sum(-1, keepdims=True))
        np.testing.assert_allclose(np.asarray(log_probs), want, atol=1e-5)
    maps = model.attention_maps(grid, seqs)
    assert maps.shape == (2, 4, 9)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    assert np.abs(maps[0] - maps[1]).max() > 1e-4  # the weights depend on the image and the words


def test_attend_beam_search_reorders_the_grid_with_the_beams():
    """Batched beam search over the attend state (h, c, cells, keys) gives each image the captions it gets
    alone: the per-image memory is reordered with the beams."""
    model = _tiny(seed=1)
    grid = np.random.default_rng(1).normal(size=(3, 9, 16)).astype(np.float32)
    args = dict(start_id=1, end_id=2, beam_size=3, max_length=8)
    batched = beam_search(model.initial_state(grid), model.step, **args)
    for i in range(3):
        alone = beam_search(model.initial_state(grid[i:i + 1]), model.step, **args)[0]
        assert [c.tokens for c in batched[i]] == [c.tokens for c in alone]
        np.testing.assert_allclose([c.logprob for c in batched[i]], [c.logprob for c in alone], atol=1e-5)


def test_attend_penalty_only_while_training():
    """The doubly stochastic penalty is added to the training loss only; validation is plain cross-entropy."""
    rng = np.random.default_rng(2)
    grid = rng.normal(size=(2, 9, 16)).astype(np.float32)
    inputs = np.array([[1, 4, 5], [1, 7, 0]], np.int32)
    targets = np.array([[4, 5, 2], [7, 2, 0]], np.int32)
    mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
    with_penalty, without = _tiny(penalty=1.0), _tiny(penalty=0.0)
    ce, words = (float(x) for x in without.loss_sums(grid, inputs, targets, mask))
    assert words == 5.0
    assert float(with_penalty.loss_sums(grid, inputs, targets, mask)[0]) == pytest.approx(ce, rel=1e-6)
    seed = np.array([3, 4], np.int32)
    model = with_penalty
    alphas = model.attention_maps(grid, inputs)
    coverage = (alphas * mask[..., None]).sum(1)
    model.config.dropout_keep = 1.0  # no dropout: the difference is exactly the penalty
    trained = float(model.loss_sums(grid, inputs, targets, mask, training=True, seed=seed)[0])
    assert trained == pytest.approx(ce + float(np.square(1 - coverage).sum()), rel=1e-5)


# ---- train-decoder --arch attend, caption, refusals -----------------------------------------------------


@pytest.mark.slow
def test_attend_trains_and_resumes_exactly_after_kill9(shapes, grid_store, tmp_path):
    """`train-decoder --arch attend` killed with SIGKILL after its step-4 checkpoint, then rerun, ends with
    the weights of an uninterrupted run; the model dir records arch "attend" and the grid."""
    _, captions = shapes
    out, every = tmp_path / "killed", {"eval_every": 4, "checkpoint_every": 4}  # as the command line below
    argv = ["train-decoder", "--features", grid_store, "--captions", captions, "--model-dir", out,
            "--arch", "attend", "--attention-units", 8, "--embedding-size", 16, "--lstm-units", 16,
            "--feature-norm", "standardize", "--optimizer", "adam", "--learning-rate", 0.01, "--steps", 40,
            "--batch-size", 16, "--min-word-count", 1, "--precision", "float32", "--checkpoint-every", 4,
            "--eval-every", 4, "--no-progress"]
    run = kill_and_resume(argv, lambda: 4 in checkpoint_steps(out),
                          lambda: train_tiny_attend(grid_store, captions, out, 40, **every),
                          reference=lambda: train_tiny_attend(grid_store, captions, tmp_path / "straight", 40,
                                                              **every))
    assert run.reference.step == 40 and np.isfinite(run.reference.val_perplexity)
    assert 4 <= run.resumed.resumed_from < 40 and run.resumed.step == 40
    assert_same_weights(out, tmp_path / "straight", atol=1e-6)
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["arch"] == "attend" and config["model"]["grid_shape"] == [3, 3]
    assert config["model"]["initial_state"] == "zero"


@pytest.fixture(scope="module")
def attend_model(shapes, grid_store, tmp_path_factory):
    """An attend model dir trained by `train-decoder --arch attend` (CLI) on the grid store."""
    _, captions = shapes
    model = tmp_path_factory.mktemp("attend") / "model"
    cli("train-decoder", "--features", grid_store, "--captions", captions, "--model-dir", model,
        "--arch", "attend", "--attention-units", "8", "--embedding-size", "16", "--lstm-units", "16",
        "--feature-norm", "standardize", "--optimizer", "adam", "--learning-rate", "0.01", "--steps", "40",
        "--batch-size", "16", "--min-word-count", "1", "--precision", "float32", "--no-progress")
    return model


@pytest.mark.slow
def test_attend_cli_caption_heatmaps_and_refusals(shapes, grid_store, attend_model, tmp_path):
    """caption --json --attention with an attend model dir: one PNG per image (image + one panel per word),
    weights in the JSON summing to 1 per word; pooled-only stores, grids of another size and a Show and
    Tell model dir given --attention are one-line errors."""
    root, captions = shapes
    model = attend_model
    out = cli("caption", "--model-dir", model, "--features", grid_store, "--json", tmp_path / "r.json",
              "--attention", tmp_path / "maps", "--images", root / "images", "--no-progress",
              "--precision", "float32")
    assert "caption: 40 images | captioned 40" in out.stdout
    results = json.loads((tmp_path / "r.json").read_text())
    assert len(results) == 40
    for entry in results:
        att = entry["attention"]
        assert att["grid"] == [3, 3] and att["words"] == entry["caption"].split()
        assert np.allclose(np.sum(att["weights"], axis=1), 1.0, atol=1e-3) if att["words"] else True
    pngs = sorted((tmp_path / "maps").glob("*.png"))
    assert len(pngs) == 40
    from PIL import Image

    first = next(e for e in results if e["file_name"] == "shape_00000.jpg")
    with Image.open(pngs[0]) as im:
        assert im.size == (128 * (1 + len(first["attention"]["words"])), 128 + 18)
    # refusals: a pooled-only store; a 2x2 grid store of the same CNN; --attention with Show and Tell
    pooled = tmp_path / "pooled.h5"
    extract_grid(pooled, root / "images", captions, grid=False)
    bad = cli("caption", "--model-dir", model, "--features", pooled, check=False)
    assert bad.returncode == 2 and "holds pooled features only" in bad.stderr
    assert len([line for line in bad.stderr.splitlines() if line.startswith("Error:")]) == 1
    assert "Traceback" not in bad.stderr
    with open_store(grid_store) as ref:
        keys, ids, cnn = ref.keys[:2], ref.image_ids[:2], ref.cnn
    other = tmp_path / "other.h5"
    with create_store(other, keys, ids, dim=2048, views=1, dtype="float16", attrs={"cnn": cnn},
                      grid=(2, 2)) as writer:
        writer.commit(0, np.ones((2, 2048)), np.ones(2, bool), ["", ""], np.ones((2, 2, 2, 2048)))
        writer.finish()
    bad = cli("caption", "--model-dir", model, "--features", other, check=False)
    assert bad.returncode == 2 and "holds 2x2 grids but the attention model" in bad.stderr
    bad = cli("train-decoder", "--features", pooled, "--captions", captions, "--model-dir", tmp_path / "x",
              "--arch", "attend", "--steps", "2", check=False)
    assert bad.returncode == 2 and "holds pooled features only" in bad.stderr


@pytest.mark.slow
def test_attend_export_equals_caption(grid_store, attend_model, tmp_path):
    """export of an attend model dir: captions, log-probs (1e-4) and the attention output of both signatures
    equal `caption`'s; attention rows sum to 1 for the real words and are 0 after them."""
    import tensorflow as tf

    from decoder.infer.captioner import Captioner, caption_store

    cli("export", "--model-dir", attend_model, "--out", tmp_path / "exp", "--precision", "float32")
    module = tf.saved_model.load(str(tmp_path / "exp"))
    with open_store(grid_store) as store:
        keys, grid = store.keys[:6], store.read_grid(np.arange(6)).astype(np.float32)
    got = module.signatures["caption_features"](features=tf.constant(grid))
    assert got["attention"].shape == (6, 3, 19, 9)
    run = caption_store(Captioner(attend_model), grid_store, keys, progress=False)
    for i, item in enumerate(run.results):
        assert got["captions"][i, 0].numpy().decode() == item.texts[0]
        assert abs(float(got["log_probs"][i, 0]) - item.captions[0].logprob) < 1e-4
        n, weights = len(item.attention), got["attention"][i, 0].numpy()
        np.testing.assert_allclose(weights[:n], item.attention.reshape(n, 9), atol=1e-5)
        np.testing.assert_allclose(weights[:n].sum(-1), 1.0, atol=1e-5)
        assert not weights[n:].any()
    root = grid_store.parent / "images"
    images = [(root / k).read_bytes() for k in keys[:2]] + [b"not an image"]
    served = module.signatures["serving_default"](images=tf.constant(images))
    assert served["ok"].numpy().tolist() == [True, True, False]
    assert served["attention"].shape == (3, 3, 19, 9) and not served["attention"][2].numpy().any()


@pytest.mark.slow
def test_attend_evaluate_and_scst(shapes, grid_store, attend_model, tmp_path):
    """evaluate and train-scst take an attend model dir and its grid store."""
    _, captions = shapes
    out = cli("evaluate", "--model-dir", attend_model, "--features", grid_store, "--captions", captions,
              "--split", "test", "--java", "no", "--out-dir", tmp_path / "eval", "--no-progress")
    assert "evaluate: 4 images" in out.stdout + out.stderr
    cli("train-scst", "--model-dir", attend_model, "--features", grid_store, "--captions", captions,
        "--out", tmp_path / "scst", "--steps", "2", "--batch-size", "4", "--samples", "2", "--no-progress")
    assert json.loads((tmp_path / "scst" / "config.json").read_text())["arch"] == "attend"


def test_pointing_counts_the_named_object_only():
    """The arg-max cell must overlap the object the word names; words naming no single object do not count."""
    from evaluation.pointing import pointing_accuracy

    objects = [{"colour": "red", "shape": "circle", "size": "small", "x": 40, "y": 40},
               {"colour": "blue", "shape": "circle", "size": "small", "x": 120, "y": 120}]
    peak = np.zeros((4, 3, 3), np.float32)
    peak[0, 0, 0] = peak[1, 2, 2] = peak[2, 0, 0] = peak[3, 0, 0] = 1.0  # red: top-left, blue: bottom-right
    words = ["red", "blue", "circle", "green"]  # "circle" names both, "green" neither: not counted
    hits, words_counted, chance = pointing_accuracy([(words, peak, objects)], 160, 185)
    assert (hits, words_counted) == (2, 2) and 0.05 < chance < 0.35  # ~2 cells in 9 count
    wrong = peak[:, ::-1, ::-1]  # every word looks at the other object
    assert pointing_accuracy([(words, wrong, objects)], 160, 185)[:2] == (0, 2)
    assert pointing_accuracy([(words, peak, objects[:1])], 160, 185)[:2] == (0, 0)  # one-shape: skipped
