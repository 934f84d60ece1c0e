"""What `extract` reads: the rows (key, image id, file) from caption files or image paths/folders/globs.

Every check on arguments happens here, before any work: a missing or unreadable images root, a path that
matches nothing, an output folder that does not exist or is not writable raise `InputError`.
"""

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from data.captions import load_annotations
from data.errors import InputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class Rows:
    """The rows of an extraction, in order."""

    keys: list[str]  # posix path relative to its images root (the store's /keys)
    image_ids: list[int]  # dataset id, -1 when unknown
    files: list[str | None]  # the file to decode; None when found under no images root
    source: str  # one line saying where the rows came from

    def __len__(self) -> int:
        return len(self.keys)

    def shard(self, k: int, n: int) -> "Rows":
        """Rows i with i % n == k (deterministic; merge interleaves them back)."""
        return Rows(self.keys[k::n], self.image_ids[k::n], self.files[k::n], self.source)


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


def check_output(out) -> Path:
    """An output path whose folder exists and is writable; InputError otherwise."""
    path = Path(out)
    if path.is_dir():
        raise InputError(f"output {out} is a folder; give a file name like {Path(out) / 'features.h5'}.")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output folder {parent} does not exist (create it first).")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"output folder {parent} is not writable.")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise InputError(f"output file {out} exists but is not readable and writable.")
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


def gather_rows(paths=(), images=(), captions=(), fmt="auto", split_scheme="auto") -> Rows:
    """Rows from `--captions` (+ `--images`) or from image PATHS (+ optional `--images` roots for keys)."""
    if captions and paths:
        raise InputError("give either --captions (with --images) or image PATHS, not both.")
    if captions:
        return rows_from_captions(captions, images, fmt, split_scheme)
    if paths:
        return rows_from_paths(paths, images)
    if images:
        return rows_from_paths(list(images), images)
    raise InputError("nothing to extract: give image PATHS, or --images DIR (with --captions FILE).")
