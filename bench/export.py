"""Benchmark `export` (CPU). One result per line, the headline ratio last.

  export                 wall time of `export_model` and the SavedModel's size on disk
  load                   a fresh Python: `import tensorflow`, `tf.saved_model.load`, first call (1 image)
  serving_default        images/s of the exported signature on encoded JPEG bytes (file reads included), at
                         batch 1 and at batch B (32)
  caption                images/s of `cli.py caption`'s in-process path (Captioner + caption_files: PIL
                         decoding in tf.data, the CNN, NumPy beam search) on the same files, same batch size
  exported / caption     the worse of the two batch sizes (target >= 0.90: exporting must not cost speed)
  bfloat16               on a CPU with native bfloat16 (bench/machine.py): the model exported again with
                         --precision mixed_bfloat16 (the graph's CNN in bfloat16), its serving_default
                         images/s at batch B, the ratio to the float32 export and identical best captions

Model: InceptionV3 with seeded random weights (--cnn-weights none: ImageNet's FLOPs, no download) at 299 px
and a random decoder of im2txt's sizes (vocabulary 12000, embedding 512, LSTM 512); beam 3, max length 20.
A random decoder rarely ends a caption, so every search runs all 19 steps (the worst case, for both paths).
Images: ../shared/data/coco_val2017_sample/images when present, topped up with generated 640x480 JPEGs.
Rates are the best of --reps runs, the two paths interleaved (the machine is shared and noisy).
--smoke: toy sizes (75 px, a 16-unit decoder, 4 images, batches 1 and 4, one run) in about a minute; its
numbers mean nothing (tests/test_bench.py runs it).
Run: `.venv/bin/python bench/export.py [--images N] [--batch-size B] [--reps R] [--smoke]`.
"""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from machine import bench_parser, precisions  # noqa: E402  (bench/, the script's folder)
from sample_images import add_image_options, image_folder  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"
LOAD = """
import sys, time
t0 = time.perf_counter()
import tensorflow as tf
t1 = time.perf_counter()
model = tf.saved_model.load(sys.argv[1])
t2 = time.perf_counter()
model.signatures["serving_default"](images=tf.constant([open(sys.argv[2], "rb").read()]))
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def make_model_dir(out: Path, size: int, vocab_size: int, units: int) -> None:
    """A model dir: random decoder (vocab_size ids, units-wide) on the seeded random InceptionV3 at size."""
    from data.vocab import Vocabulary
    from decoder.config import ModelConfig
    from decoder.model import build_decoder
    from decoder.modeldir import save_model_dir
    from extract.encoder import encoder_and_spec

    words = ["<S>", "</S>"] + [f"w{i}" for i in range(vocab_size - 3)]  # + <UNK> = vocab_size ids
    (out.parent / "word_counts.txt").write_text("\n".join(f"{w} {10**6 - i}" for i, w in enumerate(words)))
    vocab = Vocabulary.load(out.parent / "word_counts.txt")
    _, spec = encoder_and_spec({"weights": "none", "seed": 0, "image_size": size})
    config = ModelConfig(vocab_size=len(vocab), embedding_size=units, lstm_units=units)
    save_model_dir(out, build_decoder(config, seed=0), config, vocab, cnn=spec.to_dict())


def exported_rate(model, paths: list[Path], batch: int):
    """(images/s, best captions) of serving_default on the files' bytes, `batch` files per call."""
    import tensorflow as tf

    best = []
    t0 = time.perf_counter()
    for i in range(0, len(paths), batch):
        out = model.signatures["serving_default"](images=tf.constant([p.read_bytes() for p in
                                                                      paths[i:i + batch]]))
        best += [c.decode() for c in out["captions"].numpy()[:, 0]]
    return len(paths) / (time.perf_counter() - t0), best


def caption_rate(captioner, paths: list[Path], batch: int):
    """(images/s, best captions) of caption's in-process path (caption_files) on the same files."""
    from decoder.infer.captioner import caption_files

    t0 = time.perf_counter()
    run = caption_files(captioner, [str(p) for p in paths], batch_size=batch, progress=False)
    return len(paths) / (time.perf_counter() - t0), [r.texts[0] if r.texts else "" for r in run.results]


