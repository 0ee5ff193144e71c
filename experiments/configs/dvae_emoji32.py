"""The emoji demo's dVAE: 32x32 emoji -> 8x8 codes over 512, the shapes demo's network.

Half of dvae_emoji64.py's side, so a step costs about a quarter and the transformer gets 64 codes
per image, as in the shapes demo. 512 codes, not 256: emoji hold far more colours than shapes.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.model = dict(resolution=32, group_count=3, n_hid=64, n_blk_per_group=1, n_init=64,
                      vocab_size=512, dtype="float32")
  # dvae_emoji64.py's schedules (schedule_scale 0.02: beta 0 -> 6.6 over 100 steps, tau 1 -> 1/16
  # and the learning rate 1e-3 -> 1.25e-5 over 3,000) with dvae_shapes.py's learning-rate warm-up,
  # which keeps a short run from collapsing onto one code.
  config.train = dict(batch_size=32, num_steps=3_000, learning_rate=1e-3,
                      final_learning_rate=1.25e-5, lr_decay_steps=150_000, schedule_scale=0.02,
                      beta=6.6, ema_decay=0.99, lr_warmup_steps=100)
  # The train split only (3,172 emoji); the held-out variants measure PSNR.
  config.data = dict(dataset="emoji", path="", split="train", crop="center", num_examples=0,
                     num_workers=0, eval_split="heldout", eval_batches=8)
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.log_every = 25
  config.image_every = 500
  config.eval_every = 500
  config.checkpoint_every = 250
  config.keep_checkpoints = 2
  return config
