"""Stage 2: the decoder-only transformer over [caption tokens; image codes] (Section 2.2, App. B).

    model = Transformer(config)
    text_logits, image_logits = model.apply({"params": params}, text, codes)
    loss, metrics = dalle_loss(config, text_logits, image_logits, text, codes)

The input is the `text_len` text ids (BPE pieces, then the per-position pad ids `vocab + i`)
followed by the `H*W` image codes in raster order: `text_len + H*W` positions, the shape of the
masks in `dalle_jax.transformer.masks`. Position i predicts token i+1, so text positions 0..T-2 predict text
(over pieces and pads) and positions T-1..T+N-2 predict the image codes; the first text token is
context only and the last position's output is not used.

Every parameter and the main activations carry logical axis names (`embed`, `heads`, `mlp`,
`vocab`, `batch`, ...); the config's `sharding_rules` (by default
`dalle_jax.sharding.TRANSFORMER_RULES`) map them onto the mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.transformer import attention, masks

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SCAN_GROUP = 4  # the paper's schedule repeats every 4 layers (row, column, row, row)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Geometry and options of the transformer; the defaults are the paper's 12B model."""
  text_vocab_size: int = 16_384   # BPE pieces; the text_len pad ids follow them
  text_len: int = 256
  image_vocab_size: int = 8_192
  image_size: int = 32            # the code grid is image_size x image_size
  width: int = 3_968
  depth: int = 64
  heads: int = 62
  head_dim: int = 64
  mlp_ratio: int = 4
  layer_kinds: tuple[str, ...] | None = None   # None: the paper's schedule, masks.layer_kinds
  conv_kernel: int = 11
  attention: str = "dense"        # "block_sparse": only the masks' non-empty blocks
  attention_block_size: int = 32  # block_sparse on CPU/GPU (splash on TPU uses 128)
  dtype: str = "float32"          # compute dtype; parameters stay float32
  remat: bool = False             # recompute each block's activations in the backward pass
  # Compile the repeating group of layer kinds once (`nn.scan`) instead of once per layer: the
  # parameters of the scanned groups are stacked (see `scan_groups`, `stack_layers`).
  scan_layers: bool = False
  dropout: float = 0.0
  text_loss_weight: float = 1 / 8  # the image loss gets 1 - this

  def __post_init__(self):
    if isinstance(self.layer_kinds, list):
      object.__setattr__(self, "layer_kinds", tuple(self.layer_kinds))
    problems = []
    for name in ("text_vocab_size", "text_len", "image_vocab_size", "image_size", "width",
                 "depth", "heads", "head_dim", "mlp_ratio", "attention_block_size"):
      if getattr(self, name) < 1:
        problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.text_len < 2:
      problems.append("text_len must be >= 2 (the first text token is context only)")
    if self.layer_kinds is not None:
      if len(self.layer_kinds) != self.depth:
        problems.append(f"layer_kinds has {len(self.layer_kinds)} entries for depth {self.depth}")
      unknown = sorted(set(self.layer_kinds) - set(masks.KINDS))
      if unknown:
        problems.append(f"unknown layer kinds {unknown}; choose from {', '.join(masks.KINDS)}")
    if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
      problems.append(f"conv_kernel must be odd and positive, got {self.conv_kernel}")
    if self.attention not in attention.IMPLEMENTATIONS:
      problems.append(f"attention must be one of {attention.IMPLEMENTATIONS}, got "
                      f"{self.attention!r}")
    if self.dtype not in DTYPES:
      problems.append(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
    if not 0 <= self.dropout < 1:
      problems.append(f"dropout must be in [0, 1), got {self.dropout}")
    if not 0 <= self.text_loss_weight <= 1:
      problems.append(f"text_loss_weight must be in [0, 1], got {self.text_loss_weight}")
    if problems:
      raise ValueError("bad transformer config: " + "; ".join(problems))

  @property
  def image_len(self) -> int:
    return self.image_size * self.image_size

  @property
  def seq_len(self) -> int:
    return self.text_len + self.image_len

  @property
  def num_text_tokens(self) -> int:
    """Text ids: the BPE pieces, then one pad id per text position."""
    return self.text_vocab_size + self.text_len

  def kinds(self) -> tuple[str, ...]:
    return self.layer_kinds or tuple(masks.layer_kinds(self.depth))

  def scan_groups(self) -> tuple[int, tuple[str, ...]]:
    """(n, group): layers 0..n*len(group)-1 are n repeats of `group` (the paper's row, column,
    row, row) that `scan_layers` compiles once; the rest (the group holding the last,
    convolutional layer) stay unrolled. n is 0 without `scan_layers`."""
    kinds = self.kinds()
    group = kinds[:SCAN_GROUP]
    n = 0
    while self.scan_layers and kinds[n * SCAN_GROUP:(n + 1) * SCAN_GROUP] == group and \
        (n + 1) * SCAN_GROUP < len(kinds):
      n += 1
    return n, group

  def permutation(self, kind: str) -> np.ndarray | None:
    """The order block-sparse attention runs a layer in: column-major for the column masks,
    which turns them into bands (about 20% non-empty 32-blocks instead of 51% at 32x32)."""
    if kind in ("column", "axial_col"):
      return masks.column_major_permutation(self.text_len, self.image_size, self.image_size)
    return None

  def mask(self, kind: str) -> np.ndarray:
    return masks.attention_mask(kind, self.text_len, self.image_size, self.image_size,
                                self.conv_kernel)


def _init(stddev: float, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


def _constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Logical sharding of an activation; a no-op unless a mesh and rules are in context."""
  return nn.with_logical_constraint(x, names)


@jax.custom_vjp
def _stored_gradient(x: jax.Array) -> jax.Array:
  """Identity whose gradient XLA computes once and stores: otherwise XLA:CPU fuses the residual
  stream's gradient (a sum over every later layer norm's backward) into each fusion that reads
  it, recomputing it from the top of the network in each: quadratic in depth (a quarter of the
  bench_small step)."""
  return x


def _stored_gradient_bwd(_, g: jax.Array) -> tuple[jax.Array]:
  # A conditional on data is a fusion barrier that XLA keeps (jax.lax.optimization_barrier does
  # not stop this fusion on CPU); with two identical branches it costs nothing else.
  first = g.reshape(-1)[0]
  return (jax.lax.cond(first == first, lambda g: g, lambda g: g * 1.0, g),)


_stored_gradient.defvjp(lambda x: (x, None), _stored_gradient_bwd)


class LayerNorm(nn.Module):
  """Layer norm computed in float32 with logically named scale and bias."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (features,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                      (features,), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias
    return y.astype(self.dtype)


def _attend_rows(q: jax.Array, k: jax.Array, v: jax.Array, rows: jax.Array) -> jax.Array:
  """Decode-time attention of L new queries over the cache through traced mask rows:
  q [B, L, H, D], k and v [B, S, H, D], rows bool[L, S] -> [B, L, H, D]."""
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  scores = jnp.where(rows, scores * q.shape[-1] ** -0.5, -jnp.inf)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _attend_admitted_keys(q: jax.Array, k: jax.Array, v: jax.Array, mask: np.ndarray,
                          position: jax.Array | int, text_len: int) -> jax.Array:
  """Decode-time attention of the one new image query at `position` to the keys its layer's mask
  can admit, not the whole cache: the text and position - `masks.image_key_offsets`, so a step's
  cost stops growing with the sequence. q [B, 1, H, D], k and v [B, S, H, D] -> [B, 1, H, D]."""
  offsets = masks.image_key_offsets(mask, text_len)
  back = position - offsets
  # Offsets that reach before the image are clamped into range and masked out below.
  index = jnp.concatenate([jnp.arange(text_len), jnp.maximum(back, 0)])
  admitted = jnp.concatenate([jnp.ones(text_len, bool), back >= text_len])
  admitted &= jnp.asarray(mask)[position][index]
  return _attend_rows(q, jnp.take(k, index, axis=1), jnp.take(v, index, axis=1),
                      admitted[None])


class Projection(nn.Module):
  """`einsum(equation, x, kernel) + bias` with logically named float32 parameters, computed in
  `dtype`: one module for the q/k/v, output, MLP and head projections."""
  equation: str
  kernel_shape: tuple[int, ...]
  kernel_names: tuple[str | None, ...]
  bias_names: tuple[str | None, ...]
  stddev: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", _init(self.stddev, self.kernel_names), self.kernel_shape,
                        jnp.float32)
    bias_shape = self.kernel_shape[-len(self.bias_names):]
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                           self.bias_names),
                      bias_shape, jnp.float32)
    y = jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class Attention(nn.Module):
  """Multi-head self-attention under one static mask: [B, L, width] -> [B, L, width].

  Training: L = seq_len, the whole mask. Decoding (`start` given): the L new positions from
  `start` on are written into a key/value cache of the whole sequence (the `cache` collection)
  and attend to it through rows start..start+L-1 of the same mask; a one-code step of a sparse
  (`attention != "dense"`) model reads only the cached keys its mask row can admit.
  """
  config: TransformerConfig
  kind: str

  @nn.compact
  def __call__(self, x: jax.Array, start: jax.Array | int | None = None) -> jax.Array:
    c = self.config
    dtype = DTYPES[c.dtype]
    qkv = Projection("bse,ethd->bsthd", (c.width, 3, c.heads, c.head_dim),
                     ("embed", None, "heads", "kv"), (None, "heads", "kv"), 0.02, dtype,
                     name="qkv")(x)
    qkv = _constrain(qkv, ("batch", "length", None, "act_heads", "act_kv"))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    mask = c.mask(self.kind)
    if start is None:
      out = attention.attend(q, k, v, mask, c.attention, c.permutation(self.kind),
                             c.attention_block_size)
    else:
      shape = (x.shape[0], c.seq_len, c.heads, c.head_dim)
      keys = self.variable("cache", "key", jnp.zeros, shape, k.dtype)
      values = self.variable("cache", "value", jnp.zeros, shape, v.dtype)
      keys.value = jax.lax.dynamic_update_slice(keys.value, k, (0, start, 0, 0))
      values.value = jax.lax.dynamic_update_slice(values.value, v, (0, start, 0, 0))
      if x.shape[1] == 1 and c.attention != "dense":
        out = _attend_admitted_keys(q, keys.value, values.value, mask, start, c.text_len)
      else:
        rows = jax.lax.dynamic_slice(jnp.asarray(mask), (start, 0), (x.shape[1], c.seq_len))
        out = _attend_rows(q, keys.value, values.value, rows)
    out = _constrain(out, ("batch", "length", "act_heads", "act_kv"))
    # GPT-2's scaled init of residual outputs keeps the stream's variance flat with depth.
    return Projection("bshd,hde->bse", (c.heads, c.head_dim, c.width), ("heads", "kv", "embed"),
                      ("norm",), 0.02 / np.sqrt(2 * c.depth), dtype, name="out")(out)


