"""Attention under a static mask: the one function every transformer layer calls.

    out = attend(q, k, v, mask)      # q, k, v [batch, seq, heads, head_dim]; mask bool[seq, seq]

`mask` is a NumPy array from `dalle_jax.masks`, known at trace time. The dense path computes every
score and masks it; the block-sparse path (a later stage) derives its block lists from the same
array and plugs in here, chosen by `implementation`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("dense",)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: np.ndarray) -> jax.Array:
  """Softmax attention over all keys, masked: [B, S, H, D] x3, bool[S, S] -> [B, S, H, D].

  Scores and softmax in float32 whatever the input dtype; every query must see at least one key
  (all the paper's masks let a position see itself).
  """
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(jnp.asarray(mask), scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: np.ndarray,
           implementation: str = "dense") -> jax.Array:
  """Masked attention by the chosen implementation; see `dense_attention` for shapes."""
  if q.shape[1] != mask.shape[0] or k.shape[1] != mask.shape[1]:
    raise ValueError(f"mask {mask.shape} does not match {q.shape[1]} queries and "
                     f"{k.shape[1]} keys")
  if implementation == "dense":
    return dense_attention(q, k, v, mask)
  raise ValueError(f"unknown attention implementation {implementation!r}; choose one of "
                   f"{', '.join(IMPLEMENTATIONS)}")
