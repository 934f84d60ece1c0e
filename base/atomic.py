"""THE atomic-write helper: write under a temp name beside the target, flush + fsync, then `os.replace`.

A crash or `kill -9` at any moment leaves either the old file or the new one, never a torn one; the temp
file of a write that fails inside Python is removed. `atomic_path` serves writers that need a file name
(h5py, Keras' save_weights, shutil.copyfile); the `atomic_write_*` functions serve bytes, text and JSON.
Temp names are `<name>.tmp-<pid><suffix>`: `remove_stale_temps` deletes those of dead processes.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def fsync_path(path) -> None:
    """fsync a file that was written and closed by other code (e.g. h5py or Keras)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path) -> None:
    """fsync a folder, so a rename inside it survives a power cut (no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_name(path: Path, suffix: str = "") -> Path:
    """`<name>.tmp-<pid><suffix>` beside `path` (suffix keeps an extension a library insists on)."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}{suffix}")


@contextlib.contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a temp path beside `path`; when the block ends normally the file written there is fsynced and
    renamed over `path`, when it raises the temp file is removed. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path, suffix)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` atomically; creates the parent folder. Returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    """Write `text` as UTF-8 to `path` atomically. Returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, data, indent: int = 2, sort_keys: bool = False) -> Path:
    """Write `data` as JSON (UTF-8, newline-terminated) to `path` atomically. Returns the path."""
    return atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=False)
                             + "\n")


def remove_stale_temps(path) -> None:
    """Delete `<name>.tmp-<pid>*` files beside `path` whose process is gone (left by a kill -9)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for tmp in path.parent.glob(f"{path.name}.tmp-*"):
        pid = tmp.name[len(path.name) + 5:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            tmp.unlink(missing_ok=True)
