"""Issue 22 (items 1-5, 10): a command never destroys what the user has (base/outputs.py), a full or read-only
disk gives one `Error:` line and keeps the last good state, and the noise items (Ctrl-C, file checks before
TensorFlow, a file given as a model dir, a file name holding a newline, merge-features' start-up lines)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import (
    CNN,
    REPO,
    TINY,
    checkpoint_steps,
    coco_ramp_images,
    make_dataset,
    tiny_caption_model,
    train_tiny_decoder,
    write_store,
)

import base.atomic
from base import outputs
from base.errors import InputError, write_failure
from cli import main

QUIET_ENV = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user runs it


def run(*args):
    """(exit code, output) of `cli.py *args` in this process."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def snapshot(folder) -> dict:
    """{relative path: bytes (files) or None (folders)} of everything under `folder`."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes()
            for p in sorted(folder.rglob("*"))}


def fake_model(folder, command="train-decoder"):
    """A folder that looks like a model dir written by `command` (enough for the output checks)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"format": "showtell-model", "version": 1,
                                                    "command": command}))
    (folder / "decoder.weights.h5").write_bytes(b"weights")
    (folder / "word_counts.txt").write_text("a 3\n")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "best.npz").write_bytes(b"best")
    return folder


def fake_export(folder, marker=True):
    """A folder laid out as a SavedModel export of ours (with the marker, or an older one without)."""
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"...caption_features...")
    if marker:
        (folder / "assets.extra").mkdir()
        (folder / "assets.extra" / "showtell-export.json").write_text("{}")
    return folder


def refused(code, out, *words):
    """Exit status 2 and one `Error:` line (the last; a line like export's "precision: ..." may precede)."""
    last = out.rstrip("\n").split("\n")[-1]
    assert code == 2 and last.startswith("Error: ") and out.count("Error") == 1, out
    assert "Traceback" not in out, out
    for word in words:
        assert word in out, out


class TestOutputsNeverEatInputs:
    """Items 1 and 3: no output is, contains or sits inside an input; no two outputs collide."""

    def test_export_out_is_the_model_dir_or_its_parent(self, tmp_path):
        model = fake_model(tmp_path / "runs" / "coco")
        (tmp_path / "runs" / "notes.txt").write_text("mine")
        (tmp_path / "link").symlink_to(model)
        before = snapshot(tmp_path)
        ex = ["export", "--model-dir", model, "--out"]
        refused(*run(*ex, model, "--overwrite"), "is the input --model-dir")
        refused(*run(*ex, model.parent, "--overwrite"), "contains the input")
        refused(*run(*ex, model / "checkpoints" / "1"), "sits inside")
        refused(*run(*ex, tmp_path / "link", "--overwrite"), "is the input")
        assert snapshot(tmp_path) == before

    def test_evaluate_and_caption_outputs_are_not_inputs(self, tmp_path):
        model = fake_model(tmp_path / "m")
        caps = tmp_path / "caps.json"
        caps.write_text('{"images": [], "annotations": []}')
        store = write_store(tmp_path / "f.h5", ["a.jpg"], np.ones((1, 4)))
        image = tmp_path / "a.jpg"
        image.write_bytes(b"jpeg")
        before = snapshot(tmp_path)
        ev = ["evaluate", "--model-dir", model, "--features", store, "--captions", caps]
        refused(*run(*ev, "--results", caps), "--results", "is the input --captions")
        refused(*run(*ev, "--results", tmp_path / "x.json", "--metrics", tmp_path / "x.json"), "collide")
        refused(*run(*ev, "--metrics", model / "config.json"), "is the input --model-dir")
        refused(*run(*ev, "--report", store), "is the input --features")
        refused(*run(*ev, "--out-dir", model / "checkpoints"), "sits inside")
        refused(*run("caption", "--model-dir", model, image, "--json", image), "is the input PATHS")
        refused(*run("caption", "--model-dir", model, "--features", store, "--json", store), "--json")
        refused(*run("caption", "--model-dir", model, image, "--json", model / "word_counts.txt"), "--json")
        hard = tmp_path / "hard.json"
        os.link(caps, hard)  # a hard link is the same file
        refused(*run(*ev, "--results", hard), "is the input --captions")
        hard.unlink()
        assert snapshot(tmp_path) == before

    def test_training_outputs_are_not_inputs(self, tmp_path):
        store, captions = make_dataset(tmp_path / "d")
        model = fake_model(tmp_path / "runs" / "xe")
        before = snapshot(tmp_path)
        refused(*run("train-decoder", "--features", store, "--captions", captions, "--model-dir",
                     tmp_path / "d", "--overwrite"), "contains the input --features")
        for command in ("train-scst", "finetune"):
            extra = ["--features", store] if command == "train-scst" else ["--images", tmp_path / "d"]
            for out in (model, model.parent):
                refused(*run(command, "--model-dir", model, *extra, "--captions", captions, "--out", out,
                             "--overwrite"), "--out")
        assert snapshot(tmp_path) == before


