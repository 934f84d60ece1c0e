"""Images for the benchmarks (a helper module, not a benchmark): the shared COCO sample photos, topped up
with generated 640x480 JPEGs when the sample is absent or too small."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE = Path("coco_val2017_sample") / "images"  # under the shared data folder


def gather_images(folder: Path, n: int, shared: Path) -> str:
    """Link up to n sample JPEGs of `shared` into folder and generate the rest at 640x480; returns a note."""
    sample = shared / SAMPLE
    real = sorted(sample.glob("*.jpg"))[:n] if sample.is_dir() else []
    for path in real:
        os.symlink(path, folder / path.name)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    for i in range(n - len(real)):
        arr = np.stack([(xx * rng.uniform(0.1, 1)) % 256, (yy * rng.uniform(0.1, 1)) % 256,
                        rng.integers(0, 256, (480, 640))], -1).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"gen{i:03d}.jpg", quality=90)
    return f"{len(real)} from coco_val2017_sample + {n - len(real)} generated 640x480"


def add_image_options(parser, images: int, images_help: str, reps_help: str) -> None:
    """The options of a bench that runs the CNN over images: --images, --batch-size (32), --reps (3) and
    --image-size (299, the CNN's input size S)."""
    parser.add_argument("--images", type=int, default=images, help=images_help)
    parser.add_argument("--batch-size", type=int, default=32, help="images per CNN batch")
    parser.add_argument("--reps", type=int, default=3, help=reps_help)
    parser.add_argument("--image-size", type=int, default=299, help="CNN input size S (>= 75)")


def image_folder(work: Path, count: int, shared_data: Path) -> tuple[list[Path], str]:
    """`count` images gathered into `work`/img (gather_images): (their sorted paths, where they came from)."""
    folder = Path(work) / "img"
    folder.mkdir()
    note = gather_images(folder, count, shared_data)
    return sorted(folder.iterdir()), note
