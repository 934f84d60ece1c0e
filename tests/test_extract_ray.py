"""`extract --engine ray` on a local 2-worker Ray (75 px, --cnn-weights none): the same store as the local
engine, one part store per input shard, resume skipping complete parts, a damaged shard recorded, a
killed CNN actor retried by Ray with the same final store, and --grid (160 px) equal to the local grid
store."""

import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from helpers import REPO, cli, descendants, image_shards, make_good_images, process_title

from data.features import open_store

pytest.importorskip("ray")
pytestmark = pytest.mark.slow
COMMON = ["--cnn-weights", "none", "--image-size", "75", "--batch-size", "2", "--dtype", "float32",
          "--no-progress"]


def _store(path):
    with open_store(path) as s:
        return s.keys, list(s.ok), s.errors, s.read_features(), s.attrs["run"]


def _assert_same(a, b):
    assert a[0] == b[0] and a[1] == b[1] and a[2] == b[2] and a[4] == b[4]
    np.testing.assert_array_equal(a[3], b[3])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 shards of 3 images + 00003.tar cut off in its second sample's image; the local engine's store."""
    root = tmp_path_factory.mktemp("ray")
    imgs = make_good_images(root / "img", n=11, size=(80, 76))
    image_shards(root / "s", imgs, 3)
    last = root / "s" / "00003.tar"
    with tarfile.open(last) as tar:
        cut = tar.getmember("000000010.jpg").offset_data + 100
    last.write_bytes(last.read_bytes()[:cut])
    pattern = str(root / "s" / "{00000..00003}.tar")
    cli("extract", pattern, "--out", root / "local.h5", *COMMON)
    return root, pattern


def test_ray_engine_equals_local_and_resumes_by_part(shards):
    root, pattern = shards
    out = root / "ray.h5"
    proc = cli("extract", pattern, "--out", out, *COMMON, "--engine", "ray", "--workers", "2", timeout=600)
    assert "damaged shard" in proc.stderr and "00003.tar" in proc.stderr
    local = _store(root / "local.h5")
    _assert_same(_store(out), local)
    assert local[0][-2:] == ["00003/000000009", "00003/000000010"] and local[1][-2:] == [True, False]
    assert local[2][-1].startswith("truncated")  # the cut sample is a failed row, the one before it is kept
    parts = sorted(p.name for p in (root / "ray.h5.parts").iterdir())
    assert parts == ["00000.h5", "00001.h5", "00002.h5", "00003.h5"]
    again = cli("extract", pattern, "--out", out, *COMMON, "--engine", "ray")
    assert "skipped 11 (already in file)" in again.stdout
    out.unlink()
    (root / "ray.h5.parts" / "00001.h5").unlink()
    resumed = cli("extract", pattern, "--out", out, *COMMON, "--engine", "ray", "--workers", "2", timeout=600)
    assert "4 shards, 3 already done" in resumed.stderr and "done 3 | skipped 8" in resumed.stdout
    _assert_same(_store(out), local)


def test_killed_actor_is_retried_and_the_store_is_unchanged(shards, tmp_path):
    root, _ = shards
    imgs = make_good_images(tmp_path / "img", n=24, size=(80, 76))
    image_shards(tmp_path / "s", imgs, 4)
    pattern = str(tmp_path / "s" / "*.tar")
    argv = ["extract", pattern, "--out", tmp_path / "ray.h5", *COMMON, "--engine", "ray", "--workers", "2"]
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), *map(str, argv)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed, deadline = None, time.monotonic() + 300
    try:
        while proc.poll() is None and killed is None and time.monotonic() < deadline:
            actors = [p for p in descendants(proc.pid) if "ShardEncoder" in process_title(p)]
            if actors and (tmp_path / "ray.h5.parts").is_dir():  # a part written: the actors are working
                os.kill(actors[0], signal.SIGKILL)
                killed = actors[0]
            time.sleep(0.05)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed is not None, f"no actor was killed mid-run:\n{output[-2000:]}"
    assert proc.returncode == 0, output[-3000:]
    assert len(list((tmp_path / "ray.h5.parts").iterdir())) == 6
    cli("extract", pattern, "--out", tmp_path / "local.h5", *COMMON)
    _assert_same(_store(tmp_path / "ray.h5"), _store(tmp_path / "local.h5"))


def _grid_store(path):
    with open_store(path) as s:
        return s.keys, list(s.ok), s.errors, s.read_features(), s.read_grid(), s.attrs["grid_shape"], s.dtype


def test_ray_grid_equals_local_grid_and_refuses_mixing(shards):
    root, pattern = shards
    grid = [*COMMON, "--image-size", "160", "--grid"]  # the last --image-size wins: 3x3 grids
    cli("extract", pattern, "--out", root / "local_grid.h5", *grid)
    out = root / "ray_grid.h5"
    cli("extract", pattern, "--out", out, *grid, "--engine", "ray", "--workers", "1", timeout=600)
    local, ray = _grid_store(root / "local_grid.h5"), _grid_store(out)
    assert ray[:3] == local[:3] and ray[5:] == local[5:] == ([3, 3], np.dtype("float32"))
    np.testing.assert_array_equal(ray[3], local[3])
    np.testing.assert_array_equal(ray[4], local[4])
    np.testing.assert_array_equal(ray[3], ray[4].mean(axis=(1, 2)))  # pooled = the grid's mean (float32)
    with open_store(root / "ray_grid.h5.parts" / "00000.h5") as part:
        assert part.grid_shape == (3, 3) and part.attrs["grid_shape"] == [3, 3]
        np.testing.assert_array_equal(part.read_grid(), local[4][:3])
    for refused in (out, root / "ray_grid.h5.parts" / "00000.h5"):  # the final store, then (out gone) a part
        proc = cli("extract", pattern, "--out", out, *COMMON, "--image-size", "160", "--engine", "ray",
                   check=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode != 0 and str(refused) in last and "--grid (the file holds grid)" in last
        assert "Traceback" not in proc.stderr
        out.unlink(missing_ok=True)
