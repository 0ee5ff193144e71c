"""Block-sparse attention: the static mask cut into square tiles, only non-empty tiles computed.

    out = block_sparse_attention(q, k, v, mask)      # [batch, seq, heads, head_dim], as dense

Which tiles, and how they are grouped, is `block_plan.py` (NumPy, at trace time; cached).

The sequence is padded to nB blocks of `block_size` (bs); the mask becomes an nB x nB grid of
tiles, each empty, full or partial. The computation takes the non-empty tiles in two parts:

  global  key blocks that most query blocks use (here the text, which every image token sees):
          scored against the queries in large matmuls over [rows, nG * bs], no copies.
  band    the other non-empty tiles (row, column-major column and conv attention make a band):
          query block i's lie in the window of key blocks i + offset .. i + offset + width - 1.
          Query blocks go in groups of g (`block_plan._band_group`: conv's 7-block band runs in
          groups of 4 blocks of 32); a group's window of width + g - 1 blocks is made of strided
          slices of the keys, no gather, and scored in one batched matmul
          [groups, g * bs, window keys].

One softmax spans both parts of a query row (scores in float32, masked to -inf inside partial
tiles). The query blocks are computed in chunks (a scan), FlashAttention-style: the forward keeps
only each row's log-sum-exp, the backward recomputes the chunk's scores and applies dense
attention's backward, dS = P * (dO V^T - rowsum(dO * O)); the keys' gradients are summed over the
chunks in the carry, the band's folded back from the windows by strided pads (no scatter-add).
Small chunks keep every buffer a few MiB, which on CPU matters as much as the tiles skipped (see
`_CHUNK_SCORES`). A permutation of the sequence (`masks.column_major_permutation` for column
layers) is applied to q, k, v and the mask and undone on the output: it turns the column mask into
a band. Measurements: experiments/bench_attention.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax.transformer import block_plan

# ---------------------------------------------------------------------------------------------
# The computation.
# ---------------------------------------------------------------------------------------------

# At most this many scores (floats, all batch rows and heads together) per chunk of query blocks
# (3 MiB): at the paper's geometry all the program's buffers then stay under glibc's 32 MiB mmap
# threshold and are reused from call to call, instead of being page-faulted in afresh (40% of
# dense attention's time on CPU is that); larger chunks run better on both cores.
_CHUNK_SCORES = 3 * 2**18


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: np.ndarray,
                           block_size: int = 32,
                           permutation: np.ndarray | None = None) -> jax.Array:
  """Softmax attention over the non-empty tiles of `mask`: [B, S, H, D] x3, bool[S, S] ->
  [B, S, H, D], equal to `attention.dense_attention` (scores and softmax in float32).

  `permutation` (int[S]), if given, reorders the sequence before blocking (the mask becomes
  mask[perm][:, perm]) and the output back after: the same result from fewer tiles.
  """
  if q.shape[1] != mask.shape[0] or k.shape[1] != mask.shape[1]:
    raise ValueError(f"mask {mask.shape} does not match {q.shape[1]} queries and "
                     f"{k.shape[1]} keys")
  plan = block_plan.make_plan(np.asarray(mask), block_size, permutation, q.shape[-1])
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # as dense_attention: exact for D = 4^n
  q, k, v = (x.astype(q.dtype).swapaxes(1, 2) for x in (q, k, v))  # heads-major [B, H, S, D]
  return _sparse_attention(plan, q, k, v).swapaxes(1, 2)


def _is_run(index: np.ndarray) -> bool:
  return len(index) > 0 and np.array_equal(index, np.arange(index[0], index[0] + len(index)))


def _rows(x: jax.Array, index: np.ndarray) -> jax.Array:
  """x[:, :, index] for a static int[n] index: a slice where it is a run, else a gather."""
  if _is_run(index):
    return x[:, :, index[0]:index[0] + len(index)]
  return jnp.take(x, index, axis=2, mode="clip")


def _blocks(x: jax.Array, size: int) -> jax.Array:
  """[B, H, n * size, ...] -> [B, H, n, size, ...]."""
  return x.reshape(*x.shape[:2], -1, size, *x.shape[3:])


def _flat(x: jax.Array) -> jax.Array:
  """[B, H, n, m, ...] -> [B, H, n * m, ...]."""
  return x.reshape(*x.shape[:2], -1, *x.shape[4:])


def _shifted(x: jax.Array, shift: int, length: int, stride: int = 1) -> jax.Array:
  """y[:, :, i] = x[:, :, i + shift] for i < length, zero where out of range (a pad, no gather);
  with a stride, x[:, :, i] goes to y[:, :, i * stride - shift] instead (zeros between)."""
  widths = [(0, 0, 0)] * x.ndim
  size = (x.shape[2] - 1) * stride + 1
  widths[2] = (-shift, shift + length - size, stride - 1)
  return jax.lax.pad(x, jnp.zeros((), x.dtype), widths)


def _slice(x: jax.Array, start, length: int, axis: int = 2) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(x, start, length, axis)


def _matmul(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _padded(plan: block_plan.BlockPlan, x: jax.Array) -> jax.Array:
  """[B, H, S, D] -> permuted, zero-padded [B, H, N, D]."""
  seq, n = len(plan.from_padded), len(plan.to_padded)
  if np.array_equal(plan.from_padded, np.arange(seq)):  # no permutation: a pad, not a gather
    return jnp.pad(x, ((0, 0), (0, 0), (0, n - seq), (0, 0)))
  return jnp.take(x, plan.to_padded, axis=2, mode="fill", fill_value=0)


# The band's windows ---------------------------------------------------------------------------

def _keys(plan: block_plan.BlockPlan, x: jax.Array) -> tuple[jax.Array | None, jax.Array | None]:
  """Padded keys (or values) [B, H, N, D] -> the global ones [B, H, nG * bs, D] and the band's
  source [B, H, stop - start + width - g, bs, D], None where absent: band group j's window is
  the source's blocks j * g .. j * g + width - 1 (zero blocks out of range)."""
  bs, (start, stop) = plan.layout.block_size, plan.band_rows
  blocks = _blocks(x, bs)
  kept = None if not len(plan.global_blocks) else _flat(_rows(blocks, plan.global_blocks))
  band = None if stop == start else _shifted(
      blocks, start + plan.band_offset, stop - start + plan.band_width - plan.band_group)
  return kept, band


