"""`evaluate`: perplexity, beam-search captions and the COCO caption metrics of a model dir on one split.

Inputs: a model dir, the caption file(s) (the references: ALL captions of each image) and the split's image
features, either from a feature store (`--features`, must carry the model's CNN fingerprint and image size)
or computed from the images (`--images`, the model dir's CNN through THE preprocessing function). Images of
the split that are missing from the store, failed extraction or cannot be decoded are skipped, counted and
listed in the summary. Outputs (atomic): the COCO results JSON, the metrics JSON, optionally the HTML report.

Perplexity is the decoder's own validation perplexity (`decoder.train.evaluate`: exp of the cross-entropy
averaged over every real target word of every reference caption, no dropout), captions come from
`decoder.captioner.Captioner.caption_features` (beam search), scores from `data.metrics.score_captions`.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from beam import SearchConfig
from data.captions import ImageRecord, load_annotations
from data.errors import InputError
from data.metrics import (
    MetricsResult,
    format_metrics_table,
    score_captions,
    write_metrics_json,
    write_results_json,
)
from decoder.captioner import Captioner

SKIP_MISSING = "missing"  # skip category: the image is not in the feature store / under any images root


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
    """The `data.pipeline.FeatureSource` interface over an in-memory float32 [n, D] array."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.store = type("Dims", (), {"dim": int(array.shape[1])})()  # PairBatches reads store.dim

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """rows: int64 [b] -> float32 [b, D]."""
        return self.array[rows]


def _check(cfg: EvalConfig) -> None:
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
    from extract.inputs import check_root, resolve_image

    roots = [check_root(r) for r in roots]
    return [resolve_image(rec.path, roots) for rec in records]


def store_features(captioner: Captioner, path, records) -> tuple[np.ndarray, list[int], list]:
    """(float32 [n, D] view-0 features of the usable records, their indices, skipped (path, reason))."""
    from data.features import open_store
    from decoder.captioner import check_store_cnn

    with open_store(path) as store:
        check_store_cnn(store.cnn, captioner.cnn, path, captioner.model_dir)
        if store.dim != captioner.model.config.feature_dim:
            raise InputError(f"feature store {path} has {store.dim}-d features but the model expects "
                             f"{captioner.model.config.feature_dim}.")
        index = {k: i for i, k in enumerate(store.keys)}
        rows, used, skipped = [], [], []
        for j, rec in enumerate(records):
            row = index.get(rec.path)
            if row is None:
                skipped.append((rec.path, f"{SKIP_MISSING}: not in the feature store"))
            elif not store.ok[row]:
                skipped.append((rec.path, store.errors[row] or "failed: no features in the store"))
            else:
                rows.append(row)
                used.append(j)
        if not rows:
            raise InputError(f"no image of the split has features in {path}: it was extracted from other "
                             "images (or every one failed).")
        feats = store.read_features(rows).astype(np.float32)
    return (feats[:, 0] if feats.ndim == 3 else feats), used, skipped


def image_features(captioner: Captioner, files, records, batch_size: int, progress: bool):
    """Features computed from the image files with the model dir's CNN: same return as `store_features`."""
    from tqdm import tqdm

    from extract.pipeline import make_dataset

    infer = captioner.encoder()  # builds the CNN and checks its fingerprint before any image is read
    todo = [j for j, f in enumerate(files) if f]
    skipped = [(records[j].path, f"{SKIP_MISSING}: not found under any --images root")
               for j, f in enumerate(files) if not f]
    if not todo:
        raise InputError("no image of the split was found under the --images root(s).")
    size = int(captioner.cnn.get("image_size", 299))
    data = make_dataset([files[j] for j in todo], [records[j].path for j in todo], 0, image_size=size,
                        views=1, seed=0, batch_size=batch_size)
    feats, used, i = [], [], 0
    with tqdm(total=len(todo), unit="img", desc="features", disable=not progress, dynamic_ncols=True) as bar:
        for images, ok, errors in data:
            ok = ok.numpy()
            if ok.any():
                feats.append(np.asarray(infer(images), np.float32)[ok])
            for good, err in zip(ok, errors.numpy(), strict=True):
                j = todo[i]
                i += 1
                if good:
                    used.append(j)
                else:
                    skipped.append((records[j].path, err.decode("utf-8") or "decode-error: unknown"))
            bar.update(len(ok))
    if not used:
        raise InputError("not one image of the split could be decoded: see the skipped list.")
    return np.concatenate(feats), used, skipped


