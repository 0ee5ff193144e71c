"""dalle_jax/transformer/block_sparse.py: exact layouts, and outputs and gradients equal to dense
attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.transformer import attention, block_plan, block_sparse, masks


def _dense_and_sparse(mask, block_size, permutation=None, dtype=jnp.float32, seed=0):
  """(out, dq, dk, dv) of dense and of block-sparse attention on random [2, seq, 2, 8] inputs
  and a random output cotangent; both in one jitted program (one compile per case)."""
  rng = np.random.default_rng(seed)
  q, k, v, d_out = (jnp.asarray(rng.standard_normal((2, mask.shape[0], 2, 8)), dtype)
                    for _ in range(4))

  def run(q, k, v, d_out):
    results = []
    for fn in (lambda *x: attention.dense_attention(*x, mask),
               lambda *x: block_sparse.block_sparse_attention(*x, mask, block_size, permutation)):
      out, vjp = jax.vjp(fn, q, k, v)
      results.append((out, *vjp(d_out)))
    return results

  return jax.jit(run)(q, k, v, d_out)


def _assert_close(dense, sparse, tolerance=1e-5):
  for name, expected, got in zip(("out", "dq", "dk", "dv"), dense, sparse):
    assert got.dtype == expected.dtype, name
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                               atol=tolerance, rtol=tolerance, err_msg=name)


@pytest.fixture
def fresh_plans():
  """Plans built under the test's patches, and none of them left cached after it."""
  block_plan.plan_for.cache_clear()
  yield
  block_plan.plan_for.cache_clear()


# Text lengths and grids that leave seq off every block size (23, 74, 42), so padding is tested.
_GEOMETRIES = {4: (7, 4, 4), 8: (10, 8, 8), 16: (6, 6, 6)}


@pytest.mark.parametrize("free_copies", [False, True])
@pytest.mark.parametrize("block_size", sorted(_GEOMETRIES))
@pytest.mark.parametrize("kind", masks.KINDS)
def test_outputs_and_gradients_equal_dense_attention(kind, block_size, free_copies, monkeypatch,
                                                     fresh_plans):
  if free_copies:  # the widest band the tiles allow: at these sizes copies would make it global
    monkeypatch.setattr(block_plan, "_COPY_COST", 0.0)
  text_len, height, width = _GEOMETRIES[block_size]
  mask = masks.attention_mask(kind, text_len, height, width, kernel=3)
  assert mask.shape[0] % block_size
  permutation = None
  if kind in ("column", "axial_col"):  # as column layers run: on column-major states
    permutation = masks.column_major_permutation(text_len, height, width)
  _assert_close(*_dense_and_sparse(mask, block_size, permutation))


def test_column_mask_is_also_exact_in_raster_order():
  mask = masks.attention_mask("column", 7, 4, 4)
  _assert_close(*_dense_and_sparse(mask, 4))


@pytest.mark.parametrize("permute", [False, True])
def test_arbitrary_mask_permutation_and_unattended_keys(permute, monkeypatch, fresh_plans):
  # Random band with holes, two keys every query sees, rows that see only key 5, a key nobody
  # sees: global key blocks that are not a run and a band with empty slots (window copies
  # counted free, so that the band is not all made global); permuted, keys that must come back
  # from a gather.
  monkeypatch.setattr(block_plan, "_COPY_COST", 0.0)
  rng = np.random.default_rng(3)
  seq = 29
  i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
  mask = (np.abs(i - j) < 4) & (rng.random((seq, seq)) < 0.8)
  mask[:, [5, 20]] = True
  mask[8:12] = False
  mask[8:12, 5] = True
  mask[:, seq - 3] = False
  mask[~mask.any(1), 0] = True
  permutation = rng.permutation(seq) if permute else None
  _assert_close(*_dense_and_sparse(mask, 2, permutation=permutation, seed=1))
  plan = block_plan.make_plan(mask, 2, permutation, head_dim=8)
  if permute:
    assert not block_sparse._is_run(plan.from_padded)
  else:  # the general paths were taken
    assert not block_sparse._is_run(plan.global_blocks) and plan.band_width > 1
    assert not plan.band_mask.reshape(-1, 2, plan.band_width, 2).any((1, 3)).all()


def test_bfloat16_inputs_give_bfloat16_results_close_to_dense():
  mask = masks.attention_mask("row", 7, 4, 4)
  dense, sparse = _dense_and_sparse(mask, 8, dtype=jnp.bfloat16)
  _assert_close(dense, sparse, tolerance=2e-2)


def test_a_permutation_that_is_not_one_is_refused():
  mask = masks.attention_mask("column", 7, 4, 4)
  q = jnp.zeros((1, 23, 2, 8))
  with pytest.raises(ValueError, match="permutation"):
    block_sparse.block_sparse_attention(q, q, q, mask, 4, np.zeros(23, int))


