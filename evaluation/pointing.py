"""Pointing accuracy of an attention model on the generated shapes (data.synthetic): does it look at the
object a word names?

For each colour or shape word of a caption of a two-shape image, the grid cell with the highest attention
weight while the word was emitted must overlap the object the word names: the object's box covers at least
MIN_COVER of the cell. A word naming no drawn object (a wrong word) or both objects (same colour, or same
shape) names no single object and is not counted. Chance — the share of cells that would count, averaged
over the counted words — is returned with the hits (about 2 cells in 9 on a 3x3 grid at 160 px); a bare
"touches the box" rule would make it ~50%, since a large shape's box touches 4-6 of 9 cells.

Geometry: the CNN saw the S x S image resized to R x R (aspect not kept) and centrally cropped to S x S
(extract.preprocess), so a drawn point x maps to x * R / S - (R - S) / 2 in the crop; cell (i, j) of an
h x w grid covers rows [i S / h, (i + 1) S / h) and columns [j S / w, (j + 1) S / w) of the crop (the cells'
nominal tiling; their receptive fields are larger). An object is its bounding square: centre +- the middle
half-width of its size class (data.synthetic.SIZES).
"""

from __future__ import annotations

import numpy as np

from data.synthetic import COLOURS, SHAPES, SIZES

WORDS = {**{c: "colour" for c in COLOURS}, **{s: "shape" for s in SHAPES}}
MIN_COVER = 0.25  # share of a cell the named object's box must cover for the cell to point at it


def object_box(obj: dict, image_size: int, resize: int) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of a drawn object (data.synthetic "shapes" entry: x, y, size) in crop pixels."""
    half = sum(SIZES[obj["size"]]) / 2 * image_size
    scale, shift = resize / image_size, (resize - image_size) / 2
    x, y = obj["x"] * scale - shift, obj["y"] * scale - shift
    return x - half * scale, y - half * scale, x + half * scale, y + half * scale


def cell_box(i: int, j: int, grid: tuple[int, int], image_size: int) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of grid cell (row i, column j) in crop pixels."""
    h, w = grid
    return j * image_size / w, i * image_size / h, (j + 1) * image_size / w, (i + 1) * image_size / h


def cover(cell, box) -> float:
    """Share of the area of `cell` (x0, y0, x1, y1) inside `box`."""
    w = max(0.0, min(cell[2], box[2]) - max(cell[0], box[0]))
    h = max(0.0, min(cell[3], box[3]) - max(cell[1], box[1]))
    return w * h / ((cell[2] - cell[0]) * (cell[3] - cell[1]))


def named_object(word: str, objects: list[dict]) -> dict | None:
    """The one object a colour/shape word names, None for another word or when it names 0 or 2 objects."""
    kind = WORDS.get(word)
    hits = [o for o in objects if kind and o[kind] == word]
    return hits[0] if len(hits) == 1 else None


def pointing_hits(words: list[str], attention: np.ndarray, objects: list[dict], image_size: int,
                  resize: int) -> tuple[int, int, float]:
    """(hits, counted words, chance: summed share of cells that would count) of one caption: words [n];
    attention float [n, h, w] (word k's weights); objects: the image's drawn shapes (x, y, size, colour,
    shape)."""
    hits = total = 0
    chance = 0.0
    grid = attention.shape[1:]
    for word, weights in zip(words, attention, strict=False):
        obj = named_object(word, objects)
        if obj is None:
            continue
        box = object_box(obj, image_size, resize)
        good = np.array([[cover(cell_box(i, j, grid, image_size), box) >= MIN_COVER for j in range(grid[1])]
                         for i in range(grid[0])])
        total, chance = total + 1, chance + float(good.mean())
        hits += bool(good.flat[int(np.argmax(weights))])
    return hits, total, chance


def pointing_accuracy(items, image_size: int, resize: int) -> tuple[int, int, float]:
    """(hits, counted words, chance share) over items [(words [n], attention float [n, h, w], objects)],
    two-shape images only (one-shape images are skipped: their object sits in the middle, where any model
    looks). chance: the expected share of hits of a model pointing at a random cell."""
    hits = total = 0
    chance = 0.0
    for words, attention, objects in items:
        if len(objects) == 2 and attention is not None:
            h, t, c = pointing_hits(words, attention, objects, image_size, resize)
            hits, total, chance = hits + h, total + t, chance + c
    return hits, total, chance / max(total, 1)
