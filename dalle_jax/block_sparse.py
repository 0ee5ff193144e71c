"""Block-sparse attention: the static mask cut into square tiles, only non-empty tiles computed.

    layout = block_layout(mask, block_size)          # NumPy, at trace time; cached
    out = block_sparse_attention(q, k, v, mask)      # [batch, seq, heads, head_dim], as dense

The sequence is padded to nB blocks of `block_size` (bs); the mask becomes an nB x nB grid of
tiles, each empty, full or partial. The computation takes the non-empty tiles in two parts:

  global  key blocks that most query blocks use (here the text, which every image token sees):
          scored against all queries at once, one large matmul over [N, nG * bs], no copies.
  local   each query block's other non-empty key blocks (the band of row, column-major column and
          conv attention), gathered per query block: [nL, bs, maxL * bs] scores.

One softmax spans both parts of a query row (scores in float32, masked to -inf inside partial
tiles). The backward is dense attention's, dS = P * (dO V^T - rowsum(dO * O)), on each part; the
local keys' gradients are summed per key block through the transposed layout (for each key block,
the slots that used it), with gathers: no scatter-add. A permutation of the sequence
(`masks.column_major_permutation` for column layers) is applied to q, k, v and the mask and undone
on the output: it turns the column mask into a band. Measurements: experiments/bench_attention.py.
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
# The plan: the layout split into its global and local parts, as static index arrays.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
  """Static arrays for one (layout, permutation); N = nB * bs padded positions.

  to_padded: int32[N], the original position at each padded, permuted one (seq: padding).
  from_padded: int32[seq], the padded, permuted position of each original one.
  global_blocks: int32[nG]; global_mask: bool[N, nG * bs].
  local_rows: int32[nL], the query blocks with local tiles (not the text's: all its key blocks
    are global).
  local_blocks: int32[nL, maxL]; local_mask: bool[nL, bs, maxL * bs] (False in padding slots).
  local_users: per group of key blocks with similar use, int32[n_g, maxU_g]: the local slots
    (local row * maxL + slot) that use each key block, padded with nL * maxL (gathered as 0).
  key_source: int32[seq], each original key's row in [global keys; the groups' keys] (out of
    range, gathered as 0, for keys no query attends).
  """
  layout: BlockLayout
  to_padded: np.ndarray
  from_padded: np.ndarray
  global_blocks: np.ndarray
  global_mask: np.ndarray
  local_rows: np.ndarray
  local_blocks: np.ndarray
  local_mask: np.ndarray
  local_users: tuple[np.ndarray, ...]
  key_source: np.ndarray


def _choose_global(grid: np.ndarray) -> np.ndarray:
  """bool[nB]: the key blocks to score against every query, given the non-empty tiles
  bool[nB, nB]: the busiest ones, as many as minimise the tiles computed per query block
  (nG + maxL); ties go to more global blocks, which need no gather."""
  users = grid.sum(0)
  best, best_cost = None, None
  for threshold in sorted(set(users.tolist()) | {grid.shape[0] + 1}):
    chosen = users >= threshold
    cost = (chosen.sum() + (grid & ~chosen).sum(1).max(), -chosen.sum())
    if best_cost is None or cost < best_cost:
      best, best_cost = chosen, cost
  return best


def _group_users(users: list[list[int]], empty: int,
                 waste: float = 1.25) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Key blocks grouped so that padding each group's slot lists to its longest costs at most
  `waste` x its real slots (one width for all would pad every block to the busiest one).
  `users[j]` lists block j's slots; returns each group's blocks and padded slot lists."""
  order = sorted((j for j in range(len(users)) if users[j]), key=lambda j: -len(users[j]))
  blocks, slots, start = [], [], 0
  while start < len(order):
    end = start + 1
    while end < len(order):
      lengths = [len(users[j]) for j in order[start:end + 1]]
      if max(lengths) * len(lengths) > waste * sum(lengths):
        break
      end += 1
    group = order[start:end]
    table = np.full((len(group), len(users[group[0]])), empty, dtype=np.int32)
    for row, j in enumerate(group):
      table[row, :len(users[j])] = users[j]
    blocks.append(np.asarray(group, dtype=np.int64))
    slots.append(table)
    start = end
  return blocks, slots


