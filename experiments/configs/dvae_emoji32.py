"""The emoji demo's dVAE: dvae_emoji64.py at half the side, 32x32 emoji -> 8x8 codes over 512.

A step costs about a quarter and the transformer gets 64 codes per image, as in the shapes demo.
512 codes, not 256: emoji hold far more colours than shapes.
"""

import os
import runpy

from ml_collections import config_dict


def get_config():
  emoji64 = runpy.run_path(os.path.join(os.path.dirname(__file__), "dvae_emoji64.py"))
  config = emoji64["get_config"]()
  config.model.update(resolution=32)
  # dvae_shapes.py's learning-rate warm-up keeps a short run from collapsing onto one code.
  config.train.update(lr_warmup_steps=100)
  # The emoji demo was measured without dvae_emoji64.py's scale floor: off until it is measured
  # here too.
  config.train.min_log_scale = config_dict.placeholder(float)  # None, overridable
  config.keep_checkpoints = 2
  return config
