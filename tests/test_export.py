"""`export`: the SavedModel gives `caption`'s captions in a fresh process that cannot import this project (a
tiny trained model dir and the model dir `import-im2txt` makes from a real-layout checkpoint; images and
cached features); bad rows in a batch; saved_model_cli; option checks. The in-graph decoding is tested in
tests/test_export_decode.py, the in-graph beam search against beam/ in tests/test_graph_beam.py."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from helpers import REPO, coco_ramp_images, tiny_caption_model
from saved_models import run_saved_models

from beam import SearchConfig
from cli import main
from data.features import open_store
from decoder.infer.captioner import Captioner, caption_files, caption_store

SEARCH_B = ["--beam-size", "4", "--max-length", "8", "--length-normalization", "0.7", "--top", "2"]
def reference(model_dir, search: SearchConfig, files=None, store=None) -> list[tuple]:
    """`caption`'s in-process path: per row (error, texts, logprobs), in input order."""
    captioner = Captioner(model_dir, search)
    run = (caption_files(captioner, files, progress=False) if files is not None
           else caption_store(captioner, store, progress=False))
    return [(r.error, r.texts, [c.logprob for c in r.captions]) for r in run.results]


def assert_same(got: dict, want: list[tuple], top: int) -> None:
    """The exported outputs equal the reference: ok, the top captions, log-probs within 1e-4."""
    assert len(got["ok"]) == len(want)
    for row, (error, texts, logprobs) in enumerate(want):
        assert got["ok"][row] == (not error), (row, error)
        n = min(top, len(texts))
        assert got["captions"][row] == texts[:n] + [""] * (top - n), row
        np.testing.assert_allclose(got["log_probs"][row][:n], logprobs[:n], rtol=0, atol=1e-4)
        assert all(lp == -np.inf for lp in got["log_probs"][row][n:])


def store_features(store, tmp_path: Path, name: str) -> str:
    with open_store(store) as s:
        np.save(tmp_path / name, s.read_features().astype(np.float32))
    return str(tmp_path / name)


def export(*args):
    result = CliRunner().invoke(main, ["export", *map(str, args)])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """3 COCO-named JPEGs + 3 bad files, their float32 store (75 px, random CNN), a tiny decoder model dir,
    exported twice: A with the default search, B with SEARCH_B (written with --overwrite over a copy of A)."""
    root = tmp_path_factory.mktemp("export")
    images, bad = root / "images", root / "bad"
    images.mkdir()
    bad.mkdir()
    good = sorted(coco_ramp_images(images, [42, 7, 123456]))
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_bytes(b"this is not an image, just text\n")
    (bad / "truncated.jpg").write_bytes(good[0].read_bytes()[:700])
    store, model_dir = tiny_caption_model(root, images)
    code, out = export("--model-dir", model_dir, "--out", root / "exported" / "1")
    assert code == 0, out
    shutil.copytree(root / "exported" / "1", root / "exported" / "2")  # --overwrite replaces only an export
    (root / "exported" / "2" / "assets.extra" / "stale.txt").write_text("old")
    code, out_b = export("--model-dir", model_dir, "--out", root / "exported" / "2", "--overwrite", *SEARCH_B)
    assert code == 0, out_b
    return {"root": root, "good": good, "bad": sorted(bad.iterdir()), "store": store, "model_dir": model_dir,
            "a": root / "exported" / "1", "b": root / "exported" / "2", "summary": out}


@pytest.mark.slow
def test_export_writes_a_savedmodel_and_refuses_bad_arguments(tiny):
    a, b = tiny["a"], tiny["b"]
    assert (a / "saved_model.pb").is_file() and (a / "variables").is_dir() and a.with_name("1.lock").exists()
    summary = tiny["summary"]
    assert "export: " in summary and "captions [N, 3]" in summary and " MB | " in summary
    assert not (b / "assets.extra" / "stale.txt").exists() and (b / "saved_model.pb").is_file()  # replaced
    assert sorted(p.name for p in a.parent.iterdir()) == ["1", "1.lock", "2", "2.lock"]  # no temp folder left
    code, out = export("--model-dir", tiny["model_dir"], "--out", a)
    assert code == 2 and "not empty" in out and "--overwrite" in out
    code, out = export("--model-dir", tiny["model_dir"], "--out", a.parent / "3", "--top", 4)
    assert code == 2 and "--top 4 is more than --beam-size 3" in out and not (a.parent / "3").exists()
    code, out = export("--model-dir", tiny["root"] / "nope", "--out", a.parent / "3")
    assert code == 2 and "does not exist" in out
    no_cnn = tiny["root"] / "no_cnn"
    shutil.copytree(tiny["model_dir"], no_cnn)
    config = json.loads((no_cnn / "config.json").read_text())
    (no_cnn / "config.json").write_text(json.dumps({**config, "cnn": {}}))
    code, out = export("--model-dir", no_cnn, "--out", a.parent / "3")
    assert code == 2 and "no CNN record" in out and not a.with_name("3.lock").exists()