class MLP(nn.Module):
  """Two dense layers with a GELU between, `mlp_ratio` times wider inside."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    dtype = DTYPES[c.dtype]
    hidden = Projection("bse,em->bsm", (c.width, c.mlp_ratio * c.width), ("embed", "mlp"),
                        ("mlp",), 0.02, dtype, name="wi")(x)
    hidden = _constrain(nn.gelu(hidden), ("batch", "length", "act_mlp"))
    return Projection("bsm,me->bse", (c.mlp_ratio * c.width, c.width), ("mlp", "embed"),
                      ("norm",), 0.02 / np.sqrt(2 * c.depth), dtype, name="wo")(hidden)


class Block(nn.Module):
  """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""
  config: TransformerConfig
  kind: str

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool,
               start: jax.Array | int | None = None) -> jax.Array:
    c = self.config
    dtype = DTYPES[c.dtype]
    drop = nn.Dropout(c.dropout, deterministic=deterministic)
    x = _stored_gradient(x)
    x = x + drop(Attention(c, self.kind, name="attention")(LayerNorm(dtype, name="ln_1")(x),
                                                           start))
    x = _stored_gradient(x)
    x = x + drop(MLP(c, name="mlp")(LayerNorm(dtype, name="ln_2")(x)))
    return _constrain(x, ("batch", "length", "act_embed"))


