"""data/captions.py, formats.py, records.py: the three caption formats, detection, every bad-input case."""

import json
from pathlib import Path

import pytest

from base.errors import InputError
from data.captions import Annotations, ImageRecord, load_annotations
from data.records import flickr_image_id


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def coco(images, annotations) -> dict:
    """A COCO captions dict from [(id, file_name[, split])] and [(image_id, caption)]."""
    imgs = [{"id": i, "file_name": f, **({"split": s[0]} if s else {})} for i, f, *s in images]
    anns = [{"id": k, "image_id": i, "caption": c} for k, (i, c) in enumerate(annotations)]
    return {"info": {}, "images": imgs, "annotations": anns}


def karpathy(images, dataset="coco") -> dict:
    """A Karpathy dict from [(filepath, filename, split, cocoid|None, [raw captions])]."""
    out = []
    for k, (fp, fn, split, cocoid, caps) in enumerate(images):
        img = {
            "filename": fn,
            "split": split,
            "imgid": k,
            "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": k} for c in caps],
        }
        if fp is not None:
            img["filepath"] = fp
        if cocoid is not None:
            img["cocoid"] = cocoid
        out.append(img)
    return {"images": out, "dataset": dataset}


def flickr_dir(tmp_path: Path, lines: list[str], lists: dict | None = None, raw: bytes = b"") -> Path:
    """A Flickr8k.token.txt (+ optional split lists {split_file_suffix: [names]}) in tmp_path."""
    token = tmp_path / "Flickr8k.token.txt"
    token.write_bytes("\n".join(lines).encode("utf-8") + raw)
    for which, names in (lists or {}).items():
        (tmp_path / f"Flickr_8k.{which}Images.txt").write_text("\n".join(names) + "\n")
    return token


# ---- COCO ------------------------------------------------------------------------------------------------


def test_coco_reads_records_in_file_order(tmp_path):
    p = write_json(
        tmp_path / "c.json",
        coco([(5, "b.jpg"), (3, "a.jpg")], [(3, " A dog.\n"), (5, "A cat"), (3, "Two  dogs")]),
    )
    ann = load_annotations(p, split_scheme="none")
    assert isinstance(ann, Annotations) and ann.format == "coco" and ann.sources == [str(p)]
    assert [(r.image_id, r.path, r.captions) for r in ann.records] == [
        (5, "b.jpg", ["A cat"]),
        (3, "a.jpg", ["A dog.", "Two dogs"]),
    ]
    assert ann.skipped == [] and ann.scheme == "none"


def test_coco_2014_names_get_their_folder_and_im2txt_split(tmp_path):
    train = write_json(
        tmp_path / "captions_train2014.json", coco([(1, "COCO_train2014_000000000001.jpg")], [(1, "x")])
    )
    vals = [(100 + k, f"COCO_val2014_{100 + k:012d}.jpg") for k in range(20)]
    val = write_json(tmp_path / "captions_val2014.json", coco(vals, [(i, "y") for i, _ in vals]))
    ann = load_annotations([train, val])
    assert ann.scheme == "im2txt"
    assert ann.records[0].path == "train2014/COCO_train2014_000000000001.jpg"
    assert ann.records[1].path == "val2014/COCO_val2014_000000000100.jpg"
    assert [len(ann.part(s)) for s in ("train", "val", "test")] == [1 + 17, 1, 2]


def test_coco_split_field_is_the_files_own(tmp_path):
    p = write_json(
        tmp_path / "c.json",
        coco(
            [(1, "a.jpg", "train"), (2, "b.jpg", "val"), (3, "c.jpg", "test"), (4, "d.jpg", "restval")],
            [(i, "cap") for i in (1, 2, 3, 4)],
        ),
    )
    ann = load_annotations(p)
    assert ann.scheme == "file"
    assert [r.split for r in ann.records] == ["train", "val", "test", "train"]


