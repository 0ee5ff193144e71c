"""Reranking samples with a small contrastive image-caption model (CLIP-style; Section 2.5).

    params = init(config, rng)
    loss, metrics = contrastive_loss(params, config, images, text)   # symmetric InfoNCE
    scores = score(params, config, images, text)    # uint8[N, H, W, 3], int32[N, T] -> f32[N]
    best = rerank(scores, keep)                     # indices of the `keep` best, best first

Both encoders end in a linear projection to `embed_dim` and an L2 normalisation, so a score is the
cosine similarity of an image and its own caption. The caption ids are the tokenizer's: BPE pieces
`[0, text_vocab_size)` and the pad of position i at `text_vocab_size + i`; pads are masked out of
attention and pooling.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature
MAX_LOGIT_SCALE = math.log(100.0)      # CLIP's clip on exp(logit_scale)


@dataclasses.dataclass(frozen=True)
class RerankerConfig:
  """Geometry of the two encoders; the defaults are a CPU-sized model for 64x64 shapes."""
  resolution: int = 64
  patch_size: int = 16         # 4x4 patches: a shapes object fits in one
  image_width: int = 96
  image_depth: int = 2
  image_heads: int = 4
  text_vocab_size: int = 400   # BPE pieces; the text_len pad ids follow them
  text_len: int = 24
  text_width: int = 96
  text_depth: int = 2
  text_heads: int = 4
  embed_dim: int = 96
  mlp_ratio: int = 4

  def __post_init__(self):
    problems = []
    for name in ("resolution", "patch_size", "image_width", "image_depth", "image_heads",
                 "text_vocab_size", "text_len", "text_width", "text_depth", "text_heads",
                 "embed_dim", "mlp_ratio"):
      if getattr(self, name) < 1:
        problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
    if problems:
      raise ValueError("bad reranker config: " + "; ".join(problems))
    if self.resolution % self.patch_size:
      problems.append(f"patch_size {self.patch_size} does not divide resolution "
                      f"{self.resolution}")
    for kind in ("image", "text"):
      width, heads = getattr(self, f"{kind}_width"), getattr(self, f"{kind}_heads")
      if width % heads:
        problems.append(f"{kind}_heads {heads} does not divide {kind}_width {width}")
    if problems:
      raise ValueError("bad reranker config: " + "; ".join(problems))

  @property
  def num_text_tokens(self) -> int:
    """Text ids: the BPE pieces, then one pad id per text position."""
    return self.text_vocab_size + self.text_len

  @property
  def num_patches(self) -> int:
    return (self.resolution // self.patch_size) ** 2


def check_tokenizer(config: RerankerConfig, tokenizer) -> None:
  """Refuses a tokenizer whose ids the model cannot read, before anything compiles."""
  if (tokenizer.vocab_size, tokenizer.text_len) != (config.text_vocab_size, config.text_len):
    raise ValueError(
        f"the tokenizer has {tokenizer.vocab_size} pieces and text_len {tokenizer.text_len}, the "
        f"reranker {config.text_vocab_size} and {config.text_len}: set "
        f"--config.model.text_vocab_size={tokenizer.vocab_size} "
        f"--config.model.text_len={tokenizer.text_len}")


# ---------------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------------


class Block(nn.Module):
  """Pre-norm transformer block: self-attention and a GELU MLP."""
  heads: int
  mlp_ratio: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x [B, L, D], mask bool[B, 1, 1, L] (keys each query may see) -> [B, L, D]."""
    width = x.shape[-1]
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads, qkv_features=width)(h, h, mask=mask)
    h = nn.Dense(width * self.mlp_ratio)(nn.LayerNorm()(x))
    return x + nn.Dense(width)(nn.gelu(h))


def _position_embedding(module: nn.Module, length: int, width: int) -> jax.Array:
  return module.param("position", nn.initializers.normal(0.02), (length, width))


class ImageEncoder(nn.Module):
  """A small ViT: patches -> blocks -> mean over patches -> unnormalised embedding."""
  config: RerankerConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """uint8[B, H, W, 3] -> [B, embed_dim]."""
    c = self.config
    x = images.astype(jnp.float32) / 255.0
    x = nn.Conv(c.image_width, (c.patch_size, c.patch_size), strides=c.patch_size,
                padding="VALID", name="patches")(x)
    x = x.reshape(x.shape[0], -1, c.image_width)
    x = x + _position_embedding(self, c.num_patches, c.image_width)
    for _ in range(c.image_depth):
      x = Block(c.image_heads, c.mlp_ratio)(x)
    x = nn.LayerNorm()(x.mean(axis=1))
    return nn.Dense(c.embed_dim, use_bias=False, name="projection")(x)


