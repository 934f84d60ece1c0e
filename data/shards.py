"""img2dataset shards as input: webdataset tar files and parquet files, read in place (never unpacked).

Shard arguments are file names, globs (`shards/*.tar`) or brace patterns (`shards/{00000..00099}.tar`,
`{a,b}.parquet`); the suffix names the format (`.tar`: webdataset, `.parquet`: parquet).

One shard is read by data/shard_readers.py (webdataset: tar headers and caption members only, an image
read at its offset when its row is decoded; parquet: img2dataset's `jpg` / `txt` / `key` columns, or the
names given in `ShardColumns`). Nothing is unpacked.

Row keys are `<shard file stem>/<sample key>` (`00003/000030012`), unique across the shards of one run
even when every shard numbers its samples from 0. Image ids are the sample keys when all of them are
decimal integers (img2dataset's keys are) and unique, else a 63-bit BLAKE2b hash of the row key
(`data.records.flickr_image_id`'s rule for names). A shard that cannot be read (not a tar or parquet file,
cut off, or a name of a brace pattern that does not exist: img2dataset leaves failed shards out) is recorded
in `ShardIndex.damaged` as (shard, why); its intact samples are kept and the other shards go on.
"""

import glob
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from base.errors import InputError
from data.formats import FileRead
from data.records import ImageRecord
from data.shard_readers import ShardColumns, ShardSample, index_parquet, index_webdataset

SHARD_FORMATS = {".tar": "webdataset", ".parquet": "parquet"}  # file suffix -> format name
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


@dataclass
class ShardIndex:
    """Every sample of a list of shards, in shard order then file order."""

    format: str  # "webdataset" | "parquet"
    shards: list[str]
    samples: list[ShardSample] = field(default_factory=list)
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (shard, why) of unreadable/cut-off shards

    def summary(self) -> str:
        """One line: samples, shards, damaged shards (the first named)."""
        line = f"{self.format}: {len(self.samples):,} samples in {len(self.shards):,} shards"
        if self.damaged:
            line += f", {len(self.damaged)} damaged (first: {self.damaged[0][0]}: {self.damaged[0][1]})"
        return line


def expand_braces(pattern: str) -> list[str]:
    """`a{0..2}b` -> [a0b, a1b, a2b] (zero padding kept: {00..10}), `{x,y}` -> alternatives; nested left
    to right. A pattern without braces is returned as is."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    rng = _RANGE.match(body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        parts = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        parts = body.split(",")
    else:
        parts = ["{" + body + "}"]
        return [head + parts[0] + t for t in expand_braces(tail)]
    return [head + p + t for p in parts for t in expand_braces(tail)]


def shard_format(path) -> str | None:
    """"webdataset" / "parquet" from a shard file name's suffix; None for anything else."""
    return SHARD_FORMATS.get(Path(str(path)).suffix.lower())


def is_shard_pattern(arg) -> bool:
    """True when an argument (file, glob or brace pattern) names shard files by its suffix."""
    return any(shard_format(p) for p in expand_braces(str(arg)))


def _matches(pattern: str) -> list[str]:
    """The files a glob matches (sorted), or [pattern] when it is an existing file, else []."""
    if glob.has_magic(pattern):
        return sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    return [pattern] if Path(pattern).is_file() else []


def expand_shards(patterns, fmt: str | None = None) -> tuple[str, list[str], list[str]]:
    """(format, shard files in argument order, missing names of brace patterns). A brace pattern's missing
    names are returned (img2dataset leaves a failed shard out), not fatal; InputError when a file name is
    missing, a pattern matches nothing, or the formats are mixed."""
    files, missing = [], []
    for arg in patterns:
        names = expand_braces(str(arg))
        found_any = False
        for pattern in names:
            found = _matches(pattern)
            if not found and len(names) > 1:
                missing.append(pattern)
            elif not found:
                raise InputError(f"shard {'pattern ' if glob.has_magic(pattern) else ''}{pattern} "
                                 f"{'matches no file' if glob.has_magic(pattern) else 'does not exist'}.")
            found_any |= bool(found)
            files += found
        if not found_any:
            raise InputError(f"shard pattern {arg} matches no file.")
    formats = {shard_format(f) or "unknown" for f in files}
    if fmt is not None and formats != {fmt}:
        bad = next(f for f in files if shard_format(f) != fmt)
        raise InputError(f"{bad} is not a {fmt} shard (expected {fmt_suffix(fmt)} files).")
    if len(formats) > 1 or "unknown" in formats:
        raise InputError(f"shards must all be .tar (webdataset) or all .parquet files ({', '.join(files[:3])}"
                         f"{', ...' if len(files) > 3 else ''}).")
    return formats.pop(), list(dict.fromkeys(files)), missing


def fmt_suffix(fmt: str) -> str:
    """The file suffix of a shard format ("webdataset" -> ".tar")."""
    return next(s for s, f in SHARD_FORMATS.items() if f == fmt)



def _assign_ids(samples: list[ShardSample]) -> None:
    """Sample keys as ids when all are unique decimal integers < 2**63; else hashes of the row keys."""
    keys = [s.sample_key for s in samples]
    if all(k.isdigit() and len(k) <= 18 for k in keys) and len({int(k) for k in keys}) == len(keys):
        for s in samples:
            s.image_id = int(s.sample_key)
        return
    for s in samples:
        digest = hashlib.blake2b(s.key.encode("utf-8"), digest_size=8).digest()
        s.image_id = int.from_bytes(digest, "big") & (2**63 - 1)


def index_shards(patterns, fmt: str | None = None, columns: ShardColumns | None = None) -> ShardIndex:
    """Index every sample of the shards named by `patterns` (see module docstring). InputError for bad
    arguments and for two samples with one row key; damaged shards are recorded, not fatal."""
    fmt, files, missing = expand_shards(patterns, fmt)
    index = ShardIndex(fmt, files, damaged=[(name, "missing: no such file") for name in missing])
    seen: dict[str, str] = {}
    for path in files:
        if fmt == "webdataset":
            samples, damage = index_webdataset(path)
        else:
            samples, damage = index_parquet(path, columns or ShardColumns())
        if damage:
            index.damaged.append((path, damage))
        for s in samples:
            if s.key in seen:
                raise InputError(f"two samples have the row key {s.key!r} (in {seen[s.key]} and {path}); "
                                 "shard file names must differ.")
            seen[s.key] = path
        index.samples += samples
    _assign_ids(index.samples)
    return index


def read_captions(patterns, fmt: str, columns: ShardColumns | None = None) -> FileRead:
    """The caption readers' view of shards: one record per sample with captions (split None: the data has
    none; `hash` splits it by image id). Uncaptioned samples and damaged shards are listed as skipped."""
    index = index_shards(patterns, fmt, columns)
    out = FileRead([], [], own_split=False)
    for shard, why in index.damaged:
        out.skipped.append((Path(shard).name, f"damaged shard: {why}"))
    for s in index.samples:
        entry = f"{Path(s.key).parent}: sample {s.sample_key}"
        if not s.captions:
            out.skipped.append((entry, "no caption (no .txt, no json caption field)"))
            continue
        out.records.append(ImageRecord(s.image_id, s.key, None, list(s.captions)))
        out.entries.append(entry)
    return out
