"""The paper's discrete VAE (stage 1): exactly the architecture of OpenAI's released `dall_e` code.

    images uint8[B, H, W, 3] --map_pixels--> Encoder --> logits f32[B, h, w, vocab] --argmax--> codes
    codes int32[B, h, w] (or soft one-hots) --> Decoder --> f32[B, H, W, 6]: logit-Laplace mu, ln b

Layout is NHWC (JAX's fast path); parameter names mirror the official state dict (`input`,
`group_1_block_1/res_path_conv_1`, `output_conv`, each with `w` and `b`) so `convert.py` is a
transpose per tensor. Residual blocks: `id_path(x) + post_gain * res_path(x)` with
post_gain = 1 / n_layers**2 and no normalisation; encoder kernels 3,3,3,1, decoder 1,3,3,3.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Pixels are squeezed into [eps, 1 - eps] so the logit-Laplace likelihood stays finite.
LOGIT_LAPLACE_EPS = 0.1


@dataclasses.dataclass(frozen=True)
class DVAEConfig:
  """Shape of the dVAE; the defaults are OpenAI's released model (256x256 -> 32x32 over 8192).

  Attributes:
    resolution: image side in pixels.
    group_count: resolution groups; each but the last halves the side (encoder) or doubles it.
    n_hid: width of the first encoder group (and the last decoder group); later groups double it.
    n_blk_per_group: residual blocks per group.
    n_init: decoder width right after the codebook projection.
    vocab_size: codebook size.
    dtype: compute dtype of the convolutions (parameters stay float32; logits are float32).
  """
  resolution: int = 256
  group_count: int = 4
  n_hid: int = 256
  n_blk_per_group: int = 2
  n_init: int = 128
  vocab_size: int = 8192
  dtype: str = "float32"

  def __post_init__(self):
    problems = []
    if self.group_count < 1:
      problems.append(f"group_count must be >= 1, got {self.group_count}")
    if self.n_blk_per_group < 1:
      problems.append(f"n_blk_per_group must be >= 1, got {self.n_blk_per_group}")
    if self.vocab_size < 2:
      problems.append(f"vocab_size must be >= 2, got {self.vocab_size}")
    if self.n_hid < 4 or self.n_hid % 4:
      problems.append(f"n_hid must be a positive multiple of 4 (bottleneck n_hid/4), got {self.n_hid}")
    if self.n_init < 1:
      problems.append(f"n_init must be >= 1, got {self.n_init}")
    factor = self.downsampling
    if self.group_count >= 1 and (self.resolution < factor or self.resolution % factor):
      problems.append(
          f"resolution {self.resolution} is not divisible by the downsampling factor {factor} "
          f"(2**(group_count-1)); use a multiple of {factor} or fewer groups")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      problems.append(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
    if problems:
      raise ValueError("invalid dVAE config: " + "; ".join(problems))

  @property
  def downsampling(self) -> int:
    return 2 ** max(self.group_count - 1, 0)

  @property
  def code_resolution(self) -> int:
    """Side of the code grid: 32 for the paper's 256x256 images."""
    return self.resolution // self.downsampling

  @property
  def n_layers(self) -> int:
    return self.group_count * self.n_blk_per_group


class Conv2d(nn.Module):
  """Stride-1 'same' convolution, weights ~ N(0, 1/(n_in k k)) and zero bias, as in `dall_e`."""
  features: int
  kernel_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_in, k = x.shape[-1], self.kernel_size
    w = self.param("w", nn.initializers.normal(stddev=1 / np.sqrt(n_in * k * k)),
                   (k, k, n_in, self.features), jnp.float32)
    b = self.param("b", nn.initializers.zeros, (self.features,), jnp.float32)
    x, w = x.astype(self.dtype), w.astype(self.dtype)
    if k == 1:
      # A matmul over channels: XLA:CPU runs this as a dot several times faster than as a conv.
      y = jnp.einsum("...c,cd->...d", x, w[0, 0])
    else:
      y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + b.astype(self.dtype)


