"""Benchmark lines of bench/extract.py (a helper, not a benchmark): `extract --engine ray` with 2 local CNN
workers vs the local engine on the same webdataset shards. Prints one line per engine, then the ratio.

  ray / local   images/s of --engine ray --workers 2 over --engine local, each timed end to end in the same
                process (Ray's start-up, the actors' CNN builds and the part-store join included; the
                rate each engine's summary line reports is printed too). Target >= 0.8.

Both engines run the same CNN (InceptionV3, seeded random weights) in float32 on the same shards, the local
engine first. bench/extract.py calls `ray_line` on its own images (not in smoke runs: Ray's start-up alone
takes tens of seconds).
"""

import tarfile
import time
from pathlib import Path


def write_shards(images: list[Path], folder: Path, per_shard: int) -> str:
    """img2dataset-style webdataset shards of `images` (`<key>.jpg`); returns their brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = 0
    for n_shards, start in enumerate(range(0, len(images), per_shard), start=1):
        with tarfile.open(folder / f"{n_shards - 1:05d}.tar", "w", dereference=True) as tar:
            for i in range(start, min(start + per_shard, len(images))):
                tar.add(images[i], arcname=f"{i:09d}.jpg")
    return str(folder / f"{{00000..{n_shards - 1:05d}}}.tar")


def compare(work: Path, pattern: str, image_size: int, batch_size: int, workers: int = 2) -> dict:
    """{engine: (images/s end to end, seconds, images/s of its summary line)} for both engines."""
    from extract.ray_engine import run_extract_ray
    from extract.run import ExtractConfig, run_extract

    rates = {}
    for engine in ("local", "ray"):
        cfg = ExtractConfig(out=str(work / f"{engine}.h5"), paths=[pattern], cnn_weights="none",
                            image_size=image_size, batch_size=batch_size, precision="float32",
                            progress=False, engine=engine, workers=workers)
        t0 = time.perf_counter()
        result = (run_extract_ray if engine == "ray" else run_extract)(cfg, log=lambda m: None)
        seconds = time.perf_counter() - t0
        rates[engine] = (result.total / seconds, seconds, result.done_now / max(result.seconds, 1e-9))
    return rates


def report(rates: dict, workers: int = 2) -> None:
    """The bench lines: each engine, then the headline ratio."""
    for engine, (rate, seconds, inner) in rates.items():
        name = f"{engine} --workers {workers}" if engine == "ray" else engine
        print(f"extract --engine {name}: {rate:.2f} img/s end to end ({seconds:.1f} s; summary line "
              f"{inner:.2f} img/s)")
    print(f"ray / local (2 local workers, same shards): {rates['ray'][0] / rates['local'][0]:.2f} "
          "(target >= 0.8)")


def ray_line(work: Path, images: list[Path], image_size: int, batch_size: int, per_shard: int = 32) -> None:
    """Write `images` as webdataset shards under `work`, run both engines on them, print the lines."""
    pattern = write_shards(images, work / "ray_shards", per_shard)
    print(f"ray vs local: {len(images)} images in webdataset shards of {per_shard}")
    report(compare(work / "ray_shards", pattern, image_size, batch_size))
