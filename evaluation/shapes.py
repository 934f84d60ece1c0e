"""Caption accuracy on the synthetic shapes set (`data/synthetic.py`): does a generated caption name exactly
the colours and shapes that were drawn? The demo's pass bar; the "shapes" lists of the captions.json that
`data.synthetic.generate_shapes` writes are the truth.
"""

import json
from pathlib import Path

from data.synthetic import COLOURS, SHAPES


def named_in(caption: str) -> tuple[set, set]:
    """(colour words, shape words) that a caption names, e.g. "a red circle" -> ({"red"}, {"circle"})."""
    words = caption.split()
    return {w for w in words if w in COLOURS}, {w for w in words if w in SHAPES}


def caption_accuracy(captions: dict, captions_json) -> dict:
    """How many captions name exactly the drawn colours and shapes.

    captions: {image id: generated caption}; captions_json: the file `generate_shapes` wrote (its images'
    "shapes" lists are the truth). Returns {"single": [right, n], "pair": [right, n], "colour": [right, n]}
    over the given images ("colour": the colour words alone, all images).
    """
    truth = {im["id"]: im["shapes"] for im in json.loads(Path(captions_json).read_text())["images"]}
    out = {"single": [0, 0], "pair": [0, 0], "colour": [0, 0]}
    for image_id, caption in captions.items():
        shapes = truth[image_id]
        colours, kinds = named_in(caption)
        want_colours, want_kinds = {s["colour"] for s in shapes}, {s["shape"] for s in shapes}
        key = "single" if len(shapes) == 1 else "pair"
        out[key][0] += colours == want_colours and kinds == want_kinds
        out[key][1] += 1
        out["colour"][0] += colours == want_colours
        out["colour"][1] += 1
    return out
