"""Which tiles of a static attention mask block-sparse attention computes, and how: NumPy only,
built at trace time and cached.

    layout = block_layout(mask, block_size)   # the empty, full and partial [bs, bs] tiles
    plan = make_plan(mask, block_size, permutation, head_dim)   # the tiles as static arrays:
                                              # global key blocks and a band of windows

`block_sparse.py` runs the computation a `BlockPlan` describes; see its docstring for the scheme.
"""

from __future__ import annotations

import dataclasses
import functools

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
class BlockPlan:
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
def plan_for(layout: BlockLayout, permutation: bytes | None, head_dim: int) -> BlockPlan:
  """The plan of an already permuted layout; `permutation` as bytes of int64, for the cache."""
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
  return BlockPlan(layout, to_padded, from_padded, global_blocks, global_mask, (start, stop), group,
              offset, band_mask.reshape((stop - start) * bs, width * bs))


def make_plan(mask: np.ndarray, block_size: int, permutation: np.ndarray | None,
              head_dim: int = 64) -> BlockPlan:
  """The `BlockPlan` of `mask` reordered by `permutation` (int[seq] or None), cached."""
  if permutation is not None:
    permutation = np.asarray(permutation, dtype=np.int64)
    if not np.array_equal(np.sort(permutation), np.arange(mask.shape[0])):
      raise ValueError(f"permutation must reorder range({mask.shape[0]})")
    mask = np.asarray(mask)[permutation][:, permutation]
  layout = block_layout(mask, block_size)
  return plan_for(layout, None if permutation is None else permutation.tobytes(), head_dim)
