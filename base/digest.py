"""SHA-256 of a file's bytes, read in blocks: THE file digest (model-dir vocabulary and weights checks, the
source-decoder identity of train-scst and finetune runs)."""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 1 << 20


def file_sha256(path) -> str:
    """Hex SHA-256 (64 lower-case characters) of the bytes of `path`, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
