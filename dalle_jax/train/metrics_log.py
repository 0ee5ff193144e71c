"""Training metrics as JSON lines: one object per logged step, safe across kills and resumes."""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath
import numpy as np


class MetricsLog:
  """Appends `{"step": ..., **metrics}` lines to `path`.

  On resume from step N, lines past N (written after the last checkpoint by a run that was then
  killed) are dropped, so the file reads as one uninterrupted run. On an object store (gs://...),
  whose objects cannot be appended to, each write uploads the whole file again.
  """

  def __init__(self, path: str | os.PathLike, resume_step: int | None = None,
               enabled: bool = True):
    """`enabled=False` (every host but the first, in a multi-host run) writes nothing."""
    self.path = epath.Path(path)
    self.enabled = enabled
    self._text: str | None = None  # an object store's file, rewritten whole on each write
    if not enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if resume_step is not None and self.path.exists():
      kept = [line for line in self.path.read_text().splitlines(keepends=True)
              if _complete(line) and json.loads(line)["step"] <= resume_step]
      self.path.write_text("".join(kept))
    elif resume_step is None and self.path.exists():
      self.path.unlink()
    if "://" in os.fspath(self.path):
      self._text = self.path.read_text() if self.path.exists() else ""

  def write(self, step: int, metrics: dict[str, Any]):
    if not self.enabled:
      return
    line = json.dumps({"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}) + "\n"
    if self._text is not None:
      self._text += line
      self.path.write_text(self._text)
      return
    with self.path.open("a") as f:
      f.write(line)

  def read(self) -> list[dict[str, Any]]:
    return [json.loads(line) for line in self.path.read_text().splitlines() if _complete(line)]


def _complete(line: str) -> bool:
  # A kill can leave half a line at the end of the file.
  try:
    return "step" in json.loads(line)
  except ValueError:
    return False


def _plain(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()
