"""`extract --engine ray`: the extraction of img2dataset shards as a Ray Data pipeline (optional extra `ray`).

Stages (extract/ray_tasks.py): one CPU task per input shard reads its samples in place and decodes +
preprocesses them (the local engine's functions); an actor pool runs the CNN (one GPU per actor when the
cluster has GPUs, CPU actors otherwise; pool size `--workers`, else the cluster's GPUs, else half its
CPUs); the driver collects the features and writes ONE PART STORE PER INPUT SHARD
(`<out>.parts/<shard stem>.h5`, the feature-store format with the same CNN block and fingerprint, written
whole to a temporary name and renamed: a part exists only complete). The parts are then joined, in input
order, into `--out`, whose run identity is the local engine's (a local rerun reports it complete).
With `--grid` the actors return the Mixed_7c grid too (extract.pipeline.encode_batch, the local engine's
call) and every part store and `--out` hold `/grid` as the local engine writes it (one image per chunk,
grid_shape); the join copies it a block of rows at a time.

Why a copy and not an HDF5 virtual dataset over the parts: `--out` stays one self-contained file that
every command, `merge-features` and the chunk checksums read unchanged, that can be moved or copied alone,
and that does not break when the parts are deleted; the copy costs 4 KB per image (float16 pooled), i.e.
minutes for CC12M, next to hours of CNN time. The parts are kept (resume, audit); delete `<out>.parts`
once `--out` is complete.

Resume: a rerun skips the shards whose part store exists with the same run identity (inputs of that shard,
CNN, size, dtype, seed, --grid; a part of another run, e.g. without --grid, is refused). A killed actor
is restarted by Ray and its batch retried; a killed driver loses only the parts not yet written.
`--address` joins an existing cluster (`ray start --head` / KubeRay); without it a local Ray starts and
stops with the command. The workers must import showtell (installed on
every node, or this checkout on a shared file system) and read the shard paths (a shared file system).
"""

import importlib.util
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from base.atomic import atomic_path, remove_stale_temps
from base.errors import InputError
from base.locks import exclusive
from data.features import create_store, open_store
from data.shard_readers import ShardColumns, ShardMember
from data.shards import shard_format
from extract.encoder import FEATURE_DIM, CNNSpec, check_spec
from extract.inputs import Rows, check_output, gather_rows
from extract.merge import BLOCK_ROWS, GRID_BLOCK_ROWS
from extract.ray_tasks import ShardEncoder, decode_rows
from extract.run import (
    ExtractResult,
    check_config,
    check_same_run,
    failed_counts,
    grid_shape_of,
    run_differences,
    run_identity,
    static_attrs,
    stored_rows,
)

REPO = Path(__file__).resolve().parent.parent


def part_dir(out: Path) -> Path:
    """The folder of the part stores of `out`: `<out>.parts`."""
    return out.with_name(out.name + ".parts")


def _by_shard(rows: Rows) -> "OrderedDict[str, list[int]]":
    """Input shard file -> its row indices (in row order; shards in input order)."""
    groups: OrderedDict[str, list[int]] = OrderedDict()
    for i, member in enumerate(rows.files):
        groups.setdefault(member.shard, []).append(i)
    return groups


def _subset(rows: Rows, index: list[int]) -> Rows:
    return Rows([rows.keys[i] for i in index], [rows.image_ids[i] for i in index],
                [rows.files[i] for i in index], rows.source)


def _check_options(cfg) -> None:
    if cfg.views != 1:
        raise InputError("--engine ray extracts one view per image; use --engine local for --views.")
    if cfg.num_shards != 1:
        raise InputError("--engine ray splits the work by input shard itself; drop --shard/--num-shards.")
    if importlib.util.find_spec("ray") is None:
        raise InputError("--engine ray needs Ray: pip install 'showtell[ray]'.")


def _check_inputs(rows: Rows) -> None:
    if not all(isinstance(f, ShardMember) for f in rows.files):
        raise InputError("--engine ray reads img2dataset shards (.tar / .parquet); for image folders use "
                         "--engine local.")


def _done_part(path: Path, identity: dict) -> bool:
    """True when `path` is a complete part store of this run; InputError when it belongs to another."""
    if not path.exists():
        return False
    with open_store(path, require_complete=False) as store:
        old, complete = dict(store.attrs.get("run") or {}), store.complete
    check_same_run(path, old, identity, complete=True)
    return complete


