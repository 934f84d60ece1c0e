"""`demo`: the whole pipeline on a generated sample (coloured shapes) in a few minutes on a CPU.

Steps: generate the synthetic shapes set (data.synthetic) -> extract (random InceptionV3, `--cnn-weights
none`) -> train-decoder (cross-entropy, "XE") -> train-scst (self-critical training on CIDEr-D, from the XE
model) -> caption a few held-out test images -> evaluate both models on the test split. Each step first
prints the equivalent command line (copy them for real data), then calls the same package function that
command calls. The run ends with captions of held-out test images next to their references, and XE vs SCST
side by side (same beam search): BLEU-4, CIDEr and the caption-accuracy line.

Rerunning in the same workdir resumes: the data is regenerated only when missing, extract, train-decoder and
train-scst continue (or find their work done), caption and evaluate run again. A workdir made with other demo
settings (or `--fresh`) is cleaned first: only the files the demo writes are removed. A folder without the
demo's marker (demo.json) is never cleaned: `--fresh` there, or demo names in it, are refused.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from base.atomic import atomic_write_json
from base.errors import InputError
from base.invocation import command_line
from base.outputs import DEMO_MARKER, DEMO_OWNED, check_demo_workdir
from beam import SearchConfig
from data.captions import load_annotations
from data.pipeline import PipelineConfig
from data.synthetic import generate_shapes
from decoder.infer.captioner import Captioner, caption_files
from decoder.infer.evaluate import EvalConfig, run_evaluate
from decoder.train.config import TrainConfig
from decoder.train.scst import ScstConfig, scst_recipe, train_scst
from decoder.train.train_decoder import DataConfig, train_decoder
from evaluation.shapes import caption_accuracy
from extract.inputs import check_output_dir
from extract.run import ExtractConfig, run_extract

DEMO_FILE = DEMO_MARKER  # the settings of the demo that made a workdir: the mark of a demo's workdir
OWNED = DEMO_OWNED  # what the demo writes (and --fresh removes)


@dataclass
class DemoConfig:
    """Sizes of the demo (defaults: the `make demo` run, ~3-4 minutes on 2 CPU cores)."""

    n_images: int = 3000  # synthetic images (80% train, 10% val, 10% test)
    image_size: int = 96  # image side and CNN input size S in pixels (InceptionV3 needs >= 75)
    # share of images with two shapes (and a relation word). Global-pooled random-CNN features keep colour
    # and shape but little position, so relations are mostly guessed: keep pairs a minority.
    pair_fraction: float = 0.25
    embedding_size: int = 256  # decoder image/word embedding width
    lstm_units: int = 256  # decoder LSTM state size
    batch_size: int = 32  # training batch (pairs)
    steps: int = 5000  # training steps
    optimizer: str = "adam"  # adam converges in a few thousand steps on this small set (im2txt's sgd: slower)
    learning_rate: float = 0.001  # adam's learning rate
    scst_steps: int = 200  # train-scst steps (batches of scst_batch_size images x scst_samples samples)
    scst_batch_size: int = 32  # train-scst batch (images)
    scst_samples: int = 5  # captions sampled per image
    scst_learning_rate: float = 5e-5  # train-scst's Adam learning rate (self-critical.pytorch's)
    seed: int = 0  # data, CNN init and training seed
    show: int = 6  # held-out test images captioned (and shown at the end)
    use_java: bool | str = "auto"  # evaluate's PTB tokenizer + METEOR: "auto" (java on the PATH), False

    @classmethod
    def preset(cls, name: str) -> DemoConfig:
        """"full" (make demo) or "tiny" (the test suite: same code path, ~1 minute)."""
        if name == "full":
            return cls()
        if name == "tiny":
            return cls(n_images=500, image_size=96, pair_fraction=0.0, embedding_size=128, lstm_units=128,
                       steps=1500, learning_rate=0.001, scst_steps=100, show=4, use_java=False)
        raise InputError(f"unknown demo preset {name!r}: use full or tiny.")


@dataclass
class DemoResult:
    """What the demo produced (for tests)."""

    workdir: Path
    captions_json: Path  # the synthetic set's COCO captions file
    model_dir: Path
    shown: list  # [(image path, generated caption, reference captions)] for the held-out test images
    evaluation: object  # decoder.infer.evaluate.EvalResult of the SCST model on the test split
    seconds: float
    scst_dir: Path | None = None  # the train-scst model dir
    xe_evaluation: object = None  # EvalResult of the XE (train-decoder) model on the test split


def _prepare(workdir: Path, cfg: DemoConfig, fresh: bool, echo) -> None:
    """Create the workdir; clean the demo's own files when asked or when they came from other settings.
    A folder that never held a demo is refused when it holds files by the demo's names, or with --fresh
    (base.outputs.check_demo_workdir): the demo removes and replaces only what a demo wrote."""
    settings = asdict(cfg)
    check_demo_workdir(workdir, fresh)
    check_output_dir(workdir, "--workdir")
    marker = workdir / DEMO_FILE
    old = json.loads(marker.read_text()) if marker.is_file() else None  # check_demo_workdir: readable
    if fresh or (old is not None and old != settings):
        echo(f"# cleaning {workdir} ({'--fresh' if fresh else 'it holds a demo with other settings'})")
        for name in OWNED:
            path = workdir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    elif old is not None:
        echo(f"# {workdir} holds this demo already: resuming (use --fresh to start over)")
    atomic_write_json(marker, settings, indent=1)


def _command(echo, title: str | None, *args) -> None:
    """Print a step title (None: none) and its command line (shell-quoted, named as the user ran showtell)."""
    if title:
        echo(f"\n== {title}")
    echo(f"$ {command_line(*args)}")


def run_demo(workdir="demo_run", cfg: DemoConfig | None = None, fresh: bool = False, progress: bool = True,
             echo=print, log=print) -> DemoResult:
    """Run the demo in `workdir`; `echo` prints the steps and results, `log` the steps' own messages."""
    cfg = cfg or DemoConfig()
    start = time.perf_counter()
    workdir = Path(workdir)
    _prepare(workdir, cfg, fresh, echo)
    data_dir, store, model_dir = workdir / "shapes", workdir / "features.h5", workdir / "model"
    images, captions = data_dir / "images", data_dir / "captions.json"

    echo(f"\n== 1/6 generate {cfg.n_images} synthetic {cfg.image_size}px images with captions (your data: "
         "a COCO/Karpathy/Flickr8k caption file and its images folder)")
    if not captions.is_file():
        generate_shapes(data_dir, n_images=cfg.n_images, image_size=cfg.image_size, seed=cfg.seed,
                        pair_fraction=cfg.pair_fraction)
    echo(f"{captions}: {load_annotations(captions).summary()}")

    _command(echo, "2/6 extract InceptionV3 features (random weights here; real captions need imagenet)",
             "extract", "--images", images, "--captions", captions, "--out", store, "--cnn-weights", "none",
             "--image-size", cfg.image_size, "--seed", cfg.seed)
    ext = run_extract(ExtractConfig(out=str(store), images=[str(images)], captions=[str(captions)],
                                    cnn_weights="none", image_size=cfg.image_size, seed=cfg.seed,
                                    progress=progress), log=log)
    echo(ext.summary())

    _command(echo, "3/6 train the decoder (cross-entropy: the XE model)", "train-decoder", "--features",
             store, "--captions", captions, "--model-dir", model_dir, "--steps", cfg.steps,
             "--embedding-size", cfg.embedding_size, "--lstm-units", cfg.lstm_units, "--batch-size",
             cfg.batch_size, "--optimizer", cfg.optimizer, "--learning-rate", cfg.learning_rate,
             "--feature-norm", "standardize", "--seed", cfg.seed)
    train = TrainConfig(batch_size=cfg.batch_size, optimizer=cfg.optimizer, learning_rate=cfg.learning_rate,
                        steps=cfg.steps, seed=cfg.seed, precision="auto")  # as the printed command line
    res = train_decoder(DataConfig(features=str(store), captions=[str(captions)]),
                        model_dir, train, embedding_size=cfg.embedding_size, lstm_units=cfg.lstm_units,
                        feature_norm="standardize", pipeline=PipelineConfig(), progress=progress, log=log)
    echo(f"step {res.step}, epoch {res.epoch:.2f}: val perplexity {res.val_perplexity:.3f} -> {model_dir}")

    scst_dir = _self_critical(cfg, workdir, store, captions, model_dir, progress, echo, log)
    shown = _caption(cfg, images, captions, scst_dir, progress, echo)

    both, report_html = [], workdir / "report.html"
    for name, directory, out_dir, report in (("XE", model_dir, workdir / "eval", None),
                                             ("SCST", scst_dir, workdir / "eval-scst", report_html)):
        _command(echo, None if both else "6/6 evaluate the XE and the SCST model on the test split",
                 "evaluate", "--model-dir", directory, "--features", store, "--images", images, "--captions",
                 captions, "--split", "test", "--out-dir", out_dir, *(["--report", report] if report else []),
                 *(["--java", "no"] if cfg.use_java is False else []))
        ev = run_evaluate(EvalConfig(model_dir=str(directory), captions=[str(captions)], features=str(store),
                                     images=[str(images)], split="test", out_dir=str(out_dir),
                                     report=str(report) if report else None, use_java=cfg.use_java,
                                     progress=progress), log=log)
        echo(f"{name} model:\n{ev.table}")
        both.append(ev)
    _finale(echo, shown, both, captions, workdir, time.perf_counter() - start)
    return DemoResult(workdir, captions, model_dir, shown, both[1], time.perf_counter() - start, scst_dir,
                      both[0])