def test_layout_of_a_small_row_mask():
  # Text 2 + a 2x2 image, row mask; blocks of 2: {text}, {(0,0), (0,1)}, {(1,0), (1,1)}.
  mask = masks.attention_mask("row", 2, 2, 2)
  np.testing.assert_array_equal(mask, [[1, 0, 0, 0, 0, 0],
                                       [1, 1, 0, 0, 0, 0],
                                       [1, 1, 1, 0, 0, 0],
                                       [1, 1, 1, 1, 0, 0],
                                       [1, 1, 1, 1, 1, 0],
                                       [1, 1, 0, 1, 1, 1]])
  layout = block_plan.block_layout(mask, 2)
  assert layout.num_blocks == 3
  np.testing.assert_array_equal(layout.counts, [1, 2, 3])
  np.testing.assert_array_equal(layout.key_blocks, [[0, 0, 0], [0, 1, 1], [0, 1, 2]])
  # Image queries see all text: full tiles; the causal diagonals and the band are partial.
  np.testing.assert_array_equal(layout.full, [[0, 0, 0], [1, 0, 0], [1, 0, 0]])
  np.testing.assert_array_equal(layout.tiles[0, 0], [[1, 0], [1, 1]])
  np.testing.assert_array_equal(layout.tiles[2, 1], [[1, 1], [0, 1]])
  np.testing.assert_array_equal(layout.tiles[2, 2], [[1, 0], [1, 1]])
  assert not layout.tiles[0, 1:].any() and not layout.tiles[1, 2].any()  # padding slots
  # Transposed: key block 0 is used by every query block, block 2 by the last only.
  np.testing.assert_array_equal(layout.user_counts, [3, 2, 1])
  np.testing.assert_array_equal(layout.query_blocks, [[0, 1, 2], [1, 2, 3], [2, 3, 3]])
  np.testing.assert_array_equal(layout.query_slots, [[0, 0, 0], [1, 1, 0], [2, 0, 0]])
  assert layout.fraction == pytest.approx(6 / 9)
  np.testing.assert_array_equal(layout.padded_mask(), mask)
  assert block_plan.block_layout(mask.copy(), 2) is layout  # cached by contents


def test_padding_queries_see_only_themselves_and_padding_keys_nothing():
  mask = masks.attention_mask("row", 2, 2, 2)  # seq 6 in blocks of 4: padded to 8
  layout = block_plan.block_layout(mask, 4)
  padded = layout.padded_mask()
  np.testing.assert_array_equal(padded[:6, :6], mask)
  assert not padded[:6, 6:].any()
  np.testing.assert_array_equal(padded[6:], [[0] * 6 + [1, 0], [0] * 7 + [1]])


def test_text_blocks_are_global_and_the_image_band_local():
  # Text 8 + 4x4 in blocks of 4: text blocks 0, 1 are scored against every query; each image
  # block attends its own block and the previous one (row attention reaches back W + 1 = 5).
  # (Heads of 4: with more dimensions, copying keys into the band's windows would cost as much
  # as scoring the whole image against every query.)
  plan = block_plan.make_plan(masks.attention_mask("row", 8, 4, 4), 4, None, head_dim=4)
  np.testing.assert_array_equal(plan.global_blocks, [0, 1])
  assert plan.band_rows == (2, 6) and plan.band_group == 1 and plan.band_offset == -1
  # Band row i's window is blocks i - 1, i; for the first image block, i - 1 is text: global.
  windows = plan.band_mask.reshape(4, 4, 2, 4).any((1, 3))
  np.testing.assert_array_equal(windows, [[0, 1], [1, 1], [1, 1], [1, 1]])


@pytest.mark.parametrize("group, per_chunk, band", [
    (3, 1, (1, 10, 3)),  # groups of 3 pull a text block into the band: 3 scan steps of a group
    (1, 3, (2, 10, 3)),  # single blocks, 3 per chunk: 2 scan steps and a remainder of 2
])
@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_band_groups_and_chunks_equal_dense(kind, group, per_chunk, band, monkeypatch,
                                            fresh_plans):
  text_len, height, width = _GEOMETRIES[8]
  mask = masks.attention_mask(kind, text_len, height, width, kernel=3)
  permutation = None
  if kind == "column":
    permutation = masks.column_major_permutation(text_len, height, width)
  monkeypatch.setattr(block_plan, "_band_group", lambda *_: group)
  plan = block_plan.make_plan(mask, 8, permutation, head_dim=8)
  assert plan.band_group == group
  keys = (len(plan.global_blocks) + plan.band_width) * 8
  monkeypatch.setattr(block_sparse, "_CHUNK_SCORES", per_chunk * 4 * 8 * keys * group)
  segment = block_sparse._segments(plan, batch_heads=4)[-1]
  assert (segment.start, segment.stop, segment.size) == band and segment.band
  _assert_close(*_dense_and_sparse(mask, 8, permutation))


def test_column_major_order_makes_the_paper_column_mask_a_band():
  # The paper's geometry, blocks of 32: about half the tiles in raster order, a fifth after.
  mask = masks.attention_mask("column", 256, 32, 32)
  perm = masks.column_major_permutation(256, 32, 32)
  assert block_plan.block_layout(mask, 32).fraction == pytest.approx(0.5125)
  assert block_plan.block_layout(mask[perm][:, perm], 32).fraction == pytest.approx(0.2025)
