"""Judging a dVAE: reconstructions through the argmax codes, PSNR and codebook usage."""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from dalle_jax import sharding
from dalle_jax.dvae import model as dvae, objective as dvae_objective


def _reconstruct(config: dvae.DVAEConfig, params: dict, images: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  codes = dvae.encode(config, params, images)
  return codes, dvae.decode(config, params, codes)


@functools.partial(jax.jit, static_argnums=0)
def reconstruct(config: dvae.DVAEConfig, params: dict, images: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """uint8 images -> (argmax codes int32[B, h, w], reconstructions uint8[B, H, W, 3])."""
  return _reconstruct(config, params, images)


def make_sharded_reconstruct(config: dvae.DVAEConfig, mesh, param_shardings: Any
                             ) -> Callable[[Any, np.ndarray], tuple[np.ndarray, ...]]:
  """`reconstruct` on parameters sharded over `mesh` (an fsdp axis may span hosts): (params, this
  host's uint8[b, H, W, 3] images) -> every host's (images, codes, reconstructions) as NumPy
  arrays [B, ...], hosts in order. Every host calls it with its own share."""
  batch = sharding.batch_sharding(mesh)
  step = jax.jit(functools.partial(_reconstruct, config), in_shardings=(param_shardings, batch),
                 out_shardings=(batch, batch))

  def run(params, images):
    images = jax.make_array_from_process_local_data(batch, np.asarray(images))
    codes, recon = step(params, images)
    gathered = multihost_utils.process_allgather((images, codes, recon), tiled=True)
    return tuple(np.asarray(x) for x in gathered)

  return run


def psnr(images: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
  """Peak signal-to-noise ratio in dB per image, of uint8[B, H, W, 3] arrays: f64[B]."""
  error = (np.asarray(images, np.float64) - np.asarray(reconstructions, np.float64)) ** 2
  mse = np.maximum(error.reshape(len(error), -1).mean(axis=1), 1e-10)
  return 10.0 * np.log10(255.0 ** 2 / mse)


def evaluate(config: dvae.DVAEConfig, params: Any, batches: Iterable[dict],
             reconstruct_fn: Callable[[Any, np.ndarray], tuple[np.ndarray, ...]] | None = None
             ) -> dict[str, float]:
  """Mean PSNR over the images of `batches`, and the perplexity of all their codes together.

  `reconstruct_fn`: `make_sharded_reconstruct`'s for sharded `params` (then over every host's
  images); default: `reconstruct` on this host's.
  """
  if reconstruct_fn is None:
    reconstruct_fn = lambda p, images: (images, *reconstruct(config, p, jnp.asarray(images)))
  scores, all_codes = [], []
  for batch in batches:
    images, codes, recon = reconstruct_fn(params, batch["image"])
    scores.append(psnr(images, np.asarray(recon)))
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
