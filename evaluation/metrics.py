"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE when installed) with pycocoevalcap's scorers.

`score_captions` reproduces `pycocoevalcap.eval.COCOEvalCap.evaluate()` step for step, without constructing
`Spice()` (its constructor downloads Stanford CoreNLP): the PTB tokenizer over the references and over the
results (the same `stanford-corenlp-3.4.1.jar` command and the same punctuation removal), then `Bleu(4)`,
`Meteor()`, `Rouge()`, `Cider()` on the tokenized captions. The tokenizer and METEOR need `java` on the PATH;
without it the captions are tokenized by `evaluation.ptb.fallback_tokenize` (PTB-like output) and METEOR
is skipped, which the result's `notes` say. SPICE runs only when its CoreNLP jars are already present.

Without pycocoevalcap (a plain `pip install showtell`, no "eval" extra) BLEU-1..4, ROUGE-L and CIDEr come
from evaluation.scorers (the same numbers), captions are tokenized by the fallback tokenizer, and METEOR and
SPICE (Java programs shipped inside pycocoevalcap) are skipped; the notes say so. `check_scoring` refuses,
before any work, a request the installation cannot serve (`use_java=True` without java or pycocoevalcap).
"""

from __future__ import annotations

import math
import numbers
import shutil
import subprocess
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from base.atomic import atomic_write_json
from base.errors import InputError
from base.outputs import METRICS_FORMAT
from evaluation.ptb import fallback_tokenize, ptb_tokenize
from evaluation.scorers import score_tokenized

METRICS_VERSION = 1
# COCO metric name (the key COCOEvalCap uses) -> the name printed in tables.
DISPLAY_NAMES = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4",
                 "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr", "SPICE": "SPICE"}
# What SPICE needs besides java: its jar plus the CoreNLP jars that get_stanford_models() would download.
SPICE_FILES = ("spice-1.0.jar", "lib/stanford-corenlp-3.6.0.jar", "lib/stanford-corenlp-3.6.0-models.jar")


@dataclass
class MetricsResult:
    """Scores of one set of results; metric names are COCOEvalCap's (Bleu_1..4, METEOR, ROUGE_L, CIDEr)."""

    corpus: dict[str, float]  # metric -> corpus score, only the metrics that were computed
    per_image: dict[Hashable, dict[str, float]]  # image_id -> metric -> that image's score (results order)
    tokenizer: str  # "ptb" (Stanford PTBTokenizer through java) or "fallback" (data.tokenizer)
    notes: list[str] = field(default_factory=list)  # what was skipped or approximated, and why
    n_images: int = 0  # number of scored images (= number of results)
    scorers: str = "pycocoevalcap"  # who computed BLEU/ROUGE-L/CIDEr: "pycocoevalcap" or "showtell" (ours)

    def to_dict(self, per_image: bool = True) -> dict:
        """JSON-able dict (NaN becomes None); `per_image` adds a list of {"image_id", metric: score}."""
        out = {"n_images": self.n_images, "tokenizer": self.tokenizer, "scorers": self.scorers,
               "notes": list(self.notes),
               "metrics": {k: _json_float(v) for k, v in self.corpus.items()}}
        if per_image:
            out["per_image"] = [{"image_id": _json_id(i), **{k: _json_float(v) for k, v in s.items()}}
                                for i, s in self.per_image.items()]
        return out


def find_java() -> str | None:
    """Path of the `java` executable on the PATH, or None."""
    return shutil.which("java")


def pycocoevalcap_dir() -> Path | None:
    """Directory of the installed pycocoevalcap package, or None when it is not installed."""
    try:
        # lazy: pycocoevalcap is optional (extra "eval"); a namespace package (no __init__), so use a module
        from pycocoevalcap.bleu import bleu
    except ImportError:
        return None
    return Path(bleu.__file__).resolve().parent.parent


