"""evaluation/scorers.py: showtell's own BLEU-1..4, ROUGE-L and CIDEr equal pycocoevalcap's on real COCO
captions; without pycocoevalcap, `score_captions` uses them, says what it skipped, and `check_scoring` refuses
what it cannot do before any work."""

import json
import math
import sys

import numpy as np
import pytest

from base.errors import InputError
from evaluation import metrics, ptb, scorers
from evaluation.metrics import check_scoring, fallback_tokenize, format_metrics_table, score_captions


@pytest.fixture(scope="module")
def coco_tokenized(shared_data):
    """1500 COCO val2017 images, fallback-tokenized: (gts, res). Results cycle through a held-out reference,
    another image's caption, a truncated caption, an empty caption ("..." -> "") and a repeated word."""
    data = json.loads((shared_data / "captions_val2017.json").read_text())
    caps: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        caps.setdefault(ann["image_id"], []).append(ann["caption"])
    ids = sorted(caps)[:1500]
    gts, res = {}, {}
    for i, image_id in enumerate(ids):
        own, kind = caps[image_id], i % 5
        cand = [own[0], caps[ids[i - 1]][1], " ".join(own[0].split()[:4]), "...", "a a a a dog dog"][kind]
        gts[image_id] = [{"caption": c} for c in (own[1:] if kind in (0, 2) else own)]
        res[image_id] = [{"caption": cand}]
    return fallback_tokenize(gts), fallback_tokenize(res)


def test_bleu_rouge_cider_equal_pycocoevalcap_on_coco(coco_tokenized):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = coco_tokenized
    assert any(r == [""] for r in res.values())  # the empty hypothesis is among them
    want_bleu, want_bleu_images = Bleu(4).compute_score(gts, res, verbose=0)
    ours = scorers.score_tokenized(gts, res)
    for k in range(4):
        corpus, per_image = ours[f"Bleu_{k + 1}"]
        assert corpus == pytest.approx(want_bleu[k], abs=1e-6, rel=0), k
        np.testing.assert_allclose(per_image, want_bleu_images[k], rtol=0, atol=1e-6)
    for name, scorer in (("ROUGE_L", Rouge()), ("CIDEr", Cider())):
        want, want_images = scorer.compute_score(gts, res)
        assert ours[name][0] == pytest.approx(want, abs=1e-6, rel=0), name
        np.testing.assert_allclose(ours[name][1], want_images, rtol=0, atol=1e-6)
    # sanity of the numbers themselves: an own (held-out) caption beats another image's caption
    cider = np.array(ours["CIDEr"][1])
    assert cider[0::5].mean() > 3 * cider[1::5].mean() and cider[3::5].max() == 0.0
    assert 1 > ours["Bleu_1"][0] > ours["Bleu_4"][0] > 0.05


def test_ptb_punctuations_are_pycocoevalcaps():
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    assert ptb.PTB_PUNCTUATIONS == set(PUNCTUATIONS)


def test_hand_computed_bleu_and_rouge():
    # closest reference length: 4 and 6 are both 1 from the 5-word candidate; the shorter (4) counts
    testlen, reflen, guess, correct = scorers._bleu_stats("a b c d e", ["a b c d", "a b c d e f"], 4)
    assert (testlen, reflen, guess, correct) == (5, 4, [5, 4, 3, 2], [5, 4, 3, 2])
    # brevity penalty: a 2-word candidate against a 4-word reference, both words matching
    (b1, b2, *_), _ = scorers.bleu({1: ["a b c d"]}, {1: ["a b"]})
    assert b1 == pytest.approx(math.exp(1 - 4 / 2), rel=1e-6) and b2 == pytest.approx(math.exp(-1), rel=1e-6)
    # clipped counts: "the the the" against "the cat" matches one "the" of three
    (b1, *_), _ = scorers.bleu({1: ["the cat", "the dog"]}, {1: ["the the the"]})
    assert b1 == pytest.approx(1 / 3, rel=1e-6)
    assert scorers.lcs_length("a x b y c".split(), "a b c".split()) == 3
    # LCS 2 of 3 candidate words and of 4 reference words: P = 2/3, R = 1/2, F with beta 1.2
    p, r = 2 / 3, 1 / 2
    assert scorers.rouge_l_image("a b z", ["a q b w"]) == pytest.approx(2.44 * p * r / (r + 1.44 * p))
    assert scorers.rouge_l_image("", ["a b"]) == 0.0