def perplexity(model, vocab, records, features: np.ndarray, batch_size: int = 256) -> float:
    """exp(mean CE per real target word) over every caption of `records`; record i's image has the features
    features[i] (float32 [n, D]). Computed by the decoder's own validation function."""
    from data.pipeline import PairBatches, match_pairs
    from decoder.train import DecoderTrainable
    from decoder.train import perplexity as loop_perplexity

    pairs = match_pairs(records, [r.path for r in records], np.ones(len(records), bool), vocab)
    source = PairBatches(pairs, _ArrayFeatures(features), batch_size, seed=0)
    return loop_perplexity(DecoderTrainable(model), source, batch_size)


def generate_captions(captioner: Captioner, features: np.ndarray, batch_size: int,
                      progress: bool) -> list[str]:
    """The best beam-search caption of each row of features float32 [n, D]."""
    from tqdm import tqdm

    out: list[str] = []
    bar = tqdm(total=len(features), unit="img", desc="captions", disable=not progress, dynamic_ncols=True)
    with bar:
        for b in range(0, len(features), batch_size):
            for caps in captioner.caption_features(features[b:b + batch_size]):
                out.append(captioner.texts(caps[:1])[0] if caps else "")
            bar.update(min(batch_size, len(features) - b))
    return out


def run_evaluate(cfg: EvalConfig, search: SearchConfig | None = None, log=print) -> EvalResult:
    """Evaluate the model dir on cfg.split; every bad argument raises InputError before the work starts."""
    start = time.perf_counter()
    _check(cfg)
    captioner = Captioner(cfg.model_dir, search)
    records = split_records(cfg)
    files = image_files(records, cfg.images) if cfg.images else [None] * len(records)
    if cfg.features:
        feats, used, skipped = store_features(captioner, cfg.features, records)
    else:
        feats, used, skipped = image_features(captioner, files, records, cfg.batch_size, cfg.progress)
    for path, reason in skipped[:5]:
        log(f"skipped {path}: {reason}")
    kept = [records[j] for j in used]
    log(f"{cfg.split}: {len(kept)} images with {sum(len(r.captions) for r in kept)} reference captions"
        f" ({len(skipped)} skipped)")
    ppl = perplexity(captioner.model, captioner.vocab, kept, feats, batch_size=max(4 * cfg.batch_size, 64))
    texts = generate_captions(captioner, feats, cfg.batch_size, cfg.progress)
    items = [EvalItem(records[j], text, files[j]) for j, text in zip(used, texts, strict=True)]
    results = [{"image_id": it.record.image_id, "caption": it.caption} for it in items]
    metrics = score_captions(results, {it.record.image_id: it.record.captions for it in items},
                             use_java=cfg.use_java)
    extra = {"perplexity": ppl}
    results_path, metrics_path = cfg.paths()
    write_results_json(results_path, results)
    write_metrics_json(metrics_path, metrics, extra=extra)
    report_path = None
    if cfg.report:
        from data.report import write_report

        stats = write_report(cfg.report, [{"image_id": it.record.image_id, "caption": it.caption,
                                           "references": it.record.captions, "image_path": it.image_path}
                                          for it in items], metrics, extra=extra,
                             title=f"{Path(cfg.model_dir).name}: {cfg.split} split")
        report_path = stats.path
        log(stats.summary())
    return EvalResult(perplexity=ppl, metrics=metrics, items=items, skipped=skipped,
                      table=format_metrics_table(metrics, extra=extra), results_path=results_path,
                      metrics_path=metrics_path, report_path=report_path, seconds=time.perf_counter() - start)
