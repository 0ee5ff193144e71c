"""From captions to image codes (and pixels): one jit-compiled function per batch shape.

    sample = make_sampler(model_config, dvae_config, mesh=mesh)
    images, codes = sample(params, dvae_params, text, keys, SampleSettings(top_k=64), prime)
    # images uint8[B, res, res, 3], codes int32[B, H, W]; text int32[B, T], keys [B]

The caption is run once (`Transformer.prefill`) into a key/value cache; then each image code is
drawn and fed back (`Transformer.decode`) inside `lax.fori_loop`, every step attending through its
row of each layer's static mask. Settings (temperature, top-k, top-p, guidance scale, primed
rows) are traced values, so changing them does not recompile; only turning guidance on or off
does (it doubles the batch).

Classifier-free guidance runs the caption and the empty caption (all pad ids, what caption
dropout trained) as one batch with one cache each, mixes the logits as
`uncond + scale * (cond - uncond)`, and feeds the drawn code to both.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from dalle_jax import sharding
from dalle_jax.dvae import model as dvae
from dalle_jax.transformer import model as transformer
from dalle_jax.transformer.model import TransformerConfig


@flax.struct.dataclass
class SampleSettings:
  """How codes are drawn; every field is a traced scalar (changing one does not recompile)."""
  temperature: float | jax.Array = 1.0
  top_k: int | jax.Array = 0          # 0: no top-k filter
  top_p: float | jax.Array = 1.0      # 1: no nucleus filter
  guidance: float | jax.Array = 1.0   # classifier-free guidance scale; 1: plain sampling
  prime_rows: int | jax.Array = 0     # keep this many rows of `prime_codes`


def filter_logits(logits: jax.Array, top_k: jax.Array | int,
                  top_p: jax.Array | float) -> jax.Array:
  """Sets to -inf what top-k (k > 0) and nucleus (p < 1) filtering drop: [B, V] -> [B, V].

  Ties at the k-th value are all kept; nucleus keeps the smallest set of largest logits whose
  probability reaches p (always at least the top one).
  """
  vocab = logits.shape[-1]
  ordered = jnp.sort(logits, axis=-1)[:, ::-1]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take_along_axis(ordered, jnp.broadcast_to(k - 1, (logits.shape[0], 1)), axis=-1)
  logits = jnp.where(logits < kth, -jnp.inf, logits)
  # Nucleus over what top-k left: mass before each sorted entry < p keeps it.
  ordered = jnp.where(ordered < kth, -jnp.inf, ordered)
  probs = jax.nn.softmax(ordered, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_before < top_p
  cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < cutoff, -jnp.inf, logits)


def _draw(logits: jax.Array, keys: jax.Array, index: jax.Array,
          settings: SampleSettings) -> jax.Array:
  """One code per sample: logits [B, V], one key per sample [B] -> int32[B]."""
  logits = logits / settings.temperature
  # The sort behind the filters costs more than the rest of a decode step: skip it when unused.
  filtering = (settings.top_k > 0) | (settings.top_p < 1)
  logits = jax.lax.cond(filtering, lambda x: filter_logits(x, settings.top_k, settings.top_p),
                        lambda x: x, logits)
  step_keys = jax.vmap(lambda key: jax.random.fold_in(key, index))(keys)
  return jax.vmap(lambda key, row: jax.random.categorical(key, row))(step_keys, logits)


def _guided(logits: jax.Array, guidance: jax.Array | float, guided: bool) -> jax.Array:
  if not guided:
    return logits
  cond, uncond = jnp.split(logits, 2)
  return uncond + guidance * (cond - uncond)


def empty_captions(config: TransformerConfig, batch: int) -> jax.Array:
  """The empty caption (every position its pad id), int32[batch, text_len]."""
  pads = config.text_vocab_size + jnp.arange(config.text_len, dtype=jnp.int32)
  return jnp.broadcast_to(pads, (batch, config.text_len))


def _prepare(config: TransformerConfig, text: jax.Array, settings: SampleSettings,
             prime_codes: jax.Array | None, guided: bool
             ) -> tuple[transformer.Transformer, jax.Array, jax.Array, jax.Array]:
  """What both samplers start from: the model in inference mode, the captions (with the empty
  ones after them when guided), the primed codes int32[B, H * W] and how many of them to keep."""
  config = dataclasses.replace(config, remat=False, dropout=0.0)
  batch, n = text.shape[0], config.image_len
  if guided:
    text = jnp.concatenate([text, empty_captions(config, batch)])
  primed = jnp.zeros((batch, n), jnp.int32) if prime_codes is None else \
      prime_codes.reshape(batch, n).astype(jnp.int32)
  return transformer.Transformer(config), text, primed, settings.prime_rows * config.image_size


def sample_codes(config: TransformerConfig, params: Any, text: jax.Array, keys: jax.Array,
                 settings: SampleSettings, prime_codes: jax.Array | None = None,
                 guided: bool = False) -> jax.Array:
  """Draws the image codes for each caption with the key/value cache.

  Args:
    text: int32[B, T] caption ids (from the tokenizer).
    keys: [B] PRNG keys, one per sample (a sample depends only on its own key).
    settings: temperature, top-k, top-p, guidance scale, primed rows.
    prime_codes: int32[B, H, W] codes whose first `settings.prime_rows` rows are kept.
    guided: run the unconditional pass for classifier-free guidance.

  Returns:
    int32[B, H, W] codes.
  """
  model, text, primed, num_primed = _prepare(config, text, settings, prime_codes, guided)
  batch, n = primed.shape

  logits, cache = model.apply({"params": params}, text, method=transformer.Transformer.prefill,
                              mutable=["cache"])

  def choose(logits, index):
    drawn = _draw(_guided(logits, settings.guidance, guided), keys, index, settings)
    return jnp.where(index < num_primed, primed[:, index], drawn).astype(jnp.int32)

  def step(index, carry):
    codes, logits, cache = carry
    code = choose(logits, index)
    codes = codes.at[:, index].set(code)
    fed = jnp.concatenate([code, code]) if guided else code
    logits, variables = model.apply({"params": params, **cache}, fed, index,
                                    method=transformer.Transformer.decode, mutable=["cache"])
    return codes, logits, variables

  codes = jnp.zeros((batch, n), jnp.int32)
  codes, logits, _ = jax.lax.fori_loop(0, n - 1, step, (codes, logits, cache))
  codes = codes.at[:, n - 1].set(choose(logits, n - 1))
  return codes.reshape(batch, config.image_size, config.image_size)


def sample_codes_uncached(config: TransformerConfig, params: Any, text: jax.Array,
                          keys: jax.Array, settings: SampleSettings,
                          prime_codes: jax.Array | None = None, guided: bool = False
                          ) -> jax.Array:
  """The same draws as `sample_codes` with a full forward pass per code (no cache): the
  reference the cached path is tested against. Quadratically slower."""
  model, text, primed, num_primed = _prepare(config, text, settings, prime_codes, guided)
  batch, n = primed.shape

  def step(index, codes):
    both = jnp.concatenate([codes, codes]) if guided else codes
    _, image_logits = model.apply({"params": params}, text, both)
    logits = _guided(image_logits[:, index], settings.guidance, guided)
    drawn = _draw(logits, keys, index, settings)
    code = jnp.where(index < num_primed, primed[:, index], drawn)
    return codes.at[:, index].set(code.astype(jnp.int32))

  codes = jax.lax.fori_loop(0, n, step, jnp.zeros((batch, n), jnp.int32))
  return codes.reshape(batch, config.image_size, config.image_size)


def make_sampler(config: TransformerConfig, dvae_config: dvae.DVAEConfig | None = None,
                 mesh=None, guided: bool = False, param_shardings: Any = None) -> Callable:
  """`sample(params, dvae_params, text, keys, settings, prime_codes)` -> (uint8 images or None,
  codes), compiled once per batch shape. With a `mesh` the batch is split over its batch axes
  and the parameters stay where `param_shardings` puts them (default: replicated).
  """
  def sample(params, dvae_params, text, keys, settings, prime_codes):
    codes = sample_codes(config, params, text, keys, settings, prime_codes, guided)
    if dvae_config is None:
      return None, codes
    return dvae.decode(dvae_config, dvae_params, codes), codes

  if mesh is None:
    return jax.jit(sample)
  split, whole = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  params = whole if param_shardings is None else param_shardings
  return jax.jit(sample, in_shardings=(params, whole, split, split, whole, split),
                 out_shardings=(split, split))
