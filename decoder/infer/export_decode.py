"""In-graph image decoding for the exported SavedModel: encoded bytes -> the uint8 RGB image [H, W, 3] that
extract.preprocess.decode_image (PIL) gives for the same file, in TensorFlow ops only (no Python at serving
time), then THE preprocessing function (extract.preprocess.preprocess).

PIL's decode_image, step by step, as TF ops:
- the format is sniffed from the bytes (JPEG, PNG, GIF, BMP, WebP; anything else is not an image);
- a decompression bomb (width * height in the header > MAX_PIXELS) fails before any pixel is decoded;
- JPEG: libjpeg's DCT scaling as PIL's `draft()` (1/2, 1/4 or 1/8 while both sides stay >= R, the resize
  size), PIL's IDCT (`dct_method="INTEGER_ACCURATE"`, libjpeg's islow; TF's default is a faster, less exact
  one), then the EXIF orientation of the first APP1 "Exif" segment (`ImageOps.exif_transpose`);
- `Image.reduce(f)` (box average with PIL's fixed-point rounding and partial edge blocks) when the decoded
  image is still >= 2R on both sides, for the modes PIL reduces (not palette or 1-bit images);
- alpha (RGBA / grey+alpha / palette+tRNS PNG, WebP with alpha) composited over white with PIL's rounding;
  16-bit grey PNG scaled like PIL's "I;16" (rint(v * 255 / 65535)).
What still differs from PIL (CMYK rounding, transparent GIFs, EXIF outside JPEG, MPO, ...) is measured in
docs/export.md. A row that cannot be decoded is dropped by `decode_batch` (see decodable_rows: a header
check, then a trial decode under tf.data's `ignore_errors`), so one bad row never fails a batch.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from extract.preprocess import MAX_PIXELS, preprocess, resize_size

JPEG, PNG, GIF, BMP, WEBP, UNKNOWN = range(6)
MAX_SEGMENTS = 256  # JPEG markers (or stray bytes) walked for the EXIF and frame headers before giving up
MAX_IFD_ENTRIES = 64  # IFD0 entries read for the orientation tag
ORIENTATION_TAG = 0x0112
# Image.reduce's rounding (Reduce.c): out = ((sum + n // 2) * MULT[n]) >> 24 for a block of n pixels, with
# MULT[n] = (UINT32)(2**32 / (256 * n)) computed in float32 as PIL does (n <= 64: factors up to 8).
REDUCE_MULT = [0] + [int(np.float32(2.0**32) / np.float32(256 * n)) for n in range(1, 65)]


def _bytes(data, pos, n: int) -> tf.Tensor:
    """int64 [n]: the bytes data[pos:pos + n] (0 beyond the end; pos is clamped into the string)."""
    length = tf.cast(tf.strings.length(data), tf.int64)
    pos = tf.clip_by_value(tf.cast(pos, tf.int64), 0, length)
    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(data, pos, n), tf.uint8), tf.int64)
    return tf.reshape(tf.pad(raw, [[0, n - tf.shape(raw)[0]]]), [n])


def _uint(b, little) -> tf.Tensor:
    """int64 [...]: unsigned integers from bytes b int64 [..., k], little- or big-endian (bool scalar)."""
    k = b.shape[-1]
    le = tf.constant([256**i for i in range(k)], tf.int64)
    be = tf.constant([256**i for i in reversed(range(k))], tf.int64)
    return tf.where(little, tf.reduce_sum(b * le, -1), tf.reduce_sum(b * be, -1))


def image_kind(data) -> tf.Tensor:
    """int32 []: JPEG, PNG, GIF, BMP, WEBP or UNKNOWN, from the first bytes (as PIL's format sniffing)."""
    head = _bytes(data, 0, 12)

    def starts(sig: bytes, at: int = 0):
        return tf.reduce_all(tf.equal(head[at:at + len(sig)], list(sig)))

    found = [starts(b"\xff\xd8\xff"), starts(b"\x89PNG\r\n\x1a\n"), starts(b"GIF8"), starts(b"BM"),
             tf.logical_and(starts(b"RIFF"), starts(b"WEBP", 8))]
    kind = tf.constant(UNKNOWN)
    for index in reversed(range(len(found))):
        kind = tf.where(found[index], index, kind)
    return kind


SOF_MARKERS = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)


