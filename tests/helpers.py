"""Tiny learnable data for the decoder tests (helpers only; no tests here).

`make_dataset(dir)` writes a feature store (through data.features' writer) whose D-d rows encode one of a
few scene classes, and a COCO caption file (with per-image "split") whose captions name the class.
`coco_ramp_images` + `tiny_caption_model` make real images, their extracted store and a tiny captioning model
dir (caption and export tests; `saved_models.run_saved_models` runs their exports in a Python without the
project). Below them: image files (good and odd), im2txt checkpoint tensors, damaged or pre-checksum stores,
a lock held by another process, and `kill_and_resume`, the one kill -9 harness.
Test modules import only from here (and other non-`test_` modules of tests/), never from each other.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


# ---- image files (extract, preprocess and reliability tests) --------------------------------------------


def photo(size=(40, 30), seed=0) -> Image.Image:
    """A smooth RGB test picture (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)
    arr = np.stack([(xx * 5 + base[0]) % 256, (yy * 7 + base[1]) % 256, (xx + yy + base[2]) % 256], -1)
    return Image.fromarray(arr.astype(np.uint8))


def bomb_png(path: Path, width=100_000, height=100_000) -> Path:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""
    photo((2, 2)).save(path, format="PNG")
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


def make_good_images(folder: Path, n=6, size=(40, 30)) -> list[Path]:
    """n plain JPEGs img00.jpg ... in folder (image i is (size[0] + i) x (size[1] + 2i) px)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i:02d}.jpg"
        photo((size[0] + i, size[1] + 2 * i), seed=i).save(p, quality=90)
        paths.append(p)
    return paths


def make_odd_images(folder: Path) -> dict[str, str | None]:
    """Odd files named .jpg; returns {file name: expected error category, or None when it must decode}."""
    folder.mkdir(parents=True, exist_ok=True)
    base = photo((50, 40), seed=7)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    rgba.save(folder / "rgba_png.jpg", format="PNG")
    Image.fromarray((np.arange(50 * 40).reshape(40, 50) * 30).astype(np.uint16)).save(
        folder / "grey16_png.jpg", format="PNG")
    for fmt in ("gif", "bmp", "webp"):
        base.save(folder / f"{fmt}.jpg", format=fmt.upper())
    base.convert("CMYK").save(folder / "cmyk.jpg", format="JPEG")
    base.save(folder / "progressive.jpg", format="JPEG", progressive=True)
    photo((4, 4)).save(folder / "tiny.jpg")
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image\n")
    full = folder / "full.jpg"
    base.save(full, format="JPEG")
    (folder / "truncated.jpg").write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    full.unlink()
    bomb_png(folder / "bomb.jpg")
    return {"rgba_png.jpg": None, "grey16_png.jpg": None, "gif.jpg": None, "bmp.jpg": None, "webp.jpg": None,
            "cmyk.jpg": None, "progressive.jpg": None, "tiny.jpg": None, "zero.jpg": "empty",
            "text.jpg": "not-an-image", "truncated.jpg": "truncated", "bomb.jpg": "bomb"}


# ---- im2txt checkpoint tensors (import-im2txt tests) ----------------------------------------------------

IM2TXT_SIZES = (2048, 8, 6, 13)  # tiny decoder: feature dim (InceptionV3's), embedding, LSTM units, rows
LSTM_IMG = "image_embedding/weights"


def tiny_tensors(lstm_names, seed=0) -> dict:
    """Random im2txt decoder tensors (float32, IM2TXT_SIZES) under the given LSTM (kernel, bias) names."""
    d, e, u, v = IM2TXT_SIZES
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.uniform(-0.5, 0.5, shape).astype(np.float32)

    return {LSTM_IMG: r(d, e) * 0.1, "seq_embedding/map": r(v, e), lstm_names[0]: r(e + u, 4 * u),
            lstm_names[1]: r(4 * u), "logits/weights": r(u, v), "logits/biases": r(v),
            "global_step": np.int64(1234)}


def write_vocab(path: Path, n_lines: int) -> Path:
    """An im2txt word_counts.txt of n_lines (a, <S>, </S>, dog, w0, ...) with descending counts."""
    words = ["a", "<S>", "</S>", "dog"] + [f"w{i}" for i in range(n_lines - 4)]
    path.write_text("\n".join(f"{w} {100 - i}" for i, w in enumerate(words)))
    return path


# ---- damaged and old stores, a lock held elsewhere (reliability tests) ----------------------------------


def flip_bytes(path: Path, offset: int, count: int = 64) -> None:
    """Invert `count` bytes of the file at `offset` (in place)."""
    data = bytearray(path.read_bytes())
    for i in range(offset, min(offset + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def without_checksums(src: Path, dst: Path) -> Path:
    """A copy of store `src` as stores were written before checksums (contiguous, unfiltered)."""
    with h5py.File(src, "r") as a, h5py.File(dst, "w") as b:
        for name, dset in a.items():
            b.create_dataset(name, data=dset[()], dtype=dset.dtype)
        for key, value in a.attrs.items():
            if key != "rows_writing":
                b.attrs[key] = value
    return dst


def damaged_copy(src: Path, dst: Path) -> Path:
    """A copy of store `src` at `dst` with the first 8-byte flip (scanning from the start, past the HDF5
    signature) that breaks its metadata so that h5py fails while opening it."""
    from base.errors import InputError

    for offset in range(8, 4096, 8):
        dst.write_bytes(src.read_bytes())
        flip_bytes(dst, offset, 8)
        try:
            open_store(dst).close()
        except InputError as err:
            if "damaged and cannot be read" in str(err):
                return dst
    raise AssertionError(f"no flip damaged the metadata of {src}")


HOLD_LOCK = """
import sys, time
from base.locks import exclusive
with exclusive(sys.argv[1], folder=sys.argv[2] == "folder"):
    print("locked", flush=True)
    time.sleep(120)