class TextEncoder(nn.Module):
  """A small bidirectional transformer over the caption ids, mean-pooled over non-pad tokens."""
  config: RerankerConfig

  @nn.compact
  def __call__(self, text: jax.Array) -> jax.Array:
    """int32[B, T] -> [B, embed_dim]; an all-pad caption embeds to zero."""
    c = self.config
    valid = text < c.text_vocab_size  # pads are the ids past the BPE pieces
    x = nn.Embed(c.num_text_tokens, c.text_width, embedding_init=nn.initializers.normal(0.02),
                 name="tokens")(text)
    x = x + _position_embedding(self, c.text_len, c.text_width)
    mask = valid[:, None, None, :]
    for _ in range(c.text_depth):
      x = Block(c.text_heads, c.mlp_ratio)(x, mask)
    weights = valid[..., None].astype(x.dtype)
    x = (x * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
    x = nn.LayerNorm()(x) * jnp.any(valid, axis=1, keepdims=True)
    return nn.Dense(c.embed_dim, use_bias=False, name="projection")(x)


def _normalize(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


class Reranker(nn.Module):
  """Both encoders, their L2-normalised embeddings and the learned logit scale."""
  config: RerankerConfig

  def setup(self):
    self.image_encoder = ImageEncoder(self.config)
    self.text_encoder = TextEncoder(self.config)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(INIT_LOGIT_SCALE), ())

  def __call__(self, images: jax.Array, text: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """-> image embeddings [B, E], text embeddings [B, E] (unit norm), scale exp(logit_scale)."""
    return (_normalize(self.image_encoder(images)), _normalize(self.text_encoder(text)),
            jnp.exp(jnp.minimum(self.logit_scale, MAX_LOGIT_SCALE)))


def init(config: RerankerConfig, rng: jax.Array) -> dict:
  """Fresh parameters."""
  images = jnp.zeros((1, config.resolution, config.resolution, 3), jnp.uint8)
  text = config.text_vocab_size + jnp.arange(config.text_len, dtype=jnp.int32)[None]
  return Reranker(config).init(rng, images, text)["params"]


def embed(params: Any, config: RerankerConfig, images: jax.Array, text: jax.Array
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """uint8[B, H, W, 3], int32[B', T] -> unit embeddings [B, E], [B', E] and the logit scale."""
  return Reranker(config).apply({"params": params}, images, text)


def contrastive_loss(params: Any, config: RerankerConfig, images: jax.Array, text: jax.Array
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric InfoNCE over the batch: example i's caption is the positive of image i only.

  images uint8[B, H, W, 3], text int32[B, T] -> (loss, metrics).
  """
  image_emb, text_emb, scale = embed(params, config, images, text)
  cosine = image_emb @ text_emb.T  # [image, caption]
  logits = scale * cosine
  labels = jnp.arange(logits.shape[0])
  image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  loss = (image_to_text + text_to_image) / 2
  return loss, {"loss": loss, "logit_scale": scale, **retrieval(cosine)}


def retrieval(similarity: jax.Array) -> dict[str, jax.Array]:
  """Top-1 retrieval and score margin of a [image, caption] similarity matrix with true pairs
  on the diagonal: `top1` caption -> image, `top1_image` image -> caption."""
  n = similarity.shape[0]
  labels = jnp.arange(n)
  diagonal = jnp.diagonal(similarity)
  off_diagonal = (similarity.sum() - diagonal.sum()) / max(n * (n - 1), 1)
  return {"top1": jnp.mean(jnp.argmax(similarity, axis=0) == labels),
          "top1_image": jnp.mean(jnp.argmax(similarity, axis=1) == labels),
          "margin": diagonal.mean() - off_diagonal}


@functools.partial(jax.jit, static_argnums=1)
def evaluate(params: Any, config: RerankerConfig, images: jax.Array, text: jax.Array
             ) -> dict[str, jax.Array]:
  """Loss, top-1 retrieval both ways and the cosine margin (true minus other pairs) of a batch."""
  metrics = contrastive_loss(params, config, images, text)[1]
  return {k: v for k, v in metrics.items() if k != "logit_scale"}


@functools.partial(jax.jit, static_argnums=1)
def _score(params: Any, config: RerankerConfig, images: jax.Array, text: jax.Array) -> jax.Array:
  image_emb, text_emb, _ = embed(params, config, images, text)
  return jnp.sum(image_emb * text_emb, axis=-1)


def score(params: Any, config: RerankerConfig, images: jax.Array, text: jax.Array) -> jax.Array:
  """Cosine similarity of each image with its own caption: uint8[N, H, W, 3], int32[N, T] ->
  float32[N], in [-1, 1]. To score N samples of one caption, repeat its ids N times."""
  r, t = config.resolution, config.text_len
  if images.shape[1:] != (r, r, 3) or images.dtype != jnp.uint8:
    raise ValueError(f"images must be uint8[N, {r}, {r}, 3], got {images.dtype}{images.shape}")
  if text.ndim != 2 or text.shape != (images.shape[0], t):
    raise ValueError(f"text must be int[{images.shape[0]}, {t}] (one caption per image), got "
                     f"{text.shape}")
  if not isinstance(text, jax.core.Tracer):
    ids = np.asarray(text)
    if ids.min() < 0 or ids.max() >= config.num_text_tokens:
      raise ValueError(f"text ids must be in [0, {config.num_text_tokens}) (pieces, then pads); "
                       f"got [{ids.min()}, {ids.max()}]: was it encoded by another tokenizer?")
  return _score(params, config, images, text)


def rerank(scores: jax.Array, keep: int) -> jax.Array:
  """Indices of the `keep` highest scores along the last axis, best first: [..., N] -> [..., keep]
  (ties: the lower index first)."""
  n = scores.shape[-1]
  if not 1 <= keep <= n:
    raise ValueError(f"keep must be in [1, {n}], got {keep}")
  return jax.lax.top_k(scores, keep)[1]
