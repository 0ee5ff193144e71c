"""dalle_jax/transformer/attention.py: dense attention in numbers and its custom gradient, the mask
honoured exactly, and `attend` choosing among the implementations (which agree)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.transformer import attention, block_sparse, masks

MASK = masks.attention_mask("row", 2, 2, 2)  # text 2 + a 2x2 image: 6 positions


def _inputs(seq, seed=0, batch=2, heads=2, head_dim=4):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal((batch, seq, heads, head_dim)), jnp.float32)
          for _ in range(4)]


def _reference(q, k, v, mask):
  """Softmax attention written out, differentiated by JAX itself."""
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  weights = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def test_dense_attention_and_its_gradient_equal_the_written_out_softmax():
  q, k, v, d_out = _inputs(MASK.shape[0])
  out, vjp = jax.vjp(lambda *x: attention.dense_attention(*x, MASK), q, k, v)
  want, want_vjp = jax.vjp(lambda *x: _reference(*x, MASK), q, k, v)
  np.testing.assert_allclose(out, want, atol=1e-6, rtol=1e-6)
  for name, got, expected in zip(("dq", "dk", "dv"), vjp(d_out), want_vjp(d_out)):
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5, err_msg=name)


def test_a_masked_key_has_no_influence_and_a_visible_one_does():
  q, k, v, _ = _inputs(MASK.shape[0])
  out = attention.dense_attention(q, k, v, MASK)
  query = 3  # the image's (0, 1): sees the text and its row, not the row below
  assert MASK[query].tolist() == [True, True, True, True, False, False]
  for key, visible in ((5, False), (2, True)):
    moved = attention.dense_attention(q, k.at[:, key].add(10.0), v.at[:, key].add(10.0), MASK)
    changed = np.abs(np.asarray(moved - out))[:, query].max() > 1e-3
    assert changed == visible, key
  # The first text position sees only itself: its output is its own value.
  np.testing.assert_allclose(out[:, 0], v[:, 0], atol=1e-6)


def test_attend_routes_each_implementation_and_they_agree():
  mask = masks.attention_mask("column", 7, 4, 4)
  perm = masks.column_major_permutation(7, 4, 4)
  q, k, v, _ = _inputs(23, batch=1)
  assert attention.target_platform() == "cpu"  # no mesh in context: the default backend
  sparse = attention.attend(q, k, v, mask, "block_sparse", perm, block_size=4)
  np.testing.assert_array_equal(sparse, block_sparse.block_sparse_attention(q, k, v, mask, 4,
                                                                            perm))
  dense = attention.attend(q, k, v, mask, "dense", perm)  # needs no permutation: same result
  np.testing.assert_array_equal(dense, attention.dense_attention(q, k, v, mask))
  np.testing.assert_allclose(sparse, dense, atol=1e-5, rtol=1e-5)
  fused = attention.attend(q, k, v, mask, "fused")
  np.testing.assert_allclose(fused, dense, atol=1e-5, rtol=1e-5)


def test_attend_refuses_a_mask_of_another_length_and_an_unknown_implementation():
  q, k, v, _ = _inputs(MASK.shape[0])
  with pytest.raises(ValueError, match=r"mask \(6, 6\) does not match 5 queries and 5 keys"):
    attention.attend(q[:, :5], k[:, :5], v[:, :5], MASK)
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'; choose one of "
                                       "dense, block_sparse, fused"):
    attention.attend(q, k, v, MASK, "flash")