def _start_ray(address: str, workers: int):
    """ray.init: connect to `address`, or start a local Ray sized for `workers` CNN actors + decoding."""
    import ray  # the optional `ray` extra (checked by run_extract_ray)

    env = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    kwargs = {"runtime_env": {"env_vars": env}, "log_to_driver": False, "logging_level": "ERROR"}
    if address:
        ray.init(address=address, **kwargs)
    else:
        cpus = max(os.cpu_count() or 1, (workers or 1) + 1)  # a slot for decoding beside the actors
        ray.init(num_cpus=cpus, include_dashboard=False, **kwargs)
    return ray


def _pool(ray, workers: int) -> tuple[int, dict]:
    """(actor pool size, per-actor resources): one GPU each when the cluster has GPUs."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return workers or gpus, {"num_gpus": 1, "num_cpus": 1}
    return workers or max(1, int(resources.get("CPU", 1)) // 2), {"num_cpus": 1}


def _dataset(ray, tasks: list[dict], cfg, spec: CNNSpec, precision: str, size: int, per_actor: dict):
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    for name in ("ray", "ray.data"):  # our tqdm bar and summary line report the run
        logging.getLogger(name).setLevel(logging.ERROR)
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    ds = ds.flat_map(decode_rows, fn_args=(spec.image_size, cfg.max_pixels, _columns(cfg)))
    return ds.map_batches(ShardEncoder, fn_constructor_args=(spec.to_dict(), precision, cfg.grid),
                          batch_size=cfg.batch_size, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=size), **per_actor)


class _Collector:
    """Rows arriving in any order, grouped by shard; a shard's part store is written once all arrived."""

    def __init__(self, sizes: dict[str, int], writer):
        self.sizes, self.write = sizes, writer  # rows per shard; writer(shard, {row: (f, ok, err, g)}, cnn)
        self.buf: dict[str, dict] = {shard: {} for shard in sizes}
        self.cnn: dict[str, str] = {}

    def add(self, batch: dict) -> int:
        """Take a batch of encoded rows; returns how many rows it held."""
        for i, shard in enumerate(batch["shard"]):
            shard = str(shard)
            self.cnn.update(fingerprint=str(batch["fingerprint"][i]), precision=str(batch["precision"][i]))
            grid = batch["grid"][i] if "grid" in batch else None  # float32 [h, w, 2048] with --grid
            self.buf[shard][int(batch["row"][i])] = (batch["features"][i], bool(batch["ok"][i]),
                                                     str(batch["error"][i]), grid)
            if len(self.buf[shard]) == self.sizes[shard]:
                self.write(shard, self.buf.pop(shard), self.cnn)
        return len(batch["shard"])


def _write_part(cfg, out: Path, shard: str, part: Rows, spec: CNNSpec, identity: dict, got: dict,
                cnn: dict) -> None:
    """Write one shard's part store atomically (complete or not at all); got: row -> (features float32
    [2048], ok, error, grid float32 [h, w, 2048] or None), as _Collector buffers them."""
    n = len(part)
    ok = np.array([got[i][1] for i in range(n)], bool)
    errors = [got[i][2] for i in range(n)]
    grid = np.stack([got[i][3] for i in range(n)]) if cfg.grid else None
    feats, ok, grid = stored_rows(np.stack([got[i][0] for i in range(n)]), ok, errors, grid, cfg.dtype)
    spec = CNNSpec(**{**spec.to_dict(), "fingerprint": cnn["fingerprint"]})
    identity = {**identity, "cnn": spec.to_dict(), "precision": cnn["precision"]}
    path = part_dir(out) / f"{Path(shard).stem}.h5"
    with atomic_path(path) as tmp:
        attrs = {**static_attrs(cfg, spec, identity, part, n), "input_shard": shard}
        with create_store(tmp, part.keys, part.image_ids, dim=FEATURE_DIM, views=1, dtype=cfg.dtype,
                          attrs=attrs, grid=grid_shape_of(cfg, spec)) as writer:
            writer.commit(0, feats, ok, errors, grid)
            writer.finish()



def _join(cfg, out: Path, rows: Rows, paths: list[Path], spec: CNNSpec, identity: dict) -> None:
    """Concatenate the part stores (input order) into `out` (atomically); InputError on mixed CNNs."""
    fingerprints, precisions = set(), set()
    for path in paths:
        with open_store(path) as store:
            fingerprints.add(store.cnn.get("fingerprint", ""))
            precisions.add(store.attrs["run"].get("precision"))
    if len(fingerprints) > 1 or len(precisions) > 1:
        raise InputError(f"the part stores in {part_dir(out)} come from different CNNs or precisions "
                         f"({len(fingerprints)} fingerprints, precisions {sorted(map(str, precisions))}).")
    spec = CNNSpec(**{**spec.to_dict(), "fingerprint": fingerprints.pop()})
    identity = {**identity, "cnn": spec.to_dict(), "precision": precisions.pop()}
    attrs = {**static_attrs(cfg, spec, identity, rows, len(rows)), "joined_from": str(part_dir(out))}
    with atomic_path(out) as tmp:
        with create_store(tmp, rows.keys, rows.image_ids, dim=FEATURE_DIM, views=1, dtype=cfg.dtype,
                          attrs=attrs, grid=grid_shape_of(cfg, spec)) as writer:
            for path in paths:
                with open_store(path) as store:
                    _copy_part(writer, store, GRID_BLOCK_ROWS if cfg.grid else BLOCK_ROWS)
            writer.finish()


