"""The emoji demo's dVAE: dvae_emoji64.py at half the side, 32x32 emoji -> 8x8 codes over 512.

A step costs about a quarter and the transformer gets 64 codes per image, as in the shapes demo.
512 codes, not 256: emoji hold far more colours than shapes. dvae_emoji64.py's recipe keeps the
skin tones through the dVAE far better than the paper's schedules with no scale floor (figures:
BENCHMARKS.md).
"""

import os
import runpy


def get_config():
  emoji64 = runpy.run_path(os.path.join(os.path.dirname(__file__), "dvae_emoji64.py"))
  config = emoji64["get_config"]()
  config.model.update(resolution=32)
  # The demo's length, as measured: dvae_emoji64.py trains 1.5x longer.
  config.train.update(num_steps=3_000, schedule_scale=0.02)
  config.keep_checkpoints = 2
  return config
