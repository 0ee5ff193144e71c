"""dalle_jax/transformer/masks.py: exact contents on small grids, causality, counts, the layer schedule."""

import numpy as np
import pytest

from dalle_jax.transformer import masks

T, H, W = 2, 3, 4  # 2 text positions, a 3x4 image grid: seq 14


def _image_keys(kind, row, col, kernel=3, height=H, width=W, text_len=T):
  """The (row, col) image keys that image token (row, col) attends, as a set."""
  mask = masks.attention_mask(kind, text_len, height, width, kernel)
  q = text_len + row * width + col
  return {divmod(k - text_len, width) for k in np.flatnonzero(mask[q, text_len:]) + text_len}


def test_text_is_causal_and_blind_to_the_image_and_every_image_token_sees_all_text():
  for kind in masks.KINDS:
    mask = masks.attention_mask(kind, T, H, W, 3)
    np.testing.assert_array_equal(mask[:T, :T], [[True, False], [True, True]])
    assert not mask[:T, T:].any()
    assert mask[T:, :T].all()


@pytest.mark.parametrize("kind", masks.KINDS)
def test_every_mask_is_causal_and_includes_the_token_itself(kind):
  mask = masks.attention_mask(kind, 3, 5, 6, 5)
  assert not np.triu(mask, 1).any()
  assert np.diag(mask).all()


def test_row_attends_the_previous_width_plus_one_tokens_across_the_row_boundary():
  # (1, 1) = raster 5 sees raster 1..5: (0, 1), (0, 2), (0, 3), (1, 0), (1, 1).
  assert _image_keys("row", 1, 1) == {(0, 1), (0, 2), (0, 3), (1, 0), (1, 1)}
  # The first token of a row sees the whole previous row: unlike DALLE-pytorch's axial row.
  assert _image_keys("row", 2, 0) == {(1, 0), (1, 1), (1, 2), (1, 3), (2, 0)}
  assert _image_keys("axial_row", 2, 0) == {(2, 0)}
  assert _image_keys("axial_row", 2, 2) == {(2, 0), (2, 1), (2, 2)}
  assert _image_keys("row", 0, 2) == {(0, 0), (0, 1), (0, 2)}


def test_column_attends_the_same_column_at_or_above():
  assert _image_keys("column", 2, 1) == {(0, 1), (1, 1), (2, 1)}
  assert _image_keys("column", 0, 3) == {(0, 3)}
  np.testing.assert_array_equal(masks.attention_mask("column", T, H, W),
                                masks.attention_mask("axial_col", T, H, W))


def test_conv_is_the_causal_half_of_the_kernel_in_raster_offsets_with_wraparound():
  # Kernel 3 at (1, 1) = raster 5: offsets -W-1, -W, -W+1, -1, 0 -> raster 0, 1, 2, 4, 5.
  assert _image_keys("conv", 1, 1) == {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)}
  # At (1, 0) = raster 4: -W-1 is off the grid, -W and -W+1 are (0, 0), (0, 1), and -1 wraps to
  # the end of the previous row, (0, 3).
  assert _image_keys("conv", 1, 0) == {(0, 0), (0, 1), (0, 3), (1, 0)}
  # At (2, 3) = raster 11: raster 6, 7, 8 (= (1, 2), (1, 3), (2, 0): wrapped), 10, 11.
  assert _image_keys("conv", 2, 3) == {(1, 2), (1, 3), (2, 0), (2, 2), (2, 3)}


def test_interior_counts_are_the_papers():
  mask = masks.attention_mask("conv", 4, 32, 32, 11)
  interior = 4 + 16 * 32 + 16  # row 16, column 16
  assert mask[interior, 4:].sum() == 61
  row = masks.attention_mask("row", 4, 32, 32)
  assert row[interior, 4:].sum() == 33  # width + 1
  column = masks.attention_mask("column", 4, 32, 32)
  assert column[interior, 4:].sum() == 17  # rows 0..16 of its column
  assert (row[4 + 32:, 4:].sum(1) == 33).all()  # from the second row on, always W + 1


def test_column_mask_becomes_a_band_in_column_major_order():
  perm = masks.column_major_permutation(T, H, W)
  banded = masks.attention_mask("column", T, H, W)[np.ix_(perm, perm)]
  image = banded[T:, T:]
  q, k = np.nonzero(image)
  assert ((q - k >= 0) & (q - k < H)).all()  # at most H-1 positions back
  assert sorted(perm) == list(range(T + H * W))


def test_layer_schedule_is_the_papers():
  assert masks.layer_kinds(8) == ["row", "column", "row", "row", "row", "column", "row", "conv"]
  assert masks.layer_kinds(1) == ["conv"]
  kinds = masks.layer_kinds(64)
  assert kinds.count("column") == 16 and kinds.count("conv") == 1 and kinds[-1] == "conv"


def test_bad_requests_are_refused():
  with pytest.raises(ValueError, match="unknown mask kind"):
    masks.attention_mask("diagonal", T, H, W)
  with pytest.raises(ValueError, match="odd kernel"):
    masks.attention_mask("conv", T, H, W, 4)
  with pytest.raises(ValueError):
    masks.layer_kinds(0)
  assert not masks.attention_mask("row", T, H, W).flags.writeable


def test_image_key_offsets_are_what_a_decode_step_reads():
  T, H, W = 3, 4, 4
  offsets = lambda kind: masks.image_key_offsets(masks.attention_mask(kind, T, H, W, 3), T).tolist()
  assert offsets("row") == [0, 1, 2, 3, 4]
  assert offsets("column") == [0, 4, 8, 12]
  assert offsets("conv") == [0, 1, 3, 4, 5]  # raster offsets of the kernel's causal half
  assert offsets("dense") == list(range(H * W))
