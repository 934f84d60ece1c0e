"""`extract`: frozen-CNN features for every row into the feature store, resumable, shardable.

Resume: the run's identity (`run` attr: the inputs' hash, shard, CNN block, size, dtype, views, seed, compute
precision) is stored in the file. Rerunning the same command continues after `rows_done`; any other command on
the same file, or the same one with another compute precision (--precision, or `auto` on a machine that
resolves it otherwise: base.devices.auto_precision), is refused, naming what differs. Rows are committed a
batch at a time (see data/features.py), so a kill -9 loses at most the batch in flight; batches always start
at multiples of --batch-size, so a resumed run computes exactly the same batches as an uninterrupted one
(float32: identical bytes). The batch size is part of the identity: resuming an incomplete store with another
--batch-size is refused (the CNN's float results depend on the batch shape), while a complete store is
reported complete whatever the batch size (or compute precision).

The store is locked (`<store>.lock`, base.locks) for the whole run: a second extract on the same --out is
refused while the first is alive. Rows whose features come out NaN/Inf (a float16 overflow) are recorded as
failed ("non-finite: ..."), never stored as features.
"""

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from base.atomic import remove_stale_temps
from base.devices import precision_line, resolve_precision
from base.errors import InputError, RunStopped
from base.locks import exclusive
from data.features import FORMAT_NAME, StoreWriter, create_store, open_store
from data.integrity import nonfinite_rows, rows_digest
from data.shard_readers import ShardColumns
from extract.encoder import FEATURE_DIM, CNNSpec, check_spec, grid_size
from extract.inputs import Rows, check_output, gather_rows
from extract.pipeline import encode_batch, inference_encoder, make_dataset
from extract.preprocess import MAX_PIXELS, error_category


@dataclass
class ExtractConfig:
    """Settings of one extraction run (saved as JSON in the store's `config` attr)."""

    out: str  # the feature store to write (HDF5)
    paths: list[str] = field(default_factory=list)  # image files / folders / globs (instead of captions)
    images: list[str] = field(default_factory=list)  # images roots, looked up in turn
    captions: list[str] = field(default_factory=list)  # caption files; rows = their annotated images
    caption_format: str = "auto"  # auto | coco | karpathy | flickr8k | webdataset | parquet (shards)
    parquet_columns: str = ""  # parquet shards: "image=jpg,caption=txt,key=key" (any subset; "" = these)
    split_scheme: str = "auto"  # data.splits scheme (rows are all splits; kept for the record)
    cnn_weights: str = "imagenet"  # imagenet | none | weights file | slim:<ckpt>
    image_size: int = 299  # crop size S; resize is round(S * 346 / 299)
    batch_size: int = 32  # images per CNN call (and per commit)
    dtype: str = "float16"  # stored feature dtype: float16 | float32
    views: int = 1  # 1 eval view + (views - 1) distorted training views
    grid: bool = False  # also store the Mixed_7c grid [h, w, 2048] per view (/grid; attention decoders)
    shard: int = 0  # this shard, 0 <= shard < num_shards
    num_shards: int = 1  # rows i with i % num_shards == shard are extracted
    seed: int = 0  # random init (--cnn-weights none) and the distorted views
    precision: str = "auto"  # CNN compute: float32 | mixed_float16 | mixed_bfloat16 | auto (the machine's)
    max_pixels: int = MAX_PIXELS  # larger images are refused as decompression bombs
    progress: bool = True  # show a tqdm bar
    engine: str = "local"  # local (tf.data, this machine) | ray (shards on a Ray cluster: extract/ray_engine)
    address: str = ""  # --engine ray: an existing cluster's address ("" = start a local Ray for the command)
    workers: int = 0  # --engine ray: CNN actors (0 = one per GPU of the cluster, else half its CPUs)


@dataclass
class ExtractResult:
    """What a run did, for the summary line."""

    out: str
    total: int  # rows in this store
    done_now: int  # rows committed by this run
    skipped: int  # rows already in the file (resumed)
    failed: Counter  # failed rows of the whole store by reason category
    seconds: float
    file_bytes: int
    already_complete: bool = False

    def summary(self) -> str:
        """One line: done, skipped, failed with reasons, throughput, file size."""
        n_failed = sum(self.failed.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.failed.items()))
        rate = self.done_now / self.seconds if self.seconds > 0 else 0.0
        return (f"extract: {self.total} images | done {self.done_now}"
                f" | skipped {self.skipped} (already in file)"
                f" | failed {n_failed}{f' ({reasons})' if reasons else ''} | {rate:.1f} img/s"
                f" | {self.file_bytes / 1e6:.1f} MB {self.out}")