def jpeg_markers(data):
    """(exif int64 [], pixels int64 []) of a JPEG, without decoding: the offset of the TIFF header in the
    first APP1 "Exif" segment (-1: none) and height * width of the first SOFn frame header (0: none).

    Markers are walked from byte 2 as PIL's JPEG parser does (stray non-0xFF bytes skipped one at a time) up
    to the start of scan or MAX_SEGMENTS steps. Never raises."""
    length = tf.cast(tf.strings.length(data), tf.int64)

    def cond(i, pos, exif, pixels):
        return tf.logical_and(i < MAX_SEGMENTS, pos + 4 <= length)

    def body(i, pos, exif, pixels):
        b = _bytes(data, pos, 9)
        is_ff, marker = tf.equal(b[0], 0xFF), b[1]
        stop = tf.logical_and(is_ff, tf.logical_or(tf.equal(marker, 0xDA), tf.equal(marker, 0xD9)))
        app1 = tf.logical_and(tf.logical_and(is_ff, tf.equal(marker, 0xE1)), exif < 0)
        exif = tf.where(tf.logical_and(app1, tf.reduce_all(tf.equal(_bytes(data, pos + 4, 6),
                                                                      list(b"Exif\0\0")))), pos + 10, exif)
        sof = tf.logical_and(tf.logical_and(is_ff, tf.reduce_any(tf.equal(marker, SOF_MARKERS))), pixels == 0)
        pixels = tf.where(sof, (b[5] * 256 + b[6]) * (b[7] * 256 + b[8]), pixels)
        standalone = tf.logical_or(tf.logical_and(marker >= 0xD0, marker <= 0xD8), tf.equal(marker, 0x01))
        one_byte = tf.logical_or(~is_ff, tf.logical_or(tf.equal(marker, 0xFF), tf.equal(marker, 0)))
        step = tf.where(one_byte, tf.constant(1, tf.int64),
                        tf.where(standalone, tf.constant(2, tf.int64), 2 + b[2] * 256 + b[3]))
        return i + 1, tf.where(stop, length, pos + step), exif, pixels

    start = (tf.constant(0), tf.constant(2, tf.int64), tf.constant(-1, tf.int64), tf.constant(0, tf.int64))
    _, _, exif, pixels = tf.while_loop(cond, body, start)
    return exif, pixels


def header_check(data, max_pixels: int = MAX_PIXELS):
    """(kind int32 [], allowed bool []) from the header alone, never raising: allowed is False for an unknown
    format, a decompression bomb (width * height > max_pixels, or a JPEG without a frame header), a BMP of
    fewer than 24 bits per pixel (TF reads palette BMPs as grey) and an animated WebP (TF's decoder crashes
    the process on some). WebP sizes are not checked (at most 16383 x 16383)."""
    kind = image_kind(data)
    png = tf.reduce_prod(_uint(tf.reshape(_bytes(data, 16, 8), [2, 4]), False))
    gif = tf.reduce_prod(_uint(tf.reshape(_bytes(data, 6, 4), [2, 2]), True))
    bmp = _uint(tf.reshape(_bytes(data, 18, 8), [2, 4]), True)
    bmp = bmp[0] * tf.where(bmp[1] >= 2**31, 2**32 - bmp[1], bmp[1])  # a negative height is top-down
    bmp = tf.where(_uint(_bytes(data, 28, 2), True) >= 24, bmp, -1)
    jpeg = tf.where(tf.equal(kind, JPEG), jpeg_markers(data)[1], 0)
    jpeg = tf.where(jpeg > 0, jpeg, -1)
    # an animated WebP (VP8X chunk, animation flag): TF 2.21's decoder corrupts the heap on some (RGB frames)
    webp = tf.where(tf.logical_and(tf.reduce_all(tf.equal(_bytes(data, 12, 4), list(b"VP8X"))),
                                   tf.equal(tf.bitwise.bitwise_and(_bytes(data, 20, 1)[0], 2), 2)),
                    tf.constant(-1, tf.int64), tf.constant(0, tf.int64))
    pixels = tf.gather(tf.stack([jpeg, png, gif, bmp, webp, tf.constant(-1, tf.int64)]), kind)
    return kind, tf.logical_and(pixels >= 0, pixels <= max_pixels)


