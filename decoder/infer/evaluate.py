"""`evaluate`: perplexity, beam-search captions and the COCO caption metrics of a model dir on one split.

Inputs: a model dir, the caption file(s) (the references: ALL captions of each image) and the split's image
features, either from a feature store (`--features`, must carry the model's CNN fingerprint and image size)
or computed from the images (`--images`, the model dir's CNN through THE preprocessing function). Images of
the split that are missing from the store, failed extraction or cannot be decoded are skipped, counted and
listed in the summary. Outputs (atomic): the COCO results JSON, the metrics JSON, optionally the HTML report.

Perplexity is the decoder's own validation perplexity (decoder.train.step.perplexity: exp of the
cross-entropy averaged over every real target word of every reference caption, no dropout), features come
from decoder.infer.features, captions from decoder.infer.captioner (beam search), scores from
evaluation.metrics.score_captions. For an attention model dir the report shows under each image (the
worst evaluation.report.MAX_STRIPS) the heat-map strip of its caption, drawn by decoder.infer.heatmaps.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from base.errors import InputError
from base.outputs import check_command
from beam import SearchConfig
from data.captions import ImageRecord, load_annotations
from data.pipeline import PairBatches, match_pairs
from decoder.infer.captioner import Captioner
from decoder.infer.features import FeatureInput, ImageInput, StoreInput
from decoder.infer.heatmaps import caption_strip
from decoder.train.step import DecoderTrainable, perplexity
from evaluation.metrics import (
    MetricsResult,
    check_scoring,
    format_metrics_table,
    score_captions,
    write_metrics_json,
    write_results_json,
)
from evaluation.report import ReportItem, write_report
from extract.inputs import check_output, check_root, resolve_image


@dataclass
class EvalConfig:
    """What to evaluate and where the outputs go."""

    model_dir: str  # the trained model dir (config.json, word_counts.txt, decoder.weights.h5)
    captions: list  # caption file(s) holding the split and its reference captions
    features: str | None = None  # feature store of the model's CNN; None: compute features from `images`
    images: list = field(default_factory=list)  # images root(s); with `features` only used for thumbnails
    caption_format: str = "auto"  # auto | coco | karpathy | flickr8k
    split_scheme: str = "auto"  # data.splits scheme (auto, karpathy, im2txt, hash, none)
    split: str = "test"  # the split evaluated: train | val | test
    out_dir: str | None = None  # where results/metrics go by default; None: <model_dir>/eval-<split>
    results: str | None = None  # COCO results JSON; None: <out_dir>/results.json
    metrics: str | None = None  # metrics JSON; None: <out_dir>/metrics.json
    report: str | None = None  # HTML error-analysis report; None: not written
    batch_size: int = 64  # images per CNN call and per beam-search batch; pairs per perplexity batch x 4
    max_images: int | None = None  # evaluate only the first N images of the split (None: all)
    use_java: str | bool = "auto"  # PTB tokenizer + METEOR: "auto" (when java is on the PATH), True, False
    progress: bool = True  # show tqdm bars
    weights: str = "last"  # the model dir's "last" (decoder.weights.h5) or "best" (checkpoints/best.npz)

    def paths(self) -> tuple[Path, Path]:
        """(results JSON, metrics JSON) paths after defaults."""
        out = Path(self.out_dir) if self.out_dir else Path(self.model_dir) / f"eval-{self.split}"
        return (Path(self.results) if self.results else out / "results.json",
                Path(self.metrics) if self.metrics else out / "metrics.json")


@dataclass
class EvalItem:
    """One evaluated image."""

    record: ImageRecord  # the image, its dataset id and ALL its reference captions
    caption: str  # the best beam-search caption
    image_path: str | None  # the image file when an images root holds it (thumbnails), else None
    # attention models: float32 [n, h, w], the grid weights of the caption's n words; else None
    attention: np.ndarray | None = None


@dataclass
class EvalResult:
    """What `run_evaluate` did."""

    perplexity: float  # exp(mean cross-entropy per real target word) over every reference caption
    metrics: MetricsResult  # corpus and per-image scores (COCOEvalCap keys)
    items: list[EvalItem]  # the evaluated images, in split order
    skipped: list[tuple[str, str]]  # (image path, reason) of split images without features
    table: str  # the printed metrics table
    results_path: Path
    metrics_path: Path
    report_path: Path | None
    seconds: float

    def summary(self) -> str:
        """One line: images evaluated and skipped (by reason), the headline scores, where the files went."""
        counts = Counter(reason.split(":", 1)[0] for _, reason in self.skipped)
        why = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        corpus = self.metrics.corpus
        why = f" ({why})" if why else ""
        return (f"evaluate: {len(self.items)} images | skipped {len(self.skipped)}{why}"
                f" | perplexity {self.perplexity:.3f} | BLEU-4 {corpus.get('Bleu_4', float('nan')):.4f}"
                f" | CIDEr {corpus.get('CIDEr', float('nan')):.4f} | {self.seconds:.1f} s"
                f" -> {self.results_path}, {self.metrics_path}"
                + (f", {self.report_path}" if self.report_path else ""))


class _ArrayFeatures:
    """The `data.pipeline.FeatureSource` interface over an in-memory float32 [n, D] (grids: [n, L, D])."""

    def __init__(self, array: np.ndarray):
        self.array, self.item_shape = array, tuple(array.shape[1:])
        self.store = type("Dims", (), {"dim": int(array.shape[1])})()  # PairBatches reads store.dim

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """rows: int64 [b] -> float32 [b, D]."""
        return self.array[rows]


def _check(cfg: EvalConfig) -> None:
    check_scoring(cfg.use_java)  # e.g. --java yes without java or pycocoevalcap: refused before any work
    if not cfg.features and not cfg.images:
        raise InputError("give the split's image features with --features FILE.h5, or --images DIR.")
    if cfg.batch_size < 1:
        raise InputError("--batch-size must be at least 1.")
    if cfg.max_images is not None and cfg.max_images < 1:
        raise InputError("--max-images must be at least 1.")
    for path in cfg.paths():
        if path.is_dir():
            raise InputError(f"output {path} is a folder; give a file name.")
    if cfg.report and Path(cfg.report).is_dir():
        raise InputError(f"--report {cfg.report} is a folder; give a file name like report.html.")
    results, metrics = cfg.paths()  # base.outputs: no output is an input, or a file showtell did not write
    check_command("evaluate", {"model_dir": cfg.model_dir, "features": cfg.features, "images": cfg.images,
                               "captions": cfg.captions, "results": str(results), "metrics": str(metrics),
                               "report": cfg.report, "out_dir": None, "split": cfg.split})
    # every output writable (a probe write) before any work
    check_output(results, create_folders=True, what="--results" if cfg.results else "--out-dir")
    check_output(metrics, create_folders=True, what="--metrics" if cfg.metrics else "--out-dir")
    if cfg.report:
        check_output(cfg.report, create_folders=True, what="--report")


def split_records(cfg: EvalConfig) -> list[ImageRecord]:
    """The records of cfg.split (first max_images); InputError when the split is empty."""
    annotations = load_annotations(list(cfg.captions), fmt=cfg.caption_format, split_scheme=cfg.split_scheme)
    records = annotations.part(cfg.split)
    if not records:
        raise InputError(f"the {cfg.split} split of {', '.join(map(str, cfg.captions))} is empty "
                         f"(split scheme {annotations.scheme}): check --split and --split-scheme.")
    return records[: cfg.max_images] if cfg.max_images else records


def image_files(records: list[ImageRecord], roots) -> list[str | None]:
    """Per record its image file under the first images root holding it, else None."""
    roots = [check_root(r) for r in roots]
    return [resolve_image(rec.path, roots) for rec in records]


def split_features(items: FeatureInput, batch_size: int, progress: bool):
    """(float32 [n, D] features of the items that have them, their positions, skipped (key, reason))."""
    feats, used = [], []
    with tqdm(total=len(items), unit="img", desc="features", disable=not progress, dynamic_ncols=True) as bar:
        for positions, part in items.batches(batch_size):
            feats.append(part)
            used.extend(int(j) for j in positions)
            bar.update(len(positions))
    skipped = [(k, e) for k, e in zip(items.keys, items.errors, strict=True) if e]
    if not used:
        raise InputError("no image of the split has features: "
                         + (f"e.g. {skipped[0][0]}: {skipped[0][1]}." if skipped else "the split is empty."))
    return np.concatenate(feats), used, skipped


def references_perplexity(model, vocab, records, features: np.ndarray, batch_size: int = 256) -> float:
    """exp(mean CE per real target word) over every caption of `records`; record i's image has the features
    features[i] (float32 [n, D]). Computed by the decoder's own validation function."""
    pairs = match_pairs(records, [r.path for r in records], np.ones(len(records), bool), vocab)
    source = PairBatches(pairs, _ArrayFeatures(features), batch_size, seed=0)
    return perplexity(DecoderTrainable(model), source, batch_size)[0]