def _self_critical(cfg: DemoConfig, workdir: Path, store: Path, captions: Path, model_dir: Path, progress,
                   echo, log) -> Path:
    """Step 4: train-scst from the XE model into workdir/model-scst; returns that model dir."""
    scst_dir = workdir / "model-scst"
    _command(echo, "4/6 self-critical training on CIDEr-D, from the XE model (the SCST model)", "train-scst",
             "--model-dir", model_dir, "--features", store, "--captions", captions, "--out", scst_dir,
             "--steps", cfg.scst_steps, "--batch-size", cfg.scst_batch_size, "--samples", cfg.scst_samples,
             "--learning-rate", cfg.scst_learning_rate, "--seed", cfg.seed)
    res = train_scst(ScstConfig(model_dir=str(model_dir), features=str(store), captions=[str(captions)],
                                samples=cfg.scst_samples),
                     scst_dir, scst_recipe(steps=cfg.scst_steps, batch_size=cfg.scst_batch_size,
                                           learning_rate=cfg.scst_learning_rate, seed=cfg.seed),
                     progress=progress, log=log)
    echo(f"step {res.step}, epoch {res.epoch:.2f}: val CIDEr-D (greedy) {res.val_metrics['val_cider']:.3f} "
         f"-> {scst_dir}")
    return scst_dir


