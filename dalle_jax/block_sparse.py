"""Block-sparse attention: the static mask cut into square tiles, only non-empty tiles computed.

    layout = block_layout(mask, block_size)          # NumPy, at trace time; cached
    out = block_sparse_attention(q, k, v, mask)      # [batch, seq, heads, head_dim], as dense

The sequence is padded to nB blocks of `block_size` (bs); the mask becomes an nB x nB grid of
tiles, each empty, full or partial. The computation takes the non-empty tiles in two parts:

  global  key blocks that most query blocks use (here the text, which every image token sees):
          scored against the queries in large matmuls over [rows, nG * bs], no copies.
  band    the other non-empty tiles (row, column-major column and conv attention make a band):
          query block i's lie in the window of key blocks i + offset .. i + offset + width - 1.
          Query blocks go in groups of g (`_band_group`: conv's 7-block band runs in groups of
          4 blocks of 32); a group's window of width + g - 1 blocks is made of strided slices of
          the keys, no gather, and scored in one batched matmul [groups, g * bs, window keys].

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


# ---------------------------------------------------------------------------------------------
# The layout: NumPy, from the static mask.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
  """Which [bs, bs] tiles of a bool[seq, seq] mask, padded to nB * bs, are non-empty.

  Padded keys are masked out; padded queries see only themselves (a zero value: their output
  is 0, and their cotangent is 0). Query block i's non-empty key blocks are
  `key_blocks[i, :counts[i]]`, increasing; later slots repeat its last block under an all-False
  tile. All arrays are read-only.

  Attributes:
    block_size: bs.
    seq_len: the unpadded seq.
    key_blocks: int32[nB, maxK]; counts: int32[nB].
    full: bool[nB, maxK], slots whose tile has no masked element (False in padding slots).
    tiles: bool[nB, maxK, bs, bs], each slot's tile: all True where `full`, the partial tiles
      where not, all False in padding slots.
    query_blocks: int32[nB, maxU], the transposed layout: for each key block the query blocks
      that use it, increasing, padded with nB; query_slots: int32[nB, maxU], the slot each uses
      it in (0 in padding); user_counts: int32[nB].
  """
  block_size: int
  seq_len: int
  key_blocks: np.ndarray
  counts: np.ndarray
  full: np.ndarray
  tiles: np.ndarray
  query_blocks: np.ndarray
  query_slots: np.ndarray
  user_counts: np.ndarray

  @property
  def num_blocks(self) -> int:
    return self.key_blocks.shape[0]

  @property
  def fraction(self) -> float:
    """Non-empty tiles over all nB^2: the share of dense attention's work left to do."""
    return float(self.counts.sum()) / self.num_blocks**2

  def nonempty(self) -> np.ndarray:
    """bool[nB, nB]: the grid of non-empty tiles."""
    grid = np.zeros((self.num_blocks,) * 2, dtype=bool)
    for i, count in enumerate(self.counts):
      grid[i, self.key_blocks[i, :count]] = True
    return grid

  def padded_mask(self) -> np.ndarray:
    """bool[nB * bs, nB * bs]: the padded mask, rebuilt from the tiles."""
    nb, bs = self.num_blocks, self.block_size
    grid = np.zeros((nb, nb, bs, bs), dtype=bool)
    for i, count in enumerate(self.counts):
      grid[i, self.key_blocks[i, :count]] = self.tiles[i, :count]
    return grid.transpose(0, 2, 1, 3).reshape(nb * bs, nb * bs)


def block_layout(mask: np.ndarray, block_size: int) -> BlockLayout:
  """The `BlockLayout` of a square bool[seq, seq] mask; cached per (mask contents, block size)."""
  mask = np.asarray(mask, dtype=bool)
  if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
    raise ValueError(f"need a square [seq, seq] mask, got shape {mask.shape}")
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}")
  # Keyed on the packed bits: permuted masks are new arrays at every trace, but equal ones share.
  return _block_layout(np.packbits(mask).tobytes(), mask.shape[0], block_size)