def test_coco_bad_entries_are_skipped_and_counted(tmp_path):
    images = [(1, "a.jpg"), (2, "b.jpg"), (3, "c.jpg"), (4, "d.jpg", "nonsense")]
    anns = [(1, "fine"), (1, "   "), (2, ""), (99, "orphan"), (4, "cap")]
    data = coco(images, anns)
    data["annotations"].append({"id": 50, "image_id": 1, "caption": None})
    data["images"].append({"id": "x", "file_name": "e.jpg"})
    ann = load_annotations(write_json(tmp_path / "c.json", data), split_scheme="hash")
    assert [r.image_id for r in ann.records] == [1]
    reasons = [reason for _, reason in ann.skipped]
    assert reasons.count("empty or missing caption") == 3
    assert "image_id 99 is not in 'images'" in reasons
    assert "no integer 'id'" in reasons
    assert "unknown split 'nonsense' (use train, val or test)" in reasons
    assert "no usable caption" in reasons  # images 2 (empty caption) and 3 (none at all)
    assert reasons.count("no usable caption") == 2
    assert all(entry.startswith("c.json: ") for entry, _ in ann.skipped)
    assert "skipped" in ann.summary() and str(len(ann.skipped)) in ann.summary()


def test_shared_coco_val2017(shared_data):
    ann = load_annotations(shared_data / "captions_val2017.json")
    assert ann.format == "coco" and ann.scheme == "hash" and ann.skipped == []
    assert len(ann.records) == 5000 and sum(len(r.captions) for r in ann.records) == 25014
    rec = next(r for r in ann.records if r.image_id == 397133)
    assert rec.path == "000000397133.jpg" and rec.captions[0] == "A man is in a kitchen making pizzas."
    counts = [len(ann.part(s)) for s in ("train", "val", "test")]
    assert sum(counts) == 5000 and 4300 < counts[0] < 4700 and 150 < counts[1] < 350
    assert ann.summary().startswith("5,000 images, 25,014 captions (coco, split hash: train ")


# ---- Karpathy --------------------------------------------------------------------------------------------


def test_karpathy_coco_paths_ids_and_splits(tmp_path):
    p = write_json(
        tmp_path / "dataset_coco.json",
        karpathy(
            [
                ("val2014", "COCO_val2014_000000391895.jpg", "test", 391895, ["A man riding.", "A bike."]),
                ("train2014", "COCO_train2014_000000000009.jpg", "restval", 9, ["Food."]),
                ("val2014", "COCO_val2014_000000000042.jpg", "val", 42, ["x"]),
                ("train2014", "COCO_train2014_000000000025.jpg", "train", 25, ["y"]),
            ]
        ),
    )
    ann = load_annotations(p)
    assert ann.format == "karpathy" and ann.scheme == "karpathy"
    assert ann.records[0] == ImageRecord(
        391895, "val2014/COCO_val2014_000000391895.jpg", "test", ["A man riding.", "A bike."]
    )
    assert [r.split for r in ann.records] == ["test", "train", "val", "train"]
    assert load_annotations(p, split_scheme="karpathy").scheme == "karpathy"


def test_karpathy_flickr_uses_file_name_and_derived_id(tmp_path):
    p = write_json(
        tmp_path / "dataset_flickr8k.json",
        karpathy(
            [
                (None, "2513260012_03d33305cf.jpg", "train", None, ["A dog runs ."]),
                (None, "1000092795.jpg", "val", None, ["Two men ."]),
                (None, "2090545563_a4e66ec76b.jpg", "test", None, []),
            ],
            dataset="flickr8k",
        ),
    )
    ann = load_annotations(p)
    assert [(r.image_id, r.path, r.split) for r in ann.records] == [
        (2513260012, "2513260012_03d33305cf.jpg", "train"),
        (1000092795, "1000092795.jpg", "val"),
    ]
    assert ann.skipped == [("dataset_flickr8k.json: images[2] (id 2090545563)", "no usable caption")]


