"""`merge-features`: combine the shard stores of `extract --shard K --num-shards N` into one store.

Shard K holds rows i with i % N == K of the full row list, so merging interleaves them back: the result has
the rows, keys and attrs of an unsharded run (its `run` identity is the unsharded one, so rerunning the
unsharded command on it reports "already complete"). Refused: a missing, duplicate or incomplete shard, or
shards of different runs (inputs, CNN fingerprint, size, dtype, views, seed; the extraction batch size may
differ), or a shard that is damaged (data.features checks every chunk's checksum and refuses NaN/Inf).
Written to a temporary name and renamed, so a killed merge leaves nothing half-written; --out is locked
(`<out>.lock`, base.locks) while the merge runs. An existing --out is replaced only with `overwrite` and
only when it is a feature store (base.outputs: never a shard, never a file showtell did not write).
"""

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from base.atomic import atomic_path
from base.errors import InputError
from base.locks import exclusive
from base.outputs import check_command
from data.features import create_store, open_store
from extract.inputs import check_output
from extract.preprocess import error_category

BLOCK_ROWS = 1024
GRID_BLOCK_ROWS = 64  # rows per shard per block of a grid store (256 KiB per image at 8x8 float16)


def _shared(run: dict) -> dict:
    return {k: v for k, v in run.items() if k not in ("shard", "batch_size")}


def _open_shards(paths) -> list:
    stores = []
    try:
        for path in paths:
            store = open_store(path, require_complete=True)
            stores.append(store)
            if not store.attrs.get("run"):
                raise InputError(f"{path} was not written by `extract` (no run attr).")
    except BaseException:
        for store in stores:
            store.close()
        raise
    return stores


def _check_shards(stores) -> list:
    """The stores ordered by shard index; InputError when they do not form one complete run."""
    first = stores[0].attrs["run"]
    n = int(first["num_shards"])
    for store in stores[1:]:
        run = store.attrs["run"]
        if _shared(run) != _shared(first):
            diff = sorted(k for k in set(_shared(run)) | set(_shared(first)) if run.get(k) != first.get(k))
            raise InputError(f"{store.path} is a shard of a different run than {stores[0].path} "
                             f"(differs in: {', '.join(diff)}).")
    by_shard = {}
    for store in stores:
        k = int(store.attrs["run"]["shard"])
        if k in by_shard:
            raise InputError(f"{store.path} and {by_shard[k].path} are both shard {k}.")
        by_shard[k] = store
    missing = [k for k in range(n) if k not in by_shard]
    if missing:
        raise InputError(f"shard(s) {', '.join(map(str, missing))} of {n} are missing from the merge.")
    total = int(first["total_rows"])
    if sum(len(s) for s in stores) != total:
        raise InputError(f"the shards hold {sum(len(s) for s in stores)} rows, the run has {total}.")
    return [by_shard[k] for k in range(n)]


def _interleave(values: list, total: int, n: int) -> list:
    out = [None] * total
    for k, part in enumerate(values):
        out[k::n] = list(part)
    return out


def merge_shards(paths, out, overwrite: bool = False) -> str:
    """Merge shard stores into `out`; returns a one-line summary. InputError on mismatched shards, and
    (base.outputs) for an --out that is a shard, or exists and is not a feature store, or is one and
    `overwrite` is False."""
    if len(paths) < 1:
        raise InputError("merge-features needs the shard files to merge.")
    params = {"shards": list(paths), "out": str(out), "overwrite": overwrite}
    check_command("merge-features", params)
    out = check_output(out)
    with exclusive(out, folder=False):
        check_command("merge-features", params)  # again under the lock
        stores = _open_shards(paths)
        try:
            stores = _check_shards(stores)
            return _write(stores, out)
        finally:
            for store in stores:
                store.close()


def _write(stores, out: Path) -> str:
    n = len(stores)
    first = stores[0]
    run = dict(first.attrs["run"], shard=0, num_shards=1)
    total = int(run["total_rows"])
    keys = _interleave([s.keys for s in stores], total, n)
    ids = _interleave([s.image_ids for s in stores], total, n)
    attrs = {k: v for k, v in first.attrs.items()
             if k not in ("format", "format_version", "dtype", "views", "dim", "n_rows", "rows_done",
                          "n_failed", "complete")}
    attrs.update(run=run, run_id=hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest(),
                 shard=0, num_shards=1, total_rows=total, merged_from=[str(s.path) for s in stores])
    attrs.pop("config", None)
    with atomic_path(out, ".merge") as tmp:
        writer = create_store(tmp, keys, ids, dim=first.dim, views=first.views, dtype=str(first.dtype),
                              attrs=attrs, grid=first.grid_shape)
        block = (GRID_BLOCK_ROWS if first.grid_shape else BLOCK_ROWS) * n
        with writer:
            for start in range(0, total, block):
                stop = min(total, start + block)
                index = np.arange(start, stop)
                feats = np.zeros((len(index),) + first.read_features([0]).shape[1:], dtype=first.dtype)
                ok = np.zeros(len(index), dtype=bool)
                errors = [""] * len(index)
                grid = np.zeros((len(index),) + first.read_grid([0]).shape[1:], first.dtype) \
                    if first.grid_shape else None
                for k, store in enumerate(stores):
                    sel = np.nonzero(index % n == k)[0]
                    src = index[sel] // n
                    feats[sel] = store.read_features(src)
                    if grid is not None:
                        grid[sel] = store.read_grid(src)
                    ok[sel] = store.ok[src]
                    for i, j in zip(sel, src, strict=True):
                        errors[i] = store.errors[j]
                writer.commit(start, feats, ok, errors, grid)
            writer.finish()
    failed = Counter(error_category(e) for s in stores for e, ok in zip(s.errors, s.ok, strict=True)
                     if not ok)
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(failed.items()))
    return (f"merge-features: {n} shards -> {total} images | failed {sum(failed.values())}"
            f"{f' ({reasons})' if reasons else ''} | {os.path.getsize(out) / 1e6:.1f} MB {out}")