def exif_orientation(data, exif) -> tf.Tensor:
    """int32 []: the Orientation tag (1..8) in IFD0 of the TIFF header at offset `exif` (jpeg_markers), 1
    when absent (exif < 0, no tag, or a value outside 1..8); IFD0's first MAX_IFD_ENTRIES entries searched."""
    head = _bytes(data, exif, 8)
    little = tf.logical_and(tf.equal(head[0], 0x49), tf.equal(head[1], 0x49))  # "II" else "MM"
    ifd = exif + _uint(head[4:8], little)
    count = tf.minimum(_uint(_bytes(data, ifd, 2), little), MAX_IFD_ENTRIES)
    entries = tf.reshape(_bytes(data, ifd + 2, 12 * MAX_IFD_ENTRIES), [MAX_IFD_ENTRIES, 12])
    kind = _uint(entries[:, 2:4], little)
    value = tf.where(tf.equal(kind, 4), _uint(entries[:, 8:12], little), _uint(entries[:, 8:10], little))
    hit = tf.logical_and(tf.range(MAX_IFD_ENTRIES, dtype=tf.int64) < count,
                         tf.logical_and(tf.equal(_uint(entries[:, 0:2], little), ORIENTATION_TAG),
                                        tf.logical_or(tf.equal(kind, 3), tf.equal(kind, 4))))
    first = tf.argmax(tf.cast(hit, tf.int32) * (MAX_IFD_ENTRIES - tf.range(MAX_IFD_ENTRIES)))
    one = tf.constant(1, tf.int64)
    value = tf.where(tf.logical_and(exif >= 0, tf.reduce_any(hit)), value[first], one)
    return tf.cast(tf.where(tf.logical_and(value >= 1, value <= 8), value, one), tf.int32)


def _opaque():
    """The alpha placeholder of an image without alpha: uint8 [1, 1, 1] (never read)."""
    return tf.fill([1, 1, 1], tf.constant(255, tf.uint8))


# Each decoder returns (rgb uint8 [H, W, 3], alpha uint8 [H, W, 1] (or _opaque()), has_alpha, reducible,
# orientation): has_alpha where PIL composites over white, reducible where PIL's decode_image reduces
# (not palette or 1-bit images), orientation the EXIF one (JPEG) else 1.


def _decode_jpeg(data, target: int):
    """DCT-scaled as PIL's draft() (ratio 1, 2, 4 or 8 from the header size), islow IDCT, EXIF orientation."""
    shape = tf.io.extract_jpeg_shape(data)
    scale = tf.reduce_min(shape[:2]) // target
    index = tf.where(scale >= 8, 3, tf.where(scale >= 4, 2, tf.where(scale >= 2, 1, 0)))
    rgb = tf.switch_case(index, [lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r,
                                                               dct_method="INTEGER_ACCURATE")
                                 for r in (1, 2, 4, 8)])
    orientation = exif_orientation(data, jpeg_markers(data)[0])
    return rgb, _opaque(), tf.constant(False), tf.constant(True), orientation


def _decode_png(data):
    """Alpha for the colour types PIL composites (palette, grey + alpha, RGBA); 16-bit grey as PIL's I;16."""
    depth, colour = tf.unstack(_bytes(data, 24, 2))
    has_alpha = tf.logical_or(tf.equal(colour, 3), tf.logical_or(tf.equal(colour, 4), tf.equal(colour, 6)))

    def grey16():  # PIL mode "I;16": rint(v * 255 / 65535), no alpha
        v = tf.cast(tf.io.decode_png(data, channels=1, dtype=tf.uint16), tf.float64)
        grey = tf.cast(tf.round(v * (255.0 / 65535.0)), tf.uint8)
        return tf.concat([grey] * 3, -1), _opaque()

    def with_alpha():
        rgba = tf.io.decode_png(data, channels=4)
        return rgba[:, :, :3], rgba[:, :, 3:]

    def opaque():
        return tf.io.decode_png(data, channels=3), _opaque()

    rgb, alpha = tf.cond(tf.logical_and(tf.equal(depth, 16), tf.equal(colour, 0)), grey16,
                         lambda: tf.cond(has_alpha, with_alpha, opaque))
    reducible = tf.logical_not(tf.logical_or(tf.equal(colour, 3), tf.logical_and(tf.equal(colour, 0),
                                                                                  tf.equal(depth, 1))))
    return rgb, alpha, has_alpha, reducible, tf.constant(1)


def _decode_other(data, kind: int):
    """A GIF (first frame), BMP or WebP; an op error for anything else (tf.io.decode_image: "Unknown image
    file format")."""
    if kind == WEBP:
        image = tf.io.decode_image(data, expand_animations=False)
        has_alpha = tf.equal(tf.shape(image)[2], 4)
        return image[:, :, :3], image[:, :, 3:], has_alpha, tf.constant(True), tf.constant(1)
    if kind == BMP:  # 24 or 32 bits per pixel (header_check)
        return (tf.io.decode_bmp(data, channels=3), _opaque(), tf.constant(False), tf.constant(True),
                tf.constant(1))
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return image, _opaque(), tf.constant(False), tf.constant(False), tf.constant(1)