def check_config(cfg: ExtractConfig) -> None:
    """InputError for an option out of range (both engines, before any work)."""
    if cfg.dtype not in ("float16", "float32"):
        raise InputError(f"--dtype {cfg.dtype} is not float16 or float32.")
    if cfg.views < 1:
        raise InputError(f"--views {cfg.views} must be at least 1.")
    if cfg.batch_size < 1:
        raise InputError(f"--batch-size {cfg.batch_size} must be at least 1.")
    if cfg.engine not in ("local", "ray") or cfg.workers < 0:
        raise InputError(f"--engine {cfg.engine} / --workers {cfg.workers}: use local or ray, workers >= 0.")
    if cfg.num_shards < 1 or not 0 <= cfg.shard < cfg.num_shards:
        raise InputError(f"--shard {cfg.shard} must be in 0..{cfg.num_shards - 1} "
                         f"(--num-shards {cfg.num_shards}).")


def inputs_digest(keys, image_ids) -> str:
    """Hex SHA-256 of the full (unsharded) row list: keys and image ids in order (data.integrity's
    rows_digest, which a store also records of its own rows)."""
    return rows_digest(keys, image_ids)


def run_identity(cfg: ExtractConfig, rows: Rows, spec: CNNSpec, shard: int, num_shards: int) -> dict:
    """The fields that must match for a rerun to continue a file (JSON-able). "precision" is the CNN's
    compute precision (--precision; auto resolved on this machine: base.devices.auto_precision)."""
    return {"inputs": inputs_digest(rows.keys, rows.image_ids), "total_rows": len(rows), "shard": shard,
            "num_shards": num_shards, "dtype": cfg.dtype, "views": cfg.views, "seed": cfg.seed,
            "precision": resolve_precision(cfg.precision, "extract")[0], "batch_size": cfg.batch_size,
            "cnn": {k: v for k, v in spec.to_dict().items()}, "grid": bool(cfg.grid)}


def run_id(identity: dict) -> str:
    """Hex SHA-256 of a run identity (for a quick look with h5dump)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def run_differences(old: dict, new: dict, complete: bool = False) -> list[str]:
    """The options (as the user typed them) in which run identity `new` differs from a file's `old` one."""
    names = {"inputs": "images (the list of rows)", "total_rows": "number of images", "shard": "--shard",
             "num_shards": "--num-shards", "dtype": "--dtype", "views": "--views", "seed": "--seed"}
    special = ("cnn", "precision", "batch_size", "grid")
    if bool(old.get("grid", False)) != bool(new.get("grid", False)):  # absent: a store from before --grid
        return ["--grid (the file " + ("holds" if old.get("grid") else "has no") + " grid)"]
    out = [names.get(k, k) for k in new if k not in special and old.get(k) != new[k]]
    if not complete and old.get("batch_size", new["batch_size"]) != new["batch_size"]:  # absent: older store
        out.append(f"--batch-size (resume with --batch-size {old['batch_size']}, the one it started with)")
    if not complete and old.get("precision", new.get("precision")) != new.get("precision"):  # absent: older
        out.append(f"compute precision ({old['precision']} in the file, {new['precision']} on this machine)"
                   f" - resume with --precision {old['precision']}")
    old_cnn, new_cnn = old.get("cnn", {}), new["cnn"]
    for k in new_cnn:
        if old_cnn.get(k) != new_cnn[k] and (k != "fingerprint" or new_cnn[k]):
            out.append({"weights": "--cnn-weights", "image_size": "--image-size"}.get(k, f"CNN {k}"))
    return out


def check_same_run(path: Path, old: dict, new: dict, complete: bool) -> None:
    """InputError naming the options that differ when `path` (a store or part) holds another run."""
    diff = run_differences(old, new, complete)
    if diff:
        raise InputError(f"{path} was written by a different extract command (differs in: {', '.join(diff)});"
                         " use another --out or delete the file.")