def _hide_pycocoevalcap(mp: pytest.MonkeyPatch) -> None:
    """Make `import pycocoevalcap...` fail as in a plain `pip install showtell` (undone with `mp`)."""
    for name in [n for n in sys.modules if n == "pycocoevalcap" or n.startswith("pycocoevalcap.")]:
        mp.delitem(sys.modules, name)
    mp.setitem(sys.modules, "pycocoevalcap", None)
    assert metrics.pycocoevalcap_dir() is None


@pytest.fixture
def no_pycocoevalcap(monkeypatch):
    _hide_pycocoevalcap(monkeypatch)


SAMPLE_REFS = {1: ["a red circle on the left", "a red circle", "the circle is red"],
               2: ["a blue square", "a small blue square above a green triangle"],
               3: ["a green triangle", "one green triangle"]}
SAMPLE_RESULTS = [{"image_id": 1, "caption": "A red circle."}, {"image_id": 2, "caption": "a blue triangle"},
                  {"image_id": 3, "caption": "a red square ..."}]


def test_score_captions_without_pycocoevalcap_gives_the_same_numbers():
    with_package = score_captions(SAMPLE_RESULTS, SAMPLE_REFS, use_java=False)
    assert with_package.scorers == "pycocoevalcap"
    with pytest.MonkeyPatch.context() as mp:
        _hide_pycocoevalcap(mp)
        mp.setattr(metrics, "find_java", lambda: "/usr/bin/java")  # java alone is not enough: no jars
        own = score_captions(SAMPLE_RESULTS, SAMPLE_REFS)
    assert own.scorers == "showtell" and own.tokenizer == "fallback"
    assert set(own.corpus) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    for key, value in own.corpus.items():
        assert value == pytest.approx(with_package.corpus[key], abs=1e-9, rel=0), key
        for image_id, scores in own.per_image.items():
            assert scores[key] == pytest.approx(with_package.per_image[image_id][key], abs=1e-9, rel=0)
    assert len(own.notes) == 1 and "METEOR and SPICE skipped" in own.notes[0]
    table = format_metrics_table(own)
    assert "scorers: showtell's own (no pycocoevalcap)" in table and "METEOR   skipped" in table
    assert own.to_dict(per_image=False)["scorers"] == "showtell"


def test_check_scoring_refuses_java_yes_without_pycocoevalcap(no_pycocoevalcap, monkeypatch):
    monkeypatch.setattr(metrics, "find_java", lambda: "/usr/bin/java")
    with pytest.raises(InputError, match="pycocoevalcap is not installed"):
        check_scoring(True)
    notes = []
    assert check_scoring("auto", notes) is None and "pycocoevalcap is not installed" in notes[0]
    with pytest.raises(InputError, match="use_java"):
        check_scoring("yes")


def test_evaluate_refuses_java_yes_before_loading_the_model(no_pycocoevalcap, tmp_path):
    from decoder.infer.evaluate import EvalConfig, run_evaluate

    cfg = EvalConfig(model_dir=str(tmp_path / "no-model"), captions=[str(tmp_path / "none.json")],
                     features=str(tmp_path / "none.h5"), out_dir=str(tmp_path / "out"), use_java=True)
    with pytest.raises(InputError, match="pycocoevalcap is not installed"):
        run_evaluate(cfg, log=lambda m: None)
    assert not (tmp_path / "out").exists()
