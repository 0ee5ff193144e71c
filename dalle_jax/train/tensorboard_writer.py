"""TensorBoard events of a training run (scalars and images), written by tensorboardX.

    events = EventLog(os.path.join(workdir, "tensorboard"), resume_step=None)
    events.scalars(step, {"loss": 1.25, "lr": 3e-4})
    events.image(step, "samples", grid)      # a PIL image or uint8[H, W, 3]
    events.close()

tensorboardX writes TensorBoard's own event format without TensorFlow. A run resumed from step N
marks step N + 1 as a restart (TensorBoard's purge), so points a killed run logged past its last
checkpoint are hidden and the curves read as one uninterrupted run, as `metrics_log` does.
"""

from __future__ import annotations

from collections.abc import Mapping
import itertools
import os
from typing import Any

import numpy as np
from PIL import Image
import tensorboardX

_WRITERS = itertools.count()


class EventLog:
  """Scalars and images for `tensorboard --logdir=<workdir>/tensorboard`."""

  def __init__(self, logdir: str, resume_step: int | None = None, enabled: bool = True):
    """`resume_step`: the checkpoint step a resumed run continues from (None when fresh);
    `enabled=False` (every host but the first in a multi-host run) writes nothing."""
    self._writer = None
    if enabled:
      # tensorboardX names a file by the second and host alone: a second writer within the same
      # second would overwrite the first. The pid and a count keep every name new.
      self._writer = tensorboardX.SummaryWriter(
          logdir, purge_step=None if resume_step is None else resume_step + 1,
          filename_suffix=f".{os.getpid()}.{next(_WRITERS)}")

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    """Every scalar of `values` at `step` (arrays with more than one element are left out)."""
    if self._writer is None:
      return
    for tag, value in values.items():
      if np.size(value) == 1:
        self._writer.add_scalar(tag, float(np.asarray(value).reshape(())), int(step))
    # Logging is rare next to training steps: flush now so TensorBoard sees the values and a
    # killed run loses none of them.
    self._writer.flush()

  def image(self, step: int, tag: str, image: Image.Image | np.ndarray) -> None:
    """One RGB image, uint8[H, W, 3] or a PIL image, at `step`."""
    if self._writer is None:
      return
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
      raise ValueError(f"{tag}: expected uint8[H, W, 3], got {pixels.dtype}{list(pixels.shape)}")
    self._writer.add_image(tag, pixels, int(step), dataformats="HWC")
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
