"""Readers of the three caption formats into `ImageRecord`s (used by `data.captions.load_annotations`).

`read_source` reads a caption file's bytes, `parse` detects its format (or checks a forced one) and parses
it, and `READERS[format]` turns the parsed content into records. Each reader takes the file's path and its
parsed content and returns a `FileRead`: records in file order with `split` = the file's own split (None
where the file gives none), a label per record for messages, skipped entries and repairs. Entry labels look
like `captions.json: annotations[17]` or `Flickr8k.token.txt: line 6731`. The two img2dataset shard
formats (webdataset tars, parquet) are in FORMATS too but read by `data.shards.read_captions` (they are
many large files, streamed, not one file's bytes).
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from base.errors import InputError
from data.records import ImageRecord, fits_int64, flickr_image_id, safe_relpath

FORMATS = ("coco", "karpathy", "flickr8k", "webdataset", "parquet")  # READERS' keys + SHARD_FORMATS
SHARD_FORMATS = ("webdataset", "parquet")  # img2dataset shards: read by data.shards, not by READERS

# Own split names as files write them -> ours. Karpathy's "restval" is training data; Flickr's "dev" is val.
_SPLIT_NAMES = {"train": "train", "restval": "train", "val": "val", "dev": "val", "test": "test"}
_COCO2014 = re.compile(r"^COCO_(train|val|test)2014_\d+\.\w+$")
_STRAY_ID = re.compile(r"^(.+\.(?:jpe?g|png))\.\d+$", re.IGNORECASE)
FLICKR_LISTS = (
    ("train", "Flickr_8k.trainImages.txt"),
    ("val", "Flickr_8k.devImages.txt"),
    ("test", "Flickr_8k.testImages.txt"),
)


@dataclass
class FileRead:
    """What one reader got from one file."""

    records: list[ImageRecord]  # file order; split = the file's own split or None
    entries: list[str]  # entries[i] names where records[i] came from (for duplicate messages)
    own_split: bool  # the file defines splits (Karpathy, Flickr lists found, COCO "split" fields)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (entry, reason)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (entry, repair made)


def read_source(path: Path) -> bytes:
    """The bytes of an annotation file; InputError when missing, a directory or unreadable."""
    if not path.exists():
        raise InputError(f"Caption file {path} does not exist.")
    if path.is_dir():
        raise InputError(f"Caption file {path} is a directory, not a file.")
    try:
        return path.read_bytes()
    except OSError as err:
        raise InputError(f"Caption file {path} cannot be read: {err.strerror or err}.") from None


def parse_json(path: Path, content: bytes):
    """Decode UTF-8 (BOM allowed) JSON; InputError naming the file and the bad position."""
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"Caption file {path} is not UTF-8 text (bad byte at offset {err.start}).") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(
            f"Caption file {path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})."
        ) from None
    except RecursionError:
        raise InputError(f"Caption file {path} is nested too deeply to be a caption file (JSON arrays or "
                         "objects inside each other thousands of levels deep).") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise InputError(f"Caption file {path} is not usable JSON ({err}).") from None


def clean_caption(caption) -> str | None:
    """A caption with whitespace runs collapsed; None when it is not a string or is blank."""
    if not isinstance(caption, str):
        return None
    return " ".join(caption.split()) or None


def parse(path: Path, content: bytes, fmt: str = "auto") -> tuple[str, object]:
    """(format, payload): payload is the parsed JSON for coco/karpathy, the raw bytes for flickr8k."""
    if fmt == "flickr8k":
        return fmt, content
    head = content[:64].lstrip(b"\xef\xbb\xbf \t\r\n")
    if fmt == "auto" and head[:1] not in (b"{", b"["):
        first = next((ln for ln in content[:65536].splitlines() if ln.strip()), b"")
        if re.match(rb"^[^\t#]+#\d+\t", first):
            return "flickr8k", content
        raise InputError(
            f"Caption file {path} is in no known format (expected a COCO captions json, a "
            f"Karpathy dataset_*.json or a Flickr8k token file)."
        )
    data = parse_json(path, content)
    images = data.get("images") if isinstance(data, dict) else None
    if fmt in ("auto", "coco") and isinstance(images, list) and isinstance(data.get("annotations"), list):
        return "coco", data
    is_karpathy = isinstance(images, list) and (
        "dataset" in data or any(isinstance(im, dict) and "sentences" in im for im in images[:10])
    )
    if fmt in ("auto", "karpathy") and is_karpathy:
        return "karpathy", data
    if fmt == "auto":
        raise InputError(
            f"Caption file {path} is JSON but neither COCO captions ('images' + 'annotations') nor "
            f"a Karpathy dataset file ('images' with 'sentences')."
        )
    need = "'images' and 'annotations' lists" if fmt == "coco" else "an 'images' list with 'sentences'"
    raise InputError(f"Caption file {path} is not in {fmt} format (it needs {need}).")


def _own_split(value, entry: str, skipped: list) -> str | None | bool:
    """Normalised own split; False (and a skip recorded) when the value is not a known split name."""
    split = _SPLIT_NAMES.get(value) if isinstance(value, str) else None
    if split is None:
        skipped.append((entry, f"unknown split {value!r} (use train, val or test)"))
        return False
    return split


def read_coco(path: Path, data: dict) -> FileRead:
    """COCO captions json -> records (images without captions are skipped)."""
    name, out = path.name, FileRead([], [], own_split=False)
    by_id, bad = {}, set()
    for i, img in enumerate(data["images"]):
        entry = f"{name}: images[{i}]"
        iid = img.get("id") if isinstance(img, dict) else None
        if not isinstance(iid, int) or isinstance(iid, bool):
            out.skipped.append((entry, "no integer 'id'"))
            continue
        if not fits_int64(iid):
            out.skipped.append((entry, f"image id {iid} does not fit in 64 bits"))
            continue
        entry = f"{entry} (id {iid})"
        if iid in by_id:
            raise InputError(
                f"Caption file {path}: {entry} repeats the image id of {out.entries[by_id[iid]]}."
            )
        rel = safe_relpath(img.get("file_name"), path, entry)
        m = _COCO2014.match(rel)
        split = None
        if "split" in img:
            out.own_split = True
            split = _own_split(img["split"], entry, out.skipped)
            if split is False:
                bad.add(iid)
        by_id[iid] = len(out.records)
        out.records.append(ImageRecord(iid, f"{m.group(1)}2014/{rel}" if m else rel, split or None, []))
        out.entries.append(entry)
    for k, ann in enumerate(data["annotations"]):
        entry = f"{name}: annotations[{k}]"
        iid = ann.get("image_id") if isinstance(ann, dict) else None
        if iid not in by_id or isinstance(iid, bool):
            out.skipped.append((entry, f"image_id {iid!r} is not in 'images'"))
            continue
        caption = clean_caption(ann.get("caption"))
        if caption is None:
            out.skipped.append((f"{entry} (image {iid})", "empty or missing caption"))
            continue
        out.records[by_id[iid]].captions.append(caption)
    return _drop_uncaptioned(out, bad)


def read_karpathy(path: Path, data: dict) -> FileRead:
    """Karpathy dataset_{coco,flickr8k,flickr30k}.json -> records with the file's own splits."""
    name, out = path.name, FileRead([], [], own_split=True)
    bad = set()
    for i, img in enumerate(data["images"]):
        entry = f"{name}: images[{i}]"
        if not isinstance(img, dict):
            out.skipped.append((entry, "not a JSON object"))
            continue
        filename, filepath = img.get("filename"), img.get("filepath")
        rel = safe_relpath(
            f"{filepath}/{filename}" if filepath and isinstance(filename, str) else filename, path, entry
        )
        cocoid = img.get("cocoid")
        if isinstance(cocoid, int) and not fits_int64(cocoid):
            out.skipped.append((entry, f"cocoid {cocoid} does not fit in 64 bits"))
            continue
        iid = cocoid if isinstance(cocoid, int) and not isinstance(cocoid, bool) else flickr_image_id(rel)
        entry = f"{entry} (id {iid})"
        split = _own_split(img.get("split"), entry, out.skipped)
        if split is False:
            bad.add(len(out.records))
        sentences = img.get("sentences") if isinstance(img.get("sentences"), list) else []
        captions = []
        for j, sent in enumerate(sentences):
            raw = sent.get("raw") if isinstance(sent, dict) else None
            if raw is None and isinstance(sent, dict) and isinstance(sent.get("tokens"), list):
                raw = " ".join(t for t in sent["tokens"] if isinstance(t, str))
            caption = clean_caption(raw)
            if caption is None:
                out.skipped.append((f"{entry} sentences[{j}]", "empty or missing caption"))
            else:
                captions.append(caption)
        out.records.append(ImageRecord(iid, rel, split or None, captions))
        out.entries.append(entry)
    return _drop_uncaptioned(out, bad, by_index=True)


