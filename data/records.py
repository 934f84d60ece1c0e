"""The caption record every reader produces (`ImageRecord`) and the checks on its fields.

Base module of the caption loaders: `data/formats.py` (the readers) and `data/splits.py` (the split schemes)
build on it, and `data/captions.py` (`load_annotations`) ties them together. It imports nothing of ours
except `base.errors`.
"""

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from base.errors import InputError

_LEADING_DIGITS = re.compile(r"^(\d{1,18})(?:[_.]|$)")


@dataclass
class ImageRecord:
    """One image and its raw captions."""

    image_id: int  # dataset id (COCO id, Karpathy cocoid, or derived from a Flickr file name)
    path: str  # posix path relative to the images root (the feature store's key)
    split: str | None  # "train" | "val" | "test" once assigned; None under scheme "none"
    captions: list[str]  # raw captions, stripped, never empty


def safe_relpath(raw, source: Path, entry: str) -> str:
    """Normalise an image path from a caption file; refuse one that leaves the images root.

    Returns a posix path without "." parts. InputError for a non-string, empty, absolute ("/x", "C:\\x",
    "~/x") or escaping ("../x", "a/../../x", backslash forms too) path.
    """
    entry = entry.removeprefix(f"{source.name}: ")
    if not isinstance(raw, str) or not raw.strip():
        raise InputError(f"Caption file {source}, {entry}: the image path is missing or empty.")
    unified = raw.replace("\\", "/")
    pure = PurePosixPath(unified)
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", unified) or unified.startswith("~"):
        raise InputError(
            f"Caption file {source}, {entry}: absolute image path {raw!r} refused "
            f"(paths must be relative to the images folder)."
        )
    if ".." in pure.parts or "\x00" in unified:
        raise InputError(
            f"Caption file {source}, {entry}: image path {raw!r} leaves the images folder; refused."
        )
    parts = [p for p in pure.parts if p != "."]
    if not parts:
        raise InputError(f"Caption file {source}, {entry}: the image path {raw!r} names no file.")
    return "/".join(parts)


def fits_int64(value) -> bool:
    """True for an int (not a bool) that fits the feature store's int64 /image_ids. Negative ids are kept
    (they mean "unknown" downstream: `caption --json` writes them as -1 with the file name)."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def flickr_image_id(filename: str) -> int:
    """A stable int id for a Flickr image file name.

    Flickr names start with the photo's Flickr id (`2513260012_03d33305cf.jpg`, `1000092795.jpg`): that
    number is the id. Any other name gets the first 8 bytes of its UTF-8 BLAKE2b-64 digest as a positive
    63-bit int (same on every machine and run; unlike Python's hash()).
    """
    name = PurePosixPath(filename).name
    m = _LEADING_DIGITS.match(name)
    if m:
        return int(m.group(1))
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def check_unique(records: Sequence[ImageRecord], entries: Sequence[str]) -> None:
    """InputError on a duplicate image id or image path; entries[i] names where records[i] came from."""
    by_id, by_path = {}, {}
    for i, r in enumerate(records):
        for key, seen, what in ((r.image_id, by_id, "image id"), (r.path, by_path, "image path")):
            if key in seen:
                raise InputError(f"Duplicate {what} {key!r}: {entries[seen[key]]} and {entries[i]}.")
            seen[key] = i