def _upsample(x: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x upsampling [B, h, w, C] -> [B, 2h, 2w, C], as a broadcast (no gather)."""
  b, h, w, c = x.shape
  return jnp.broadcast_to(x[:, :, None, :, None], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def _max_pool(x: jax.Array) -> jax.Array:
  """2x2 max pooling, stride 2 [B, h, w, C] -> [B, h/2, w/2, C]; an odd last row or column is
  dropped, as by `nn.max_pool`.

  Four strided slices and elementwise maxima: XLA:CPU hands a reduce_window (`nn.max_pool`) or a
  reshape-and-max to a library fusion that swallows the neighbouring convolutions and runs slower.
  """
  x = x[:, :x.shape[1] // 2 * 2, :x.shape[2] // 2 * 2]
  return jnp.maximum(jnp.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2]),
                     jnp.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2]))


class ResBlock(nn.Module):
  """`id_path(x) + post_gain * res_path(x)`; the bottleneck is n_out // 4 wide.

  With `upsample`, the block sees `x` upsampled 2x (nearest) first, as the decoder's groups do.
  """
  n_out: int
  kernels: tuple[int, int, int, int]
  post_gain: float
  dtype: jnp.dtype = jnp.float32
  upsample: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_hid = self.n_out // 4
    # 1x1 convolutions and ReLU commute with nearest upsampling: running the leading ones at the
    # low resolution gives the same numbers for a quarter of the work.
    low, up = x, (_upsample if self.upsample else lambda y: y)
    if x.shape[-1] != self.n_out:
      identity = up(Conv2d(self.n_out, 1, self.dtype, name="id_path")(low))
    else:
      identity = up(low)
    widths = (n_hid, n_hid, n_hid, self.n_out)
    for i, (width, kernel) in enumerate(zip(widths, self.kernels)):
      conv = Conv2d(width, kernel, self.dtype, name=f"res_path_conv_{i + 1}")
      if i == 0 and kernel == 1:
        x = up(conv(nn.relu(low)))
      else:
        x = conv(nn.relu(up(x) if i == 0 else x))
    return identity + self.post_gain * x


def _group_width(config: DVAEConfig, group: int) -> int:
  """Encoder group g (1-based) is 2**(g-1) * n_hid wide: 256, 512, 1024, 2048 for the paper."""
  return 2 ** (group - 1) * config.n_hid


class Encoder(nn.Module):
  """Mapped pixels f32[B, H, W, 3] -> logits f32[B, H/f, W/f, vocab]."""
  config: DVAEConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, dtype = self.config, jnp.dtype(self.config.dtype)
    x = Conv2d(c.n_hid, 7, dtype, name="input")(x)
    for g in range(1, c.group_count + 1):
      for i in range(1, c.n_blk_per_group + 1):
        x = ResBlock(_group_width(c, g), (3, 3, 3, 1), 1 / c.n_layers ** 2, dtype,
                     name=f"group_{g}_block_{i}")(x)
      if g < c.group_count:
        x = _max_pool(x)
    # The logits stay float32, as in the official code.
    return Conv2d(c.vocab_size, 1, jnp.float32, name="output_conv")(
        nn.relu(x).astype(jnp.float32))


class Decoder(nn.Module):
  """Codes int[B, h, w] or soft one-hots f32[B, h, w, vocab] -> f32[B, h*f, w*f, 6] (mu, ln b)."""
  config: DVAEConfig

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    c, dtype = self.config, jnp.dtype(self.config.dtype)
    codebook = Conv2d(c.n_init, 1, jnp.float32, name="input")
    if jnp.issubdtype(z.dtype, jnp.integer):
      # A 1x1 convolution of a one-hot is a row lookup: no [B, h, w, 8192] tensor.
      if self.is_initializing():
        codebook(jnp.zeros(z.shape + (c.vocab_size,), jnp.float32))
      w, b = codebook.variables["params"]["w"], codebook.variables["params"]["b"]
      x = jnp.take(w[0, 0], z, axis=0) + b
    else:
      x = codebook(z.astype(jnp.float32))
    for g in range(1, c.group_count + 1):
      width = _group_width(c, c.group_count + 1 - g)
      for i in range(1, c.n_blk_per_group + 1):
        # Each group but the first starts by upsampling 2x; its first block does that itself.
        x = ResBlock(width, (1, 3, 3, 3), 1 / c.n_layers ** 2, dtype,
                     upsample=g > 1 and i == 1, name=f"group_{g}_block_{i}")(x)
    return Conv2d(6, 1, dtype, name="output_conv")(nn.relu(x)).astype(jnp.float32)


def map_pixels(images: jax.Array) -> jax.Array:
  """uint8 or [0, 1] float pixels -> [eps, 1 - eps], the encoder's input range."""
  if jnp.issubdtype(images.dtype, jnp.integer):
    images = images.astype(jnp.float32) / 255.0
  return (1 - 2 * LOGIT_LAPLACE_EPS) * images + LOGIT_LAPLACE_EPS


def unmap_pixels(x: jax.Array) -> jax.Array:
  """The inverse of `map_pixels`, clipped to [0, 1]."""
  return jnp.clip((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0.0, 1.0)


@functools.partial(jax.jit, static_argnums=0)
def init(config: DVAEConfig, rng: jax.Array) -> dict:
  """Fresh parameters `{"encoder": ..., "decoder": ...}` (compiled: eager init is op by op)."""
  enc_rng, dec_rng = jax.random.split(rng)
  side, codes = config.resolution, config.code_resolution
  encoder = Encoder(config).init(enc_rng, jnp.zeros((1, side, side, 3), jnp.float32))["params"]
  decoder = Decoder(config).init(dec_rng, jnp.zeros((1, codes, codes), jnp.int32))["params"]
  return {"encoder": encoder, "decoder": decoder}


def encoder_logits(config: DVAEConfig, params: dict, images: jax.Array) -> jax.Array:
  """uint8[B, H, W, 3] or [0, 1] floats -> logits f32[B, h, w, vocab]."""
  return Encoder(config).apply({"params": params["encoder"]}, map_pixels(images))


def encode(config: DVAEConfig, params: dict, images: jax.Array) -> jax.Array:
  """Images -> codes int32[B, h, w]: the argmax of the logits, no noise (how stage 2 sees images)."""
  return jnp.argmax(encoder_logits(config, params, images), axis=-1).astype(jnp.int32)


def decoder_stats(config: DVAEConfig, params: dict, z: jax.Array) -> jax.Array:
  """Codes or soft one-hots -> f32[B, H, W, 6]: logit-Laplace mu (0-2) and ln b (3-5)."""
  return Decoder(config).apply({"params": params["decoder"]}, z)


def decode(config: DVAEConfig, params: dict, codes: jax.Array) -> jax.Array:
  """Codes int32[B, h, w] -> uint8[B, H, W, 3]: unmap(sigmoid(mu)), rounded."""
  mu = decoder_stats(config, params, codes)[..., :3]
  pixels = unmap_pixels(jax.nn.sigmoid(mu))
  return jnp.round(pixels * 255.0).astype(jnp.uint8)
