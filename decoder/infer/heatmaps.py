"""The heat-map strip of an attention model: one picture per image showing where it looked for each word,
drawn for `caption --attention DIR` (one PNG file per image) and for the HTML report of `evaluate --report`
(decoder.infer.evaluate hands `caption_strip` to evaluation.report, which embeds it).

A row of square panels: first the image as the CNN saw it (THE preprocessing's geometry: resized to R x R,
aspect not kept, central S x S crop), then one panel per word of the best caption: that image lit by the
word's attention weights (the [h, w] grid upsampled bilinearly to the panel, scaled to its maximum; the
unattended parts are darkened), the word written under it. Without an image file (a store key that is not
found under --images) the panels show the weights alone on grey.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from base.atomic import atomic_path
from extract.preprocess import BadImage, decode_image, resize_size

PANEL = 128  # side of one panel in pixels
TEXT = 18  # height of the word strip under the panels
FLOOR = 0.2  # brightness kept where a word's attention is zero


def cnn_view(path, image_size: int) -> np.ndarray | None:
    """uint8 [PANEL, PANEL, 3]: the image file as the CNN saw it (resize R x R, central S crop), None when
    it cannot be decoded."""
    try:
        pixels = decode_image(path, image_size)
    except BadImage:
        return None
    r, s = resize_size(image_size), image_size
    im = Image.fromarray(pixels).resize((r, r), Image.BILINEAR)
    top = (r - s) // 2
    return np.asarray(im.crop((top, top, top + s, top + s)).resize((PANEL, PANEL), Image.BILINEAR))


def upsample(weights: np.ndarray) -> np.ndarray:
    """float [h, w] attention weights -> float32 [PANEL, PANEL] in [0, 1] (bilinear, scaled to the max)."""
    up = Image.fromarray(np.asarray(weights, np.float32), "F").resize((PANEL, PANEL), Image.BILINEAR)
    up = np.asarray(up, np.float32)
    return up / max(float(up.max()), 1e-12)


def strip(image: np.ndarray | None, words: list[str], attention: np.ndarray) -> Image.Image:
    """The PNG of one image: image: uint8 [PANEL, PANEL, 3] or None; words [n]; attention float [n, h, w]."""
    base = image.astype(np.float32) if image is not None else np.full((PANEL, PANEL, 3), 160.0, np.float32)
    out = Image.new("RGB", ((len(words) + 1) * PANEL, PANEL + TEXT), "white")
    out.paste(Image.fromarray(base.astype(np.uint8)), (0, 0))
    draw, font = ImageDraw.Draw(out), ImageFont.load_default()
    draw.text((4, PANEL + 3), "input", fill="black", font=font)
    for i, (word, weights) in enumerate(zip(words, attention, strict=True)):
        heat = upsample(weights)[..., None]
        lit = base * (FLOOR + (1 - FLOOR) * heat) if image is not None else 255.0 * heat.repeat(3, -1)
        out.paste(Image.fromarray(np.clip(lit, 0, 255).astype(np.uint8)), ((i + 1) * PANEL, 0))
        draw.text(((i + 1) * PANEL + 4, PANEL + 3), word, fill="black", font=font)
    return out


def caption_strip(image_path, image_size: int, caption: str, attention: np.ndarray) -> Image.Image:
    """The strip of one captioned image: image_path the file or None (weights on grey; an undecodable file
    too); caption the best caption's text; attention float [n, h, w] of its words (extra rows are ignored)."""
    image = cnn_view(image_path, image_size) if image_path else None
    words = caption.split()[: len(attention)]
    return strip(image, words, attention[: len(words)])


def file_name(index: int, key: str) -> str:
    """"00003_dir_img.png": the item's position and its key with every non-alphanumeric run as "_"."""
    stem = re.sub(r"[^A-Za-z0-9]+", "_", Path(key).with_suffix("").as_posix()).strip("_")[-80:]
    return f"{index:05d}_{stem or 'image'}.png"


def write_heatmaps(results, out_dir, image_size: int, find_image=lambda key: None) -> int:
    """Write one PNG (atomically) per captioned result with attention weights (decoder.infer.captioner
    ImageCaptions) into `out_dir` (created); find_image(key) -> an image path or None. Returns how many."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for index, item in enumerate(results):
        if item.error or item.attention is None or not item.texts:
            continue
        image = caption_strip(find_image(item.key), image_size, item.texts[0], item.attention)
        with atomic_path(out_dir / file_name(index, item.key), ".png") as tmp:
            image.save(tmp, format="PNG")
        written += 1
    return written
