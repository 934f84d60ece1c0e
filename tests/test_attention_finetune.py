"""finetune of an attention model dir (issue 18): the InceptionV3 reattached up to Mixed_7c (`mixed10`) and
trained end-to-end with the attend decoder from images, through the shared loop; the result is an attend model
dir that `caption` reads with its new CNN, and a run killed with SIGKILL resumes to the uninterrupted weights.

Tiny sizes: 40 synthetic shapes at 160 px (a 3x3 grid), a seeded random CNN, a 16-unit attend decoder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from attend_data import SIZE, shapes_with_grid, train_tiny_attend
from helpers import assert_same_weights, checkpoint_steps, h5_datasets, kill_and_resume

from base.devices import using_precision
from base.errors import InputError
from decoder.modeldir import load_model_dir
from decoder.train.cnn_blocks import block_of_layers
from decoder.train.finetune import FinetuneConfig, finetune, phase2_recipe
from extract.encoder import build_encoder, weights_fingerprint

STEPS, EVERY, BATCH, LR, VAL = 4, 2, 4, 0.05, 4  # the finetune run, in-process and on the command line


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def attend_model(tmp_path_factory):
    """(shapes root, captions.json, an attend model dir): 40 shapes at 160 px, `extract --grid` with a
    seeded random CNN, then `train-decoder --arch attend` (tiny sizes, standardised grid cells, 40 steps)."""
    root = tmp_path_factory.mktemp("attend_ft")
    captions, store = shapes_with_grid(root)
    train_tiny_attend(store, captions, root / "model", 40)
    return root, captions, root / "model"


def _config(setup, **kw) -> FinetuneConfig:
    root, captions, model = setup
    return FinetuneConfig(model_dir=str(model), images=[str(root / "images")], captions=[str(captions)],
                          trainable_blocks=1, **kw)


def _recipe():
    return phase2_recipe(batch_size=BATCH, steps=STEPS, checkpoint_every=EVERY, eval_every=0,
                         learning_rate=LR, max_val_pairs=VAL, precision="float32")


@pytest.fixture(scope="module")
def finetuned(attend_model, tmp_path_factory):
    """(out dir, TrainResult, the source CNN up to Mixed_7c) of an uninterrupted `finetune
    --trainable-blocks 1` of the attend model dir."""
    out = tmp_path_factory.mktemp("attend_ft_out") / "ft"
    result = finetune(_config(attend_model), out, _recipe(), log=_quiet, progress=False)
    source = load_model_dir(attend_model[2])
    return out, result, build_encoder(source.cnn, grid=True)


@pytest.mark.slow
def test_attend_finetune_trains_mixed10_keeps_grid_and_captions(attend_model, finetuned):
    """--trainable-blocks 1: only mixed10's weights move (BN statistics never); the new model dir records arch
    attend, the same 3x3 grid, the new fingerprint and the source's feature standardisation; `caption`
    rebuilds the fine-tuned CNN up to Mixed_7c from it and captions images."""
    from decoder.infer.captioner import Captioner, caption_files
    from decoder.infer.features import model_encoder

    root, _, model = attend_model
    out, result, old_cnn = finetuned
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "attend" and config["command"] == "finetune" and result.step == STEPS
    assert config["model"]["grid_shape"] == [3, 3] and config["finetune"]["trainable_blocks"] == 1
    cnn = result.trainable.cnn
    assert cnn.layers[-1].name == "mixed10" and tuple(cnn.output.shape) == (None, 3, 3, 2048)
    assert config["cnn"]["fingerprint"] == weights_fingerprint(cnn) != config["source_cnn"]["fingerprint"]
    for layer, old_layer, block in zip(cnn.layers, old_cnn.layers, block_of_layers(cnn), strict=True):
        for new, old in zip(layer.weights, old_layer.weights, strict=True):
            moved = not np.array_equal(new.numpy(), old.numpy())
            if block < 10 or "moving" in new.name:
                assert not moved, (layer.name, new.name)
            elif "kernel" in new.name:
                assert moved, (layer.name, new.name)
    source = load_model_dir(model).model
    decoder = result.trainable.decoder
    for name in ("feature_mean", "feature_inv_std"):  # the grid standardisation of train-decoder, kept
        kept, start = getattr(decoder, name).numpy(), getattr(source, name).numpy()
        np.testing.assert_array_equal(kept, start)
        assert np.abs(kept - (0.0 if name == "feature_mean" else 1.0)).max() > 1e-3  # really standardised
    assert not np.array_equal(decoder.encode.kernel.numpy(), source.encode.kernel.numpy())

    files = sorted((root / "images").glob("*.jpg"))[:2]
    with using_precision("float32"):
        captioner = Captioner(out)
        assert captioner.grid == (3, 3)
        run = caption_files(captioner, [str(f) for f in files], progress=False)
        assert run.n_ok == 2 and all(item.attention is not None for item in run.results)
        images = np.random.default_rng(0).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
        cells = np.asarray(model_encoder(captioner.loaded)(images))  # from out/cnn.weights.h5
        assert cells.shape == (2, 9, 2048)
        np.testing.assert_allclose(cells, result.trainable.features(images), rtol=1e-4, atol=1e-5)
        old = np.asarray(old_cnn(images)).reshape(2, 9, 2048)
        assert np.abs(cells - old).max() > 1e-3 * np.abs(old).max()


@pytest.mark.slow
def test_attend_finetune_refuses_another_grid(attend_model, tmp_path):
    """An --image-size whose Mixed_7c grid is not the model's 3x3 is one sentence, before any work."""
    with pytest.raises(InputError, match=r"--image-size 96 gives a 1x1 Mixed_7c grid .* reads 3x3 grids"):
        finetune(_config(attend_model, image_size=96), tmp_path / "x", _recipe(), log=_quiet, progress=False)
    assert not (tmp_path / "x" / "config.json").exists()


@pytest.mark.slow
def test_attend_finetune_resumes_exactly_after_kill(attend_model, finetuned, tmp_path):
    """`finetune` of an attend model dir killed with SIGKILL after its step-2 checkpoint, then rerun
    (in-process: another process layout), ends with the uninterrupted run's decoder and CNN weights."""
    root, captions, model = attend_model
    out, logs = tmp_path / "killed", []
    argv = ["finetune", "--model-dir", model, "--images", root / "images", "--captions", captions,
            "--out", out, "--trainable-blocks", "1", "--batch-size", BATCH, "--steps", STEPS,
            "--checkpoint-every", EVERY, "--eval-every", "0", "--learning-rate", LR, "--max-val-pairs", VAL,
            "--precision", "float32", "--no-progress"]
    run = kill_and_resume(argv, lambda: EVERY in checkpoint_steps(out),
                          lambda: finetune(_config(attend_model), out, _recipe(), log=logs.append,
                                           progress=False),
                          inspect=lambda: (out / "cnn.weights.h5").exists())
    assert not run.at_kill  # killed before the end: no fine-tuned CNN yet
    assert run.resumed.resumed_from >= EVERY and run.resumed.step == STEPS, logs
    assert any("resuming from checkpoint" in line for line in logs)
    straight = finetuned[0]
    assert json.loads((out / "config.json").read_text())["arch"] == "attend"
    assert_same_weights(out, straight, atol=1e-5)
    got, want = h5_datasets(out / "cnn.weights.h5"), h5_datasets(straight / "cnn.weights.h5")
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)
