"""Exported SavedModels, run in a Python that cannot import this project (the export tests: test_export,
test_attention_export): `run_saved_models`."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

from helpers import REPO

PROJECT_PACKAGES = ("base", "beam", "cli", "data", "decoder", "evaluation", "extract")
SAVED_MODEL_CHILD = r'''
import json, sys
site_dirs, project, jobs = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.load(open(sys.argv[3]))
sys.path.extend(site_dirs)  # plain folders: their .pth files (the editable install's finder) never run
for name in project:
    try:
        __import__(name)
    except ModuleNotFoundError:
        continue
    raise AssertionError(f"{name} is importable: the exported model must be run without the project")
import numpy as np
import tensorflow as tf

out, models = {"results": []}, {}
for job in jobs:
    if job["model"] not in models:
        models[job["model"]] = tf.saved_model.load(job["model"])
    model = models[job["model"]]
    if "images" in job:
        data = tf.constant([open(p, "rb").read() for p in job["images"]], tf.string)
        got = model.signatures["serving_default"](images=data)
    else:
        got = model.signatures["caption_features"](features=tf.constant(np.load(job["features"])))
    result = {"captions": [[c.decode() for c in row] for row in got["captions"].numpy()],
              "log_probs": got["log_probs"].numpy().tolist(), "ok": got["ok"].numpy().tolist()}
    if "attention" in got:  # attention exports: float32 [N, T, L - 1, cells]
        result["attention"] = got["attention"].numpy().tolist()
    out["results"].append(result)
out["project_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in project)
print(json.dumps(out))
'''


def run_saved_models(tmp_path: Path, jobs: list[dict]) -> list[dict]:
    """Run exported SavedModels in a fresh Python that cannot import this project; one result per job.

    jobs: {"model": SavedModel dir, "images": [file paths]} (serving_default) or {"model", "features": a .npy
    of float32 [N, D] or grids [N, h, w, D]} (caption_features). Result: {"captions" [N][T] str, "log_probs"
    [N][T] float, "ok" [N] bool, and "attention" [N][T][L-1][cells] float for attention exports}.
    The child is `python -I -S -c` with cwd = tmp_path: -I drops the cwd, PYTHONPATH and the user site from
    sys.path; -S skips `site`, so no .pth file runs, and the editable install's finder (a .pth in the venv's
    site-packages that maps the project's packages to the repo even under -I) is never installed. The child
    then appends the venv's site-packages as plain folders (TensorFlow, NumPy) and first checks that every
    project package fails with ModuleNotFoundError (a non-editable install of the project would fail it)."""
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    site_dirs = [d for d in site.getsitepackages() if Path(d).resolve() != REPO]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", SAVED_MODEL_CHILD, json.dumps(site_dirs),
                           json.dumps(PROJECT_PACKAGES), "jobs.json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["project_modules"] == []
    return out["results"]
