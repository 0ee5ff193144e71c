"""The paper's attention masks as static NumPy arrays (Section 2.2, Appendix B.1, Figure 11).

The sequence is [text; image] with `text_len` text positions and the image's H x W tokens in raster
order; `mask[q, k]` is True where query position q may attend key position k. Every mask is causal.
Text attends causally to text; every image position attends to all text positions in every layer;
image-to-image attention is one of:

  row     p attends p-W .. p: the previous W+1 tokens, so it reaches the same column one row up.
  column  (r, c) attends (r', c) for r' <= r. Computed on transposed (column-major) states it is a
          band like row attention, which is what makes it block-sparse.
  conv    the causal half of a k x k kernel in raster offsets, wrapping around row ends:
          p - dr*W + dc for 0 <= dr <= k//2, -k//2 <= dc <= k//2, with dr > 0 or dc <= 0.
  dense   plain causal attention (ablations).
  axial_row, axial_col
          DALLE-pytorch's axial masks (ablations): the same row (or column) at or before the token,
          so the first token of a row sees no earlier image token.

Everything that consumes a mask (dense attention, block-sparse attention, the decode step) derives
from these arrays; they are built once per static shape.
"""

from __future__ import annotations

import functools

import numpy as np

KINDS = ("row", "column", "conv", "dense", "axial_row", "axial_col")


def _image_mask(kind: str, height: int, width: int, kernel: int) -> np.ndarray:
  """bool[H*W, H*W]: which image tokens (raster order) each image token attends."""
  n = height * width
  q = np.arange(n)[:, None]
  k = np.arange(n)[None, :]
  causal = k <= q
  if kind == "dense":
    return causal
  if kind == "row":
    return causal & (q - k <= width)
  if kind in ("column", "axial_col"):
    return causal & (q % width == k % width)
  if kind == "axial_row":
    return causal & (q // width == k // width)
  if kind == "conv":
    if kernel < 1 or kernel % 2 == 0:
      raise ValueError(f"the conv mask needs an odd kernel size, got {kernel}")
    half = kernel // 2
    offsets = [-dr * width + dc for dr in range(half + 1) for dc in range(-half, half + 1)
               if dr > 0 or dc <= 0]
    return causal & np.isin(q - k, [-o for o in offsets])
  raise ValueError(f"unknown mask kind {kind!r}; choose one of {', '.join(KINDS)}")


@functools.lru_cache(maxsize=64)
def attention_mask(kind: str, text_len: int, height: int, width: int,
                   kernel: int = 11) -> np.ndarray:
  """bool[seq, seq], seq = text_len + height * width; read-only (it is cached and shared)."""
  if min(text_len, height, width) < 0 or height * width == 0:
    raise ValueError(f"need text_len >= 0 and a non-empty image grid, got {text_len}, "
                     f"{height}x{width}")
  seq = text_len + height * width
  mask = np.zeros((seq, seq), dtype=bool)
  mask[:text_len, :text_len] = np.tril(np.ones((text_len, text_len), dtype=bool))
  mask[text_len:, :text_len] = True
  mask[text_len:, text_len:] = _image_mask(kind, height, width, kernel)
  mask.flags.writeable = False
  return mask


def layer_kinds(n_layers: int) -> list[str]:
  """The paper's schedule for layers i = 1..L: row, column, row, row, row, column, ..., conv last.

  Column where (i - 2) % 4 == 0, row elsewhere, and the last layer convolutional.
  """
  if n_layers < 1:
    raise ValueError(f"n_layers must be >= 1, got {n_layers}")
  kinds = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, n_layers + 1)]
  kinds[-1] = "conv"
  return kinds


def column_major_permutation(text_len: int, height: int, width: int) -> np.ndarray:
  """int[seq]: positions reordered so the image is column-major (text unchanged).

  `mask[perm][:, perm]` of the column mask is a band: (r, c) attends the r' <= r of its column,
  which are now the previous r positions.
  """
  image = np.arange(height * width).reshape(height, width).T.reshape(-1)
  return np.concatenate([np.arange(text_len), text_len + image])


def image_key_offsets(mask: np.ndarray, text_len: int) -> np.ndarray:
  """int[K], ascending: every distance q - k from an image query q to an image key k that the
  mask admits. A decode step at image position p needs only the keys p - offsets (those the
  mask row admits) and the text: the row mask's W + 1 offsets, the conv mask's kernel half, the
  column mask's multiples of W, instead of the whole sequence."""
  queries, keys = np.nonzero(mask[text_len:, text_len:])
  return np.unique(queries - keys)