@functools.lru_cache(maxsize=64)
def _block_layout(packed: bytes, seq: int, bs: int) -> BlockLayout:
  mask = np.unpackbits(np.frombuffer(packed, np.uint8), count=seq * seq).reshape(seq, seq)
  nb = -(-seq // bs)
  padded = np.zeros((nb * bs, nb * bs), dtype=bool)
  padded[:seq, :seq] = mask
  padded[np.arange(seq, nb * bs), np.arange(seq, nb * bs)] = True  # padded queries: themselves
  grid = padded.reshape(nb, bs, nb, bs).transpose(0, 2, 1, 3)  # [query block, key block, bs, bs]
  nonempty = grid.any((2, 3))
  counts = nonempty.sum(1).astype(np.int32)
  key_blocks = np.zeros((nb, counts.max()), dtype=np.int32)
  tiles = np.zeros((nb, counts.max(), bs, bs), dtype=bool)
  for i in range(nb):
    blocks = np.flatnonzero(nonempty[i])
    key_blocks[i] = blocks[-1]
    key_blocks[i, :len(blocks)] = blocks
    tiles[i, :len(blocks)] = grid[i, blocks]
  user_counts = nonempty.sum(0).astype(np.int32)
  query_blocks = np.full((nb, user_counts.max()), nb, dtype=np.int32)
  query_slots = np.zeros((nb, user_counts.max()), dtype=np.int32)
  for j in range(nb):
    rows, slots = np.nonzero((key_blocks == j) & (np.arange(counts.max()) < counts[:, None]))
    query_blocks[j, :len(rows)], query_slots[j, :len(rows)] = rows, slots
  arrays = (key_blocks, counts, tiles.all((2, 3)), tiles, query_blocks, query_slots, user_counts)
  for array in arrays:
    array.flags.writeable = False
  return BlockLayout(bs, seq, *arrays)


# ---------------------------------------------------------------------------------------------
# The plan: the layout split into a global part and a band, as static arrays.
# ---------------------------------------------------------------------------------------------

# A band tile's keys are copied into windows; the copy's cost relative to a score, per head
# dimension: fitted to experiments/bench_attention.py (conv's band runs fastest in groups of 2-4
# blocks of 32 or 2 of 64, row's and column's in single blocks).
_COPY_COST = 1.0


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
  """Static arrays for one (layout, permutation, head_dim); N = nB * bs padded positions.

  to_padded: int32[N], the original position at each padded, permuted one (seq: padding).
  from_padded: int32[seq], the padded, permuted position of each original one.
  global_blocks: int32[nG]; global_mask: bool[N, nG * bs].
  band_rows: (start, stop), the query blocks with tiles outside the global blocks, a whole number
    of groups of `band_group` (g) blocks.
  band_offset: group j's window is the `width` key blocks from start + j * g + band_offset.
  band_mask: bool[(stop - start) * bs, width * bs], each query row against its group's window;
    False in global, empty and out-of-range blocks.
  """
  layout: BlockLayout
  to_padded: np.ndarray
  from_padded: np.ndarray
  global_blocks: np.ndarray
  global_mask: np.ndarray
  band_rows: tuple[int, int]
  band_group: int
  band_offset: int
  band_mask: np.ndarray

  @property
  def band_width(self) -> int:
    return self.band_mask.shape[1] // self.layout.block_size


def _band_cost(grid: np.ndarray, is_global: np.ndarray, copy: float) -> float:
  """Tiles scored for a choice of global key blocks: every query block's against each of them,
  and the band's, each band row against its widest span (a band tile costing `copy` more for
  the copies of its keys)."""
  rows, blocks = np.nonzero(grid & ~is_global)
  band = 0 if not len(rows) else (np.ptp(rows) + 1) * (np.ptp(blocks - rows) + 1)
  return grid.shape[0] * int(is_global.sum()) + (1 + copy) * band


def _choose_global(grid: np.ndarray, copy: float) -> np.ndarray:
  """bool[nB]: the key blocks to score against every query, given the non-empty tiles
  bool[nB, nB]: the busiest ones, as many as minimise `_band_cost`; ties go to more global
  blocks (larger matmuls, no copies)."""
  users = grid.sum(0)
  best, best_cost = None, None
  for threshold in sorted(set(users.tolist()) | {grid.shape[0] + 1}):
    chosen = users >= threshold
    cost = (_band_cost(grid, chosen, copy), -chosen.sum())
    if best_cost is None or cost < best_cost:
      best, best_cost = chosen, cost
  return best


def _band_group(rows: int, width: int, stop: int, bs: int, head_dim: int) -> int:
  """Query blocks per band group (g) for a band of `rows` blocks ending at block `stop`, each
  `width` key blocks wide. A group's window spans g + width - 1 blocks: larger groups score more
  masked keys but copy fewer windows. Estimated cost per query row:
  (g + width - 1) * (bs + _COPY_COST * head_dim / g), over ceil(rows / g) whole groups."""
  def cost(g):
    return -(-rows // g) * g * (g + width - 1) * (bs + _COPY_COST * head_dim / g)
  return min((g for g in range(1, min(rows, 8) + 1) if -(-rows // g) * g <= stop), key=cost)


@functools.lru_cache(maxsize=64)
def _plan_for(layout: BlockLayout, permutation: bytes | None, head_dim: int) -> _Plan:
  seq, bs, nb = layout.seq_len, layout.block_size, layout.num_blocks
  perm = np.arange(seq) if permutation is None else np.frombuffer(permutation, np.int64)
  to_padded = np.concatenate([perm, np.full(nb * bs - seq, seq)]).astype(np.int32)
  from_padded = np.argsort(perm).astype(np.int32)
  grid = layout.nonempty()
  tiles = layout.padded_mask().reshape(nb, bs, nb, bs)
  is_global = _choose_global(grid, _COPY_COST * head_dim / bs)
  global_blocks = np.flatnonzero(is_global)
  global_mask = tiles[:, :, global_blocks].reshape(nb * bs, len(global_blocks) * bs)
  rows, blocks = np.nonzero(grid & ~is_global)  # the band's tiles
  start = stop = offset = width = 0
  group = 1
  if len(rows):
    stop, offset = int(rows.max()) + 1, int((blocks - rows).min())
    width = int(np.ptp(blocks - rows)) + 1
    group = _band_group(stop - int(rows.min()), width, stop, bs, head_dim)
    start = stop - -(-(stop - int(rows.min())) // group) * group
    width += group - 1
  band_mask = np.zeros(((stop - start) // group, group, bs, width, bs), dtype=bool)
  j, i = np.divmod(rows - start, group)  # group, and block within it
  band_mask[j, i, :, i + blocks - rows - offset] = tiles[rows, :, blocks]
  return _Plan(layout, to_padded, from_padded, global_blocks, global_mask, (start, stop), group,
               offset, band_mask.reshape((stop - start) * bs, width * bs))


def _plan(mask: np.ndarray, block_size: int, permutation: np.ndarray | None,
          head_dim: int = 64) -> _Plan:
  if permutation is not None:
    permutation = np.asarray(permutation, dtype=np.int64)
    if not np.array_equal(np.sort(permutation), np.arange(mask.shape[0])):
      raise ValueError(f"permutation must reorder range({mask.shape[0]})")
    mask = np.asarray(mask)[permutation][:, permutation]
  layout = block_layout(mask, block_size)
  return _plan_for(layout, None if permutation is None else permutation.tobytes(), head_dim)


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
  plan = _plan(np.asarray(mask), block_size, permutation, q.shape[-1])
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


def _padded(plan: _Plan, x: jax.Array) -> jax.Array:
  """[B, H, S, D] -> permuted, zero-padded [B, H, N, D]."""
  seq, n = len(plan.from_padded), len(plan.to_padded)
  if np.array_equal(plan.from_padded, np.arange(seq)):  # no permutation: a pad, not a gather
    return jnp.pad(x, ((0, 0), (0, 0), (0, n - seq), (0, 0)))
  return jnp.take(x, plan.to_padded, axis=2, mode="fill", fill_value=0)


# The band's windows ---------------------------------------------------------------------------

def _keys(plan: _Plan, x: jax.Array) -> tuple[jax.Array | None, jax.Array | None]:
  """Padded keys (or values) [B, H, N, D] -> the global ones [B, H, nG * bs, D] and the band's
  source [B, H, stop - start + width - g, bs, D], None where absent: band group j's window is
  the source's blocks j * g .. j * g + width - 1 (zero blocks out of range)."""
  bs, (start, stop) = plan.layout.block_size, plan.band_rows
  blocks = _blocks(x, bs)
  kept = None if not len(plan.global_blocks) else _flat(_rows(blocks, plan.global_blocks))
  band = None if stop == start else _shifted(
      blocks, start + plan.band_offset, stop - start + plan.band_width - plan.band_group)
  return kept, band


def _windows(plan: _Plan, source: jax.Array, start, length: int) -> jax.Array:
  """The windows of the n = length / g band groups from query block `start` (traced):
  [B, H, n, width * bs, D]. Slot s of every group is one strided slice of the source: `width`
  slices and a stack, no gather."""
  g, width = plan.band_group, plan.band_width
  chunk = _slice(source, start - plan.band_rows[0], length + width - g)
  windows = jnp.stack([chunk[:, :, s:s + length - g + 1:g] for s in range(width)], axis=3)
  return windows.reshape(*windows.shape[:3], -1, windows.shape[-1])


def _fold_windows(plan: _Plan, d_windows: jax.Array) -> jax.Array:
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


def _segments(plan: _Plan, batch_heads: int) -> list[_Segment]:
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


def _scores(plan: _Plan, segment: _Segment, q: jax.Array, k_global, k_windows, start,
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


def _band_product(plan: _Plan, p: jax.Array, windows: jax.Array) -> jax.Array:
  """[B, H, n * g * bs, width * bs] weights x [B, H, n, width * bs, D] windows -> [B, H,
  n * g * bs, D]: each group's rows against its window."""
  g_bs = plan.band_group * plan.layout.block_size
  return _flat(_matmul("bhnqk,bhnkd->bhnqd", _blocks(p, g_bs), windows))


# The attention --------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse_attention(plan: _Plan, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
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


def _key_gradient(plan: _Plan, d_global: jax.Array | None, d_band: jax.Array | None):
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