@functools.lru_cache(maxsize=64)
def _plan_for(layout: BlockLayout, permutation: bytes | None) -> _Plan:
  seq, bs, nb = layout.seq_len, layout.block_size, layout.num_blocks
  perm = np.arange(seq) if permutation is None else np.frombuffer(permutation, np.int64)
  to_padded = np.concatenate([perm, np.full(nb * bs - seq, seq)]).astype(np.int32)
  from_padded = np.argsort(perm).astype(np.int32)
  grid = layout.nonempty()
  tiles = layout.padded_mask().reshape(nb, bs, nb, bs)
  is_global = _choose_global(grid)
  global_blocks = np.flatnonzero(is_global)
  global_mask = tiles[:, :, global_blocks].reshape(nb * bs, len(global_blocks) * bs)
  local_lists = [np.flatnonzero(row & ~is_global) for row in grid]
  local_rows = np.asarray([i for i, r in enumerate(local_lists) if len(r)], dtype=np.int64)
  max_l = max(len(r) for r in local_lists)
  local_blocks = np.zeros((len(local_rows), max_l), dtype=np.int64)
  local_mask = np.zeros((len(local_rows), bs, max_l, bs), dtype=bool)
  users = [[] for _ in range(nb)]
  for r, i in enumerate(local_rows):
    blocks = local_lists[i]
    local_blocks[r, :len(blocks)] = blocks  # padding slots: block 0 under an all-False tile
    local_mask[r, :, :len(blocks)] = tiles[i, :, blocks].transpose(1, 0, 2)
    for slot, j in enumerate(blocks):
      users[j].append(r * max_l + slot)
  group_blocks, local_users = _group_users(users, len(local_rows) * max_l)
  source = np.full(nb, nb, dtype=np.int64)  # each key block's row (in blocks) in the gradients
  ordered = np.concatenate([global_blocks, *group_blocks])
  source[ordered] = np.arange(len(ordered))
  key_source = source[from_padded // bs] * bs + from_padded % bs
  return _Plan(layout, to_padded, from_padded, global_blocks, global_mask, local_rows,
               local_blocks, local_mask.reshape(len(local_rows), bs, max_l * bs),
               tuple(local_users), key_source)


def _plan(mask: np.ndarray, block_size: int, permutation: np.ndarray | None) -> _Plan:
  if permutation is not None:
    permutation = np.asarray(permutation, dtype=np.int64)
    if not np.array_equal(np.sort(permutation), np.arange(mask.shape[0])):
      raise ValueError(f"permutation must reorder range({mask.shape[0]})")
    mask = np.asarray(mask)[permutation][:, permutation]
  layout = block_layout(mask, block_size)
  return _plan_for(layout, None if permutation is None else permutation.tobytes())


# ---------------------------------------------------------------------------------------------
# The computation.
# ---------------------------------------------------------------------------------------------

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
  plan = _plan(np.asarray(mask), block_size, permutation)
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # as dense_attention: exact for D = 4^n
  q, k, v = (x.astype(q.dtype).swapaxes(1, 2) for x in (q, k, v))  # heads-major [B, H, S, D]
  return _sparse_attention(plan, q, k, v).swapaxes(1, 2)


def _is_run(index: np.ndarray) -> bool:
  return len(index) > 0 and np.array_equal(index, np.arange(index[0], index[0] + len(index)))


def _rows(x: jax.Array, index: np.ndarray) -> jax.Array:
  """x[:, :, index] for a static int[...] index: a slice where it is a run, else a gather."""
  if index.ndim == 1 and _is_run(index):
    return x[:, :, index[0]:index[0] + len(index)]
  return jnp.take(x, index, axis=2, mode="clip")


def _blocks(x: jax.Array, bs: int) -> jax.Array:
  """[B, H, n * bs, ...] -> [B, H, n, bs, ...]."""
  return x.reshape(*x.shape[:2], -1, bs, *x.shape[3:])


def _flat(x: jax.Array) -> jax.Array:
  """[B, H, n, m, ...] -> [B, H, n * m, ...]."""
  return x.reshape(*x.shape[:2], -1, *x.shape[4:])


def _padded(plan: _Plan, x: jax.Array) -> jax.Array:
  """[B, H, S, D] -> permuted, zero-padded [B, H, N, D]."""
  seq, n = len(plan.from_padded), len(plan.to_padded)
  if np.array_equal(plan.from_padded, np.arange(seq)):  # no permutation: a pad, not a gather
    return jnp.pad(x, ((0, 0), (0, 0), (0, n - seq), (0, 0)))
  return jnp.take(x, plan.to_padded, axis=2, mode="fill", fill_value=0)


def _local_rows(plan: _Plan, x: jax.Array) -> jax.Array:
  """[B, H, N, ...] -> the local rows' [B, H, nL * bs, ...]."""
  bs = plan.layout.block_size
  return _flat(_rows(_blocks(x, bs), plan.local_rows))


def _from_local_rows(plan: _Plan, x: jax.Array, fill: float) -> jax.Array:
  """The local rows' [B, H, nL * bs, ...] -> [B, H, N, ...], `fill` in the other rows."""
  bs, nb, rows = plan.layout.block_size, plan.layout.num_blocks, plan.local_rows
  if _is_run(rows):
    widths = [(0, 0)] * x.ndim
    widths[2] = (rows[0] * bs, (nb - rows[-1] - 1) * bs)
    return jnp.pad(x, widths, constant_values=fill)
  source = np.full(nb, len(rows))
  source[rows] = np.arange(len(rows))
  index = (source[:, None] * bs + np.arange(bs)).reshape(-1)
  return jnp.take(x, index, axis=2, mode="fill", fill_value=fill)


def _key_gradient(plan: _Plan, d_global: jax.Array | None, d_local: jax.Array | None):
  """Global keys' [B, H, nG * bs, D] and local slots' [B, H, nL, maxL * bs, D] gradients ->
  [B, H, S, D]: each key block sums the local slots that used it, then every key returns to its
  original position."""
  parts = [] if d_global is None else [d_global]
  if d_local is not None:
    d_local = _blocks(_flat(d_local), plan.layout.block_size)  # [B, H, nL * maxL, bs, D]
    for users in plan.local_users:
      # One gather per user, summed, fuses into one loop: 13x faster than gathering all users
      # into one array and reducing it.
      parts.append(_flat(sum(jnp.take(d_local, u, axis=2, mode="fill", fill_value=0)
                             for u in users.T)))
  keys = jnp.concatenate(parts, axis=2)
  if _is_run(plan.key_source) and plan.key_source[0] == 0:
    return keys[:, :, :len(plan.key_source)]
  return jnp.take(keys, plan.key_source, axis=2, mode="fill", fill_value=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse_attention(plan: _Plan, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T, masked) v over the plan's tiles: [B, H, S, D] x3 (q scaled) -> same."""
  return _sparse_fwd(plan, q, k, v)[0]


def _sparse_fwd(plan, q, k, v):
  bs = plan.layout.block_size
  q, k, v = (_padded(plan, x) for x in (q, k, v))
  # Global part: [B, H, N, nG * bs] scores. Local part: [B, H, nL, bs, maxL * bs].
  kg = vg = kl = vl = sg = sl = None
  row_max = []
  if len(plan.global_blocks):
    kg, vg = (_flat(_rows(_blocks(x, bs), plan.global_blocks)) for x in (k, v))
    sg = jnp.einsum("bhqd,bhkd->bhqk", q, kg, preferred_element_type=jnp.float32)
    # -inf outside the mask: weight exactly 0. Applied to full tiles too: fused into the max and
    # exp passes, it costs nothing measurable.
    sg = jnp.where(plan.global_mask, sg, -jnp.inf)
    row_max.append(sg.max(-1))
  if plan.local_blocks.shape[1]:
    kl, vl = (_rows(_blocks(x, bs), plan.local_blocks) for x in (k, v))  # [.., nL, maxL, bs, D]
    kl, vl = (x.reshape(*x.shape[:3], -1, x.shape[-1]) for x in (kl, vl))
    sl = jnp.einsum("bhnqd,bhnkd->bhnqk", _blocks(_local_rows(plan, q), bs), kl,
                    preferred_element_type=jnp.float32)
    sl = jnp.where(plan.local_mask, sl, -jnp.inf)
    row_max.append(_from_local_rows(plan, _flat(sl.max(-1)), -jnp.inf))
  # Every row sees some key (padded rows themselves), so the max is finite.
  row_max = functools.reduce(jnp.maximum, row_max)[..., None]  # [B, H, N, 1]
  eg = el = None
  out = total = 0
  if sg is not None:
    eg = jnp.exp(sg - row_max)
    total = total + eg.sum(-1, keepdims=True)
    out = out + jnp.einsum("bhqk,bhkd->bhqd", eg.astype(v.dtype), vg,
                           preferred_element_type=jnp.float32)
  if sl is not None:
    el = jnp.exp(sl - _blocks(_local_rows(plan, row_max), bs))
    total = total + _from_local_rows(plan, _flat(el.sum(-1, keepdims=True)), 0)
    out = out + _from_local_rows(plan, _flat(jnp.einsum(
        "bhnqk,bhnkd->bhnqd", el.astype(v.dtype), vl, preferred_element_type=jnp.float32)), 0)
  out = (out / total).astype(v.dtype)  # [B, H, N, D]
  return _rows(out, plan.from_padded), (q, kg, vg, kl, vl, eg, el, total, out)


def _sparse_bwd(plan, residuals, d_out):
  """Dense attention's backward on each part: with P = e / total and O = P V,
  dS = P * (dO V^T - rowsum(dO * O))."""
  bs = plan.layout.block_size
  q, kg, vg, kl, vl, eg, el, total, out = residuals
  d_out = _padded(plan, d_out).astype(jnp.float32) / total
  delta = jnp.sum(d_out * out.astype(jnp.float32), -1, keepdims=True)
  dq = 0
  dkg = dvg = dkl = dvl = None
  if eg is not None:
    dvg = jnp.einsum("bhqk,bhqd->bhkd", eg, d_out)
    ds = jnp.einsum("bhqd,bhkd->bhqk", d_out, vg, preferred_element_type=jnp.float32)
    ds = eg * (ds - delta)
    dq = dq + jnp.einsum("bhqk,bhkd->bhqd", ds, kg, preferred_element_type=jnp.float32)
    dkg = jnp.einsum("bhqk,bhqd->bhkd", ds, q, preferred_element_type=jnp.float32)
  if el is not None:
    d_out_l, q_l = (_blocks(_local_rows(plan, x), bs) for x in (d_out, q))
    dvl = jnp.einsum("bhnqk,bhnqd->bhnkd", el, d_out_l)
    ds = jnp.einsum("bhnqd,bhnkd->bhnqk", d_out_l, vl, preferred_element_type=jnp.float32)
    ds = el * (ds - _blocks(_local_rows(plan, delta), bs))
    dq = dq + _from_local_rows(plan, _flat(jnp.einsum(
        "bhnqk,bhnkd->bhnqd", ds, kl, preferred_element_type=jnp.float32)), 0)
    dkl = jnp.einsum("bhnqk,bhnqd->bhnkd", ds, q_l, preferred_element_type=jnp.float32)
  dq = _rows(dq, plan.from_padded)
  dk, dv = _key_gradient(plan, dkg, dkl), _key_gradient(plan, dvg, dvl)
  return dq.astype(q.dtype), dk.astype(q.dtype), dv.astype(q.dtype)


_sparse_attention.defvjp(_sparse_fwd, _sparse_bwd)
