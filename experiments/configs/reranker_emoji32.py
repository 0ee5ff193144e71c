"""The emoji demo's reranker: reranker_small.py's network on 32x32 emoji (the samples' own size)
against their names.

Use the emoji demo's tokenizer (768 pieces, text_len 24, as transformer_emoji32.py). eval/top1 is
caption -> image retrieval within held-out batches of 64 (chance 1/64); the held-out batches are
mostly skin-tone variants of a few families, so it is a hard test.
"""

import os
import runpy


def get_config():
  small = runpy.run_path(os.path.join(os.path.dirname(__file__), "reranker_small.py"))
  config = small["get_config"]()
  # 8-pixel patches: 4x4 tokens per image, as reranker_small.py's 16-pixel ones at 64x64.
  config.model.update(resolution=32, patch_size=8, text_vocab_size=768)
  config.data.update(dataset="emoji", num_examples=0)
  return config
