"""dalle_jax/scaling/roofline.py: FLOPs and bytes counted from a config and its masks, checked against
counts made by hand for tiny geometries."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from dalle_jax.scaling import roofline
from dalle_jax.transformer import model as transformer
from dalle_jax.transformer.model import TransformerConfig

T, W = 4, 3  # text positions; image side (9 image tokens, sequence 13)


def _config(kinds, **kw):
  fields = dict(text_vocab_size=10, text_len=T, image_vocab_size=7, image_size=W, width=8,
                depth=len(kinds), heads=2, head_dim=4, layer_kinds=kinds, conv_kernel=3)
  return TransformerConfig(**{**fields, **kw})


def _row_pairs():
  """Text causal, every image token all text, and row: image token p sees p - W .. p."""
  n = W * W
  return T * (T + 1) // 2 + n * T + sum(min(p, W) + 1 for p in range(n))


def test_admitted_pairs_count_what_each_mask_allows():
  n, seq = W * W, T + W * W
  pairs = roofline.admitted_pairs(_config(("row", "column", "dense")))
  assert pairs["row"] == _row_pairs()
  assert pairs["column"] == T * (T + 1) // 2 + n * T + W * (W * (W + 1) // 2)
  assert pairs["dense"] == seq * (seq + 1) // 2


def test_train_step_flops_by_part():
  config, batch = _config(("row", "row")), 3
  flops = roofline.train_step_flops(config, batch)
  assert roofline.block_matmul_params(config) == 12 * 8 * 8  # heads x head_dim = width
  assert flops["blocks"] == 6 * 2 * 12 * 64 * batch * (T + W * W)
  assert flops["heads"] == 6 * 8 * batch * ((10 + T) * (T - 1) + 7 * W * W)
  assert flops["attention"] == 3 * 2 * 4 * batch * 2 * 4 * _row_pairs()
  seq = T + W * W
  assert roofline.dense_attention_flops(config, batch) == 3 * 2 * 4 * batch * 2 * 4 * seq**2


def test_decode_step_reads_the_parameters_once_and_the_admitted_keys():
  config = _config(("row", "dense"))
  params = nn.unbox(transformer.abstract_params(config))
  total = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(params))
  unread = ((10 + T) * 8 + T * 8 + 8 * (10 + T) + (10 + T) + 7 * 8) * 4  # caption + code tables
  assert roofline.decode_params_bytes(params) == total - unread

  n, seq = W * W, T + W * W
  row_keys = np.mean([T + min(p, W) + 1 for p in range(n)])
  dense_keys = np.mean([T + p + 1 for p in range(n)])
  assert roofline.decode_kv_keys(config, sparse=True) == pytest.approx(row_keys + dense_keys)
  assert roofline.decode_kv_keys(config, sparse=False) == 2 * seq

  step = roofline.decode_step_bytes(config, params, batch=5, sparse=True, cache_itemsize=2)
  assert step["params"] == total - unread
  assert step["kv_cache"] == pytest.approx(2 * 5 * (row_keys + dense_keys) * 2 * 4 * 2)
  flops = roofline.decode_step_flops(config, batch=5, sparse=True)
  assert flops == pytest.approx(2 * 5 * (2 * 12 * 64 + 8 * 7)
                                + 5 * 4 * 2 * 4 * (row_keys + dense_keys))
