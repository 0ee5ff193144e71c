"""The dVAE's training objective: the relaxed evidence lower bound of the paper (Section 2.1, App. A).

    loss = E[-log p(x | z)] + beta * KL(q(z | x) || uniform),   z ~ Gumbel-softmax(logits, tau)

p(x | z) is the logit-Laplace distribution on pixels mapped to [eps, 1 - eps]; everything is
normalised by the number of pixel dimensions (256*256*3 in the paper, so the KL weight is beta/192).
All functions are pure and per example; averaging over the batch is the caller's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.dvae import model as dvae


def logit_laplace_nll(x: jax.Array, stats: jax.Array,
                      min_log_scale: float | None = None) -> jax.Array:
  """-log f(x | mu, b) summed over pixels: f32[B].

  f(x | mu, b) = 1 / (2 b x (1 - x)) * exp(-|logit(x) - mu| / b), with x mapped pixels in (0, 1).

  Args:
    x: mapped pixels f32[B, H, W, 3] (see `dvae.map_pixels`).
    stats: decoder output f32[B, H, W, 6]: mu in channels 0-2, ln b in 3-5.
    min_log_scale: a floor on ln b (not the paper's). On images with large flat areas the scale
      there shrinks without bound, 1/b grows a hundredfold and the loss, and its gradient, become
      nearly all background; the floor bounds that weight. None: no floor.
  """
  mu, log_b = stats[..., :3], stats[..., 3:]
  if min_log_scale is not None:
    log_b = jnp.maximum(log_b, min_log_scale)
  log_x, log_1mx = jnp.log(x), jnp.log1p(-x)
  nll = (jnp.log(2.0) + log_b + log_x + log_1mx
         + jnp.abs(log_x - log_1mx - mu) * jnp.exp(-log_b))
  return nll.reshape(nll.shape[0], -1).sum(axis=-1)


def gumbel_softmax(rng: jax.Array, logits: jax.Array, tau: jax.Array) -> jax.Array:
  """softmax((logits + Gumbel noise) / tau) over the last axis: a relaxed one-hot."""
  noise = jax.random.gumbel(rng, logits.shape, logits.dtype)
  return jax.nn.softmax((logits + noise) / tau, axis=-1)


def kl_to_uniform(logits: jax.Array) -> jax.Array:
  """KL(softmax(logits) || uniform over the vocabulary), summed over code positions: f32[B]."""
  log_q = jax.nn.log_softmax(logits, axis=-1)
  kl = jnp.sum(jnp.exp(log_q) * (log_q + np.log(logits.shape[-1])), axis=-1)
  return kl.reshape(kl.shape[0], -1).sum(axis=-1)


def code_statistics(codes: jax.Array, vocab_size: int) -> dict[str, jax.Array]:
  """How much of the codebook a batch of codes uses: perplexity and fraction of codes used."""
  counts = jnp.bincount(codes.reshape(-1), length=vocab_size)
  p = counts / jnp.maximum(counts.sum(), 1)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return {"perplexity": jnp.exp(entropy), "codes_used": jnp.mean(counts > 0)}


def relaxed_elb(config: dvae.DVAEConfig, params: dict, images: jax.Array, rng: jax.Array,
                tau: jax.Array, beta: jax.Array, min_log_scale: float | None = None,
                decoder_only: jax.Array | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training loss (mean over the batch, per pixel dimension) and its parts.

  Args:
    images: uint8[B, H, W, 3].
    tau: Gumbel-softmax temperature; beta: weight of the KL term.
    min_log_scale: floor on the decoder's ln b (see `logit_laplace_nll`); None for the paper's.
    decoder_only: None (the paper's), or bool[], may be traced. Not the paper's: True gives the
      decoder the encoder's argmax codes, the one-hots it is given at sampling time, with no
      gradient to the encoder and the KL reported but not optimised. Trained on Gumbel samples
      only, the decoder hedges between the codes the noise could have drawn and blurs small
      details (the points of a 7-pixel star); a last phase of this fits it to the codes it will
      decode.

  Returns:
    loss, and metrics: `nll_bpd` (reconstruction, bits per dimension), `kl_bpd`,
    `elb_bpd` (the true bound, beta = 1), `elb_nats` (per image), and code statistics.
  """
  x = dvae.map_pixels(images)
  logits = dvae.Encoder(config).apply({"params": params["encoder"]}, x)
  kl_weight = beta
  if decoder_only is None:
    z = gumbel_softmax(rng, logits, tau)
  else:  # selects rather than branches: one graph for both phases, switched by the step count
    logits = jnp.where(decoder_only, jax.lax.stop_gradient(logits), logits)
    argmax_codes = jax.nn.one_hot(jnp.argmax(logits, -1), config.vocab_size, dtype=logits.dtype)
    z = jnp.where(decoder_only, argmax_codes, gumbel_softmax(rng, logits, tau))
    kl_weight = jnp.where(decoder_only, 0.0, beta)
  stats = dvae.Decoder(config).apply({"params": params["decoder"]}, z)
  nll = logit_laplace_nll(x, stats, min_log_scale)
  kl = kl_to_uniform(logits)
  dims = np.prod(images.shape[1:])
  loss = jnp.mean(nll + kl_weight * kl) / dims
  to_bits = 1.0 / (dims * np.log(2.0))
  metrics = {"loss": loss, "nll_bpd": jnp.mean(nll) * to_bits, "kl_bpd": jnp.mean(kl) * to_bits,
             "elb_bpd": jnp.mean(nll + kl) * to_bits, "elb_nats": jnp.mean(nll + kl)}
  metrics.update(code_statistics(jnp.argmax(logits, -1), config.vocab_size))
  return loss, metrics