def _existing_run(path: Path) -> tuple[dict | None, bool]:
    """(run identity, complete) of an existing store at `path`; (None, False) when there is none. The
    checksums of the rows a killed run was writing are resealed first (data.features.StoreWriter)."""
    if not path.exists():
        return None, False
    try:
        StoreWriter(path).close()
        with open_store(path, require_complete=False) as store:
            return dict(store.attrs.get("run") or {}), store.complete
    except InputError as err:
        raise InputError(f"{path} exists and cannot be resumed: {err}") from None


def failed_counts(errors: list[str], oks) -> Counter:
    """Failed rows per error category: errors [n] str, oks bool [n]."""
    return Counter(error_category(e) for e, ok in zip(errors, oks, strict=True) if not ok)


def _check_space(path: Path, n: int, cfg: ExtractConfig) -> None:
    cells = 1 + (grid_size(cfg.image_size) ** 2 if cfg.grid else 0)  # the pooled row + the grid's cells
    need = n * cfg.views * cells * FEATURE_DIM * np.dtype(cfg.dtype).itemsize + n * 400 + (1 << 20)
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise InputError(f"not enough disk space for {path}: needs {need / 1e6:.1f} MB, "
                         f"{free / 1e6:.1f} MB free.")


def static_attrs(cfg: ExtractConfig, spec: CNNSpec, identity: dict, rows: Rows, total: int) -> dict:
    """The store attrs both engines write once: the CNN, the run identity, the inputs."""
    s, r = spec.image_size, spec.resize_size
    return {"cnn": spec.to_dict(), "cnn_arch": spec.arch, "cnn_weights": spec.weights,
            "cnn_fingerprint": spec.fingerprint, "image_size": s, "resize_size": r,
            "resize_policy": f"resize {r}x{r} bilinear (aspect not kept), crop {s}x{s}, scale to [-1, 1]"
            + (f"; views 1..{cfg.views - 1}: random crop, flip, colour jitter" if cfg.views > 1 else ""),
            "run": identity, "run_id": run_id(identity),
            "shard": cfg.shard, "num_shards": cfg.num_shards, "total_rows": total, "source": rows.source,
            "config": asdict(cfg), "created_by": f"showtell extract ({FORMAT_NAME})",
            "damaged_shards": json.dumps(rows.damaged)}


def grid_shape_of(cfg: ExtractConfig, spec: CNNSpec) -> tuple[int, int] | None:
    """(h, w) of the store's /grid with --grid (both engines), None without."""
    return (grid_size(spec.image_size),) * 2 if cfg.grid else None


def _loop(writer: StoreWriter, rows: Rows, infer, cfg: ExtractConfig, spec: CNNSpec) -> int:
    start = writer.rows_done
    ds = make_dataset(rows.files, rows.keys, start, image_size=spec.image_size, views=cfg.views,
                      seed=cfg.seed, batch_size=cfg.batch_size, max_pixels=cfg.max_pixels)
    bar = tqdm(total=len(rows), initial=start, unit="img", disable=not cfg.progress, dynamic_ncols=True,
               desc="extract", smoothing=0.1)
    row, failed = start, 0
    try:
        for images, ok, errors in ds:
            ok = ok.numpy()
            n = len(ok)
            x = images.numpy().reshape((-1,) + tuple(images.shape[-3:]))
            out, grid = encode_batch(infer, x, cfg.grid)  # [n*V, D]; with --grid also [n*V, h, w, D]
            if grid is not None and cfg.views > 1:
                grid = grid.reshape((n, cfg.views) + grid.shape[1:])
            errors = [e.decode("utf-8", "replace") for e in errors.numpy()]
            feats, ok, grid = stored_rows(out.reshape((n, cfg.views, -1) if cfg.views > 1 else (n, -1)),
                                           ok, errors, grid, cfg.dtype)
            try:
                writer.commit(row, feats, ok, errors, grid)
            except OSError as err:
                raise RunStopped(f"writing {writer.path} failed at row {row} ({err}); {row} rows are saved, "
                                 "free some space and rerun the same command to resume.") from None
            row += n
            bar.update(n)
            failed += int(n - ok.sum())
            bar.set_postfix(failed=failed, refresh=False)
    finally:
        bar.close()
    return row - start


