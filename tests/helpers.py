"""Tiny learnable data for the decoder tests (helpers only; no tests here).

`make_dataset(dir)` writes a feature store (through data.features' writer) whose D-d rows encode one of a
few scene classes, and a COCO caption file (with per-image "split") whose captions name the class.
`coco_ramp_images` + `tiny_caption_model` make real images, their extracted store and a tiny captioning model
dir (caption and export tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from data.features import create_store, open_store
from data.vocab import Vocabulary
from decoder.config import ModelConfig
from decoder.model import build_decoder
from decoder.modeldir import save_model_dir
from extract.run import ExtractConfig, run_extract

COLOURS = ["red", "blue", "green", "yellow"]
SHAPES = ["circle", "square", "triangle"]
REPO = Path(__file__).resolve().parent.parent
CNN = {"arch": "InceptionV3", "weights": "none", "seed": 0, "image_size": 75, "resize_size": 87,
       "fingerprint": "feedc0de"}


def write_store(path: Path, keys, features, ok=None, complete=True, cnn=None) -> Path:
    """A feature store at `path`: features float [N, D] or [N, V, D]; ok bool [N] (default all True)."""
    features = np.asarray(features, np.float32)
    n = len(keys)
    views = 1 if features.ndim == 2 else features.shape[1]
    ok = np.ones(n, bool) if ok is None else np.asarray(ok, bool)
    writer = create_store(path, keys, list(range(1, n + 1)), dim=features.shape[-1], views=views,
                          dtype="float16", attrs={"cnn": cnn or CNN, "image_size": 75, "resize_size": 87})
    with writer:
        rows = n if complete else n // 2
        writer.commit(0, features[:rows], ok[:rows], ["" if o else "decode: broken" for o in ok[:rows]])
        if complete:
            writer.finish()
    return path


def make_dataset(out: Path, n_images: int = 24, dim: int = 8, views: int = 1, seed: int = 0,
                 n_val: int = 6, extra_caption_images: int = 0, bad_rows=(), captions_per_image: int = 2
                 ) -> tuple[Path, Path]:
    """(features.h5, captions.json). Image i has class (colour, shape); its features are a noisy code of
    the class; its 2 captions are "a <colour> <shape>" and "the <shape> is <colour>". The last n_val images
    are "val". `extra_caption_images` adds captioned images absent from the store; `bad_rows` get ok=False."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    keys, feats, images, anns = [], [], [], []
    codes = rng.normal(size=(len(COLOURS) * len(SHAPES), dim))
    for i in range(n_images + extra_caption_images):
        cls = i % len(codes)
        colour, shape = COLOURS[cls % len(COLOURS)], SHAPES[cls // len(COLOURS)]
        name = f"img_{i:03d}.jpg"
        split = "val" if n_images - n_val <= i < n_images else "train"
        images.append({"id": i + 1, "file_name": name, "width": 8, "height": 8, "split": split})
        for text in (f"a {colour} {shape}", f"the {shape} is {colour}")[:captions_per_image]:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "caption": text})
        if i < n_images:
            keys.append(name)
            shape_ = (views, dim) if views > 1 else (dim,)
            feats.append(codes[cls] + 0.05 * rng.normal(size=shape_))
    ok = np.ones(n_images, bool)
    ok[list(bad_rows)] = False
    store = write_store(out / "features.h5", keys, np.array(feats), ok=ok)
    captions = out / "captions.json"
    captions.write_text(json.dumps({"images": images, "annotations": anns}))
    return store, captions


def cli(*args, check=True, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run `python cli.py *args` in the repo; returns the completed process."""
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"cli {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


TINY = ["--embedding-size", "16", "--lstm-units", "16", "--batch-size", "8", "--min-word-count", "1",
        "--no-progress"]


def h5_datasets(path) -> dict:
    """{dataset path: np.ndarray} of every dataset in an HDF5 file (e.g. decoder.weights.h5)."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.setdefault(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return out


def coco_ramp_images(folder: Path, ids) -> list[Path]:
    """One COCO-named JPEG per id in `folder` (noise plus a red, green or blue ramp, widths 80 + 8i)."""
    rng = np.random.default_rng(0)
    paths = []
    for i, image_id in enumerate(ids):
        pixels = rng.random((90, 80 + 8 * i, 3)) * 60
        pixels[:, :, i % 3] += np.linspace(0, 190, pixels.shape[1])
        paths.append(folder / f"COCO_val2014_{image_id:012d}.jpg")
        Image.fromarray(pixels.astype(np.uint8)).save(paths[-1])
    return paths


def tiny_caption_model(root: Path, images: Path) -> tuple[Path, Path]:
    """(store, model dir): `images` extracted to a float32 store (75 px, random CNN), and a 12/12 decoder with
    that CNN block whose image projection is scaled so each image gets its own captions (a random CNN's
    features are ~1e-4)."""
    store = root / "features.h5"
    run_extract(ExtractConfig(out=str(store), paths=[str(images)], cnn_weights="none", image_size=75,
                              dtype="float32", batch_size=2, progress=False))
    with open_store(store) as s:
        cnn = s.cnn
    vocab = Vocabulary.build(["a red square on a field", "two blue circles", "a green dog runs"], min_count=1)
    config = ModelConfig(vocab_size=len(vocab), embedding_size=12, lstm_units=12, init_scale=1.0)
    decoder = build_decoder(config, seed=3)
    kernel = decoder.image_embedding.kernel
    kernel.assign(np.random.default_rng(1).normal(size=kernel.shape).astype(np.float32) * 300)
    return store, save_model_dir(root / "model", decoder, config, vocab, cnn=cnn)
