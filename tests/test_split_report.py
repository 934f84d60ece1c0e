"""decoder/train/split_report.py: the one "split -> pairs -> log -> refuse empty" step of train-decoder,
finetune and train-scst. Pure Python: no TensorFlow."""

from dataclasses import dataclass, field

import pytest

from base.errors import InputError
from decoder.train.split_report import pairs_summary, split_report


@dataclass
class Found:
    """What a match returns: a length and its stats (as data.pipeline.PairSet)."""

    n: int
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.n


class Annotations:
    def __init__(self, parts: dict):
        self.parts = parts

    def part(self, split: str) -> list:
        return self.parts.get(split, [])


STATS = {"pairs": 3, "images": 2, "missing_image": 1, "missing_examples": ["gone.jpg"], "bad_image": 1,
         "too_long": 0, "longest_skipped": 0}


def test_a_split_is_matched_logged_and_returned():
    lines, seen = [], []

    def match(records):
        seen.append(records)
        return Found(3, STATS)

    found = split_report(Annotations({"train": ["r1", "r2"]}), "train", match,
                         lambda s: pairs_summary(s, "not in the store", 100), "never", lines.append)
    assert found.n == 3 and seen == [["r1", "r2"]]
    assert lines == ["train: 3 (image, caption) pairs from 2 images; skipped 1 captions whose image is not "
                     "in the store (e.g. gone.jpg), 1 whose image failed extraction (/ok false)"]


def test_an_empty_split_is_refused_before_matching_and_an_empty_match_after_logging():
    lines = []

    def match(records):
        raise AssertionError("an empty split must not be matched")

    with pytest.raises(InputError, match=r"^The val split of the caption file\(s\) is empty"):
        split_report(Annotations({"train": ["r"]}), "val", match, str, "never", lines.append)
    assert lines == []
    with pytest.raises(InputError, match="^No image of the val split"):
        split_report(Annotations({"val": ["r"]}), "val", lambda r: Found(0, {"images": 0}),
                     lambda s: f"{s['images']} images", "No image of the val split was found.", lines.append)
    assert lines == ["val: 0 images"]  # what was skipped is said before the refusal