class TestNeverReplaceForeign:
    """Item 2 and --overwrite: an existing output is replaced only when showtell wrote it, of that kind."""

    def test_merge_out_is_never_a_foreign_file_nor_a_store_without_overwrite(self, tmp_path):
        shards = [write_store(tmp_path / f"s{k}.h5", ["a.jpg"], np.ones((1, 4))) for k in range(2)]
        text = tmp_path / "features.h5"
        text.write_text("my notes\n")
        refused(*run("merge-features", *shards, "--out", text, "--overwrite"), "is not a feature store")
        assert text.read_text() == "my notes\n"
        other = tmp_path / "other.h5"
        with h5py.File(other, "w") as f:
            f.attrs["format"] = "someone-else"
        refused(*run("merge-features", *shards, "--out", other, "--overwrite"), "is not a feature store")
        store = write_store(tmp_path / "complete.h5", ["a.jpg", "b.jpg"], np.ones((2, 4)))
        before = store.read_bytes()
        refused(*run("merge-features", *shards, "--out", store), "already holds a feature store",
                "--overwrite")
        assert store.read_bytes() == before
        notes = outputs.check_command("merge-features", {"shards": shards, "out": store, "overwrite": True})
        assert notes == [f"replacing {store} (a feature store written by showtell)"]

    def test_export_overwrite_replaces_only_an_export(self, tmp_path):
        model = fake_model(tmp_path / "m")
        mine = tmp_path / "serving"
        mine.mkdir()
        (mine / "photo.jpg").write_bytes(b"x")
        refused(*run("export", "--model-dir", model, "--out", mine, "--overwrite"), "not a showtell export")
        assert (mine / "photo.jpg").read_bytes() == b"x"
        for marker in (True, False):  # with the marker, and an export written before the marker existed
            old = fake_export(tmp_path / f"exported-{marker}", marker=marker)
            refused(*run("export", "--model-dir", model, "--out", old), "not empty", "--overwrite")
            params = {"model_dir": model, "out": old, "overwrite": True}
            assert outputs.check_command("export", params) == [
                f"replacing {old} (a SavedModel export written by showtell)"]
        foreign = fake_export(tmp_path / "theirs", marker=False)
        (foreign / "saved_model.pb").write_bytes(b"another model")
        refused(*run("export", "--model-dir", model, "--out", foreign, "--overwrite"), "not a showtell")

    def test_model_dirs_are_replaced_only_by_the_same_command(self, tmp_path):
        from decoder.modeldir import prepare_run_dir

        store, captions = make_dataset(tmp_path / "d")
        td = ["train-decoder", "--features", store, "--captions", captions, "--model-dir"]
        foreign = tmp_path / "project"
        (foreign / "checkpoints").mkdir(parents=True)
        (foreign / "checkpoints" / "mine.txt").write_text("x")
        refused(*run(*td, foreign, "--overwrite"), "showtell did not write")
        prepare_run_dir(foreign, {"command": "train-decoder"}, (), True, "--model-dir")  # Python callers too
        assert (foreign / "checkpoints" / "mine.txt").read_text() == "x"
        tuned = fake_model(tmp_path / "tuned", command="finetune")
        before = snapshot(tuned)
        refused(*run(*td, tuned, "--overwrite"), "written by `finetune`, not by `train-decoder`")
        with pytest.raises(InputError, match="--overwrite never replaces it"):
            prepare_run_dir(tuned, {"command": "train-decoder"}, (), True, "--model-dir")
        assert snapshot(tuned) == before
        xe = fake_model(tmp_path / "xe")
        params = {"features": store, "captions": [captions], "model_dir": xe, "overwrite": True}
        assert outputs.check_command("train-decoder", params) == [
            f"replacing {xe} (a model dir of `train-decoder`)"]

    def test_result_files_are_replaced_only_when_ours(self, tmp_path):
        from evaluation.metrics import MetricsResult, write_metrics_json, write_results_json
        from evaluation.report import write_report

        model = fake_model(tmp_path / "m")
        store = write_store(tmp_path / "f.h5", ["a.jpg"], np.ones((1, 4)))
        caps = tmp_path / "caps.json"
        caps.write_text("{}")
        ev = ["evaluate", "--model-dir", model, "--features", store, "--captions", caps]
        foreign = tmp_path / "theirs.json"
        foreign.write_text('{"images": []}')
        page = tmp_path / "index.html"
        page.write_text("<html>my page</html>")
        for option, path in (("--results", foreign), ("--metrics", foreign), ("--report", page),
                             ("--results", tmp_path)):
            refused(*run(*ev, option, path), option)
        assert foreign.read_text() == '{"images": []}' and page.read_text() == "<html>my page</html>"
        metrics = MetricsResult(corpus={"CIDEr": 1.0}, per_image={1: {"CIDEr": 1.0}}, tokenizer="fallback")
        item = [{"image_id": 1, "caption": "a dog"}]
        ours = {"results": write_results_json(tmp_path / "r.json", item),
                "metrics": write_metrics_json(tmp_path / "mx.json", metrics),
                "report": write_report(tmp_path / "r.html", item, metrics).path}
        params = {"model_dir": model, "features": store, "captions": [caps], "out_dir": None, **ours}
        assert len(outputs.check_command("evaluate", params)) == 3
        refused(*run("caption", "--model-dir", model, "--features", store, "--json", foreign), "--json")

    def test_recognisers_follow_the_writers(self):
        from data.features import FORMAT_NAME as STORE
        from decoder.modeldir import FORMAT_NAME as MODEL
        from evaluation.metrics import METRICS_FORMAT

        assert (outputs.STORE_FORMAT, outputs.MODEL_FORMAT, outputs.METRICS_FORMAT) == (STORE, MODEL,
                                                                                       METRICS_FORMAT)


