"""A real `kill -9` of a running `python cli.py extract`, then a rerun: same bytes as an uninterrupted run."""

import os

import h5py
import pytest
from helpers import kill_and_resume, make_good_images

from data.features import open_store
from extract.run import ExtractConfig, run_extract

N, BATCH = 24, 2


def _rows_done(path) -> int:
    """rows_done of a store another process is writing (-1 while it cannot be read yet)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f.attrs["rows_done"])
    except (OSError, KeyError):
        return -1


def _state_at_kill(out) -> int:
    """rows_done of the killed run's store, checked readable, not corrupt, not complete."""
    with open_store(out, require_complete=False) as part:
        assert not part.complete and BATCH <= part.rows_done < N and part.rows_done % BATCH == 0
        return part.rows_done


@pytest.mark.slow
def test_kill9_mid_run_then_rerun_equals_uninterrupted_run(tmp_path, repo_root):
    images = tmp_path / "imgs"
    make_good_images(images, n=N, size=(60, 50))
    out = tmp_path / "f.h5"
    args = ["extract", images, "--out", out, "--cnn-weights", "none", "--image-size", "75",
            "--batch-size", BATCH, "--dtype", "float32", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(repo_root), TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    cfg = ExtractConfig(out=str(out), paths=[str(images)], cnn_weights="none", image_size=75,
                        batch_size=BATCH, dtype="float32", progress=False)
    run = kill_and_resume(args, lambda: out.exists() and _rows_done(out) >= 2 * BATCH,
                          lambda: run_extract(cfg), inspect=lambda: _state_at_kill(out),
                          reference=lambda: run_extract(ExtractConfig(**{**cfg.__dict__,
                                                                         "out": str(tmp_path / "ref.h5")})),
                          cwd=tmp_path, env=env)
    done_before, resumed = run.at_kill, run.resumed
    assert resumed.skipped == done_before and resumed.done_now == N - done_before
    assert run.reference.done_now == N
    with open_store(out) as a, open_store(tmp_path / "ref.h5") as b:
        assert a.keys == b.keys and a.ok.all() and b.ok.all()
        assert a.read_features().tobytes() == b.read_features().tobytes()
        assert a.attrs["run"] == b.attrs["run"] and a.attrs["n_failed"] == 0
    with h5py.File(out, "r") as f:  # the resumed store carries (valid) chunk checksums
        assert all(f[name].fletcher32 for name in ("features", "ok", "errors"))