class BlockGroup(nn.Module):
  """Consecutive blocks of the given kinds, as one step of `nn.scan`: (x, carry-less) -> x."""
  config: TransformerConfig
  kinds: tuple[str, ...]

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool,
               start: jax.Array | int | None = None) -> tuple[jax.Array, None]:
    block = nn.remat(Block, static_argnums=(2,)) if self.config.remat else Block
    for j, kind in enumerate(self.kinds):
      x = block(self.config, kind, name=f"block_{j}")(x, deterministic, start)
    return x, None


class Transformer(nn.Module):
  """The model. Training: `__call__(text int32[B, T], codes int32[B, H, W] or [B, H*W])` ->
  (text logits float32[B, T-1, T_vocab + T], image logits float32[B, H*W, image_vocab]).

  Sampling, with the `cache` collection mutable: `prefill(text)` runs the caption and returns the
  logits of image code 0; `decode(codes_j, j)` feeds code j and returns the logits of code j+1.
  """
  config: TransformerConfig

  def setup(self):
    c = self.config
    # Tables split over `embed` only: gathers from vocab-split tables reshard through full copies.
    embed = lambda name, n: self.param(name, _init(0.02, (None, "embed")), (n, c.width),
                                       jnp.float32)
    self.text_embedding = embed("text_embedding", c.num_text_tokens)
    self.image_embedding = embed("image_embedding", c.image_vocab_size)
    self.text_position = embed("text_position", c.text_len)
    self.image_row = embed("image_row", c.image_size)
    self.image_column = embed("image_column", c.image_size)
    block = nn.remat(Block, static_argnums=(2,)) if c.remat else Block
    n, group = c.scan_groups()
    self.groups = nn.scan(BlockGroup, variable_axes={"params": 0, "cache": 0},
                          split_rngs={"params": True, "dropout": True},
                          in_axes=(nn.broadcast, nn.broadcast), length=n,
                          metadata_params={nn.PARTITION_NAME: "layers"}
                          )(c, group, name="groups") if n else None
    first = n * len(group)
    self.blocks = [block(c, kind, name=f"block_{i}")
                   for i, kind in enumerate(c.kinds()) if i >= first]
    self.ln_final = LayerNorm(DTYPES[c.dtype])
    self.dropout = nn.Dropout(c.dropout)
    head = lambda n: Projection("bse,ev->bsv", (c.width, n), ("embed", "vocab"), ("vocab",),
                                0.02, DTYPES[c.dtype])
    self.text_head = head(c.num_text_tokens)
    self.image_head = head(c.image_vocab_size)

  def _embed_text(self, text: jax.Array) -> jax.Array:
    if text.shape[1] != self.config.text_len:
      raise ValueError(f"text has {text.shape[1]} positions, the config {self.config.text_len}")
    return jnp.take(self.text_embedding, text, axis=0) + self.text_position

  def _embed_image(self, codes: jax.Array, first: jax.Array | int = 0) -> jax.Array:
    """codes int[B, L] at image positions first..first+L-1 -> [B, L, width]."""
    c = self.config
    index = first + jnp.arange(codes.shape[1])
    position = self.image_row[index // c.image_size] + self.image_column[index % c.image_size]
    return jnp.take(self.image_embedding, codes, axis=0) + position

  def _run(self, x: jax.Array, deterministic: bool,
           start: jax.Array | int | None = None) -> jax.Array:
    x = _constrain(x.astype(DTYPES[self.config.dtype]), ("batch", "length", "act_embed"))
    x = self.dropout(x, deterministic=deterministic)
    if self.groups is not None:
      x, _ = self.groups(x, deterministic, start)
    for block in self.blocks:
      x = block(x, deterministic, start) if start is not None else block(x, deterministic)
    return self.ln_final(x)

  def __call__(self, text: jax.Array, codes: jax.Array,
               deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    c = self.config
    codes = codes.reshape(codes.shape[0], c.image_len)
    x = jnp.concatenate([self._embed_text(text), self._embed_image(codes)], axis=1)
    x = self._run(x, deterministic)
    text_logits = self.text_head(x[:, :c.text_len - 1])
    image_logits = self.image_head(x[:, c.text_len - 1:c.seq_len - 1])
    return text_logits.astype(jnp.float32), image_logits.astype(jnp.float32)

  def prefill(self, text: jax.Array) -> jax.Array:
    """Caches the caption's keys and values; the logits of image code 0: float32[B, V]."""
    x = self._run(self._embed_text(text), True, start=0)
    return self.image_head(x[:, -1:])[:, 0].astype(jnp.float32)

  def decode(self, codes: jax.Array, index: jax.Array | int) -> jax.Array:
    """Feeds image code `index` (int[B]); the logits of code `index + 1`: float32[B, V]."""
    x = self._embed_image(codes[:, None], index)
    x = self._run(x, True, start=self.config.text_len + index)
    return self.image_head(x)[:, 0].astype(jnp.float32)


def _cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over all positions of -log softmax(logits)[target]: [B, S, V], int[B, S] -> []."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1).mean()


def dalle_loss(config: TransformerConfig, text_logits: jax.Array, image_logits: jax.Array,
               text: jax.Array, codes: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The paper's loss: text and image cross-entropy, each averaged over its own targets, mixed
  `text_loss_weight` : 1 - `text_loss_weight` (1/8 : 7/8). Returns (loss, metrics in nats)."""
  text_loss = _cross_entropy(text_logits, text[:, 1:])
  image_loss = _cross_entropy(image_logits, codes.reshape(codes.shape[0], -1))
  w = config.text_loss_weight
  loss = w * text_loss + (1 - w) * image_loss
  return loss, {"loss": loss, "text_loss": text_loss, "image_loss": image_loss}


def init(config: TransformerConfig, rng: jax.Array) -> Any:
  """Parameters (boxed with their logical names) for batch-shaped inputs of the config."""
  text = jnp.zeros((1, config.text_len), jnp.int32)
  codes = jnp.zeros((1, config.image_len), jnp.int32)
  return Transformer(config).init(rng, text, codes)["params"]


@functools.lru_cache(maxsize=16)
def abstract_params(config: TransformerConfig) -> Any:
  """The boxed parameter tree as ShapeDtypeStructs: shapes and logical names, nothing allocated."""
  return jax.eval_shape(functools.partial(init, config), jax.random.key(0))


def count_params(config: TransformerConfig) -> int:
  leaves = jax.tree.leaves(nn.unbox(abstract_params(config)))
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in leaves))


def stack_layers(config: TransformerConfig, params: Any) -> Any:
  """Unrolled parameters (`block_0` ... `block_{depth-1}`) in the layout of `config`, which has
  `scan_layers`: block g*4+j of the scanned groups becomes row g of `groups/block_j`."""
  n, group = config.scan_groups()
  params = dict(params)
  layers = [[params.pop(f"block_{g * len(group) + j}") for g in range(n)]
            for j in range(len(group))]
  groups = {f"block_{j}": jax.tree.map(lambda *rows: jnp.stack(rows), *rows)
            for j, rows in enumerate(layers)}
  return {**params, "groups": groups} if n else params


def unstack_layers(config: TransformerConfig, params: Any) -> Any:
  """The inverse of `stack_layers`: a scanned model's parameters, one `block_i` per layer."""
  n, group = config.scan_groups()
  params = dict(params)
  groups = params.pop("groups", None)
  for g in range(n):
    for j in range(len(group)):
      params[f"block_{g * len(group) + j}"] = jax.tree.map(lambda x: x[g], groups[f"block_{j}"])
  return params
