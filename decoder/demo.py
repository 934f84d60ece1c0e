"""`demo`: the whole pipeline on a generated sample (coloured shapes) in a few minutes on a CPU.

Steps: generate the synthetic shapes set (data.synthetic) -> extract (random InceptionV3, `--cnn-weights
none`) -> train-decoder -> caption a few held-out test images -> evaluate on the test split. Each step first
prints the equivalent command line (copy them for real data), then calls the same package function that
command calls. The run ends with captions of held-out test images next to their references, and BLEU-4 and
CIDEr on the test split.

Rerunning in the same workdir resumes: the data is regenerated only when missing, extract and train-decoder
continue (or find their work done), caption and evaluate run again. A workdir made with other demo settings
(or `--fresh`) is cleaned first: only the files the demo writes are removed.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from evaluation.shapes import caption_accuracy

DEMO_FILE = "demo.json"  # the settings of the demo that made a workdir
OWNED = ("shapes", "features.h5", "model", "eval", "report.html", DEMO_FILE)  # what the demo writes


@dataclass
class DemoConfig:
    """Sizes of the demo (defaults: the `make demo` run, ~2-3 minutes on 2 CPU cores)."""

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
                       steps=1500, learning_rate=0.001, show=4, use_java=False)
        from data.errors import InputError

        raise InputError(f"unknown demo preset {name!r}: use full or tiny.")


@dataclass
class DemoResult:
    """What the demo produced (for tests)."""

    workdir: Path
    captions_json: Path  # the synthetic set's COCO captions file
    model_dir: Path
    shown: list  # [(image path, generated caption, reference captions)] for the held-out test images
    evaluation: object  # decoder.infer.evaluate.EvalResult on the test split
    seconds: float


def _prepare(workdir: Path, cfg: DemoConfig, fresh: bool, echo) -> None:
    """Create the workdir; clean the demo's own files when asked or when they came from other settings."""
    settings = asdict(cfg)
    marker = workdir / DEMO_FILE
    old = json.loads(marker.read_text()) if marker.is_file() else None
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
    workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings, indent=1) + "\n")


def _command(echo, title: str, *args) -> None:
    """Print a step title and its command line (shell-quoted)."""
    echo(f"\n== {title}")
    echo("$ python cli.py " + " ".join(shlex.quote(str(a)) for a in args))


