"""Reranking by caption contrast: the transformer judges its own samples against near misses.

A sample's score is the log-probability, under the transformer read as a classifier with a
uniform prior, that its own caption rather than one of the caption's near misses (the captions one
attribute away: another shape, size or place) drew its codes:

    score(codes | c) = log p(codes | c) - logsumexp_{c' in {c} + near_misses(c)} log p(codes | c')

A contrastive image-text model trained on random batches learns what random captions differ in;
the candidates for one caption differ in just what the near misses change, and the transformer
already knows how each of those draws. Captions without near misses score 0 (drawing order kept).

    contrast = CaptionContrast(config)
    scores = contrast.score(params, text_ids, codes, alternatives)  # ids of NEAR_MISSES["shapes"]
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.data import shapes
from dalle_jax.transformer import model as transformer_model


def shapes_near_misses(caption: str) -> list[str]:
  """The shapes captions one attribute away from `caption`: each object's other shapes and other
  size, and the other positions (one object) or relations (two); [] outside the grammar."""
  try:
    scene = shapes.parse_caption(caption)
  except ValueError:
    return []
  scenes = []
  for k, obj in enumerate(scene.objects):
    changed = [obj._replace(shape=s) for s in shapes.SHAPES if s != obj.shape]
    changed += [obj._replace(size=s) for s in shapes.SIZES if s != obj.size]
    for new in changed:
      objects = scene.objects[:k] + (new,) + scene.objects[k + 1:]
      scenes.append(shapes.Scene(objects, position=scene.position, relation=scene.relation))
  if scene.position is not None:
    scenes += [shapes.Scene(scene.objects, position=p) for p in shapes.POSITIONS
               if p != scene.position]
  else:
    scenes += [shapes.Scene(scene.objects, relation=r) for r in shapes.RELATIONS
               if r != scene.relation]
  return [shapes.canonical_caption(s) for s in scenes]


# Datasets whose captions have near misses, by the name scripts take (--near_misses).
NEAR_MISSES: dict[str, Callable[[str], list[str]]] = {"shapes": shapes_near_misses}


class CaptionContrast:
  """Scores a transformer's codes against their caption's near misses, in fixed-size batches
  (one compilation)."""

  def __init__(self, config: transformer_model.TransformerConfig, batch_size: int = 256):
    self.config, self.batch_size = config, batch_size
    model = transformer_model.Transformer(config)

    def log_likelihood(params, text, codes):
      _, image_logits = model.apply({"params": params}, text, codes)
      log_probs = jax.nn.log_softmax(image_logits.astype(jnp.float32), axis=-1)
      flat = codes.reshape(codes.shape[0], -1)
      return jnp.take_along_axis(log_probs, flat[..., None], axis=-1)[..., 0].sum(-1)

    self._log_likelihood = jax.jit(log_likelihood)

  def log_likelihoods(self, params, text: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """float32[N]: log p(codes[i] | text[i]) for int32[N, text_len] and int32[N, h, w]."""
    out = []
    for start in range(0, len(text), self.batch_size):
      index = np.minimum(np.arange(start, start + self.batch_size), len(text) - 1)
      values = self._log_likelihood(params, jnp.asarray(text[index]), jnp.asarray(codes[index]))
      out.append(np.asarray(values)[:min(self.batch_size, len(text) - start)])
    return np.concatenate(out) if out else np.zeros(0, np.float32)

  def score(self, params, text: np.ndarray, codes: np.ndarray,
            alternatives: Sequence[np.ndarray]) -> np.ndarray:
    """float32[N]: each sample's log-posterior of its caption among the caption and its near
    misses. text: int32[N, text_len], the caption each of codes int32[N, h, w] was drawn for;
    alternatives[i]: int32[M_i, text_len], sample i's near misses (M_i may be 0)."""
    rows = [np.concatenate([text[i:i + 1], alternatives[i]]) for i in range(len(text))]
    owner = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    values = self.log_likelihoods(params, np.concatenate(rows), codes[owner])
    per_sample = np.split(values, np.cumsum([len(r) for r in rows])[:-1])
    return np.array([mine[0] - np.logaddexp.reduce(mine) for mine in per_sample], np.float32)
