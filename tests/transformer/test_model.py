"""Tests for dalle_jax/transformer/model.py: geometry, the masks each layer really applies, the loss."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.transformer import masks, model as transformer
from dalle_jax.transformer.model import TransformerConfig

TINY = TransformerConfig(text_vocab_size=56, text_len=8, image_vocab_size=32, image_size=4,
                         width=32, depth=4, heads=4, head_dim=8, conv_kernel=3)


def _batch(config, seed=0, batch=2):
  rng = np.random.default_rng(seed)
  text = rng.integers(0, config.num_text_tokens, (batch, config.text_len)).astype(np.int32)
  codes = rng.integers(0, config.image_vocab_size,
                       (batch, config.image_size, config.image_size)).astype(np.int32)
  return jnp.asarray(text), jnp.asarray(codes)


def _params(config, seed=0):
  return nn.unbox(transformer.init(config, jax.random.key(seed)))


def test_paper_config_has_about_12_billion_parameters():
  paper = TransformerConfig()
  assert paper.seq_len == 1280 and paper.num_text_tokens == 16_384 + 256
  per_layer = 4 * 3968 + 3 * 3968 * 3968 + 3 * 3968 + 3968 * 3968 + 3968 + 2 * 4 * 3968 ** 2 \
      + 4 * 3968 + 3968
  embeddings = (16_640 + 8192 + 256 + 32 + 32) * 3968
  heads = 3968 * 16_640 + 16_640 + 3968 * 8192 + 8192 + 2 * 3968
  expected = 64 * per_layer + embeddings + heads
  assert transformer.count_params(paper) == expected
  assert 11.5e9 < expected < 12.5e9
  assert paper.kinds()[:6] == ("row", "column", "row", "row", "row", "column")
  assert paper.kinds()[-1] == "conv"


def test_shapes_and_initial_loss_near_uniform():
  text, codes = _batch(TINY)
  params = _params(TINY)
  text_logits, image_logits = transformer.Transformer(TINY).apply({"params": params}, text, codes)
  assert text_logits.shape == (2, 7, 64) and image_logits.shape == (2, 16, 32)
  loss, metrics = transformer.dalle_loss(TINY, text_logits, image_logits, text, codes)
  assert abs(float(metrics["text_loss"]) - np.log(64)) < 0.1
  assert abs(float(metrics["image_loss"]) - np.log(32)) < 0.1
  np.testing.assert_allclose(float(loss), (metrics["text_loss"] + 7 * metrics["image_loss"]) / 8,
                             rtol=1e-6)


@pytest.mark.parametrize("kind", masks.KINDS)
def test_each_layer_sees_exactly_what_its_mask_allows(kind):
  # One layer: the output at query q changes with the input at position k iff mask[q, k].
  config = dataclasses.replace(TINY, depth=1, layer_kinds=(kind,))
  params = _params(config, seed=1)
  text, codes = _batch(config, seed=1, batch=1)
  mask = config.mask(kind)

  def outputs(text, codes):
    text_logits, image_logits = transformer.Transformer(config).apply(
        {"params": params}, text, codes)
    # Position i's prediction: text logits at 0..T-2, image logits at T-1..T+N-2.
    return jnp.concatenate([text_logits[0, :, 0], image_logits[0, :, 0]])

  base = outputs(text, codes)
  seen = np.zeros((config.seq_len - 1, config.seq_len), bool)
  for key in range(config.seq_len):
    if key < config.text_len:
      changed = text.at[0, key].set((text[0, key] + 1) % config.num_text_tokens), codes
    else:
      flat = codes.reshape(-1)
      i = key - config.text_len
      changed = text, flat.at[i].set((flat[i] + 1) % config.image_vocab_size).reshape(codes.shape)
    seen[:, key] = np.abs(np.asarray(outputs(*changed) - base)) > 1e-7
  np.testing.assert_array_equal(seen, mask[:-1])


def test_bfloat16_and_remat_match_float32():
  text, codes = _batch(TINY)
  params = _params(TINY)

  def loss(config):
    def f(p):
      logits = transformer.Transformer(config).apply({"params": p}, text, codes)
      return transformer.dalle_loss(config, *logits, text, codes)[0]
    return jax.value_and_grad(f)(params)

  value, grads = loss(TINY)
  remat_value, remat_grads = loss(dataclasses.replace(TINY, remat=True))
  np.testing.assert_allclose(remat_value, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), remat_grads, grads)
  bf16_value, _ = loss(dataclasses.replace(TINY, dtype="bfloat16"))
  assert abs(float(bf16_value) - float(value)) < 0.02
  assert jax.tree.leaves(params)[0].dtype == jnp.float32


@pytest.mark.parametrize("kinds, implementation", [
    (None, "block_sparse"), (("axial_row", "axial_col", "dense", "conv"), "block_sparse"),
    (None, "fused")])
def test_block_sparse_and_fused_layers_match_dense_ones(kinds, implementation):
  # Block size 4 over 8 + 16 positions: empty, partial and full blocks in every mask, and the
  # column layers run in column-major order. "fused" is jax.nn.dot_product_attention (XLA here).
  dense = dataclasses.replace(TINY, layer_kinds=kinds)
  sparse = dataclasses.replace(dense, attention=implementation, attention_block_size=4)
  text, codes = _batch(TINY)
  params = _params(TINY)

  def loss(config):
    def f(p):
      logits = transformer.Transformer(config).apply({"params": p}, text, codes)
      return transformer.dalle_loss(config, *logits, text, codes)[0]
    return jax.jit(jax.value_and_grad(f))(params)

  (value, grads), (sparse_value, sparse_grads) = loss(dense), loss(sparse)
  np.testing.assert_allclose(sparse_value, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), sparse_grads, grads)


@pytest.mark.parametrize("change, message", [
    (dict(layer_kinds=("row", "sparse", "row", "conv")), "unknown layer kinds"),
    (dict(layer_kinds=("row",)), "1 entries for depth 4"),
    (dict(conv_kernel=4), "conv_kernel"),
    (dict(dtype="float16"), "dtype"),
    (dict(attention="flash"), "attention"),
    (dict(text_len=1), "text_len"),
    (dict(attention_block_size=0), "attention_block_size"),
])
def test_bad_configs_are_refused(change, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(TINY, **change)


def test_scanned_layer_groups_match_unrolled_layers():
  """`scan_layers`: 2 scanned repeats of (row, column, row, row), the last 2 layers unrolled;
  the same parameters stacked give the same logits, decoding and gradients."""
  from dalle_jax.transformer import sampling
  config = dataclasses.replace(TINY, depth=10, remat=True)
  scanned = dataclasses.replace(config, scan_layers=True)
  assert scanned.scan_groups() == (2, ("row", "column", "row", "row"))
  assert config.scan_groups()[0] == 0
  params = _params(config)
  stacked = transformer.stack_layers(scanned, params)
  abstract = nn.unbox(transformer.abstract_params(scanned))
  assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, stacked)
  assert sorted(k for k in stacked if k.startswith("block_")) == ["block_8", "block_9"]
  np.testing.assert_array_equal(stacked["groups"]["block_1"]["mlp"]["wi"]["kernel"][1],
                                params["block_5"]["mlp"]["wi"]["kernel"])
  assert jax.tree.all(jax.tree.map(np.array_equal, transformer.unstack_layers(scanned, stacked),
                                   params))
  # The stacked axis is named `layers` and never split.
  spec = nn.get_partition_spec(transformer.abstract_params(scanned))
  assert spec["groups"]["block_0"]["attention"]["qkv"]["kernel"][0] == "layers"

  text, codes = _batch(config)
  loss = lambda c, p: transformer.dalle_loss(
      c, *transformer.Transformer(c).apply({"params": p}, text, codes), text, codes)[0]
  np.testing.assert_allclose(loss(scanned, stacked), loss(config, params), rtol=1e-6)
  grads = transformer.unstack_layers(scanned, jax.grad(loss, argnums=1)(scanned, stacked))
  expected = jax.grad(loss, argnums=1)(config, params)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)

  keys = jax.random.split(jax.random.key(1), 2)
  settings = sampling.SampleSettings()
  np.testing.assert_array_equal(sampling.sample_codes(scanned, stacked, text, keys, settings),
                                sampling.sample_codes(config, params, text, keys, settings))
