"""evaluation/metrics.py: scores equal pycocoevalcap's COCOEvalCap procedure; the no-java fallback; JSON
files and the table."""

import copy
import json
import math

import numpy as np
import pytest

from base.errors import InputError
from evaluation import metrics
from evaluation.metrics import (
    MetricsResult,
    fallback_tokenize,
    format_metrics_table,
    metrics_footer,
    metrics_rows,
    ptb_tokenize,
    score_captions,
    spice_status,
    write_metrics_json,
    write_results_json,
)
from evaluation.report import write_report

COCO_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
needs_java = pytest.mark.skipif(metrics.find_java() is None, reason="java is not on the PATH")


def _perturb(i: int, caption: str, other: str) -> str:
    """A result exercising the tokenizer: case, punctuation, brackets, quotes, newlines, no words."""
    words = caption.rstrip(".").split()
    return [
        caption.upper() + " !!",
        " ".join(reversed(words)),
        f'The "{other.strip()}" (maybe), isn\'t it?',
        " ".join(words[: max(1, len(words) // 2)]) + "...\nand then ; some -- more",
        "...",  # nothing left after PTB: an empty hypothesis
        "A man's café; [very] {odd} `thing`",
    ][i % 6]


@pytest.fixture(scope="module")
def sample(shared_data):
    """20 COCO val2017 images: even ones hold out their first caption as the result, odd ones get a perturbed
    caption (scored against all five references)."""
    data = json.loads((shared_data / "coco_val2017_sample" / "captions.json").read_text())
    caps: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        caps.setdefault(ann["image_id"], []).append(ann["caption"])
    ids = [img["id"] for img in data["images"]][:20]
    results, references = [], {}
    for i, image_id in enumerate(ids):
        if i % 2 == 0:
            results.append({"image_id": image_id, "caption": caps[image_id][0]})
            references[image_id] = caps[image_id][1:]
        else:
            other = caps[ids[i - 1]][1]
            results.append({"image_id": image_id, "caption": _perturb(i // 2, caps[image_id][0], other)})
            references[image_id] = caps[image_id]
    return results, references


@pytest.fixture(scope="module")
def one_meteor_jvm():
    """METEOR's JVM takes ~6 s of CPU to load its paraphrase table: start it once for the module, and let both
    COCOEvalCap and evaluation.metrics construct "Meteor()" as this instance (evaluation.metrics stops it when
    done)."""
    from pycocoevalcap import eval as coco_eval
    from pycocoevalcap.meteor import meteor as meteor_module

    if metrics.find_java() is None:
        pytest.skip("java is not on the PATH")
    instance = meteor_module.Meteor()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(meteor_module, "Meteor", lambda: instance)
        mp.setattr(coco_eval, "Meteor", lambda: instance)
        yield instance
    instance.meteor_p.kill()
    instance.meteor_p.wait()


@pytest.fixture(scope="module")
def coco_reference(sample, one_meteor_jvm, tmp_path_factory):
    """pycocoevalcap's own procedure: COCO objects + COCOEvalCap.evaluate() with SPICE replaced by a no-op."""
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    results, references = sample
    annotations = [{"image_id": i, "id": n, "caption": c}
                   for n, (i, c) in enumerate((i, c) for i, cs in references.items() for c in cs)]
    path = tmp_path_factory.mktemp("coco") / "refs.json"
    path.write_text(json.dumps({"images": [{"id": i} for i in references], "annotations": annotations}))
    coco = COCO(str(path))
    coco_res = coco.loadRes(copy.deepcopy(results))

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    evaluator = coco_eval.COCOEvalCap(coco, coco_res)
    evaluator.params["image_id"] = coco_res.getImgIds()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(coco_eval, "Spice", NoSpice)
        evaluator.evaluate()
    return evaluator


@needs_java
@pytest.mark.slow
def test_scores_equal_cocoevalcap(sample, one_meteor_jvm, coco_reference):
    ours = score_captions(*sample)
    assert one_meteor_jvm.meteor_p.poll() is not None  # evaluation.metrics used METEOR and stopped its JVM
    assert ours.tokenizer == "ptb"
    assert ours.n_images == 20
    for key in COCO_KEYS:
        assert ours.corpus[key] == pytest.approx(coco_reference.eval[key], abs=1e-9, rel=0), key
    for image_id, expected in coco_reference.imgToEval.items():
        for key in COCO_KEYS:
            assert ours.per_image[image_id][key] == pytest.approx(expected[key], abs=1e-9, rel=0), key
    assert 0.1 < ours.corpus["CIDEr"] < 10 and ours.corpus["Bleu_1"] > ours.corpus["Bleu_4"] > 0
    assert any("SPICE skipped" in note for note in ours.notes)


@needs_java
@pytest.mark.slow
def test_ptb_tokenize_equals_pycocoevalcap(sample):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    results, _ = sample
    res = {r["image_id"]: [{"caption": r["caption"]}] for r in results}
    jar = metrics.pycocoevalcap_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    ours = ptb_tokenize(res, metrics.find_java(), jar)
    assert ours == PTBTokenizer().tokenize(copy.deepcopy(res))
    assert "" in [t[0] for t in ours.values()]  # the "..." result really became empty


@needs_java
@pytest.mark.slow
def test_fallback_tokenizer_close_to_ptb(sample, monkeypatch, tmp_path):
    """Without java the fallback tokenizer is used, METEOR skipped with a note; scores stay near PTB's."""
    results, references = sample
    gts = {i: [{"caption": c} for c in cs] for i, cs in references.items()}
    res = {r["image_id"]: [{"caption": r["caption"]}] for r in results}
    jar = metrics.pycocoevalcap_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    ptb, ptb_res = ptb_tokenize(gts, metrics.find_java(), jar), ptb_tokenize(res, metrics.find_java(), jar)
    ptb_corpus, _ = metrics._run_scorers(ptb, ptb_res, None, [])  # PTB tokens, no METEOR
    fallback = fallback_tokenize(gts)
    pairs = [(a, b) for i in gts for a, b in zip(ptb[i], fallback[i], strict=True)]
    same = sum(a == b for a, b in pairs)
    assert same >= 0.9 * len(pairs), [p for p in pairs if p[0] != p[1]][:5]

    monkeypatch.setenv("PATH", str(tmp_path))  # no java anywhere
    assert metrics.find_java() is None
    nojava = score_captions(results, references)
    assert nojava.tokenizer == "fallback" and "METEOR" not in nojava.corpus
    assert any("METEOR skipped" in note for note in nojava.notes)
    for key in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert nojava.corpus[key] == pytest.approx(ptb_corpus[key], abs=0.05), key
    assert all("CIDEr" in s and "METEOR" not in s for s in nojava.per_image.values())
    assert ["METEOR", "skipped"] in [row.split() for row in format_metrics_table(nojava).splitlines()]
    with pytest.raises(InputError, match="java"):
        score_captions(results, references, use_java=True)


def test_fallback_tokenize_mimics_ptb_punctuation():
    out = fallback_tokenize({7: [{"caption": 'A Dog (big), "happy"; at the park...\n'}]})
    assert out == {7: ["a dog -lrb- big -rrb- happy at the park"]}


def test_hand_computed_scores_without_java(monkeypatch):
    """Perfect captions: BLEU = ROUGE-L = 1; CIDEr-D = 10 * (1 + 1 + 1 + 0) / 4 for 3-word captions."""
    import pycocoevalcap.spice.get_stanford_models as getter

    monkeypatch.setattr(getter, "urlretrieve", lambda *a, **k: pytest.fail("SPICE models were downloaded"))
    refs = {1: ["a red circle"] * 5, 2: ["a blue square"] * 5}
    results = [{"image_id": 1, "caption": "A red circle."}, {"image_id": 2, "caption": "a blue square"}]
    out = score_captions(results, refs, use_java=False)
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "ROUGE_L"):
        assert out.corpus[key] == pytest.approx(1.0, abs=1e-6), key
    assert out.corpus["CIDEr"] == pytest.approx(7.5, abs=1e-9)
    assert out.per_image[1]["CIDEr"] == pytest.approx(7.5, abs=1e-9)
    worse = score_captions([{"image_id": 1, "caption": "a blue circle"}, results[1]], refs, use_java=False)
    assert worse.per_image[1]["CIDEr"] < 7.5 and worse.per_image[2]["CIDEr"] == pytest.approx(7.5)
    assert any("java disabled" in n for n in out.notes) and any("SPICE skipped" in n for n in out.notes)


@pytest.mark.parametrize("results, refs, match", [
    ([], {1: ["a"]}, "no results"),
    ([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}], {1: ["a"]}, "more than one"),
    ([{"image_id": 2, "caption": "a"}], {1: ["a"]}, "Image 2 has no reference"),
    ([{"image_id": 1, "caption": None}], {1: ["a"]}, "is not"),
    ([{"image_id": 1, "caption": "a"}], {1: "a"}, "no reference"),
])
def test_bad_inputs_raise(results, refs, match):
    with pytest.raises(InputError, match=match):
        score_captions(results, refs, use_java=False)


def test_bad_options_raise(monkeypatch):
    with pytest.raises(InputError, match="use_java"):
        score_captions([{"image_id": 1, "caption": "a"}], {1: ["a"]}, use_java="yes")
    monkeypatch.setattr(metrics, "spice_status", lambda *a: (False, "SPICE skipped: lib/x.jar not found"))
    with pytest.raises(InputError, match="SPICE was requested"):
        score_captions([{"image_id": 1, "caption": "a"}], {1: ["a"]}, spice=True)


def test_spice_status(tmp_path):
    spice_dir = tmp_path / "spice"
    (spice_dir / "lib").mkdir(parents=True)
    for name in metrics.SPICE_FILES[:2]:
        (spice_dir / name).write_bytes(b"jar")
    ok, reason = spice_status(tmp_path)
    assert not ok and "stanford-corenlp-3.6.0-models.jar" in reason and "never" in reason
    (spice_dir / metrics.SPICE_FILES[2]).write_bytes(b"jar")
    assert spice_status(tmp_path)[0]


@needs_java
@pytest.mark.slow
def test_meteor_failure_becomes_a_note(monkeypatch):
    def broken(gts, res):
        raise ValueError("could not convert string to float: ''")

    monkeypatch.setattr(metrics, "_meteor", broken)
    out = score_captions([{"image_id": 1, "caption": "a cat"}], {1: ["a cat", "the cat"]})
    assert out.tokenizer == "ptb" and "METEOR" not in out.corpus and "CIDEr" in out.corpus
    assert any(n.startswith("METEOR failed") for n in out.notes)


def test_write_json_and_table(tmp_path):
    result = MetricsResult(corpus={"Bleu_4": 0.25, "CIDEr": 0.9, "SPICE": math.nan},
                           per_image={np.int64(3): {"CIDEr": 0.9}}, tokenizer="fallback",
                           notes=["METEOR skipped"], n_images=1)
    res_path = write_results_json(tmp_path / "out" / "results.json",
                                  [{"image_id": np.int64(3), "caption": "a café", "extra": 1}])
    assert json.loads(res_path.read_text()) == [{"image_id": 3, "caption": "a café"}]
    met_path = write_metrics_json(tmp_path / "out" / "metrics.json", result, extra={"perplexity": 12.5})
    data = json.loads(met_path.read_text())
    assert data["format"] == "showtell-metrics" and data["version"] == 1
    assert list(data["metrics"]) == ["perplexity", "Bleu_4", "CIDEr", "SPICE"]
    assert data["metrics"]["SPICE"] is None
    assert data["per_image"] == [{"image_id": 3, "CIDEr": 0.9}] and data["notes"] == ["METEOR skipped"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.json", "results.json"]
    table = format_metrics_table(result, extra={"perplexity": 12.5}).splitlines()
    assert table[1].split() == ["perplexity", "12.5000"]
    rows = [row.split() for row in table]
    assert ["BLEU-4", "0.2500"] in rows and ["METEOR", "skipped"] in rows and ["SPICE", "nan"] in rows
    assert table[-1] == "note: METEOR skipped"


def test_results_json_keeps_file_name_and_refuses_non_coco_entries(tmp_path):
    path = write_results_json(tmp_path / "r.json", [
        {"image_id": 7, "caption": "a dog", "file_name": "imgs/7.jpg"},
        {"image_id": -1, "caption": "a cat", "file_name": "photos/cat.png", "logprob": -3.2}])
    assert json.loads(path.read_text()) == [
        {"image_id": 7, "caption": "a dog", "file_name": "imgs/7.jpg"},
        {"image_id": -1, "caption": "a cat", "file_name": "photos/cat.png"}]
    assert write_results_json(tmp_path / "empty.json", []).read_text() == "[]\n"
    for bad in ({"image_id": "7", "caption": "x"}, {"image_id": True, "caption": "x"},
                {"image_id": 7, "caption": None}, {"image_id": 7, "caption": "x", "file_name": 3}, "7"):
        with pytest.raises(InputError):
            write_results_json(tmp_path / "bad.json", [{"image_id": 1, "caption": "ok"}, bad])
    assert not (tmp_path / "bad.json").exists()


def test_text_and_html_tables_share_their_rows(tmp_path):
    result = MetricsResult(corpus={"CIDEr": 0.5, "Bleu_1": 0.25}, per_image={1: {"CIDEr": 0.5}},
                           tokenizer="ptb", n_images=1)
    rows = metrics_rows(result, {"perplexity": 3.0})
    assert rows == [("perplexity", "3.0000"), ("BLEU-1", "0.2500"), ("BLEU-2", "skipped"),
                    ("BLEU-3", "skipped"), ("BLEU-4", "skipped"), ("METEOR", "skipped"),
                    ("ROUGE-L", "skipped"), ("CIDEr", "0.5000")]
    table = format_metrics_table(result, {"perplexity": 3.0}).splitlines()
    assert [tuple(line.rsplit(None, 1)) for line in table[1:-1]] == rows
    assert table[-1] == metrics_footer(result) == "1 images, tokenizer: PTB"
    page = write_report(tmp_path / "r.html", [{"image_id": 1, "caption": "c"}], result,
                        extra={"perplexity": 3.0}).path.read_text()
    assert "".join(f"<tr><td>{n}</td><td>{v}</td></tr>" for n, v in rows) in page
    assert metrics_footer(result) in page


def test_ptb_failure_falls_back(monkeypatch):
    def broken(*args):
        raise RuntimeError("PTBTokenizer returned 1 lines for 2 captions")

    monkeypatch.setattr(metrics, "find_java", lambda: "/usr/bin/java")
    monkeypatch.setattr(metrics, "ptb_tokenize", broken)
    out = score_captions([{"image_id": 1, "caption": "a cat"}], {1: ["a cat", "the cat"]})
    assert out.tokenizer == "fallback" and "METEOR" not in out.corpus and out.corpus["Bleu_1"] > 0.99
    assert any(n.startswith("PTB tokenizer failed (PTBTokenizer returned 1 lines") for n in out.notes)
