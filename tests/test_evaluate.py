"""`evaluate`: outputs (COCO results JSON, metrics JSON, table, HTML report), perplexity = the decoder's own
validation perplexity, features vs images give the same numbers, and bad arguments stop with one sentence."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import CNN, make_dataset, write_store

from cli import main


def evaluate(*args):
    result = CliRunner().invoke(main, ["evaluate", "--no-progress", "--java", "no", *map(str, args)])
    return result.exit_code, result.output, result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained by train_decoder on the 8-d fixture store (6 val images), and its result."""
    from decoder.train.config import TrainConfig
    from decoder.train.train_decoder import DataConfig, train_decoder

    root = tmp_path_factory.mktemp("evaluate")
    store, captions = make_dataset(root, n_images=24, n_val=6)
    train = TrainConfig(batch_size=8, optimizer="adam", learning_rate=0.02, steps=150, eval_every=0,
                        checkpoint_every=0)
    result = train_decoder(DataConfig(features=str(store), captions=[str(captions)], min_word_count=1),
                           root / "model", train, embedding_size=16, lstm_units=16, log=lambda m: None,
                           progress=False)
    return root, store, captions, root / "model", result


@pytest.mark.slow
def test_writes_coco_results_metrics_table_and_report(trained):
    root, store, captions, model_dir, _ = trained
    out = root / "out"
    code, stdout, stderr = evaluate("--model-dir", model_dir, "--features", store, "--captions", captions,
                                    "--split", "val", "--out-dir", out, "--report", out / "report.html")
    assert code == 0, stdout + stderr
    results = json.loads((out / "results.json").read_text())
    assert isinstance(results, list) and len(results) == 6
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["image_id"], int)
               and isinstance(r["caption"], str) and r["caption"] for r in results)
    assert sorted(r["image_id"] for r in results) == list(range(19, 25))  # the 6 val images' ids
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["format"] == "showtell-metrics" and metrics["n_images"] == 6
    assert metrics["tokenizer"] == "fallback" and "METEOR" not in metrics["metrics"]
    for key in ("perplexity", "Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert np.isfinite(metrics["metrics"][key]), key
    assert len(metrics["per_image"]) == 6
    for name in ("perplexity", "BLEU-4", "CIDEr", "METEOR      skipped", "6 images, tokenizer: fallback"):
        assert name in stdout, name
    assert "evaluate: 6 images | skipped 0 | perplexity" in stdout
    page = (out / "report.html").read_text()
    assert page.count('class="item"') == 6 and all(r["caption"] in page for r in results)
    assert not list(out.glob("*.tmp-*"))


@pytest.mark.slow
def test_perplexity_is_the_decoders_validation_perplexity(trained):
    from decoder.infer.evaluate import EvalConfig, run_evaluate

    root, store, captions, model_dir, result = trained
    ev = run_evaluate(EvalConfig(model_dir=str(model_dir), captions=[str(captions)], features=str(store),
                                 split="val", out_dir=str(root / "ppl"), use_java=False, progress=False),
                      log=lambda m: None)
    # train_decoder's last evaluation ran decoder.train.evaluate on the val split with the final weights
    assert ev.perplexity == pytest.approx(result.val_perplexity, rel=1e-5)
    assert 1.0 < ev.perplexity < 30.0
    refs = {it.record.image_id: it.record.captions for it in ev.items}
    assert all(len(r) == 2 for r in refs.values())  # scored against ALL references of each image


def test_skips_rows_without_features_and_counts_them(tmp_path):
    """Captioned images missing from the store or with /ok false are skipped and reported, not fatal."""
    from data.vocab import Vocabulary
    from decoder.config import ModelConfig
    from decoder.infer.evaluate import EvalConfig, run_evaluate
    from decoder.model import build_decoder
    from decoder.modeldir import save_model_dir

    store, captions = make_dataset(tmp_path, n_images=10, n_val=4, extra_caption_images=1, bad_rows=[7])
    data = json.loads(captions.read_text())
    for im in data["images"][6:]:
        im["split"] = "test"  # images 6..9 (row 7 failed) and the extra one (not in the store)
    captions.write_text(json.dumps(data))
    vocab = Vocabulary.build([a["caption"] for a in data["annotations"]], min_count=1)
    config = ModelConfig(vocab_size=len(vocab), embedding_size=8, lstm_units=8, feature_dim=8)
    model_dir = save_model_dir(tmp_path / "model", build_decoder(config, seed=0), config, vocab, cnn=CNN)
    ev = run_evaluate(EvalConfig(model_dir=str(model_dir), captions=[str(captions)], features=str(store),
                                 out_dir=str(tmp_path / "o"), use_java=False, progress=False),
                      log=lambda m: None)
    assert [it.record.path for it in ev.items] == ["img_006.jpg", "img_008.jpg", "img_009.jpg"]
    assert ev.skipped == [("img_007.jpg", "decode: broken"),
                          ("img_010.jpg", "missing: not in the feature store")]
    assert "skipped 2 (decode 1, missing 1)" in ev.summary()


@pytest.mark.slow
def test_bad_arguments_stop_with_one_sentence(trained, tmp_path):
    root, store, captions, model_dir, _ = trained
    base = ["--model-dir", model_dir, "--captions", captions, "--out-dir", tmp_path / "o"]
    code, out, _ = evaluate(*base, "--features", tmp_path / "nope.h5", "--split", "val")
    assert code == 2 and "Error: feature store" in out and "does not exist" in out
    with h5_keys(store) as (keys, feats):
        other = write_store(tmp_path / "other.h5", keys, feats, cnn={**CNN, "fingerprint": "0badc0de"})
    code, out, _ = evaluate(*base, "--features", other, "--split", "val")
    assert code == 2 and "fingerprint 0badc0de" in out and "feedc0de" in out
    code, out, _ = evaluate(*base, "--features", store, "--split", "test")
    assert code == 2 and "the test split" in out and "is empty" in out
    code, out, _ = evaluate(*base, "--split", "val")
    assert code == 2 and "--features" in out and "--images" in out
    code, out, _ = evaluate("--model-dir", tmp_path / "no-model", "--captions", captions, "--features", store)
    assert code == 2 and "does not exist" in out
    assert not (tmp_path / "o").exists()  # nothing written on a bad argument


class h5_keys:
    """Context manager: (keys, float32 features) of a store."""

    def __init__(self, path):
        from data.features import open_store

        self.store = open_store(path)

    def __enter__(self):
        return self.store.keys, self.store.read_features().astype(np.float32)

    def __exit__(self, *exc):
        self.store.close()


@pytest.mark.slow
def test_images_and_features_give_the_same_evaluation(tmp_path):
    """--images (CNN run on the split's images) equals --features (extracted store); a broken image is
    skipped and counted."""
    from data.features import open_store
    from data.synthetic import generate_shapes
    from data.vocab import Vocabulary
    from decoder.config import ModelConfig
    from decoder.infer.evaluate import EvalConfig, run_evaluate
    from decoder.model import build_decoder
    from decoder.modeldir import save_model_dir
    from extract.run import ExtractConfig, run_extract

    captions = generate_shapes(tmp_path / "shapes", n_images=20, image_size=75, seed=1)
    images = tmp_path / "shapes" / "images"
    store = tmp_path / "f.h5"
    run_extract(ExtractConfig(out=str(store), images=[str(images)], captions=[str(captions)],
                              cnn_weights="none", image_size=75, dtype="float32", progress=False))
    (images / "shape_00019.jpg").write_bytes(b"not a jpeg any more")  # a test image breaks after extract
    with open_store(store) as s:
        cnn = s.cnn
    data = json.loads(captions.read_text())
    vocab = Vocabulary.build([a["caption"] for a in data["annotations"]], min_count=1)
    config = ModelConfig(vocab_size=len(vocab), embedding_size=12, lstm_units=12, init_scale=1.0)
    decoder = build_decoder(config, seed=2)
    kernel = decoder.image_embedding.kernel  # random-CNN features are ~1e-4: make them matter
    kernel.assign(np.random.default_rng(1).normal(size=kernel.shape).astype(np.float32) * 300)
    model_dir = save_model_dir(tmp_path / "model", decoder, config, vocab, cnn=cnn)
    common = dict(model_dir=str(model_dir), captions=[str(captions)], split="test", use_java=False,
                  progress=False)
    by_store = run_evaluate(EvalConfig(features=str(store), out_dir=str(tmp_path / "a"), **common),
                            log=lambda m: None)
    by_images = run_evaluate(EvalConfig(images=[str(images)], out_dir=str(tmp_path / "b"), **common),
                             log=lambda m: None)
    assert [r for r, _ in by_images.skipped] == ["shape_00019.jpg"] and not by_store.skipped
    assert len(by_store.items) == 2 and len(by_images.items) == 1
    one = {it.record.path: it.caption for it in by_store.items}
    got = {it.record.path: it.caption for it in by_images.items}
    assert got == {"shape_00018.jpg": one["shape_00018.jpg"]}
    single = run_evaluate(EvalConfig(features=str(store), out_dir=str(tmp_path / "c"), max_images=1,
                                     **common), log=lambda m: None)
    assert by_images.perplexity == pytest.approx(single.perplexity, rel=1e-4)
