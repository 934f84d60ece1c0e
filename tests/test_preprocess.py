"""decode_image on every odd case, and THE preprocessing function (eval and training)."""

import numpy as np
import pytest
import tensorflow as tf
from helpers import make_odd_images, photo
from PIL import Image

from extract.preprocess import BadImage, decode_image, error_category, preprocess, resize_size

# ---- decode_image ---------------------------------------------------------------------------------------


def test_odd_files_decode_or_fail_with_their_reason(tmp_path):
    expected = make_odd_images(tmp_path)
    for name, category in expected.items():
        if category is None:
            arr = decode_image(tmp_path / name)
            assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3, name
        else:
            with pytest.raises(BadImage) as err:
                decode_image(tmp_path / name)
            assert error_category(str(err.value)) == category, (name, str(err.value))
    with pytest.raises(BadImage, match="^missing:"):
        decode_image(tmp_path / "nope.jpg")


def test_alpha_is_composited_over_white_and_16bit_is_scaled(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # one opaque red-ish pixel, the rest fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = decode_image(tmp_path / "a.png")
    assert out[0, 0].tolist() == [200, 0, 0] and out[1, 1].tolist() == [255, 255, 255]
    grey = np.array([[0, 257 * 100, 65535, 40000]], np.uint16)
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = decode_image(tmp_path / "g.png")
    assert out[0, :, 0].tolist() == [0, 100, 255, 156]  # scaled by 255/65535, not clipped at 255


def test_bomb_limit_is_checked_from_the_header(tmp_path):
    photo((100, 100)).save(tmp_path / "p.jpg")
    with pytest.raises(BadImage, match="^bomb:"):
        decode_image(tmp_path / "p.jpg", max_pixels=100 * 100 - 1)
    assert decode_image(tmp_path / "p.jpg", max_pixels=100 * 100).shape == (100, 100, 3)


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    photo((1600, 1400)).save(tmp_path / "big.jpg")  # >= 8x the 173 px resize of S=150
    out = decode_image(tmp_path / "big.jpg", image_size=150)
    assert out.shape == (175, 200, 3)  # 1/8 DCT scaling, never below resize_size(150) = 173
    assert decode_image(tmp_path / "big.jpg").shape == (350, 400, 3)  # S=299: R=346, 1/4 scale
    photo((1600, 1400)).save(tmp_path / "big.png")
    assert decode_image(tmp_path / "big.png", image_size=150).shape == (175, 200, 3)


@pytest.mark.shared
def test_shared_odd_images(shared_data):
    odd = shared_data / "odd_images"
    for path in sorted(odd.glob("*.jpg")):
        if path.name == "truncated.jpg":
            with pytest.raises(BadImage, match="^truncated:"):
                decode_image(path)
            continue
        arr = decode_image(path)
        assert arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8, path.name
    raw = np.asarray(Image.open(odd / "exif_orientation_6.jpg").convert("RGB"))
    assert np.array_equal(decode_image(odd / "exif_orientation_6.jpg"), np.rot90(raw, k=-1))
    raw = np.asarray(Image.open(odd / "exif_orientation_3.jpg").convert("RGB"))
    assert np.array_equal(decode_image(odd / "exif_orientation_3.jpg"), np.rot90(raw, k=2))
    cmyk = decode_image(odd / "cmyk.jpg")
    assert np.array_equal(cmyk, np.asarray(Image.open(odd / "cmyk.jpg").convert("RGB")))
    assert decode_image(odd / "tiny_4x4.jpg").shape == (4, 4, 3)


# ---- preprocess -----------------------------------------------------------------------------------------


def test_resize_size_follows_im2txt():
    assert resize_size(299) == 346 and resize_size(75) == 87


def test_eval_preprocess_matches_tf1_resize_and_central_crop():
    image = np.asarray(photo((60, 45)))
    out = preprocess(image, image_size=75).numpy()
    assert out.shape == (75, 75, 3) and out.dtype == np.float32
    ref = tf.compat.v1.image.resize(tf.image.convert_image_dtype(image, tf.float32), [87, 87],
                                    method="bilinear", align_corners=False)
    ref = (tf.image.resize_with_crop_or_pad(ref, 75, 75).numpy() - 0.5) * 2.0
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert out.min() >= -1.0 and out.max() <= 1.0
    grey = preprocess(np.full((9, 13, 3), 255, np.uint8), image_size=75).numpy()
    np.testing.assert_allclose(grey, 1.0)


def test_training_preprocess_is_seeded_and_stays_in_range():
    image = np.asarray(photo((90, 80)))
    seed = tf.constant([3, 4], tf.int32)
    a = preprocess(image, 75, training=True, seed=seed).numpy()
    b = preprocess(image, 75, training=True, seed=seed).numpy()
    c = preprocess(image, 75, training=True, seed=tf.constant([3, 5], tf.int32)).numpy()
    assert a.shape == (75, 75, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= -1.0 and a.max() <= 1.0
    assert not np.allclose(a, preprocess(image, 75).numpy())
    assert preprocess(image, 75, training=True).shape == (75, 75, 3)  # unseeded: global RNG
