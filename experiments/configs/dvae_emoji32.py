"""The emoji demo's dVAE: dvae_emoji64.py at half the side, 32x32 emoji -> 8x8 codes over 512.

  python experiments/train_dvae.py --config=experiments/configs/dvae_emoji32.py \
      --workdir=runs/dvae_emoji32

Expected (the emoji demo's first stage, 2 CPU cores, one busy with another job): 3,000 steps in
about 14 minutes, held-out PSNR 20.9 dB, codebook perplexity 149 of 512.

A step costs about a quarter of dvae_emoji64.py's, and the transformer gets 8x8 codes per image,
as in the shapes demo.
"""

from experiments.configs import dvae_emoji64


def get_config():
  config = dvae_emoji64.get_config()
  config.model.update(resolution=32)
  # Twice the shapes dVAE's steps, for the emoji's colours; the schedules (x 0.02) span them.
  config.train.update(num_steps=3_000, schedule_scale=0.02)
  config.keep_checkpoints = 2
  return config
