"""The input pipeline: any source -> decoded, cropped, (tokenised) batches, with Grain.

    source -> [shuffle] -> this host's share -> [repeat] -> decode + crop (+ tokenise)
           -> worker processes (mp_prefetch) -> drop and count skipped -> batch

Random-access sources (`shapes`, `emoji`, `folder`) are shuffled globally and split across hosts by
index; streamed ones (`webdataset`) by shard. Every random choice (shuffle, caption, crop, BPE
dropout) is seeded from `config.seed` and the element's position, so a seed fixes the stream, and
`Loader.get_state()` / `set_state()` resume it exactly where it stopped.

Skipped records are dropped after the worker processes, in the training process, so their counts
(`Loader.counts`) are exact and travel with the iterator state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from absl import flags
import grain
import jax
import numpy as np

from dalle_jax.data import preprocess, records
from dalle_jax.data.webdataset import WebDatasetSource

# A streamed source with this many consecutive skips and nothing usable yet is treated as empty.
STREAM_EMPTY_PATIENCE = 10_000


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
  """How to turn a source into batches.

  Attributes:
    resolution: side of the square images, in pixels.
    batch_size: examples per batch on this host; None yields single examples.
    crop: one of `preprocess.CROP_MODES` (`center`, `random`, `dvae`, `transformer`).
    seed: fixes shuffling, caption choice, crops and BPE dropout.
    shuffle: shuffle records (random-access sources) or shard order plus a window (streamed).
    num_epochs: passes over the data; None repeats forever.
    num_workers: decoding processes; 0 decodes in the training process.
    read_threads: decoding threads per process.
    shuffle_window: records shuffled together in a streamed source.
    drop_remainder: drop the last partial batch.
    bpe_dropout: tokenise with the tokenizer's BPE dropout (training); False for evaluation.
  """
  resolution: int = 64
  batch_size: int | None = 8
  crop: str = "center"
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None
  num_workers: int = 0
  read_threads: int = 4
  shuffle_window: int = 256
  drop_remainder: bool = True
  bpe_dropout: bool = True

  def __post_init__(self):
    if self.resolution < 1:
      raise ValueError(f"resolution must be positive, got {self.resolution}")
    if self.batch_size is not None and self.batch_size < 1:
      raise ValueError(f"batch_size must be positive or None, got {self.batch_size}")
    if self.crop not in preprocess.CROP_MODES:
      raise ValueError(f"crop must be one of {preprocess.CROP_MODES}, got {self.crop!r}")
    if self.num_workers < 0:
      raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


def usable_captions(candidates: Sequence[str | bytes]) -> list[str] | str:
  """The candidates that are UTF-8 and not blank, stripped; or the skip reason if none is."""
  usable, not_utf8 = [], False
  for candidate in candidates:
    if isinstance(candidate, bytes):
      try:
        candidate = candidate.decode("utf-8")
      except UnicodeDecodeError:
        not_utf8 = True
        continue
    candidate = candidate.strip()
    if candidate:
      usable.append(candidate)
  if usable:
    return usable
  return records.CAPTION_NOT_UTF8 if not_utf8 else records.EMPTY_CAPTION


def decode_record(record: records.RawRecord, rng: np.random.Generator, config: LoaderConfig,
                  tokenizer=None) -> dict[str, Any] | records.Skipped:
  """One raw record -> a dict or Skipped.

  The dict holds `key`, `caption` (one usable candidate, drawn with `rng`), `captions` (all usable
  candidates, newline-joined, for pre-encoded datasets that draw again each epoch) and
  `image: uint8[res, res, 3]`, plus `text` (caption ids) and `truncated` given a tokenizer.
  """
  if record.skip is not None:
    return records.Skipped(record.key, record.skip, str(record.meta.get("error", "")))
  captions = usable_captions(record.captions)
  if isinstance(captions, str):
    return records.Skipped(record.key, captions)
  caption = captions[int(rng.integers(len(captions)))] if len(captions) > 1 else captions[0]
  image = record.image
  if not isinstance(image, np.ndarray):
    # JPEGs decode at a reduced DCT scale that still leaves room for the crop.
    scale = {"dvae": 3 / 2, "transformer": 9 / 8}.get(config.crop, 1)
    min_size = round(config.resolution * scale)
    try:
      image = preprocess.decode_image(image, min_size=min_size)
    except preprocess.ImageDecodeError as e:
      return records.Skipped(record.key, records.CORRUPT_IMAGE, str(e))
  example = {"key": record.key, "caption": caption, "captions": "\n".join(captions),
             "image": preprocess.preprocess(image, config.resolution, config.crop, rng)}
  if tokenizer is not None:
    example["text"], example["truncated"] = tokenizer.encode(
        caption, training=config.bpe_dropout, rng=rng)
  return example


class _CountAndDrop(grain.transforms.Filter):
  """Keeps decoded examples, counts the rest by reason; refuses a source with nothing usable."""

  def __init__(self, counts: records.SkipCounts, epoch_size: int | None):
    self.counts = counts
    self._epoch_size = epoch_size
    self._first_skips: list[records.Skipped] = []

  def filter(self, element) -> bool:
    if isinstance(element, records.Skipped):
      self.counts[element.reason] += 1
      if len(self._first_skips) < 3:
        self._first_skips.append(element)
      limit = self._epoch_size or STREAM_EMPTY_PATIENCE
      if self.counts["usable"] == 0 and self.counts.skipped >= limit:
        self.raise_empty()
      return False
    self.counts["usable"] += 1
    self.counts["truncated_captions"] += int(element.get("truncated", False))
    return True

  def raise_empty(self):
    examples = "; ".join(f"{s.key}: {s.reason} {s.detail}".strip() for s in self._first_skips)
    raise records.NoUsableDataError(
        f"the source has no usable image-caption pair ({self.counts.summary()}); first skipped: "
        f"{examples or 'none'}. Check the paths, the caption files and that the images open.")


def _host_share(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  return process_index, process_count


class Loader:
  """An iterator of batches (dicts of NumPy arrays) from a source, resumable from its state.

  Batches hold `image: uint8[batch, res, res, 3]`, `caption: str[batch]`, `captions: str[batch]`
  (every usable candidate, newline-joined), `key: str[batch]`, and with a tokenizer the caption
  ids `text: int32[batch, text_len]` and `truncated: bool[batch]`.
  """

  def __init__(self, source, config: LoaderConfig, *, tokenizer=None,
               process_index: int | None = None, process_count: int | None = None):
    process_index, process_count = _host_share(process_index, process_count)
    self.config = config
    self.counts = records.SkipCounts()

    def decode(record, rng):
      return decode_record(record, rng, config, tokenizer)

    if isinstance(source, grain.IterDataset):
      dataset, epoch_size = self._streamed(source, config, decode, process_index, process_count)
    else:
      dataset, epoch_size = self._random_access(source, config, decode, process_index,
                                                process_count)
    if config.num_workers:
      # Grain's workers read absl flags; outside an absl app (tests, notebooks) use defaults.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
    self._filter = _CountAndDrop(self.counts, epoch_size)
    dataset = dataset.filter(self._filter)
    if config.batch_size is not None:
      dataset = dataset.batch(config.batch_size, drop_remainder=config.drop_remainder)
    self._iterator = iter(dataset)

  @staticmethod
  def _random_access(source, config, decode, process_index, process_count):
    if len(source) < process_count:
      raise ValueError(f"{len(source)} records cannot be split over {process_count} hosts")
    dataset = grain.MapDataset.source(source)
    if config.shuffle:
      dataset = dataset.shuffle(seed=config.seed)
    dataset = dataset[process_index::process_count]
    epoch_size = len(dataset)
    # Each epoch reshuffles and redraws captions and crops: the random map sees a new index.
    dataset = dataset.repeat(config.num_epochs).random_map(decode, seed=config.seed)
    read_options = grain.ReadOptions(num_threads=config.read_threads)
    return dataset.to_iter_dataset(read_options), epoch_size

  @staticmethod
  def _streamed(source: WebDatasetSource, config, decode, process_index, process_count):
    source = source.configure(seed=config.seed, shuffle_shards=config.shuffle,
                              num_epochs=config.num_epochs)
    source.set_slice(slice(process_index, None, process_count))
    dataset = source
    if config.shuffle and config.shuffle_window > 1:
      dataset = grain.experimental.WindowShuffleIterDataset(
          dataset, window_size=config.shuffle_window, seed=config.seed)
    return dataset.random_map(decode, seed=config.seed), None

  def __iter__(self) -> "Loader":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      return next(self._iterator)
    except StopIteration:
      if self.counts["usable"] == 0:
        self._filter.raise_empty()
      raise

  def get_state(self) -> dict[str, Any]:
    """The position in the stream and the counts so far; JSON-serialisable."""
    return {"iterator": self._iterator.get_state(), "counts": dict(self.counts)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._iterator.set_state(state["iterator"])
    self.counts.clear()
    self.counts.update(state["counts"])

  def close(self) -> None:
    """Stops the worker processes, if any."""
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()