"""


def hold_lock(target, folder: bool = False) -> subprocess.Popen:
    """A live process (no TensorFlow) holding the lock of `target` (a store, or a model dir) until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(target), "folder" if folder else "file"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


# ---- kill and resume: the one harness (train-decoder, train-scst, finetune, extract) --------------------

_CKPT = re.compile(r"^ckpt-(\d+)\.npz$")


def checkpoint_steps(model_dir: Path) -> list[int]:
    """Steps of the finished `ckpt-<step>.npz` files in model_dir/checkpoints, ascending (temps ignored)."""
    folder = Path(model_dir) / "checkpoints"
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    return sorted(int(m.group(1)) for m in map(_CKPT.match, names) if m)


def assert_same_weights(got_dir: Path, ref_dir: Path, atol: float = 1e-6) -> None:
    """decoder.weights.h5 of two model dirs: the same datasets, equal to `atol`."""
    ref = h5_datasets(Path(ref_dir) / "decoder.weights.h5")
    got = h5_datasets(Path(got_dir) / "decoder.weights.h5")
    assert ref.keys() == got.keys()
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=atol, err_msg=name)


@dataclass
class KillResume:
    """What `kill_and_resume` saw."""

    output: str  # stdout + stderr of the killed process
    at_kill: object  # what inspect() returned after the kill, before the resume (None without inspect)
    resumed: object  # what resume() returned
    reference: object  # what reference() returned (None without reference)


def kill_mid_run(argv: Sequence, progressed: Callable[[], bool], sig: int = signal.SIGKILL, cwd=REPO,
                 env=None, timeout: float = 120.0) -> str:
    """Start `python cli.py *argv`, poll `progressed()` (a checkpoint, rows written) every 20 ms, send `sig`
    as soon as it is true, wait; returns the process's output. Fails the test if the run ended by itself
    first, made no progress within `timeout` s, or did not die of `sig`."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), *map(str, argv)], cwd=cwd, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        deadline, late = time.monotonic() + timeout, False
        try:
            while proc.poll() is None and not late and not progressed():
                time.sleep(0.02)
                late = time.monotonic() > deadline
            ended = proc.poll() is not None
            if not ended:
                proc.send_signal(sig)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:  # progressed() raised or the signal did not end it: never leave it
                proc.kill()
                proc.wait()
        log.seek(0)
        output = log.read().decode(errors="replace")
    assert not ended, f"the run ended (rc {proc.returncode}) before it could be killed:\n{output[-2000:]}"
    assert not late, f"no progress within {timeout} s:\n{output[-2000:]}"
    assert proc.returncode == -sig, f"not ended by signal {sig} (rc {proc.returncode}):\n{output[-2000:]}"
    return output


def kill_and_resume(argv: Sequence, progressed: Callable[[], bool], resume: Callable, *, inspect=None,
                    reference=None, sig: int = signal.SIGKILL, **popen) -> KillResume:
    """The kill -9 test: reference() (the same run, never interrupted), then `python cli.py *argv` killed with
    `sig` once progressed() (kill_mid_run), then inspect() (the state the kill left), then resume() (the
    rerun). `popen`: cwd, env, timeout of kill_mid_run. The caller compares `.resumed` (or the files it
    wrote) with `.reference`."""
    ref = reference() if reference is not None else None
    output = kill_mid_run(argv, progressed, sig=sig, **popen)
    at_kill = inspect() if inspect is not None else None
    return KillResume(output, at_kill, resume(), ref)


def write_webdataset(tar_path: Path, samples: Sequence[tuple[str, dict[str, bytes]]]) -> Path:
    """An img2dataset-style webdataset shard: for each (key, {ext: bytes}) the members `key.ext`, in order
    (e.g. ("000000001", {"jpg": ..., "txt": b"a caption", "json": b'{"caption": "..."}'}))."""
    import io
    import tarfile

    tar_path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    return tar_path


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    """A parquet shard with the given columns (e.g. img2dataset's key, jpg (bytes), txt)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def image_shards(folder: Path, images: Sequence[Path], per_shard: int) -> list[Path]:
    """Webdataset shards 00000.tar, 00001.tar, ... of `images` (per_shard each), keys `%09d` numbered
    across shards as img2dataset does, caption "picture <i>" in .txt (and a json without caption)."""
    shards = []
    for k, start in enumerate(range(0, len(images), per_shard)):
        samples = [(f"{i:09d}", {"jpg": Path(images[i]).read_bytes(), "txt": f"picture {i}".encode(),
                                 "json": json.dumps({"key": f"{i:09d}"}).encode()})
                   for i in range(start, min(start + per_shard, len(images)))]
        shards.append(write_webdataset(folder / f"{k:05d}.tar", samples))
    return shards


def descendants(pid: int) -> list[int]:
    """The live processes descended from `pid` (children, grandchildren, ...), read from /proc."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def process_title(pid: int) -> str:
    """A process's command line as one string ("" once it is gone); Ray workers' titles name their actor."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# ---- the wheel a `pip install showtell` user gets (tests/test_wheel.py) ------------------------------------
# never copied into a wheel build: the checkout's environment, caches and run outputs (as in .gitignore)
NOT_SOURCES = (".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", ".ruff_cache",
               ".hypothesis", "demo_run", "*.pyc", ".pytest-exit-code")


def build_wheel(dest: Path) -> Path:
    """Build showtell's wheel offline (`pip wheel --no-deps --no-build-isolation --no-index`, the project
    venv's setuptools) from a copy of the checkout in dest/src, so that no build/ or stale build/lib file is
    left in (or taken from) the repository; returns the .whl path."""
    import shutil  # local: appended helper, keeps the module's import block untouched

    src = dest / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    argv = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
            "--quiet", "--wheel-dir", str(dest / "dist")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stderr[-3000:]}"
    return next((dest / "dist").glob("showtell-*.whl"))


