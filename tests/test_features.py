"""The HDF5 feature store: layout, attrs, versioning, the commit protocol."""

import os

import h5py
import numpy as np
import pytest

from base.errors import InputError
from data.features import ERROR_WIDTH, FORMAT_NAME, FORMAT_VERSION, create_store, open_store


def _make(path, n=5, views=1, dtype="float16"):
    attrs = {"cnn": {"arch": "InceptionV3", "fingerprint": "ab"}, "image_size": 75}
    return create_store(path, [f"d/{i}.jpg" for i in range(n)], list(range(10, 10 + n)), dim=8, views=views,
                        dtype=dtype, attrs=attrs)


def test_round_trip_layout_and_attrs(tmp_path):
    path = tmp_path / "f.h5"
    with _make(path, n=5, views=2, dtype="float32") as w:
        assert w.rows_done == 0
        feats = np.arange(5 * 2 * 8, dtype=np.float32).reshape(5, 2, 8)
        w.commit(0, feats[:3], [True, False, True], ["", "truncated: cut", ""])
        with pytest.raises(ValueError):
            w.commit(0, feats[3:], [True, True], ["", ""])
        w.commit(3, feats[3:], [True, True], ["", ""])
        w.finish()
    with open_store(path) as s:
        assert s.complete and len(s) == 5 and s.views == 2 and s.dim == 8 and s.dtype == np.float32
        assert s.keys[4] == "d/4.jpg" and s.image_ids.tolist() == [10, 11, 12, 13, 14]
        assert s.ok.tolist() == [True, False, True, True, True] and s.errors[1] == "truncated: cut"
        assert s.cnn == {"arch": "InceptionV3", "fingerprint": "ab"}
        assert s.attrs["format"] == FORMAT_NAME and s.attrs["format_version"] == FORMAT_VERSION
        assert s.attrs["n_failed"] == 1 and s.attrs["rows_done"] == 5 and s.attrs["image_size"] == 75
        np.testing.assert_array_equal(s.read_features(), feats)
        np.testing.assert_array_equal(s.read_features([4, 0, 4]), feats[[4, 0, 4]])
        assert s.nbytes_in_memory() == 5 * 2 * 8 * 4
    with h5py.File(path, "r") as f:
        assert f["features"].chunks[0] >= 1 and f["features"].dtype == np.float32


def test_default_float16_two_dimensional(tmp_path):
    with _make(tmp_path / "f.h5") as w:
        w.commit(0, np.ones((5, 8)), [True] * 5, [""] * 5)
        w.finish()
    with open_store(tmp_path / "f.h5") as s:
        assert s.read_features().shape == (5, 8) and s.dtype == np.float16 and s.views == 1


def test_commits_never_grow_or_restructure_the_file(tmp_path):
    """Everything is allocated at creation, so a commit only overwrites data and one attr in place."""
    path = tmp_path / "f.h5"
    w = _make(path, n=40)
    size = os.path.getsize(path)
    for start in range(0, 40, 8):
        w.commit(start, np.full((8, 8), start), [True] * 8, ["bomb: x" * 5] * 8)
        assert os.path.getsize(path) == size
    w.close()


def test_incomplete_store_is_refused_unless_asked(tmp_path):
    path = tmp_path / "f.h5"
    with _make(path) as w:
        w.commit(0, np.ones((2, 8)), [True, True], ["", ""])
    with pytest.raises(InputError, match="incomplete .2/5 rows.*rerun"):
        open_store(path)
    with open_store(path, require_complete=False) as s:
        assert not s.complete and s.rows_done == 2


def test_unknown_version_missing_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "f.h5"
    _make(path).close()
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(InputError, match="version 2; this showtell reads version 1"):
        open_store(path, require_complete=False)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(InputError, match="not a showtell feature store"):
        open_store(tmp_path / "other.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(InputError, match="not a readable HDF5"):
        open_store(tmp_path / "text.h5")
    with pytest.raises(InputError, match="does not exist"):
        open_store(tmp_path / "missing.h5")


def test_long_unicode_errors_are_cut_at_a_character_boundary(tmp_path):
    path = tmp_path / "f.h5"
    with _make(path, n=1) as w:
        w.commit(0, np.zeros((1, 8)), [False], ["decode-error: " + "é" * 300])
        w.finish()
    with open_store(path) as s:
        assert s.errors[0].startswith("decode-error: éé") and len(s.errors[0].encode()) <= ERROR_WIDTH
