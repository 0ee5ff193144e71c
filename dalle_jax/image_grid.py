"""Captioned image grids as PNG: data previews, reconstructions, samples."""

from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_FONT_SIZE = 12
_LINE_HEIGHT = 15
_PAD = 4


def captioned_grid(images: np.ndarray | Sequence[np.ndarray], captions: Sequence[str],
                   columns: int | None = None, tile_size: int = 128, caption_lines: int = 4,
                   marked: Sequence[bool] | None = None) -> Image.Image:
  """Tiles `uint8[N, H, W, 3]` images in a grid with each caption wrapped beneath its image.

  Small images are enlarged with nearest-neighbour scaling so their pixels stay visible.
  `marked[i]` draws a red frame around tile i (for example a held-out caption).
  """
  images = [np.asarray(image, np.uint8) for image in images]
  if len(images) != len(captions):
    raise ValueError(f"{len(images)} images but {len(captions)} captions")
  if not images:
    raise ValueError("no images to put in a grid")
  columns = columns or int(np.ceil(np.sqrt(len(images))))
  rows = int(np.ceil(len(images) / columns))
  font = ImageFont.load_default(size=_FONT_SIZE)
  chars_per_line = max(8, tile_size // 7)
  cell_w = tile_size + 2 * _PAD
  cell_h = tile_size + 2 * _PAD + caption_lines * _LINE_HEIGHT
  grid = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
  draw = ImageDraw.Draw(grid)
  for i, (image, caption) in enumerate(zip(images, captions)):
    x, y = (i % columns) * cell_w + _PAD, (i // columns) * cell_h + _PAD
    tile = Image.fromarray(image).resize((tile_size, tile_size), Image.Resampling.NEAREST)
    grid.paste(tile, (x, y))
    if marked is not None and marked[i]:
      draw.rectangle((x - 3, y - 3, x + tile_size + 2, y + tile_size + 2), outline="red", width=3)
    lines = textwrap.wrap(caption, chars_per_line)[:caption_lines] or [""]
    for j, line in enumerate(lines):
      draw.text((x, y + tile_size + 2 + j * _LINE_HEIGHT), line, fill="black", font=font)
  return grid
