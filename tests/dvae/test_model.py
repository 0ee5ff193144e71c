"""dalle_jax/dvae/model.py: the official architecture's shapes and counts, and its pure functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.dvae import model as dvae

TINY = dvae.DVAEConfig(resolution=16, group_count=3, n_hid=16, n_blk_per_group=1, n_init=8,
                       vocab_size=32)


def _count(tree):
  leaves = jax.tree.leaves(tree)
  return len(leaves), sum(int(np.prod(leaf.shape)) for leaf in leaves)


def test_official_configuration_has_the_released_tensor_and_parameter_counts():
  shapes = jax.eval_shape(lambda key: dvae.init(dvae.DVAEConfig(), key), jax.random.key(0))
  assert _count(shapes["encoder"]) == (74, 53_786_240)
  assert _count(shapes["decoder"]) == (76, 43_829_766)
  assert shapes["encoder"]["output_conv"]["w"].shape == (1, 1, 2048, 8192)
  assert shapes["decoder"]["input"]["w"].shape == (1, 1, 8192, 128)
  assert "id_path" not in shapes["encoder"]["group_1_block_1"]  # widths equal: identity
  assert shapes["encoder"]["group_2_block_1"]["id_path"]["w"].shape == (1, 1, 256, 512)
  assert dvae.DVAEConfig().code_resolution == 32


@pytest.fixture(scope="module")
def params():
  return dvae.init(TINY, jax.random.key(1))


def test_initialisation_follows_the_official_scale(params):
  w = params["encoder"]["group_3_block_1"]["res_path_conv_2"]["w"]  # 3x3x16x16, fan-in 144
  assert abs(float(jnp.std(w)) * np.sqrt(3 * 3 * 16) - 1.0) < 0.06
  assert not np.asarray(params["encoder"]["input"]["b"]).any()


def test_encode_decode_shapes_and_code_lookup_equals_one_hot_convolution(params):
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)), jnp.uint8)
  logits, codes = jax.jit(lambda p, x: (dvae.encoder_logits(TINY, p, x),
                                        dvae.encode(TINY, p, x)))(params, images)
  assert logits.shape == (2, 4, 4, 32) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(codes, jnp.argmax(logits, -1))
  stats = jax.jit(lambda p, z: dvae.decoder_stats(TINY, p, z))
  by_lookup = stats(params, codes)
  by_one_hot = stats(params, jax.nn.one_hot(codes, 32))
  assert by_lookup.shape == (2, 16, 16, 6)
  np.testing.assert_allclose(by_lookup, by_one_hot, rtol=1e-5, atol=1e-6)
  pixels = jax.jit(lambda p, c: dvae.decode(TINY, p, c))(params, codes)
  assert pixels.shape == (2, 16, 16, 3) and pixels.dtype == jnp.uint8


def test_pixel_mapping_round_trips_and_clips():
  x = jnp.linspace(0, 1, 11)
  np.testing.assert_allclose(dvae.map_pixels(x), 0.8 * x + 0.1, rtol=1e-6)
  np.testing.assert_allclose(dvae.unmap_pixels(dvae.map_pixels(x)), x, atol=1e-6)
  np.testing.assert_allclose(dvae.unmap_pixels(jnp.array([0.0, 1.0])), [0.0, 1.0])
  np.testing.assert_allclose(dvae.map_pixels(jnp.array([0, 255], jnp.uint8)), [0.1, 0.9])


@pytest.mark.parametrize("overrides,message", [
    ({"resolution": 100}, "not divisible by the downsampling factor 8"),
    ({"vocab_size": 1}, "vocab_size must be >= 2"),
    ({"n_hid": 30}, "multiple of 4"),
    ({"group_count": 0}, "group_count must be >= 1"),
    ({"dtype": "float64"}, "dtype"),
])
def test_impossible_configs_are_refused_before_anything_compiles(overrides, message):
  with pytest.raises(ValueError, match=message):
    dvae.DVAEConfig(**overrides)
