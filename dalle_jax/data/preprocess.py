"""Image preprocessing: decode any file to RGB, resize and crop to the model's resolution, augment.

Four crop modes:
  `center`: resize the short side to the resolution, take the centre square (evaluation, preview).
  `random`: resize the short side, take a random square (the transformer's augmentation; no flip,
    since images may contain text).
  `dvae`: the paper's dVAE augmentation (Appendix A.2, Listing 1): random square crop of the short
    side, area resize to a random size in [9/8, 12/8] x resolution, random crop, horizontal flip.
  `transformer`: the paper's transformer augmentation (Listing 2), encoded K times per image for
    stage 2: a square of the short side at a random offset in the middle quarter of the slack,
    area resize to a random size in [1, 9/8] x resolution, random crop, no flip.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile

CROP_MODES = ("center", "random", "dvae", "transformer")
_WHITE = (255, 255, 255)


class ImageDecodeError(ValueError):
  """The bytes are not a complete image that Pillow can read."""


def decode_image(data: bytes, min_size: int | None = None) -> Image.Image:
  """Decodes encoded image bytes (JPEG, PNG, WebP, GIF, BMP, TIFF...) to an RGB `PIL.Image`.

  Args:
    data: the file's bytes.
    min_size: if given, JPEGs are decoded at the smallest DCT scale whose short side is still at
      least this, which makes decoding large photos several times faster.

  Raises:
    ImageDecodeError: corrupt, truncated or oversized (decompression bomb) files.
  """
  if not data:
    raise ImageDecodeError("empty file")
  # Truncated files must fail loudly, not decode half grey.
  ImageFile.LOAD_TRUNCATED_IMAGES = False
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(data))
      if min_size is not None and image.format == "JPEG":
        short = min(image.size)
        scale = max(1, short // min_size)
        image.draft("RGB", (image.size[0] // scale, image.size[1] // scale))
      image.load()
      return to_rgb(image)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
          Image.DecompressionBombWarning) as e:
    raise ImageDecodeError(f"{type(e).__name__}: {e}") from e


def to_rgb(image: Image.Image) -> Image.Image:
  """Any Pillow mode to RGB: alpha and palette transparency are composited onto white."""
  if image.mode == "RGB":
    return image
  if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    # High bit depth greyscale: scale the actual range to 8 bits instead of clipping.
    array = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
    grey = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
  if image.mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")
  if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return image.convert("RGB")


def resize_short_side(image: Image.Image, size: int,
                      resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
  """Scales so that the short side is `size`, keeping the aspect ratio."""
  width, height = image.size
  scale = size / min(width, height)
  new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
  if new_size == image.size:
    return image
  return image.resize(new_size, resample)


def crop_square(image: Image.Image, size: int, rng: np.random.Generator | None) -> Image.Image:
  """A `size` square: centred when `rng` is None, else at a uniformly random offset."""
  width, height = image.size
  if rng is None:
    left, top = (width - size) // 2, (height - size) // 2
  else:
    left = int(rng.integers(0, width - size + 1))
    top = int(rng.integers(0, height - size + 1))
  return image.crop((left, top, left + size, top + size))


def dvae_augment(image: Image.Image, resolution: int, rng: np.random.Generator) -> Image.Image:
  """The paper's dVAE augmentation (Listing 1 of Appendix A.2), on an RGB image."""
  short = min(image.size)
  image = crop_square(image, short, rng)
  low = min(short, round(9 / 8 * resolution))
  high = min(short, round(12 / 8 * resolution))
  target = max(int(rng.integers(low, high + 1)), resolution)  # small images are upsampled
  resample = Image.Resampling.BOX if target <= short else Image.Resampling.BICUBIC
  image = image.resize((target, target), resample)
  image = crop_square(image, resolution, rng)
  if rng.random() < 0.5:
    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return image


def transformer_augment(image: Image.Image, resolution: int,
                        rng: np.random.Generator) -> Image.Image:
  """The paper's transformer augmentation (Listing 2 of Appendix A.2), on an RGB image."""
  width, height = image.size
  short = min(width, height)
  # Offsets from 3/8 to 5/8 of the slack: the square stays near the centre.
  offsets = [int(rng.integers(3 * (side - short) // 8,
                              max(3 * (side - short) // 8 + 1, 5 * (side - short) // 8)))
             for side in (width, height)]
  image = image.crop((offsets[0], offsets[1], offsets[0] + short, offsets[1] + short))
  high = max(min(short, round(9 / 8 * resolution)), resolution)  # small images are upsampled
  target = int(rng.integers(resolution, high + 1))
  resample = Image.Resampling.BOX if target <= short else Image.Resampling.BICUBIC
  return crop_square(image.resize((target, target), resample), resolution, rng)


def preprocess(image: Image.Image | np.ndarray, resolution: int, mode: str = "center",
               rng: np.random.Generator | None = None) -> np.ndarray:
  """Any image to `uint8[resolution, resolution, 3]` with the chosen crop mode."""
  if mode not in CROP_MODES:
    raise ValueError(f"crop mode {mode!r} is not one of {CROP_MODES}")
  if mode != "center" and rng is None:
    raise ValueError(f"crop mode {mode!r} is random and needs an rng")
  if isinstance(image, np.ndarray):
    if mode == "center" and image.shape == (resolution, resolution, 3) and image.dtype == np.uint8:
      return image  # already drawn at the target resolution
    image = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
  image = to_rgb(image)
  if mode == "dvae":
    image = dvae_augment(image, resolution, rng)
  elif mode == "transformer":
    image = transformer_augment(image, resolution, rng)
  else:
    image = crop_square(resize_short_side(image, resolution), resolution,
                        rng if mode == "random" else None)
  return np.asarray(image, dtype=np.uint8)


def to_float(images):
  """uint8 pixels to float32 in [0, 1], the range every model here takes (NumPy or JAX arrays)."""
  return images.astype("float32") / 255.0
