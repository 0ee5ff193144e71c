"""What every dataset hands to the input pipeline, and what the pipeline hands back.

A *source* is a random-access sequence (`__len__`, `__getitem__`) of `RawRecord`s, or, for streamed
data, an iterable of them. A raw record is cheap: captions still as the bytes or strings they were
stored as, the image still encoded (bytes), or already pixels when the dataset draws them itself.
`pipeline.decode_record` turns one into an `Example` or a `Skipped` with the reason.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Mapping

import numpy as np

# Reasons a record is skipped; counted and reported, never fatal on their own.
CORRUPT_IMAGE = "corrupt_image"
UNREADABLE_FILE = "unreadable_file"
EMPTY_CAPTION = "empty_caption"
CAPTION_NOT_UTF8 = "caption_not_utf8"
MISSING_CAPTION = "missing_caption"
MISSING_IMAGE = "missing_image"
SKIP_REASONS = (
    CORRUPT_IMAGE, UNREADABLE_FILE, EMPTY_CAPTION, CAPTION_NOT_UTF8, MISSING_CAPTION, MISSING_IMAGE)


@dataclasses.dataclass(frozen=True)
class RawRecord:
  """One undecoded image-caption pair.

  Attributes:
    key: a stable identifier (file path, tar key, index) used in messages.
    captions: candidate captions; one is drawn per epoch. `bytes` are decoded as UTF-8 later.
    image: encoded file bytes, or pixels `uint8[H, W, 3]` for datasets that draw their images.
    meta: whatever else the dataset knows (group, scene, json sidecar), passed through unchanged.
    skip: set when the record is already known to be unusable (for example an unreadable file).
  """
  key: str
  captions: tuple[str | bytes, ...]
  image: bytes | np.ndarray | None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  skip: str | None = None


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A record the pipeline could not use, and why (one of `SKIP_REASONS`)."""
  key: str
  reason: str
  detail: str = ""


class SkipCounts(collections.Counter):
  """Counts of skipped records by reason, plus `usable` (and notes such as
  `truncated_captions`, which count usable records); printable as one line."""

  @property
  def skipped(self) -> int:
    return sum(self[k] for k in SKIP_REASONS)

  def summary(self) -> str:
    reasons = ", ".join(f"{k}={self[k]}" for k in sorted(SKIP_REASONS) if self[k])
    notes = ", ".join(f"{k}={v}" for k, v in sorted(self.items())
                      if k != "usable" and k not in SKIP_REASONS and v)
    return (f"usable={self['usable']} skipped={self.skipped}" + (f" ({reasons})" if reasons else "")
            + (f"; {notes}" if notes else ""))


class NoUsableDataError(ValueError):
  """A source yielded no usable image-caption pair at all."""
