"""`caption`: captions for image files, or for rows of a feature store, by beam search over a model dir.

Features come from decoder.infer.features (store rows, or image files through the model dir's CNN, the CNN
fingerprint checked either way); they are fed to `model.initial_state` and searched with beam.generate over
`model.step`. Image ids (COCO results JSON): the store's /image_ids, else parsed from a COCO file name
(decoder.infer.features.coco_image_id), else -1 (unknown). For an attention model dir (decoder.arches) each
image's best caption also gets its attention weights (`ImageCaptions.attention`, from the decoder's
`attention_maps` along the searched words), for `--json` and the heat-maps (decoder.infer.heatmaps).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from base.errors import InputError
from beam import Caption, SearchConfig, generate
from decoder.arches import grid_shape
from decoder.infer.features import FeatureInput, ImageInput, StoreInput
from decoder.modeldir import load_model_dir
from extract.inputs import rows_from_paths


@dataclass
class ImageCaptions:
    """The captions of one image (or why it has none)."""

    key: str  # the image path as found (files) or the store key
    image_id: int  # dataset id: the store's, else parsed from a COCO file name, else -1
    captions: list[Caption] = field(default_factory=list)  # best first (tokens, logprob, score, complete)
    texts: list[str] = field(default_factory=list)  # the captions as text (<S> and </S> dropped)
    error: str = ""  # "<category>: <detail>" when the image could not be captioned, else ""
    # attention models: float32 [n, h, w], the grid weights while each of the n words of the best caption
    # was emitted (</S> not included); each [h, w] sums to 1. None for a Show and Tell model.
    attention: np.ndarray | None = None

    def attention_block(self) -> dict:
        """JSON-able {"grid": [h, w], "words": [n], "weights": [n][h*w]} of `attention` (rounded to 1e-5)."""
        n, h, w = self.attention.shape
        return {"grid": [h, w], "words": self.texts[0].split()[:n],
                "weights": [[round(float(x), 5) for x in row] for row in self.attention.reshape(n, h * w)]}


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
        return [{"image_id": int(r.image_id), "caption": r.texts[0], "file_name": r.key,
                 **({"attention": r.attention_block()} if r.attention is not None else {})}
                for r in self.results if not r.error and r.texts]


class Captioner:
    """A model dir loaded for captioning: features -> captions; the CNN is built on first image use."""

    def __init__(self, model_dir, search: SearchConfig | None = None, weights: str = "last"):
        """weights: the model dir's "last" (decoder.weights.h5) or "best" (checkpoints/best.npz) weights."""
        self.model_dir = Path(model_dir)
        self.loaded = load_model_dir(model_dir, weights)
        self.model, self.vocab, self.cnn = self.loaded.model, self.loaded.vocab, self.loaded.cnn
        self.search = search or SearchConfig()
        try:  # the search's own checks, on zero images (no model call), before any work
            shape = getattr(self.model, "feature_shape", (self.model.config.feature_dim,))  # attend: (L, D)
            self.caption_features(np.zeros((0, *shape), np.float32))
        except ValueError as err:
            raise InputError(f"bad search option: {err}.") from None

    def caption_features(self, features: np.ndarray) -> list[list[Caption]]:
        """features float [B, D] -> per image its captions, best first (beam.generate over the decoder)."""
        state = self.model.initial_state(np.asarray(features, dtype=np.float32))
        return generate(state, self.model.step, self.search, start_id=self.vocab.start_id,
                        end_id=self.vocab.end_id, unk_id=self.vocab.unk_id)

    @property
    def grid(self) -> tuple[int, int] | None:
        """(h, w) of an attention model's grid; None for a Show and Tell model."""
        return grid_shape(self.model.config)

    def attention_of(self, features: np.ndarray, captions: list[list[Caption]]) -> list:
        """Attention model: per image float32 [n, h, w] for its best caption's n words (None: no caption).

        features float [B, L, D] (what `caption_features` searched from); the weights are the decoder's
        `attention_maps` teacher-forced along the best caption, i.e. what the search's steps computed."""
        best = [caps[0].tokens if caps else [self.vocab.start_id] for caps in captions]
        seqs = np.zeros((len(best), max(1, max(len(b) for b in best) - 1)), np.int32)
        for i, tokens in enumerate(best):
            seqs[i, :len(tokens) - 1] = tokens[:-1]
        maps = self.model.attention_maps(np.asarray(features, np.float32), seqs)  # [B, T, L]
        out = []
        for i, caps in enumerate(captions):
            n = len(self.vocab.decode(best[i]).split()) if caps else 0
            out.append(maps[i, :n].reshape(n, *self.grid) if caps else None)
        return out

    def texts(self, captions: list[Caption]) -> list[str]:
        """Caption token lists -> words (strip <S>, stop at </S>)."""
        return [self.vocab.decode(c.tokens) for c in captions]


def _bar(total: int, progress: bool, what: str):
    return tqdm(total=total, disable=not progress, unit="img", desc=what, dynamic_ncols=True)


def caption_input(captioner: Captioner, items: FeatureInput, batch_size: int, progress: bool = True
                  ) -> CaptionRun:
    """Caption every item of `items` (a decoder.infer.features source); an item without features keeps its
    error and the rest go on. Results in item order."""
    start = time.perf_counter()
    results = [ImageCaptions(k, i) for k, i in zip(items.keys, items.image_ids, strict=True)]
    with _bar(len(items), progress, "caption") as bar:
        for positions, feats in items.batches(batch_size):
            found = captioner.caption_features(feats)
            maps = captioner.attention_of(feats, found) if captioner.grid else [None] * len(found)
            for j, caps, weights in zip(positions, found, maps, strict=True):
                _fill(captioner, results[j], caps)
                results[j].attention = weights
            bar.update(len(positions))
    for item, error in zip(results, items.errors, strict=True):
        item.error = item.error or error
    return CaptionRun(results, time.perf_counter() - start)


def caption_files(captioner: Captioner, paths, batch_size: int = 32, progress: bool = True) -> CaptionRun:
    """Caption image PATHS (files, folders recursively, globs); a bad image gets `error`, the rest go on."""
    rows = rows_from_paths(list(paths))
    return caption_input(captioner, ImageInput(captioner.loaded, rows.files, rows.keys), batch_size, progress)


def caption_store(captioner: Captioner, path, keys=(), batch_size: int = 256, progress: bool = True
                  ) -> CaptionRun:
    """Caption rows of a feature store: the given `keys` (InputError for an unknown one) or every row.
    Failed rows (/ok False) are reported with their stored error; multi-view stores use view 0."""
    items = StoreInput(captioner.loaded, path, list(keys) or None, missing="error")
    return caption_input(captioner, items, batch_size, progress)


def _fill(captioner: Captioner, item: ImageCaptions, captions: list[Caption]) -> None:
    item.captions, item.texts = captions, captioner.texts(captions)
    if not captions:
        item.error = "no-caption: every word had p < 1e-12 (or was banned)"