class TestDemoWorkdir:
    """Item 4: `demo --fresh` removes only what a demo wrote; a folder that never held a demo is refused."""

    def test_fresh_in_a_folder_that_never_held_a_demo(self, tmp_path):
        project = tmp_path / "myproject"
        for name in ("model/a.txt", "eval/b.txt", "features.h5", "report.html", "notes.txt"):
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            (project / name).write_text(name)
        before = snapshot(project)
        refused(*run("demo", "--workdir", project, "--fresh"), "never held a demo")
        refused(*run("demo", "--workdir", project), "never held a demo")
        assert snapshot(project) == before
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("x")
        refused(*run("demo", "--workdir", tmp_path / "other", "--fresh"), "drop --fresh")
        refused(*run("demo", "--workdir", project / "notes.txt"), "is a file")
        (project / "demo.json").write_text(json.dumps({"n_images": 1, "steps": 1, "scst_steps": 1}))
        assert outputs.check_command("demo", {"workdir": project, "fresh": True}) == []


class FakeVar:
    def __init__(self, path, value):
        self.path, self.value = path, np.asarray(value, np.float32)

    def numpy(self):
        return self.value


class FakeModel:
    def __init__(self, value):
        self.weights = [FakeVar("w", [value, value])]


def full_disk(match: str):
    """A base.atomic.fsync_path that fails with ENOSPC for file names containing `match`."""
    real = base.atomic.fsync_path

    def fsync(path):
        if match in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path)

    return fsync


