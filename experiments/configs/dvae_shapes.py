"""The shapes demo's dVAE: 32x32 images -> 8x8 codes over 512.

  python experiments/train_dvae.py --config=experiments/configs/dvae_shapes.py --workdir=runs/dvae

Expected (the shapes demo's first stage; 2 CPU cores, malloc on huge pages): 2,500 steps in about
6.5 minutes, held-out PSNR 30.0 dB, codebook perplexity 10.0; ground truth through it keeps every
captioned attribute in 0.65 of held-out captions (0.42 at 1,500 steps).

Not the paper's optimisation: about 88% of these pixels are flat background, where the decoder's
logit-Laplace scale b shrinks without bound, so the paper's loss becomes nearly all background and
the decoder paints average colours. The fields below say which change answers what.
"""

import ml_collections

from dalle_jax.dvae import training as dvae_training
from dalle_jax.train import launch


def get_config():
  config = ml_collections.ConfigDict()
  # 3 groups: two halvings, 32x32 -> 8x8 codes.
  config.model = dict(resolution=32, group_count=3, n_hid=64, n_blk_per_group=1, n_init=64,
                      vocab_size=512, dtype="float32")
  config.train = launch.config_section(
      dvae_training.DVAETrainConfig, batch_size=32, num_steps=2_500,
      # Held after the warm-up: a decaying rate loses the objects' colours in a short run.
      learning_rate=2e-3, final_learning_rate=2e-3,
      # The paper's schedule lengths scaled to the run: tau anneals over all of it, and so does
      # the rate where a derived config lets it decay.
      lr_decay_steps=150_000, schedule_scale=2_500 / 150_000,
      beta=2.5, beta_warmup_steps=0,  # the KL weight at once, and lower than the paper's 6.6
      min_log_scale=-2.0,  # bounds the background's weight; a lower floor merges objects
      tau_end=0.25,  # down to the paper's 1/16 the codes in use collapse in the last steps
      ema_decay=0.98,  # 0.999 would still weigh the first half of a 1,500-step run
      lr_warmup_steps=100,  # without it short runs collapse onto one code
      # The last 30% fit the decoder alone to the encoder's argmax codes, which it decodes at
      # sampling time: trained on Gumbel samples only it draws small stars as blobs.
      decoder_finetune_fraction=0.3)
  config.data = dict(dataset="shapes", path="", split="train", crop="center",
                     num_examples=20_000, num_workers=0, eval_split="heldout", eval_batches=4)
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding = dict(mode="fsdp", min_size=2 ** 14)  # small arrays whole: splitting costs more
  config.log_every = 25
  config.image_every = 500
  config.eval_every = 500
  config.checkpoint_every = 250
  config.keep_checkpoints = 2
  config.init_from = ""  # a workdir to fine-tune from: its parameters and EMA, optimiser fresh
  return config
