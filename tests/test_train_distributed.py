"""tf.distribute on CPU: MirroredStrategy over 2 logical CPUs, MultiWorkerMirroredStrategy with 2 local
workers (TF_CONFIG on 127.0.0.1). Both run in subprocesses (devices/cluster must be set before TF starts)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, TINY, h5_datasets, make_dataset

pytestmark = pytest.mark.slow  # both tests train in subprocesses

MIRRORED = """
import json, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from decoder.train.config import TrainConfig
from decoder.train.train_decoder import DataConfig, train_decoder
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
r = train_decoder(DataConfig({store!r}, [{captions!r}], min_word_count=1), {model_dir!r},
                  TrainConfig(batch_size=8, steps=30, eval_every=0, checkpoint_every=10, optimizer="adam",
                              learning_rate=0.02),
                  embedding_size=16, lstm_units=16, progress=False, strategy=strategy, log=lambda m: None)
m = r.trainable.decoder
diff = max(float(tf.reduce_max(tf.abs(v.value.values[0] - v.value.values[1]))) for v in m.weights)
print(json.dumps({{"replicas": strategy.num_replicas_in_sync, "diff": diff, "step": r.step}}))
"""


def _metrics(model_dir):
    return [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]


def test_mirrored_two_cpu_replicas_train_and_agree(tmp_path):
    store, captions = make_dataset(tmp_path / "d")
    code = MIRRORED.format(repo=str(REPO), tests=str(REPO / "tests"), store=str(store),
                           captions=str(captions),
                           model_dir=str(tmp_path / "m"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"replicas": 2, "diff": 0.0, "step": 30}
    rows = _metrics(tmp_path / "m")
    assert rows[-1]["val_perplexity"] < 0.8 * rows[0]["val_perplexity"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multi_worker_two_processes_train_and_agree(tmp_path):
    store, captions = make_dataset(tmp_path / "d")
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    model_dir = tmp_path / "m"
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster,
                                                      "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen(
            [sys.executable, str(REPO / "cli.py"), "train-decoder", "--features", str(store), "--captions",
             str(captions), "--model-dir", str(model_dir), "--steps", "20", "--eval-every", "0",
             "--optimizer", "adam", "--learning-rate", "0.02", *TINY],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=False):
        assert p.returncode == 0, err[-3000:]
    assert "2 replica(s)" in outs[0][1]
    chief, worker = h5_datasets(model_dir / "decoder.weights.h5"), h5_datasets(model_dir / "worker-1" /
                                                                          "decoder.weights.h5")
    assert chief.keys() == worker.keys()
    for name in chief:
        np.testing.assert_array_equal(chief[name], worker[name], err_msg=name)
    rows = _metrics(model_dir)
    assert rows[-1]["step"] == 20 and rows[-1]["val_perplexity"] < 0.8 * rows[0]["val_perplexity"]
