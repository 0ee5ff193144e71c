"""What users hand the generator: captions, prompts files and images, checked with one-line errors.

    prompts = read_prompts("captions.txt")        # UTF-8, one caption a line; errors name the line
    picture = load_image("photo.png", "--prime_image")   # any of path, bytes, PIL or uint8 array
    print(shorten(caption))                       # a 3 MB caption as 200 characters and its length
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from dalle_jax.data import preprocess

# How much of a long caption messages and manifests show.
SHOWN_CHARACTERS = 200


class GenerationError(ValueError):
  """Input a user can fix; the message is one line that says how."""


def shorten(text: str, limit: int = SHOWN_CHARACTERS) -> str:
  """`text` whole when short, else its first `limit` characters and its length."""
  if len(text) <= limit:
    return text
  return f"{text[:limit]}... ({len(text):,} characters)"


def read_prompts(path: str) -> list[str]:
  """The non-blank lines of a UTF-8 prompts file, stripped."""
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  prompts = []
  for number, line in enumerate(lines, 1):
    try:
      text = line.decode("utf-8").strip()
    except UnicodeDecodeError as error:
      raise GenerationError(
          f"line {number} of the prompts file {path} is not UTF-8 (byte "
          f"0x{line[error.start]:02x} at column {error.start + 1}): save the file as UTF-8"
      ) from None
    if text:
      prompts.append(text)
  if not prompts:
    raise GenerationError(f"the prompts file {path} is empty: write one caption per line")
  return prompts


def load_image(image: Any, name: str = "prime_image") -> Image.Image:
  """An RGB PIL image from a path, file bytes, a PIL image or uint8[H, W(, 3 or 4)] pixels;
  `name` (a parameter or a flag) is what an error calls it."""
  if isinstance(image, Image.Image):
    return preprocess.to_rgb(image)
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
        image.ndim == 3 and image.shape[-1] not in (3, 4)):
      raise GenerationError(f"{name} as an array must be uint8[H, W, 3], got "
                            f"{image.dtype}{list(image.shape)}")
    return preprocess.to_rgb(Image.fromarray(image))
  if isinstance(image, (bytes, bytearray)):
    data, where = bytes(image), f"the {name} bytes"
  elif isinstance(image, (str, os.PathLike)):
    where = f"{name} {os.fspath(image)}"
    try:
      with open(image, "rb") as f:
        data = f.read()
    except OSError as error:
      raise GenerationError(f"cannot read {where}: {error.strerror}") from None
  else:
    raise GenerationError(f"{name} must be a path, bytes, a PIL image or a uint8 array, got "
                          f"{type(image).__name__}")
  try:
    return preprocess.decode_image(data)
  except preprocess.ImageDecodeError as error:
    raise GenerationError(f"{where} is not an image Pillow can read ({error}): pass a PNG, "
                          "JPEG, WebP, GIF, BMP or TIFF file") from None
