"""The paper's dVAE run: 256x256 -> 32x32 codes over 8192, batch 512, 3M updates (Appendix A.2).

  python experiments/train_dvae.py --config=experiments/configs/dvae_paper.py --workdir=runs/dvae \
      --config.data.path='shards/{00000..09999}.tar' --config.mesh.fsdp=8 \
      --coordinator_address=auto --fit_check=v5p:4x4x4

Expected (the fit check, compiled on a CPU host): on 64 v5p chips as data 8 x fsdp 8, 43.7 of
95 GiB per chip, at most 18,647 images/s (FLOPs at the chips' peak). Not trained here.
"""

import ml_collections

from dalle_jax.dvae import training as dvae_training
from dalle_jax.train import launch


def get_config():
  config = ml_collections.ConfigDict()
  config.model = dict(resolution=256, group_count=4, n_hid=256, n_blk_per_group=2, n_init=128,
                      vocab_size=8192, dtype="bfloat16")
  # Every other value: the paper's default.
  config.train = launch.config_section(dvae_training.DVAETrainConfig, batch_size=512,
                                       num_steps=3_000_000)
  # crop="dvae": the paper's augmentation (Appendix A.2, Listing 1: random crops, flips).
  config.data = dict(dataset="webdataset", path="", split="train", crop="dvae", num_examples=0,
                     num_workers=16, eval_split="", eval_batches=8)
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding = dict(mode="fsdp", min_size=2 ** 14)  # small arrays whole: splitting costs more
  config.log_every = 100
  config.image_every = 5_000
  config.eval_every = 10_000
  config.checkpoint_every = 5_000
  config.keep_checkpoints = 3
  config.init_from = ""  # a workdir to fine-tune from: its parameters and EMA, optimiser fresh
  return config
