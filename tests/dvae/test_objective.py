"""dalle_jax/dvae/objective.py: the logit-Laplace likelihood, the relaxation and the KL term."""

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.dvae import model as dvae, objective as dvae_objective


def test_logit_laplace_nll_is_the_closed_form_density():
  rng = np.random.default_rng(0)
  x = rng.uniform(0.1, 0.9, (2, 3, 4, 3))
  mu, log_b = rng.normal(size=x.shape), rng.normal(size=x.shape) * 0.3
  density = (1 / (2 * np.exp(log_b) * x * (1 - x))
             * np.exp(-np.abs(np.log(x / (1 - x)) - mu) / np.exp(log_b)))
  expected = -np.log(density).reshape(2, -1).sum(1)
  got = dvae_objective.logit_laplace_nll(jnp.asarray(x, jnp.float32),
                                         jnp.asarray(np.concatenate([mu, log_b], -1), jnp.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_nll_is_lowest_when_mu_is_the_pixels_logit():
  x = jnp.full((1, 2, 2, 3), 0.7)
  logit = jnp.log(0.7 / 0.3)
  stats = lambda mu: jnp.concatenate([jnp.full_like(x, mu), jnp.zeros_like(x)], -1)
  nll = lambda mu: float(dvae_objective.logit_laplace_nll(x, stats(mu))[0])
  assert nll(logit) < nll(logit + 0.1) and nll(logit) < nll(logit - 0.1)


def test_scale_floor_clamps_small_scales_only():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(0.1, 0.9, (1, 2, 2, 3)), jnp.float32)
  mu = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  log_b = jnp.asarray([[[[-5.0, -2.5, -1.9], [-1.0, 0.0, 0.5]],
                        [[-3.0, -1.5, 1.0], [-6.0, -2.1, 0.1]]]])
  nll = lambda lb, floor: dvae_objective.logit_laplace_nll(x, jnp.concatenate([mu, lb], -1), floor)
  np.testing.assert_allclose(nll(log_b, -2.0), nll(jnp.maximum(log_b, -2.0), None), rtol=1e-6)
  assert float(nll(log_b, None)[0]) != float(nll(log_b, -2.0)[0])
  # Below the floor the scale gets no gradient; above it, the paper's.
  grad = jax.grad(lambda lb: nll(lb, -2.0).sum())(log_b)
  grad_paper = jax.grad(lambda lb: nll(lb, None).sum())(log_b)
  below = np.asarray(log_b < -2.0)
  np.testing.assert_array_equal(np.asarray(grad)[below], 0.0)
  np.testing.assert_allclose(np.asarray(grad)[~below], np.asarray(grad_paper)[~below], rtol=1e-6)


def test_kl_to_uniform_is_zero_for_flat_logits_and_log_k_for_certain_ones():
  flat = jnp.zeros((2, 4, 4, 16))
  np.testing.assert_allclose(dvae_objective.kl_to_uniform(flat), [0.0, 0.0], atol=1e-5)
  certain = jax.nn.one_hot(jnp.zeros((1, 4, 4), jnp.int32), 16) * 100.0
  np.testing.assert_allclose(dvae_objective.kl_to_uniform(certain), [16 * np.log(16)], rtol=1e-4)


def test_gumbel_softmax_is_a_distribution_that_hardens_as_tau_falls():
  logits = jax.random.normal(jax.random.key(0), (64, 10))
  key = jax.random.key(1)
  soft = dvae_objective.gumbel_softmax(key, logits, 1.0)
  hard = dvae_objective.gumbel_softmax(key, logits, 1e-3)
  np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-5)
  # Same noise, tiny tau: the argmax of logits + noise, one-hot.
  noisy_argmax = jnp.argmax(logits + jax.random.gumbel(key, logits.shape), -1)
  np.testing.assert_array_equal(jnp.argmax(hard, -1), noisy_argmax)
  assert float(hard.max(-1).min()) > 0.99 and float(soft.max(-1).mean()) < 0.9


def test_code_statistics_count_usage_and_perplexity():
  stats = dvae_objective.code_statistics(jnp.array([[0, 1], [2, 3]]), 8)
  np.testing.assert_allclose([stats["perplexity"], stats["codes_used"]], [4.0, 0.5], rtol=1e-5)


def test_relaxed_elb_parts_add_up():
  config = dvae.DVAEConfig(resolution=16, group_count=3, n_hid=16, n_blk_per_group=1, n_init=8,
                           vocab_size=32)
  params = dvae.init(config, jax.random.key(0))
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)), jnp.uint8)
  loss, m = jax.jit(lambda p, x: dvae_objective.relaxed_elb(config, p, x, jax.random.key(1),
                                                            0.5, 2.0))(params, images)
  dims_bits = 16 * 16 * 3 * np.log(2)
  np.testing.assert_allclose(m["elb_bpd"], m["nll_bpd"] + m["kl_bpd"], rtol=1e-5)
  np.testing.assert_allclose(loss, (m["nll_bpd"] + 2.0 * m["kl_bpd"]) * np.log(2), rtol=1e-5)
  np.testing.assert_allclose(m["elb_nats"], m["elb_bpd"] * dims_bits, rtol=1e-5)


def test_decoder_only_is_the_decoders_nll_on_argmax_codes_and_leaves_the_encoder_alone():
  config = dvae.DVAEConfig(resolution=16, group_count=3, n_hid=16, n_blk_per_group=1, n_init=8,
                           vocab_size=32)
  params = dvae.init(config, jax.random.key(0))
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)), jnp.uint8)
  loss_fn = lambda p: dvae_objective.relaxed_elb(config, p, images, jax.random.key(1), 0.5, 2.0,
                                                 -2.0, decoder_only=jnp.array(True))
  (loss, m), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  codes = dvae.encode(config, params, images)
  stats = dvae.decoder_stats(config, params, jax.nn.one_hot(codes, 32))
  nll = dvae_objective.logit_laplace_nll(dvae.map_pixels(images), stats, -2.0)
  np.testing.assert_allclose(loss, nll.mean() / (16 * 16 * 3), rtol=1e-5)
  np.testing.assert_allclose(m["nll_bpd"] * np.log(2), loss, rtol=1e-5)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["encoder"]))
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["decoder"]))
