"""The HDF5 feature store written by `extract` (format "showtell-features", version 1).

Layout (N rows, one per image; V views; D = 2048):
  /features  float16 (default) or float32, [N, D] (V == 1) or [N, V, D]; chunked by rows; view 0 is the
             eval (central-crop) view, views 1..V-1 are training-style distortions.
  /grid      only in stores written by `extract --grid`: the CNN's last spatial map (InceptionV3 Mixed_7c),
             same dtype, [N, h, w, D] or [N, V, h, w, D], one image per chunk, Fletcher32; the /features row
             of an image is the mean of its grid over h and w. attr grid_shape = [h, w] ([] without a grid).
             An extension of version 1: stores without /grid read as before, and a reader that does not
             know /grid still reads /features of a grid store.
  /keys      utf-8 [N]  image path relative to its images root (the identity of a row)
  /image_ids int64 [N]  dataset image id, -1 when unknown
  /ok        bool  [N]  the row holds real features (False: failed, or not yet written)
  /errors    utf-8 [N]  why a row failed ("" when ok); fixed width, "<category>: <detail>"
  attrs      format, format_version, cnn (JSON CNN block) + cnn_arch/cnn_weights/cnn_fingerprint,
             image_size, resize_size, resize_policy, dtype, views, dim, n_rows, run (JSON identity of the
             command), run_id, shard, num_shards, total_rows, and the progress: rows_done, n_failed, complete.

Crash safety (kill -9 at any moment): the file is created complete-but-empty under a temporary name
(every chunk allocated and zero-filled, so a full disk fails here, before any work) and renamed into place.
After that a run only overwrites pre-allocated raw data and then bumps the scalar attr `rows_done` in place
(flush + fsync between the two), so no HDF5 structure is ever rewritten and the commit point is one small
write: rows below `rows_done` are final, rows above it are redone on resume. Before writing, a commit
records the end of its rows in the attr `rows_writing`; reopening an incomplete store for writing reseals
the checksums of the chunks of rows [rows_done, rows_writing) that a kill may have torn (data.integrity).

Row identities: the attr `rows_sha256` (data.integrity.rows_digest of /keys and /image_ids, in order) is
recorded at creation; opening a store recomputes it (one pass over /keys) and refuses a mismatch, and a key
listed twice, so edited or swapped keys never attach features or captions to the wrong images.

Integrity (data.integrity): stores written since checksums were added carry an HDF5 Fletcher32 checksum on
every chunk of /features, /image_ids, /ok and /errors (same format version: older stores, without
checksums, are read as before). Every read of /features is checked: a chunk whose checksum fails and any
NaN/Inf value raise InputError naming the file and the rows; damaged HDF5 metadata (any h5py failure while
opening) raises InputError naming the file.
"""

import json
import os
from pathlib import Path

import h5py
import numpy as np

from base.atomic import atomic_path
from base.errors import InputError
from base.outputs import STORE_FORMAT
from data.integrity import damaged_rows, nonfinite_rows, reseal, rows_digest, rows_problem

FORMAT_NAME = STORE_FORMAT
FORMAT_VERSION = 1
ERROR_WIDTH = 240  # bytes of utf-8 kept per /errors entry
JSON_ATTRS = ("cnn", "run", "grid_shape")
CHUNK_BYTES = 1 << 20
RESEALED = ("features", "grid", "ok", "errors")  # the datasets a commit writes (resealed after a torn write)
REDO = "extract it again (delete it and rerun the extract command)"
ROWS_DIGEST = "rows_sha256"  # attr: data.integrity.rows_digest of /keys + /image_ids, recorded at creation


def _fsync(f: h5py.File) -> None:
    f.flush()
    try:
        os.fsync(f.id.get_vfd_handle())
    except (OSError, ValueError, TypeError):
        pass


