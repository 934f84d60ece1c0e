"""data/tokenizer.py + data/vocab.py: tokens, im2txt word_counts.txt read/write, encode/decode."""

import json
import time

import numpy as np
import pytest

from base.errors import InputError
from data.tokenizer import tokenize
from data.vocab import Vocabulary


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("A man's dog, running.", ["a", "man", "'s", "dog", ",", "running", "."]),
        ("They don't know", ["they", "do", "n't", "know"]),
        (
            "A close-up of a T.V. at 10,000 o'clock...",
            ["a", "close-up", "of", "a", "t.v", ".", "at", "10,000", "o'clock", "..."],
        ),
        ('He said "hi there"!', ["he", "said", "``", "hi", "there", "''", "!"]),
        ("a,b;c (d) & e?", ["a", ",", "b", ";", "c", "(", "d", ")", "&", "e", "?"]),
        ("  Café\tau\nLAIT  ", ["café", "au", "lait"]),
        ("", []),
        ("   ", []),
    ],
)
def test_tokenize(text, tokens):
    assert tokenize(text) == tokens


def test_build_counts_like_im2txt():
    captions = ["A dog runs.", "a dog sits", "A cat.", "the dog"] + ["a bird"] * 2
    v = Vocabulary.build(captions, min_count=2)
    # <S> and </S> once per caption (6); "a" 5, "dog" 3, "." 2, "bird" 2; ties by word
    assert v.words == ["<S>", "</S>", "a", "dog", ".", "bird", "<UNK>"]
    assert v.counts == [6, 6, 5, 3, 2, 2]
    assert (v.start_id, v.end_id, v.unk_id, len(v)) == (0, 1, 6, 7)
    assert Vocabulary.build(captions).words == ["<S>", "</S>", "a", "<UNK>"]  # min_count 4 by default


def test_build_keeps_start_and_end_for_tiny_sets():
    v = Vocabulary.build(["one caption"], min_count=4)
    assert v.words == ["<S>", "</S>", "<UNK>"] and v.counts == [1, 1]


def test_save_load_round_trip_is_im2txt_format(tmp_path):
    v = Vocabulary.build(["a red circle", "a blue square", "a red square"], min_count=1)
    path = v.save(tmp_path / "word_counts.txt")
    text = path.read_text()
    assert text.splitlines()[:4] == ["<S> 3", "</S> 3", "a 3", "red 2"] and not text.endswith("\n")
    assert not list(tmp_path.glob("*.tmp-*"))
    w = Vocabulary.load(path)
    assert w.words == v.words and w.counts == v.counts and len(w) == len(v)
    path.write_text(text + "\n")  # a trailing newline is accepted too
    assert Vocabulary.load(path).words == v.words


def test_encode_decode():
    v = Vocabulary.build(["a red circle"] * 4 + ["a blue square"] * 4)
    ids = v.encode("A red square, zebra")
    assert ids[0] == v.start_id and ids[-1] == v.end_id
    assert [v.word(i) for i in ids] == ["<S>", "a", "red", "square", "<UNK>", "<UNK>", "</S>"]
    assert v.decode(ids) == "a red square <UNK> <UNK>"
    assert v.decode(ids, strip=False) == "<S> a red square <UNK> <UNK> </S>"
    assert v.decode(np.array(ids + [v.id("red")], dtype=np.int32)) == "a red square <UNK> <UNK>"
    assert v.word(len(v) + 100) == "<UNK>" and v.id("zebra") == v.unk_id and "red" in v
    with pytest.raises(IndexError):
        v.word(-1)


def test_unk_listed_in_file_keeps_its_line(tmp_path):
    path = tmp_path / "wc.txt"
    path.write_text("a 10\n<UNK> 5\n<S> 3\n</S> 3")
    v = Vocabulary.load(path)
    assert (v.unk_id, len(v), v.start_id) == (1, 4, 2)
    v.save(tmp_path / "again.txt")
    assert (tmp_path / "again.txt").read_text() == path.read_text()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"a 1\n<S> 1\n", r"lacks </S>"),
        (b"a 1\n<S> 1\n</S> 1\na 2", r"a word is listed twice"),
        (b"a 1\n\n<S> 1\n</S> 1", r"line 2: expected 'word count', got ''"),
        (b"a one\n<S> 1\n</S> 1", r"line 1: expected 'word count', got 'a one'"),
        (b"b'a' 1\n<S> 1\n</S> 1\nx y 2", r"line 4: expected 'word count', got 'x y 2'"),
        (b"caf\xe9 1\n<S> 1\n</S> 1", r"is not UTF-8 text \(byte 3\)"),
    ],
)
def test_load_rejects_malformed_files(tmp_path, content, message):
    path = tmp_path / "wc.txt"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as err:
        Vocabulary.load(path)
    assert str(path) in str(err.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope.txt does not exist"):
        Vocabulary.load(tmp_path / "nope.txt")


def test_shared_im2txt_word_counts(shared_data, tmp_path):
    src = shared_data / "im2txt" / "word_counts.txt"
    lines = src.read_text().split("\n")
    v = Vocabulary.load(src)
    assert len(lines) == 11519  # 11,518 newlines: im2txt writes no newline after the last line
    assert [v.id(line.split(" ")[0]) for line in lines] == list(range(len(lines)))
    assert (v.id("a"), v.start_id, v.end_id, v.id("."), v.id("moguls")) == (0, 1, 2, 3, 11518)
    assert v.unk_id == 11519 and len(v) == 11520 and v.word(11999) == "<UNK>"
    v.save(tmp_path / "word_counts.txt")
    assert (tmp_path / "word_counts.txt").read_bytes() == src.read_bytes()


def test_shared_build_from_coco_val2017(shared_data, tmp_path):
    data = json.loads((shared_data / "captions_val2017.json").read_text())
    captions = [a["caption"] for a in data["annotations"]]
    assert len(captions) == 25014
    start = time.perf_counter()
    v = Vocabulary.build(captions)
    seconds = time.perf_counter() - start
    print(f"vocabulary from {len(captions):,} captions: {len(v):,} ids in {seconds:.3f} s")
    assert v.words[:4] == ["a", "<S>", "</S>", "."] and v.counts[1:3] == [25014, 25014]
    assert min(v.counts) >= 4 and v.counts == sorted(v.counts, reverse=True)
    im2txt = Vocabulary.load(shared_data / "im2txt" / "word_counts.txt")
    tokens = [w for c in captions[:2000] for w in tokenize(c)]
    oov = sum(w not in im2txt for w in tokens) / len(tokens)
    assert oov < 0.01  # our tokenizer splits like the NLTK tokenizer im2txt's vocabulary came from
