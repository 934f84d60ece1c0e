"""`extract` end to end (in process, 75 px, --cnn-weights none): format, bad inputs, resume, shards, views."""

import errno
import json
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import make_good_images, make_odd_images

from base.errors import InputError, RunStopped
from data.features import StoreWriter, open_store
from extract.merge import merge_shards
from extract.run import ExtractConfig, run_extract

S = 75
BAD = {"odd/zero.jpg": "empty", "odd/text.jpg": "not-an-image", "odd/truncated.jpg": "truncated",
       "odd/bomb.jpg": "bomb"}


def _cfg(out, **kw) -> ExtractConfig:
    base = {"cnn_weights": "none", "image_size": S, "batch_size": 4, "dtype": "float32", "progress": False,
            "precision": "float32"}  # the comparisons allow float32 round-off (bfloat16: test_precision.py)
    return ExtractConfig(out=str(out), **{**base, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """imgs/a: 5 JPEGs; imgs/odd: every odd case; caps.json: COCO captions of a/ + one missing image."""
    root = tmp_path_factory.mktemp("extract")
    make_good_images(root / "imgs" / "a", n=5)
    make_odd_images(root / "imgs" / "odd")
    names = [f"img{i:02d}.jpg" for i in range(5)] + ["gone.jpg"]
    coco = {"images": [{"id": 100 + i, "file_name": n} for i, n in enumerate(names)],
            "annotations": [{"id": i, "image_id": 100 + i, "caption": f"a picture number {i}"}
                            for i in range(len(names))]}
    (root / "caps.json").write_text(json.dumps(coco))
    return root


class Loaded:
    """A feature store read into memory (so the file is not held open)."""

    def __init__(self, path):
        with open_store(path) as s:
            self.keys, self.ok, self.errors, self.image_ids = s.keys, s.ok, s.errors, s.image_ids
            self.cnn, self.attrs, self.complete, self.dtype = s.cnn, s.attrs, s.complete, s.dtype
            self.features = s.read_features()

    def __len__(self):
        return len(self.keys)

    def read_features(self, rows=None):
        return self.features if rows is None else self.features[rows]


@pytest.fixture(scope="module")
def full(data):
    """The reference run over the whole imgs/ folder: (result, store loaded in memory)."""
    result = run_extract(_cfg(data / "full.h5", paths=[str(data / "imgs")]))
    return result, Loaded(data / "full.h5")


def _close(a, b):
    """Equal up to float round-off (other batch composition); random-init features are ~1e-3."""
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-7)


def _differs(a, b) -> bool:
    return not np.allclose(a, b, rtol=1e-2, atol=1e-6)


def _row(store, key):
    return store.read_features([store.keys.index(key)])[0]


def test_format_and_every_bad_input_is_recorded(full):
    result, store = full
    assert store.complete and len(store) == 17 and store.dtype == np.float32
    assert store.read_features().shape == (17, 2048)
    rows = zip(store.keys, store.ok, store.errors, strict=True)
    failed = {k: e.split(":")[0] for k, ok, e in rows if not ok}
    assert failed == BAD
    feats = store.read_features()
    assert np.all(feats[~store.ok] == 0) and np.all(np.abs(feats[store.ok]).sum(axis=1) > 0)
    assert (store.image_ids == -1).all() and store.keys[0] == "a/img00.jpg"
    cnn = store.cnn
    assert cnn["arch"] == "InceptionV3" and cnn["weights"] == "none" and cnn["image_size"] == S
    assert cnn["resize_size"] == 87 and len(cnn["fingerprint"]) == 64
    assert store.attrs["views"] == 1 and store.attrs["dtype"] == "float32" and store.attrs["n_failed"] == 4
    assert result.done_now == 17 and result.skipped == 0
    assert "failed 4 (bomb 1, empty 1, not-an-image 1, truncated 1)" in result.summary()


def test_encoder_rebuilds_identically_and_matches_the_store(full, data, tmp_path):
    from extract.encoder import build_encoder, weights_fingerprint
    from extract.preprocess import decode_image, preprocess

    _, store = full
    a = build_encoder(store.cnn)  # a second build of the CNN the run built: same weights
    assert weights_fingerprint(a) == store.cnn["fingerprint"]
    x = preprocess(decode_image(data / "imgs" / "a" / "img02.jpg", S), S)[None]
    _close(a(x, training=False).numpy()[0], _row(store, "a/img02.jpg"))
    a.save_weights(tmp_path / "cnn.weights.h5")
    result = run_extract(_cfg(tmp_path / "f.h5", paths=[str(data / "imgs" / "a")],
                              cnn_weights=str(tmp_path / "cnn.weights.h5")))
    with open_store(result.out) as other:
        assert other.cnn["fingerprint"] == store.cnn["fingerprint"]
        _close(_row(other, "img02.jpg"), _row(store, "a/img02.jpg"))


def test_captions_file_and_plain_path_give_the_same_features(full, data, tmp_path):
    _, store = full
    roots = [str(data / "imgs" / "odd"), str(data / "imgs" / "a")]  # looked up in turn
    result = run_extract(_cfg(tmp_path / "c.h5", captions=[str(data / "caps.json")], images=roots,
                              split_scheme="hash"))
    with open_store(result.out) as caps:
        assert caps.keys == [f"img{i:02d}.jpg" for i in range(5)] + ["gone.jpg"]
        assert caps.image_ids.tolist() == list(range(100, 106))
        assert caps.ok.tolist() == [True] * 5 + [False] and caps.errors[5].startswith("missing:")
        for i in range(5):
            _close(_row(caps, f"img{i:02d}.jpg"), _row(store, f"a/img{i:02d}.jpg"))


def test_rerun_resumes_and_a_different_command_is_refused(full, data):
    cfg = _cfg(data / "full.h5", paths=[str(data / "imgs")])
    again = run_extract(cfg)
    assert again.already_complete and again.done_now == 0 and again.skipped == 17
    for change, word in [({"dtype": "float16"}, "--dtype"), ({"image_size": 80}, "--image-size"),
                         ({"paths": [str(data / "imgs" / "a")]}, "images"), ({"views": 2}, "--views")]:
        with pytest.raises(InputError, match=f"different extract command .differs in: .*{word}"):
            run_extract(ExtractConfig(**{**cfg.__dict__, **change}))


def test_disk_full_stops_cleanly_and_a_rerun_resumes(full, data, tmp_path, monkeypatch):
    _, store = full
    real = StoreWriter.commit
    calls = []

    def flaky(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args)

    monkeypatch.setattr(StoreWriter, "commit", flaky)
    cfg = _cfg(tmp_path / "d.h5", paths=[str(data / "imgs")])
    with pytest.raises(RunStopped, match="4 rows are saved.*rerun the same command"):
        run_extract(cfg)
    with open_store(cfg.out, require_complete=False) as part:
        assert part.rows_done == 4
    monkeypatch.setattr(StoreWriter, "commit", real)
    result = run_extract(cfg)
    assert result.skipped == 4 and result.done_now == 13
    with open_store(cfg.out) as done:
        assert done.read_features().tobytes() == store.read_features().tobytes()
        assert done.errors == store.errors


def test_shards_merge_into_the_unsharded_store(full, data, tmp_path):
    _, store = full
    paths = []
    for k in range(3):
        paths.append(str(tmp_path / f"s{k}.h5"))
        run_extract(_cfg(paths[-1], paths=[str(data / "imgs")], shard=k, num_shards=3))
    from cli import main

    res = CliRunner().invoke(main, ["merge-features", *paths, "--out", str(tmp_path / "m.h5")])
    assert res.exit_code == 0 and "3 shards -> 17 images | failed 4" in res.output, res.output
    with open_store(tmp_path / "m.h5") as merged:
        assert merged.keys == store.keys and merged.ok.tolist() == store.ok.tolist()
        assert merged.errors == store.errors and merged.attrs["run"] == store.attrs["run"]
        _close(merged.read_features(), store.read_features())
    assert run_extract(_cfg(tmp_path / "m.h5", paths=[str(data / "imgs")])).already_complete
    with pytest.raises(InputError, match="shard.s. 2 of 3 are missing"):
        merge_shards(paths[:2], tmp_path / "x.h5")
    with pytest.raises(InputError, match="are both shard 1"):
        merge_shards([paths[0], paths[1], paths[1]], tmp_path / "x.h5")
    other = str(tmp_path / "o2.h5")
    run_extract(_cfg(other, paths=[str(data / "imgs")], shard=2, num_shards=3, dtype="float16"))
    with pytest.raises(InputError, match="different run .*dtype"):
        merge_shards([paths[0], paths[1], other], tmp_path / "x.h5")
    shutil.copy(paths[2], tmp_path / "inc.h5")
    with h5py.File(tmp_path / "inc.h5", "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(InputError, match="incomplete"):
        merge_shards([paths[0], paths[1], str(tmp_path / "inc.h5")], tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()


def test_views_store_distorted_training_views(full, data, tmp_path):
    _, store = full
    result = run_extract(_cfg(tmp_path / "v.h5", paths=[str(data / "imgs" / "a")], views=3))
    other = run_extract(_cfg(tmp_path / "v2.h5", paths=[str(data / "imgs" / "a")], views=3, batch_size=2))
    with open_store(result.out) as v, open_store(other.out) as v2:
        feats = v.read_features()
        assert feats.shape == (5, 3, 2048) and v.views == 3
        _close(feats[:, 0], store.read_features(list(range(5))))
        assert _differs(feats[:, 1], feats[:, 0]) and _differs(feats[:, 1], feats[:, 2])
        _close(v2.read_features(), feats)  # seeded per image, not per batch


def test_bad_arguments_stop_before_any_work(data, tmp_path, monkeypatch):
    imgs = str(data / "imgs")
    cases = [
        (_cfg(tmp_path / "no" / "f.h5", paths=[imgs]), "output folder .* does not exist"),
        (_cfg(tmp_path, paths=[imgs]), "is a folder"),
        (_cfg(tmp_path / "f.h5", paths=[str(tmp_path / "nothing")]), "does not exist"),
        (_cfg(tmp_path / "f.h5", paths=[str(tmp_path / "*.png")]), "matches no file"),
        (_cfg(tmp_path / "f.h5", captions=[str(data / "caps.json")]), "needs --images"),
        (_cfg(tmp_path / "f.h5", captions=[str(data / "caps.json")], images=[str(tmp_path / "x")]),
         "images folder .* does not exist"),
        (_cfg(tmp_path / "f.h5", paths=[imgs], shard=3, num_shards=3), "--shard 3 must be in 0..2"),
        (_cfg(tmp_path / "f.h5", paths=[imgs], views=0), "--views 0"),
        (_cfg(tmp_path / "f.h5", paths=[imgs], cnn_weights=str(tmp_path / "w.h5")), "weights file .* not"),
        (_cfg(tmp_path / "f.h5", paths=[imgs], image_size=60), "at least 75 px"),
    ]
    for cfg, message in cases:
        with pytest.raises(InputError, match=message):
            run_extract(cfg)
    real_access = __import__("os").access
    locked = {str(data / "imgs" / "a"), str(tmp_path / "ro")}
    monkeypatch.setattr("extract.inputs.os.access", lambda p, m: str(p) not in locked and real_access(p, m))
    with pytest.raises(InputError, match="is not readable"):
        run_extract(_cfg(tmp_path / "f.h5", captions=[str(data / "caps.json")], images=[str(data / "imgs/a")],
                         split_scheme="none"))
    (tmp_path / "ro").mkdir()
    with pytest.raises(InputError, match="is not writable"):
        run_extract(_cfg(tmp_path / "ro" / "f.h5", paths=[imgs]))
    assert not list(tmp_path.glob("**/f.h5"))


def test_cli_prints_one_line_errors_and_the_summary(data, tmp_path):
    from cli import main

    runner = CliRunner()
    bad = runner.invoke(main, ["extract", str(data / "imgs"), "--out", str(tmp_path / "no" / "f.h5")])
    assert bad.exit_code == 2 and "Error: output folder" in bad.output
    args = ["extract", str(data / "imgs" / "odd"), "--out", str(tmp_path / "f.h5"), "--cnn-weights", "none",
            "--image-size", str(S), "--batch-size", "4", "--dtype", "float32", "--no-progress"]
    ok = runner.invoke(main, args)
    assert ok.exit_code == 0, ok.output
    assert "extract: 12 images | done 12 | skipped 0 (already in file) | failed 4 (bomb 1" in ok.output