class TestWritesThatFail:
    """Item 5: a full or read-only disk is one `Error:` line, exit 1, and the last good state is kept."""

    @pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES])
    def test_one_line_for_each_errno(self, code):
        message = write_failure(OSError(code, os.strerror(code), "/x/ckpt-4.npz"))
        assert message and "\n" not in message and "/x/ckpt-4.npz" in message and "rerun" in message
        assert write_failure(OSError(errno.ENOENT, "no such file")) is None
        assert write_failure(ValueError("No space left on device")) is None

    def test_a_failed_checkpoint_never_replaces_the_last_good_one(self, tmp_path, monkeypatch):
        from decoder.train.checkpoints import CheckpointManager, read_checkpoint

        manager = CheckpointManager(tmp_path, log=lambda m: None)
        manager.save({"m": FakeModel(1.0)}, [], {"step": 1}, best=True)
        monkeypatch.setattr(base.atomic, "fsync_path", full_disk("best.npz"))
        with pytest.raises(OSError) as err:
            manager.save({"m": FakeModel(2.0)}, [], {"step": 2}, best=True)
        assert write_failure(err.value).startswith("a write failed: the disk is full")
        assert read_checkpoint(tmp_path / "best.npz")["m/w"][0] == 1.0  # the old best is whole
        assert not list(tmp_path.glob("*.tmp-*"))

    @pytest.mark.slow
    def test_train_decoder_on_a_full_disk_then_resumes(self, tmp_path, monkeypatch):
        store, captions = make_dataset(tmp_path / "d")
        args = ["train-decoder", "--features", store, "--captions", captions, "--model-dir", tmp_path / "m",
                "--steps", "4", "--checkpoint-every", "2", "--eval-every", "2", *TINY]
        monkeypatch.setattr(base.atomic, "fsync_path", full_disk("ckpt-4.npz"))
        code, out = run(*args)
        assert code == 1 and "Error: a write failed: the disk is full" in out and "Traceback" not in out, out
        assert checkpoint_steps(tmp_path / "m") == [2] and not list((tmp_path / "m").rglob("*.tmp-*"))
        monkeypatch.undo()
        code, out = run(*args)
        assert code == 0 and checkpoint_steps(tmp_path / "m")[-1] == 4, out

    @pytest.mark.slow
    def test_export_resource_exhausted_keeps_the_old_export(self, tmp_path, monkeypatch):
        import tensorflow as tf

        import decoder.infer.export as export
        from data.vocab import Vocabulary
        from decoder.config import ModelConfig
        from decoder.model import build_decoder
        from decoder.modeldir import save_model_dir

        vocab = Vocabulary.build(["a dog"], min_count=1)
        config = ModelConfig(vocab_size=len(vocab), embedding_size=4, lstm_units=4, feature_dim=8)
        model = save_model_dir(tmp_path / "m", build_decoder(config), config, vocab, cnn=CNN)
        old = fake_export(tmp_path / "exported" / "1")
        before = snapshot(old)

        def module(*_):
            mod = tf.Module()
            mod.serving_default = tf.function(lambda: tf.constant(1), input_signature=[])
            mod.caption_features = mod.serving_default
            return mod

        def save(*_, **__):
            raise tf.errors.ResourceExhaustedError(None, None, "saved_model.pb; No space left on device")

        monkeypatch.setattr(export, "load_cnn", lambda loaded: (None, {"image_size": 75}))
        monkeypatch.setattr(export, "build_module", module)
        monkeypatch.setattr(tf.saved_model, "save", save)
        code, out = run("export", "--model-dir", model, "--out", old, "--overwrite")
        assert code == 1 and "Error: a write failed: no space left on device" in out, out
        assert "Traceback" not in out
        assert snapshot(old) == before and sorted(p.name for p in old.parent.iterdir()) == ["1", "1.lock"]

    @pytest.mark.slow
    def test_evaluate_report_on_a_full_disk_keeps_results_and_the_old_report(self, tmp_path, monkeypatch):
        store, captions = make_dataset(tmp_path / "d")
        train_tiny_decoder(store, captions, tmp_path / "m", 5, units=8)
        out = tmp_path / "out"
        args = ["evaluate", "--model-dir", tmp_path / "m", "--features", store, "--captions", captions,
                "--split", "val", "--out-dir", out, "--report", out / "report.html", "--java", "no",
                "--no-progress"]
        code, output = run(*args)
        assert code == 0, output
        old = (out / "report.html").read_bytes()
        (out / "results.json").unlink()
        monkeypatch.setattr(base.atomic, "fsync_path", full_disk("report.html"))
        code, output = run(*args)
        assert code == 1 and "Error: a write failed: the disk is full" in output and "Traceback" not in output
        assert (out / "report.html").read_bytes() == old and (out / "results.json").is_file()
        assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.html", "results.json"]

    def test_read_only_outputs_are_one_line(self, tmp_path, monkeypatch):
        import extract.inputs

        def read_only(folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))

        monkeypatch.setattr(extract.inputs, "probe_write", read_only)
        model = fake_model(tmp_path / "m")
        refused(*run("export", "--model-dir", model, "--out", tmp_path / "out"), "Read-only file system")
        refused(*run("demo", "--workdir", tmp_path / "demo"), "Read-only file system")


