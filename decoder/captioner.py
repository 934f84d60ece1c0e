"""`caption`: captions for image files, or for rows of a feature store, by beam search over a model dir.

Images go through the same code as `extract` (extract.inputs for PATHS, extract.pipeline's tf.data decode +
THE preprocessing function, batched) into the CNN recorded in the model dir: its CNN block built by
extract.encoder, with the fine-tuned weights `cnn.weights.h5` when the model dir has them; the built CNN's
fingerprint must equal the block's. A feature store must carry the same CNN fingerprint and image size.
Its features are then fed to `model.initial_state` and searched with beam.generate over `model.step`.

Image ids (for COCO results JSON): the store's /image_ids, else parsed from a COCO file name
(`COCO_val2014_000000224477.jpg` -> 224477, or a 12-digit COCO 2017 name `000000224477.jpg`), else -1.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from beam import Caption, SearchConfig, generate
from data.atomic import atomic_write_json
from data.errors import InputError
from decoder.modeldir import load_model_dir

_COCO_NAMES = (re.compile(r"COCO_[A-Za-z]+\d{4}_(\d+)$"), re.compile(r"^(\d{12})$"))


def coco_image_id(key: str) -> int:
    """The COCO image id in a file name (COCO_<split><year>_<digits>.* or <12 digits>.*), else -1."""
    stem = Path(key).stem
    for pattern in _COCO_NAMES:
        match = pattern.search(stem)
        if match:
            return int(match.group(1))
    return -1


@dataclass
class ImageCaptions:
    """The captions of one image (or why it has none)."""

    key: str  # the image path as found (files) or the store key
    image_id: int  # dataset id: the store's, else parsed from a COCO file name, else -1
    captions: list[Caption] = field(default_factory=list)  # best first (tokens, logprob, score, complete)
    texts: list[str] = field(default_factory=list)  # the captions as text (<S> and </S> dropped)
    error: str = ""  # "<category>: <detail>" when the image could not be captioned, else ""


@dataclass
class CaptionRun:
    """All results of a `caption` run, in input order."""

    results: list[ImageCaptions]
    seconds: float

    @property
    def n_ok(self) -> int:
        """Images that got captions."""
        return sum(not r.error for r in self.results)

    def summary(self) -> str:
        """One line: images captioned, failed by category, rate."""
        failed = Counter(r.error.split(":", 1)[0] for r in self.results if r.error)
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(failed.items()))
        rate = len(self.results) / self.seconds if self.seconds > 0 else 0.0
        return (f"caption: {len(self.results)} images | captioned {self.n_ok} | failed {sum(failed.values())}"
                f"{f' ({reasons})' if reasons else ''} | {rate:.1f} img/s")

    def coco_results(self) -> list[dict]:
        """COCO results format: one {"image_id", "caption"} per captioned image (best caption), plus the
        extra field "file_name" (the key) so images with image_id -1 stay identifiable."""
        return [{"image_id": int(r.image_id), "caption": r.texts[0], "file_name": r.key}
                for r in self.results if not r.error and r.texts]


class Captioner:
    """A model dir loaded for captioning: features -> captions; the CNN is built on first image use."""

    def __init__(self, model_dir, search: SearchConfig | None = None):
        self.model_dir = Path(model_dir)
        self.loaded = load_model_dir(model_dir)
        self.model, self.vocab, self.cnn = self.loaded.model, self.loaded.vocab, self.loaded.cnn
        self.search = search or SearchConfig()
        try:  # the search's own checks, on zero images (no model call), before any work
            self.caption_features(np.zeros((0, self.loaded.model.config.feature_dim), np.float32))
        except ValueError as err:
            raise InputError(f"bad search option: {err}.") from None

    def caption_features(self, features: np.ndarray) -> list[list[Caption]]:
        """features float [B, D] -> per image its captions, best first (beam.generate over the decoder)."""
        state = self.model.initial_state(np.asarray(features, dtype=np.float32))
        return generate(state, self.model.step, self.search, start_id=self.vocab.start_id,
                        end_id=self.vocab.end_id, unk_id=self.vocab.unk_id)

    def texts(self, captions: list[Caption]) -> list[str]:
        """Caption token lists -> words (strip <S>, stop at </S>)."""
        return [self.vocab.decode(c.tokens) for c in captions]

    def encoder(self):
        """infer(float32 [B, S, S, 3]) -> float32 [B, D]: the model dir's CNN, fingerprint checked."""
        from extract.encoder import CNNSpec

        if not self.cnn:
            raise InputError(f"{self.model_dir} records no CNN block: it can caption only --features.")
        spec = CNNSpec.from_dict(self.cnn)
        if self.loaded.cnn_weights_path is not None:
            spec.weights = str(self.loaded.cnn_weights_path)
        from extract.pipeline import inference_encoder

        infer, built = inference_encoder(spec)
        got = built.fingerprint
        want = self.cnn.get("fingerprint") or ""
        if want and got != want:
            raise InputError(f"the CNN built from {spec.weights} has fingerprint {got[:12]} but "
                             f"{self.model_dir} was trained with CNN fingerprint {want[:12]}.")
        return infer