def _copy_part(writer, store, block: int) -> None:
    """Append a part store's rows to `writer` (a StoreWriter), `block` rows at a time (with /grid)."""
    for lo in range(0, len(store), block):
        rows = np.arange(lo, min(len(store), lo + block))
        grid = store.read_grid(rows) if writer.has_grid else None
        writer.commit(writer.rows_done, store.read_features(rows), store.ok[rows],
                      [store.errors[i] for i in rows], grid)


def run_extract_ray(cfg, log=print) -> ExtractResult:
    """`extract --engine ray` (see the module docstring): checks the options, locks `cfg.out` for the run."""
    check_config(cfg)
    _check_options(cfg)
    out = check_output(cfg.out)
    with exclusive(out, folder=False):
        return _run_ray(cfg, out, log)


def _run_ray(cfg, out: Path, log) -> ExtractResult:
    rows = gather_rows(cfg.paths, cfg.images, cfg.captions, cfg.caption_format, cfg.split_scheme,
                       _columns(cfg))
    _check_inputs(rows)
    log(rows.source)
    for shard, why in rows.damaged:
        log(f"damaged shard {shard}: {why} (its intact samples are extracted)")
    spec = CNNSpec(weights=cfg.cnn_weights, seed=cfg.seed, image_size=cfg.image_size)
    check_spec(spec)
    identity = run_identity(cfg, rows, spec, 0, 1)
    if out.exists():
        with open_store(out, require_complete=False) as store:
            old, complete = dict(store.attrs.get("run") or {}), store.complete
        check_same_run(out, old, identity, complete)
        if complete and not run_differences(old, identity, True):
            with open_store(out) as store:
                failed = failed_counts(store.errors, store.ok)
            return ExtractResult(str(out), len(rows), 0, len(rows), failed, 0.0, os.path.getsize(out), True)
    return _extract_parts(cfg, out, rows, spec, identity, log)


def _columns(cfg) -> ShardColumns:
    return ShardColumns.parse(cfg.parquet_columns)


def _extract_parts(cfg, out: Path, rows: Rows, spec: CNNSpec, identity: dict, log) -> ExtractResult:
    groups = _by_shard(rows)
    parts = {s: (idx, _subset(rows, idx), run_identity(cfg, _subset(rows, idx), spec, 0, 1))
             for s, idx in groups.items()}
    paths = [part_dir(out) / f"{Path(s).stem}.h5" for s in groups]
    for path in paths:
        remove_stale_temps(path)
    todo = {s: p for (s, p), path in zip(parts.items(), paths, strict=True) if not _done_part(path, p[2])}
    skipped = sum(len(p[0]) for s, p in parts.items() if s not in todo)
    t0 = time.perf_counter()
    if todo:
        _run_pipeline(cfg, out, todo, spec)
    _join(cfg, out, rows, paths, spec, identity)
    with open_store(out) as store:
        failed = failed_counts(store.errors, store.ok)
    log(f"extract --engine ray: {len(groups)} shards, {len(groups) - len(todo)} already done; parts in "
        f"{part_dir(out)}")
    return ExtractResult(str(out), len(rows), len(rows) - skipped, skipped, failed, time.perf_counter() - t0,
                         os.path.getsize(out))


def _run_pipeline(cfg, out: Path, todo: dict, spec: CNNSpec) -> None:
    ray = _start_ray(cfg.address, cfg.workers)
    try:
        size, per_actor = _pool(ray, cfg.workers)
        fmt = shard_format(next(iter(todo)))
        tasks = [{"shard": s, "format": fmt, "rows": len(p[1])} for s, p in todo.items()]
        ds = _dataset(ray, tasks, cfg, spec, next(iter(todo.values()))[2]["precision"], size, per_actor)
        collector = _Collector({s: len(p[1]) for s, p in todo.items()},
                               lambda s, got, cnn: _write_part(cfg, out, s, todo[s][1], spec, todo[s][2],
                                                               got, cnn))
        total = sum(len(p[0]) for p in todo.values())
        with tqdm(total=total, unit="img", disable=not cfg.progress, desc="extract (ray)") as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                bar.update(collector.add(batch))
    finally:
        ray.shutdown()