def pil_reduce(image, factor) -> tf.Tensor:
    """PIL's Image.reduce(factor) on uint8 [H, W, C]: box means with partial blocks at the right and bottom
    edges, PIL's fixed-point rounding. factor: int32 [] in 1..8. Returns uint8 [ceil(H/f), ceil(W/f), C]."""
    x = tf.cast(image, tf.int64)
    h, w, c = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
    hb, wb = (h + factor - 1) // factor, (w + factor - 1) // factor
    x = tf.pad(x, [[0, hb * factor - h], [0, wb * factor - w], [0, 0]])
    sums = tf.reduce_sum(tf.reshape(x, [hb, factor, wb, factor, c]), axis=[1, 3])
    rows, cols = tf.minimum(factor, h - tf.range(hb) * factor), tf.minimum(factor, w - tf.range(wb) * factor)
    n = tf.cast(rows[:, None] * cols[None, :], tf.int64)[:, :, None]
    mult = tf.gather(tf.constant(REDUCE_MULT, tf.int64), n)
    return tf.cast(tf.bitwise.right_shift((sums + n // 2) * mult, 24), tf.uint8)


def premultiply(rgba) -> tf.Tensor:
    """uint8 [H, W, 4] RGBA -> RGBa (colour times alpha / 255, PIL's MULDIV255): Image.reduce works on
    premultiplied colour for RGBA and LA images. Identity where alpha is 255."""
    x = tf.cast(rgba, tf.int32)
    t = x[:, :, :3] * x[:, :, 3:] + 128
    rgb = tf.bitwise.right_shift(tf.bitwise.right_shift(t, 8) + t, 8)
    return tf.cast(tf.concat([rgb, x[:, :, 3:]], -1), tf.uint8)


def unpremultiply(rgba) -> tf.Tensor:
    """uint8 [H, W, 4] RGBa -> RGBA (PIL's rgba2rgbA: min(255, 255 * c // a); kept where a is 0 or 255)."""
    x = tf.cast(rgba, tf.int32)
    rgb, a = x[:, :, :3], x[:, :, 3:]
    scaled = tf.minimum(255 * rgb // tf.maximum(a, 1), 255)
    rgb = tf.where(tf.logical_or(tf.equal(a, 0), tf.equal(a, 255)), rgb, scaled)
    return tf.cast(tf.concat([rgb, a], -1), tf.uint8)


def _reduce_factor(image, target: int) -> tf.Tensor:
    """int32 []: extract.preprocess's reduce factor: the largest of 8, 4, 2 with min side // target >= it."""
    scale = tf.reduce_min(tf.shape(image)[:2]) // target
    return tf.where(scale >= 8, 8, tf.where(scale >= 4, 4, tf.where(scale >= 2, 2, 1)))


def orient(image, orientation) -> tf.Tensor:
    """ImageOps.exif_transpose on [H, W, C] for an EXIF orientation (int32 [], 1..8; 1 = as stored)."""
    def transpose(x):  # as a gather: oneDNN's uint8 Transpose logs an error line on some CPUs
        h, w = tf.shape(x)[0], tf.shape(x)[1]
        flat = tf.reshape(x, [h * w, tf.shape(x)[2]])
        return tf.gather(flat, tf.range(h)[None, :] * w + tf.range(w)[:, None])

    def flip(*axes):
        return tf.reverse(image, list(axes))

    branches = [lambda: image, lambda: image, lambda: flip(1), lambda: flip(0, 1), lambda: flip(0),
                lambda: transpose(image), lambda: transpose(flip(0)), lambda: transpose(flip(0, 1)),
                lambda: transpose(flip(1))]
    return tf.switch_case(orientation, branches)


def over_white(rgba) -> tf.Tensor:
    """uint8 [H, W, 4] -> uint8 [H, W, 3]: PIL's alpha_composite over opaque white, then RGB (integer
    arithmetic of AlphaComposite.c with dst = white: coef1 = 128 * a)."""
    x = tf.cast(rgba, tf.int32)
    rgb, a = x[:, :, :3], x[:, :, 3:]
    t = 128 * (rgb * a + 255 * (255 - a)) + (0x80 << 7)
    out = tf.bitwise.right_shift(tf.bitwise.right_shift(tf.bitwise.right_shift(t, 8) + t, 8), 7)
    return tf.cast(tf.where(tf.equal(a, 0), 255, out), tf.uint8)


def decode_image_bytes(data, image_size: int, max_pixels: int = MAX_PIXELS) -> tf.Tensor:
    """tf.string [] (an encoded image) -> uint8 RGB [H, W, 3], as extract.preprocess.decode_image(path,
    image_size) decodes the same bytes (see the module docstring). Raises an op error (InvalidArgument) for
    bytes that are not a decodable image, or whose header header_check refuses (e.g. a decompression bomb),
    before any pixel is decoded."""
    target = resize_size(image_size)
    kind, allowed = header_check(data, max_pixels)
    check = tf.debugging.Assert(allowed, ["not an image TF can decode (JPEG, PNG, GIF, BMP of >= 24 bits, "
                                          "WebP), or a decompression bomb (too many pixels)"])
    with tf.control_dependencies([check]):
        branches = [lambda: _decode_jpeg(data, target), lambda: _decode_png(data)]
        branches += [lambda k=k: _decode_other(data, k) for k in (GIF, BMP, WEBP, UNKNOWN)]
        rgb, alpha, has_alpha, reducible, orientation = tf.switch_case(kind, branches)
    factor = tf.where(reducible, _reduce_factor(rgb, target), 1)

    def reduce_alpha():  # PIL reduces RGBA / LA images premultiplied
        rgba = unpremultiply(pil_reduce(premultiply(tf.concat([rgb, alpha], -1)), factor))
        return rgba[:, :, :3], rgba[:, :, 3:]

    rgb, alpha = tf.cond(factor > 1, lambda: tf.cond(has_alpha, reduce_alpha,
                                                     lambda: (pil_reduce(rgb, factor), alpha)),
                         lambda: (rgb, alpha))
    rgb = tf.cond(has_alpha, lambda: over_white(tf.concat([rgb, alpha], -1)), lambda: rgb)
    return orient(rgb, orientation)


def _lean_options() -> tf.data.Options:
    """No graph rewrites or autotuning: a dataset is built on every call, and they would cost more than
    the decode they tune."""
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    options.experimental_optimization.inject_prefetch = False
    options.autotune.enabled = False
    options.experimental_warm_start = False
    return options


def decodable_rows(images, max_pixels: int = MAX_PIXELS) -> tf.Tensor:
    """int32 [M]: the rows of images (tf.string [N]) that decode_image_bytes decodes without an error.

    An op error fails a whole TF call, and no TF op tells whether bytes decode short of decoding them
    (a truncated or corrupt JPEG raises mid-scan), so rows are screened in two steps: header_check (never
    raises), then a trial decode by the one op tf.io.decode_image in a tf.data map followed by
    `ignore_errors`, the only error-catching mechanism inside a TF graph. The map holds that single op: a
    dataset is instantiated on every call, at a cost that grows with the ops of its function."""
    allowed = tf.map_fn(lambda data: header_check(data, max_pixels)[1], images, fn_output_signature=tf.bool)
    rows = tf.cast(tf.where(allowed)[:, 0], tf.int32)

    def trial(row, data):
        return row, tf.size(tf.io.decode_image(data, expand_animations=False))

    ds = tf.data.Dataset.from_tensor_slices((rows, tf.gather(images, rows)))
    ds = ds.map(trial, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    ds = ds.with_options(_lean_options()).batch(tf.cast(tf.maximum(tf.size(rows), 1), tf.int64))
    return ds.reduce(tf.zeros([0], tf.int32), lambda acc, got: tf.concat([acc, got[0]], 0))


def decode_batch(images, image_size: int, max_pixels: int = MAX_PIXELS):
    """images tf.string [N] -> (rows int32 [M], pixels float32 [M, S, S, 3]): the rows that decode
    (decodable_rows), in order, decoded by decode_image_bytes and preprocessed by THE preprocessing function
    extract.preprocess.preprocess (S = image_size). One bad row never fails the batch. The real decode runs
    the same libjpeg / libpng / GIF / BMP / WebP decoders on the same bytes as the trial, so it does not
    raise."""
    rows = decodable_rows(images, max_pixels)

    def load(data):
        return preprocess(decode_image_bytes(data, image_size, max_pixels), image_size)

    pixels = tf.map_fn(load, tf.gather(images, rows),
                       fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))
    return rows, pixels
