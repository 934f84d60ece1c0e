"""Issue 18's export check: an exported attend model, run by `tf.saved_model.load` in a Python that cannot
import this project (saved_models.run_saved_models: `python -I -S`, the venv's site-packages without their
.pth files, so not even the editable install's finder), gives `caption`'s captions, log-probs (1e-4) and
attention maps (1e-5), from image files (serving_default) and from the grid store (caption_features)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from attend_data import CELLS, shapes_with_grid, train_tiny_attend
from helpers import cli
from saved_models import run_saved_models

from base.devices import using_precision
from data.features import open_store
from decoder.infer.captioner import Captioner, caption_files, caption_store


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 40-image shapes set at 160 px, its float16 grid store (`extract --grid`), an attend model dir
    (`train-decoder --arch attend`, 120 steps, 32 wide: narrower or shorter, most best captions are still
    empty) and its float32 export (the CLI): {root, store, model, export}."""
    root = tmp_path_factory.mktemp("attend_export")
    captions, store = shapes_with_grid(root)
    model, out = root / "model", root / "exported" / "1"
    train_tiny_attend(store, captions, model, 120, units=32, learning_rate=0.02)
    cli("export", "--model-dir", model, "--out", out, "--precision", "float32")
    return {"root": root, "store": store, "model": model, "export": out}


def caption_json(tmp_path, name: str, *args) -> dict:
    """`caption --json` (float32) -> {file_name: its entry (caption, attention {grid, words, weights})}."""
    out = tmp_path / f"{name}.json"
    cli("caption", "--model-dir", *args, "--json", out, "--precision", "float32", "--no-progress")
    return {entry["file_name"]: entry for entry in json.loads(out.read_text())}


def assert_same_as_caption(got: dict, keys: list[str], entries: dict, logprobs: dict) -> None:
    """Row i of the export's outputs (got: run_saved_models' result) equals `caption`'s entry for keys[i]:
    the best caption's text, its log-prob (logprobs: key -> float, from caption's own code) within 1e-4, the
    attention rows of its words within 1e-5 (caption's JSON rounds them to 1e-5) and summing to 1; the rows
    after its words and the other captions' rows after theirs are 0. A key caption skipped: ok False, 0s."""
    attention = np.asarray(got["attention"], np.float32)  # [N, T, L - 1, cells]
    assert attention.shape[0] == len(keys) and attention.shape[3] == CELLS
    for i, key in enumerate(keys):
        if key not in entries:
            assert not got["ok"][i] and got["captions"][i][0] == "" and not attention[i].any(), key
            continue
        entry, weights = entries[key], attention[i, 0]
        assert got["ok"][i] and got["captions"][i][0] == entry["caption"], key
        assert abs(got["log_probs"][i][0] - logprobs[key]) < 1e-4, key
        n = len(entry["attention"]["words"])
        assert entry["attention"]["grid"] == [3, 3] and n == len(entry["caption"].split())
        want = np.reshape(entry["attention"]["weights"], (n, CELLS))
        np.testing.assert_allclose(weights[:n], want, rtol=0, atol=1e-5)
        np.testing.assert_allclose(weights[:n].sum(-1), 1.0, atol=1e-5)
        assert not weights[n:].any(), key
        for t, text in enumerate(got["captions"][i][1:], start=1):  # the other captions: 0 after their words
            words = len(text.split())
            assert not attention[i, t, words:].any() and (not words or attention[i, t, :words].sum() > 0)


@pytest.mark.slow
def test_attend_export_equals_caption_without_the_project(exported, tmp_path):
    """Image files (5 good + 1 not an image, one batch) through serving_default and all 40 grids through
    caption_features, in the project-less child, against `caption --json` on the same files and store."""
    root, store, model = exported["root"], exported["store"], exported["model"]
    files = [str(p) for p in sorted((root / "images").glob("*.jpg"))[:5]]
    (tmp_path / "text.jpg").write_bytes(b"not an image, just text\n")
    files.insert(2, str(tmp_path / "text.jpg"))
    with open_store(store) as s:
        keys = list(s.keys)
        np.save(tmp_path / "grid.npy", s.read_grid().astype(np.float32))  # [40, 3, 3, 2048]
    export = str(exported["export"])
    got = run_saved_models(tmp_path, [{"model": export, "images": files},
                                      {"model": export, "features": str(tmp_path / "grid.npy")}])
    from_files = caption_json(tmp_path, "files", model, *files)
    from_store = caption_json(tmp_path, "store", model, "--features", store)
    assert len(from_files) == 5 and len(from_store) == 40
    with using_precision("float32"):  # caption's own code for the log-probs its JSON does not carry
        captioner = Captioner(model)
        runs = [caption_files(captioner, files, progress=False),
                caption_store(captioner, store, progress=False)]
    logprobs = {r.key: r.captions[0].logprob for run in runs for r in run.results if not r.error}
    assert_same_as_caption(got[0], files, from_files, logprobs)
    assert_same_as_caption(got[1], keys, from_store, logprobs)
    assert sum(bool(e["caption"]) for e in from_files.values()) >= 3  # the files' attention rows are checked
    texts = [e["caption"] for e in [*from_files.values(), *from_store.values()]]
    assert sum(bool(t) for t in texts) > 0.8 * len(texts) and len(set(texts)) > 2  # words, image-dependent
