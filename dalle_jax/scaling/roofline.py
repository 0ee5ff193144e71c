"""What the transformer's work costs at the least: FLOPs of a train step and bytes of a decode step,
counted from the config and its static masks, to set measured times against a machine's limits.

    flops = train_step_flops(config, batch)        # {"blocks", "heads", "attention"}: model FLOPs
    bound_s = sum(flops.values()) / peak_flop_per_s  # MFU = bound_s / measured step time
    step = decode_step_bytes(config, params, batch)  # {"params", "kv_cache"}: bytes read per code

Model FLOPs, not hardware FLOPs: rematerialisation's recomputation is not counted, and attention
counts only the (query, key) pairs its mask admits, what a kernel that skips every masked score
would do. A multiply-add counts 2.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from dalle_jax.transformer.model import TransformerConfig

# Parameters that a decode step does not read whole: the caption's tables and head (used by the
# prefill only) and the image embedding (one row per sample).
_NOT_READ_BY_DECODE = ("text_embedding", "text_position", "text_head", "image_embedding")


def block_matmul_params(config: TransformerConfig) -> int:
  """Weights of one block's matrix products: q/k/v, output and the two MLP projections."""
  c = config
  inner = c.heads * c.head_dim
  return 4 * c.width * inner + 2 * c.mlp_ratio * c.width * c.width


def admitted_pairs(config: TransformerConfig) -> dict[str, int]:
  """(query, key) pairs each layer kind's mask admits, over the whole sequence."""
  return {kind: int(config.mask(kind).sum()) for kind in set(config.kinds())}


def attention_flops(pairs: int, batch: int, heads: int, head_dim: int) -> int:
  """Forward FLOPs of attention over `pairs` admitted (query, key) pairs: q k^T and p v."""
  return 4 * batch * heads * head_dim * pairs


def train_step_flops(config: TransformerConfig, batch: int) -> dict[str, int]:
  """Model FLOPs of one forward + backward pass over `batch` sequences, by part (backward = 2x
  forward: the inputs' and the weights' gradients).

  blocks:    6 x block_matmul_params x depth x batch x seq.
  heads:     6 x width x vocab on the positions each head predicts: text on T - 1, image on H*W.
  attention: 3 x the forward FLOPs of the pairs each layer's mask admits (not seq^2).
  Embeddings, biases, norms, softmax, GELU, the loss and the optimiser (elementwise) are left out.
  """
  c = config
  pairs = admitted_pairs(c)
  return {
      "blocks": 6 * c.depth * block_matmul_params(c) * batch * c.seq_len,
      "heads": 6 * c.width * batch * (c.num_text_tokens * (c.text_len - 1)
                                      + c.image_vocab_size * c.image_len),
      "attention": 3 * sum(attention_flops(pairs[kind], batch, c.heads, c.head_dim)
                           for kind in c.kinds()),
  }


def dense_attention_flops(config: TransformerConfig, batch: int) -> int:
  """What `train_step_flops`' attention would be if every layer computed all seq^2 scores."""
  c = config
  return 3 * c.depth * attention_flops(c.seq_len ** 2, batch, c.heads, c.head_dim)


def decode_params_bytes(params: Any) -> int:
  """Bytes of the parameters a decode step reads: all but the caption's tables and head and the
  image embedding table (see `_NOT_READ_BY_DECODE`). `params`: arrays or ShapeDtypeStructs."""
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
    if not any(name in _NOT_READ_BY_DECODE for name in names):
      total += int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def decode_kv_keys(config: TransformerConfig, sparse: bool) -> float:
  """Cached keys a decode step reads per sample, summed over layers and averaged over the image
  positions: with `sparse`, those its mask row admits (the text and the layer's image
  neighbourhood); otherwise the whole cache of seq_len positions in every layer."""
  c = config
  if not sparse:
    return float(c.depth * c.seq_len)
  per_kind = {kind: float(c.mask(kind)[c.text_len:].sum()) / c.image_len
              for kind in set(c.kinds())}
  return sum(per_kind[kind] for kind in c.kinds())


def decode_step_bytes(config: TransformerConfig, params: Any, batch: int, sparse: bool = True,
                      cache_itemsize: int = 2) -> dict[str, float]:
  """Bytes one decode step (one code for each of `batch` samples) must read at the least: the
  parameters once, and each sample's cached keys and values (`decode_kv_keys`)."""
  c = config
  kv = 2 * batch * decode_kv_keys(c, sparse) * c.heads * c.head_dim * cache_itemsize
  return {"params": float(decode_params_bytes(params)), "kv_cache": kv}


def decode_step_flops(config: TransformerConfig, batch: int, sparse: bool = True) -> float:
  """FLOPs of one decode step: 2 x block weights per block and the image head, plus attention
  over the keys `decode_kv_keys` reads."""
  c = config
  dense = 2 * batch * (c.depth * block_matmul_params(c) + c.width * c.image_vocab_size)
  return float(dense + batch * 4 * c.heads * c.head_dim * decode_kv_keys(c, sparse))