def _caption(cfg: DemoConfig, images: Path, captions: Path, model_dir: Path, progress, echo) -> list:
    """Step 5: caption the first `cfg.show` test images; [(image path, caption, reference captions)]."""
    test = load_annotations(captions).part("test")[: cfg.show]
    files = [images / r.path for r in test]
    _command(echo, f"5/6 caption {len(files)} held-out test images with the SCST model", "caption",
             "--model-dir", model_dir, *files)
    run = caption_files(Captioner(model_dir, SearchConfig()), [str(f) for f in files], progress=progress)
    shown = [(str(f), item.texts[0] if item.texts else f"({item.error})", rec.captions)
             for f, item, rec in zip(files, run.results, test, strict=True)]
    for path, text, _ in shown:
        echo(f"{Path(path).name}: {text}")
    return shown


def _accuracy_cells(ev, captions_json: Path) -> list[str]:
    """The caption-accuracy cells of one evaluation: one-shape, two-shape ("-" when none), colour words."""
    acc = caption_accuracy({it.record.image_id: it.caption for it in ev.items}, captions_json)
    cells = [f"{r}/{n} ({r / n:.0%})" if n else "-" for r, n in (acc["single"], acc["pair"])]
    return [*cells, f"{acc['colour'][0]}/{acc['colour'][1]}"]


def _finale(echo, shown, evaluations, captions_json: Path, workdir: Path, seconds: float) -> None:
    """The closing lines: held-out captions next to their references, then XE vs SCST side by side."""
    xe, scst = evaluations
    echo(f"\n== held-out test images: SCST caption | references (all {len(scst.items)} in "
         f"{workdir / 'report.html'})")
    for path, text, refs in shown:
        echo(f"{Path(path).name}: {text}")
        echo(f"    refs: {' | '.join(refs[:3])}")
    echo(f"\n== XE vs SCST on the test split ({len(scst.items)} images, the same beam search); the accuracy "
         "columns count captions naming exactly the drawn colours and shapes")
    head = ["model", "BLEU-4", "CIDEr", "one-shape images", "two-shape images", "colour words", "perplexity"]
    rows = [[name, f"{ev.metrics.corpus['Bleu_4']:.3f}", f"{ev.metrics.corpus['CIDEr']:.3f}",
             *_accuracy_cells(ev, captions_json), f"{ev.perplexity:.2f}"]
            for name, ev in (("train-decoder (XE)", xe), ("train-scst (SCST)", scst))]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        echo("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                       enumerate(zip(row, widths, strict=True))).rstrip())
    c_xe, c_scst = xe.metrics.corpus["CIDEr"], scst.metrics.corpus["CIDEr"]
    gain = c_scst / c_xe - 1 if c_xe else float("nan")
    bleu = scst.metrics.corpus["Bleu_4"] - xe.metrics.corpus["Bleu_4"]
    echo(f"SCST vs XE: CIDEr {c_scst:.3f} vs {c_xe:.3f} ({gain:+.1%} relative), BLEU-4 {bleu:+.3f}  "
         f"({seconds:.0f} s in all)")
    echo("Random CNN weights and toy shapes: real captions need --cnn-weights imagenet and COCO (README).")
