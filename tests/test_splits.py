"""data/splits.py: every scheme, auto resolution per format, invalid combinations."""

import json
from collections import Counter

import pytest

from base.errors import InputError
from data.captions import ImageRecord, load_annotations
from data.splits import SPLIT_SCHEMES, hash_split, im2txt_split, is_coco2014


def write_coco(path, images, split=None):
    """COCO file with one caption per image; images = [(id, file_name)]."""
    data = {
        "images": [{"id": i, "file_name": f, **({"split": split} if split else {})} for i, f in images],
        "annotations": [
            {"id": k, "image_id": i, "caption": f"caption {k}"} for k, (i, _) in enumerate(images)
        ],
    }
    path.write_text(json.dumps(data))
    return path


def write_karpathy(path, n=10):
    splits = ["train", "restval", "val", "test"]
    images = [
        {
            "filepath": "val2014",
            "filename": f"COCO_val2014_{i:012d}.jpg",
            "cocoid": i,
            "split": splits[i % 4],
            "sentences": [{"raw": "a cap"}],
        }
        for i in range(n)
    ]
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_scheme_names():
    assert SPLIT_SCHEMES == ("auto", "karpathy", "im2txt", "hash", "none")


# SHA-256 based, so the same on every machine and Python: a change would reshuffle everybody's val/test sets
PINNED_NON_TRAIN_BELOW_200 = {
    1: "val",
    13: "val",
    26: "test",
    30: "test",
    43: "val",
    52: "val",
    72: "test",
    74: "val",
    102: "val",
    117: "test",
    125: "val",
    132: "test",
    137: "test",
    148: "test",
    152: "val",
    155: "val",
    160: "test",
    165: "val",
    168: "val",
    171: "val",
    174: "test",
    178: "val",
    184: "test",
}


def test_hash_split_is_pinned_and_near_90_5_5():
    assert {i: hash_split(i) for i in range(200) if hash_split(i) != "train"} == PINNED_NON_TRAIN_BELOW_200
    counts = Counter(hash_split(i) for i in range(20000))
    assert abs(counts["train"] / 20000 - 0.90) < 0.01
    assert abs(counts["val"] / 20000 - 0.05) < 0.006 and abs(counts["test"] / 20000 - 0.05) < 0.006


def test_im2txt_split_cuts_val2014_in_file_order():
    recs = [ImageRecord(i, f"train2014/t{i}.jpg", None, ["c"]) for i in range(3)]
    recs += [ImageRecord(100 + i, f"val2014/v{i}.jpg", None, ["c"]) for i in range(40)]
    splits = im2txt_split(recs)
    assert splits[:3] == ["train"] * 3
    # int(0.85 * 40) = 34 train, int(0.90 * 40) = 36 -> 2 val, 4 test
    assert splits[3:] == ["train"] * 34 + ["val"] * 2 + ["test"] * 4
    assert is_coco2014(recs) and not is_coco2014(recs + [ImageRecord(1, "val2017/x.jpg", None, ["c"])])


def test_auto_per_format(tmp_path):
    p2017 = write_coco(tmp_path / "captions_val2017.json", [(i, f"{i:012d}.jpg") for i in range(1, 50)])
    ann = load_annotations(p2017)
    assert ann.scheme == "hash" and all(r.split == hash_split(r.image_id) for r in ann.records)
    p2014 = write_coco(
        tmp_path / "captions_val2014.json", [(i, f"COCO_val2014_{i:012d}.jpg") for i in range(1, 21)]
    )
    ann = load_annotations(p2014)
    assert (
        ann.scheme == "im2txt" and [r.split for r in ann.records] == ["train"] * 17 + ["val"] + ["test"] * 2
    )
    own = write_coco(tmp_path / "own.json", [(1, "a.jpg"), (2, "b.jpg")], split="test")
    assert load_annotations(own).scheme == "file" and load_annotations(own).part("test")
    assert load_annotations(write_karpathy(tmp_path / "dataset_coco.json")).scheme == "karpathy"


def test_explicit_schemes_override_the_files_own(tmp_path):
    own = write_coco(tmp_path / "own.json", [(i, f"{i}.jpg") for i in range(1, 30)], split="test")
    hashed = load_annotations(own, split_scheme="hash")
    assert hashed.scheme == "hash" and len(hashed.part("train")) > 20
    k = write_karpathy(tmp_path / "dataset_coco.json", n=12)
    ann = load_annotations(k, split_scheme="karpathy")
    assert Counter(r.split for r in ann.records) == {"train": 6, "val": 3, "test": 3}
    assert load_annotations(k, split_scheme="hash").scheme == "hash"


def test_none_puts_every_image_in_every_part(tmp_path):
    p = write_coco(tmp_path / "c.json", [(1, "a.jpg"), (2, "b.jpg"), (3, "c.jpg")])
    ann = load_annotations(p, split_scheme="none")
    assert ann.scheme == "none" and all(r.split is None for r in ann.records)
    assert [len(ann.part(s)) for s in ("train", "val", "test")] == [3, 3, 3]
    assert "every image in train, val and test" in ann.summary()


def test_coco_images_without_own_split_are_skipped_under_auto(tmp_path):
    p = tmp_path / "mixed.json"
    p.write_text(
        json.dumps(
            {
                "images": [
                    {"id": 1, "file_name": "a.jpg", "split": "train"},
                    {"id": 2, "file_name": "b.jpg"},
                ],
                "annotations": [{"image_id": 1, "caption": "x"}, {"image_id": 2, "caption": "y"}],
            }
        )
    )
    ann = load_annotations(p)
    assert [r.image_id for r in ann.records] == [1]
    assert ann.skipped == [("b.jpg", "no 'split' field while other images of the file have one")]
    assert len(load_annotations(p, split_scheme="hash").records) == 2


@pytest.mark.parametrize(
    "maker, scheme, message",
    [
        ("coco2017", "karpathy", r"'karpathy' needs Karpathy's dataset_\*.json, but .*c.json is a coco file"),
        ("flickr", "karpathy", r"'karpathy' needs Karpathy's .* is a flickr8k file"),
        ("coco2017", "im2txt", r"'im2txt' needs the COCO 2014 captions files .*c.json is a coco file"),
        ("karpathy", "im2txt", r"'im2txt' needs the COCO 2014 captions files .* is a karpathy file"),
        ("flickr", "im2txt", r"'im2txt' needs the COCO 2014 captions files"),
    ],
)
def test_invalid_combinations(tmp_path, maker, scheme, message):
    if maker == "coco2017":
        path = write_coco(tmp_path / "c.json", [(1, "000000000001.jpg")])
    elif maker == "karpathy":
        path = write_karpathy(tmp_path / "dataset_coco.json")
    else:
        path = tmp_path / "Flickr8k.token.txt"
        path.write_text("111_aa.jpg#0\tA dog .\n")
    with pytest.raises(InputError, match=message):
        load_annotations(path, split_scheme=scheme)


def test_shared_flickr8k_hash_is_stable(shared_data):
    a = load_annotations(shared_data / "flickr8k" / "Flickr8k.token.txt", split_scheme="hash")
    b = load_annotations(shared_data / "flickr8k" / "Flickr8k.token.txt", split_scheme="hash")
    assert [r.split for r in a.records] == [r.split for r in b.records]
    assert [len(a.part(s)) for s in ("train", "val", "test")] == [7270, 430, 392]
