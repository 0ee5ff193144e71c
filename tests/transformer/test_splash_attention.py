"""dalle_jax/transformer/splash_attention.py: the Pallas kernel, interpreted on CPU, against dense attention.

Forward and gradients (q, k, v) of `splash_attention` match `attention.dense_attention` for the
row, column (column-major permutation) and conv masks, with padding to the block, in float32 to
1e-5; the kernel runs exactly the tiles the mask leaves open.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.transformer import attention, masks
from dalle_jax.transformer import splash_attention as splash

# The pinned jax ships the kernel: a failed import is a failure here, not a skip.
assert splash.available(), f"Pallas splash attention does not import: {splash.IMPORT_ERROR!r}"

BATCH, HEADS, HEAD_DIM, KERNEL = 2, 2, 64, 3
# Non-square images: a square's column-major order is its own inverse and would hide a mix-up.
# text 128 + 16x25 image = 528 -> 640: five 128-blocks, with skipped, partial and full tiles.
GEOMETRY = dict(text_len=128, height=16, width=25)
# text 8 + 4x16 image = 72 -> 128: one tile, mostly padding.
TINY = dict(text_len=8, height=4, width=16)


def _inputs(seq: int):
  """q, k, v and an output cotangent, [BATCH, seq, HEADS, HEAD_DIM] each."""
  keys = jax.random.split(jax.random.key(0), 4)
  return [jax.random.normal(key, (BATCH, seq, HEADS, HEAD_DIM)) for key in keys]


def _value_and_grads(fn, q, k, v, cotangent):
  """fn(q, k, v) and the vjp of `cotangent` with respect to q, k, v."""
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(cotangent))


def _permutation(kind, geometry):
  return masks.column_major_permutation(**geometry) if kind == "column" else None


@pytest.mark.parametrize("geometry", [TINY, GEOMETRY], ids=["72", "528"])
@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_forward_and_gradients_match_dense_attention(kind, geometry):
  mask = masks.attention_mask(kind, **geometry, kernel=KERNEL)
  q, k, v, cotangent = _inputs(mask.shape[0])
  perm = _permutation(kind, geometry)
  got = _value_and_grads(
      lambda q, k, v: splash.splash_attention(q, k, v, mask, permutation=perm, interpret=True),
      q, k, v, cotangent)
  want = _value_and_grads(lambda q, k, v: attention.dense_attention(q, k, v, mask),
                          q, k, v, cotangent)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)


def test_bfloat16_is_as_close_to_float32_as_dense_bfloat16():
  mask = masks.attention_mask("row", **TINY)
  inputs = _inputs(mask.shape[0])
  want = _value_and_grads(lambda q, k, v: attention.dense_attention(q, k, v, mask), *inputs)
  bf16 = [x.astype(jnp.bfloat16) for x in inputs]
  got = _value_and_grads(
      lambda q, k, v: splash.splash_attention(q, k, v, mask, interpret=True), *bf16)
  dense = _value_and_grads(lambda q, k, v: attention.dense_attention(q, k, v, mask), *bf16)
  for name, a, d, b in zip(("out", "dq", "dk", "dv"), got, dense, want):
    assert a.dtype == jnp.bfloat16, name
    # Both stay within bf16 rounding of the float32 answer (errors near 1e-2 at magnitude ~5).
    np.testing.assert_allclose(a.astype(np.float32), b, atol=3e-2, rtol=2e-2, err_msg=name)
    np.testing.assert_allclose(d.astype(np.float32), b, atol=3e-2, rtol=2e-2, err_msg=name)


def test_a_kernel_first_built_inside_jit_is_reused_outside():
  # A mask no other test uses, so the kernel is built during the trace; its cached block lists
  # must be concrete arrays, not the trace's tracers.
  mask = masks.attention_mask("dense", **TINY)
  q, k, v, _ = _inputs(mask.shape[0])
  attend = lambda q, k, v: splash.splash_attention(q, k, v, mask, interpret=True)
  jitted = jax.jit(attend)(q, k, v)
  np.testing.assert_allclose(attend(q, k, v), jitted, atol=1e-6)
  np.testing.assert_allclose(jitted, attention.dense_attention(q, k, v, mask), atol=1e-5)


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_forward_and_backward_lower_for_tpu_at_the_paper_geometry(kind):
  # No TPU here: this runs Pallas's Mosaic lowering (block shapes, layouts of the kernel body) for
  # bfloat16, 64-wide heads, text 256 + 32x32; Mosaic's own compile happens only on a TPU.
  geometry = dict(text_len=256, height=32, width=32)
  mask = masks.attention_mask(kind, **geometry)
  perm = _permutation(kind, geometry)
  x = jax.ShapeDtypeStruct((2, 1280, 4, 64), jnp.bfloat16)
  loss = lambda q, k, v: splash.splash_attention(q, k, v, mask, permutation=perm).sum(
      dtype=jnp.float32)
  lowered = jax.jit(jax.grad(loss, (0, 1, 2))).trace(x, x, x).lower(lowering_platforms=("tpu",))
  assert lowered.as_text().count("tpu_custom_call") == 3  # forward, dq and dkv kernels


def _tiles_run(kernel) -> int:
  """How many (query block, key block) tiles the forward kernel computes."""
  return int((np.asarray(kernel.fwd_mask_info.block_mask) > 0).sum())


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_the_kernel_runs_exactly_the_tiles_with_a_visible_key_and_is_cached(kind):
  mask = masks.attention_mask(kind, **GEOMETRY, kernel=KERNEL)
  perm = _permutation(kind, GEOMETRY)
  kernel = splash.make_kernel(mask, HEADS, 128, perm, interpret=True)
  assert splash.make_kernel(mask, HEADS, 128, perm, interpret=True) is kernel
  padded = splash.kernel_mask(mask, 128, perm)
  assert padded.shape == (640, 640)
  tiles = padded.reshape(5, 128, 5, 128).any(axis=(1, 3))
  assert _tiles_run(kernel) == tiles.sum() < 15  # fewer than the 15 causal tiles


def test_column_attention_is_sparse_only_in_column_major_order():
  mask = masks.attention_mask("column", **GEOMETRY)
  raster = splash.make_kernel(mask, HEADS, 128, interpret=True)
  column_major = splash.make_kernel(mask, HEADS, 128, _permutation("column", GEOMETRY),
                                    interpret=True)
  assert _tiles_run(raster) == 15
  assert _tiles_run(column_major) < 15


def test_padding_queries_see_only_their_own_padding_key():
  mask = masks.attention_mask("row", **TINY)
  padded = splash.kernel_mask(mask, 128)
  np.testing.assert_array_equal(padded[:72, :72], mask)
  assert not padded[:72, 72:].any() and not padded[72:, :72].any()
  np.testing.assert_array_equal(padded[72:, 72:], np.eye(56, dtype=bool))


@pytest.mark.parametrize("call, message", [
    (lambda m: splash.make_kernel(m, HEADS, 64), "multiple of 128"),
    (lambda m: splash.make_kernel(m, HEADS, 128, np.zeros(72, int)), "not a permutation"),
    (lambda m: splash.make_kernel(np.zeros((72, 72), bool), HEADS), "at least one key"),
])
def test_bad_arguments_are_refused(call, message):
  with pytest.raises(ValueError, match=message):
    call(masks.attention_mask("row", **TINY))


def test_under_a_mesh_each_device_runs_its_batch_rows_and_heads():
  # 2 data x 2 fsdp x 2 tensor: 4 batch rows split four ways, 2 heads split two ways.
  from dalle_jax import sharding
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  mask = masks.attention_mask("column", **TINY, kernel=KERNEL)
  perm = _permutation("column", TINY)
  keys = jax.random.split(jax.random.key(1), 4)
  q, k, v, cotangent = [jax.random.normal(key, (4, mask.shape[0], HEADS, HEAD_DIM))
                        for key in keys]

  sharded = lambda q, k, v: attention.sharded_splash_attention(q, k, v, mask, perm,
                                                               interpret=True)
  with jax.set_mesh(mesh):  # as the train step runs: forward and backward in one jit
    got = jax.jit(lambda *args: _value_and_grads(sharded, *args))(q, k, v, cotangent)
    assert "shard_map" in str(jax.make_jaxpr(sharded)(q, k, v))
  want = _value_and_grads(lambda q, k, v: attention.dense_attention(q, k, v, mask),
                          q, k, v, cotangent)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)
