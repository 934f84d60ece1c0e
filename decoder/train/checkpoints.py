"""Training checkpoints: one atomic `.npz` file per checkpoint holding every variable and the loop state.

A checkpoint holds the model variables (named `<object>/<variable path>`, e.g. `decoder/lstm/kernel`), the
optimizer slots (`opt/<i>`) and a JSON `meta` entry: step, epoch, position in the epoch (the data order and
dropout are functions of seed, epoch and step, so that is the whole RNG state), best validation perplexity,
loss scale. `ckpt-<step>.npz` files keep the last N; `best.npz` is the best by validation perplexity.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np

from base.atomic import atomic_write_bytes
from base.errors import InputError

_NAME = re.compile(r"^ckpt-(\d+)\.npz$")


def variable_arrays(objects: dict, slots: list) -> dict:
    """{name: np.ndarray} of every variable of `objects` ({key: keras model}) and the optimizer slots."""
    arrays = {}
    for key, obj in objects.items():
        for var in obj.weights:
            arrays[f"{key}/{var.path}"] = np.asarray(var.numpy())
    for i, var in enumerate(slots):
        arrays[f"opt/{i}"] = np.asarray(var.numpy())
    return arrays


def _write_npz_atomic(path: Path, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


class CheckpointManager:
    """Saves/restores loop checkpoints in `directory`, keeping the last `keep` plus `best.npz`."""

    def __init__(self, directory: Path, keep: int = 5, log=print):
        self.directory = Path(directory)
        self.keep = max(1, keep)
        self.log = log

    def steps(self) -> list[int]:
        """Steps of the existing `ckpt-<step>.npz` files, ascending."""
        if not self.directory.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def path(self, step: int) -> Path:
        return self.directory / f"ckpt-{step}.npz"

    def save(self, objects: dict, slots: list, meta: dict, best: bool = False) -> Path:
        """Write ckpt-<meta['step']>.npz (and best.npz when `best`), then prune old ones."""
        self.directory.mkdir(parents=True, exist_ok=True)
        arrays = variable_arrays(objects, slots)
        arrays["meta"] = np.array(json.dumps(meta))
        path = self.path(int(meta["step"]))
        _write_npz_atomic(path, arrays)
        if best:
            _write_npz_atomic(self.directory / "best.npz", arrays)
        for old in self.steps()[:-self.keep]:
            self.path(old).unlink(missing_ok=True)
        for stale in self.directory.glob("*.tmp-*"):
            if not stale.name.endswith(f".tmp-{os.getpid()}"):
                stale.unlink(missing_ok=True)
        return path

    def restore_latest(self, objects: dict, slots: list) -> dict | None:
        """Load the newest readable checkpoint into the variables; returns its meta, None when there is none.

        A damaged checkpoint (truncated, empty, not a zip) is skipped with a message and the next older one
        is used; a checkpoint of another model still raises InputError."""
        for step in reversed(self.steps()):
            path = self.path(step)
            try:
                arrays = read_checkpoint(path)
            except InputError as err:
                self.log(f"warning: {err} Falling back to an older checkpoint.")
                continue
            return assign(path, arrays, objects, slots)
        return None


def read_checkpoint(path: Path) -> dict:
    """{name: np.ndarray} of checkpoint `path` (meta included); InputError when it cannot be read whole."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        json.loads(str(arrays["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"Checkpoint {path} cannot be read ({type(err).__name__}: {err}).") from None
    return arrays


def restore(path: Path, objects: dict, slots: list) -> dict:
    """Assign the arrays of checkpoint `path` to the variables; returns its meta dict."""
    return assign(path, read_checkpoint(path), objects, slots)


def assign(path: Path, arrays: dict, objects: dict, slots: list) -> dict:
    """Assign checkpoint arrays (read from `path`) to the variables; returns the meta dict."""
    for key, obj in objects.items():
        for var in obj.weights:
            name = f"{key}/{var.path}"
            if name not in arrays or tuple(arrays[name].shape) != tuple(var.shape):
                raise InputError(f"Checkpoint {path} does not match the model (variable {name}).")
            var.assign(arrays[name])
    for i, var in enumerate(slots):
        if f"opt/{i}" not in arrays:
            raise InputError(f"Checkpoint {path} does not match the optimizer (slot {i}).")
        var.assign(arrays[f"opt/{i}"])
    return json.loads(str(arrays["meta"]))
