"""Image decoding (PIL) and THE one preprocessing function shared by `extract`, `finetune` and `caption`.

`decode_image(path, image_size)` turns any readable image file into uint8 RGB [H, W, 3]: EXIF rotation
applied, CMYK / grey / palette / alpha / 16-bit converted properly, content sniffed (a PNG named .jpg is
fine), decompression bombs refused from the header before any pixel is decoded, and very large images
decoded at a reduced scale (JPEG DCT scaling via `draft()`, other formats `reduce()`) so memory stays
bounded. A file that cannot be used raises `BadImage(reason)`; the reason starts with a short category
(`missing`, `empty`, `not-an-image`, `truncated`, `bomb`, `unreadable`, `decode-error`) and a colon.

`preprocess(image, image_size, training, seed)` is im2txt's `process_image`: float in [0, 1], bilinear
resize to R x R with R = round(S * 346 / 299) (aspect not kept; TF1 `resize_images` pixel grid), then a
central S x S crop (eval) or a random crop + im2txt's `distort_image` (training), then scale to [-1, 1].
"""

import io
import os
import warnings

import numpy as np
import tensorflow as tf
from PIL import Image, ImageOps, UnidentifiedImageError

# Images with more pixels than this (width * height, read from the header) are refused as decompression
# bombs before decoding. Pillow's own hard limit (2 * Image.MAX_IMAGE_PIXELS, ~179 Mpx).
MAX_PIXELS = 2 * 89_478_485

IM2TXT_SIZE, IM2TXT_RESIZE = 299, 346
GREY16 = ("I;16", "I;16L", "I;16B", "I;16N")  # PIL's 16-bit grey modes (a 16-bit grey PNG opens as "I;16")


class BadImage(Exception):
    """An image file that cannot be used; `str(err)` is `"<category>: <detail>"`."""


def resize_size(image_size: int) -> int:
    """The square size the image is resized to before the crop: round(S * 346 / 299) (346 for 299)."""
    return int(round(image_size * IM2TXT_RESIZE / IM2TXT_SIZE))


def error_category(reason: str) -> str:
    """The short category of a `BadImage` reason ("truncated: image file is ..." -> "truncated")."""
    return reason.split(":", 1)[0].strip() or "unknown"


def _os_reason(err: OSError, default: str) -> str:
    """BadImage reason for an OSError from PIL: "truncated: ..." for cut-off data, else `default`."""
    text = str(err)
    low = text.lower()
    truncated = "truncat" in low or "broken data stream" in low or "premature end" in low
    return f"{'truncated' if truncated else default}: {text}"


