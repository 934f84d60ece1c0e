"""Reading one img2dataset shard in place (used by data/shards.py, which lists and indexes many).

- webdataset (`index_webdataset`): members `<key>.<ext>` grouped by key (the member name up to the first dot
  of its last path part, as webdataset does); the image is the first member with an image suffix, captions
  come from `<key>.txt` and the `caption` field of `<key>.json`. Only the headers and the small caption
  members are read; an image is located by its offset (`ShardMember`) and read when its row is decoded. A
  cut-off tar (a member past the end, or no end-of-archive block) is reported as damaged.
- parquet (`index_parquet`): the key and caption columns are read at indexing, the image column one row
  group at a time when a row is decoded (a small per-process cache of row groups).
"""

import json
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

from base.errors import InputError
from data.formats import clean_caption

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "image_bytes")  # parquet image column fallbacks


@dataclass(frozen=True)
class ShardColumns:
    """Parquet column names (img2dataset's by default)."""

    image: str = "jpg"  # image bytes (binary)
    caption: str = "txt"  # caption text (string; null = no caption)
    key: str = "key"  # sample key (string); absent: the row number in the file

    @classmethod
    def parse(cls, spec: str | None) -> "ShardColumns":
        """`image=jpg,caption=txt,key=key` (any subset) -> ShardColumns; InputError on a bad spec."""
        if not spec:
            return cls()
        names = {}
        for part in spec.split(","):
            name, eq, column = (s.strip() for s in part.partition("="))
            if not eq or name not in ("image", "caption", "key") or not column:
                raise InputError(f"--parquet-columns {spec!r}: use e.g. image=jpg,caption=txt,key=key.")
            names[name] = column
        return cls(**names)


class SampleError(OSError):
    """A sample without usable image bytes; `str(err)` is a `"<category>: <detail>"` reason."""


@dataclass(frozen=True)
class ShardMember:
    """Where one sample's image bytes are: a tar member (offset, size) or a parquet row."""

    shard: str  # the shard file
    offset: int  # tar: byte offset of the member data; parquet: row group
    size: int  # tar: member size in bytes; parquet: row within the row group
    column: str = ""  # parquet: the image column ("" for tar)
    error: str = ""  # "<category>: <detail>" when the sample has no usable image (read() raises it)

    def read(self) -> bytes:
        """The image bytes; SampleError (the recorded reason) or OSError (shard gone, unreadable, cut off)."""
        if self.error:
            raise SampleError(self.error)
        if self.column:
            return _parquet_cell(self.shard, self.offset, self.size, self.column)
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"shard {self.shard} is cut off inside this sample "
                          f"({len(data)} of {self.size} bytes)")
        return data


@dataclass
class ShardSample:
    """One sample of a shard: the row of the feature store and the record of the caption readers."""

    key: str  # row key: "<shard stem>/<sample key>"
    sample_key: str  # the key inside the shard
    member: ShardMember  # where the image bytes are (or why there are none: member.error)
    captions: list[str]  # raw captions (may be empty)
    image_id: int = -1


def _json_caption(data: bytes) -> str | None:
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return clean_caption(meta.get("caption")) if isinstance(meta, dict) else None


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's (key, extension) of a member name: split at the first dot of the last path part."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _tar_members(tar: tarfile.TarFile, size: int):
    """Yield the file members of an open tar whose data lies inside the file, then (a cut-off tar) the
    member the file ends in; return why the tar is damaged (None when it ends properly)."""
    while True:
        try:
            info = tar.next()
        except (tarfile.ReadError, EOFError, OSError) as err:
            return f"truncated: cannot read past byte {tar.offset} ({err})"
        if info is None:
            tar.fileobj.seek(tar.offset)
            end = tar.fileobj.read(tarfile.BLOCKSIZE)
            if len(end) < tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
                return f"truncated: no end-of-archive block at byte {tar.offset} (the file has {size} bytes)"
            return None
        if info.offset_data + info.size > size:
            end = info.offset_data + info.size
            yield info
            return f"truncated: member {info.name} ends at byte {end}, the file has {size}"
        if info.isfile():
            yield info


def _caption_of(tar: tarfile.TarFile, info: tarfile.TarInfo, ext: str) -> str | None:
    data = tar.extractfile(info).read()
    return _json_caption(data) if ext == "json" else clean_caption(data.decode("utf-8", "replace"))


