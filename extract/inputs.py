"""What `extract` reads: the rows (key, image id, file) from caption files, image paths/folders/globs, or
img2dataset shards (webdataset tars, parquet; data/shards.py: rows are shard members read in place).

Every check on arguments happens here, before any work: a missing or unreadable images root, a path that
matches nothing, an output folder that does not exist or is not writable raise `InputError`.
`check_output` / `check_output_dir` are THE writability checks of every command's outputs (extract and
merge-features --out, caption --json, train-decoder --model-dir, finetune --out, evaluate --out-dir,
--results, --metrics, --report): besides the permission bits, they write, fsync and delete a small probe
file, so a read-only mount or a full disk is refused with one sentence before any work.
"""

import contextlib
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from base.errors import InputError
from data.captions import load_annotations
from data.formats import SHARD_FORMATS
from data.shard_readers import ShardColumns, ShardMember
from data.shards import index_shards, is_shard_pattern

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
PROBE_BYTES = 1 << 16  # a write of this size must succeed in an output folder (a full disk fails it)


@dataclass
class Rows:
    """The rows of an extraction, in order."""

    keys: list[str]  # posix path relative to its images root, or a shard row key (the store's /keys)
    image_ids: list[int]  # dataset id, -1 when unknown
    files: list[str | ShardMember | None]  # file or shard member to decode; None: under no images root
    source: str  # one line saying where the rows came from
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (input shard, why) unreadable/cut off

    def __len__(self) -> int:
        return len(self.keys)

    def shard(self, k: int, n: int) -> "Rows":
        """Rows i with i % n == k (deterministic; merge interleaves them back)."""
        return Rows(self.keys[k::n], self.image_ids[k::n], self.files[k::n], self.source, self.damaged)


def check_root(root) -> Path:
    """An images root that exists and can be listed and read; InputError otherwise."""
    path = Path(root)
    if not path.is_dir():
        raise InputError(f"images folder {root} does not exist or is not a folder.")
    if not os.access(path, os.R_OK | os.X_OK):
        raise InputError(f"images folder {root} is not readable (permission denied).")
    try:
        next(os.scandir(path), None)
    except OSError as err:
        raise InputError(f"images folder {root} cannot be listed: {err.strerror or err}.") from None
    return path