def spice_status(package_dir: Path | None = None) -> tuple[bool, str]:
    """(available, reason): SPICE runs only when all of SPICE_FILES exist under `<pycocoevalcap>/spice`."""
    package_dir = package_dir or pycocoevalcap_dir()
    if package_dir is None:
        return False, "SPICE skipped: pycocoevalcap is not installed (pip install 'showtell[eval]')"
    spice_dir = Path(package_dir) / "spice"
    missing = [name for name in SPICE_FILES if not (spice_dir / name).is_file()]
    if missing:
        return False, (f"SPICE skipped: {', '.join(missing)} not found in {spice_dir} (pycocoevalcap would "
                       "download Stanford CoreNLP 3.6.0; we never do)")
    return True, "SPICE models present"


def score_captions(results: Sequence[Mapping], references: Mapping[Hashable, Sequence[str]], *,
                   use_java: str | bool = "auto", spice: str | bool = "auto") -> MetricsResult:
    """Score `results` ([{"image_id", "caption"}], one per image) against `references` (image_id -> captions).

    use_java: "auto" (PTB tokenizer + METEOR when java and pycocoevalcap are there), True (require them),
      False (never).
    spice: "auto" (when java and the SPICE jars are present), True (require them), False (never).
    Raises InputError on empty or duplicate results, non-string captions or an image without references.
    """
    gts, res = _coco_inputs(results, references)
    package_dir = pycocoevalcap_dir()
    notes: list[str] = []
    java = check_scoring(use_java, notes)
    spice_ok, spice_reason = spice_status(package_dir)
    if spice is True and not (spice_ok and java):
        why = spice_reason if not spice_ok else "java is not available"
        raise InputError(f"SPICE was requested but cannot run: {why}.")
    tokenizer = "ptb"
    if java:
        try:
            jar = package_dir / "tokenizer" / "stanford-corenlp-3.4.1.jar"
            gts_tok, res_tok = ptb_tokenize(gts, java, jar), ptb_tokenize(res, java, jar)
        except (OSError, ValueError, RuntimeError, subprocess.CalledProcessError) as exc:
            notes.append(f"PTB tokenizer failed ({_one_line(exc)}): used the fallback tokenizer, METEOR and "
                         "SPICE skipped")
            java = None
    if not java:
        tokenizer = "fallback"
        gts_tok, res_tok = fallback_tokenize(gts), fallback_tokenize(res)
    corpus, per_image = _run_scorers(gts_tok, res_tok, java, notes, own=package_dir is None)
    if java and spice is not False and spice_ok:
        _run_spice(gts_tok, res_tok, corpus, per_image, notes)
    elif spice is not False and package_dir:  # without pycocoevalcap, check_scoring's note says why
        notes.append(spice_reason if not spice_ok else "SPICE skipped: java is not available")
    return MetricsResult(corpus=corpus, per_image=per_image, tokenizer=tokenizer, notes=notes,
                         n_images=len(res), scorers="pycocoevalcap" if package_dir else "showtell")


def _coco_inputs(results, references) -> tuple[dict, dict]:
    """Validate and convert to COCOEvalCap's shape: (gts, res), each image_id -> [{"caption": str}]."""
    if not results:
        raise InputError("There are no results to score.")
    res: dict = {}
    for entry in results:
        if not (isinstance(entry, Mapping) and "image_id" in entry and isinstance(entry.get("caption"), str)):
            raise InputError(f"Result entry {entry!r} is not {{'image_id': ..., 'caption': str}}.")
        image_id = entry["image_id"]
        if image_id in res:
            raise InputError(f"Image {image_id!r} has more than one result caption.")
        res[image_id] = [{"caption": entry["caption"]}]
    gts = {}
    for image_id in res:
        refs = references.get(image_id)
        if not refs or isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise InputError(f"Image {image_id!r} has no reference captions (or they are not strings).")
        gts[image_id] = [{"caption": r} for r in refs]
    return gts, res