def _bar(total: int, progress: bool, what: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not progress, unit="img", desc=what, dynamic_ncols=True)


def caption_files(captioner: Captioner, paths, batch_size: int = 32, progress: bool = True) -> CaptionRun:
    """Caption image PATHS (files, folders recursively, globs); a bad image gets `error`, the rest go on."""
    from extract.inputs import rows_from_paths
    from extract.pipeline import make_dataset

    start = time.perf_counter()
    rows = rows_from_paths(list(paths))
    infer = captioner.encoder()
    size = int(captioner.cnn.get("image_size", 299))
    data = make_dataset(rows.files, rows.keys, 0, image_size=size, views=1, seed=0, batch_size=batch_size)
    results, i = [], 0
    with _bar(len(rows), progress, "caption") as bar:
        for images, ok, errors in data:
            ok = ok.numpy()
            keys = rows.keys[i:i + len(ok)]
            i += len(ok)
            caps = captioner.caption_features(infer(images)[ok]) if ok.any() else []
            done = iter(caps)
            for key, good, err in zip(keys, ok, errors.numpy(), strict=True):
                item = ImageCaptions(key, coco_image_id(key))
                if good:
                    _fill(captioner, item, next(done))
                else:
                    item.error = err.decode("utf-8") or "decode-error: unknown"
                results.append(item)
            bar.update(len(ok))
    return CaptionRun(results, time.perf_counter() - start)


def _fill(captioner: Captioner, item: ImageCaptions, captions: list[Caption]) -> None:
    item.captions, item.texts = captions, captioner.texts(captions)
    if not captions:
        item.error = "no-caption: every word had p < 1e-12 (or was banned)"


def check_store_cnn(store_cnn: dict, model_cnn: dict, store_path, model_dir) -> None:
    """InputError unless the store's CNN fingerprint and image size equal the model dir's."""
    got, want = store_cnn.get("fingerprint", ""), model_cnn.get("fingerprint", "")
    if got != want:
        raise InputError(f"feature store {store_path} was extracted with CNN fingerprint "
                         f"{got[:12] or 'none'} but {model_dir} expects {want[:12] or 'none'}; "
                         "re-extract with the model's CNN.")
    if int(store_cnn.get("image_size", 0)) != int(model_cnn.get("image_size", 0)):
        raise InputError(f"feature store {store_path} has image size {store_cnn.get('image_size')} but "
                         f"{model_dir} expects {model_cnn.get('image_size')}.")


def caption_store(captioner: Captioner, path, keys=(), batch_size: int = 256, progress: bool = True
                  ) -> CaptionRun:
    """Caption rows of a feature store: the given `keys` (InputError for an unknown one) or every row.

    Failed rows (/ok False) are reported with their stored error; multi-view stores use view 0 (eval crop).
    """
    from data.features import open_store

    start = time.perf_counter()
    with open_store(path) as store:
        check_store_cnn(store.cnn, captioner.cnn, path, captioner.model_dir)
        if store.dim != captioner.model.config.feature_dim:
            raise InputError(f"feature store {path} has {store.dim}-d features but the model expects "
                             f"{captioner.model.config.feature_dim}.")
        rows = _select(store, list(keys), path)
        results = [ImageCaptions(store.keys[r], int(store.image_ids[r]) if store.image_ids[r] >= 0
                                 else coco_image_id(store.keys[r])) for r in rows]
        for item, r in zip(results, rows, strict=True):
            if not store.ok[r]:
                item.error = store.errors[r] or "failed: no features in the store"
        todo = [j for j, item in enumerate(results) if not item.error]
        with _bar(len(rows), progress, "caption") as bar:
            bar.update(len(rows) - len(todo))
            for b in range(0, len(todo), batch_size):
                part = todo[b:b + batch_size]
                feats = store.read_features([rows[j] for j in part]).astype(np.float32)
                feats = feats[:, 0] if feats.ndim == 3 else feats
                for j, caps in zip(part, captioner.caption_features(feats), strict=True):
                    _fill(captioner, results[j], caps)
                bar.update(len(part))
    return CaptionRun(results, time.perf_counter() - start)


def _select(store, keys: list[str], path) -> list[int]:
    """Row indices of `keys` in the store (all rows when empty); InputError names an unknown key."""
    if not keys:
        return list(range(len(store)))
    index = {k: i for i, k in enumerate(store.keys)}
    missing = [k for k in keys if k not in index]
    if missing:
        raise InputError(f"feature store {path} has no key {missing[0]!r}"
                         f"{f' (and {len(missing) - 1} more missing)' if len(missing) > 1 else ''}.")
    return [index[k] for k in keys]


def write_results_json(run: CaptionRun, out) -> Path:
    """Write run.coco_results() to `out` atomically (temp name, fsync, rename)."""
    return atomic_write_json(out, run.coco_results(), indent=1)