@pytest.mark.parametrize("option,value", [("--beam-size", "0"), ("--beam-size", "65"), ("--max-length", "1"),
                                          ("--top", "0"), ("--top", "4"), ("--length-normalization", "-1"),
                                          ("--length-normalization", "nan")])
@pytest.mark.slow
def test_bad_numbers_fail_before_tensorflow_starts(option, value):
    code = ("import sys\nfrom cli import main\n"
            f"try:\n    main(['export', '--model-dir', 'm', '--out', 'o', '{option}', '{value}'])\n"
            "except SystemExit as err:\n    print(err.code, 'tensorflow' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr
    assert option in proc.stderr


@pytest.mark.slow
def test_parity_with_caption_in_a_process_without_the_project(tiny, tmp_path):
    """Images (good and bad rows in one batch) and cached features, two search settings."""
    files = [str(p) for p in tiny["good"][:2] + tiny["bad"] + tiny["good"][2:]]
    feats = store_features(tiny["store"], tmp_path, "features.npy")
    got = run_saved_models(tmp_path, [{"model": str(tiny["a"]), "images": files},
                               {"model": str(tiny["a"]), "features": feats},
                               {"model": str(tiny["b"]), "images": files},
                               {"model": str(tiny["b"]), "features": feats},
                               {"model": str(tiny["a"]), "images": []}])
    search_b = SearchConfig(beam_size=4, max_length=8, length_normalization=0.7)
    want_images = reference(tiny["model_dir"], SearchConfig(), files=files)
    assert [bool(e) for e, _, _ in want_images] == [False, False, True, True, True, False]
    assert_same(got[0], want_images, 3)
    assert_same(got[1], reference(tiny["model_dir"], SearchConfig(), store=tiny["store"]), 3)
    assert_same(got[2], reference(tiny["model_dir"], search_b, files=files), 2)
    assert_same(got[3], reference(tiny["model_dir"], search_b, store=tiny["store"]), 2)
    assert len({tuple(c) for c in got[0]["captions"]}) > 2  # the images really get different captions
    assert got[0]["captions"][2:5] == [["", "", ""]] * 3 and got[0]["ok"][2:5] == [False] * 3
    assert got[4] == {"captions": [], "log_probs": [], "ok": []}  # an empty request


@pytest.mark.slow
def test_parity_on_coco_photos(tiny, shared_data, tmp_path):
    from extract.run import ExtractConfig, run_extract

    photos = sorted((shared_data / "coco_val2017_sample" / "images").glob("*.jpg"))[:4]
    store = tmp_path / "coco.h5"
    run_extract(ExtractConfig(out=str(store), paths=[str(p) for p in photos], cnn_weights="none",
                              image_size=75, dtype="float32", batch_size=4, progress=False))
    feats = store_features(store, tmp_path, "coco.npy")
    got = run_saved_models(tmp_path, [{"model": str(tiny["a"]), "images": [str(p) for p in photos]},
                               {"model": str(tiny["a"]), "features": feats}])
    assert_same(got[0], reference(tiny["model_dir"], SearchConfig(), files=[str(p) for p in photos]), 3)
    assert_same(got[1], reference(tiny["model_dir"], SearchConfig(), store=store), 3)
    assert all(got[0]["ok"])


def real_layout_tensors(index: Path) -> dict:
    """Values for every variable of the community im2txt checkpoint (names and shapes from its index):
    He-scaled InceptionV3 convolutions with sane batch-norm statistics, im2txt's uniform +-0.08 decoder,
    spread logit biases (clear word ranking, no float near-ties)."""
    rng = np.random.default_rng(0)

    def value(name, shape):
        if name == "global_step":
            return np.int64(2000000)
        if name.endswith("moving_variance"):
            return rng.uniform(0.5, 1.5, shape)
        if name.endswith(("moving_mean", "beta")):
            return rng.normal(0, 0.1, shape)
        if name.startswith("InceptionV3/") and len(shape) == 4:
            return rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        if name == "logits/biases":
            return rng.normal(0, 1.0, shape)
        if name in ("logits/weights", "image_embedding/weights"):
            return rng.uniform(-0.5, 0.5, shape)
        return rng.uniform(-0.08, 0.08, shape)

    return {n: value(n, s) if n == "global_step" else value(n, s).astype(np.float32)
            for n, s in tf.train.list_variables(str(index))}


@pytest.mark.slow
def test_parity_for_an_imported_im2txt_checkpoint(shared_data, tmp_path):
    """import-im2txt on a checkpoint with the community checkpoint's 383 names and shapes (12000-word
    decoder, slim InceptionV3 -> cnn.weights.h5) at 75 px, exported, vs `caption` on COCO photos and
    features."""
    from decoder.im2txt_import import import_im2txt
    from decoder.infer.export import ExportConfig, export_model
    from extract.run import ExtractConfig, run_extract
    from extract.slim import save_tf1_checkpoint

    prefix = save_tf1_checkpoint(tmp_path / "ckpt" / "model.ckpt-2000000",
                                 real_layout_tensors(shared_data / "im2txt" / "model.ckpt-2000000"))
    model_dir = tmp_path / "model"
    import_im2txt(prefix, shared_data / "im2txt" / "word_counts.txt", model_dir, image_size=75)
    (tmp_path / "ckpt" / "model.ckpt-2000000.data-00000-of-00001").unlink()  # disk: the dir has it all
    photos = [str(p) for p in sorted((shared_data / "coco_val2017_sample" / "images").glob("*.jpg"))[:4]]
    store = tmp_path / "coco.h5"
    run_extract(ExtractConfig(out=str(store), paths=photos, cnn_weights=str(model_dir / "cnn.weights.h5"),
                              image_size=75, dtype="float32", batch_size=4, progress=False))
    feats = store_features(store, tmp_path, "coco.npy")
    out = tmp_path / "exported" / "1"
    report = export_model(model_dir, out, ExportConfig())
    assert report.image_size == 75 and report.size_bytes > 100e6  # InceptionV3 + a 12000-word decoder
    got = run_saved_models(tmp_path, [{"model": str(out), "images": photos},
                                      {"model": str(out), "features": feats}])
    want = reference(model_dir, SearchConfig(), files=photos)
    assert_same(got[0], want, 3)
    assert_same(got[1], reference(model_dir, SearchConfig(), store=store), 3)
    assert all(got[0]["ok"]) and len({c[0] for c in got[0]["captions"]}) > 1


def saved_model_cli() -> list[str]:
    """The venv's saved_model_cli (installed with tensorflow), else its module."""
    exe = Path(sys.executable).with_name("saved_model_cli")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]