def _open(path: str | bytes, max_pixels: int) -> Image.Image:
    """Open (header only) with the file-level checks; raises BadImage. `path` may be the file's bytes."""
    try:
        size = len(path) if isinstance(path, bytes) else os.stat(path).st_size
    except FileNotFoundError:
        raise BadImage("missing: no such file") from None
    except OSError as err:
        raise BadImage(f"unreadable: {err.strerror or err}") from None
    if size == 0:
        raise BadImage("empty: zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(path) if isinstance(path, bytes) else path)
    except Image.DecompressionBombError as err:
        raise BadImage(f"bomb: {err}") from None
    except UnidentifiedImageError:
        raise BadImage("not-an-image: unrecognised image format") from None
    except OSError as err:
        raise BadImage(_os_reason(err, "unreadable")) from None
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise BadImage(f"bomb: {width}x{height} px exceeds the limit of {max_pixels} px")
    if width < 1 or height < 1:
        im.close()
        raise BadImage(f"decode-error: bad image size {width}x{height}")
    return im


def _reduce_factor(size: tuple[int, int], target: int) -> int:
    """Largest integer factor in {1, 2, 4, 8} keeping both sides >= target."""
    scale = min(size) // max(target, 1)
    for factor in (8, 4, 2):
        if scale >= factor:
            return factor
    return 1


def _grey8(im: Image.Image) -> np.ndarray:
    """A 16- or 32-bit integer grey image ("I;16*", "I") -> uint8 [H, W]: rint(v * 255 / 65535) (scaled, not
    clipped; an "I" image whose values fit in 8 bits is kept as is). The export decodes 16-bit grey PNGs
    the same way (decoder/infer/export_decode.py)."""
    arr = np.asarray(im).astype(np.float64)
    top = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
    return np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 [H, W, 3]. Alpha is composited over white; 16-bit is scaled, not clipped."""
    mode = im.mode
    if mode in GREY16 or mode == "I":
        return np.repeat(_grey8(im)[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        grey = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif mode == "P":
        im = im.convert("RGB")
    if im.mode in ("LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def decode_image(path, image_size: int = IM2TXT_SIZE, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image file (a path, or its bytes, e.g. a shard member) to uint8 RGB [H, W, 3]
    (EXIF-rotated); raises `BadImage(reason)`.

    `image_size` (the crop size S) only bounds the decoding scale: an image at least 2x the resize size
    R on both sides is decoded at 1/2, 1/4 or 1/8 scale (never below R), so memory stays bounded.
    """
    path = bytes(path) if isinstance(path, bytes | bytearray | memoryview) else os.fspath(path)
    im = _open(path, max_pixels)
    target = resize_size(image_size)
    try:
        with im:
            if im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK", "YCbCr"):
                im.draft(im.mode, (target, target))
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            im.load()
            factor = _reduce_factor(im.size, target)
            if factor > 1 and im.mode in GREY16:  # PIL cannot reduce these: reduce their 8-bit scaling
                im = Image.fromarray(_grey8(im), "L")
            if factor > 1 and im.mode in ("RGB", "RGBA", "L", "LA", "CMYK", "I", "F"):
                im = im.reduce(factor)
            im = ImageOps.exif_transpose(im)
            arr = _to_rgb(im)
    except BadImage:
        raise
    except OSError as err:
        raise BadImage(_os_reason(err, "decode-error")) from None
    except Exception as err:  # noqa: BLE001 - a bad file must never crash a long run
        raise BadImage(f"decode-error: {type(err).__name__}: {err}") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise BadImage(f"decode-error: unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _resize_tf1(image: tf.Tensor, size: int) -> tf.Tensor:
    """Bilinear resize on TF1's pixel grid (im2txt's `tf.image.resize_images`): float32 [size, size, C]."""
    resized = tf.raw_ops.ResizeBilinear(
        images=image[None], size=[size, size], align_corners=False, half_pixel_centers=False
    )
    return resized[0]


def _distort(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """im2txt's `distort_image` with stateless ops: flip + colour jitter in one of two orders, clipped."""
    seeds = tf.random.experimental.stateless_split(seed, num=6)
    image = tf.image.stateless_random_flip_left_right(image, seeds[0])

    def bright(x):
        return tf.image.stateless_random_brightness(x, 32.0 / 255.0, seeds[1])

    def sat(x):
        return tf.image.stateless_random_saturation(x, 0.5, 1.5, seeds[2])

    def hue(x):
        return tf.image.stateless_random_hue(x, 0.032, seeds[3])

    def con(x):
        return tf.image.stateless_random_contrast(x, 0.5, 1.5, seeds[4])

    order = tf.random.stateless_uniform([], seeds[5], maxval=2, dtype=tf.int32)
    image = tf.cond(
        tf.equal(order, 0), lambda: con(hue(sat(bright(image)))), lambda: hue(sat(con(bright(image))))
    )
    return tf.clip_by_value(image, 0.0, 1.0)


def preprocess(image, image_size: int = IM2TXT_SIZE, training: bool = False, seed=None) -> tf.Tensor:
    """uint8 [H, W, 3] -> float32 [S, S, 3] in [-1, 1] (S = image_size). THE preprocessing function.

    Eval: resize to R x R bilinear (R = round(S * 346 / 299)), central crop S. Training: random S crop of
    the R x R image, random flip, colour jitter (im2txt's distort_image). `seed` (int32 [2], training
    only) makes the distortion deterministic (stateless ops); None draws one from TF's global RNG.
    """
    image = tf.convert_to_tensor(image)
    image = tf.image.convert_image_dtype(image, tf.float32)
    image = tf.ensure_shape(image, [None, None, 3])
    size = resize_size(image_size)
    image = _resize_tf1(image, size)
    if training:
        if seed is None:
            seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int32)
        crop_seed, distort_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
        image = tf.image.stateless_random_crop(image, [image_size, image_size, 3], crop_seed)
        image = _distort(image, distort_seed)
    else:
        offset = (size - image_size) // 2
        image = image[offset : offset + image_size, offset : offset + image_size, :]
    image = tf.reshape(image, [image_size, image_size, 3])
    return (image - 0.5) * 2.0