def _windows(plan: block_plan.BlockPlan, source: jax.Array, start, length: int) -> jax.Array:
  """The windows of the n = length / g band groups from query block `start` (traced):
  [B, H, n, width * bs, D]. Slot s of every group is one strided slice of the source: `width`
  slices and a stack, no gather."""
  g, width = plan.band_group, plan.band_width
  chunk = _slice(source, start - plan.band_rows[0], length + width - g)
  windows = jnp.stack([chunk[:, :, s:s + length - g + 1:g] for s in range(width)], axis=3)
  return windows.reshape(*windows.shape[:3], -1, windows.shape[-1])


def _fold_windows(plan: block_plan.BlockPlan, d_windows: jax.Array) -> jax.Array:
  """The transpose of `_windows` (less the slice), on transposed windows: [B, H, n, D,
  width * bs] -> [B, H, n * g + width - g, D, bs], each block the sum of the slots that held it:
  `width` strided pads, added up in one fused loop."""
  g, bs, width, n = plan.band_group, plan.layout.block_size, plan.band_width, d_windows.shape[2]
  slots = d_windows.reshape(*d_windows.shape[:4], width, bs)
  return sum(_shifted(slots[..., s, :], -s, n * g + width - g, g) for s in range(width))


# Chunks of query blocks -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Segment:
  """A run of query blocks [start, stop), computed `size` blocks at a time; `band`: its blocks
  have band tiles; `global_full`: all its global tiles are full (no mask to apply)."""
  start: int
  stop: int
  size: int
  band: bool
  global_full: bool


