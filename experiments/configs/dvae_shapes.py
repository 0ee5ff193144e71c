"""The demo's dVAE on the shapes set: 32x32 images -> 8x8 codes over 256, minutes on 2 cores."""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.model = dict(resolution=32, group_count=3, n_hid=64, n_blk_per_group=1, n_init=64,
                      vocab_size=256, dtype="float32")
  # The paper's schedules shortened (schedule_scale): beta warms up over 50 steps, tau anneals
  # 1 -> 1/16 over 1,500 and the learning rate decays over 12,000 of the paper's 1.2M. The
  # learning-rate warm-up (not the paper's) keeps the short run from collapsing onto one code.
  config.train = dict(batch_size=32, num_steps=1_500, learning_rate=1e-3,
                      final_learning_rate=1e-4, lr_decay_steps=100_000, schedule_scale=0.01,
                      beta=6.6, ema_decay=0.98, lr_warmup_steps=100)
  config.data = dict(dataset="shapes", path="", split="train", crop="center",
                     num_examples=20_000, num_workers=0, eval_split="heldout", eval_batches=4)
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.log_every = 25
  config.image_every = 500
  config.eval_every = 500
  config.checkpoint_every = 250
  config.keep_checkpoints = 2
  return config
