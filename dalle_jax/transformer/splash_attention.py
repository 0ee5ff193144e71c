"""Splash attention: JAX's Pallas TPU kernel, run only on the blocks our static masks leave open.

    out = splash_attention(q, k, v, mask)    # == attention.dense_attention(q, k, v, mask)

The kernel derives from the same NumPy mask as every other path: cut into block x block tiles,
it skips the tiles with no visible key and masks only the partial ones. It wants the sequence to
be a multiple of the block, so the mask is padded, and each padding query sees only its own
padding key: real and padding positions never meet, forward or backward. Column attention is a
band once the image is column-major: pass `masks.column_major_permutation(...)` as
`permutation` and the kernel sees that band instead of a scatter of single keys.

On TPU the kernel compiles with Mosaic; `interpret=True` runs the same kernel as plain JAX on any
backend (slow: tests only).
"""

from __future__ import annotations

import concurrent.futures
import functools

import jax
import jax.numpy as jnp
import numpy as np

IMPORT_ERROR: Exception | None = None  # why the kernel does not import here, if it does not
try:
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as _kernel_lib,
      splash_attention_mask as _mask_lib,
  )
except Exception as error:  # any failure, not only ImportError, means "not here"
  _kernel_lib = _mask_lib = None
  IMPORT_ERROR = error

LANES = 128  # the kernel's kv blocks are whole multiples of the TPU's 128 lanes
DEFAULT_BLOCK = 128  # small tiles skip most of a thin band (row: W + 1 keys wide)


def available() -> bool:
  """Whether the Pallas splash attention module imports in this JAX."""
  return IMPORT_ERROR is None


if _mask_lib is not None:

  class _SharedMask(_mask_lib.NumpyMask):
    """A NumpyMask hashed and compared by identity: the kernel builder hashes every head's mask
    several times over, and NumpyMask hashes all its bytes (0.4 s a build at the paper's 62 heads
    of 1280 x 1280; instant this way, all heads sharing one object)."""

    def __hash__(self) -> int:
      return id(self)

    def __eq__(self, other: object) -> bool:
      return self is other


class _MaskKey:
  """A NumPy mask as a cache key: by identity when it is frozen (read-only and owning its data,
  as `masks.attention_mask` returns, so it cannot change), else by content. The cache keeps the
  array alive, so its id is not reused while the entry lives."""

  def __init__(self, mask: np.ndarray):
    self.mask = mask
    frozen = not mask.flags.writeable and mask.base is None
    self._key = id(mask) if frozen else (mask.shape, np.packbits(mask).tobytes())

  def __hash__(self) -> int:
    return hash(self._key)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, _MaskKey) and self._key == other._key


