"""evaluation/report.py: a self-contained, escaped HTML page, worst CIDEr first, placeholders for bad images.
"""

import base64
import io
import re

from PIL import Image

from evaluation.metrics import MetricsResult, score_captions
from evaluation.report import ReportItem, write_report


def _jpeg(path, size=(400, 300), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path, format="JPEG")
    return path


def _page(tmp_path):
    good = _jpeg(tmp_path / "good.jpg")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not a jpeg at all")
    items = [
        ReportItem(1, "a red square", ["a red square", "a big red box"], good),
        {"image_id": 2, "caption": '<script>alert("x")</script> & co', "references": ["a <b>bold</b> claim"],
         "image_path": tmp_path / "nowhere.jpg"},
        ReportItem(3, "a thing", ["an unreadable image"], junk),
        ReportItem(4, "never scored", ["x"], None),
    ]
    metrics = MetricsResult(corpus={"Bleu_4": 0.1234, "CIDEr": 0.5}, tokenizer="ptb", n_images=3,
                            per_image={1: {"CIDEr": 2.0, "Bleu_4": 0.9}, 2: {"CIDEr": 0.1},
                                       3: {"CIDEr": 1.0}},
                            notes=["METEOR failed & was skipped"])
    stats = write_report(tmp_path / "out" / "report.html", items, metrics, extra={"perplexity": 9.75})
    return stats, stats.path.read_text(encoding="utf-8")


def test_report_is_self_contained_and_escaped(tmp_path):
    stats, page = _page(tmp_path)
    assert "href" not in page and "http" not in page and "url(" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 1 and sources[0].startswith("data:image/jpeg;base64,")
    thumb = Image.open(io.BytesIO(base64.b64decode(sources[0].split(",", 1)[1])))
    assert thumb.format == "JPEG" and thumb.size == (160, 120)
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in page
    assert "a &lt;b&gt;bold&lt;/b&gt; claim" in page and "METEOR failed &amp; was skipped" in page
    assert "<td>perplexity</td><td>9.7500</td>" in page and "<td>BLEU-4</td><td>0.1234</td>" in page
    assert "<td>METEOR</td><td>skipped</td>" in page
    assert [p.name for p in stats.path.parent.iterdir()] == ["report.html"]


def test_report_orders_worst_first_and_survives_bad_images(tmp_path):
    stats, page = _page(tmp_path)
    order = re.findall(r"#(\d+) · image (\d+)", page)
    assert order == [("1", "2"), ("2", "3"), ("3", "1"), ("4", "4")]
    assert page.count('class="missing"') == 3
    assert "image file not found" in page and "unreadable image" in page and "no image file given" in page
    assert "CIDEr not scored" in page and "CIDEr 0.100" in page
    assert (stats.n_items, stats.n_missing_images) == (4, 3)
    assert "4 images, 3 without a thumbnail" in stats.summary()


def test_report_from_real_scores(tmp_path):
    refs = {10: ["a blue circle on grey"] * 3, 11: ["a green triangle on white"] * 3}
    results = [{"image_id": 10, "caption": "a blue circle on grey"},
               {"image_id": 11, "caption": "a red square"}]
    metrics = score_captions(results, refs, use_java=False)
    items = [ReportItem(r["image_id"], r["caption"], refs[r["image_id"]],
                        _jpeg(tmp_path / f"{r['image_id']}.jpg", (90, 200))) for r in results]
    stats = write_report(tmp_path / "r.html", items, metrics)
    page = stats.path.read_text(encoding="utf-8")
    assert re.findall(r"· image (\d+)", page) == ["11", "10"] and stats.n_missing_images == 0
    assert "fallback (no java)" in page