def bfloat16_export(work: Path, paths: list[Path], args, f32_rate: float, f32_best: list[str]) -> None:
    """Export the model again with a bfloat16 CNN and time serving_default at --batch-size against the
    float32 export (`f32_rate` images/s, `f32_best` its best captions); skipped without native bfloat16."""
    import tensorflow as tf

    from base.devices import using_precision
    from decoder.infer.export import ExportConfig, export_model

    names, cpu_line = precisions()
    print(cpu_line)
    if "mixed_bfloat16" not in names or args.smoke:  # a second export would double the smoke's time
        print("bfloat16 export skipped" + (" (--smoke)" if args.smoke else ""))
        return
    with using_precision("mixed_bfloat16"):
        report = export_model(work / "model", work / "exported" / "2", ExportConfig())
    model = tf.saved_model.load(str(report.out))
    exported_rate(model, paths[:args.batch_size], args.batch_size)  # warm-up
    runs = [exported_rate(model, paths, args.batch_size) for _ in range(args.reps)]
    rate = max(r[0] for r in runs)
    same = sum(a == b for a, b in zip(runs[0][1], f32_best, strict=True))
    print(f"batch {args.batch_size}: exported serving_default in bfloat16 {rate:.2f} img/s; bfloat16 / "
          f"float32 export: {rate / f32_rate:.2f}x; identical best captions {same}/{len(paths)}")


def main() -> None:
    parser = bench_parser(__doc__, "toy sizes (75 px, 4 images, one run)", SHARED_DATA,
                          "folder with coco_val2017_sample/images (generated images only when absent)")
    add_image_options(parser, 64, "images timed at --batch-size", "interleaved repetitions of both paths")
    parser.add_argument("--batch-one-images", type=int, default=24, help="images timed at batch 1")
    args = parser.parse_args()
    vocab_size, units = 12000, 512
    if args.smoke:
        args.images, args.batch_one_images, args.batch_size, args.reps, args.image_size = 4, 2, 4, 1, 75
        vocab_size, units = 50, 16

    import tensorflow as tf

    from base.devices import using_precision
    from beam import SearchConfig
    from decoder.infer.captioner import Captioner
    from decoder.infer.export import ExportConfig, export_model

    work = Path(tempfile.mkdtemp(prefix="bench_export_"))
    scope = contextlib.ExitStack()
    scope.enter_context(using_precision("float32"))  # the float32 lines (bfloat16_export nests its own)
    try:
        paths, note = image_folder(work, args.images, args.shared_data)
        print(f"setup{' (smoke)' if args.smoke else ''}: {len(paths)} images ({note}), {args.image_size} px, "
              f"random InceptionV3 + decoder (vocab {vocab_size}, embedding {units}, LSTM {units}), beam 3, "
              f"max length 20, {os.cpu_count()} CPUs")
        make_model_dir(work / "model", args.image_size, vocab_size, units)
        report = export_model(work / "model", work / "exported" / "1", ExportConfig())
        print(f"export: {report.seconds:.1f} s, {report.size_bytes / 1e6:.1f} MB on disk")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.run([sys.executable, "-c", LOAD, str(report.out), str(paths[0])], cwd=work, env=env,
                              capture_output=True, text=True, check=True)
        t_import, t_load, t_first = map(float, proc.stdout.split()[-3:])
        print(f"load in a fresh process: {t_load:.1f} s (import tensorflow {t_import:.1f} s, first call "
              f"{t_first:.1f} s)")
        # caption's CNN first: building a --cnn-weights none CNN sets TF's global seed, which clears the
        # eager context's caches (the loaded model's optimised functions with them)
        captioner = Captioner(work / "model", SearchConfig())
        caption_rate(captioner, paths[:1], 1)
        model = tf.saved_model.load(str(report.out))
        ratios = []
        for batch, files in ((1, paths[:args.batch_one_images]), (args.batch_size, paths)):
            caption_rate(captioner, files[:batch], batch)  # warm-up: graph optimisation, tf.data, traces
            exported_rate(model, files[:batch], batch)
            runs = [(exported_rate(model, files, batch), caption_rate(captioner, files, batch))
                    for _ in range(args.reps)]
            exp, cap = max(r[0][0] for r in runs), max(r[1][0] for r in runs)
            same = sum(a == b for a, b in zip(runs[0][0][1], runs[0][1][1], strict=True))
            print(f"batch {batch}: exported serving_default {exp:.2f} img/s, caption (in-process) {cap:.2f} "
                  f"img/s ({len(files)} images, best of {args.reps}); identical best captions "
                  f"{same}/{len(files)}")
            ratios.append(exp / cap)
            print(f"batch {batch}: exported / caption: {exp / cap:.3f}")
        bfloat16_export(work, paths, args, exp, runs[0][0][1])  # the last batch size: --batch-size
        print(f"exported / caption (worse of batch 1 and {args.batch_size}): {min(ratios):.3f} "
              f"(target >= 0.90)")
    finally:
        scope.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