@pytest.mark.slow
def test_saved_model_cli_show_and_run(tiny, tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    show = subprocess.run([*saved_model_cli(), "show", "--dir", str(tiny["a"]), "--all"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert show.returncode == 0, show.stderr[-2000:]
    text = show.stdout
    for piece in ("signature_def['serving_default']", "signature_def['caption_features']", "inputs['images']",
                  "inputs['features']", "outputs['captions']", "outputs['log_probs']", "outputs['ok']",
                  "shape: (-1, 2048)", "shape: (-1, 3)", "dtype: DT_STRING", "dtype: DT_BOOL"):
        assert piece in text, piece
    image = tiny["good"][1]
    np.save(tmp_path / "one.npy", np.array([image.read_bytes()]))  # bytes dtype, no pickle
    run = subprocess.run([*saved_model_cli(), "run", "--dir", str(tiny["a"]), "--tag_set", "serve",
                          "--signature_def", "serving_default", "--inputs", f"images={tmp_path / 'one.npy'}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    best = reference(tiny["model_dir"], SearchConfig(), files=[str(image)])[0][1][0]
    assert "Result for output key captions:" in run.stdout and f"[[b'{best}'" in run.stdout
    assert "Result for output key ok:\n[ True]" in run.stdout


# ---- in-graph decoding == PIL's decode_image (extract/preprocess.py) ---------------------------------------
