"""The `caption` command's run: caption image files or feature-store rows with a model dir
(decoder.infer.captioner), print each image's top captions like im2txt's run_inference, and write the COCO
results JSON (`--json`) and, for an attention model dir, the heat-map PNGs (`--attention`,
decoder.infer.heatmaps). cli.py checks the options and prints the precision; everything after is here.
"""

from __future__ import annotations

import math
from pathlib import Path

from base.cli_support import one_line
from base.errors import InputError
from beam import SearchConfig
from decoder.infer.captioner import Captioner, CaptionRun, caption_files, caption_store
from decoder.infer.heatmaps import write_heatmaps
from evaluation.metrics import write_results_json
from extract.inputs import resolve_image


def run_caption(model_dir, search: SearchConfig, weights: str = "last", paths=(), features=None, keys=(), *,
                batch_size: int = 32, top: int = 3, json_out=None, attention_dir=None, images_roots=(),
                progress: bool = True, echo=print, log=print) -> CaptionRun:
    """Caption image `paths` (files, folders, globs) or the rows of feature store `features` (only `keys`
    when given), `batch_size` images per CNN and search batch. Prints (`echo`) each image's `top` captions
    with p = exp(logprob) and the summary line; a bad image is skipped with one line on `log`. Writes
    `json_out` and, given `attention_dir`, the heat-maps (images: the paths themselves, or the store keys
    found under `images_roots`). An attention directory for a Show and Tell model dir raises InputError."""
    captioner = Captioner(model_dir, search, weights)
    if attention_dir and captioner.grid is None:
        raise InputError(f"--attention: {model_dir} is a Show and Tell model dir; heat-maps need an "
                         "attention model (train-decoder --arch attend).")
    if features:
        run = caption_store(captioner, features, keys, batch_size=batch_size, progress=progress)
    else:
        run = caption_files(captioner, paths, batch_size=batch_size, progress=progress)
    log(captioner.loaded.weights.describe())  # after the inputs were checked: a refusal stays one line
    print_captions(run, top, echo, log)
    if json_out:
        write_results_json(json_out, run.coco_results())
    if attention_dir:
        _write_heatmaps(captioner, run, attention_dir, images_roots if features else None, log)
    echo(run.summary() + (f" -> {json_out}" if json_out else ""))
    return run


def print_captions(run: CaptionRun, top: int, echo=print, log=print) -> None:
    """Each captioned image's `top` captions, numbered from 0 with p = exp(logprob), on `echo`; each
    skipped image's reason on `log`. Keys and reasons are printed on one line (control characters escaped)."""
    for item in run.results:
        if item.error:
            log(f"Skipped {one_line(item.key)}: {one_line(item.error)}")
            continue
        echo(f"Captions for image {one_line(item.key)}:")
        for i, (cap, text) in enumerate(zip(item.captions[:top], item.texts[:top], strict=True)):
            echo(f"  {i}) {text} (p={math.exp(cap.logprob):f})")


def _write_heatmaps(captioner: Captioner, run: CaptionRun, out_dir, images_roots, log) -> None:
    """`--attention`: the heat-map PNGs (decoder.infer.heatmaps), one line on `log`. The images: the keys
    themselves (image paths), or, for store rows (`images_roots` not None), the keys found under
    `images_roots` (not found: the weights alone)."""
    roots = None if images_roots is None else [Path(r) for r in images_roots]
    find = (lambda key: key) if roots is None else (lambda key: resolve_image(key, roots))
    size = captioner.loaded.image_size
    log(f"attention: {write_heatmaps(run.results, out_dir, size, find)} heat-map PNG(s) -> {out_dir}")
