"""`caption`: same captions from image files and from cached features; fingerprint refusal; bad images."""

import json
import shutil

import pytest
from click.testing import CliRunner
from helpers import coco_ramp_images, tiny_caption_model

from cli import main

IDS = [42, 7, 123456]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """3 COCO-named images + 1 broken one, a float32 store from extract (75 px, random CNN), a model dir."""
    root = tmp_path_factory.mktemp("caption")
    images = root / "images"
    images.mkdir()
    coco_ramp_images(images, IDS)
    (images / "broken.jpg").write_bytes(b"this is not a jpeg")
    store, model_dir = tiny_caption_model(root, images)
    return root, images, store, model_dir


def caption(*args):
    result = CliRunner().invoke(main, ["caption", "--no-progress", *map(str, args)])
    return result.exit_code, result.output, result.stderr


def captions_only(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith(("Captions", "  "))]


def test_files_and_features_give_the_same_captions(setup):
    root, images, store, model_dir = setup
    code, out, err = caption("--model-dir", model_dir, images, "--json", root / "files.json")
    assert code == 0, out + err
    assert "Skipped broken.jpg: not-an-image" in err and "failed 1 (not-an-image 1)" in out
    assert out.count("Captions for image COCO_val2014_") == 3 and "  2) " in out and "(p=0." in out
    code, out2, err2 = caption("--model-dir", model_dir, "--features", store, "--json", root / "store.json")
    assert code == 0, out2 + err2
    by_files = json.loads((root / "files.json").read_text())
    by_store = json.loads((root / "store.json").read_text())
    assert by_files == by_store and sorted(r["image_id"] for r in by_files) == sorted(IDS)
    assert len({r["caption"] for r in by_files}) > 1  # the images really get different captions
    assert captions_only(out) == captions_only(out2)
    one = by_files[0]["file_name"]
    code, out3, _ = caption("--model-dir", model_dir, "--features", store, "--keys", one, "--top", 1,
                            "--beam-size", 1)
    assert code == 0 and out3.count("Captions for image") == 1 and "  1) " not in out3


def test_search_options_reach_the_search(setup):
    _, images, store, model_dir = setup
    code, out, _ = caption("--model-dir", model_dir, "--features", store, "--max-length", 3,
                           "--no-repeat-ngram", 1, "--suppress-unk", "--length-normalization", 0.7)
    assert code == 0
    for line in out.splitlines():
        if line.startswith("  "):
            words = line.split(") ", 1)[1].rsplit(" (p=", 1)[0].split()
            assert len(words) <= 2 and "<UNK>" not in words and len(set(words)) == len(words)
    sampling = ("--model-dir", model_dir, "--features", store, "--sample", "--num-samples", 2, "--seed", 4,
                "--temperature", 0.8, "--top-k", 5)
    code, out, _ = caption(*sampling)
    assert code == 0 and out.count("Captions for image") == 3 and "  2) " not in out
    assert captions_only(out) == captions_only(caption(*sampling)[1])  # seeded


def test_fingerprint_mismatch_is_refused(setup, tmp_path):
    _, images, store, model_dir = setup
    other = tmp_path / "model"
    shutil.copytree(model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["cnn"]["fingerprint"] = "0" * 64
    (other / "config.json").write_text(json.dumps(config))
    code, out, _ = caption("--model-dir", other, "--features", store)
    assert code == 2 and "fingerprint" in out and "Captions" not in out
    code, out, _ = caption("--model-dir", other, images)  # the CNN built for images is checked too
    assert code == 2 and "fingerprint" in out and "Captions" not in out


def test_exit_codes_and_bad_arguments(setup, tmp_path):
    root, images, store, model_dir = setup
    code, out, err = caption("--model-dir", model_dir, images / "broken.jpg")
    assert code == 1 and "broken.jpg: not-an-image" in err and "captioned 0" in out
    assert caption("--model-dir", tmp_path / "nope", images)[0] == 2
    assert caption("--model-dir", model_dir)[0] == 2  # neither PATHS nor --features
    code, out, _ = caption("--model-dir", model_dir, "--features", store, "--keys", "missing.jpg")
    assert code == 2 and "missing.jpg" in out
    code, out, _ = caption("--model-dir", model_dir, "--features", store, "--beam-size", 0)
    assert code == 2 and "--beam-size" in out
    assert caption("--model-dir", model_dir, images / "nothing-*.png")[0] == 2
