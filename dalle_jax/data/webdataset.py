"""Tar shards as img2dataset writes them, streamed: `{key}.jpg|png|webp` + `{key}.txt` (+ `{key}.json`).

Shards are given as local paths or brace patterns (`data/{00000..00099}.tar`). The loader keeps a
host's share, `shards[process_index::process_count]`, and Grain's `mp_prefetch` then splits that
across the host's loader workers, both through `set_slice`. Shard order is reshuffled every epoch from the seed. The iterator state
(epoch, shard position, records read from the shard) is checkpointable: a restored iterator reopens
its shard and skips what it had already read.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import posixpath
import tarfile
from typing import Any, Iterator, Sequence

import braceexpand
import grain
import numpy as np

from dalle_jax.data import records

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
  """Brace-expands each pattern (`a/{000..009}.tar`) and checks every shard exists."""
  patterns = [urls] if isinstance(urls, str) else list(urls)
  paths = [path for pattern in patterns for path in braceexpand.braceexpand(pattern)]
  if not paths:
    raise ValueError("webdataset: no shard paths given")
  missing = [path for path in paths if not os.path.isfile(path)]
  if missing:
    raise FileNotFoundError(
        f"webdataset: {len(missing)} of {len(paths)} shards do not exist, first {missing[0]!r}. "
        "Give local .tar paths or a brace pattern such as 'data/{00000..00099}.tar'.")
  return paths


def _split_member_name(name: str) -> tuple[str, str]:
  """'dir/000123.jpg' -> ('dir/000123', 'jpg'); the key ends at the basename's first dot."""
  directory, base = posixpath.split(name)
  stem, _, extension = base.partition(".")
  return posixpath.join(directory, stem), extension.lower()


def _group_to_record(shard: str, key: str, files: dict[str, bytes]) -> records.RawRecord:
  record_key = f"{os.path.basename(shard)}/{key}"
  image = next((files[ext] for ext in IMAGE_EXTENSIONS if ext in files), None)
  meta: dict[str, Any] = {"shard": shard}
  if "json" in files:
    try:
      meta["json"] = json.loads(files["json"])
    except ValueError:
      meta["json_error"] = "sidecar .json is not valid JSON"
  if image is None:
    return records.RawRecord(record_key, (), None, meta, skip=records.MISSING_IMAGE)
  if "txt" not in files:
    return records.RawRecord(record_key, (), None, meta, skip=records.MISSING_CAPTION)
  # img2dataset writes one caption per .txt; several lines are treated as alternatives.
  return records.RawRecord(record_key, tuple(files["txt"].splitlines()), image, meta)


def read_shard(path: str) -> Iterator[records.RawRecord]:
  """Streams one tar shard, grouping consecutive members with the same key into one record.

  A shard that cannot be opened, or breaks off mid-stream, yields one `unreadable_file` record
  at the point of failure, and the stream moves on to the next shard.
  """
  key, files = None, {}
  try:
    with tarfile.open(path, mode="r|*") as tar:
      for member in tar:
        if not member.isfile():
          continue
        member_key, extension = _split_member_name(member.name)
        if key is not None and member_key != key:
          yield _group_to_record(path, key, files)
          files = {}
        key = member_key
        files[extension] = tar.extractfile(member).read()
  except (tarfile.TarError, OSError, EOFError) as e:
    yield records.RawRecord(f"{os.path.basename(path)}/{key or ''}", (), None,
                            {"error": f"{type(e).__name__}: {e}"}, skip=records.UNREADABLE_FILE)
    return
  if key is not None:
    yield _group_to_record(path, key, files)


class WebDatasetSource(grain.IterDataset):
  """Streams `RawRecord`s from tar shards; this host's share, sliceable across loader workers."""

  def __init__(self, urls: str | Sequence[str], *, seed: int = 0, shuffle_shards: bool = True,
               num_epochs: int | None = None):
    super().__init__()
    self._shards = expand_urls(urls)
    self._seed = seed
    self._shuffle_shards = shuffle_shards
    self._num_epochs = num_epochs

  def configure(self, *, seed: int, shuffle_shards: bool,
                num_epochs: int | None) -> "WebDatasetSource":
    """A copy that streams with these settings (the loader's, so one config drives every source)."""
    configured = copy.copy(self)
    configured._seed, configured._shuffle_shards = seed, shuffle_shards
    configured._num_epochs = num_epochs
    return configured

  @property
  def shards(self) -> list[str]:
    return list(self._shards)

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """Keeps `shards[sl]`: the loader's split across hosts, then `mp_prefetch`'s across workers."""
    del sequential_slice  # whole shards are already sequential
    sliced = self._shards[sl]
    # Refused on every host alike, not only on those whose share would be empty.
    if not sliced or len(self._shards) < (sl.step or 1):
      raise ValueError(
          f"webdataset: {len(self._shards)} shards cannot be split {sl.step} ways (hosts or "
          f"loader workers); write at least {sl.step} shards (img2dataset: fewer samples per "
          "shard) or use fewer workers.")
    self._shards = sliced

  def shard_order(self, epoch: int) -> list[str]:
    if not self._shuffle_shards:
      return self._shards
    order = np.random.default_rng([self._seed, epoch]).permutation(len(self._shards))
    return [self._shards[i] for i in order]

  def __iter__(self) -> grain.DatasetIterator:
    return _WebDatasetIterator(self)

  def __str__(self) -> str:
    return f"WebDatasetSource({len(self._shards)} shards)"


class _WebDatasetIterator(grain.DatasetIterator):
  """Position = (epoch, index of the shard in that epoch's order, records read from it)."""

  def __init__(self, source: WebDatasetSource):
    super().__init__()
    self._source = source
    self._epoch, self._shard_position, self._records_read = 0, 0, 0
    self._stream: Iterator[records.RawRecord] | None = None

  def __next__(self) -> records.RawRecord:
    while True:
      if self._source._num_epochs is not None and self._epoch >= self._source._num_epochs:
        raise StopIteration
      if self._stream is None:
        shard = self._source.shard_order(self._epoch)[self._shard_position]
        self._stream = itertools.islice(read_shard(shard), self._records_read, None)
      record = next(self._stream, None)
      if record is not None:
        self._records_read += 1
        return record
      self._stream, self._records_read = None, 0
      self._shard_position += 1
      if self._shard_position == len(self._source._shards):
        self._shard_position, self._epoch = 0, self._epoch + 1

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self._epoch, "shard_position": self._shard_position,
            "records_read": self._records_read}

  def set_state(self, state: dict[str, Any]) -> None:
    self._epoch = int(state["epoch"])
    self._shard_position = int(state["shard_position"])
    self._records_read = int(state["records_read"])
    self._stream = None  # reopened and fast-forwarded on the next read