def _segments(plan: block_plan.BlockPlan, batch_heads: int) -> list[_Segment]:
  """The query blocks in order: before the band, the band, after it."""
  bs, nb, (start, stop) = plan.layout.block_size, plan.layout.num_blocks, plan.band_rows
  segments = []
  for first, last, band in ((0, start, False), (start, stop, True), (stop, nb, False)):
    if last > first:
      keys = (len(plan.global_blocks) + band * plan.band_width) * bs
      unit = plan.band_group if band else 1  # whole groups per chunk
      units = (last - first) // unit
      most = max(1, _CHUNK_SCORES // (batch_heads * bs * keys * unit))
      size = -(-units // -(-units // most)) * unit  # chunks as even as the budget allows
      full = bool(plan.global_mask[first * bs:last * bs].all())
      segments.append(_Segment(first, last, size, band, full))
  return segments


def _in_chunks(step, carry, segment: _Segment):
  """`carry, y = step(carry, chunk_start, length)` over the segment's query blocks, `size` at a
  time: a scan over the whole chunks (one loop body: its buffers are reused), then the rest.
  Returns the carry and the y's, [B, H, positions, ...] each, joined along positions."""
  start, size = segment.start, segment.size
  count, rest = divmod(segment.stop - start, size)
  ys = []
  if count == 1:
    carry, y = step(carry, start, size)
    ys.append(y)
  elif count:
    carry, stacked = jax.lax.scan(lambda c, i: step(c, start + i * size, size), carry,
                                  jnp.arange(count))
    ys.append(jax.tree.map(lambda y: jnp.moveaxis(y, 0, 2).reshape(
        *y.shape[1:3], -1, *y.shape[4:]), stacked))
  if rest:
    carry, y = step(carry, start + count * size, rest)
    ys.append(y)
  return carry, jax.tree.map(lambda *y: jnp.concatenate(y, axis=2), *ys)


def _scores(plan: block_plan.BlockPlan, segment: _Segment, q: jax.Array, k_global, k_windows, start,
            length: int) -> tuple[jax.Array | None, jax.Array | None]:
  """Masked float32 scores of the query blocks [start, start + length) (start traced) against
  the global keys, [B, H, length * bs, nG * bs], and against their band windows,
  [B, H, length * bs, width * bs]; None for an absent part."""
  bs, g = plan.layout.block_size, plan.band_group
  q = _slice(q, start * bs, length * bs)
  s_global = s_band = None
  if k_global is not None:
    s_global = _matmul("bhqd,bhkd->bhqk", q, k_global)
    if not segment.global_full:
      mask = _slice(jnp.asarray(plan.global_mask), start * bs, length * bs, axis=0)
      s_global = jnp.where(mask, s_global, -jnp.inf)
  if k_windows is not None:
    mask = _slice(jnp.asarray(plan.band_mask), (start - plan.band_rows[0]) * bs, length * bs, 0)
    s_band = _flat(_matmul("bhnqd,bhnkd->bhnqk", _blocks(q, g * bs), k_windows))
    s_band = jnp.where(mask, s_band, -jnp.inf)
  return s_global, s_band


def _band_product(plan: block_plan.BlockPlan, p: jax.Array, windows: jax.Array) -> jax.Array:
  """[B, H, n * g * bs, width * bs] weights x [B, H, n, width * bs, D] windows -> [B, H,
  n * g * bs, D]: each group's rows against its window."""
  g_bs = plan.band_group * plan.layout.block_size
  return _flat(_matmul("bhnqk,bhnkd->bhnqd", _blocks(p, g_bs), windows))


# The attention --------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse_attention(plan: block_plan.BlockPlan, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T, masked) v over the plan's tiles: [B, H, S, D] x3 (q scaled) -> same."""
  return _sparse_fwd(plan, q, k, v)[0]


def _sparse_fwd(plan, q, k, v):
  """Chunk by chunk of query blocks: the scores, one softmax over both parts, the output. Only
  the output and each row's log-sum-exp are kept: the backward recomputes the scores."""
  q, k, v = (_padded(plan, x) for x in (q, k, v))
  (k_global, k_band), (v_global, v_band) = _keys(plan, k), _keys(plan, v)

  def step(segment, carry, start, length):
    k_windows, v_windows = (_windows(plan, x, start, length) if segment.band else None
                            for x in (k_band, v_band))
    scores = _scores(plan, segment, q, k_global, k_windows, start, length)
    # Every row sees some key (padded rows themselves), so the max is finite.
    row_max = functools.reduce(jnp.maximum, [s.max(-1, keepdims=True)
                                             for s in scores if s is not None])
    e_global, e_band = (None if s is None else jnp.exp(s - row_max) for s in scores)
    total = sum(e.sum(-1, keepdims=True) for e in (e_global, e_band) if e is not None)
    out = 0
    if e_global is not None:
      out = _matmul("bhqk,bhkd->bhqd", e_global.astype(v.dtype), v_global)
    if e_band is not None:
      out = out + _band_product(plan, e_band.astype(v.dtype), v_windows)
    return carry, ((out / total).astype(v.dtype), row_max + jnp.log(total))

  outs = [_in_chunks(functools.partial(step, segment), None, segment)[1]
          for segment in _segments(plan, q.shape[0] * q.shape[1])]
  out, lse = (jnp.concatenate(x, axis=2) for x in zip(*outs))  # [B, H, N, D], [B, H, N, 1]
  return _rows(out, plan.from_padded), (q, k, v, out, lse)


def _sparse_bwd(plan, residuals, d_out):
  """Dense attention's backward on each part, chunk by chunk, with P = exp(S - lse) from the
  recomputed scores and O = P V: dS = P * (dO V^T - rowsum(dO * O)). The gradients of the
  global keys and of the band's source blocks (`_fold_windows`) are summed over the chunks in
  the carry, transposed ([D, keys]): XLA:CPU computes Q^T dS 1.2-1.6x faster than dS^T Q."""
  bs, g = plan.layout.block_size, plan.band_group
  q, k, v, out, lse = residuals
  d_out = _padded(plan, d_out).astype(jnp.float32)
  delta = jnp.sum(d_out * out.astype(jnp.float32), -1, keepdims=True)
  (k_global, k_band), (v_global, v_band) = _keys(plan, k), _keys(plan, v)

  def step(segment, carry, start, length):
    (dk_global, dv_global), (dk_band, dv_band) = carry
    k_windows, v_windows = (_windows(plan, x, start, length) if segment.band else None
                            for x in (k_band, v_band))
    s_global, s_band = _scores(plan, segment, q, k_global, k_windows, start, length)
    q_c, d_out_c, delta_c, lse_c = (_slice(x, start * bs, length * bs)
                                    for x in (q, d_out, delta, lse))
    d_q = 0
    if s_global is not None:
      p = jnp.exp(s_global - lse_c)
      d_s = p * (_matmul("bhqd,bhkd->bhqk", d_out_c, v_global) - delta_c)
      d_q = _matmul("bhqk,bhkd->bhqd", d_s, k_global)
      dk_global = dk_global + _matmul("bhqd,bhqk->bhdk", q_c, d_s)
      dv_global = dv_global + _matmul("bhqd,bhqk->bhdk", d_out_c, p)
    if s_band is not None:
      p = jnp.exp(s_band - lse_c)
      d_s = p * (_flat(_matmul("bhnqd,bhnkd->bhnqk", _blocks(d_out_c, g * bs), v_windows))
                 - delta_c)
      d_q = d_q + _band_product(plan, d_s, k_windows)
      at = start - plan.band_rows[0]

      def add(source, rows, weights):  # source[at:] += the fold of rows^T weights
        folded = _fold_windows(plan, _matmul("bhnqd,bhnqk->bhndk", _blocks(rows, g * bs),
                                             _blocks(weights, g * bs)))
        return jax.lax.dynamic_update_slice_in_dim(
            source, _slice(source, at, folded.shape[2]) + folded, at, axis=2)

      dk_band, dv_band = add(dk_band, q_c, d_s), add(dv_band, d_out_c, p)
    return ((dk_global, dv_global), (dk_band, dv_band)), d_q

  zeros = lambda x: None if x is None else jnp.zeros(x.swapaxes(-1, -2).shape, jnp.float32)
  carry = ((zeros(k_global),) * 2, (zeros(k_band),) * 2)
  d_qs = []
  for segment in _segments(plan, q.shape[0] * q.shape[1]):
    carry, d_q = _in_chunks(functools.partial(step, segment), carry, segment)
    d_qs.append(d_q)
  d_q = _rows(jnp.concatenate(d_qs, axis=2), plan.from_padded)
  (dk_global, dv_global), (dk_band, dv_band) = carry
  d_k, d_v = _key_gradient(plan, dk_global, dk_band), _key_gradient(plan, dv_global, dv_band)
  return d_q.astype(q.dtype), d_k.astype(q.dtype), d_v.astype(q.dtype)


def _key_gradient(plan: block_plan.BlockPlan, d_global: jax.Array | None, d_band: jax.Array | None):
  """The transposed gradients of the global keys, [B, H, D, nG * bs], and of the band's source,
  [B, H, stop - start + width - g, D, bs] -> [B, H, S, D], each key at its original position."""
  bs, nb = plan.layout.block_size, plan.layout.num_blocks
  parts = []
  if d_global is not None:
    d_global, blocks = _blocks(d_global.swapaxes(-1, -2), bs), plan.global_blocks
    if _is_run(blocks):
      parts.append(_shifted(d_global, -int(blocks[0]), nb))
    else:
      source = np.full(nb, len(blocks))
      source[blocks] = np.arange(len(blocks))
      parts.append(jnp.take(d_global, source, axis=2, mode="fill", fill_value=0))
  if d_band is not None:
    parts.append(_shifted(d_band.swapaxes(-1, -2), -(plan.band_rows[0] + plan.band_offset), nb))
  return _rows(_flat(sum(parts)), plan.from_padded)


_sparse_attention.defvjp(_sparse_fwd, _sparse_bwd)