def generate_captions(captioner: Captioner, features: np.ndarray, batch_size: int,
                      progress: bool) -> tuple[list[str], list[np.ndarray | None]]:
    """(the best beam-search caption of each row of features float32 [n, D] (attend: [n, L, D]), per row
    the attention weights float32 [words, h, w] of that caption (None: Show and Tell, or no caption))."""
    texts: list[str] = []
    maps: list[np.ndarray | None] = []
    bar = tqdm(total=len(features), unit="img", desc="captions", disable=not progress, dynamic_ncols=True)
    with bar:
        for b in range(0, len(features), batch_size):
            part = features[b:b + batch_size]
            found = captioner.caption_features(part)
            texts.extend(captioner.texts(caps[:1])[0] if caps else "" for caps in found)
            maps.extend(captioner.attention_of(part, found) if captioner.grid else [None] * len(found))
            bar.update(len(part))
    return texts, maps


def report_items(items: list[EvalItem], image_size: int) -> list[ReportItem]:
    """The report's items; an item with attention weights gets its heat-map strip (decoder.infer.heatmaps,
    image_size: the model's CNN input size), drawn only when the report shows it."""
    def drawer(it: EvalItem):
        return lambda: caption_strip(it.image_path, image_size, it.caption, it.attention)

    return [ReportItem(it.record.image_id, it.caption, it.record.captions, it.image_path,
                       strip=drawer(it) if it.attention is not None and it.caption else None)
            for it in items]