def _drop_uncaptioned(out: FileRead, bad: set, by_index: bool = False) -> FileRead:
    """Remove records marked bad (already counted) and skip-count records left without captions."""
    keep_r, keep_e = [], []
    for i, (rec, entry) in enumerate(zip(out.records, out.entries, strict=True)):
        if (i if by_index else rec.image_id) in bad:
            continue
        if not rec.captions:
            out.skipped.append((entry, "no usable caption"))
            continue
        keep_r.append(rec)
        keep_e.append(entry)
    out.records, out.entries = keep_r, keep_e
    return out


def read_flickr8k(path: Path, content: bytes) -> FileRead:
    """Flickr8k.token.txt (`name#k<TAB>caption` lines) + the split lists found next to it."""
    name, out = path.name, FileRead([], [], own_split=False)
    by_path = {}
    for n, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue
        entry = f"{name}: line {n}"
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8").rstrip("\r")
        except UnicodeDecodeError:
            out.skipped.append((entry, "not UTF-8 text"))
            continue
        key, tab, caption = line.partition("\t")
        image = key.rpartition("#")[0] if re.search(r"#\d*$", key) else key
        caption = clean_caption(caption)
        if not tab or not image.strip():
            out.skipped.append((entry, "not 'image#k<TAB>caption'"))
            continue
        stray = _STRAY_ID.match(image)
        if stray:
            out.notes.append((entry, f"stray image id {image!r} read as {stray.group(1)!r}"))
            image = stray.group(1)
        if caption is None:
            out.skipped.append((f"{entry} ({image})", "empty caption"))
            continue
        rel = safe_relpath(image, path, entry)
        if rel not in by_path:
            by_path[rel] = len(out.records)
            out.records.append(ImageRecord(flickr_image_id(rel), rel, None, []))
            out.entries.append(entry)
        out.records[by_path[rel]].captions.append(caption)
    _apply_flickr_lists(path, out, by_path)
    return out


def _apply_flickr_lists(path: Path, out: FileRead, by_path: dict) -> None:
    """Set each record's own split from Flickr_8k.{train,dev,test}Images.txt beside the token file."""
    listed = {}
    for split, list_name in FLICKR_LISTS:
        list_path = path.parent / list_name
        if not list_path.is_file():
            continue
        out.own_split = True
        try:
            text = list_path.read_bytes().decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"Split list {list_path} cannot be read as UTF-8 text ({err}).") from None
        for n, image in enumerate(text.splitlines(), start=1):
            image = image.strip()
            if not image:
                continue
            if listed.get(image, split) != split:
                raise InputError(
                    f"Split list {list_path}, line {n}: {image} is already in the {listed[image]} list."
                )
            listed[image] = split
            if image in by_path:
                out.records[by_path[image]].split = split


READERS = {"coco": read_coco, "karpathy": read_karpathy, "flickr8k": read_flickr8k}
