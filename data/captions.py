"""Caption annotations: one uniform record per image, read from COCO, Karpathy or Flickr8k files.

`load_annotations(paths, fmt="auto", split_scheme="auto")` reads one or more files of one format, validates
them and assigns train/val/test splits; this module is the entry point over `data/records.py` (ImageRecord,
path and id checks), `data/formats.py` (reading each format) and `data/splits.py` (the split schemes).
Supported formats (`fmt`):

- "coco": COCO `captions_*.json` (2014, 2017, or any file with "images" + "annotations"); an image entry may
  carry an optional "split" field (the file's own split). Paths: `file_name`, except COCO 2014 names
  (`COCO_train2014_*`, `COCO_val2014_*`), which become `train2014/<file_name>` / `val2014/<file_name>` so the
  images root is the COCO folder holding both, exactly as for Karpathy's dataset_coco.json.
- "karpathy": `dataset_coco.json` / `dataset_flickr8k.json` / `dataset_flickr30k.json`; paths
  `filepath/filename` (coco) or `filename` (flickr); its "split" field is used ("restval" counts as train).
- "flickr8k": `Flickr8k.token.txt` (`name.jpg#k<TAB>caption`) with `Flickr_8k.{train,dev,test}Images.txt`
  looked up next to it (dev = val). A stray id like `x.jpg.1#0` is mapped back to `x.jpg` (noted).
- "webdataset" / "parquet": img2dataset shards (`shards/*.tar`, `shards/{00000..00099}.tar`, `*.parquet`;
  auto-detected from the `.tar` / `.parquet` suffix): captions from `txt` (and a json `caption` field),
  paths = row keys `<shard stem>/<sample key>` (data/shards.py). No own split: `hash` by image id.

Flickr images have no dataset id: `data.records.flickr_image_id` derives one from the file name (see there).
Bad entries (empty caption, caption of an unknown image, image without captions, non-UTF-8 line) are
skipped and listed in `Annotations.skipped`; bad files (missing, unreadable, not UTF-8 JSON, unknown format,
duplicate image ids or paths, a path outside the images root) raise `InputError`.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from base.errors import InputError
from data import formats, shards, splits
from data.formats import FORMATS, SHARD_FORMATS
from data.records import ImageRecord, check_unique
from data.splits import SPLITS

__all__ = ["FORMATS", "SPLITS", "Annotations", "ImageRecord", "load_annotations"]


@dataclass
class Annotations:
    """All records of one load, with where they came from and what was skipped."""

    records: list[ImageRecord]  # in file order (files in the order given)
    format: str  # "coco" | "karpathy" | "flickr8k" | "webdataset" | "parquet"
    sources: list[str]  # the annotation files read
    scheme: str  # split scheme applied: "karpathy" | "file" (the file's own) | "im2txt" | "hash" | "none"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (entry, reason) of each skipped entry
    notes: list[tuple[str, str]] = field(default_factory=list)  # (entry, what was repaired), e.g. stray ids

    def part(self, split: str) -> list[ImageRecord]:
        """Records of one split ("train" | "val" | "test"); scheme "none": every record for any split."""
        if split not in SPLITS:
            raise InputError(f"Unknown split {split!r}: use one of {', '.join(SPLITS)}.")
        if self.scheme == "none":
            return list(self.records)
        return [r for r in self.records if r.split == split]

    def summary(self) -> str:
        """One line: images, captions, per-split image counts, skipped entries."""
        n_caps = sum(len(r.captions) for r in self.records)
        if self.scheme == "none":
            parts = "every image in train, val and test"
        else:
            parts = " / ".join(f"{s} {len(self.part(s)):,}" for s in SPLITS)
        line = (
            f"{len(self.records):,} images, {n_caps:,} captions ({self.format}, split {self.scheme}: "
            f"{parts}), {len(self.skipped):,} skipped"
        )
        if self.skipped:
            entry, reason = self.skipped[0]
            line += f" (first: {entry}: {reason})"
        if self.notes:
            line += f", {len(self.notes):,} repaired"
        return line


def load_annotations(
    paths: str | Path | Sequence[str | Path], fmt: str = "auto", split_scheme: str = "auto", columns=None
) -> Annotations:
    """Read caption files of one format, validate them and assign splits.

    Args:
      paths: one file or a sequence of files (e.g. COCO 2014 train + val captions).
      fmt: "auto" (detected from content) or one of FORMATS to force it.
      split_scheme: one of data.splits.SPLIT_SCHEMES.
      columns: parquet shards only: data.shards.ShardColumns (None: img2dataset's jpg/txt/key).
    Returns:
      Annotations. Raises InputError (one sentence naming the file/entry) on a bad file or argument.
    """
    if split_scheme not in splits.SPLIT_SCHEMES:
        raise InputError(
            f"Unknown split scheme {split_scheme!r}: use one of {', '.join(splits.SPLIT_SCHEMES)}."
        )
    if fmt != "auto" and fmt not in FORMATS:
        raise InputError(f"Unknown caption format {fmt!r}: use auto or one of {', '.join(FORMATS)}.")
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    if not paths:
        raise InputError("No caption file given.")
    reads, formats_seen = _read_all(paths, fmt, columns)
    if len(set(formats_seen)) > 1:
        listing = ", ".join(f"{p} is {f}" for p, f in zip(paths, formats_seen, strict=True))
        raise InputError(f"Caption files of different formats cannot be mixed ({listing}).")
    records, entries, skipped, notes = [], [], [], []
    for r in reads:
        records += r.records
        entries += r.entries
        skipped += r.skipped
        notes += r.notes
    check_unique(records, entries)
    own = all(r.own_split for r in reads)
    records, scheme, dropped = splits.assign_splits(records, formats_seen[0], split_scheme, own, paths)
    return Annotations(records, formats_seen[0], [str(p) for p in paths], scheme, skipped + dropped, notes)


def _read_all(paths: list, fmt: str, columns) -> tuple[list[formats.FileRead], list[str]]:
    """(one FileRead per file, its format); shard patterns (by --format or the .tar/.parquet suffix) are
    read together as one source by data.shards."""
    if fmt in SHARD_FORMATS or (fmt == "auto" and all(shards.is_shard_pattern(p) for p in paths)):
        read = shards.read_captions([str(p) for p in paths], None if fmt == "auto" else fmt, columns)
        return [read], [shards.expand_shards([str(p) for p in paths])[0] if fmt == "auto" else fmt]
    reads, formats_seen = [], []
    for p in paths:
        file_fmt, payload = formats.parse(Path(p), formats.read_source(Path(p)), fmt)
        formats_seen.append(file_fmt)
        reads.append(formats.READERS[file_fmt](Path(p), payload))
    return reads, formats_seen