def run_demo(workdir="demo_run", cfg: DemoConfig | None = None, fresh: bool = False, progress: bool = True,
             echo=print, log=print) -> DemoResult:
    """Run the demo in `workdir`; `echo` prints the steps and results, `log` the steps' own messages."""
    from beam import SearchConfig
    from data.captions import load_annotations
    from data.pipeline import PipelineConfig
    from data.synthetic import generate_shapes
    from decoder.infer.captioner import Captioner, caption_files
    from decoder.infer.evaluate import EvalConfig, run_evaluate
    from decoder.train.config import TrainConfig
    from decoder.train.train_decoder import DataConfig, train_decoder
    from extract.run import ExtractConfig, run_extract

    cfg = cfg or DemoConfig()
    start = time.perf_counter()
    workdir = Path(workdir)
    _prepare(workdir, cfg, fresh, echo)
    data_dir, store, model_dir = workdir / "shapes", workdir / "features.h5", workdir / "model"
    images, captions = data_dir / "images", data_dir / "captions.json"

    echo(f"\n== 1/5 generate {cfg.n_images} synthetic {cfg.image_size}px images with captions (your data: "
         "a COCO/Karpathy/Flickr8k caption file and its images folder)")
    if not captions.is_file():
        generate_shapes(data_dir, n_images=cfg.n_images, image_size=cfg.image_size, seed=cfg.seed,
                        pair_fraction=cfg.pair_fraction)
    echo(f"{captions}: {load_annotations(captions).summary()}")

    _command(echo, "2/5 extract InceptionV3 features (random weights here; real captions need imagenet)",
             "extract", "--images", images, "--captions", captions, "--out", store, "--cnn-weights", "none",
             "--image-size", cfg.image_size, "--seed", cfg.seed)
    ext = run_extract(ExtractConfig(out=str(store), images=[str(images)], captions=[str(captions)],
                                    cnn_weights="none", image_size=cfg.image_size, seed=cfg.seed,
                                    progress=progress))
    echo(ext.summary())

    _command(echo, "3/5 train the decoder", "train-decoder", "--features", store, "--captions", captions,
             "--model-dir", model_dir, "--steps", cfg.steps, "--embedding-size", cfg.embedding_size,
             "--lstm-units", cfg.lstm_units, "--batch-size", cfg.batch_size, "--optimizer", cfg.optimizer,
             "--learning-rate", cfg.learning_rate, "--feature-norm", "standardize", "--seed", cfg.seed)
    train = TrainConfig(batch_size=cfg.batch_size, optimizer=cfg.optimizer, learning_rate=cfg.learning_rate,
                        steps=cfg.steps, seed=cfg.seed)
    res = train_decoder(DataConfig(features=str(store), captions=[str(captions)]),
                        model_dir, train, embedding_size=cfg.embedding_size, lstm_units=cfg.lstm_units,
                        feature_norm="standardize", pipeline=PipelineConfig(), progress=progress, log=log)
    echo(f"step {res.step}, epoch {res.epoch:.2f}: val perplexity {res.val_perplexity:.3f} -> {model_dir}")

    test = load_annotations(captions).part("test")[: cfg.show]
    files = [images / r.path for r in test]
    _command(echo, f"4/5 caption {len(files)} held-out test images", "caption", "--model-dir", model_dir,
             *files)
    run = caption_files(Captioner(model_dir, SearchConfig()), [str(f) for f in files], progress=progress)
    shown = [(str(f), item.texts[0] if item.texts else f"({item.error})", rec.captions)
             for f, item, rec in zip(files, run.results, test, strict=True)]
    for path, text, _ in shown:
        echo(f"{Path(path).name}: {text}")

    _command(echo, "5/5 evaluate on the test split", "evaluate", "--model-dir", model_dir, "--features",
             store, "--images", images, "--captions", captions, "--split", "test", "--out-dir",
             workdir / "eval", "--report", workdir / "report.html",
             *(["--java", "no"] if cfg.use_java is False else []))
    ev = run_evaluate(EvalConfig(model_dir=str(model_dir), captions=[str(captions)], features=str(store),
                                 images=[str(images)], split="test", out_dir=str(workdir / "eval"),
                                 report=str(workdir / "report.html"), use_java=cfg.use_java,
                                 progress=progress), log=log)
    echo(ev.table)
    _finale(echo, shown, ev, captions, workdir, time.perf_counter() - start)
    return DemoResult(workdir, captions, model_dir, shown, ev, time.perf_counter() - start)


def _finale(echo, shown, ev, captions_json: Path, workdir: Path, seconds: float) -> None:
    """The closing lines: held-out captions next to their references, then the headline metrics."""
    echo(f"\n== held-out test images: generated caption | references (all {len(ev.items)} in "
         f"{workdir / 'report.html'})")
    for path, text, refs in shown:
        echo(f"{Path(path).name}: {text}")
        echo(f"    refs: {' | '.join(refs[:3])}")
    acc = caption_accuracy({it.record.image_id: it.caption for it in ev.items}, captions_json)
    echo("test captions naming exactly the drawn colours and shapes: "
         + ", ".join(f"{name} {r}/{n} ({r / n:.0%})" for name, (r, n) in
                     (("one-shape images", acc["single"]), ("two-shape images", acc["pair"])) if n)
         + f"; colour words right: {acc['colour'][0]}/{acc['colour'][1]}")
    corpus = ev.metrics.corpus
    echo(f"test split ({len(ev.items)} images): BLEU-4 {corpus['Bleu_4']:.3f}  CIDEr {corpus['CIDEr']:.3f}  "
         f"perplexity {ev.perplexity:.2f}  ({seconds:.0f} s in all)")
    echo("Random CNN weights and toy shapes: real captions need --cnn-weights imagenet and COCO (README).")
