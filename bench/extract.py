"""Benchmark `extract` at 299 px on >= 64 COCO-size JPEGs (CPU here). One result per line, headline last.

  extract / naive loop   extract's images/s over PIL open + resize + model.predict one image at a time
                         (target >= 3)
  extract / ceiling      extract's images/s over the same CNN on already-decoded in-memory batches, the
                         physical limit of the machine for this CNN (target >= 0.90)
  bfloat16               on a CPU with native bfloat16 (bench/machine.py prints the CPU's model name):
                         extract and its ceiling again with --precision mixed_bfloat16, each against the
                         ceiling in its own precision, and the bfloat16 / float32 images/s (target >= 2)
  ray / local            `extract --engine ray --workers 2` over the local engine on the same images as
                         webdataset shards, end to end (bench/extract_ray.py; not in --smoke; target >= 0.8)

Images: ../shared/data/coco_val2017_sample/images when present (--shared-data), topped up with generated
640x480 JPEGs.
The CNN is InceptionV3 with seeded random weights (same FLOPs as ImageNet's, no download). Each rate is the
best of three runs, ceiling and extract interleaved (the machine is shared and noisy; the best run is
the one least disturbed by other processes).
--smoke: the same lines at toy sizes (8 images at 75 px, batch 4, one repetition, 4 naive images) in about
15 s, so the test suite keeps the bench running (tests/test_bench.py); its numbers mean nothing.
Run: `.venv/bin/python bench/extract.py [--images N] [--batch-size B] [--image-size S] [--smoke]`.
"""

import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from extract_ray import ray_line  # noqa: E402  (bench/: the --engine ray vs local line)
from machine import bench_parser, precisions  # noqa: E402  (bench/, the script's folder)
from PIL import Image  # noqa: E402
from sample_images import add_image_options, image_folder  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"


def naive_rate(model, paths: list[Path], size: int) -> float:
    """PIL open + resize (346 for 299) + central crop + model.predict, one image at a time: images/s."""
    from extract.preprocess import resize_size

    r = resize_size(size)
    off = (r - size) // 2
    t0 = time.perf_counter()
    for path in paths:
        im = Image.open(path).convert("RGB").resize((r, r), Image.BILINEAR)
        x = np.asarray(im, np.float32)[off : off + size, off : off + size] / 127.5 - 1.0
        model.predict(x[None], verbose=0)
    return len(paths) / (time.perf_counter() - t0)


def ceiling_rate(infer, batches: list[np.ndarray]) -> float:
    """The same CNN call as extract on pre-decoded, pre-processed in-memory batches: images/s."""
    t0 = time.perf_counter()
    for x in batches:
        infer(x)
    return sum(len(x) for x in batches) / (time.perf_counter() - t0)


def time_precision(work: Path, paths: list[Path], batches: list, args, precision: str):
    """(ceiling images/s per rep, extract images/s per rep) with the CNN in `precision`, interleaved."""
    from extract.encoder import CNNSpec
    from extract.pipeline import inference_encoder
    from extract.run import ExtractConfig, run_extract

    def cfg(out, imgs):
        return ExtractConfig(out=str(work / f"{precision}-{out}"), paths=imgs, cnn_weights="none",
                             image_size=args.image_size, batch_size=args.batch_size, precision=precision,
                             progress=False)

    # extract's own encoder (inference_encoder keeps it, so run_extract below calls the same function)
    infer, _ = inference_encoder(CNNSpec(weights="none", seed=0, image_size=args.image_size), precision)
    run_extract(cfg("warm.h5", [str(p) for p in paths[: args.batch_size]]), log=lambda m: None)  # trace
    ceiling, extract = [], []
    for rep in range(args.reps):
        ceiling.append(ceiling_rate(infer, batches))
        result = run_extract(cfg(f"run{rep}.h5", [str(work / "img")]), log=lambda m: None)
        extract.append(result.done_now / result.seconds)
        if rep == 0:
            print(f"[{precision}] extract summary: {result.summary()}")
    print(f"[{precision}] ceiling (same CNN, in-memory batches of {args.batch_size}): {max(ceiling):.2f} "
          f"img/s (runs {', '.join(f'{c:.2f}' for c in ceiling)}); extract: {max(extract):.2f} img/s (runs "
          f"{', '.join(f'{e:.2f}' for e in extract)})")
    return ceiling, extract


def main() -> None:
    parser = bench_parser(__doc__,
                          "toy sizes (8 images at 75 px, batch 4, 1 repetition): checks the bench runs",
                          SHARED_DATA,
                          "folder with coco_val2017_sample/images (generated images only when absent)")
    add_image_options(parser, 128, "number of images (>= 64 for the report)",
                      "interleaved repetitions of ceiling and extract")
    parser.add_argument("--naive", type=int, default=24, help="images timed in the naive loop")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.reps, args.batch_size, args.naive, args.image_size = 8, 1, 4, 4, 75
    size = args.image_size


    from base.devices import accelerators
    from extract.preprocess import decode_image, preprocess

    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        paths, note = image_folder(work, args.images, args.shared_data)
        print(f"images{' (smoke)' if args.smoke else ''}: {len(paths)} ({note}), {size} px, "
              f"batch {args.batch_size}, "
              f"{os.cpu_count()} CPUs, GPUs: {len(accelerators())}")

        names, cpu_line = precisions()
        print(cpu_line)
        arrays = [preprocess(decode_image(p, size), size).numpy() for p in paths]
        batches = [np.stack(arrays[i : i + args.batch_size]) for i in range(0, len(arrays), args.batch_size)]
        rates = {}
        for precision in names:
            rates[precision] = time_precision(work, paths, batches, args, precision)
        ceiling, extract = rates["float32"]
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        del arrays, batches
        import keras

        keras.utils.set_random_seed(0)
        model = keras.applications.InceptionV3(include_top=False, weights=None, pooling="avg",
                                               input_shape=(size, size, 3))
        model.predict(np.zeros((1, size, size, 3), np.float32), verbose=0)
        naive = naive_rate(model, paths[: args.naive], size)
        print(f"naive loop (PIL + model.predict, 1 image at a time, {args.naive} images): {naive:.2f} img/s")
        print(f"ceiling (same CNN, in-memory batches of {args.batch_size}): {max(ceiling):.2f} img/s "
              f"(runs {', '.join(f'{c:.2f}' for c in ceiling)})")
        print(f"extract: {max(extract):.2f} img/s (runs {', '.join(f'{e:.2f}' for e in extract)})")
        print(f"peak memory (RSS, after the first extract): {peak_mb:.0f} MB")
        print(f"extract / naive loop: {max(extract) / naive:.2f}x (target >= 3)")
        if "mixed_bfloat16" in rates:
            bf_ceiling, bf_extract = rates["mixed_bfloat16"]
            print(f"[mixed_bfloat16] extract / ceiling in bfloat16: {max(bf_extract) / max(bf_ceiling):.3f} "
                  "(target >= 0.90)")
            print(f"bfloat16 / float32 extract: {max(bf_extract) / max(extract):.2f}x img/s (ceilings "
                  f"{max(bf_ceiling) / max(ceiling):.2f}x; target >= 2 on an AMX CPU)")
        if args.smoke:
            print("ray / local: not run in --smoke (Ray's start-up alone takes tens of seconds)")
        else:  # --engine ray with 2 local workers vs the local engine on the same images as shards
            ray_line(work, paths, size, args.batch_size)
        print(f"extract / ceiling: {max(extract) / max(ceiling):.3f} (target >= 0.90)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
