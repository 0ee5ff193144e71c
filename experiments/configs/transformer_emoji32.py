"""The emoji demo's transformer: transformer_small.py's network on emoji names (BPE over 768, at
most 19 pieces) and 8x8 codes over 512 from experiments/configs/dvae_emoji32.py."""

import os
import runpy


def get_config():
  small = runpy.run_path(os.path.join(os.path.dirname(__file__), "transformer_small.py"))
  config = small["get_config"]()
  # 3,172 training pairs are 100 batches: dropout slows the memorising of so few.
  config.model.update(text_vocab_size=768, image_vocab_size=512, dropout=0.1)
  return config