def padded_length(seq: int, block_size: int = DEFAULT_BLOCK) -> int:
  """The sequence length the kernel runs on: `seq` rounded up to a multiple of the block."""
  return -(-seq // block_size) * block_size


def kernel_mask(mask: np.ndarray, block_size: int = DEFAULT_BLOCK,
                permutation: np.ndarray | None = None) -> np.ndarray:
  """bool[P, P]: `mask[perm][:, perm]` padded to P = padded_length(S), padding seeing itself."""
  if permutation is not None:
    mask = mask[permutation][:, permutation]
  seq, padded = mask.shape[0], padded_length(mask.shape[0], block_size)
  full = np.zeros((padded, padded), dtype=bool)
  full[:seq, :seq] = mask
  # A padding query needs one visible key; its own keeps it away from every real position.
  pad = np.arange(seq, padded)
  full[pad, pad] = True
  return full


def make_kernel(mask: np.ndarray, heads: int, block_size: int = DEFAULT_BLOCK,
                permutation: np.ndarray | None = None,
                interpret: bool = False) -> _kernel_lib.SplashAttentionKernel:
  """The splash kernel for `mask` on `heads` heads: [H, P, D] x3 -> [H, P, D], P padded.

  Cached per (mask, permutation, heads, block_size, interpret); q is not scaled inside.
  """
  if not available():
    raise RuntimeError(f"Pallas splash attention does not import here: {IMPORT_ERROR!r}")
  mask = np.asarray(mask)
  if mask.ndim != 2 or mask.shape[0] != mask.shape[1] or mask.dtype != np.bool_:
    raise ValueError(f"need a square bool mask, got {mask.dtype}{list(mask.shape)}")
  if block_size <= 0 or block_size % LANES:
    raise ValueError(f"block_size must be a positive multiple of {LANES}, got {block_size}")
  order = None
  if permutation is not None:
    order = np.asarray(permutation, dtype=np.int64)
    if not np.array_equal(np.sort(order), np.arange(mask.shape[0])):
      raise ValueError(f"permutation is not a permutation of range({mask.shape[0]})")
    order = order.tobytes()
  return _build_kernel(_MaskKey(mask), order, heads, block_size, interpret)


@functools.lru_cache(maxsize=16)
def _build_kernel(key: _MaskKey, order: bytes | None, heads: int, block_size: int,
                  interpret: bool) -> _kernel_lib.SplashAttentionKernel:
  """make_kernel's cached half, past the argument checks."""
  if not key.mask.any(axis=1).all():
    # The kernel's finite mask value would average such a row's keys instead of failing.
    raise ValueError("every query must see at least one key")
  permutation = None if order is None else np.frombuffer(order, dtype=np.int64)
  shared = _SharedMask(kernel_mask(key.mask, block_size, permutation))
  b = block_size
  # Separate dq and dkv kernels: the fused one keeps a partial dq per kv block, in q's dtype.
  sizes = _kernel_lib.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                                 block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b,
                                 block_kv_dq=b, use_fused_bwd_kernel=False)
  build = lambda: _kernel_lib.make_splash_mha_single_device(
      _mask_lib.MultiHeadMask([shared] * heads), block_sizes=sizes, interpret=interpret)
  # On a thread of its own, outside this thread's jit trace and mesh (both thread-local): its
  # block lists are concrete host arrays (the cache outlives traces), even while tracing for a
  # TPU slice that this host only describes and so cannot run them on.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(build).result()


def _reorder(x: jax.Array, order: np.ndarray) -> jax.Array:
  """x[:, order] for a permutation `order`, whose backward gathers by the inverse rather than
  scatter-adding: [B, S, ...] -> [B, S, ...]."""
  inverse = np.argsort(order)

  @jax.custom_vjp
  def gather(x):
    return x[:, order]

  gather.defvjp(lambda x: (x[:, order], None), lambda _, g: (g[:, inverse],))
  return gather(x)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: np.ndarray,
                     block_size: int = DEFAULT_BLOCK, permutation: np.ndarray | None = None,
                     interpret: bool = False) -> jax.Array:
  """Masked softmax attention by the splash kernel: [B, S, H, D] x3, bool[S, S] -> [B, S, H, D].

  Same scaling and result as `attention.dense_attention`. `permutation` (int[S]) reorders the
  sequence before the kernel (the mask with it) and restores the order after; `block_size` is
  a multiple of 128; `interpret` runs the kernel as plain JAX off TPU.
  """
  _, seq, heads, head_dim = q.shape
  if k.shape != q.shape or v.shape != q.shape:
    raise ValueError(f"q, k, v must share one shape, got {q.shape}, {k.shape}, {v.shape}")
  if np.shape(mask) != (seq, seq):
    raise ValueError(f"mask {np.shape(mask)} does not match {seq} positions")
  kernel = make_kernel(mask, heads, block_size, permutation, interpret)
  q = q * jnp.asarray(head_dim ** -0.5, q.dtype)  # as dense_attention: the scale on q
  if permutation is not None:
    order = np.asarray(permutation)
    q, k, v = (_reorder(x, order) for x in (q, k, v))
  pad = ((0, 0), (0, padded_length(seq, block_size) - seq), (0, 0), (0, 0))
  # The kernel's layout is [H, S, D] per example.
  q, k, v = (jnp.pad(x, pad).swapaxes(1, 2) for x in (q, k, v))
  out = jax.vmap(kernel)(q, k, v).swapaxes(1, 2)[:, :seq]
  if permutation is not None:
    out = _reorder(out, np.argsort(order))
  return out
