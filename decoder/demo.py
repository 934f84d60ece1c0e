"""`demo`: the whole pipeline on a generated sample (coloured shapes) in a few minutes on a CPU.

Steps: generate the synthetic shapes set (data.synthetic) -> extract the pooled features and the Mixed_7c
grid (random InceptionV3, `--cnn-weights none`, `--grid`) -> train-decoder: Show and Tell on the pooled
features (cross-entropy, "XE") and the attention decoder (`--arch attend`) on the grid -> train-scst
(self-critical training on CIDEr-D, from the Show and Tell XE model) -> caption a few held-out test images
(with the attention heat-maps) -> evaluate the three models on the test split. Each step first prints the
equivalent command line (copy them for real data), then calls the same package function that command calls.
The run ends with captions of held-out test images next to their references and the three models side by
side (same beam search): BLEU-4, CIDEr, the caption-accuracy columns (evaluation.shapes) and the attention
model's pointing accuracy (evaluation.pointing).

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
from decoder.infer.caption_run import run_caption
from decoder.infer.captioner import Captioner, caption_files
from decoder.infer.evaluate import EvalConfig, run_evaluate
from decoder.train.config import TrainConfig
from decoder.train.scst import ScstConfig, scst_recipe, train_scst
from decoder.train.train_decoder import DataConfig, train_decoder
from evaluation.pointing import pointing_accuracy
from evaluation.shapes import caption_accuracy
from extract.inputs import check_output_dir
from extract.preprocess import resize_size
from extract.run import ExtractConfig, run_extract

DEMO_FILE = DEMO_MARKER  # the settings of the demo that made a workdir: the mark of a demo's workdir
OWNED = DEMO_OWNED  # what the demo writes (and --fresh removes)


@dataclass
class DemoConfig:
    """Sizes of the demo (defaults: the `make demo` run, ~4.5 minutes on 2 CPU cores)."""

    n_images: int = 3000  # synthetic images (80% train, 10% val, 10% test)
    image_size: int = 160  # image side and CNN input size S in pixels: 160 gives a 3x3 Mixed_7c grid
    pair_fraction: float = 0.5  # share of images with two shapes (and a relation word)
    embedding_size: int = 256  # Show and Tell: image/word embedding width
    lstm_units: int = 256  # Show and Tell: LSTM state size
    batch_size: int = 32  # training batch (pairs), both decoders
    steps: int = 4000  # Show and Tell training steps
    attend_width: int = 128  # attention decoder: E = U = A (embedding, LSTM and attention MLP widths)
    attend_steps: int = 2500  # attention decoder training steps
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
        """"full" (make demo) or "tiny" (the test suite: same code path, ~1-2 minutes)."""
        if name == "full":
            return cls()
        if name == "tiny":
            return cls(n_images=500, image_size=160, pair_fraction=0.1, embedding_size=128, lstm_units=128,
                       steps=1500, attend_width=64, attend_steps=1000, learning_rate=0.001, scst_steps=100,
                       show=4, use_java=False)
        raise InputError(f"unknown demo preset {name!r}: use full or tiny.")


@dataclass
class DemoResult:
    """What the demo produced (for tests)."""

    workdir: Path
    captions_json: Path  # the synthetic set's COCO captions file
    model_dir: Path  # the Show and Tell XE model dir
    shown: list  # [(image path, generated caption, reference captions)] for the held-out test images
    evaluation: object  # decoder.infer.evaluate.EvalResult of the SCST model on the test split
    seconds: float
    scst_dir: Path | None = None  # the train-scst model dir
    xe_evaluation: object = None  # EvalResult of the XE (train-decoder) model on the test split
    attend_dir: Path | None = None  # the attention model dir
    attend_evaluation: object = None  # EvalResult of the attention model on the test split
    pointing: tuple = (0, 0, 0.0)  # the attention model's (hits, counted words, chance) on the test split


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
    data_dir, store = workdir / "shapes", workdir / "features.h5"
    images, captions = data_dir / "images", data_dir / "captions.json"

    echo(f"\n== 1/7 generate {cfg.n_images} synthetic {cfg.image_size}px images with captions (your data: "
         "a COCO/Karpathy/Flickr8k caption file and its images folder)")
    if not captions.is_file():
        generate_shapes(data_dir, n_images=cfg.n_images, image_size=cfg.image_size, seed=cfg.seed,
                        pair_fraction=cfg.pair_fraction)
    echo(f"{captions}: {load_annotations(captions).summary()}")

    _command(echo, "2/7 extract InceptionV3 features and the Mixed_7c grid (random weights here; real "
             "captions need imagenet)", "extract", "--images", images, "--captions", captions, "--out", store,
             "--grid", "--cnn-weights", "none", "--image-size", cfg.image_size, "--seed", cfg.seed)
    ext = run_extract(ExtractConfig(out=str(store), images=[str(images)], captions=[str(captions)],
                                    cnn_weights="none", image_size=cfg.image_size, seed=cfg.seed, grid=True,
                                    progress=progress), log=log)
    echo(ext.summary())

    model_dir = _train(cfg, workdir, store, captions, "show-and-tell", progress, echo, log)
    attend_dir = _train(cfg, workdir, store, captions, "attend", progress, echo, log)
    scst_dir = _self_critical(cfg, workdir, store, captions, model_dir, progress, echo, log)
    shown = _caption(cfg, workdir, images, captions, scst_dir, attend_dir, progress, echo, log)

    evals = {}
    for name, directory, out_dir, report in (("XE", model_dir, "eval", None),
                                             ("SCST", scst_dir, "eval-scst", "report.html"),
                                             ("attend", attend_dir, "eval-attend", "report-attend.html")):
        report = workdir / report if report else None
        _command(echo, None if evals else "7/7 evaluate the three models on the test split", "evaluate",
                 "--model-dir", directory, "--features", store, "--images", images, "--captions", captions,
                 "--split", "test", "--out-dir", workdir / out_dir, *(["--report", report] if report else []),
                 *(["--java", "no"] if cfg.use_java is False else []))
        ev = run_evaluate(EvalConfig(model_dir=str(directory), captions=[str(captions)], features=str(store),
                                     images=[str(images)], split="test", out_dir=str(workdir / out_dir),
                                     report=str(report) if report else None, use_java=cfg.use_java,
                                     progress=progress), log=log)
        echo(f"{name} model:\n{ev.table}")
        evals[name] = ev
    pointing = _pointing(evals["attend"], captions, cfg.image_size)
    _finale(echo, shown, evals, pointing, captions, workdir, time.perf_counter() - start)
    return DemoResult(workdir, captions, model_dir, shown, evals["SCST"], time.perf_counter() - start,
                      scst_dir, evals["XE"], attend_dir, evals["attend"], pointing)


def _train(cfg: DemoConfig, workdir: Path, store: Path, captions: Path, arch: str, progress, echo,
           log) -> Path:
    """Steps 3 and 4: train-decoder (cross-entropy) of one architecture; returns its model dir
    (workdir/model for Show and Tell, workdir/model-attend for the attention decoder)."""
    attend = arch == "attend"
    model_dir = workdir / ("model-attend" if attend else "model")
    width = (cfg.attend_width,) * 2 if attend else (cfg.embedding_size, cfg.lstm_units)
    steps = cfg.attend_steps if attend else cfg.steps
    title = ("4/7 train the attention decoder over the grid (Show, Attend and Tell: XE)" if attend else
             "3/7 train the Show and Tell decoder on the pooled features (cross-entropy: the XE model)")
    extra = ["--arch", "attend", "--attention-units", cfg.attend_width] if attend else []
    _command(echo, title, "train-decoder", "--features", store, "--captions", captions, "--model-dir",
             model_dir, *extra, "--steps", steps, "--embedding-size", width[0], "--lstm-units", width[1],
             "--batch-size", cfg.batch_size, "--optimizer", cfg.optimizer, "--learning-rate",
             cfg.learning_rate, "--feature-norm", "standardize", "--seed", cfg.seed)
    train = TrainConfig(batch_size=cfg.batch_size, optimizer=cfg.optimizer, learning_rate=cfg.learning_rate,
                        steps=steps, seed=cfg.seed, precision="auto")  # as the printed command line
    res = train_decoder(DataConfig(features=str(store), captions=[str(captions)]), model_dir, train,
                        embedding_size=width[0], lstm_units=width[1], feature_norm="standardize",
                        pipeline=PipelineConfig(), progress=progress, log=log, arch=arch,
                        attention_units=cfg.attend_width)
    echo(f"step {res.step}, epoch {res.epoch:.2f}: val perplexity {res.val_perplexity:.3f} -> {model_dir}")
    return model_dir


def _self_critical(cfg: DemoConfig, workdir: Path, store: Path, captions: Path, model_dir: Path, progress,
                   echo, log) -> Path:
    """Step 5: train-scst from the Show and Tell XE model into workdir/model-scst; returns that model dir."""
    scst_dir = workdir / "model-scst"
    _command(echo, "5/7 self-critical training on CIDEr-D, from the Show and Tell XE model (the SCST model)",
             "train-scst", "--model-dir", model_dir, "--features", store, "--captions", captions, "--out",
             scst_dir, "--steps", cfg.scst_steps, "--batch-size", cfg.scst_batch_size, "--samples",
             cfg.scst_samples, "--learning-rate", cfg.scst_learning_rate, "--seed", cfg.seed)
    res = train_scst(ScstConfig(model_dir=str(model_dir), features=str(store), captions=[str(captions)],
                                samples=cfg.scst_samples),
                     scst_dir, scst_recipe(steps=cfg.scst_steps, batch_size=cfg.scst_batch_size,
                                           learning_rate=cfg.scst_learning_rate, seed=cfg.seed),
                     progress=progress, log=log)
    echo(f"step {res.step}, epoch {res.epoch:.2f}: val CIDEr-D (greedy) {res.val_metrics['val_cider']:.3f} "
         f"-> {scst_dir}")
    return scst_dir


def _caption(cfg: DemoConfig, workdir: Path, images: Path, captions: Path, model_dir: Path, attend_dir: Path,
             progress, echo, log) -> list:
    """Step 6: caption the first `cfg.show` test images with the SCST model, then with the attention model
    writing their heat-maps to workdir/heatmaps; [(image path, SCST caption, reference captions)]."""
    test = load_annotations(captions).part("test")[: cfg.show]
    files = [images / r.path for r in test]
    _command(echo, f"6/7 caption {len(files)} held-out test images with the SCST model", "caption",
             "--model-dir", model_dir, *files)
    run = caption_files(Captioner(model_dir, SearchConfig()), [str(f) for f in files], progress=progress)
    shown = [(str(f), item.texts[0] if item.texts else f"({item.error})", rec.captions)
             for f, item, rec in zip(files, run.results, test, strict=True)]
    for path, text, _ in shown:
        echo(f"{Path(path).name}: {text}")
    maps = workdir / "heatmaps"
    _command(echo, None, "caption", "--model-dir", attend_dir, "--attention", maps, "--top", 1, *files)
    run_caption(attend_dir, SearchConfig(), paths=[str(f) for f in files], top=1, attention_dir=maps,
                progress=progress, echo=echo, log=log)
    return shown


def _pointing(ev, captions_json: Path, image_size: int) -> tuple[int, int, float]:
    """The attention model's pointing accuracy on its evaluated captions (evaluation.pointing): (hits,
    counted colour/shape words of two-shape images, chance share)."""
    truth = {im["id"]: im["shapes"] for im in json.loads(Path(captions_json).read_text())["images"]}
    items = [(it.caption.split(), it.attention, truth[it.record.image_id]) for it in ev.items]
    return pointing_accuracy(items, image_size, resize_size(image_size))


def _accuracy_cells(ev, captions_json: Path) -> list[str]:
    """The caption-accuracy cells of one evaluation: one-shape, two-shape, two-shape strict ("-" when
    none), colour words."""
    acc = caption_accuracy({it.record.image_id: it.caption for it in ev.items}, captions_json)
    parts = (acc["single"], acc["pair"], acc["pair_strict"])
    cells = [f"{r}/{n} ({r / n:.0%})" if n else "-" for r, n in parts]
    return [*cells, f"{acc['colour'][0]}/{acc['colour'][1]}"]


def _finale(echo, shown, evals: dict, pointing, captions_json: Path, workdir: Path, seconds: float) -> None:
    """The closing lines: held-out captions next to their references, then the three models side by side."""
    xe, scst, att = evals["XE"], evals["SCST"], evals["attend"]
    echo(f"\n== held-out test images: SCST caption | references (all {len(scst.items)} in "
         f"{workdir / 'report.html'}; attention heat-maps in {workdir / 'heatmaps'} and "
         f"{workdir / 'report-attend.html'})")
    for path, text, refs in shown:
        echo(f"{Path(path).name}: {text}")
        echo(f"    refs: {' | '.join(refs[:3])}")
    hits, n, chance = pointing
    point = f"{hits}/{n} ({hits / n:.0%})" if n else "-"
    echo(f"\n== the three models on the test split ({len(scst.items)} images, the same beam search); "
         "one-/two-shape: the caption names exactly the drawn colours and shapes; strict: both objects and "
         "their relation right; pointing: the attention's arg-max cell lies on the object each colour/shape "
         f"word names (two-shape images; chance {chance:.0%})")
    head = ["model", "BLEU-4", "CIDEr", "one-shape", "two-shape", "strict", "colour words", "perplexity",
            "pointing"]
    rows = [[name, f"{ev.metrics.corpus['Bleu_4']:.3f}", f"{ev.metrics.corpus['CIDEr']:.3f}",
             *_accuracy_cells(ev, captions_json), f"{ev.perplexity:.2f}", cell]
            for name, ev, cell in (("Show and Tell (XE)", xe, "-"), ("Show and Tell (SCST)", scst, "-"),
                                   ("attention (XE)", att, point))]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        echo("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                       enumerate(zip(row, widths, strict=True))).rstrip())
    c_xe, c_scst, c_att = (e.metrics.corpus["CIDEr"] for e in (xe, scst, att))
    gain = c_scst / c_xe - 1 if c_xe else float("nan")
    bleu = scst.metrics.corpus["Bleu_4"] - xe.metrics.corpus["Bleu_4"]
    echo(f"attention vs Show and Tell (both XE): CIDEr {c_att:.3f} vs {c_xe:.3f}; pointing {point} "
         f"(chance {chance:.0%})")
    echo(f"SCST vs XE: CIDEr {c_scst:.3f} vs {c_xe:.3f} ({gain:+.1%} relative), BLEU-4 {bleu:+.3f}  "
         f"({seconds:.0f} s in all)")
    echo("Random CNN weights and toy shapes: real captions need --cnn-weights imagenet and COCO (README).")
