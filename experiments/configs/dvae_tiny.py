"""The smallest dVAE that exercises every code path: for tests and smoke runs (16x16 shapes).

  python experiments/train_dvae.py --config=experiments/configs/dvae_tiny.py --workdir=/tmp/dvae

Expected: 8 steps in seconds after compiling; the figures mean nothing. The tests run it to check
logging, checkpoints, resuming and sharding (tests/experiments/test_train_dvae.py).
"""

import ml_collections

from dalle_jax.dvae import training as dvae_training
from dalle_jax.train import launch


def get_config():
  config = ml_collections.ConfigDict()
  config.model = dict(resolution=16, group_count=3, n_hid=16, n_blk_per_group=1, n_init=8,
                      vocab_size=32, dtype="float32")
  config.train = launch.config_section(
      dvae_training.DVAETrainConfig, batch_size=8, num_steps=8, learning_rate=1e-3,
      final_learning_rate=1e-4, schedule_scale=1e-3, ema_decay=0.9)
  config.data = dict(dataset="shapes", path="", split="train", crop="center", num_examples=256,
                     num_workers=0, eval_split="heldout", eval_batches=1)
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding = dict(mode="fsdp", min_size=2 ** 14)  # small arrays whole: splitting costs more
  config.log_every = 1
  config.image_every = 4
  config.eval_every = 4
  config.checkpoint_every = 2
  config.keep_checkpoints = 2
  config.init_from = ""  # a workdir to fine-tune from: its parameters and EMA, optimiser fresh
  return config
