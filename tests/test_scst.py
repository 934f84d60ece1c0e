"""train-scst: the REINFORCE sign and value, the in-graph sampler, the CIDEr-D reward and its baselines, a
tiny end-to-end run with kill -9 resume, two replicas, and every bad-input case. (CIDEr-D parity with
pycocoevalcap: tests/test_cider.py.)

Tiny sizes: 8-d features, a 16-unit decoder, the learnable data of tests/helpers.py.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from helpers import (
    CNN,
    REPO,
    assert_same_weights,
    checkpoint_steps,
    cli,
    h5_datasets,
    kill_and_resume,
    make_dataset,
    train_tiny_decoder,
    write_store,
)

from base.devices import choose_strategy
from base.errors import InputError
from beam import greedy_search
from beam.graph_sampling import graph_sample_search
from decoder.config import ModelConfig
from decoder.model import build_decoder
from decoder.modeldir import load_model_dir
from decoder.train.config import TrainConfig
from decoder.train.scst import ScstConfig, ScstTrainable, scst_recipe, train_scst
from decoder.train.scst_data import CiderReward
from decoder.train.step import TrainStep
from evaluation.cider import CiderD

START, END = 1, 2  # a toy vocabulary of 6 ids: 0, <S>, </S>, 3, 4, 5
REFS = [[np.array([3])], [np.array([4])], [np.array([5])], [np.array([0])]]  # image i's one reference


def _toy_model(bias=None):
    model = build_decoder(ModelConfig(vocab_size=6, embedding_size=8, lstm_units=8, feature_dim=4), seed=0)
    if bias is not None:
        model.logits.bias.assign(np.log(np.asarray(bias, np.float32)))
    return model


def _sample(model, features, num_samples, max_length, seed=None):
    """beam.graph_sampling over the toy model: (tokens int32 [B*K, L], lengths int32 [B*K])."""
    return graph_sample_search(model.initial_state(features), model.step, start_id=START, end_id=END,
                               num_samples=num_samples, max_length=max_length, seed=seed)


def _log_prob(model, feature, caption) -> float:
    """log p(caption | feature) by the inference path (initial_state + step), caption without <S>."""
    state, prev, total = model.initial_state(feature[None]), START, 0.0
    for word in caption:
        logp, state = model.step(np.array([prev], np.int32), state)
        total, prev = total + float(logp[0, word]), word
    return total


# ---- the REINFORCE step ----------------------------------------------------------------------------------

def test_a_sample_rewarded_above_its_baseline_becomes_more_likely():
    """Image 0's reference is "3": samples holding a 3 earn CIDEr-D > 0, the others 0; with the mean baseline
    their advantage is positive, and one SGD step makes "3 </S>" (and the first word 3) more likely."""
    strategy = choose_strategy()
    with strategy.scope():
        model = _toy_model()
        reward = CiderReward(REFS, END, samples=16, baseline="mean")
        cfg = ScstConfig("-", "-", [], samples=16, max_length=4)
        trainable = ScstTrainable(model, reward, cfg, START, END)
        sgd = TrainConfig(optimizer="sgd", learning_rate=1.0, clip_gradients=0, steps=1)
        step = TrainStep(trainable, sgd, strategy, 0)
    feature = np.array([0.5, -0.2, 0.1, 0.3], np.float32)
    batch = {"features": tf.constant(feature[None]), "image_index": tf.constant([0], tf.int32),
             "global_words": tf.constant(1.0)}
    step.compile({"features": tf.TensorSpec([None, 4], tf.float32),
                  "image_index": tf.TensorSpec([None], tf.int32),
                  "global_words": tf.TensorSpec([], tf.float32)})
    samples, lengths = _sample(model, feature[None], 16, 4, tf.constant([0, 0], tf.int64))
    samples = samples.numpy()
    advantage = CiderReward(REFS, END, 16, "mean").advantages(np.array([0]), samples, np.zeros((1, 0)))
    has_3 = (samples == 3).any(axis=1)
    assert (samples[:, 0] == 3).any() and not has_3.all()  # both kinds drawn (fixed seeds: deterministic)
    assert (advantage[has_3] > 0).all() and (advantage[~has_3] < 0).all()
    before = _log_prob(model, feature, [3, END])
    first_before = float(model.step(np.array([START], np.int32), model.initial_state(feature[None]))[0][0, 3])
    step(batch, tf.constant(0, tf.int64))  # the step's seed is [0, 0]: the same samples as above
    assert _log_prob(model, feature, [3, END]) > before + 0.05
    first_after = float(model.step(np.array([START], np.int32), model.initial_state(feature[None]))[0][0, 3])
    assert first_after > first_before + 0.05


def test_loss_is_minus_advantage_times_log_prob_averaged_over_sampled_words():
    model = _toy_model(bias=[0.1, 0.1, 0.3, 0.2, 0.2, 0.1])
    reward = CiderReward(REFS, END, samples=3, baseline="mean")
    trainable = ScstTrainable(model, reward, ScstConfig("-", "-", [], samples=3, max_length=5), START, END)
    features = np.array([[0.5, -0.2, 0.1, 0.3], [-1.0, 0.4, 0.0, 0.2]], np.float32)
    seed = tf.constant([7, 11], tf.int64)
    batch = {"features": tf.constant(features), "image_index": tf.constant([0, 2], tf.int32),
             "global_words": tf.constant(1.0)}
    loss, words = trainable.loss_sums(batch, True, seed)
    samples, lengths = (t.numpy() for t in _sample(model, features, 3, 5, seed))
    advantage = reward.advantages(np.array([0, 2]), samples, np.zeros((2, 0)))
    assert np.allclose(advantage.reshape(2, 3).sum(1), 0)  # mean baseline: advantages sum to 0 per image
    expected = -sum(a * _log_prob(model, features[i // 3], samples[i, :n])
                    for i, (a, n) in enumerate(zip(advantage, lengths, strict=True))) / lengths.sum()
    assert float(words) == lengths.sum()
    assert float(loss) == pytest.approx(expected, rel=1e-4, abs=1e-6)


# ---- the sampler -------------------------------------------------------------------------------------------

def test_greedy_decoding_matches_the_numpy_greedy_search():
    model = _toy_model(bias=[0.25, 0.01, 0.04, 0.3, 0.2, 0.2])
    features = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    tokens, lengths = (t.numpy() for t in _sample(model, features, 1, 6))
    want = greedy_search(model.initial_state(features), model.step, start_id=START, end_id=END, max_length=6)
    for row, n, caps in zip(tokens, lengths, want, strict=True):
        assert list(row[:n]) == caps[0].tokens[1:]
        assert (row[n:] == END).all()  # </S> fills the rest of a finished caption


def test_samples_follow_the_model_and_the_seed():
    model = _toy_model(bias=[0.1, 0.05, 0.15, 0.4, 0.2, 0.1])
    feature = np.array([[0.5, -0.2, 0.1, 0.3]], np.float32)
    draw = tf.function(lambda seed: _sample(model, feature, 4000, 3, seed)[0])
    first = draw(tf.constant([1, 2], tf.int64)).numpy()[:, 0]
    p = np.exp(model.step(np.array([START], np.int32), model.initial_state(feature))[0].numpy()[0])
    np.testing.assert_allclose(np.bincount(first, minlength=6) / first.size, p, atol=0.03)
    np.testing.assert_array_equal(draw(tf.constant([1, 2], tf.int64)).numpy()[:, 0], first)
    assert (draw(tf.constant([1, 3], tf.int64)).numpy()[:, 0] != first).mean() > 0.3


# ---- the reward --------------------------------------------------------------------------------------------

def test_reward_baselines_df_modes_and_running_means():
    refs = [[np.array([3, 4]), np.array([3])], [np.array([4, 5])], [np.array([5, 0, 3])]]
    samples = np.array([[3, 4, END], [3, END, END], [5, 5, 5], [4, 5, END], [0, END, END], [4, 5, END]])
    index = np.array([0, 1])
    cider = CiderD(refs)
    r = cider.score(np.repeat(index, 3), samples, end_id=END).reshape(2, 3)
    mean = CiderReward(refs, END, 3, "mean")
    np.testing.assert_allclose(mean.advantages(index, samples, np.zeros((2, 0))).reshape(2, 3),
                               r - (r.sum(1, keepdims=True) - r) / 2, rtol=1e-6, atol=1e-6)
    greedy = np.array([[3, END], [5, END]])
    base = cider.score(index, greedy, end_id=END)
    np.testing.assert_allclose(CiderReward(refs, END, 3, "greedy").advantages(index, samples, greedy)
                               .reshape(2, 3), r - base[:, None], rtol=1e-6, atol=1e-6)
    corpus = CiderD([refs[0], refs[1]]).score(np.repeat([0, 1], 3), samples, end_id=END)
    got = CiderReward(refs, END, 3, "mean", df="corpus").scores(np.repeat(index, 3), samples)
    np.testing.assert_allclose(got, corpus)
    assert not np.allclose(corpus, r.ravel())  # the two df modes differ on this set
    means = mean.take_means()
    assert means["avg_reward"] == pytest.approx(r.mean()) and means["avg_baseline"] == pytest.approx(r.mean())
    assert means["avg_sample_length"] == pytest.approx(np.mean([2, 1, 3, 2, 1, 2]))
    assert mean.take_means() == {}  # reset


# ---- the command -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xe(tmp_path_factory):
    """(store, captions, an XE model dir trained briefly from them)."""
    root = tmp_path_factory.mktemp("scst")
    store, captions = make_dataset(root / "d", n_images=30)
    train_tiny_decoder(store, captions, root / "xe", 60, learning_rate=0.01, checkpoint_every=60)
    return store, captions, root / "xe"


def _scst(xe, out, overwrite=False, **kw):
    store, captions, model_dir = xe
    cfg = ScstConfig(str(model_dir), str(store), [str(captions)],
                     **{k: kw.pop(k) for k in ("samples", "baseline", "cider_df", "max_length") if k in kw})
    train = scst_recipe(**{"batch_size": 8, "learning_rate": 1e-3, "eval_every": 0, "checkpoint_every": 5,
                           **kw})
    return train_scst(cfg, out, train, overwrite=overwrite, progress=False, log=lambda m: None)


@pytest.mark.slow
def test_kill9_resume_ends_like_an_uninterrupted_run(tmp_path, xe):
    store, captions, model_dir = xe
    out = tmp_path / "m"
    args = ["train-scst", "--model-dir", model_dir, "--features", store, "--captions", captions,
            "--steps", 120, "--batch-size", 8, "--learning-rate", 1e-3, "--eval-every", 0,
            "--checkpoint-every", 5, "--seed", 3, "--no-progress", "--out", out,
            "--precision", "float32"]  # as the in-process reference (auto may pick bfloat16 on this CPU)
    run = kill_and_resume(args, lambda: checkpoint_steps(out)[-1:] >= [15], lambda: cli(*args),
                          inspect=lambda: checkpoint_steps(out),
                          reference=lambda: _scst(xe, tmp_path / "ref", steps=120, seed=3))
    steps, done = run.at_kill, run.resumed
    assert steps and steps[-1] < 120, "the run finished before it could be killed"
    assert f"resuming from checkpoint at step {steps[-1]}" in done.stderr and "step 120," in done.stdout
    assert "val CIDEr-D (greedy)" in done.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows}) and rows[-1]["step"] == 120
    assert {"val_cider", "val_caption_length", "avg_reward", "avg_baseline"} <= set(rows[-1])
    ref = h5_datasets(tmp_path / "ref" / "decoder.weights.h5")
    start = h5_datasets(model_dir / "decoder.weights.h5")
    assert any(not np.allclose(ref[k], start[k], atol=1e-4) for k in ref)  # SCST changed the decoder
    assert_same_weights(out, tmp_path / "ref")
    loaded = load_model_dir(out)  # a model dir like any other
    assert loaded.config["command"] == "train-scst" and loaded.cnn == load_model_dir(model_dir).cnn


@pytest.mark.slow
def test_rerun_resumes_other_settings_are_refused_and_each_baseline_runs(tmp_path, xe):
    out = tmp_path / "m"
    first = _scst(xe, out, steps=3, baseline="greedy", cider_df="corpus")
    assert first.resumed_from == 0 and np.isfinite(first.val_metrics["val_cider"])
    assert _scst(xe, out, steps=5, baseline="greedy", cider_df="corpus").resumed_from == 3
    with pytest.raises(InputError, match="different configuration: scst"):
        _scst(xe, out, steps=6)  # baseline mean, df train
    with pytest.raises(InputError, match="different configuration: train.learning_rate"):
        _scst(xe, out, steps=6, baseline="greedy", cider_df="corpus", learning_rate=1e-4)
    assert _scst(xe, out, steps=2, samples=2, overwrite=True).resumed_from == 0
    config = json.loads((out / "config.json").read_text())
    assert config["scst"]["baseline"] == "mean" and config["scst"]["samples"] == 2


@pytest.mark.slow
def test_bad_inputs_are_refused_before_any_work(tmp_path, xe):
    store, captions, model_dir = xe
    with pytest.raises(InputError, match="--samples >= 2"):
        _scst(xe, tmp_path / "a", steps=1, samples=1)
    with pytest.raises(InputError, match="model dir itself"):
        _scst(xe, model_dir, steps=1)
    no_vocab = tmp_path / "no_vocab"
    no_vocab.mkdir()
    for name in ("config.json", "decoder.weights.h5"):
        (no_vocab / name).write_bytes((model_dir / name).read_bytes())
    with pytest.raises(InputError, match="word_counts.txt does not exist"):
        _scst((store, captions, no_vocab), tmp_path / "b", steps=1)
    _, captions_no_val = make_dataset(tmp_path / "nv", n_images=30, n_val=0)
    with pytest.raises(InputError, match=r"val split of the caption file\(s\) is empty"):
        _scst((store, captions_no_val, model_dir), tmp_path / "c", steps=1)
    assert not any((tmp_path / d).exists() for d in "abc")


@pytest.mark.slow
def test_cli_bad_input_is_one_sentence_exit_2(tmp_path, xe):
    store, captions, model_dir = xe
    other = write_store(tmp_path / "other.h5", ["img_000.jpg"], np.zeros((1, 8)),
                        cnn={**CNN, "fingerprint": "0ther"})
    base = ["train-scst", "--model-dir", model_dir, "--captions", captions, "--out", tmp_path / "m",
            "--steps", 1]
    out = cli(*base, "--features", other, check=False)
    lines = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert out.returncode == 2 and len(lines) == 1 and "fingerprint" in lines[0], out.stderr
    for bad in (["--samples", 0], ["--samples", 1], ["--learning-rate", "nan"], ["--max-length", 1],
                ["--baseline", "best"]):
        out = cli(*base, "--features", store, *bad, check=False)
        assert out.returncode == 2 and bad[0] in out.stderr, (bad, out.stderr)
    assert not (tmp_path / "m").exists()


MIRRORED = """
import json, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from decoder.train.scst import ScstConfig, scst_recipe, train_scst
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
r = train_scst(ScstConfig({model_dir!r}, {store!r}, [{captions!r}], samples=3), {out!r},
               scst_recipe(batch_size=8, steps=6, learning_rate=1e-3, eval_every=3), strategy=strategy,
               progress=False, log=lambda m: None)
m = r.trainable.decoder
diff = max(float(tf.reduce_max(tf.abs(v.value.values[0] - v.value.values[1]))) for v in m.weights)
print(json.dumps({{"replicas": strategy.num_replicas_in_sync, "diff": diff, "step": r.step,
                   "cider": r.val_metrics["val_cider"]}}))
"""


@pytest.mark.slow
def test_mirrored_two_cpu_replicas_train_and_agree(tmp_path, xe):
    store, captions, model_dir = xe
    code = MIRRORED.format(repo=str(REPO), tests=str(REPO / "tests"), store=str(store),
                           captions=str(captions), model_dir=str(model_dir), out=str(tmp_path / "m"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert {k: report[k] for k in ("replicas", "diff", "step")} == {"replicas": 2, "diff": 0.0, "step": 6}
    assert np.isfinite(report["cider"])
    start = h5_datasets(model_dir / "decoder.weights.h5")
    trained = h5_datasets(tmp_path / "m" / "decoder.weights.h5")
    assert any(not np.allclose(v, start[k]) for k, v in trained.items())
