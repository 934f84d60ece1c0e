"""Issue 14, data side: option ranges before TensorFlow, store checksums and finite values, damaged HDF5,
torn writes resealed, locks on extract/merge outputs, captions that used to crash, writable outputs.
(The training side is in test_reliability_train.py.)"""

import errno
import json
import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import (
    REPO,
    damaged_copy,
    flip_bytes,
    hold_lock,
    make_good_images,
    without_checksums,
    write_store,
)

from base.errors import InputError, RunStopped
from cli import main
from data.captions import load_annotations
from data.features import StoreWriter, create_store, open_store
from data.integrity import fletcher32
from data.pipeline import match_pairs
from data.vocab import Vocabulary
from extract.inputs import check_output, check_output_dir
from extract.merge import merge_shards

# (args, the option named in the usage error): every numeric option of every command, out of range
TD = ["train-decoder", "--features", "f.h5", "--captions", "c.json", "--model-dir", "m"]
EX = ["extract", "img", "--out", "f.h5"]
FT = ["finetune", "--model-dir", "m", "--images", "i", "--captions", "c.json", "--out", "o"]
CA = ["caption", "--model-dir", "m", "x.jpg"]
EV = ["evaluate", "--model-dir", "m", "--captions", "c.json"]
BAD_OPTIONS = [
    *[(TD + [o, v], o) for o, v in [
        ("--steps", "-1"), ("--steps", "0"), ("--epochs", "-1"), ("--epochs", "nan"), ("--epochs", "0"),
        ("--learning-rate", "nan"), ("--learning-rate", "0"), ("--embedding-size", "0"),
        ("--lstm-units", "-1"), ("--checkpoint-every", "-1"), ("--max-val-pairs", "-1"),
        ("--max-val-pairs", "0"), ("--clip-gradients", "inf"), ("--eval-every", "-1"), ("--batch-size", "0"),
        ("--min-word-count", "0"), ("--seed", "-1"), ("--max-caption-length", "0")]],
    *[(EX + [o, v], o) for o, v in [
        ("--num-shards", "0"), ("--shard", "-1"), ("--batch-size", "0"), ("--views", "0"),
        ("--image-size", "60"), ("--seed", "-1")]],
    (EX + ["--shard", "3", "--num-shards", "3"], "--shard"),
    *[(FT + [o, v], o) for o, v in [
        ("--trainable-blocks", "12"), ("--image-size", "74"), ("--learning-rate", "-1"),
        ("--max-val-pairs", "-1"), ("--decode-threads", "0"), ("--steps", "0"), ("--epochs", "inf"),
        ("--checkpoint-every", "-1"), ("--max-caption-length", "-5")]],
    *[(CA + [o, v], o) for o, v in [
        ("--beam-size", "100000"), ("--beam-size", "0"), ("--max-length", "1"),
        ("--length-normalization", "nan"), ("--top", "0"), ("--no-repeat-ngram", "-1"),
        ("--num-samples", "0"), ("--temperature", "0"), ("--temperature", "nan"), ("--top-k", "-1"),
        ("--batch-size", "0"), ("--seed", "-1")]],
    *[(EV + [o, v], o) for o, v in [
        ("--batch-size", "0"), ("--max-images", "0"), ("--beam-size", "65"), ("--max-length", "1")]],
    (["import-im2txt", "--checkpoint", "c", "--vocab", "v", "--out", "o", "--image-size", "10"],
     "--image-size"),
]
PARSE_AND_REPORT = """
import json, sys
from click.testing import CliRunner
import cli
out = []
for args, option in json.loads(sys.argv[1]):
    r = CliRunner().invoke(cli.main, args)
    out.append([r.exit_code, r.output])
print(json.dumps({"results": out, "tensorflow": "tensorflow" in sys.modules}))
"""