def check_scoring(use_java: str | bool = "auto", notes: list[str] | None = None) -> str | None:
    """The java executable `score_captions` will use, or None; call it before any work.

    InputError for a bad `use_java` or `use_java=True` without java on the PATH or without pycocoevalcap
    (its jars hold the PTB tokenizer and METEOR). `notes` (when given) gets what will be skipped and why.
    """
    notes = [] if notes is None else notes
    if use_java not in ("auto", True, False):
        raise InputError(f"use_java must be 'auto', True or False, not {use_java!r}.")
    installed = pycocoevalcap_dir() is not None
    if not installed:
        notes.append("pycocoevalcap is not installed: captions tokenized with the fallback tokenizer, BLEU, "
                     "ROUGE-L and CIDEr computed by showtell's own scorers (the same numbers), METEOR and "
                     "SPICE skipped (Java programs shipped inside pycocoevalcap); pip install "
                     "'showtell[eval]' and Java 8+ for them")
    if use_java is False:
        if installed:  # (otherwise the note above says it all)
            notes.append("java disabled: captions tokenized with the fallback tokenizer, METEOR skipped")
        return None
    java = find_java()
    if use_java is True and (java is None or not installed):
        raise InputError("java was required (--java yes) but " + ("is not on the PATH" if java is None else
                         "pycocoevalcap is not installed: pip install 'showtell[eval]'") +
                         " (METEOR and the PTB tokenizer need both).")
    if java is None and installed:
        notes.append("java not found on the PATH: captions tokenized with the fallback tokenizer (not PTB), "
                     "METEOR skipped; install Java 8+ for the official numbers")
    return java if installed else None


def _run_scorers(gts: dict, res: dict, java: str | None, notes: list, own: bool = False) -> tuple[dict, dict]:
    """Bleu(4), Meteor() (only with java), Rouge(), Cider() on tokenized captions: (corpus, per_image);
    with `own` (no pycocoevalcap), evaluation.scorers' BLEU, ROUGE-L and CIDEr."""
    corpus: dict[str, float] = {}
    per_image: dict = {k: {} for k in gts}
    if own:
        for name, (score, scores) in score_tokenized(gts, res).items():
            _store(name, score, scores, gts, corpus, per_image)
        return corpus, per_image
    # lazy: pycocoevalcap is an optional dependency (extra "eval")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, bleu_images = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        _store(f"Bleu_{n + 1}", bleu[n], bleu_images[n], gts, corpus, per_image)
    if java:
        try:
            score, scores = _meteor(gts, res)
            _store("METEOR", score, scores, gts, corpus, per_image)
        except (OSError, ValueError, BrokenPipeError) as exc:
            notes.append(f"METEOR failed and was skipped: {_one_line(exc)}")
    for name, scorer in (("ROUGE_L", Rouge()), ("CIDEr", Cider())):
        score, scores = scorer.compute_score(gts, res)
        _store(name, score, scores, gts, corpus, per_image)
    return corpus, per_image


def _meteor(gts: dict, res: dict) -> tuple[float, list[float]]:
    """Meteor().compute_score, always stopping its JVM (even when it died mid-way and left its lock held)."""
    from pycocoevalcap.meteor.meteor import Meteor  # lazy: optional dependency (extra "eval")

    meteor = Meteor()
    try:
        return meteor.compute_score(gts, res)
    finally:
        proc = meteor.meteor_p
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                stream.close()
            except OSError:
                pass
        if meteor.lock.locked():
            meteor.lock.release()  # so that Meteor.__del__ does not block forever


def _run_spice(gts: dict, res: dict, corpus: dict, per_image: dict, notes: list[str]) -> None:
    """SPICE (models already present): corpus = mean of per-image 'All' F-scores, as COCOEvalCap reports."""
    from pycocoevalcap.spice.spice import Spice  # lazy: optional dependency (extra "eval")

    try:
        score, scores = Spice().compute_score(gts, res)
    except Exception as exc:  # an optional extra metric must not sink an evaluation run
        notes.append(f"SPICE failed and was skipped: {_one_line(exc)}")
        return
    # Spice scores images in sorted(image_id) order, not in gts order.
    by_id = dict(zip(sorted(gts), scores, strict=True))
    _store("SPICE", score, [by_id[k]["All"]["f"] for k in gts], gts, corpus, per_image)


