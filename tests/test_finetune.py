"""finetune: end-to-end CNN + decoder training from images, through the shared training loop.

Tiny sizes: 75 px synthetic shapes, a 16-unit decoder, a seeded random InceptionV3 (--cnn-weights none).
"""

import json
import shutil

import numpy as np
import pytest
from helpers import checkpoint_steps, kill_and_resume

from base.devices import using_precision
from base.errors import InputError
from data.captions import load_annotations
from data.synthetic import generate_shapes
from data.vocab import Vocabulary
from decoder.config import ModelConfig
from decoder.infer.features import model_encoder
from decoder.model import build_decoder
from decoder.modeldir import load_model_dir, save_model_dir
from decoder.train.cnn_blocks import block_of_layers
from decoder.train.finetune import FinetuneConfig, FinetuneTrainable, finetune, phase2_recipe
from decoder.train.image_batches import BadImages, ImageBatches, image_pairs
from extract.encoder import CNNSpec, encoder_and_spec, weights_fingerprint

SIZE = 75


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 'trained' model dir (random tiny decoder + seeded random CNN block) and 12 synthetic images, one
    train image corrupt and one missing."""
    root = tmp_path_factory.mktemp("finetune")
    captions = generate_shapes(root / "data", n_images=12, image_size=SIZE, seed=0)
    images = root / "data" / "images"
    ann = load_annotations(captions)
    train = ann.part("train")
    (images / train[0].path).write_bytes(b"not a jpeg at all")
    (images / train[1].path).unlink()
    vocab = Vocabulary.build((c for r in train for c in r.captions), min_count=1)
    cnn, spec = encoder_and_spec(CNNSpec(weights="none", seed=0, image_size=SIZE))
    config = ModelConfig(vocab_size=len(vocab), embedding_size=16, lstm_units=16)
    trained = save_model_dir(root / "trained", build_decoder(config, seed=0), config, vocab, spec.to_dict())
    return {"root": root, "captions": captions, "images": images, "trained": trained, "cnn": cnn,
            "initial": [w.numpy().copy() for w in cnn.weights], "ann": ann, "vocab": vocab,
            "bad": str(images / train[0].path)}


def _config(s, **kw):
    return FinetuneConfig(model_dir=str(s["trained"]), images=[str(s["images"])],
                          captions=[str(s["captions"])], **kw)


def _weights_by_block(cnn):
    """[(block, layer name, variable name, is a BN moving statistic)] in cnn.weights order."""
    info = {}
    for layer, block in zip(cnn.layers, block_of_layers(cnn), strict=True):
        for w in layer.weights:
            info[id(w)] = (block, layer.name, w.name, "moving" in w.name)
    return [info[id(w)] for w in cnn.weights]


def _fixed_batch(s, n=8):
    """A fixed eval batch (central crops, no distortion) of n train pairs, one per good image."""
    pairs = image_pairs(s["ann"].part("train"), [s["images"]], s["vocab"])
    files = pairs.files
    src = ImageBatches(pairs, n, 0, SIZE, BadImages(log=lambda m: None))
    first = {files[r]: i for i, r in reversed(list(enumerate(pairs.rows)))}
    good = sorted(i for path, i in first.items() if path != s["bad"])[:n]
    batch = next(iter(src.dataset([np.array(good)], epoch=0, sample_views=False)))
    src.close()
    return batch


def _mean_loss(trainable, batch):
    total, words = trainable.loss_sums(batch, False, None)
    return float(total) / float(words)


def test_blocks_follow_the_graph(setup):
    """Every layer's inputs come from its own block or the previous block's mixed output (a chain)."""
    cnn = setup["cnn"]
    blocks = dict(zip([la.name for la in cnn.layers], block_of_layers(cnn), strict=True))
    first_conv = next(la.name for la in cnn.layers if la.__class__.__name__ == "Conv2D")  # auto-named
    assert blocks["mixed0"] == 0 and blocks["mixed10"] == 10 and blocks[first_conv] == 0
    for layer in cnn.layers[1:]:
        inputs = layer.input if isinstance(layer.input, list) else [layer.input]
        for tensor in inputs:
            parent = tensor._keras_history.operation.name
            if parent in blocks and blocks[parent] != blocks[layer.name]:
                assert parent == f"mixed{blocks[layer.name] - 1}", (layer.name, parent)


def test_image_batches_bad_images_masked_and_seeded(setup):
    pairs = image_pairs(setup["ann"].part("train"), [setup["images"]], setup["vocab"])
    files = pairs.files
    assert pairs.stats["missing_image"] > 0  # the deleted image's captions
    bad = BadImages(log=lambda m: None)
    src = ImageBatches(pairs, 8, 3, SIZE, bad)
    bad_pairs = [i for i in range(len(pairs)) if files[pairs.rows[i]] == setup["bad"]]
    plan = [np.array([bad_pairs[0], 5, 6]), np.arange(8, 16)]
    first, second = list(src.dataset(plan, epoch=0))
    assert bad.summary()["bad_images"] == 1 and bad.summary()["skipped_pairs"] == 1
    again = next(iter(src.dataset(plan, epoch=0)))
    other_epoch = next(iter(src.dataset(plan, epoch=1)))
    halves = list(src.generator(plan, 0, 1, [0, 1], 2))  # two replicas: same images, split
    val = next(src.generator(plan, 0, 0, [0], 1, sample_views=False))
    src.close()
    assert first["images"].shape == (3, SIZE, SIZE, 3) and second["images"].shape == (8, SIZE, SIZE, 3)
    mask = first["mask"].numpy()
    assert mask[0].sum() == 0 and mask[1].sum() > 0  # the bad image's caption is skipped
    assert float(first["global_words"]) == mask.sum()
    assert float(first["images"].numpy().min()) >= -1.0 and float(first["images"].numpy().max()) <= 1.0
    np.testing.assert_array_equal(first["images"].numpy(), again["images"].numpy())  # seeded distortions
    assert not np.array_equal(first["images"].numpy()[1], other_epoch["images"].numpy()[1])
    np.testing.assert_allclose(np.concatenate([h["images"] for h in halves]), second["images"], atol=1e-6)
    assert float(halves[0]["global_words"]) == float(second["global_words"])
    assert not np.allclose(val["images"][1], first["images"].numpy()[1])  # central crop, no distortion


@pytest.mark.slow
def test_top_blocks_change_bn_frozen_loss_down(setup, tmp_path):
    """--trainable-blocks 2: only mixed9/mixed10 weights move, BN statistics never; loss on a fixed batch
    drops; the new model dir records the new fingerprint and skipped the bad image."""
    batch = _fixed_batch(setup)
    before = _mean_loss(FinetuneTrainable(setup["cnn"], load_model_dir(setup["trained"]).model), batch)
    train = phase2_recipe(batch_size=8, steps=8, learning_rate=0.05, eval_every=0, checkpoint_every=100)
    out = tmp_path / "ft2"
    result = finetune(_config(setup, trainable_blocks=2), out, train, log=lambda m: None, progress=False)
    trainable = result.trainable
    assert _mean_loss(trainable, batch) < before - 0.01
    cnn = trainable.cnn
    changed = {}
    for (block, layer, name, moving), old, new in zip(_weights_by_block(cnn), setup["initial"], cnn.weights,
                                                      strict=True):
        diff = not np.array_equal(old, new.numpy())
        changed[(layer, name)] = diff
        if moving or block < 9:
            assert not diff, (layer, name, block)
        elif "kernel" in name:
            assert diff, (layer, name, block)
    assert any(changed.values())
    config = json.loads((out / "config.json").read_text())
    assert config["cnn"]["fingerprint"] == weights_fingerprint(cnn) != config["source_cnn"]["fingerprint"]
    assert config["finetune"]["trainable_blocks"] == 2
    assert config["result"]["images"]["bad_images"] == 1
    assert config["result"]["train_pairs"]["missing_image"] > 0
    assert config["train"]["learning_rate"] == 0.05 and config["train"]["optimizer"] == "sgd"
    assert config["train"]["lr_decay_factor"] == 1.0 and config["train"]["clip_gradients"] == 5.0


def _cli(setup, out, *extra):
    return ["finetune", "--model-dir", setup["trained"], "--images", setup["images"], "--captions",
            setup["captions"], "--out", out, "--batch-size", "8", "--no-progress", *extra]


@pytest.mark.slow
def test_resume_after_kill_and_caption_with_new_cnn(setup, tmp_path):
    """`finetune` killed with SIGKILL mid-run resumes (here in another process layout: in-process, where
    Keras names the layers differently) and finishes; the whole CNN (stem included) changed, BN statistics
    did not; `caption` rebuilds the new CNN from the new model dir and its features differ from the old."""
    from decoder.infer.captioner import Captioner, caption_files

    out = tmp_path / "ft_all"
    args = ["--steps", "4", "--checkpoint-every", "2", "--eval-every", "0", "--learning-rate", "0.05",
            "--precision", "float32"]  # as the in-process resume (auto may pick bfloat16 on this CPU)
    logs = []
    train = phase2_recipe(batch_size=8, steps=4, checkpoint_every=2, eval_every=0, learning_rate=0.05)
    run = kill_and_resume(_cli(setup, out, *args), lambda: 2 in checkpoint_steps(out),
                          lambda: finetune(_config(setup), out, train, log=logs.append, progress=False),
                          inspect=lambda: (out / "cnn.weights.h5").exists())
    assert not run.at_kill  # killed before the end: no fine-tuned CNN yet
    result = run.resumed
    assert result.resumed_from >= 2 and result.step == 4, logs
    assert any("resuming from checkpoint" in line for line in logs)
    config = json.loads((out / "config.json").read_text())
    assert config["result"]["step"] == 4
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))

    cnn = result.trainable.cnn
    assert config["cnn"]["fingerprint"] == weights_fingerprint(cnn) != config["source_cnn"]["fingerprint"]
    for (_, layer, _, moving), old, new in zip(_weights_by_block(cnn), setup["initial"], cnn.weights,
                                               strict=True):
        if moving:
            np.testing.assert_array_equal(old, new.numpy(), err_msg=layer)
    assert not np.array_equal(setup["initial"][0], cnn.weights[0].numpy())  # the stem's first conv
    batch = _fixed_batch(setup, 2)
    with using_precision("float32"):  # as the CNN it is compared with (auto may pick bfloat16 on this CPU)
        captioner = Captioner(out)
        new_features = np.asarray(model_encoder(captioner.loaded)(batch["images"]))  # from out/cnn.weights.h5
        np.testing.assert_allclose(new_features, cnn(batch["images"], training=False), rtol=1e-4, atol=1e-6)
        old_features = np.asarray(setup["cnn"](batch["images"], training=False))
        assert np.abs(new_features - old_features).max() > 1e-3 * np.abs(old_features).max()
        good = sorted(p for p in setup["images"].glob("*.jpg") if str(p) != setup["bad"])[:2]
        assert caption_files(captioner, [str(p) for p in good], progress=False).n_ok == 2


def test_bad_arguments(setup, tmp_path):
    train = phase2_recipe(batch_size=8, steps=1)
    quiet = {"log": lambda m: None, "progress": False}
    no_cnn = tmp_path / "no_cnn"
    shutil.copytree(setup["trained"], no_cnn)
    config = json.loads((no_cnn / "config.json").read_text())
    (no_cnn / "config.json").write_text(json.dumps({**config, "cnn": {}}))
    with pytest.raises(InputError, match="no CNN record"):
        finetune(FinetuneConfig(str(no_cnn), [str(setup["images"])], [str(setup["captions"])]),
                 tmp_path / "o1", train, **quiet)
    with pytest.raises(InputError, match="out of range"):
        finetune(_config(setup, trainable_blocks=12), tmp_path / "o2", train, **quiet)
    with pytest.raises(InputError, match="trained model dir itself"):
        finetune(_config(setup), setup["trained"], train, **quiet)
    with pytest.raises(InputError, match="holds a different run"):
        finetune(_config(setup), no_cnn, train, **quiet)
    wrong = tmp_path / "wrong_fp"
    shutil.copytree(setup["trained"], wrong)
    wrong_cnn = {**config["cnn"], "fingerprint": "feed"}
    (wrong / "config.json").write_text(json.dumps({**config, "cnn": wrong_cnn}))
    with pytest.raises(InputError, match="fingerprint .* records feed"):
        finetune(FinetuneConfig(str(wrong), [str(setup["images"])], [str(setup["captions"])]),
                 tmp_path / "o3", train, **quiet)
    assert not (tmp_path / "o3").exists()