class TestNoise:
    """Item 10: Ctrl-C says how to go on; a file as --model-dir; a newline in a file name; quiet merge."""

    def test_ctrl_c_says_how_to_go_on(self, tmp_path, monkeypatch):
        import decoder.train.train_decoder
        import extract.merge

        def interrupted(*_, **__):
            raise KeyboardInterrupt

        monkeypatch.setattr(decoder.train.train_decoder, "train_decoder", interrupted)
        monkeypatch.setattr(extract.merge, "merge_shards", interrupted)
        store, captions = make_dataset(tmp_path / "d")
        code, out = run("train-decoder", "--features", store, "--captions", captions, "--model-dir",
                        tmp_path / "m")
        assert code == 130 and out.endswith("\nError: interrupted: rerun the same command to resume.\n"), out
        assert "Aborted" not in out
        code, out = run("merge-features", store, "--out", tmp_path / "x.h5")
        assert code == 130 and "rerun the same command to start again" in out and "Aborted" not in out

    def test_a_file_given_as_model_dir(self, tmp_path):
        (tmp_path / "m").write_text("not a folder")
        refused(*run("caption", "--model-dir", tmp_path / "m", tmp_path / "m"), "is a file, not a folder")
        refused(*run("evaluate", "--model-dir", tmp_path / "nope", "--features", tmp_path / "m", "--captions",
                     tmp_path / "m"), "does not exist")

    @pytest.mark.slow
    def test_file_checks_come_before_tensorflow_and_merge_is_quiet(self, tmp_path):
        model = fake_model(tmp_path / "m")
        (tmp_path / "f").write_text("x")
        script = ("import sys, cli; from click.testing import CliRunner\n"
                  "for args in sys.argv[1:]:\n"
                  "    r = CliRunner().invoke(cli.main, args.split('|'))\n"
                  "    print(r.exit_code, 'tensorflow' in sys.modules, r.output.strip())\n")
        cases = [f"export|--model-dir|{model}|--out|{model.parent}|--overwrite",
                 f"caption|--model-dir|{tmp_path / 'f'}|x.jpg", f"demo|--workdir|{tmp_path}|--fresh"]
        proc = subprocess.run([sys.executable, "-c", script, *cases], cwd=REPO, capture_output=True,
                              text=True, env=QUIET_ENV, timeout=120)
        lines = proc.stdout.splitlines()
        assert len(lines) == 3 and all(line.startswith("2 False Error: ") for line in lines), proc.stdout
        proc = subprocess.run([sys.executable, "cli.py", "merge-features", str(tmp_path / "nope.h5"), "--out",
                               str(tmp_path / "out.h5")], cwd=REPO, capture_output=True, text=True,
                              env=QUIET_ENV, timeout=120)
        assert proc.returncode == 2 and proc.stderr.startswith("Error: "), proc.stderr
        assert not any(w in proc.stderr for w in ("oneDNN", "cuda", "absl", "cpu_feature_guard")), proc.stderr

    @pytest.mark.slow
    def test_a_file_name_with_a_newline_keeps_the_caption_layout(self, tmp_path):
        images = tmp_path / "images"
        images.mkdir()
        good = coco_ramp_images(images, [42])[0]
        _, model = tiny_caption_model(tmp_path, images)
        odd = tmp_path / "odd" / "two\nlines.jpg"
        odd.parent.mkdir()
        odd.write_bytes(good.read_bytes())
        code, out = run("caption", "--model-dir", model, odd, "--top", "2", "--no-progress")
        lines = out.splitlines()
        assert code == 0 and "Captions for image " + str(odd).replace("\n", "\\n") + ":" in lines, out
        assert sum(line.startswith("  ") for line in lines) == 2  # the top 2 captions, each on its line
        assert not any(line.startswith("lines.jpg") for line in lines), out

    @pytest.mark.slow
    def test_train_scst_prints_its_real_best_cider(self, tmp_path):
        import re

        store, captions = make_dataset(tmp_path / "d", n_images=30)
        train_tiny_decoder(store, captions, tmp_path / "xe", 20, learning_rate=0.01)
        code, out = run("train-scst", "--model-dir", tmp_path / "xe", "--features", store, "--captions",
                        captions, "--out", tmp_path / "scst", "--steps", "2", "--batch-size", "8",
                        "--no-progress", "--precision", "float32")
        best = [float(b) for b in re.findall(r"\(best val_cider (-?[\d.]+)\)", out)]
        assert code == 0 and best and min(best) >= 0 and "best score" not in out, out