ENV = {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_every_numeric_option_is_range_checked_before_tensorflow():
    """One process, no TensorFlow import: each bad value is a usage error (exit 2) naming the option."""
    proc = subprocess.run([sys.executable, "-c", PARSE_AND_REPORT, json.dumps(BAD_OPTIONS)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=ENV)
    report = json.loads(proc.stdout)
    for (args, option), (code, output) in zip(BAD_OPTIONS, report["results"], strict=True):
        assert code == 2 and f"Invalid value for '{option}'" in output, (args, output)
        assert output.count("Error:") == 1
    assert not report["tensorflow"]


def test_good_values_parse_and_the_new_defaults():
    import cli

    def parse(args):
        return cli.main.commands[args[0]].make_context(args[0], args[1:]).params

    params = parse(TD + ["--epochs", "0.5"])
    assert params["epochs"] == 0.5 and params["max_caption_length"] == 100
    params = parse(CA + ["--beam-size", "64", "--max-length", "2"])
    assert params["beam_size"] == 64 and params["max_length"] == 2
    assert parse(FT + ["--max-val-pairs", "0"])["max_val_pairs"] == 0  # finetune: 0 = every validation pair


def _store(path, n=40, dim=64, seed=0):
    feats = np.random.default_rng(seed).normal(size=(n, dim))
    return write_store(path, [f"k{i}.jpg" for i in range(n)], feats), feats


def test_new_stores_carry_checksums_and_a_damaged_chunk_is_refused(tmp_path):
    path, feats = _store(tmp_path / "f.h5")
    with h5py.File(path, "r") as f:
        assert all(f[name].fletcher32 for name in ("features", "image_ids", "ok", "errors"))
        offset = f["features"].id.get_chunk_info(0).byte_offset
        mask, raw = f["features"].id.read_direct_chunk((0, 0))
        assert int.from_bytes(raw[-4:], "little") == fletcher32(raw[:-4])  # HDF5's own checksum
    with open_store(path) as s:
        np.testing.assert_array_equal(s.read_features(), feats.astype(np.float16))
    flip_bytes(path, offset + 2000)  # 64 bytes in the middle of the feature values
    with open_store(path) as s, pytest.raises(InputError) as err:
        s.read_features([5, 1])
    assert f"feature store {path} is damaged: rows 0..39 of /features fail their checksum" in str(err.value)


def test_old_stores_load_as_before_and_nonfinite_values_are_refused(tmp_path):
    src, feats = _store(tmp_path / "new.h5")
    old = without_checksums(src, tmp_path / "old.h5")
    with open_store(old) as s:
        assert not s._f["features"].fletcher32
        np.testing.assert_array_equal(s.read_features(), feats.astype(np.float16))
    with h5py.File(old, "r+") as f:
        f["features"][3, 7] = np.nan
        f["features"][9, 0] = np.inf
    with open_store(old) as s:
        s.read_features([0, 1])  # only the rows read are checked
        for rows in (None, [1, 9, 3]):
            with pytest.raises(InputError, match=r"holds non-finite feature values \(NaN or Inf\) in 2 row"):
                s.read_features(rows)
        with pytest.raises(InputError, match=r"e\.g\. row 3 \(k3\.jpg\).*extract it again"):
            s.read_features()


@pytest.mark.parametrize("where", ["start", "end"])
def test_damaged_hdf5_metadata_is_one_input_error(tmp_path, where):
    src, _ = _store(tmp_path / "f.h5")
    size = src.stat().st_size
    offsets = range(0, 2048, 24) if where == "start" else range(size - 1024, size, 24)
    path = tmp_path / "x.h5"
    for offset in offsets:
        path.write_bytes(src.read_bytes())
        flip_bytes(path, offset, 8)
        try:
            with open_store(path) as s:
                s.read_features()
        except InputError as err:
            assert str(path) in str(err)


def test_an_extract_rerun_on_a_damaged_store_is_one_error(tmp_path):
    from extract.run import ExtractConfig, run_extract

    make_good_images(tmp_path / "imgs", n=2)
    out = damaged_copy(_store(tmp_path / "src.h5")[0], tmp_path / "f.h5")
    cfg = ExtractConfig(out=str(out), paths=[str(tmp_path / "imgs")], cnn_weights="none", image_size=75)
    with pytest.raises(InputError, match=f"{out} exists and cannot be resumed: .*damaged"):
        run_extract(cfg)


def test_damaged_shard_merge_is_one_error_line(tmp_path):
    paths, run = [], {"inputs": "x", "total_rows": 40, "num_shards": 2, "dtype": "float16"}
    for k in range(2):
        writer = create_store(tmp_path / f"s{k}.h5", [f"k{2 * i + k}" for i in range(20)], [0] * 20, dim=8,
                              views=1, dtype="float16", attrs={"run": {**run, "shard": k}})
        with writer:
            writer.commit(0, np.ones((20, 8)), [True] * 20, [""] * 20)
            writer.finish()
        paths.append(str(writer.path))
    with h5py.File(paths[1], "r") as f:
        offset = f["features"].id.get_chunk_info(0).byte_offset
    flip_bytes(tmp_path / "s1.h5", offset + 100)
    result = CliRunner().invoke(main, ["merge-features", *paths, "--out", str(tmp_path / "m.h5")])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"Error: feature store {paths[1]} is damaged: rows 0..19 of /features")
    assert not (tmp_path / "m.h5").exists()


def test_a_write_torn_by_a_kill_is_resealed_on_resume(tmp_path):
    path = tmp_path / "f.h5"
    feats = np.random.default_rng(1).normal(size=(40, 64)).astype(np.float32)
    writer = create_store(path, [f"k{i}" for i in range(40)], list(range(40)), dim=64, views=1,
                          dtype="float32", attrs={})
    with writer:
        writer.commit(0, feats[:8], [True] * 8, [""] * 8)
        writer._f.attrs.modify("rows_writing", np.int64(16))  # the kill: rows 8..15 were being written
    with h5py.File(path, "r") as f:
        offset = f["features"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as f:  # rows 8..11 of the batch reached the file, the chunk's checksum did not
        f.seek(offset + 8 * 64 * 4)
        f.write(feats[8:12].tobytes())
    with open_store(path, require_complete=False) as s, pytest.raises(InputError, match="their checksum"):
        s.read_features([0])
    with StoreWriter(path) as resumed:
        assert resumed.resealed == 1 and resumed.rows_done == 8
        resumed.commit(8, feats[8:], [True] * 32, [""] * 32)
        resumed.finish()
    with open_store(path) as s:
        assert s.read_features().tobytes() == feats.tobytes()


@pytest.mark.slow
def test_extract_and_merge_outputs_are_locked_and_a_dead_lock_does_not_block(tmp_path):
    from extract.run import ExtractConfig, run_extract

    out = tmp_path / "f.h5"
    holder = hold_lock(out)
    try:
        in_use = rf"{out} is in use by another showtell process \(pid {holder.pid}\)"
        with pytest.raises(InputError, match=in_use):
            run_extract(ExtractConfig(out=str(out), paths=[str(tmp_path)], cnn_weights="none"))
        with pytest.raises(InputError, match=f"pid {holder.pid}"):
            merge_shards([str(tmp_path / "a.h5")], out)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with pytest.raises(InputError, match="a.h5 does not exist"):  # the lock is free again: real checks run
        merge_shards([str(tmp_path / "a.h5")], out)


def _captions(path, names, extra_images=()):
    images = [{"id": 100 + i, "file_name": n} for i, n in enumerate(names)] + list(extra_images)
    anns = [{"id": i, "image_id": im["id"], "caption": "a photo"} for i, im in enumerate(images)]
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def test_extract_reports_dropped_entries_and_refuses_another_batch_size_on_resume(tmp_path, monkeypatch):
    from extract.run import ExtractConfig, run_extract

    make_good_images(tmp_path / "imgs", n=6)
    caps = _captions(tmp_path / "caps.json", [f"img{i:02d}.jpg" for i in range(6)],
                     [{"id": 2**70, "file_name": "huge.jpg"}, {"id": "x", "file_name": "x.jpg"}])
    cfg = ExtractConfig(out=str(tmp_path / "f.h5"), images=[str(tmp_path / "imgs")], captions=[str(caps)],
                        cnn_weights="none", image_size=75, batch_size=2, dtype="float32", progress=False)
    real, calls = StoreWriter.commit, []

    def full_disk(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args)

    monkeypatch.setattr(StoreWriter, "commit", full_disk)
    logs = []
    with pytest.raises(RunStopped, match="2 rows are saved"):
        run_extract(cfg, log=logs.append)
    assert "6 images" in logs[0] and "4 skipped" in logs[0] and "does not fit in 64 bits" in logs[0]
    monkeypatch.setattr(StoreWriter, "commit", real)
    with pytest.raises(InputError, match=r"differs in: --batch-size \(resume with --batch-size 2"):
        run_extract(ExtractConfig(**{**cfg.__dict__, "batch_size": 3}), log=logs.append)
    assert run_extract(cfg, log=logs.append).done_now == 4
    assert run_extract(ExtractConfig(**{**cfg.__dict__, "batch_size": 3}), log=logs.append).already_complete


def test_caption_files_that_used_to_crash(tmp_path):
    coco = _captions(tmp_path / "c.json", ["a.jpg"], [{"id": 2**70, "file_name": "b.jpg"}])
    ann = load_annotations(coco, split_scheme="none")
    assert [r.path for r in ann.records] == ["a.jpg"]
    assert any("does not fit in 64 bits" in why for _, why in ann.skipped)
    karpathy = tmp_path / "k.json"
    karpathy.write_text(json.dumps({"dataset": "coco", "images": [
        {"filename": "a.jpg", "cocoid": 2**70, "split": "train", "sentences": [{"raw": "a dog"}]},
        {"filename": "b.jpg", "cocoid": 7, "split": "train", "sentences": [{"raw": "a cat"}]}]}))
    assert [r.image_id for r in load_annotations(karpathy).records] == [7]
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(InputError, match=f"Caption file {deep} is nested too deeply"):
        load_annotations(deep)
    result = CliRunner().invoke(main, ["extract", "--images", str(tmp_path), "--captions", str(deep), "--out",
                                       str(tmp_path / "f.h5")])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith(f"Error: Caption file {deep} is nested too deeply")


def test_overlong_captions_are_skipped_and_counted():
    from data.records import ImageRecord

    vocab = Vocabulary.build(["a dog"], min_count=1)
    records = [ImageRecord(1, "a.jpg", "train", ["a dog", "dog " * 262_144, "a " * 101, "a " * 100])]
    pairs = match_pairs(records, ["a.jpg"], np.array([True]), vocab, max_words=100)
    assert len(pairs) == 2 and pairs.stats["too_long"] == 2 and pairs.stats["longest_skipped"] == 262_144
    assert pairs.lengths.max() == 102  # <S> + 100 words + </S>


def test_outputs_on_a_read_only_or_full_disk_are_refused_before_work(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="cannot be created: .*file is a file, not a folder"):
        check_output_dir(tmp_path / "file" / "m", "--model-dir")
    real_access = os.access
    monkeypatch.setattr("extract.inputs.os.access", lambda p, m: p != tmp_path and real_access(p, m))
    with pytest.raises(InputError, match=f"--model-dir {tmp_path / 'm'}: folder {tmp_path} is not writable"):
        check_output_dir(tmp_path / "m", "--model-dir")
    monkeypatch.setattr("extract.inputs.os.access", real_access)

    def full(folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("extract.inputs.probe_write", full)
    with pytest.raises(InputError, match=r"cannot be written \(No space left on device\)"):
        check_output(tmp_path / "r" / "report.html", create_folders=True, what="--report")
    result = CliRunner().invoke(main, TD[:5] + ["--model-dir", str(tmp_path / "m"), "--steps", "1"])
    assert result.exit_code == 2 and "Error: --model-dir" in result.output and "No space" in result.output
    model = tmp_path / "model"  # exists (the model dir is checked before TensorFlow), its files are not read
    model.mkdir()
    result = CliRunner().invoke(main, ["evaluate", "--model-dir", str(model), *EV[3:], "--features", "f.h5",
                                       "--report", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and "Error: --out-dir folder" in result.output  # before the model is read
