"""Attention under a static mask: the one function every transformer layer calls.

    out = attend(q, k, v, mask)      # q, k, v [batch, seq, heads, head_dim]; mask bool[seq, seq]

`mask` is a NumPy array from `dalle_jax.transformer.masks`, known at trace time. The dense path computes every
score and masks it; "block_sparse" derives block lists from the same array and computes only the
non-empty blocks: for a TPU target (the mesh's devices, even when this host has none) with Pallas
splash attention (`dalle_jax.transformer.splash_attention`, run per device under `shard_map`), elsewhere in
plain XLA (`dalle_jax.transformer.block_sparse`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import PartitionSpec as P

from dalle_jax import sharding
from dalle_jax.transformer import block_sparse, splash_attention

# "fused": jax.nn.dot_product_attention under the full mask, which runs cuDNN's fused kernel on
# GPUs that support it (XLA elsewhere): the dense baseline on GPU.
IMPLEMENTATIONS = ("dense", "block_sparse", "fused")


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: np.ndarray) -> jax.Array:
  """Softmax attention over all keys, masked: [B, S, H, D] x3, bool[S, S] -> [B, S, H, D].

  Scores and softmax in float32 whatever the input dtype; every query must see at least one key
  (all the paper's masks let a position see itself).
  """
  # The 1/sqrt(D) scale on q, not on the [S, S] scores (exact when D is a power of 4, e.g. 64).
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  # Heads-major [B, H, S, D] first, batch dimensions leading as XLA:CPU's batched matmuls
  # (YNNPACK) want them: left to XLA, the `bqhd,bkhd` forms got slower layouts (BENCHMARKS.md).
  q, k, v = (x.swapaxes(1, 2) for x in (q, k, v))
  return _masked_softmax_attention(q, k, v, jnp.asarray(mask)).swapaxes(1, 2)


@jax.custom_vjp
def _masked_softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                              mask: jax.Array) -> jax.Array:
  """softmax(q k^T, masked) v: [B, H, S, D] x3 (q scaled), bool[S, S] -> [B, H, S, D].

  A custom VJP so that each [B, H, S, S] array is read and written as few times as possible:
  normalisation after the product, and the backward below.
  """
  return _attention_fwd(q, k, v, mask)[0]


def _attention_fwd(q, k, v, mask):
  scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  # Masked scores get -inf, so their exp is exactly 0: a masked key has no influence at all.
  scores = jnp.where(mask, scores, -jnp.inf)
  e = jnp.exp(scores - scores.max(-1, keepdims=True))  # unnormalised weights, [B, H, S, S]
  total = e.sum(-1, keepdims=True)
  # Normalising after the product divides [B, H, S, D] instead of [B, H, S, S].
  out = jnp.einsum("bhqk,bhkd->bhqd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = (out / total).astype(v.dtype)
  return out, (q, k, v, e, total, out)


def _attention_bwd(residuals, d_out):
  """The softmax's backward as in FlashAttention: with P = e / total and O = P V,
  dS = P * (dO V^T - rowsum(dO * O)). The row sums run over D, not over the S keys, and 1/total
  scales [B, H, S, D] arrays only; masked entries of dS are 0 because e is."""
  q, k, v, e, total, out = residuals
  d_out = d_out.astype(jnp.float32) / total
  delta = jnp.sum(d_out * out.astype(jnp.float32), -1, keepdims=True)
  dv = jnp.einsum("bhqk,bhqd->bhkd", e, d_out)
  d_scores = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=jnp.float32)
  d_scores = e * (d_scores - delta)
  dq = jnp.einsum("bhqk,bhkd->bhqd", d_scores, k, preferred_element_type=jnp.float32)
  dk = jnp.einsum("bhqk,bhqd->bhkd", d_scores, q, preferred_element_type=jnp.float32)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None  # the mask is fixed


_masked_softmax_attention.defvjp(_attention_fwd, _attention_bwd)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: np.ndarray,
           implementation: str = "dense", permutation: np.ndarray | None = None,
           block_size: int = 32) -> jax.Array:
  """Masked attention by the chosen implementation; see `dense_attention` for shapes.

  `permutation` (int[seq], e.g. `masks.column_major_permutation` for column layers) and
  `block_size` are for "block_sparse", which blocks the permuted sequence; dense attention gives
  the same result without reordering, so it ignores them.
  """
  if q.shape[1] != mask.shape[0] or k.shape[1] != mask.shape[1]:
    raise ValueError(f"mask {mask.shape} does not match {q.shape[1]} queries and "
                     f"{k.shape[1]} keys")
  if implementation == "dense":
    return dense_attention(q, k, v, mask)
  if implementation == "fused":
    return jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask)[None, None])
  if implementation == "block_sparse":
    if target_platform() == "tpu" and splash_attention.available():
      return sharded_splash_attention(q, k, v, mask, permutation)
    return block_sparse.block_sparse_attention(q, k, v, mask, block_size, permutation)
  raise ValueError(f"unknown attention implementation {implementation!r}; choose one of "
                   f"{', '.join(IMPLEMENTATIONS)}")


def target_platform() -> str:
  """The platform the traced program compiles for: that of the devices of the mesh in context
  (`jax.set_mesh`, e.g. a TPU slice described on a CPU host), else the default backend's."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def sharded_splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: np.ndarray,
                             permutation: np.ndarray | None = None,
                             interpret: bool = False) -> jax.Array:
  """Splash attention on each device's batch rows and heads: a Pallas call is not partitioned by
  XLA, which would gather q, k and v onto every device. Under a mesh (`jax.set_mesh`) the batch is
  split over its batch axes and the heads over `tensor`, as the transformer's rules place them."""
  run = lambda q, k, v: splash_attention.splash_attention(
      q, k, v, mask, permutation=permutation, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return run(q, k, v)
  batch = tuple(a for a in sharding.BATCH_AXES if a in mesh.axis_names) or None
  heads = "tensor" if "tensor" in mesh.axis_names else None
  spec = P(batch, None, heads, None)
  return jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)