def install_wheel(wheel: Path, venv: Path, hide=("pycocoevalcap", "showtell", "__editable__")) -> Path:
    """A fresh virtualenv at `venv` holding only `wheel` (installed by pip, no dependencies, offline); the
    running interpreter's site-packages (TensorFlow, h5py, ... of the project venv) are reused through a
    folder of symlinks that leaves out the names starting with `hide` (pycocoevalcap: an extra; the editable
    showtell) and every .pth file (so the checkout is never importable). Returns the venv's python."""
    import sysconfig  # local: appended helper

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "--no-index", "--quiet", str(wheel)], check=True, capture_output=True, text=True,
                   timeout=300)
    deps = venv / "reused-site-packages"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(tuple(hide)) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "reused-site-packages.pth").write_text(f"{deps}\n")
    return python


def tiny_model_dir_for(out: Path, ann, image_size: int = 75, units: int = 16) -> Path:
    """A model dir for finetune at toy sizes: a random `units`-wide decoder over the vocabulary of `ann`'s
    training captions (data.captions annotations), with the seeded random InceptionV3 block at image_size."""
    from extract.encoder import CNNSpec, encoder_and_spec

    vocab = Vocabulary.build((c for r in ann.part("train") for c in r.captions), min_count=1)
    _, spec = encoder_and_spec(CNNSpec(weights="none", seed=0, image_size=image_size))
    config = ModelConfig(vocab_size=len(vocab), embedding_size=units, lstm_units=units)
    return save_model_dir(out, build_decoder(config, seed=0), config, vocab, spec.to_dict())


def only_error_line(output: str) -> str:
    """The one `Error:` line of a command's output, checked to be its last line and its only error (the lines
    before it may only be the start-up notes a command prints, e.g. "precision: ..."). str."""
    lines = output.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], output
    assert all(line.startswith(("precision:", "replacing ", "weights:")) for line in lines[:-1]), output
    return errors[0]


def train_tiny_decoder(store: Path, captions: Path, model_dir: Path, steps: int, units: int = 16, **train):
    """Train a tiny Show and Tell decoder (`units`-wide embedding and LSTM, Adam, batch 8, no mid-run
    validation unless `train` sets eval_every) on a store + captions of `make_dataset`, in this process;
    `train` overrides TrainConfig fields (learning_rate, checkpoint_every, ...). Returns the TrainResult."""
    from decoder.train.config import TrainConfig
    from decoder.train.train_decoder import DataConfig, train_decoder

    cfg = TrainConfig(**{"batch_size": 8, "steps": steps, "optimizer": "adam", "eval_every": 0, **train})
    return train_decoder(DataConfig(str(store), [str(captions)], min_word_count=1), Path(model_dir), cfg,
                         embedding_size=units, lstm_units=units, progress=False, log=lambda m: None)