def probe_write(folder: Path) -> None:
    """Write PROBE_BYTES to a temporary file in `folder`, fsync and delete it; OSError when the folder's
    disk is read-only or full."""
    probe = Path(folder) / f".showtell-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, bytes(PROBE_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _writable_folder(folder: Path, what: str) -> None:
    """InputError unless files can be written in the existing folder `folder` (`what` names it)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{what} {folder} is not writable.")
    try:
        probe_write(folder)
    except OSError as err:
        raise InputError(f"{what} {folder} cannot be written ({err.strerror or err}).") from None


def _existing_ancestor(path: Path, what: str) -> Path:
    """The nearest existing folder at or above `path` (the one a writer's mkdir happens in)."""
    for folder in [path, *path.parents]:
        if folder.exists():
            if not folder.is_dir():
                raise InputError(f"{what} {path} cannot be created: {folder} is a file, not a folder.")
            return folder
    return Path(".")


def check_output(out, create_folders: bool = False, what: str = "output") -> Path:
    """An output file path whose folder is writable (and has room); InputError otherwise. create_folders:
    the folder may be missing (the writer creates it), then its nearest existing ancestor is checked."""
    path = Path(out)
    if path.is_dir():
        raise InputError(f"{what} {out} is a folder; give a file name like {Path(out) / 'features.h5'}.")
    parent = path.parent if str(path.parent) else Path(".")
    if create_folders:
        parent = _existing_ancestor(parent, what)
    elif not parent.is_dir():
        raise InputError(f"{what} folder {parent} does not exist (create it first).")
    _writable_folder(parent, f"{what} folder")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise InputError(f"{what} file {out} exists but is not readable and writable.")
    return path


def check_output_dir(out, what: str) -> Path:
    """An output folder (e.g. a model dir; created by the writer when missing) in which files can be
    written; InputError naming `what` (e.g. "--model-dir") otherwise."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {out} is a file, not a folder.")
    _writable_folder(_existing_ancestor(path, what), f"{what} {out}: folder")
    return path


def resolve_image(rel: str, roots: list[Path]) -> str | None:
    """The file `root / rel` under the first images root that holds it, else None (looked up in turn)."""
    for root in roots:
        candidate = root / rel
        if candidate.is_file():
            return str(candidate)
    return None


def rows_from_captions(captions, images, fmt: str = "auto", split_scheme: str = "auto") -> Rows:
    """Every annotated image (all splits) of the caption file(s), looked up in each images root in turn."""
    if not images:
        raise InputError("--captions needs --images DIR (the folder its image paths are relative to).")
    roots = [check_root(r) for r in images]
    ann = load_annotations(list(captions), fmt=fmt, split_scheme=split_scheme)
    seen, keys, ids, files = set(), [], [], []
    for rec in ann.records:
        if rec.path in seen:
            continue
        seen.add(rec.path)
        keys.append(rec.path)
        ids.append(int(rec.image_id))
        files.append(resolve_image(rec.path, roots))
    if not keys:
        raise InputError(f"caption file {', '.join(map(str, captions))} lists no images.")
    return Rows(keys, ids, files, f"captions: {ann.summary()}")


def _key_for(file: Path, base: Path | None, roots: list[Path]) -> str:
    """Key of a plain image path: relative to the first images root holding it, else to `base`."""
    resolved = file.resolve()
    for root in roots + ([base] if base is not None else []):
        try:
            return resolved.relative_to(root.resolve()).as_posix()
        except ValueError:
            continue
    return Path(os.path.normpath(file)).as_posix()


def _expand(arg: str) -> list[tuple[Path, Path | None]]:
    """(file, base folder or None) for one PATHS argument: a file, a folder (recursive) or a glob."""
    path = Path(arg)
    if path.is_file():
        return [(path, None)]
    if path.is_dir():
        check_root(path)
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return [(p, path) for p in found]
    if glob.has_magic(arg):
        found = sorted(Path(p) for p in glob.glob(arg, recursive=True) if Path(p).is_file())
        if not found:
            raise InputError(f"pattern {arg} matches no file.")
        return [(p, None) for p in found]
    raise InputError(f"image path {arg} does not exist.")


def rows_from_paths(paths, images=()) -> Rows:
    """Every image found in PATHS (files as given; folders recursively by suffix; globs), in order.

    Keys are relative to the first `--images` root holding the file, else to the folder argument, else the
    path as given. Image ids are -1.
    """
    roots = [check_root(r) for r in images]
    keys, files, owner = [], [], {}
    for arg in paths:
        for file, base in _expand(str(arg)):
            key = _key_for(file, base, roots)
            real = str(file.resolve())
            if key in owner:
                if owner[key] == real:
                    continue
                raise InputError(f"two images have the same key {key!r} ({owner[key]} and {real}).")
            owner[key] = real
            keys.append(key)
            files.append(str(file))
    if not keys:
        raise InputError(f"no image files found in {', '.join(map(str, paths))}.")
    return Rows(keys, [-1] * len(keys), files, f"{len(keys)} image files from {len(paths)} path argument(s)")


def rows_from_shards(patterns, fmt: str | None = None, columns: ShardColumns | None = None) -> Rows:
    """Every sample of img2dataset shards (webdataset tars / parquet; data.shards), in shard order: keys
    `<shard stem>/<sample key>`, files = shard members read in place. Damaged shards are in `damaged`."""
    index = index_shards(list(patterns), fmt, columns)
    if not index.samples:
        why = f" ({index.damaged[0][0]}: {index.damaged[0][1]})" if index.damaged else ""
        raise InputError(f"the shards hold no samples{why}.")
    return Rows([s.key for s in index.samples], [s.image_id for s in index.samples],
                [s.member for s in index.samples], index.summary(), list(index.damaged))


def _shard_inputs(args, fmt: str) -> bool:
    """True when the arguments are shards (forced by --format or all named by suffix); InputError when
    shards and image files are mixed."""
    if fmt in SHARD_FORMATS:
        return True
    marks = [is_shard_pattern(a) for a in args]
    if any(marks) and not all(marks):
        raise InputError("give either shards (.tar / .parquet) or image files, not both.")
    return bool(marks) and all(marks)


def gather_rows(paths=(), images=(), captions=(), fmt="auto", split_scheme="auto", columns=None) -> Rows:
    """Rows from `--captions` (+ `--images`), from image PATHS (+ optional `--images` roots for keys), or
    from img2dataset shards given as PATHS or as --captions (--format webdataset|parquet or by suffix)."""
    if captions and paths:
        raise InputError("give either --captions (with --images) or image PATHS, not both.")
    if (captions or paths) and _shard_inputs(captions or paths, fmt):
        if images:
            raise InputError("--images is not used with shards (the images are inside them).")
        return rows_from_shards(captions or paths, fmt if fmt in SHARD_FORMATS else None, columns)
    if captions:
        return rows_from_captions(captions, images, fmt, split_scheme)
    if paths:
        return rows_from_paths(paths, images)
    if images:
        return rows_from_paths(list(images), images)
    raise InputError("nothing to extract: give image PATHS, or --images DIR (with --captions FILE).")
