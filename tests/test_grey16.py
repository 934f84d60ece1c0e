"""16-bit greyscale PNGs (PIL mode "I;16"): extract/caption and the exported model decode them the same way
(issue 22, item 8). PIL cannot `reduce` an I;16 image, so large ones (>= 2R, decoded at a reduced scale)
used to be refused by the CLI ("image has wrong mode") while the export captioned them."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data.features import open_store
from decoder.infer.export_decode import decode_image_bytes
from extract.preprocess import decode_image, preprocess, resize_size
from extract.run import ExtractConfig, run_extract


def _grey16(path, height, width, seed=0):
    """A 16-bit grey PNG (pillow writes a uint16 array as mode I;16) of random values over the full range."""
    values = np.random.default_rng(seed).integers(0, 65536, (height, width)).astype(np.uint16)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    return path


@pytest.mark.parametrize("size", [(400, 350), (900, 800), (181, 203)])
def test_cli_and_export_decode_a_16_bit_grey_png_alike(tmp_path, size):
    path = _grey16(tmp_path / "g16.png", *size)
    for image_size in (75, 96, 299):
        pil = decode_image(path, image_size)  # the CLI's decoder (extract, caption, finetune)
        graph = decode_image_bytes(tf.constant(path.read_bytes()), image_size).numpy()  # the export's
        assert pil.dtype == np.uint8 and pil.shape[2] == 3
        np.testing.assert_array_equal(pil, graph)
        # a large image is decoded reduced (never below R), a small one whole
        reduced = min(size) >= 2 * resize_size(image_size)
        assert (pil.shape[:2] != size) == reduced
        assert min(pil.shape[:2]) >= min(*size, resize_size(image_size))
    # the 16 bits are scaled to 8 (v * 255 / 65535), not clipped: the grey spans the whole range
    pil = decode_image(path, 299)
    assert pil.max() > 200 and pil.min() < 50
    assert np.isfinite(preprocess(pil, 75).numpy()).all()


@pytest.mark.slow
def test_extract_keeps_a_large_16_bit_grey_png(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _grey16(folder / "big16.png", 300, 260)  # >= 2R at 75 px (R = 87): decoded at half scale
    Image.fromarray(np.full((80, 90, 3), 120, np.uint8)).save(folder / "rgb.png")
    result = run_extract(ExtractConfig(out=str(tmp_path / "f.h5"), paths=[str(folder)], cnn_weights="none",
                                       image_size=75, batch_size=2, progress=False), log=lambda m: None)
    with open_store(tmp_path / "f.h5") as store:
        assert store.ok.all(), store.errors
        assert sorted(store.keys) == ["big16.png", "rgb.png"]
    assert "failed 0" in result.summary()
