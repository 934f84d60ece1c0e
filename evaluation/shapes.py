"""Caption accuracy on the synthetic shapes set (`data/synthetic.py`): does a generated caption name exactly
the colours and shapes that were drawn? The demo's pass bar; the "shapes" lists of the captions.json that
`data.synthetic.generate_shapes` writes are the truth.
"""

import json
from pathlib import Path

from data.synthetic import COLOURS, RELATIONS, SHAPES

# every phrase the generator writes for a relation -> the relation ("over" -> "above", "to the left of" ->
# "left of"), and each relation's inverse (what the second object is to the first)
PHRASES = {phrase: rel for rel, (p1, p2, _) in RELATIONS.items() for phrase in (p1, p2)}
INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def named_in(caption: str) -> tuple[set, set]:
    """(colour words, shape words) that a caption names, e.g. "a red circle" -> ({"red"}, {"circle"})."""
    words = caption.split()
    return {w for w in words if w in COLOURS}, {w for w in words if w in SHAPES}


def named_objects(caption: str) -> list[tuple[str, str, int]]:
    """The objects a caption names: [(colour, shape, word index)] for each colour word directly followed by
    a shape word, e.g. "a small red circle above a blue square" -> [("red", "circle", 2), ("blue", "square",
    6)]."""
    words = caption.split()
    return [(w, words[i + 1], i) for i, w in enumerate(words[:-1]) if w in COLOURS and words[i + 1] in SHAPES]


def stated_relation(caption: str) -> tuple[tuple[str, str], str, tuple[str, str]] | None:
    """(first object (colour, shape), relation, second object) when the caption names exactly two objects
    and joins them by a relation phrase ("a red circle to the left of a blue square"); None otherwise (one
    object, three, or "and")."""
    objects, words = named_objects(caption), caption.split()
    if len(objects) != 2:
        return None
    (c1, s1, i1), (c2, s2, i2) = objects
    between = words[i1 + 2:i2]
    while between and between[-1] in ("a", "an", "the", "small", "large"):
        between = between[:-1]
    rel = PHRASES.get(" ".join(between))
    return None if rel is None else ((c1, s1), rel, (c2, s2))


def pair_right(caption: str, shapes: list[dict], relation: str | None) -> bool:
    """The strict two-shape check: the caption names both drawn objects (colour + shape, and no other colour
    or shape word) and states their relation correctly. shapes: the two drawn objects, the first being
    `relation` the second (data.synthetic); a caption stating no relation is wrong."""
    stated = stated_relation(caption)
    words = caption.split()
    if stated is None or len(shapes) != 2 or relation is None \
            or sum(w in COLOURS for w in words) != 2 or sum(w in SHAPES for w in words) != 2:
        return False
    first, rel, second = stated
    a, b = ((s["colour"], s["shape"]) for s in shapes)
    if (first, second) == (a, b):
        return rel == relation
    return (first, second) == (b, a) and rel == INVERSE[relation]


def caption_accuracy(captions: dict, captions_json) -> dict:
    """How many captions name exactly the drawn colours and shapes.

    captions: {image id: generated caption}; captions_json: the file `generate_shapes` wrote (its images'
    "shapes" lists are the truth). Returns {"single": [right, n], "pair": [right, n], "colour": [right, n]}
    over the given images ("colour": the colour words alone, all images), and "pair_strict": [right, n] over
    the two-shape images by `pair_right` (both objects named as drawn and their relation stated correctly).
    """
    images = {im["id"]: im for im in json.loads(Path(captions_json).read_text())["images"]}
    truth = {i: im["shapes"] for i, im in images.items()}
    out = {"single": [0, 0], "pair": [0, 0], "pair_strict": [0, 0], "colour": [0, 0]}
    for image_id, caption in captions.items():
        shapes = truth[image_id]
        colours, kinds = named_in(caption)
        want_colours, want_kinds = {s["colour"] for s in shapes}, {s["shape"] for s in shapes}
        key = "single" if len(shapes) == 1 else "pair"
        out[key][0] += colours == want_colours and kinds == want_kinds
        out[key][1] += 1
        if key == "pair":
            out["pair_strict"][0] += pair_right(caption, shapes, images[image_id].get("relation"))
            out["pair_strict"][1] += 1
        out["colour"][0] += colours == want_colours
        out["colour"][1] += 1
    return out
