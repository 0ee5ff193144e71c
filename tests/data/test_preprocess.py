"""dalle_jax/data/preprocess.py: decoding any mode to RGB, crops and the paper's dVAE augmentation."""

import io

import numpy as np
import pytest
from PIL import Image

from conftest import encode_image, random_pixels
from dalle_jax.data import preprocess


def _bytes(image: Image.Image, fmt: str) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt)
  return buffer.getvalue()


def test_transparent_pixels_become_white_and_colours_stay():
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[:2] = (10, 200, 30, 255)  # opaque green top half, transparent bottom half
  image = preprocess.decode_image(_bytes(Image.fromarray(rgba, "RGBA"), "PNG"))
  pixels = np.asarray(image)
  assert image.mode == "RGB"
  np.testing.assert_array_equal(pixels[:2], np.broadcast_to([10, 200, 30], (2, 4, 3)))
  np.testing.assert_array_equal(pixels[2:], np.full((2, 4, 3), 255))


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("P", "GIF"), ("CMYK", "JPEG"), ("LA", "PNG"),
                                      ("1", "BMP"), ("I;16", "PNG"), ("RGB", "WEBP")])
def test_every_mode_decodes_to_rgb_uint8(mode, fmt):
  image = Image.fromarray(random_pixels(0)).convert(mode)
  decoded = preprocess.decode_image(_bytes(image, fmt))
  array = preprocess.preprocess(decoded, 8)
  assert decoded.mode == "RGB" and array.shape == (8, 8, 3) and array.dtype == np.uint8


def test_sixteen_bit_grey_keeps_its_range():
  ramp = np.linspace(0, 65535, 16, dtype=np.uint16).reshape(4, 4)
  pixels = np.asarray(preprocess.decode_image(_bytes(Image.fromarray(ramp), "PNG")))
  assert pixels.min() == 0 and pixels.max() == 255


@pytest.mark.parametrize("data", [b"", b"not an image at all", encode_image(random_pixels(0))[:60]])
def test_corrupt_or_truncated_bytes_raise(data):
  with pytest.raises(preprocess.ImageDecodeError):
    preprocess.decode_image(data)


def test_jpeg_is_decoded_at_a_reduced_scale_that_still_covers_the_crop():
  data = encode_image(random_pixels(0, 480, 640), "JPEG")
  image = preprocess.decode_image(data, min_size=64)
  assert min(image.size) >= 64 and image.size[0] <= 640 // 4


def test_center_crop_takes_the_middle_of_the_long_side():
  wide = np.zeros((10, 30, 3), np.uint8)
  wide[:, 10:20] = 255  # white middle third, black sides
  np.testing.assert_array_equal(preprocess.preprocess(wide, 10), np.full((10, 10, 3), 255))


def test_random_crop_varies_with_rng_and_is_deterministic_for_a_seed():
  wide = np.tile(np.arange(40, dtype=np.uint8)[None, :, None] * 6, (10, 1, 3))
  crops = [preprocess.preprocess(wide, 10, "random", np.random.default_rng(s))[0, 0, 0]
           for s in range(20)]
  assert len(set(crops)) > 5
  again = preprocess.preprocess(wide, 10, "random", np.random.default_rng(3))
  np.testing.assert_array_equal(again, preprocess.preprocess(wide, 10, "random",
                                                             np.random.default_rng(3)))


def test_dvae_augmentation_crops_resizes_and_flips_about_half_the_time():
  # A left-to-right ramp: a flipped crop runs right-to-left.
  ramp = np.tile(np.linspace(0, 255, 200).astype(np.uint8)[None, :, None], (160, 1, 3))
  flips = 0
  for seed in range(200):
    out = preprocess.preprocess(ramp, 64, "dvae", np.random.default_rng(seed))
    assert out.shape == (64, 64, 3)
    row = out[32, :, 0].astype(int)
    flips += row[0] > row[-1]
    # A crop of a 160-pixel square resized to 72..96 spans 64/t of it: the ramp's slope shows t.
    span = abs(row[-1] - row[0]) / 255 * 200 / 160  # fraction of the square the crop covers
    assert 64 / 96 - 0.05 <= span <= 64 / 72 + 0.05
  assert 70 <= flips <= 130


def test_transformer_augmentation_is_listing_2_a_square_near_the_centre_never_flipped():
  ramp = np.tile(np.linspace(0, 255, 200).astype(np.uint8)[None, :, None], (160, 1, 3))
  spans = set()
  for seed in range(100):
    out = preprocess.preprocess(ramp, 64, "transformer", np.random.default_rng(seed))
    assert out.shape == (64, 64, 3)
    row = out[32, :, 0].astype(int)
    assert row[0] < row[-1]  # no flip: images may hold text
    # The 160 square starts at column 15..24 (3/8 to 5/8 of the 40 of slack), so the crop lies
    # within columns 15..184 of the ramp.
    assert row[0] >= 15 / 199 * 255 - 3 and row[-1] <= 184 / 199 * 255 + 3
    # Resized to 64..72 (9/8 of 64), the crop spans 64/t of the square.
    span = (row[-1] - row[0]) / 255 * 200 / 160
    assert 64 / 72 - 0.05 <= span <= 1 + 0.02
    spans.add(round(span, 2))
  assert len(spans) > 3  # the size varies


def test_dvae_augmentation_upsamples_images_smaller_than_the_resolution():
  out = preprocess.preprocess(random_pixels(0, 20, 30), 64, "dvae", np.random.default_rng(0))
  assert out.shape == (64, 64, 3)


def test_random_modes_need_an_rng_and_unknown_modes_are_refused():
  with pytest.raises(ValueError, match="needs an rng"):
    preprocess.preprocess(random_pixels(0), 8, "random")
  with pytest.raises(ValueError, match="not one of"):
    preprocess.preprocess(random_pixels(0), 8, "stretch")


def test_to_float_maps_uint8_to_unit_interval():
  values = preprocess.to_float(np.array([0, 51, 255], np.uint8))
  np.testing.assert_allclose(values, [0.0, 0.2, 1.0])
  assert values.dtype == np.float32
