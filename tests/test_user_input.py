"""dalle_jax/user_input.py: prompts files (UTF-8, one caption a line), images from anything, huge
captions shortened; each bad input one line naming the file, line, path or parameter."""

import numpy as np
import pytest

from conftest import encode_image
from dalle_jax.user_input import GenerationError, load_image, read_prompts, shorten


def test_prompts_files_undecodable_empty_and_good(tmp_path):
  latin = tmp_path / "latin.txt"
  latin.write_bytes("a red circle\n\ncaf\xe9 au lait\n".encode("latin-1"))
  with pytest.raises(GenerationError, match=f"line 3 of the prompts file {latin} is not UTF-8 "
                     r"\(byte 0xe9 at column 4\): save the file as UTF-8"):
    read_prompts(str(latin))
  for content in (b"", b"\n  \n\t\n"):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(content)
    with pytest.raises(GenerationError, match=f"the prompts file {empty} is empty"):
      read_prompts(str(empty))
  good = tmp_path / "good.txt"
  good.write_text(" a red circle \n\ntwo blue squares\r\nun caf\u00e9\n", encoding="utf-8")
  assert read_prompts(str(good)) == ["a red circle", "two blue squares", "un caf\u00e9"]


def test_images_from_paths_bytes_and_arrays_and_what_is_refused(tmp_path):
  pixels = np.random.default_rng(0).integers(0, 256, (5, 6, 3), np.uint8)
  path = tmp_path / "image.png"
  path.write_bytes(encode_image(pixels))
  for source in (str(path), path, path.read_bytes(), pixels, load_image(pixels)):
    np.testing.assert_array_equal(np.asarray(load_image(source)), pixels)
  rgba = np.concatenate([pixels, np.full((5, 6, 1), 255, np.uint8)], axis=-1)
  np.testing.assert_array_equal(np.asarray(load_image(rgba)), pixels)
  text = tmp_path / "notes.png"
  text.write_text("not a picture")
  with pytest.raises(GenerationError, match=f"--prime_image {text} is not an image Pillow can "
                     "read"):
    load_image(str(text), "--prime_image")
  with pytest.raises(GenerationError, match="the prime_image bytes is not an image"):
    load_image(b"GIF89a but no more")
  with pytest.raises(GenerationError, match="cannot read prime_image .*missing.png: No such file"):
    load_image(str(tmp_path / "missing.png"))
  with pytest.raises(GenerationError, match=r"prime_image as an array must be uint8\[H, W, 3\], "
                     r"got float32\[4, 4, 3\]"):
    load_image(np.zeros((4, 4, 3), np.float32))
  with pytest.raises(GenerationError, match="must be a path, bytes, a PIL image or a uint8 array"):
    load_image(3)


def test_long_captions_are_shown_as_a_prefix_with_their_length():
  assert shorten("a red circle") == "a red circle"
  assert shorten("x" * 200) == "x" * 200
  long = "two blue squares " * 200_000
  assert shorten(long) == long[:200] + "... (3,400,000 characters)"
  assert shorten(long, 10) == "two blue s... (3,400,000 characters)"
