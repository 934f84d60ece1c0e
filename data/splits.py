"""Train/val/test split schemes (`--split-scheme`).

| scheme   | train / val / test |
| -------- | ------------------ |
- auto: the file's own split when it has one (Karpathy "split", Flickr_8k.*Images.txt lists, COCO "split"
  fields); else im2txt's for COCO 2014 files; else hash.
- karpathy: Karpathy's dataset_*.json "split" ("restval" is train); other formats: InputError.
- im2txt: COCO 2014 only: all of train2014 + the first 85% of val2014 (in file order) / the next 5% /
  the last 10%, as im2txt's build_mscoco_data.py; other files: InputError.
- hash: by image id: bucket = first 8 bytes of SHA-256(str(id)) mod 1000; < 900 train, < 950 val, else test.
- none: every image is train, val and test alike (tiny sets, smoke runs); records keep split None.
"""

import hashlib
from collections.abc import Sequence

from base.errors import InputError
from data.records import ImageRecord

SPLITS = ("train", "val", "test")
SPLIT_SCHEMES = ("auto", "karpathy", "im2txt", "hash", "none")
HASH_BUCKETS = 1000  # hash split: buckets [0, 900) train, [900, 950) val, [950, 1000) test
HASH_TRAIN, HASH_VAL = 900, 950
IM2TXT_TRAIN, IM2TXT_VAL = 0.85, 0.90  # cut points within val2014, as im2txt's build_mscoco_data.py
_NO_OWN_SPLIT = {
    "flickr8k": "in none of the Flickr_8k.{train,dev,test}Images.txt lists",
    "coco": "no 'split' field while other images of the file have one",
    "karpathy": "no split in the file",
}


def hash_split(image_id: int) -> str:
    """Deterministic split of an image id (same on every machine and run; not Python's hash())."""
    digest = hashlib.sha256(str(int(image_id)).encode("ascii")).digest()
    bucket = int.from_bytes(digest[:8], "big") % HASH_BUCKETS
    return "train" if bucket < HASH_TRAIN else "val" if bucket < HASH_VAL else "test"


def is_coco2014(records: Sequence[ImageRecord]) -> bool:
    """True when every record is a COCO 2014 train/val image (path train2014/... or val2014/...)."""
    return bool(records) and all(r.path.startswith(("train2014/", "val2014/")) for r in records)


def im2txt_split(records: Sequence[ImageRecord]) -> list[str]:
    """im2txt's split of COCO 2014 records (in file order): train2014 all train; val2014 85/5/10."""
    val_rows = [i for i, r in enumerate(records) if r.path.startswith("val2014/")]
    train_cut, val_cut = int(IM2TXT_TRAIN * len(val_rows)), int(IM2TXT_VAL * len(val_rows))
    splits = ["train"] * len(records)
    for k, i in enumerate(val_rows):
        splits[i] = "train" if k < train_cut else "val" if k < val_cut else "test"
    return splits


def resolve_scheme(
    fmt: str, scheme: str, own_split: bool, records: Sequence[ImageRecord], paths: Sequence
) -> str:
    """The scheme applied: "karpathy" | "file" | "im2txt" | "hash" | "none"; InputError if invalid."""
    if scheme == "auto":
        if fmt == "karpathy":
            return "karpathy"
        if own_split:
            return "file"
        return "im2txt" if fmt == "coco" and is_coco2014(records) else "hash"
    if scheme == "karpathy" and fmt != "karpathy":
        raise InputError(
            f"Split scheme 'karpathy' needs Karpathy's dataset_*.json, but {paths[0]} is a {fmt} file."
        )
    if scheme == "im2txt" and not (fmt == "coco" and is_coco2014(records)):
        raise InputError(
            f"Split scheme 'im2txt' needs the COCO 2014 captions files (captions_train2014.json, "
            f"captions_val2014.json), but {paths[0]} is a {fmt} file with other images."
        )
    return scheme


def assign_splits(
    records: list[ImageRecord], fmt: str, scheme: str, own_split: bool, paths: Sequence
) -> tuple[list[ImageRecord], str, list[tuple[str, str]]]:
    """Set each record's split in place.

    Args:
      records: records in file order, split = the file's own split or None.
      fmt: "coco" | "karpathy" | "flickr8k"; scheme: one of SPLIT_SCHEMES;
      own_split: the files define splits; paths: the caption files (for messages).
    Returns:
      (records kept, scheme applied, skipped (entry, reason) of records the file gave no split under its
      own scheme).
    """
    applied = resolve_scheme(fmt, scheme, own_split, records, paths)
    if applied in ("karpathy", "file"):
        kept = [r for r in records if r.split is not None]
        dropped = [(r.path, _NO_OWN_SPLIT[fmt]) for r in records if r.split is None]
        return kept, applied, dropped
    if applied == "im2txt":
        splits = im2txt_split(records)
    elif applied == "hash":
        splits = [hash_split(r.image_id) for r in records]
    else:
        splits = [None] * len(records)
    for r, s in zip(records, splits, strict=True):
        r.split = s
    return records, applied, []
