"""Tests for dalle_jax/transformer/sampling.py: the cached sampler draws exactly what full forward passes draw."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.dvae import model as dvae
from dalle_jax.transformer import model as transformer, sampling
from dalle_jax.transformer.model import TransformerConfig
from dalle_jax.transformer.sampling import SampleSettings

# Every mask kind in one small model, the conv kernel wrapping around the 4-wide rows.
MODEL = TransformerConfig(text_vocab_size=56, text_len=8, image_vocab_size=32, image_size=4,
                          width=32, depth=4, heads=4, head_dim=8, conv_kernel=3,
                          layer_kinds=("row", "column", "dense", "conv"))
BATCH = 3


@pytest.fixture(scope="module")
def params():
  # Larger-than-init weights so the logits are peaked and the draws depend on the inputs.
  p = nn.unbox(transformer.init(MODEL, jax.random.key(0)))
  return jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x, p)


@pytest.fixture(scope="module")
def text():
  return jnp.asarray(np.random.default_rng(0).integers(0, 56, (BATCH, MODEL.text_len)),
                     jnp.int32)


def _keys(seed=0):
  return jax.random.split(jax.random.key(seed), BATCH)


cached = jax.jit(sampling.sample_codes, static_argnums=(0, 6))
uncached = jax.jit(sampling.sample_codes_uncached, static_argnums=(0, 6))


@pytest.mark.parametrize("settings, guided", [
    (SampleSettings(), False),
    (SampleSettings(temperature=0.7, top_k=5, top_p=0.9), False),
    (SampleSettings(guidance=3.0), True),
])
def test_cached_sampling_draws_the_uncached_tokens(params, text, settings, guided):
  a = cached(MODEL, params, text, _keys(), settings, None, guided)
  b = uncached(MODEL, params, text, _keys(), settings, None, guided)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (BATCH, 4, 4) and len(np.unique(np.asarray(a))) > 3


@pytest.mark.parametrize("settings, guided", [
    (SampleSettings(), False),
    (SampleSettings(guidance=3.0, prime_rows=1), True),
])
def test_the_sparse_decode_step_draws_the_dense_tokens(params, text, settings, guided):
  # The sparse model's steps read only the keys each mask row admits (block-sparse attention in
  # the uncached reference): the same draws as the dense model.
  sparse = dataclasses.replace(MODEL, attention="block_sparse", attention_block_size=4)
  primes = jnp.asarray(np.random.default_rng(2).integers(0, 32, (BATCH, 4, 4)), jnp.int32)
  want = uncached(MODEL, params, text, _keys(), settings, primes, guided)
  np.testing.assert_array_equal(cached(sparse, params, text, _keys(), settings, primes, guided),
                                want)
  np.testing.assert_array_equal(uncached(sparse, params, text, _keys(), settings, primes, guided),
                                want)


def test_the_cache_gives_the_logits_of_the_full_forward_pass(params, text):
  model = transformer.Transformer(MODEL)
  codes = jnp.asarray(np.random.default_rng(1).integers(0, 32, (BATCH, 16)), jnp.int32)
  _, full = model.apply({"params": params}, text, codes)
  logits, cache = model.apply({"params": params}, text, method=model.prefill, mutable=["cache"])
  steps = [logits]
  for j in range(15):
    logits, cache = model.apply({"params": params, **cache}, codes[:, j], j,
                                method=model.decode, mutable=["cache"])
    steps.append(logits)
  np.testing.assert_allclose(jnp.stack(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_top_k_1_is_greedy(params, text):
  codes = cached(MODEL, params, text, _keys(), SampleSettings(top_k=1), None, False)
  model = transformer.Transformer(MODEL)
  _, logits = model.apply({"params": params}, text, codes)
  np.testing.assert_array_equal(codes.reshape(BATCH, -1), jnp.argmax(logits, -1))


def test_guidance_1_equals_plain_sampling_and_seeds_repeat(params, text):
  plain = cached(MODEL, params, text, _keys(), SampleSettings(), None, False)
  guided = cached(MODEL, params, text, _keys(), SampleSettings(guidance=1.0), None, True)
  np.testing.assert_array_equal(plain, guided)
  np.testing.assert_array_equal(plain, cached(MODEL, params, text, _keys(), SampleSettings(),
                                              None, False))
  assert not np.array_equal(plain, cached(MODEL, params, text, _keys(1), SampleSettings(),
                                          None, False))


def test_a_sample_depends_only_on_its_own_key(params, text):
  full = cached(MODEL, params, text, _keys(), SampleSettings(), None, False)
  one = jax.jit(sampling.sample_codes, static_argnums=(0, 6))(
      MODEL, params, text[1:2], _keys()[1:2], SampleSettings(), None, False)
  np.testing.assert_array_equal(one[0], full[1])


def test_primed_rows_are_kept(params, text):
  prime = jnp.asarray(np.random.default_rng(2).integers(0, 32, (BATCH, 4, 4)), jnp.int32)
  settings = SampleSettings(prime_rows=2)
  codes = cached(MODEL, params, text, _keys(), settings, prime, False)
  np.testing.assert_array_equal(codes[:, :2], prime[:, :2])
  assert not np.array_equal(codes[:, 2:], prime[:, 2:])
  np.testing.assert_array_equal(codes, uncached(MODEL, params, text, _keys(), settings, prime,
                                                False))


def test_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda k, p: np.isfinite(np.asarray(sampling.filter_logits(logits, k, p)))[0].tolist()
  assert kept(0, 1.0) == [True] * 4
  assert kept(2, 1.0) == [True, True, False, False]
  assert kept(0, 0.5) == [True, False, False, False]
  assert kept(0, 0.81) == [True, True, True, False]
  assert kept(1, 0.99) == [True, False, False, False]


def test_the_sampler_decodes_pixels_and_splits_the_batch_over_a_mesh(params):
  from dalle_jax import sharding
  dvae_config = dvae.DVAEConfig(resolution=16, group_count=3, n_hid=8, n_blk_per_group=1,
                                n_init=8, vocab_size=32)
  dvae_params = dvae.init(dvae_config, jax.random.key(1))
  text = jnp.asarray(np.random.default_rng(3).integers(0, 56, (4, MODEL.text_len)), jnp.int32)
  keys = jax.random.split(jax.random.key(0), 4)
  mesh = sharding.make_mesh(4, 1, 1, devices=jax.devices()[:4])
  sample = sampling.make_sampler(MODEL, dvae_config, mesh=mesh)
  images, codes = sample(params, dvae_params, text, keys, SampleSettings(),
                         jnp.zeros((4, 4, 4), jnp.int32))
  assert images.shape == (4, 16, 16, 3) and images.dtype == jnp.uint8
  assert len(codes.sharding.device_set) == 4
  single = cached(MODEL, params, text, keys, SampleSettings(), None, False)
  np.testing.assert_array_equal(codes, single)
  np.testing.assert_array_equal(images, dvae.decode(dvae_config, dvae_params, single))
