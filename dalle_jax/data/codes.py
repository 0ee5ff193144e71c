"""Pre-encoded datasets for stage 2: shards of (captions, dVAE codes) written by encode_dataset.py.

A shard is an `.npz` with `codes: int16[N, h, w]` (int32 when the codebook exceeds int16),
`captions: str[N]` (every usable caption of the image, newline-joined) and `keys: str[N]`.
Shards are written whole under a temporary name and renamed, so a directory never holds a partial
one; `progress-{host}.json` beside them records where each host's encoder stopped.
"""

from __future__ import annotations

import glob
import os

import numpy as np


def shard_path(directory: str, host: int, index: int) -> str:
  return os.path.join(directory, f"codes-{host:03d}-{index:05d}.npz")


def write_shard(path: str, codes: np.ndarray, captions: list[str], keys: list[str]) -> None:
  """Writes one shard atomically (temporary file, then rename)."""
  dtype = np.int16 if codes.max(initial=0) < 2 ** 15 else np.int32
  temporary = path + ".tmp.npz"
  np.savez(temporary, codes=codes.astype(dtype), captions=np.array(captions, dtype=str),
           keys=np.array(keys, dtype=str))
  os.replace(temporary, path)


def read_shards(directory: str) -> dict[str, np.ndarray]:
  """Every complete shard under `directory`, concatenated: codes int32[N, h, w], captions, keys."""
  paths = sorted(glob.glob(os.path.join(directory, "codes-*-*.npz")))
  paths = [p for p in paths if not p.endswith(".tmp.npz")]
  if not paths:
    raise FileNotFoundError(f"no code shards (codes-*.npz) in {directory}; run "
                            "experiments/encode_dataset.py first")
  parts = [np.load(p) for p in paths]
  return {"codes": np.concatenate([p["codes"] for p in parts]).astype(np.int32),
          "captions": np.concatenate([p["captions"] for p in parts]),
          "keys": np.concatenate([p["keys"] for p in parts])}


class CodeBatches:
  """This host's share of global batches of (text tokens, codes), shuffled per epoch, resumable.

      batches = CodeBatches(read_shards(d), tokenizer, batch_size=64, seed=0)
      batch = next(batches)   # {"text": int32[64 / hosts, T], "codes": int32[64 / hosts, h, w]}
      state = batches.get_state(); ...; batches.set_state(state)

  Every host draws the same global batch (the epoch's permutation of all examples) and keeps its
  contiguous slice, the rows its devices hold: the global batch is the same for any number of
  hosts, so a run may move between host counts. In training, each example draws one of its
  captions and its BPE-dropout segmentation from a generator seeded by (seed, epoch, example), so
  a resumed run sees exactly the batches an uninterrupted one would. Evaluation
  (`training=False`): one pass in order, the first caption, no dropout, no partial batch.
  """

  def __init__(self, arrays: dict[str, np.ndarray], tokenizer, batch_size: int, *,
               seed: int = 0, training: bool = True, process_index: int = 0,
               process_count: int = 1):
    if batch_size % process_count:
      raise ValueError(f"batch size {batch_size} does not split over {process_count} hosts")
    self.codes, self.captions = arrays["codes"], arrays["captions"]
    if len(self.codes) < batch_size:
      raise ValueError(f"{len(self.codes)} examples, fewer than one batch of {batch_size}; "
                       "encode more data or lower the batch size")
    self.tokenizer = tokenizer
    self.batch_size = batch_size
    self.host_rows = slice(process_index * batch_size // process_count,
                           (process_index + 1) * batch_size // process_count)
    self.seed = seed
    self.training = training
    self.epoch, self.position = 0, 0
    self.truncated_captions = 0

  def __len__(self) -> int:
    """Batches per epoch."""
    return len(self.codes) // self.batch_size

  def __iter__(self):
    return self

  def get_state(self) -> dict[str, int]:
    return {"epoch": self.epoch, "position": self.position,
            "truncated_captions": self.truncated_captions}

  def set_state(self, state: dict[str, int]) -> None:
    self.epoch, self.position = int(state["epoch"]), int(state["position"])
    self.truncated_captions = int(state.get("truncated_captions", 0))

  def _order(self) -> np.ndarray:
    if not self.training:
      return np.arange(len(self.codes))
    return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.codes))

  def __next__(self) -> dict[str, np.ndarray]:
    if self.position + self.batch_size > len(self.codes):
      if not self.training:
        raise StopIteration
      self.epoch, self.position = self.epoch + 1, 0
    indices = self._order()[self.position:self.position + self.batch_size][self.host_rows]
    self.position += self.batch_size
    text = np.empty((len(indices), self.tokenizer.text_len), np.int32)
    for row, index in enumerate(indices):
      candidates = str(self.captions[index]).split("\n")
      if self.training:
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        caption = candidates[rng.integers(len(candidates))]
        text[row], truncated = self.tokenizer.encode(caption, training=True, rng=rng)
      else:
        text[row], truncated = self.tokenizer.encode(candidates[0])
      self.truncated_captions += int(truncated)
    return {"text": text, "codes": self.codes[indices]}