def _early():
    """Dataset-creation property list allocating all storage at creation (no allocation while writing)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


def _chunk_rows(n: int, row_bytes: int) -> int:
    return max(1, min(n, CHUNK_BYTES // max(1, row_bytes)))


def encode_errors(errors) -> np.ndarray:
    """list[str] -> fixed-width utf-8 bytes [n] (cut at a character boundary)."""
    out = []
    for text in errors:
        raw = (text or "").encode("utf-8")[:ERROR_WIDTH]
        out.append(raw.decode("utf-8", "ignore").encode("utf-8"))
    return np.array(out, dtype=h5py.string_dtype("utf-8", ERROR_WIDTH))


def _attr_value(value):
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    if value is None:
        return ""
    return value


def _read_attrs(f: h5py.File) -> dict:
    out = {}
    for name, value in f.attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, np.generic):
            value = value.item()
        if name in JSON_ATTRS and isinstance(value, str) and value:
            value = json.loads(value)
        out[name] = value
    return out


def _check_format(f: h5py.File, path) -> None:
    name = f.attrs.get("format")
    name = name.decode() if isinstance(name, bytes) else name
    if name != FORMAT_NAME:
        raise InputError(f"{path} is not a showtell feature store (format attr is {name!r}).")
    version = int(f.attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise InputError(
            f"{path} has feature-store version {version}; this showtell reads version {FORMAT_VERSION} only."
        )


def create_store(path, keys, image_ids, *, dim: int, views: int, dtype: str, attrs: dict,
                 grid: tuple[int, int] | None = None):
    """Create a pre-allocated, zero-filled store at `path` (atomically) and open it for writing.

    keys: list[str] [N]; image_ids: int [N]; dtype "float16" | "float32"; attrs: extra static attrs (dicts
    are stored as JSON); grid: (h, w) to also hold the spatial grid /grid (None: pooled features only).
    Returns a `StoreWriter` with rows_done == 0. OSError (e.g. disk full) propagates.
    """
    path = Path(path)
    n = len(keys)
    if n < 1:
        raise InputError("no images to extract: the input list is empty.")
    shape = (n, dim) if views == 1 else (n, views, dim)
    chunk_rows = _chunk_rows(n, views * dim * np.dtype(dtype).itemsize)
    try:
        ids = np.asarray(image_ids, dtype=np.int64)
    except OverflowError:
        raise InputError("an image id does not fit in 64 bits (the store's /image_ids).") from None
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset(
                "features", shape, dtype=dtype, chunks=(chunk_rows,) + shape[1:], fillvalue=0,
                fill_time="alloc", dcpl=_early(), fletcher32=True,
            )
            if grid:
                cells = shape[:1] + shape[1:-1] + tuple(int(g) for g in grid) + (dim,)
                f.create_dataset("grid", cells, dtype=dtype, chunks=(1,) + cells[1:], fillvalue=0,
                                 fill_time="alloc", dcpl=_early(), fletcher32=True)
            f.create_dataset("keys", data=list(keys), dtype=h5py.string_dtype("utf-8"))
            f.create_dataset("image_ids", data=ids, fletcher32=True)
            f.create_dataset("ok", (n,), dtype=bool, chunks=(_chunk_rows(n, 1),), fillvalue=False,
                             fill_time="alloc", dcpl=_early(), fletcher32=True)
            f.create_dataset(
                "errors", (n,), dtype=h5py.string_dtype("utf-8", ERROR_WIDTH), fill_time="alloc",
                chunks=(_chunk_rows(n, ERROR_WIDTH),), dcpl=_early(), fletcher32=True,
            )
            base = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "dtype": dtype,
                    "views": views, "dim": dim, "n_rows": n, ROWS_DIGEST: rows_digest(keys, ids),
                    "grid_shape": [int(g) for g in grid] if grid else []}
            for name, value in {**attrs, **base}.items():
                f.attrs[name] = _attr_value(value)
            f.attrs["rows_done"] = np.int64(0)
            f.attrs["rows_writing"] = np.int64(0)
            f.attrs["n_failed"] = np.int64(-1)
            f.attrs["complete"] = np.bool_(False)
            _fsync(f)
    return StoreWriter(path)



def read_runs(dset, rows: np.ndarray) -> np.ndarray:
    """dset[rows] for sorted unique int64 `rows` (non-empty), read as one slice per run of consecutive rows:
    h5py's point selection over chunked data is 10-50x slower (measured on a grid store, one image per chunk:
    550 against 29,000 rows/s for 32 random rows; pooled rows: 2,700 against 4,400)."""
    cuts = np.flatnonzero(np.diff(rows) != 1) + 1
    parts = [dset[int(run[0]):int(run[-1]) + 1] for run in np.split(rows, cuts)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)

class _OpenFile:
    """An open HDF5 file in `self._f`: idempotent `close` and the context-manager protocol."""

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._f.id.valid:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _damaged(path, err: Exception) -> InputError:
    """The InputError for a store that h5py cannot read (damaged metadata, a failing checksum)."""
    detail = (str(err).splitlines() or [""])[0][:200]
    return InputError(f"feature store {path} is damaged and cannot be read ({type(err).__name__}: {detail}); "
                      f"{REDO}.")


class StoreWriter(_OpenFile):
    """An open store being filled in row order. `commit` is the only write during a run.

    Opening an incomplete store reseals the checksums of the chunks a killed run was writing
    (`self.resealed`: how many)."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self._f = h5py.File(self.path, "r+")
        except OSError as err:
            detail = (str(err).splitlines() or [""])[0][:200]
            raise InputError(f"cannot open {self.path} for writing ({detail}): it is damaged, not an HDF5 "
                             "file, or open in another program.") from None
        try:
            _check_format(self._f, self.path)
            self.attrs = _read_attrs(self._f)
            self.n_rows = int(self.attrs["n_rows"])
            self._track = "rows_writing" in self._f.attrs  # absent in stores written before checksums
            self.resealed = self._reseal()
        except InputError:
            self._f.close()
            raise
        except Exception as err:  # noqa: BLE001 - any h5py failure: damaged file
            self._f.close()
            raise _damaged(self.path, err) from None

    def _reseal(self) -> int:
        """Reseal the chunks of rows [rows_done, rows_writing) (a commit a kill interrupted)."""
        start = self.rows_done
        stop = int(self._f.attrs["rows_writing"]) if self._track else start
        fixed = sum(reseal(self._f[name], start, stop) for name in RESEALED if name in self._f)
        if fixed:
            _fsync(self._f)
        return fixed

    @property
    def rows_done(self) -> int:
        """Rows committed so far (0..N)."""
        return int(self._f.attrs["rows_done"])

    @property
    def has_grid(self) -> bool:
        """True when the store holds /grid (extract --grid): every commit must then give the grids."""
        return "grid" in self._f

    def commit(self, start: int, features: np.ndarray, ok, errors, grid: np.ndarray | None = None) -> None:
        """Write rows [start, start+n) then advance rows_done to start+n (the commit point).

        features: float [n, D] or [n, V, D]; ok: bool [n]; errors: list[str] [n]; grid: float [n, h, w, D] or
        [n, V, h, w, D], required exactly when the store has /grid. start must equal rows_done.
        """
        if (grid is None) == self.has_grid:
            raise ValueError("commit: grids must be given exactly when the store holds /grid")
        if start != self.rows_done:
            raise ValueError(f"commit at row {start} but rows_done is {self.rows_done}")
        end = start + len(ok)
        f = self._f
        if self._track:
            f.attrs.modify("rows_writing", np.int64(end))
            _fsync(f)
        f["features"][start:end] = np.asarray(features).astype(f["features"].dtype, copy=False)
        if grid is not None:
            f["grid"][start:end] = np.asarray(grid).astype(f["grid"].dtype, copy=False)
        f["ok"][start:end] = np.asarray(ok, dtype=bool)
        f["errors"][start:end] = encode_errors(errors)
        _fsync(f)
        f.attrs.modify("rows_done", np.int64(end))
        _fsync(f)

    def ok_done(self) -> np.ndarray:
        """bool [rows_done]: the /ok flags of the committed rows."""
        return self._f["ok"][: self.rows_done]

    def errors_done(self) -> list[str]:
        """The /errors of the committed rows."""
        return [e.decode("utf-8") for e in self._f["errors"][: self.rows_done]]

    def finish(self) -> None:
        """Mark the store complete (all rows committed): n_failed, then complete=True."""
        if self.rows_done != self.n_rows:
            raise ValueError("finish() before all rows are committed")
        self._f.attrs.modify("n_failed", np.int64((~self.ok_done()).sum()))
        _fsync(self._f)
        self._f.attrs.modify("complete", np.bool_(True))
        _fsync(self._f)