def index_webdataset(path: str) -> tuple[list[ShardSample], str | None]:
    """(samples in file order, why the shard is damaged or None). Reads headers and the small caption
    members only; image members are located by offset. A sample cut off by a damaged end gets the reason."""
    stem, size = Path(path).stem, Path(path).stat().st_size
    groups: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            members = _tar_members(tar, size)
            while True:
                try:
                    info = next(members)
                except StopIteration as stop:
                    damage = stop.value
                    break
                key, ext = _split_name(info.name)
                group = groups.setdefault(key, {"captions": [], "member": None})
                if info.offset_data + info.size > size:
                    continue  # the member the file is cut off in: the sample gets the damage (below)
                if ext in IMAGE_EXTS and group["member"] is None:
                    group["member"] = ShardMember(str(path), info.offset_data, info.size)
                elif ext in ("txt", "json"):
                    text = _caption_of(tar, info, ext)
                    if text and text not in group["captions"]:
                        group["captions"].append(text)
    except (tarfile.ReadError, OSError, EOFError) as err:
        return [], f"unreadable: not a tar file ({err})"
    samples, last = [], next(reversed(groups), None)
    for key, g in groups.items():
        cut = damage and key == last
        error = f"truncated: shard {Path(path).name} is cut off here" if cut else "missing: no image member"
        member = g["member"] or ShardMember(str(path), -1, -1, error=error)
        samples.append(ShardSample(f"{stem}/{key}", key, member, g["captions"]))
    return samples, damage


def _parquet_file(path: str):
    import pyarrow.parquet as pq  # optional dependency (the `shards` extra); only parquet input needs it

    return pq.ParquetFile(path)


def _image_column(names: list[str], columns: ShardColumns) -> str | None:
    if columns.image in names:
        return columns.image
    if columns.image != ShardColumns.image:
        return None
    return next((c for c in IMAGE_COLUMNS if c in names), None)


def index_parquet(path: str, columns: ShardColumns) -> tuple[list[ShardSample], str | None]:
    """(samples in file order, why the shard is damaged or None). Reads the key and caption columns."""
    stem = Path(path).stem
    try:
        pf = _parquet_file(path)
        names = pf.schema_arrow.names
    except ImportError:
        raise InputError("parquet shards need pyarrow: pip install 'showtell[shards]'.") from None
    except Exception as err:  # noqa: BLE001 - any pyarrow failure: a damaged shard, recorded
        return [], f"unreadable: not a parquet file ({type(err).__name__}: {err})"
    image = _image_column(names, columns)
    if image is None:
        return [], f"unreadable: no image column {columns.image!r} (columns: {', '.join(names)})"
    wanted = [c for c in (columns.key, columns.caption) if c in names]
    samples = []
    for group in range(pf.num_row_groups):
        try:
            table = pf.read_row_group(group, columns=wanted).to_pydict() if wanted else {}
            n = pf.metadata.row_group(group).num_rows
        except Exception as err:  # noqa: BLE001
            return samples, f"truncated: row group {group} cannot be read ({type(err).__name__}: {err})"
        keys = table.get(columns.key) or [None] * n
        caps = table.get(columns.caption) or [None] * n
        for row in range(n):
            key = str(keys[row]) if keys[row] is not None else str(len(samples))
            caption = clean_caption(caps[row])
            samples.append(ShardSample(f"{stem}/{key}", key, ShardMember(str(path), group, row, image),
                                       [caption] if caption else []))
    return samples, None


_CACHE: dict = {}  # (path, row group, column) -> pyarrow array of the last groups read in this process
_CACHE_LOCK = threading.Lock()
_CACHE_GROUPS = 4


def _parquet_cell(path: str, group: int, row: int, column: str) -> bytes:
    key = (path, group, column)
    with _CACHE_LOCK:
        if key not in _CACHE:
            try:
                array = _parquet_file(path).read_row_group(group, columns=[column]).column(0)
            except Exception as err:  # noqa: BLE001 - reported as an unreadable row
                raise OSError(f"row group {group} of {path} cannot be read ({err})") from None
            while len(_CACHE) >= _CACHE_GROUPS:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = array
        value = _CACHE[key][row].as_py()
    if value is None:
        return b""
    return bytes(value)