def run_evaluate(cfg: EvalConfig, search: SearchConfig | None = None, log=print) -> EvalResult:
    """Evaluate the model dir on cfg.split; every bad argument raises InputError before the work starts."""
    start = time.perf_counter()
    _check(cfg)
    captioner = Captioner(cfg.model_dir, search, cfg.weights)
    records = split_records(cfg)
    files = image_files(records, cfg.images) if cfg.images else [None] * len(records)
    keys = [r.path for r in records]
    items = (StoreInput(captioner.loaded, cfg.features, keys, missing="skip") if cfg.features
             else ImageInput(captioner.loaded, files, keys))
    log(captioner.loaded.weights.describe())  # after the argument checks: a refusal stays one line
    feats, used, skipped = split_features(items, cfg.batch_size, cfg.progress)
    for path, reason in skipped[:5]:
        log(f"skipped {path}: {reason}")
    kept = [records[j] for j in used]
    log(f"{cfg.split}: {len(kept)} images with {sum(len(r.captions) for r in kept)} reference captions"
        f" ({len(skipped)} skipped)")
    ppl = references_perplexity(captioner.model, captioner.vocab, kept, feats,
                                batch_size=max(4 * cfg.batch_size, 64))
    texts, maps = generate_captions(captioner, feats, cfg.batch_size, cfg.progress)
    items = [EvalItem(records[j], text, files[j], weights)
             for j, text, weights in zip(used, texts, maps, strict=True)]
    results = [{"image_id": it.record.image_id, "caption": it.caption} for it in items]
    metrics = score_captions(results, {it.record.image_id: it.record.captions for it in items},
                             use_java=cfg.use_java)
    extra = {"perplexity": ppl}
    results_path, metrics_path = cfg.paths()
    write_results_json(results_path, results)
    write_metrics_json(metrics_path, metrics, extra=extra)
    report_path = None
    if cfg.report:
        size = captioner.loaded.image_size
        stats = write_report(cfg.report, report_items(items, size), metrics, extra=extra,
                             title=f"{Path(cfg.model_dir).name}: {cfg.split} split")
        report_path = stats.path
        log(stats.summary())
    return EvalResult(perplexity=ppl, metrics=metrics, items=items, skipped=skipped,
                      table=format_metrics_table(metrics, extra=extra), results_path=results_path,
                      metrics_path=metrics_path, report_path=report_path, seconds=time.perf_counter() - start)
