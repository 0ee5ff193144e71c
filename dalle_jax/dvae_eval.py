"""Judging a dVAE: reconstructions through the argmax codes, PSNR and codebook usage."""

from __future__ import annotations

import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import dvae, dvae_objective


@functools.partial(jax.jit, static_argnums=0)
def reconstruct(config: dvae.DVAEConfig, params: dict, images: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """uint8 images -> (argmax codes int32[B, h, w], reconstructions uint8[B, H, W, 3])."""
  codes = dvae.encode(config, params, images)
  return codes, dvae.decode(config, params, codes)


def psnr(images: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
  """Peak signal-to-noise ratio in dB per image, of uint8[B, H, W, 3] arrays: f64[B]."""
  error = (np.asarray(images, np.float64) - np.asarray(reconstructions, np.float64)) ** 2
  mse = np.maximum(error.reshape(len(error), -1).mean(axis=1), 1e-10)
  return 10.0 * np.log10(255.0 ** 2 / mse)


def evaluate(config: dvae.DVAEConfig, params: dict, batches: Iterable[dict]) -> dict[str, float]:
  """Mean PSNR over the images of `batches`, and the perplexity of all their codes together."""
  scores, all_codes = [], []
  for batch in batches:
    codes, recon = reconstruct(config, params, jnp.asarray(batch["image"]))
    scores.append(psnr(batch["image"], np.asarray(recon)))
    all_codes.append(np.asarray(codes))
  if not scores:
    raise ValueError("no evaluation batches")
  stats = dvae_objective.code_statistics(jnp.asarray(np.concatenate(all_codes)),
                                         config.vocab_size)
  return {"psnr": float(np.concatenate(scores).mean()), "perplexity": float(stats["perplexity"]),
          "codes_used": float(stats["codes_used"]), "images": int(sum(len(s) for s in scores))}


def side_by_side(images: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
  """Each input beside its reconstruction: uint8[B, H, 2W, 3], for reconstruction grids."""
  return np.concatenate([np.asarray(images), np.asarray(reconstructions)], axis=2)
