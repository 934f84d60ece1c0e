"""Atomic file writes: a temp name beside the target, flush + fsync, then `os.replace`.

A crash or `kill -9` at any moment leaves either the old file or the new one, never a torn one; the temp
file of an interrupted write is removed when the write fails inside Python.
"""

import json
import os
from pathlib import Path


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` atomically; creates the parent folder. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path, text: str) -> Path:
    """Write `text` as UTF-8 to `path` atomically. Returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, data, indent: int = 2, sort_keys: bool = False) -> Path:
    """Write `data` as JSON (UTF-8, newline-terminated) to `path` atomically. Returns the path."""
    return atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=False)
                             + "\n")
