"""`demo`: the tiny preset (same code path as `make demo`, fewer images and steps) must caption held-out
test images right (their colour and shape words), print each step's command line, and resume on a rerun."""

import json

import pytest

from evaluation.shapes import named_in as named


@pytest.mark.slow
def test_tiny_demo_captions_are_right_and_a_rerun_resumes(tmp_path):
    from decoder.demo import DemoConfig, run_demo

    lines = []
    result = run_demo(tmp_path / "demo", DemoConfig.preset("tiny"), progress=False, echo=lines.append,
                      log=lambda m: None)
    text = "\n".join(lines)
    for command in ("extract", "train-decoder", "caption", "evaluate"):
        assert f"$ python cli.py {command} " in text, command
    assert "--cnn-weights none" in text
    truth = {im["id"]: im["shapes"] for im in json.loads(result.captions_json.read_text())["images"]}
    items = result.evaluation.items
    assert len(items) == 50 and not result.evaluation.skipped  # 10% of 500 images
    right = [named(it.caption) == ({s["colour"] for s in truth[it.record.image_id]},
                                   {s["shape"] for s in truth[it.record.image_id]}) for it in items]
    colour = [named(it.caption)[0] == {s["colour"] for s in truth[it.record.image_id]} for it in items]
    # the bar: most held-out captions name exactly the right colour and shape (chance: 1 in 20), and the
    # colour nearly always
    assert sum(right) >= 0.8 * len(items), [it.caption for it in items]
    assert sum(colour) >= 0.9 * len(items), [it.caption for it in items]
    assert len({it.caption for it in items}) >= 5  # not one caption for every image
    assert "BLEU-4" in lines[-2] and "CIDEr" in lines[-2]
    assert (f"one-shape images {sum(right)}/{len(items)} " in lines[-3]
            and f"colour words right: {sum(colour)}/{len(items)}" in lines[-3]), lines[-3]
    assert result.evaluation.metrics.corpus["CIDEr"] > 1.0

    again = []
    rerun = run_demo(tmp_path / "demo", DemoConfig.preset("tiny"), progress=False, echo=again.append,
                     log=lambda m: None)
    assert any("resuming" in line for line in again)
    assert any("done 0 | skipped 500" in line for line in again)  # extract found its work done
    assert [it.caption for it in rerun.evaluation.items] == [it.caption for it in items]