def test_karpathy_falls_back_to_tokens_and_skips_empty_sentences(tmp_path):
    data = karpathy([("val2014", "COCO_val2014_000000000001.jpg", "train", 1, ["kept", ""])])
    data["images"][0]["sentences"].append({"tokens": ["from", "tokens"]})
    ann = load_annotations(write_json(tmp_path / "k.json", data))
    assert ann.records[0].captions == ["kept", "from tokens"]
    assert ann.skipped == [("k.json: images[0] (id 1) sentences[1]", "empty or missing caption")]


# ---- Flickr8k --------------------------------------------------------------------------------------------


def test_flickr8k_lists_stray_ids_and_bad_lines(tmp_path):
    lines = [
        "111_aa.jpg#0\tA dog .",
        "111_aa.jpg#1\tA brown dog .",
        "222_bb.jpg.1#0\tStray id caption",
        "222_bb.jpg#1\tSecond caption",
        "333_cc.jpg#0\tA cat",
        "444_dd.jpg#0\t  ",
        "no tab here",
        "555_ee.jpg#0\tUnlisted image",
        "",
    ]
    token = flickr_dir(
        tmp_path,
        lines,
        {"train": ["111_aa.jpg", "222_bb.jpg"], "dev": ["333_cc.jpg"], "test": ["444_dd.jpg"]},
        raw=b"666_ff.jpg#0\t\xff\xfe bad bytes\n",
    )
    ann = load_annotations(token)
    assert ann.format == "flickr8k" and ann.scheme == "file"
    assert [(r.image_id, r.path, r.split, len(r.captions)) for r in ann.records] == [
        (111, "111_aa.jpg", "train", 2),
        (222, "222_bb.jpg", "train", 2),
        (333, "333_cc.jpg", "val", 1),
    ]
    assert ann.notes == [("Flickr8k.token.txt: line 3", "stray image id '222_bb.jpg.1' read as '222_bb.jpg'")]
    assert ("Flickr8k.token.txt: line 6 (444_dd.jpg)", "empty caption") in ann.skipped
    assert ("Flickr8k.token.txt: line 7", "not 'image#k<TAB>caption'") in ann.skipped
    assert ("Flickr8k.token.txt: line 9", "not UTF-8 text") in ann.skipped
    assert ("555_ee.jpg", "in none of the Flickr_8k.{train,dev,test}Images.txt lists") in ann.skipped
    assert len(ann.skipped) == 4 and "1 repaired" in ann.summary()


def test_flickr8k_without_lists_uses_hash(tmp_path):
    token = flickr_dir(tmp_path, ["111_aa.jpg#0\tA dog .", "odd name.jpg#0\tA cat ."])
    ann = load_annotations(token)
    assert ann.scheme == "hash" and len(ann.records) == 2
    assert ann.records[1].image_id == flickr_image_id("odd name.jpg")


def test_flickr8k_name_in_two_lists_is_an_error(tmp_path):
    token = flickr_dir(tmp_path, ["111_aa.jpg#0\tA dog ."], {"train": ["111_aa.jpg"], "test": ["111_aa.jpg"]})
    with pytest.raises(
        InputError, match=r"Flickr_8k.testImages.txt, line 1: 111_aa.jpg is already in the train"
    ):
        load_annotations(token)


def test_flickr_image_id_is_stable():
    assert flickr_image_id("2513260012_03d33305cf.jpg") == 2513260012
    assert flickr_image_id("1000092795.jpg") == 1000092795
    assert flickr_image_id("sub/dir/1000092795.jpg") == 1000092795
    assert flickr_image_id("holiday.jpg") == 3155810563160264452  # BLAKE2b-64 of the name: pinned
    assert 0 <= flickr_image_id("x" * 40) < 2**63


