"""export's in-graph image decoding (decoder/infer/export_decode.py) equals PIL's decoding in extract (THE
preprocessing input) on generated files of every kind, EXIF orientations, the odd files and COCO photos; what
it refuses; corrupted rows never fail a batch."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from decoder.infer.export_decode import decode_image_bytes
from extract.preprocess import BadImage, decode_image


def _png16(arr: np.ndarray, colour: int) -> bytes:
    """A 16-bit PNG (colour type 0, 2 or 6) of big-endian uint16 pixels (PIL cannot write all of them)."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _exif_big_endian(orientation: int) -> bytes:
    """An APP1 payload: "Exif\\0\\0" + a big-endian ("MM") TIFF with IFD0 = {Orientation}."""
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    return b"Exif\0\0" + b"MM\0*" + struct.pack(">I", 8) + ifd


def sample_files(folder: Path) -> dict[str, Path]:
    """Files of every decoding path: PNG modes (reduced at 75 px: >= 174 px), GIF, BMP, WebP, a large JPEG
    (DCT scaling 1/8 then reduce 2), all 8 EXIF orientations, a big-endian EXIF."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:203, 0:191]
    rgb = np.stack([(xx * 3) % 256, (yy * 5) % 256, rng.integers(0, 256, yy.shape)], -1).astype(np.uint8)
    alpha = rng.integers(0, 256, yy.shape).astype(np.uint8)
    images = {"rgb.png": (Image.fromarray(rgb), {}),
              "rgba.png": (Image.fromarray(np.dstack([rgb, alpha])), {}),
              "la.png": (Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA"), {}),
              "grey.png": (Image.fromarray(rgb[..., 0]), {}),
              "palette.png": (Image.fromarray(rgb).quantize(64), {}),
              "palette_trns.png": (Image.fromarray(rgb).quantize(64), {"transparency": 3}),
              "rgb_trns.png": (Image.fromarray(rgb), {"transparency": (0, 0, 0)}),
              "bilevel.png": (Image.fromarray(rgb[..., 0] > 128), {}),
              "opaque.gif": (Image.fromarray(rgb).quantize(64), {}), "rgb.bmp": (Image.fromarray(rgb), {}),
              "rgb.webp": (Image.fromarray(rgb), {"lossless": True}),
              "rgba.webp": (Image.fromarray(np.dstack([rgb, alpha])), {"lossless": True}),
              "grey.jpg": (Image.fromarray(rgb[..., 0]), {})}
    images["rgba.bmp"] = (Image.fromarray(np.dstack([rgb, alpha])), {})  # 32 bits, alpha ignored by both
    images["lossy.webp"] = (Image.fromarray(rgb), {"quality": 80})
    images["animated.gif"] = (Image.fromarray(rgb).quantize(64),  # the first frame
                              {"save_all": True, "append_images": [Image.fromarray(255 - rgb).quantize(64)]})
    big = np.mgrid[0:1450, 0:1500]
    images["big.jpg"] = (Image.fromarray(np.stack([(big[1] * 3) % 256, (big[0] * 5) % 256,
                                                   np.full(big[0].shape, 77)], -1).astype(np.uint8)), {})
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        images[f"exif{o}.jpg"] = (Image.fromarray(rgb[:150]), {"exif": exif})
    images["exif6_mm.jpg"] = (Image.fromarray(rgb[:150]), {"exif": _exif_big_endian(6)})
    paths = {}
    for name, (im, kw) in images.items():
        im.save(folder / name, **kw)
        paths[name] = folder / name
    for name, arr, colour in (("rgb16.png", rng.integers(0, 65536, (120, 110, 3)), 2),
                              ("grey16.png", rng.integers(0, 65536, (120, 110)), 0),
                              ("rgba16.png", rng.integers(0, 65536, (120, 110, 4)), 6)):
        (folder / name).write_bytes(_png16(arr, colour))
        paths[name] = folder / name
    return paths


@pytest.fixture(scope="module")
def graph_decode():
    fns = {}

    def decode(data: bytes, size: int) -> np.ndarray:
        if size not in fns:
            fns[size] = tf.function(lambda d: decode_image_bytes(d, size),
                                    input_signature=[tf.TensorSpec([], tf.string)])
        return fns[size](tf.constant(data)).numpy()

    return decode


def test_graph_decoding_equals_pil(graph_decode, tmp_path):
    for name, path in sample_files(tmp_path).items():
        size = 299 if name.endswith("16.png") else 75  # PIL cannot reduce a 16-bit grey image
        want = decode_image(path, size)
        got = graph_decode(path.read_bytes(), size)
        assert got.shape == want.shape and (got == want).all(), name


def test_graph_decoding_of_odd_and_coco_files(graph_decode, shared_data):
    for path in sorted((shared_data / "odd_images").glob("*.jpg")):
        if path.name == "truncated.jpg":
            with pytest.raises(BadImage, match="truncated"):
                decode_image(path, 75)
            with pytest.raises(tf.errors.InvalidArgumentError):
                graph_decode(path.read_bytes(), 75)
            continue
        for size in (75, 299):
            want, got = decode_image(path, size).astype(int), graph_decode(path.read_bytes(), size)
            assert got.shape == want.shape, path.name
            limit = 1 if path.name == "cmyk.jpg" else 0  # TF's own CMYK conversion: docs/export.md
            assert np.abs(got - want).max() <= limit, path.name
    for path in sorted((shared_data / "coco_val2017_sample" / "images").glob("*.jpg"))[:12]:
        for size in (75, 299):  # 75: PIL's draft() DCT scaling 1/2 or 1/4
            assert (graph_decode(path.read_bytes(), size) == decode_image(path, size)).all(), path.name


def test_graph_decoding_refusals(graph_decode, tmp_path):
    """Not images, bombs and the documented formats TF cannot decode: an op error (ok false when served)."""
    rgb = np.zeros((20, 30, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.tif")
    Image.fromarray(rgb).quantize(8).save(tmp_path / "p.bmp")
    bomb = _png16(np.zeros((2, 2), np.uint16), 0)
    bomb = bomb.replace(struct.pack(">II", 2, 2), struct.pack(">II", 20000, 20000))
    bomb = bomb[:29] + struct.pack(">I", zlib.crc32(bomb[12:29])) + bomb[33:]  # IHDR's CRC for 20000 x 20000
    frames = [Image.fromarray(rgb), Image.fromarray(rgb + 9)]
    frames[0].save(tmp_path / "a.webp", save_all=True, append_images=frames[1:], lossless=True)
    refused = [b"", b"plain text", *((tmp_path / name).read_bytes() for name in ("x.tif", "p.bmp", "a.webp"))]
    for data in refused:  # a.webp: an animated WebP of RGB frames crashes TF 2.21's decoder: refused first
        with pytest.raises(tf.errors.InvalidArgumentError):
            graph_decode(data, 75)
    with pytest.raises(tf.errors.InvalidArgumentError, match="decompression bomb"):
        graph_decode(bomb, 75)  # refused from the header, before decoding
    (tmp_path / "bomb.png").write_bytes(bomb)
    with pytest.raises(BadImage, match="bomb"):
        decode_image(tmp_path / "bomb.png", 75)


def test_corrupted_rows_never_fail_the_batch():
    """96 damaged files (cut short, bytes overwritten, junk inserted) of 8 kinds, each kind in one batch
    between two good JPEGs: the call never raises and both good rows always decode."""
    import io

    from decoder.infer.export_decode import decode_batch

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:120, 0:130]
    rgb = np.stack([(xx * 3) % 256, (yy * 5) % 256, rng.integers(0, 256, yy.shape)], -1).astype(np.uint8)

    def encode(im, fmt, **kw):
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        return buf.getvalue()

    im = Image.fromarray(rgb)
    files = [encode(im, "JPEG"), encode(im, "JPEG", progressive=True), encode(im, "PNG"),
             encode(Image.fromarray(np.dstack([rgb, rgb[..., :1]])), "PNG"), encode(im.quantize(32), "GIF"),
             encode(im, "BMP"), encode(im, "WEBP", quality=80), encode(im, "WEBP", lossless=True)]
    run = tf.function(lambda x: decode_batch(x, 75), input_signature=[tf.TensorSpec([None], tf.string)])
    for data in files:
        damaged = []
        for _ in range(12):
            v, kind = bytearray(data), rng.integers(0, 3)
            if kind == 0:
                v = v[:rng.integers(1, len(v))]
            elif kind == 1:
                for _ in range(rng.integers(1, 6)):
                    v[rng.integers(0, len(v))] = rng.integers(0, 256)
            else:
                at = rng.integers(0, len(v))
                v = v[:at] + bytes(rng.integers(0, 256, rng.integers(1, 50)).astype(np.uint8)) + v[at:]
            damaged.append(bytes(v))
        rows, pixels = run(tf.constant([files[0], *damaged, files[0]]))
        rows = rows.numpy().tolist()
        assert rows[0] == 0 and rows[-1] == len(damaged) + 1 and pixels.shape[0] == len(rows)