class FeatureStore(_OpenFile):
    """Read side of a feature store. Row arrays are loaded eagerly; features on demand, checked (checksums,
    finite values) on every read."""

    def __init__(self, path, f: h5py.File):
        self.path = Path(path)
        self._f = f
        self.attrs = _read_attrs(f)
        self.keys = [k.decode("utf-8") if isinstance(k, bytes) else k for k in self._read("keys")]
        self.image_ids = self._read("image_ids").astype(np.int64)
        self.ok = self._read("ok").astype(bool)
        self.errors = [e.decode("utf-8") for e in self._read("errors")]
        shape = f["features"].shape
        self.dim = int(shape[-1])
        self.views = 1 if len(shape) == 2 else int(shape[1])
        self.dtype = np.dtype(f["features"].dtype)
        # (h, w) of /grid (stores written by extract --grid), None for a pooled-only store
        self.grid_shape = tuple(int(g) for g in f["grid"].shape[-3:-1]) if "grid" in f else None
        self.rows_done = int(self.attrs.get("rows_done", 0))
        self.complete = bool(self.attrs.get("complete", False)) and self.rows_done == len(self.keys)
        self.cnn = dict(self.attrs.get("cnn") or {})
        why = rows_problem(self.keys, self.image_ids, self.attrs.get(ROWS_DIGEST))
        if why:  # edited or swapped keys would put features, and captions, on the wrong images
            raise InputError(f"feature store {self.path} {why}; {REDO}.")

    def __len__(self) -> int:
        return len(self.keys)

    def _read(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Dataset `name` (rows: sorted unique int64 indices, None: all); InputError naming the file and
        the rows of the first chunk that fails its checksum (or cannot be read)."""
        dset = self._f[name]
        try:
            return dset[...] if rows is None else read_runs(dset, rows)
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            span = damaged_rows(dset, rows)
            if span is None:
                raise _damaged(self.path, err) from None
            why = "fail their checksum" if dset.fletcher32 else f"cannot be read ({err})"
            raise InputError(f"feature store {self.path} is damaged: rows {span[0]}..{span[1]} of /{name} "
                             f"{why}; {REDO}.") from None

    def read_features(self, rows=None) -> np.ndarray:
        """Features in the stored dtype: [n, D] or [n, V, D]; rows = None (all) or int indices (any order).

        InputError when a chunk fails its checksum or a value is NaN/Inf (named by file, row and key)."""
        return self._values("features", rows)

    def read_grid(self, rows=None) -> np.ndarray:
        """Grids in the stored dtype: [n, h, w, D] or [n, V, h, w, D]; rows as `read_features`, checked the
        same way. InputError when the store has no grid (it was extracted without --grid)."""
        if self.grid_shape is None:
            raise InputError(f"feature store {self.path} holds no grid (pooled features only): extract it "
                             "with --grid for an attention model.")
        return self._values("grid", rows)

    def _values(self, name: str, rows) -> np.ndarray:
        """Dataset `name` ("features" | "grid") at `rows` (None: all), checksums and finite values checked."""
        dset = self._f[name]
        if rows is None:
            values, index = self._read(name), None
        else:
            rows = np.asarray(rows, dtype=np.int64).reshape(-1)
            if rows.size == 0:
                return np.zeros((0,) + dset.shape[1:], dtype=dset.dtype)
            if rows.min() < 0 or rows.max() >= dset.shape[0]:
                raise IndexError(f"row index out of range 0..{dset.shape[0] - 1}")
            index, inverse = np.unique(rows, return_inverse=True)
            values = self._read(name, index)
        bad = nonfinite_rows(values)
        if len(bad):
            first = int(bad[0] if index is None else index[bad[0]])
            what = "grid" if name == "grid" else "feature"
            raise InputError(f"feature store {self.path} holds non-finite {what} values (NaN or Inf) in "
                             f"{len(bad)} row(s), e.g. row {first} ({self.keys[first]}): the file is "
                             f"damaged; {REDO}.")
        return values if index is None else values[inverse]

    def nbytes_in_memory(self, name: str = "features") -> int:
        """Bytes needed to hold all of /features (or /grid) in memory in the stored dtype."""
        return int(np.prod(self._f[name].shape)) * self.dtype.itemsize


def _check_complete(f: h5py.File, path) -> None:
    """InputError when the store's attrs say it is not complete (read before any array)."""
    rows_done, n = int(f.attrs.get("rows_done", 0)), int(f["keys"].shape[0])
    if not (bool(f.attrs.get("complete", False)) and rows_done == n):
        raise InputError(
            f"feature store {path} is incomplete ({rows_done}/{n} rows): rerun the same "
            "extract command to finish it."
        )


def open_store(path, require_complete: bool = True) -> FeatureStore:
    """Open a feature store for reading; InputError if missing, not a store, unknown version, incomplete,
    or damaged (every h5py failure while opening becomes one sentence naming the file)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"feature store {path} does not exist.")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        detail = (str(err).splitlines() or [""])[0][:200]
        raise InputError(f"{path} is not a readable HDF5 file ({detail}): it is damaged or not a feature "
                         "store.") from None
    except Exception as err:  # noqa: BLE001 - h5py raises others on a damaged superblock
        raise _damaged(path, err) from None
    try:
        _check_format(f, path)
        if require_complete:
            _check_complete(f, path)
        return FeatureStore(path, f)
    except InputError:
        f.close()
        raise
    except Exception as err:  # noqa: BLE001 - KeyError, OSError, UnicodeDecodeError, ... from damaged metadata
        f.close()
        raise _damaged(path, err) from None
    except BaseException:
        f.close()
        raise