def test_shared_flickr8k(shared_data):
    ann = load_annotations(shared_data / "flickr8k" / "Flickr8k.token.txt")
    assert ann.format == "flickr8k" and ann.scheme == "file"
    assert [len(ann.part(s)) for s in ("train", "val", "test")] == [6000, 1000, 1000]
    assert all(len(r.captions) == 5 for r in ann.records)
    assert ann.notes == [
        (
            "Flickr8k.token.txt: line 6731",
            "stray image id '2258277193_586949ec62.jpg.1' read as '2258277193_586949ec62.jpg'",
        )
    ]
    assert len(ann.skipped) == 92  # images with captions but in none of the three lists
    assert all(reason.startswith("in none of the") for _, reason in ann.skipped)
    everything = load_annotations(shared_data / "flickr8k" / "Flickr8k.token.txt", split_scheme="none")
    stray = next(r for r in everything.records if r.path == "2258277193_586949ec62.jpg")
    assert stray.image_id == 2258277193 and stray.captions[0] == "people waiting for the subway"
    assert len(stray.captions) == 5 and len(everything.records) == 8092
    assert sum(len(r.captions) for r in everything.records) == 40460


# ---- detection, forcing, bad files -----------------------------------------------------------------------


def test_format_forced_or_detected(tmp_path):
    p = write_json(tmp_path / "c.json", coco([(1, "a.jpg")], [(1, "x")]))
    assert load_annotations(p, fmt="coco").format == "coco"
    with pytest.raises(
        InputError, match=r"c.json is not in karpathy format \(it needs an 'images' list with"
    ):
        load_annotations(p, fmt="karpathy")
    k = write_json(tmp_path / "k.json", karpathy([("v", "a.jpg", "train", 1, ["c"])]))
    assert load_annotations(k).format == "karpathy"
    with pytest.raises(
        InputError, match=r"k.json is not in coco format \(it needs 'images' and 'annotations'"
    ):
        load_annotations(k, fmt="coco")


def test_forcing_flickr_on_json_finds_nothing_usable(tmp_path):
    p = write_json(tmp_path / "c.json", coco([(1, "a.jpg")], [(1, "x")]))
    ann = load_annotations(p, fmt="flickr8k", split_scheme="none")
    assert ann.records == [] and ann.skipped == [("c.json: line 1", "not 'image#k<TAB>caption'")]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"just some text\n", "is in no known format"),
        (b'{"foo": 1}', "is JSON but neither COCO captions"),
        (b"[1, 2]", "is JSON but neither COCO captions"),
        (b'{"images": [], "annotations": [', r"is not valid JSON \(line 1, column 32"),
        (b'{"images": [{"file_name": "caf\xe9.jpg"}]}', r"is not UTF-8 text \(bad byte at offset 30\)"),
    ],
)
def test_bad_files_name_the_file(tmp_path, content, message):
    p = tmp_path / "bad.json"
    p.write_bytes(content)
    with pytest.raises(InputError, match=message) as err:
        load_annotations(p)
    assert str(p) in str(err.value) and err.value.args[0].count(".") >= 1 and "\n" not in str(err.value)