def _store(name: str, score, scores, gts: dict, corpus: dict, per_image: dict) -> None:
    """Record one metric's corpus score and its per-image scores (given in gts key order)."""
    corpus[name] = float(score)
    for image_id, value in zip(gts, scores, strict=True):
        per_image[image_id][name] = float(value)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def _json_id(image_id):
    """numpy integers (e.g. FeatureStore.image_ids) as Python ints for JSON."""
    return int(image_id) if isinstance(image_id, numbers.Integral) else image_id


def _json_float(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def metrics_rows(result: MetricsResult, extra: Mapping[str, float] | None = None) -> list[tuple[str, str]]:
    """The rows of every metrics table (text and HTML), in order: (display name, formatted value).

    `extra` rows first in their order (e.g. perplexity), then DISPLAY_NAMES in its order: computed metrics
    as "0.1234" (NaN as "nan"), uncomputed ones as "skipped"; SPICE is left out when it was not computed
    (it is optional, unlike the COCO metrics).
    """
    rows = [(name, f"{value:.4f}") for name, value in (extra or {}).items()]
    for key, display in DISPLAY_NAMES.items():
        if key in result.corpus:
            rows.append((display, f"{result.corpus[key]:.4f}"))
        elif key != "SPICE":
            rows.append((display, "skipped"))
    return rows


def metrics_footer(result: MetricsResult) -> str:
    """The line under every metrics table: how many images were scored, with which tokenizer and scorers."""
    tok = "PTB" if result.tokenizer == "ptb" else "fallback (no java)"
    own = ", scorers: showtell's own (no pycocoevalcap)" if result.scorers == "showtell" else ""
    return f"{result.n_images} images, tokenizer: {tok}{own}"


def format_metrics_table(result: MetricsResult, extra: Mapping[str, float] | None = None) -> str:
    """Plain-text table of `metrics_rows`, then `metrics_footer`, then one "note: ..." line per note."""
    rows = metrics_rows(result, extra)
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':<{width}}  score", *(f"{name:<{width}}  {value}" for name, value in rows),
             metrics_footer(result)]
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


def write_results_json(path: str | Path, results: Iterable[Mapping]) -> Path:
    """Write captions in the COCO results format, atomically; returns the path.

    Each entry becomes {"image_id": int, "caption": str} plus "file_name" (str) when the entry has one, and
    "attention" (a mapping: an attention model's per-word weights, decoder.infer.captioner); other fields
    are dropped. COCO needs an integer image_id (numpy integers are converted). The rule for
    images without a dataset id: image_id -1 means unknown, and such entries keep "file_name" (e.g. the
    image path or feature-store key `caption --json` writes) so they remain identifiable; COCO scoring
    tools cannot match them, but nothing here refuses them. InputError, before anything is written, for an
    entry that is not a mapping with an integer image_id and a str caption (and a str file_name if any).
    """
    entries = []
    for r in results:
        image_id = r.get("image_id") if isinstance(r, Mapping) else None
        if (not isinstance(image_id, numbers.Integral) or isinstance(image_id, bool)
                or not isinstance(r.get("caption"), str)
                or not isinstance(r.get("file_name", ""), str)):
            raise InputError(f"Result entry {r!r} is not {{'image_id': int, 'caption': str}} "
                             f"(plus an optional 'file_name': str).")
        entry = {"image_id": int(image_id), "caption": r["caption"]}
        if "file_name" in r:
            entry["file_name"] = r["file_name"]
        if isinstance(r.get("attention"), Mapping):  # caption --json of an attention model (its weights)
            entry["attention"] = dict(r["attention"])
        entries.append(entry)
    return atomic_write_json(path, entries, indent=1)


def write_metrics_json(path: str | Path, result: MetricsResult, extra: Mapping | None = None,
                       per_image: bool = True) -> Path:
    """Metrics JSON {format, version, metrics (+ `extra`, e.g. perplexity), n_images, tokenizer, notes,
    per_image}, atomically."""
    data = {"format": METRICS_FORMAT, "version": METRICS_VERSION, **result.to_dict(per_image=per_image)}
    data["metrics"] = {**{k: _json_float(v) for k, v in (extra or {}).items()}, **data["metrics"]}
    return atomic_write_json(path, data, indent=1)