def stored_rows(feats: np.ndarray, ok: np.ndarray, errors: list[str], grid, dtype: str):
    """A batch as both engines store it: (features in `dtype` [n, ...], ok bool [n], grid in `dtype`
    [n, ...] or None), from float32 features [n, ...] / grid [n, ...] (or None): rows with NaN/Inf marked
    failed (their `errors` entry set), failed rows zeroed."""
    feats = feats.astype(dtype)
    ok = _drop_nonfinite(feats, ok, errors, grid)
    feats[~ok] = 0.0
    if grid is not None:
        grid = grid.astype(dtype)
        grid[~ok] = 0.0
    return feats, ok, grid


def _drop_nonfinite(feats: np.ndarray, ok: np.ndarray, errors: list[str], grid=None) -> np.ndarray:
    """ok bool [n] with the rows whose features or grid (float [n, ...]; in the stored dtype) hold NaN/Inf
    marked failed."""
    bad = np.zeros(len(ok), bool)
    bad[nonfinite_rows(feats)] = True
    if grid is not None:
        bad[nonfinite_rows(grid.astype(feats.dtype))] = True
    bad &= ok
    for i in np.nonzero(bad)[0]:
        errors[i] = f"non-finite: the CNN gave NaN/Inf features (in {feats.dtype})"
    return ok & ~bad


def run_extract(cfg: ExtractConfig, log=print) -> ExtractResult:
    """Extract features for every row into `cfg.out` (resuming a run of the same command), with the store
    locked for the whole run. `log` gets the captions-file load summary (skipped entries)."""
    check_config(cfg)
    out = check_output(cfg.out)
    if cfg.engine != "local":
        raise InputError(f"run_extract is the local engine; --engine {cfg.engine}: extract.ray_engine.")
    with exclusive(out, folder=False):
        return _run(cfg, out, log)


def _run(cfg: ExtractConfig, out: Path, log) -> ExtractResult:
    rows_all = gather_rows(cfg.paths, cfg.images, cfg.captions, cfg.caption_format, cfg.split_scheme,
                           ShardColumns.parse(cfg.parquet_columns))
    if cfg.captions or rows_all.damaged:
        log(rows_all.source)
    for shard, why in rows_all.damaged:
        log(f"damaged shard {shard}: {why} (its intact samples are extracted)")
    rows = rows_all.shard(cfg.shard, cfg.num_shards) if cfg.num_shards > 1 else rows_all
    if not len(rows):
        raise InputError(f"shard {cfg.shard} of {cfg.num_shards} has no images ({len(rows_all)} in all).")
    spec = CNNSpec(weights=cfg.cnn_weights, seed=cfg.seed, image_size=cfg.image_size)
    check_spec(spec)
    identity = run_identity(cfg, rows_all, spec, cfg.shard, cfg.num_shards)
    old, complete = _existing_run(out)
    if old is not None:
        check_same_run(out, old, identity, complete)
    remove_stale_temps(out)
    log(precision_line(cfg.precision, "extract")[1])
    infer, spec = inference_encoder(spec, identity["precision"], grid=cfg.grid)
    identity["cnn"] = spec.to_dict()
    t0 = time.perf_counter()
    if old is not None:
        check_same_run(out, old, identity, complete)
        if complete:
            with open_store(out) as store:
                failed = failed_counts(store.errors, store.ok)
                return ExtractResult(str(out), len(store), 0, len(store), failed, 0.0, os.path.getsize(out),
                                     already_complete=True)
        writer = StoreWriter(out)
    else:
        _check_space(out, len(rows), cfg)
        try:
            attrs = static_attrs(cfg, spec, identity, rows, len(rows_all))
            writer = create_store(out, rows.keys, rows.image_ids, dim=FEATURE_DIM, views=cfg.views,
                                  dtype=cfg.dtype, attrs=attrs,
                                  grid=grid_shape_of(cfg, spec))
        except OSError as err:
            raise InputError(f"cannot create {out}: {err}") from None
    with writer:
        skipped = writer.rows_done
        done = _loop(writer, rows, infer, cfg, spec) if skipped < len(rows) else 0
        if writer.rows_done == len(rows):
            writer.finish()
        failed = failed_counts(writer.errors_done(), writer.ok_done())
    return ExtractResult(str(out), len(rows), done, skipped, failed, time.perf_counter() - t0,
                         os.path.getsize(out), already_complete=skipped == len(rows))