def test_missing_directory_and_unreadable_files(tmp_path, monkeypatch):
    with pytest.raises(InputError, match=r"nope.json does not exist"):
        load_annotations(tmp_path / "nope.json")
    with pytest.raises(InputError, match=r"is a directory"):
        load_annotations(tmp_path)
    p = write_json(tmp_path / "c.json", coco([(1, "a.jpg")], [(1, "x")]))

    def deny(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(InputError, match=r"c.json cannot be read: Permission denied"):
        load_annotations(p)


@pytest.mark.parametrize(
    "name", ["../secret.jpg", "a/../../b.jpg", "/etc/passwd", "C:\\x.jpg", "..\\x.jpg", "~/x.jpg", "", "./."]
)
def test_paths_outside_the_images_root_are_refused(tmp_path, name):
    p = write_json(tmp_path / "c.json", coco([(1, "ok.jpg"), (7, name)], [(1, "x"), (7, "y")]))
    with pytest.raises(InputError, match=r"c.json, images\[1\] \(id 7\): .*(refused|missing|names no file)"):
        load_annotations(p)


def test_harmless_path_forms_are_normalised(tmp_path):
    p = write_json(tmp_path / "c.json", coco([(1, "./a/./b.jpg"), (2, "c\\d.jpg")], [(1, "x"), (2, "y")]))
    assert [r.path for r in load_annotations(p).records] == ["a/b.jpg", "c/d.jpg"]


def test_refused_paths_in_karpathy_and_flickr(tmp_path):
    k = write_json(tmp_path / "k.json", karpathy([("..", "x.jpg", "train", 1, ["c"])]))
    with pytest.raises(InputError, match=r"k.json, images\[0\]: image path '../x.jpg' leaves"):
        load_annotations(k)
    token = flickr_dir(tmp_path, ["/abs/x.jpg#0\tA dog ."])
    with pytest.raises(InputError, match=r"Flickr8k.token.txt, line 1: absolute image path"):
        load_annotations(token)


def test_duplicate_ids_and_paths(tmp_path):
    p = write_json(tmp_path / "c.json", coco([(1, "a.jpg"), (1, "b.jpg")], [(1, "x")]))
    with pytest.raises(
        InputError, match=r"c.json: images\[1\] \(id 1\) repeats the image id of .*images\[0\]"
    ):
        load_annotations(p)
    q = write_json(tmp_path / "d.json", coco([(1, "a.jpg"), (2, "a.jpg")], [(1, "x"), (2, "y")]))
    with pytest.raises(InputError, match=r"Duplicate image path 'a.jpg': d.json: images\[0\] .* and d.json"):
        load_annotations(q)
    r = write_json(tmp_path / "e.json", coco([(1, "z.jpg")], [(1, "x")]))
    with pytest.raises(InputError, match=r"Duplicate image id 1: c2.json: images\[0\] \(id 1\) and e.json"):
        load_annotations([write_json(tmp_path / "c2.json", coco([(1, "a.jpg")], [(1, "x")])), r])
    k = write_json(
        tmp_path / "k.json", karpathy([("v", "a.jpg", "train", 5, ["c"]), ("v", "b.jpg", "val", 5, ["d"])])
    )
    with pytest.raises(
        InputError, match=r"Duplicate image id 5: k.json: images\[0\] \(id 5\) and k.json: images\[1\]"
    ):
        load_annotations(k)


def test_mixed_formats_and_bad_arguments(tmp_path):
    c = write_json(tmp_path / "c.json", coco([(1, "a.jpg")], [(1, "x")]))
    token = flickr_dir(tmp_path, ["111_aa.jpg#0\tA dog ."])
    with pytest.raises(
        InputError, match=r"different formats cannot be mixed .*c.json is coco, .* is flickr8k"
    ):
        load_annotations([c, token])
    with pytest.raises(InputError, match=r"Unknown caption format 'json'"):
        load_annotations(c, fmt="json")
    with pytest.raises(InputError, match=r"Unknown split scheme 'random'"):
        load_annotations(c, split_scheme="random")
    with pytest.raises(InputError, match=r"No caption file given"):
        load_annotations([])
    with pytest.raises(InputError, match=r"Unknown split 'dev'"):
        load_annotations(c).part("dev")


def test_bom_and_crlf_are_accepted(tmp_path):
    p = tmp_path / "c.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(coco([(1, "a.jpg")], [(1, "x")])).encode())
    assert load_annotations(p).records[0].captions == ["x"]
    token = tmp_path / "Flickr8k.token.txt"
    token.write_bytes(b"\xef\xbb\xbf111_aa.jpg#0\tA dog .\r\n111_aa.jpg#1\tA cat .\r\n")
    (tmp_path / "Flickr_8k.trainImages.txt").write_bytes(b"111_aa.jpg\r\n")
    ann = load_annotations(token)
    expected = [("111_aa.jpg", "train", ["A dog .", "A cat ."])]
    assert [(r.path, r.split, r.captions) for r in ann.records] == expected
