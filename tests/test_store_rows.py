"""A feature store's row identities (/keys with /image_ids) are checked when it is opened (issue 22, item
7): a key listed twice, or keys/ids that are not the rows the store was written with (two keys swapped), are
refused with one sentence, so caption and evaluate never attach captions to the wrong images."""

import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import CNN, make_dataset, write_store, write_vocab

from base.errors import InputError
from cli import main
from data.features import ROWS_DIGEST, open_store
from data.integrity import rows_digest
from data.vocab import Vocabulary
from decoder.config import ModelConfig
from decoder.model import build_decoder
from decoder.modeldir import save_model_dir
from extract.merge import merge_shards


def _set_keys(path, keys) -> None:
    """Rewrite /keys in place (what a hand edit or a damaged file does)."""
    with h5py.File(path, "r+") as f:
        f["keys"][...] = np.array(keys, dtype=object)


def _swap(path, i, j) -> None:
    with h5py.File(path, "r") as f:
        keys = [k.decode() for k in f["keys"][...]]
    keys[i], keys[j] = keys[j], keys[i]
    _set_keys(path, keys)


def test_swapped_duplicated_or_edited_keys_are_refused_on_open(tmp_path):
    keys = [f"img_{i}.jpg" for i in range(6)]
    path = write_store(tmp_path / "f.h5", keys, np.eye(6, 8))
    with open_store(path) as store:  # the digest recorded at creation matches
        assert store.keys == keys and store.attrs[ROWS_DIGEST] == rows_digest(keys, range(1, 7))
    _swap(path, 1, 4)
    with pytest.raises(InputError, match="not the rows it was written with"):
        open_store(path)
    _set_keys(path, keys[:5] + ["img_2.jpg"])
    with pytest.raises(InputError, match=r"lists the key 'img_2.jpg' twice \(rows 2 and 5\)"):
        open_store(path)
    _set_keys(path, keys)
    with h5py.File(path, "r+") as f:  # ids edited, keys intact: refused too
        f["image_ids"][0] = 99
    with pytest.raises(InputError, match="digest differs"):
        open_store(path)


def test_stores_without_a_digest_are_checked_for_duplicates_only(tmp_path):
    keys = ["a.jpg", "b.jpg", "c.jpg"]
    path = write_store(tmp_path / "old.h5", keys, np.eye(3, 8))
    with h5py.File(path, "r+") as f:  # a store written before the digest existed
        del f.attrs[ROWS_DIGEST]
    _swap(path, 0, 2)
    with open_store(path) as store:  # nothing recorded to check a swap against
        assert store.keys == ["c.jpg", "b.jpg", "a.jpg"]
    _set_keys(path, ["a.jpg", "b.jpg", "a.jpg"])
    with pytest.raises(InputError, match="twice"):
        open_store(path)


def test_merged_store_records_the_digest_of_its_own_rows(tmp_path):
    shards = []
    for k in range(2):  # extract's shard k holds rows i with i % 2 == k
        keys = [f"k{2 * i + k}" for i in range(3)]
        path = write_store(tmp_path / f"s{k}.h5", keys, np.eye(3, 8))
        with h5py.File(path, "r+") as f:
            f.attrs["run"] = json.dumps({"total_rows": 6, "shard": k, "num_shards": 2})
            f.attrs["shard"], f.attrs["num_shards"] = k, 2
        shards.append(path)
    merge_shards([str(p) for p in shards], tmp_path / "m.h5")
    with open_store(tmp_path / "m.h5") as store:
        assert store.keys == [f"k{i}" for i in range(6)]
        assert store.attrs[ROWS_DIGEST] == rows_digest(store.keys, store.image_ids)


def test_caption_and_evaluate_refuse_a_store_with_swapped_keys(tmp_path):
    store, captions = make_dataset(tmp_path / "d", n_images=12, n_val=6)
    vocab = write_vocab(tmp_path / "word_counts.txt", 20)
    model = build_decoder(ModelConfig(vocab_size=21, embedding_size=8, lstm_units=8, feature_dim=8), seed=0)
    save_model_dir(tmp_path / "m", model, model.config, Vocabulary.load(vocab), CNN)
    _swap(store, 0, 7)
    runs = [["caption", "--model-dir", tmp_path / "m", "--features", store],
            ["evaluate", "--model-dir", tmp_path / "m", "--features", store, "--captions", captions,
             "--split", "val", "--java", "no", "--out-dir", tmp_path / "eval"]]
    for args in runs:
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 2, result.output
        assert "not the rows it was written with" in result.output
        assert "Traceback" not in result.output and result.output.count("Error:") == 1
    assert not (tmp_path / "eval" / "results.json").exists()
