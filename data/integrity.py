"""Integrity of the feature store's arrays: HDF5 Fletcher32 chunk checksums and finite feature values.

New stores carry a Fletcher32 checksum on every chunk of /features, /image_ids, /ok and /errors (h5py's
`fletcher32=True`; /keys holds variable-length strings, which HDF5 cannot filter). HDF5 verifies it on every
read and fails with "filter returned failure during read": `damaged_rows` turns that into the row range of
the first chunk that fails, for a message naming the file and the rows. `nonfinite_rows` finds NaN/Inf
values (also in stores written before checksums existed); `nonfinite_weights` does the same for model
weights (import-im2txt, every model-dir read). `rows_digest` fingerprints the row identities (/keys with
/image_ids, in order): recorded when a store is created and checked when it is opened, so swapped or
edited keys are refused instead of captions landing on the wrong images.

A kill -9 in the middle of a chunk write leaves the chunk with a stale checksum even though every committed
row in it is intact (a torn write holds old or new bytes, and committed bytes are the same in both), and
HDF5 refuses the read-modify-write a resumed run needs. `reseal` recomputes the checksum of such chunks
(`fletcher32` is HDF5's own algorithm, H5_checksum_fletcher32) and writes them back in place with
`write_direct_chunk` (same size, same file address: no HDF5 structure changes).
"""

from __future__ import annotations

import hashlib

import h5py
import numpy as np

CHECKSUM_BYTES = 4  # the Fletcher32 filter appends a little-endian uint32 to each chunk
FINITE_BLOCK = 1 << 24  # values checked per numpy call (bounds the temporary bool array)


def fletcher32(data: bytes) -> int:
    """HDF5's Fletcher32 checksum of `data` (H5_checksum_fletcher32: big-endian 16-bit words, the sums
    folded every 360 words, an odd last byte as the high byte of a word)."""
    n = len(data) // 2
    words = np.frombuffer(data[: 2 * n], dtype=">u2").astype(np.uint64)
    s1 = s2 = 0
    for start in range(0, n, 360):
        w = words[start:start + 360]
        s2 += len(w) * s1 + int(np.cumsum(w).sum())
        s1 += int(w.sum())
        s1, s2 = (s1 & 0xFFFF) + (s1 >> 16), (s2 & 0xFFFF) + (s2 >> 16)
    if len(data) % 2:
        s1 += data[-1] << 8
        s2 += s1
        s1, s2 = (s1 & 0xFFFF) + (s1 >> 16), (s2 & 0xFFFF) + (s2 >> 16)
    s1, s2 = (s1 & 0xFFFF) + (s1 >> 16), (s2 & 0xFFFF) + (s2 >> 16)
    return (s2 << 16) | s1


def chunk_starts(dset: h5py.Dataset, start: int, stop: int) -> range:
    """First rows of the chunks of `dset` (chunked by rows) holding any of rows [start, stop)."""
    rows = dset.chunks[0]
    return range(start - start % rows, stop, rows)


def reseal(dset: h5py.Dataset, start: int, stop: int) -> int:
    """Rewrite, with a correct checksum, the chunks of rows [start, stop) whose stored checksum is stale
    (a write torn by a kill). `dset` must be open for writing; datasets without checksums are left alone.
    Returns the number of chunks resealed."""
    if not dset.fletcher32 or stop <= start:
        return 0
    fixed = 0
    for first in chunk_starts(dset, start, min(stop, dset.shape[0])):
        offset = (first,) + (0,) * (dset.ndim - 1)
        mask, raw = dset.id.read_direct_chunk(offset)
        data, stored = raw[:-CHECKSUM_BYTES], raw[-CHECKSUM_BYTES:]
        want = fletcher32(data).to_bytes(CHECKSUM_BYTES, "little")
        if stored != want:
            dset.id.write_direct_chunk(offset, data + want, mask)
            fixed += 1
    return fixed


def damaged_rows(dset: h5py.Dataset, rows: np.ndarray | None) -> tuple[int, int] | None:
    """(first, last) row of the first chunk holding one of `rows` (None: all) that cannot be read (checksum
    or storage failure); None when every such chunk reads (the failure was elsewhere)."""
    n = dset.shape[0]
    if dset.chunks is None:
        return (0, n - 1) if n else None
    wanted = np.unique(np.asarray(rows, np.int64)) if rows is not None else None
    for first in chunk_starts(dset, 0, n):
        last = min(first + dset.chunks[0], n) - 1
        if wanted is not None and not ((wanted >= first) & (wanted <= last)).any():
            continue
        try:
            dset[first:last + 1]
        except Exception:  # noqa: BLE001 - any h5py failure here means this chunk is unreadable
            return first, last
    return None


def nonfinite_rows(values: np.ndarray) -> np.ndarray:
    """int64 indices (along axis 0) of the rows of `values` (float [n, ...]) holding a NaN or an Inf."""
    flat = values.reshape(len(values), -1)
    block = max(1, FINITE_BLOCK // max(1, flat.shape[1]))
    bad = [start + np.nonzero(~np.isfinite(flat[start:start + block]).all(axis=1))[0]
           for start in range(0, len(flat), block)]
    return np.concatenate(bad).astype(np.int64) if bad else np.zeros(0, np.int64)


def nonfinite_weights(named) -> list[tuple[str, int]]:
    """[(name, number of NaN/Inf values)] of the float arrays in `named` (iterable of (name, array-like) —
    model weights, checkpoint tensors) that hold any; [] when all are finite."""
    bad = []
    for name, values in named:
        arr = np.asarray(values)
        if arr.dtype.kind in "fc" and arr.size:
            count = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if count:
                bad.append((name, count))
    return bad


def describe_nonfinite(bad: list[tuple[str, int]]) -> str:
    """"NaN/Inf values: 3 in lstm/kernel, 1 in logits/bias" (at most three names) for an error message."""
    parts = ", ".join(f"{count} in {name}" for name, count in bad[:3])
    return f"NaN/Inf values: {parts}" + (f" and {len(bad) - 3} more variable(s)" if len(bad) > 3 else "")


def rows_digest(keys, image_ids) -> str:
    """Hex SHA-256 of a store's row identities: "<key>\\t<image id>\\n" per row, in row order (keys: str [N],
    image_ids: int [N]). extract's run identity ("inputs") is the same digest of the unsharded row list."""
    digest = hashlib.sha256()
    for key, image_id in zip(keys, image_ids, strict=True):
        digest.update(f"{key}\t{int(image_id)}\n".encode())
    return digest.hexdigest()


def rows_problem(keys, image_ids, recorded: str | None) -> str:
    """Why a store's row identities cannot be trusted, "" when they can: a key listed twice in `keys` (str
    [N]), or `rows_digest(keys, image_ids)` differing from the `recorded` one (None: a store written before
    the digest existed, checked for duplicates only). One pass over the keys."""
    seen: dict = {}
    for row, key in enumerate(keys):
        if key in seen:
            return (f"lists the key {key!r} twice (rows {seen[key]} and {row}): its /keys are damaged or "
                    "were edited")
        seen[key] = row
    if recorded and rows_digest(keys, image_ids) != recorded:
        return ("has /keys and /image_ids that are not the rows it was written with (their digest differs), "
                "so features would be matched to the wrong images: the file was edited or damaged")
    return ""
