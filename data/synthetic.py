"""A deterministic synthetic captioned-image set: one or two coloured shapes on a plain light background.

`generate_shapes(out_dir, n_images, image_size, seed)` writes `out_dir/images/shape_NNNNN.jpg` and
`out_dir/captions.json` (COCO captions format; `file_name` is relative to `out_dir/images`, the images root).
Every image entry carries its own `"split"` (first 80% train, next 10% val, last 10% test) and a `"shapes"`
list describing what was drawn (`colour`, `shape`, `size`, centre `x`, `y` in pixels) for tests and probes.

Few, distinct attributes so a small decoder can learn them from random-InceptionV3 features in minutes:
5 saturated colours x 4 shapes x 2 sizes; two-shape images add a relation (above, below, left of, right of).
Each image gets 3-5 paraphrased captions ("a red circle above a blue square", "there is a small red circle
over a blue square", ...). Same seed -> same bytes. Checking generated captions against the drawn shapes is
evaluation code: `evaluation/shapes.py`.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from base.atomic import atomic_write_json

COLOURS = {
    "red": (220, 30, 30),
    "green": (20, 160, 40),
    "blue": (30, 60, 230),
    "yellow": (245, 200, 0),
    "purple": (140, 30, 170),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": (0.11, 0.14), "large": (0.18, 0.21)}  # half-width as a fraction of the image side
RELATIONS = {
    "above": ("above", "over", "below"),
    "below": ("below", "under", "above"),
    "left of": ("to the left of", "left of", "to the right of"),
    "right of": ("to the right of", "right of", "to the left of"),
}
SPLIT_FRACTIONS = (0.8, 0.1)  # train, val; the rest is test
PAIR_FRACTION = 0.5  # share of images with two shapes


def _random_object(rng: np.random.Generator) -> dict:
    return {
        "colour": str(rng.choice(list(COLOURS))),
        "shape": str(rng.choice(SHAPES)),
        "size": str(rng.choice(list(SIZES))),
    }


def random_scene(rng: np.random.Generator, image_size: int, pair: bool) -> dict:
    """A scene: {"background": [r, g, b], "objects": [obj, ...], "relation": str | None}.

    obj = {"colour", "shape", "size", "r" (half-width px), "x", "y" (centre px)}. With two objects, the
    first one is `relation` the second ("above" = smaller y); they never both share colour and shape.
    """
    s = image_size
    grey = int(rng.integers(225, 251))
    background = [grey, grey, int(min(255, grey + rng.integers(0, 5)))]
    objects = [_random_object(rng)]
    relation = None
    if pair:
        second = _random_object(rng)
        while (second["colour"], second["shape"]) == (objects[0]["colour"], objects[0]["shape"]):
            second = _random_object(rng)
        objects.append(second)
        relation = str(rng.choice(list(RELATIONS)))
    for k, obj in enumerate(objects):
        lo, hi = SIZES[obj["size"]]
        obj["r"] = r = int(round(s * rng.uniform(lo, hi)))
        jitter = lambda: int(rng.integers(-s // 16, s // 16 + 1))  # noqa: E731
        if not pair:
            x, y = s // 2 + jitter(), s // 2 + jitter()
        else:  # first object in one half, second in the other, along the relation's axis
            near, far = round(0.28 * s), round(0.72 * s)
            first_low = relation in ("above", "left of")
            main = (near if first_low else far) if k == 0 else (far if first_low else near)
            cross = s // 2 + jitter()
            x, y = (cross, main) if relation in ("above", "below") else (main, cross)
        obj["x"], obj["y"] = int(np.clip(x, r + 1, s - r - 2)), int(np.clip(y, r + 1, s - r - 2))
    return {"background": background, "objects": objects, "relation": relation}


def render(scene: dict, image_size: int) -> Image.Image:
    """PIL RGB image [image_size, image_size] of a scene (drawn at 4x and downsampled: smooth edges)."""
    k = 4
    img = Image.new("RGB", (image_size * k, image_size * k), tuple(scene["background"]))
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        x, y, r, fill = obj["x"] * k, obj["y"] * k, obj["r"] * k, COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
        elif obj["shape"] == "triangle":
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
        else:  # cross: two bars a third of the width thick
            t = r // 3
            draw.rectangle([x - r, y - t, x + r, y + t], fill=fill)
            draw.rectangle([x - t, y - r, x + t, y + r], fill=fill)
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS)


def captions_for(scene: dict, rng: np.random.Generator) -> list[str]:
    """3-5 distinct paraphrased captions of a scene."""
    objs = scene["objects"]
    a = objs[0]
    ca, sa, za = a["colour"], a["shape"], a["size"]
    if len(objs) == 1:
        pool = [
            f"a {ca} {sa}",
            f"a {za} {ca} {sa}",
            f"there is a {za} {ca} {sa}",
            f"a {ca} {sa} on a light background",
            f"a picture of a {za} {ca} {sa}",
            f"a single {ca} {sa} in the middle",
        ]
    else:
        b = objs[1]
        cb, sb, zb = b["colour"], b["shape"], b["size"]
        rel, rel2, inverse = RELATIONS[scene["relation"]]
        pool = [
            f"a {ca} {sa} {rel} a {cb} {sb}",
            f"there is a {za} {ca} {sa} {rel2} a {cb} {sb}",
            f"a {cb} {sb} {inverse} a {ca} {sa}",
            f"a {ca} {sa} and a {cb} {sb}",
            f"two shapes : a {za} {ca} {sa} and a {zb} {cb} {sb}",
        ]
    n = int(rng.integers(3, 6))
    return [pool[i] for i in sorted(rng.choice(len(pool), size=min(n, len(pool)), replace=False))]


def _split_of(index: int, n_images: int) -> str:
    train_end = int(round(SPLIT_FRACTIONS[0] * n_images))
    val_end = train_end + int(round(SPLIT_FRACTIONS[1] * n_images))
    return "train" if index < train_end else "val" if index < val_end else "test"


def generate_shapes(
    out_dir: str | Path,
    n_images: int = 300,
    image_size: int = 96,
    seed: int = 0,
    pair_fraction: float = PAIR_FRACTION,
) -> Path:
    """Write the synthetic set; returns the path of captions.json.

    Args:
      out_dir: folder to create/fill; images go to out_dir/images (the images root).
      n_images: number of images; image_size: side in pixels (InceptionV3 needs >= 75).
      seed: everything (scenes, captions, splits) is a function of the seed.
      pair_fraction: share of images with two shapes (0: one shape each).
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(n_images):
        scene = random_scene(rng, image_size, pair=bool(rng.random() < pair_fraction))
        name = f"shape_{i:05d}.jpg"
        render(scene, image_size).save(out_dir / "images" / name, format="JPEG", quality=95)
        shapes = [{k: o[k] for k in ("colour", "shape", "size", "x", "y")} for o in scene["objects"]]
        images.append(
            {
                "id": i + 1,
                "file_name": name,
                "width": image_size,
                "height": image_size,
                "split": _split_of(i, n_images),
                "shapes": shapes,
                "relation": scene["relation"],
            }
        )
        for caption in captions_for(scene, rng):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "caption": caption})
    data = {
        "info": {"description": f"showtell synthetic shapes (seed {seed})", "version": "1.0"},
        "images": images,
        "annotations": annotations,
    }
    return atomic_write_json(out_dir / "captions.json", data, indent=1)

