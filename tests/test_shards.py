"""img2dataset shards as input (data/shards.py): webdataset tars and parquet files for `extract` and the
caption readers, read in place; damaged shards recorded; the same images as files or in a shard give
identical feature rows."""

import numpy as np
import pytest
from helpers import image_shards, make_good_images, make_odd_images, write_parquet, write_webdataset

from base.errors import InputError
from data.captions import load_annotations
from data.features import open_store
from data.shard_readers import ShardColumns
from data.shards import expand_braces, index_shards
from extract.inputs import gather_rows


def _jpg(folder, i=0):
    return make_good_images(folder, n=i + 1)[i].read_bytes()


def test_a_missing_file_or_empty_pattern_is_a_bad_argument(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        index_shards([str(tmp_path / "00000.tar")])
    with pytest.raises(InputError, match="matches no file"):
        index_shards([str(tmp_path / "{00000..00002}.tar")])


def test_brace_patterns_expand_with_padding():
    assert expand_braces("s/{00008..00011}.tar") == [f"s/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_webdataset_index_keys_captions_and_missing_images(tmp_path):
    jpg = _jpg(tmp_path / "img")
    write_webdataset(tmp_path / "s" / "00000.tar", [
        ("000000007", {"jpg": jpg, "txt": b"  a red   bus ", "json": b'{"caption": "a bus"}'}),
        ("000000008", {"txt": b"no picture here"}),
        ("000000009", {"jpg": jpg}),
    ])
    write_webdataset(tmp_path / "s" / "00001.tar", [("000000010", {"jpg": jpg, "txt": b"a cat"})])
    index = index_shards([str(tmp_path / "s" / "{00000..00001}.tar")])
    assert index.format == "webdataset" and not index.damaged
    assert [s.key for s in index.samples] == ["00000/000000007", "00000/000000008", "00000/000000009",
                                              "00001/000000010"]
    assert [s.image_id for s in index.samples] == [7, 8, 9, 10]
    assert index.samples[0].captions == ["a red bus", "a bus"]
    assert index.samples[0].member.read() == jpg
    with pytest.raises(OSError, match="missing"):
        index.samples[1].member.read()


def test_keys_repeated_across_shards_get_unique_rows_and_hashed_ids(tmp_path):
    jpg = _jpg(tmp_path / "img")
    for k in range(2):
        write_webdataset(tmp_path / f"{k}.tar", [("0", {"jpg": jpg, "txt": b"x"}), ("1", {"jpg": jpg})])
    index = index_shards([str(tmp_path / "*.tar")])
    assert [s.key for s in index.samples] == ["0/0", "0/1", "1/0", "1/1"]
    ids = [s.image_id for s in index.samples]
    assert len(set(ids)) == 4 and all(i >= 0 for i in ids)


def test_truncated_and_unreadable_shards_are_recorded_and_the_rest_go_on(tmp_path):
    jpg = _jpg(tmp_path / "img")
    whole = write_webdataset(tmp_path / "00000.tar", [(f"{i}", {"jpg": jpg, "txt": b"x"}) for i in range(3)])
    cut = tmp_path / "00001.tar"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    (tmp_path / "00002.tar").write_bytes(b"this is not a tar file at all" * 40)
    index = index_shards([str(tmp_path / "{00000..00003}.tar")])  # 00003.tar: missing (img2dataset failure)
    damaged = dict(index.damaged)
    assert set(damaged) == {str(cut), str(tmp_path / "00002.tar"), str(tmp_path / "00003.tar")}
    assert damaged[str(tmp_path / "00003.tar")].startswith("missing")
    assert damaged[str(cut)].startswith("truncated") and damaged[str(tmp_path / "00002.tar")].startswith(
        "unreadable")
    from_cut = [s for s in index.samples if s.key.startswith("00001/")]
    assert 0 < len(from_cut) < 3
    assert from_cut[0].member.read() == jpg  # the intact samples before the cut are kept


def test_parquet_default_and_custom_columns(tmp_path):
    jpg = _jpg(tmp_path / "img")
    write_parquet(tmp_path / "p" / "a.parquet",
                  {"key": ["5", "6"], "jpg": [jpg, None], "txt": ["a dog", None]})
    index = index_shards([str(tmp_path / "p" / "a.parquet")])
    assert [s.key for s in index.samples] == ["a/5", "a/6"] and index.samples[0].captions == ["a dog"]
    assert index.samples[0].member.read() == jpg and index.samples[1].member.read() == b""
    write_parquet(tmp_path / "q" / "b.parquet", {"id": ["x"], "pixels": [jpg], "text": ["a cow"]})
    cols = ShardColumns.parse("image=pixels,caption=text,key=id")
    index = index_shards([str(tmp_path / "q" / "b.parquet")], "parquet", cols)
    assert [s.key for s in index.samples] == ["b/x"] and index.samples[0].captions == ["a cow"]
    bad = index_shards([str(tmp_path / "q" / "b.parquet")], "parquet")  # no jpg column: recorded
    assert not bad.samples and bad.damaged[0][1].startswith("unreadable: no image column")
    with pytest.raises(InputError, match="parquet-columns"):
        ShardColumns.parse("pixels")


def test_caption_readers_read_shards_with_a_hash_split(tmp_path):
    jpg = _jpg(tmp_path / "img")
    write_webdataset(tmp_path / "00000.tar", [(f"{i:09d}", {"jpg": jpg, "txt": f"thing {i}".encode()})
                                              for i in range(40)] + [("000000099", {"jpg": jpg})])
    for fmt in ("webdataset", "auto"):
        ann = load_annotations([str(tmp_path / "*.tar")], fmt=fmt)
        assert ann.format == "webdataset" and ann.scheme == "hash" and len(ann.records) == 40
        assert ann.records[3].path == "00000/000000003" and ann.records[3].captions == ["thing 3"]
        assert ann.skipped[0][1].startswith("no caption")
        assert {r.split for r in ann.records} >= {"train"}
    with pytest.raises(InputError, match="not a parquet shard"):
        load_annotations([str(tmp_path / "00000.tar")], fmt="parquet")


def test_shards_and_image_files_cannot_be_mixed(tmp_path):
    imgs = make_good_images(tmp_path / "img", n=2)
    image_shards(tmp_path / "s", imgs, 2)
    with pytest.raises(InputError, match="not both"):
        gather_rows([str(tmp_path / "s" / "00000.tar"), str(imgs[0])])
    rows = gather_rows([str(tmp_path / "s" / "00000.tar")])
    assert rows.keys == ["00000/000000000", "00000/000000001"] and rows.image_ids == [0, 1]


@pytest.mark.slow
def test_same_images_as_files_tar_and_parquet_give_identical_rows(tmp_path):
    from extract.run import ExtractConfig, run_extract

    imgs = make_good_images(tmp_path / "img", n=5)
    odd = make_odd_images(tmp_path / "odd")
    bad = sorted(name for name, category in odd.items() if category)[:2]
    shards = image_shards(tmp_path / "s", imgs, 3)
    odd_samples = [(n.split(".")[0], {"jpg": (tmp_path / "odd" / n).read_bytes()}) for n in bad]
    write_webdataset(tmp_path / "s" / "00002.tar", odd_samples)
    write_parquet(tmp_path / "p" / "00000.parquet", {"key": [f"{i:09d}" for i in range(5)],
                                                      "jpg": [p.read_bytes() for p in imgs]})
    base = {"cnn_weights": "none", "image_size": 75, "batch_size": 4, "dtype": "float32", "progress": False}
    stores = {}
    for name, paths in {"files": [str(p) for p in imgs], "tar": [str(tmp_path / "s" / "*.tar")],
                        "parquet": [str(tmp_path / "p" / "00000.parquet")]}.items():
        run_extract(ExtractConfig(out=str(tmp_path / f"{name}.h5"), paths=paths, **base), log=lambda m: None)
        with open_store(tmp_path / f"{name}.h5") as s:
            stores[name] = (s.keys, s.ok, s.errors, s.read_features())
    assert len(shards) == 2
    feats_files = stores["files"][3]
    np.testing.assert_array_equal(stores["tar"][3][:5], feats_files)
    np.testing.assert_array_equal(stores["parquet"][3], feats_files)
    assert list(stores["tar"][1]) == [True] * 5 + [False] * 2
    assert [e.split(":")[0] for e in stores["tar"][2][5:]] == [odd[n] for n in bad]
