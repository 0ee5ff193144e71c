"""The emoji demo's reranker: 32x32 emoji (the samples' own size) against their names.

Use the emoji demo's tokenizer (768 pieces, text_len 24, as transformer_emoji32.py). eval/top1 is
caption -> image retrieval within held-out batches of 64 (chance 1/64); the held-out batches are
mostly skin-tone variants of a few families, so it is a hard test.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  # 8-pixel patches: 4x4 tokens per image, as reranker_small.py's 16-pixel ones at 64x64.
  config.model = dict(resolution=32, patch_size=8, image_width=96, image_depth=2, image_heads=4,
                      text_vocab_size=768, text_len=24, text_width=96, text_depth=2, text_heads=4,
                      embed_dim=96)
  config.train = dict(batch_size=64, num_steps=2_000, learning_rate=2e-3, warmup_steps=100,
                      final_learning_rate=1e-5, ema_decay=0.98)
  config.data = dict(dataset="emoji", path="", split="train", crop="center", num_examples=0,
                     num_workers=0, tokenizer_dir="", bpe_dropout=True, eval_split="heldout",
                     eval_batches=4)
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.log_every = 25
  config.eval_every = 500
  config.checkpoint_every = 500
  config.keep_checkpoints = 2
  return config
