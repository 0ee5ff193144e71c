"""Stage-2 batches: (text tokens, codes) from code shards through Grain, shuffled, resumable.

    global position p = step * batch_size + row      (row of the global batch)
    epoch, i = divmod(p, batches_per_epoch * batch_size)
    example  = Grain's index shuffle of [0, N) with seed + epoch, at i     (training)
             = p                                                           (evaluation)

Nothing of size N is ever built: the shuffle is Grain's `MapDataset.shuffle`, a bijection computed
per index, and the examples are read one at a time from `CodeShards`. Host h of H reads rows
[h B/H, (h+1) B/H) of every global batch, the rows its devices hold, so the global batch is the same
for any number of hosts and a run may move between host counts. The position is one number, the
global step, the same on every host.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from dalle_jax.data.code_shards import CodeShards

_ENDLESS_BATCHES = 2 ** 40  # training repeats the data forever; Grain's range needs an end


class CodeBatches:
  """This host's share of global batches of (text tokens, codes), shuffled per epoch, resumable.

      batches = CodeBatches(CodeShards(d), tokenizer, batch_size=64, seed=0)
      batch = next(batches)   # {"text": int32[64 / hosts, T], "codes": int32[64 / hosts, h, w]}
      state = batches.get_state(); ...; batches.set_state(state)

  In training, each example draws one of its captions and its BPE-dropout segmentation from a
  generator seeded by (seed, epoch, example), and reads its encoding `epoch % K` of the K stored
  (augmented crops), so a resumed run sees exactly the batches an uninterrupted one would. Each
  epoch is a permutation; the last `N % batch_size` examples of an epoch's order are left out.
  Evaluation (`training=False`): one pass in order, the first caption and encoding, no dropout, no
  partial batch.
  """

  def __init__(self, shards: CodeShards, tokenizer, batch_size: int, *, seed: int = 0,
               training: bool = True, process_index: int = 0, process_count: int = 1,
               read_threads: int = 8, prefetch: int = 256):
    if batch_size % process_count:
      raise ValueError(f"batch size {batch_size} does not split over {process_count} hosts")
    if len(shards) < batch_size:
      raise ValueError(f"{len(shards)} examples, fewer than one batch of {batch_size}; "
                       "encode more data or lower the batch size")
    if len(shards) >= 2 ** 32:
      raise ValueError(f"{len(shards)} examples: Grain's index shuffle takes fewer than 2**32; "
                       "split the data into several directories")
    if not 0 <= seed < 2 ** 31:
      raise ValueError(f"seed {seed} must be in [0, 2**31) (Grain's shuffle seed)")
    self.shards, self.tokenizer = shards, tokenizer
    self.batch_size, self.seed, self.training = batch_size, seed, training
    self.host_rows = batch_size // process_count
    self._first_row = process_index * self.host_rows
    self.batches_per_epoch = len(shards) // batch_size
    self._order = grain.MapDataset.range(len(shards)).shuffle(seed=seed)
    self._read_options = grain.ReadOptions(num_threads=read_threads,
                                           prefetch_buffer_size=prefetch)
    self.step, self.epoch, self.truncated_captions = 0, 0, 0
    self._iterator = None  # started by the first batch, from `step`

  def __len__(self) -> int:
    """Batches per epoch."""
    return self.batches_per_epoch

  def __iter__(self):
    return self

  def _start(self, step: int):
    stop = _ENDLESS_BATCHES if self.training else self.batches_per_epoch
    rows = grain.MapDataset.range(step * self.host_rows, stop * self.host_rows)
    dataset = rows.map(self._example).to_iter_dataset(self._read_options)
    return iter(dataset.batch(self.host_rows, drop_remainder=True))

  def _example(self, host_row: int) -> dict[str, Any]:
    """This host's `host_row`-th row -> {"text": int32[T], "codes": int32[h, w], ...}."""
    step, row = divmod(host_row, self.host_rows)
    epoch, position = divmod(step * self.batch_size + self._first_row + row,
                             self.batches_per_epoch * self.batch_size)
    if not self.training:
      record = self.shards[position]
      text, truncated = self.tokenizer.encode(record["captions"][0])
      return {"text": text, "codes": record["codes"][0], "truncated": truncated, "epoch": epoch}
    index = int(self._order[epoch * len(self.shards) + position])
    record = self.shards[index]
    rng = np.random.default_rng([self.seed, epoch, index])
    caption = record["captions"][rng.integers(len(record["captions"]))]
    text, truncated = self.tokenizer.encode(caption, training=True, rng=rng)
    return {"text": text, "codes": record["codes"][epoch % len(record["codes"])],
            "truncated": truncated, "epoch": epoch}

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._start(self.step)
    batch = next(self._iterator)
    self.step += 1
    self.epoch = int(batch.pop("epoch")[-1])
    self.truncated_captions += int(np.sum(batch.pop("truncated")))
    return {"text": batch["text"].astype(np.int32), "codes": batch["codes"]}

  def get_state(self) -> dict[str, int]:
    """JSON-serialisable; `step` counts global batches, so it is the same on every host."""
    return {"step": self.step, "epoch": self.epoch,
            "truncated_captions": self.truncated_captions}

  def set_state(self, state: dict[str, int]) -> None:
    if "step" not in state:
      raise ValueError(f"{state} is not a CodeBatches state (it has no 'step'): this data "
                       "order cannot continue it; start the run in a new workdir")
    self.step, self.epoch = int(state["step"]), int(state["epoch"])
    self.truncated_captions = int(state.get("truncated_captions", 0))
    self._iterator = None
