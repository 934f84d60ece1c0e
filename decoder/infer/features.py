"""THE inference feature source: the features a model dir's decoder starts from, for a list of items, from
the rows of a feature store or from image files. Used by `caption`, `evaluate` and the export's parity tests.

Either way the CNN must be the model's: a store's CNN block must equal the model dir's (fingerprint and
image size), and images go through the model dir's own CNN (its cnn.weights.h5 when fine-tuned or imported),
built by extract's cached inference encoder and fingerprint-checked, after THE preprocessing function
(extract.pipeline.make_dataset). An item without features gets an error "<category>: <detail>" and the
rest go on.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from base.errors import InputError
from data.features import open_store
from decoder.arches import grid_shape
from decoder.modeldir import LoadedModel, check_store_fits, cnn_spec
from extract.encoder import check_fingerprint
from extract.pipeline import inference_encoder, make_dataset

MISSING = "missing"  # error category: the image is not in the store / under any images root
_COCO_NAMES = (re.compile(r"COCO_[A-Za-z]+\d{4}_(\d+)$"), re.compile(r"^(\d{12})$"))


def coco_image_id(key: str) -> int:
    """The COCO image id in a file name (COCO_<split><year>_<digits>.* or <12 digits>.*), else -1."""
    stem = Path(key).stem
    for pattern in _COCO_NAMES:
        match = pattern.search(stem)
        if match:
            return int(match.group(1))
    return -1


def reads_grid(loaded: LoadedModel) -> bool:
    """True when the model dir's decoder reads the CNN grid (an attention decoder: decoder.arches)."""
    return grid_shape(loaded.model.config) is not None


def model_encoder(loaded: LoadedModel):
    """infer(float32 [B, S, S, 3]) -> np.float32 [B, D] (an attention decoder's: its grid cells [B, L, D]):
    the model dir's CNN, fingerprint-checked."""
    spec = cnn_spec(loaded)
    grid = reads_grid(loaded)
    infer, built = inference_encoder(spec, grid=grid)
    check_fingerprint(built.fingerprint, loaded.cnn.get("fingerprint", ""),
                      f"the CNN built from {spec.weights}", str(loaded.model_dir))
    if not grid:
        return infer

    def cells(images):  # [B, h, w, D] -> [B, L, D]
        grid = infer(images)
        return grid.reshape(len(grid), -1, grid.shape[-1])

    return cells


class FeatureInput:
    """Items to caption: keys [n], image ids [n] (-1 unknown), errors [n] ("" = fine so far), and
    `batches(batch_size)` yielding (positions int64 [b], features float32 [b, D]) of the items that have
    features, in order. Errors found while reading (an image that does not decode) are set as it goes."""

    def __init__(self, keys: list[str], image_ids: list[int], errors: list[str]):
        self.keys, self.image_ids, self.errors = list(keys), [int(i) for i in image_ids], list(errors)

    def __len__(self) -> int:
        return len(self.keys)

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        raise NotImplementedError


class StoreInput(FeatureInput):
    """Items from a feature store's rows (view 0 of a multi-view store: the eval crop); for an attention
    decoder the rows' grids, as cells [b, L, D]."""

    def __init__(self, loaded: LoadedModel, path, keys: list[str] | None = None, missing: str = "error"):
        """keys None: every row. A key not in the store: InputError (missing="error") or a skipped item
        (missing="skip"). InputError when the store's CNN or feature width is not the model's."""
        self.path, self.grid = path, reads_grid(loaded)
        with open_store(path) as store:
            check_store_fits(store, loaded, path)
            index = {k: i for i, k in enumerate(store.keys)}
            keys = list(store.keys) if keys is None else list(keys)
            lost = [k for k in keys if k not in index]
            if lost and missing == "error":
                raise InputError(f"feature store {path} has no key {lost[0]!r}"
                                 f"{f' (and {len(lost) - 1} more missing)' if len(lost) > 1 else ''}.")
            self.rows = [index.get(k, -1) for k in keys]
            ids = [int(store.image_ids[r]) if r >= 0 else -1 for r in self.rows]
            errors = [f"{MISSING}: not in the feature store" if r < 0 else
                      "" if store.ok[r] else (store.errors[r] or "failed: no features in the store")
                      for r in self.rows]
        super().__init__(keys, [i if i >= 0 else coco_image_id(k) for i, k in zip(ids, keys, strict=True)],
                         errors)

    def batches(self, batch_size: int):
        todo = np.array([j for j, e in enumerate(self.errors) if not e], np.int64)
        with open_store(self.path) as store:
            for b in range(0, len(todo), batch_size):
                part = todo[b:b + batch_size]
                rows = [self.rows[j] for j in part]
                if self.grid:
                    grid = store.read_grid(rows).astype(np.float32)
                    grid = grid[:, 0] if grid.ndim == 5 else grid
                    yield part, grid.reshape(len(grid), -1, grid.shape[-1])
                    continue
                feats = store.read_features(rows).astype(np.float32)
                yield part, (feats[:, 0] if feats.ndim == 3 else feats)


class ImageInput(FeatureInput):
    """Items from image files (None: not found), through the model dir's CNN."""

    def __init__(self, loaded: LoadedModel, files: list[str | None], keys: list[str]):
        self.infer = model_encoder(loaded)  # builds the CNN and checks it before any image is read
        self.files, self.size = list(files), loaded.image_size
        super().__init__(keys, [coco_image_id(k) for k in keys],
                         ["" if f else f"{MISSING}: not found under any --images root" for f in files])

    def batches(self, batch_size: int):
        todo = np.array([j for j, f in enumerate(self.files) if f], np.int64)
        if not len(todo):
            return
        data = make_dataset([self.files[j] for j in todo], [self.keys[j] for j in todo], 0,
                            image_size=self.size, views=1, seed=0, batch_size=batch_size)
        start = 0
        for images, ok, errors in data:
            ok = ok.numpy()
            part = todo[start:start + len(ok)]
            start += len(ok)
            for j, good, err in zip(part, ok, errors.numpy(), strict=True):
                if not good:
                    self.errors[j] = err.decode("utf-8") or "decode-error: unknown"
            if ok.any():
                yield part[ok], np.asarray(self.infer(images), np.float32)[ok]
