"""The HTML report of `evaluate --report` for an attention model dir (issue 18): under each image the heat-map
strip of decoder.infer.heatmaps (the image as the CNN saw it, then one panel per word of the caption), the
weights on grey without an images root, no strip for a Show and Tell model, at most MAX_STRIPS strips."""

from __future__ import annotations

import base64
import html
import io
import re

import numpy as np
import pytest
from attend_data import shapes_with_grid, train_tiny_attend
from helpers import cli
from PIL import Image

from decoder.infer.evaluate import EvalConfig, run_evaluate
from decoder.infer.heatmaps import PANEL, TEXT
from decoder.train.config import TrainConfig
from decoder.train.train_decoder import DataConfig, train_decoder
from evaluation.metrics import MetricsResult
from evaluation.report import ReportItem, write_report

_ITEM = re.compile(r'<div class="item" id="rank\d+">.*?</div></div>(?=\n|</body>)', re.S)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A small synthetic shapes set at 160 px and its grid store: (root, captions.json, grid.h5)."""
    root = tmp_path_factory.mktemp("shapes")
    return root, *shapes_with_grid(root)


def _train_attend(shapes, model):
    """An attend model dir trained long enough (120 steps, 32 wide) to caption the test images."""
    _, captions, store = shapes
    train_tiny_attend(store, captions, model, 120, units=32, learning_rate=0.02)
    return model


def _report(shapes, model, out, images=None):
    """evaluate --report on the test split (the CLI with an images root, else in-process: faster);
    [(caption, strip image or None)] of each image shown."""
    _, captions, store = shapes
    if images:
        cli("evaluate", "--model-dir", model, "--features", store, "--captions", captions, "--split", "test",
            "--java", "no", "--out-dir", out, "--report", out / "report.html", "--precision", "float32",
            "--no-progress", "--images", images)
    else:
        run_evaluate(EvalConfig(str(model), [str(captions)], features=str(store), out_dir=str(out),
                                report=str(out / "report.html"), use_java=False, progress=False),
                     log=lambda *_: None)
    shown = []
    for item in _ITEM.findall((out / "report.html").read_text(encoding="utf-8")):
        caption = html.unescape(re.search(r'<div class="gen">(.*?)</div>', item).group(1))
        strips = re.findall(r'<div class="strip"><img src="data:image/jpeg;base64,([^"]+)"', item)
        assert len(strips) <= 1
        shown.append((caption, Image.open(io.BytesIO(base64.b64decode(strips[0]))) if strips else None))
    return shown


def _input_panel(strip: Image.Image) -> np.ndarray:
    """float32 [PANEL, PANEL, 3]: the first panel of a strip (the image as the CNN saw it, or grey)."""
    return np.asarray(strip.convert("RGB"), np.float32)[:PANEL, :PANEL]


@pytest.mark.slow
def test_attend_report_shows_a_strip_per_image_and_show_and_tell_none(shapes, tmp_path):
    """Attend model dir: every image of the report has one strip, one 128-px panel per word of its caption
    plus the input panel (the shapes image; grey without --images). Show and Tell: no strip at all."""
    root = shapes[0]
    attend = _train_attend(shapes, tmp_path / "attend")
    shown = _report(shapes, attend, tmp_path / "eval", root / "images")
    assert len(shown) == 4  # the test split of 40 generated images
    for caption, strip in shown:
        assert strip is not None and len(caption.split()) >= 1
        assert strip.size == (PANEL * (1 + len(caption.split())), PANEL + TEXT)
        assert _input_panel(strip).std() > 10  # the image, not a flat grey
    shown = _report(shapes, attend, tmp_path / "grey")  # features only: the weights on grey
    assert len(shown) == 4
    for caption, strip in shown:
        assert strip.size == (PANEL * (1 + len(caption.split())), PANEL + TEXT)
        assert np.abs(_input_panel(strip) - 160).max() < 12  # JPEG noise around the grey 160
    _, captions, store = shapes
    data = DataConfig(features=str(store), captions=[str(captions)], min_word_count=1)
    train = TrainConfig(steps=2, batch_size=16, eval_every=2, checkpoint_every=2, precision="float32")
    train_decoder(data, tmp_path / "sat", train, embedding_size=16, lstm_units=16, progress=False,
                  log=lambda *_: None)
    shown = _report(shapes, tmp_path / "sat", tmp_path / "sat-eval")
    assert len(shown) == 4 and all(strip is None for _, strip in shown)
    assert 'class="strip"' not in (tmp_path / "sat-eval" / "report.html").read_text(encoding="utf-8")


def test_report_embeds_at_most_max_strips(tmp_path):
    """Only the first `max_strips` images shown (the worst CIDEr) draw and show a strip; the page says so."""
    drawn = []

    def drawer(i):
        return lambda: drawn.append(i) or Image.new("RGB", (3 * PANEL, PANEL + TEXT), (200, 0, 0))

    items = [ReportItem(i, f"caption {i}", ["ref"], None, strip=drawer(i)) for i in range(5)]
    items.append(ReportItem(9, "no weights", ["ref"], None))
    metrics = MetricsResult(corpus={"CIDEr": 0.5}, tokenizer="simple", n_images=6,
                            per_image={i: {"CIDEr": 1.0 - 0.1 * i} for i in [*range(5), 9]})
    stats = write_report(tmp_path / "r.html", items, metrics, max_strips=2)
    page = stats.path.read_text(encoding="utf-8")
    assert sorted(drawn) == [3, 4] and page.count('class="strip"') == 2  # worst first: ids 9, 4, 3, ...
    assert "first 2 images only (of 5)" in page and stats.n_strips == 2
    assert "2 with a heat-map strip" in stats.summary()
    strip = re.search(r'class="strip"><img src="data:image/jpeg;base64,([^"]+)"', page).group(1)
    assert Image.open(io.BytesIO(base64.b64decode(strip))).size == (3 * PANEL, PANEL + TEXT)
